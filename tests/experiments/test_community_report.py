"""The community-graph report's Pareto reading (experiments/decentralized/community_report.py)."""

from __future__ import annotations

from pathlib import Path

from tests.experiments._script import load_script

ROOT = Path(__file__).resolve().parents[2]
report = load_script(ROOT / "experiments" / "decentralized" / "community_report.py",
                     "community_report")


def test_pareto_keeps_exactly_the_undominated_points():
    pts = {"a": (10.0, 0.70), "b": (20.0, 0.75), "c": (25.0, 0.74), "d": (10.0, 0.69),
           "e": (30.0, 0.75)}
    # c: b has fewer bytes and more accuracy; d: a has the same bytes, more accuracy;
    # e: b has the same accuracy with fewer bytes.
    assert report.pareto(pts) == ["a", "b"]
    assert report.pareto({"x": (1.0, 0.5)}) == ["x"]
    # Ties in both coordinates dominate neither.
    assert report.pareto({"x": (1.0, 0.5), "y": (1.0, 0.5)}) == ["x", "y"]


def test_best_within_budget_reads_the_curve_up_to_the_budget():
    curve = [{"mb_per_device": 10.0, "test_acc": 0.6}, {"mb_per_device": 20.0, "test_acc": 0.7},
             {"mb_per_device": 30.0, "test_acc": 0.65}]
    assert report.best_within(curve, 5.0) is None
    assert report.best_within(curve, 20.0) == 0.7
    assert report.best_within(curve, 100.0) == 0.7
