"""What a run leaves behind: metrics logs, metadata, summary table, accuracy plot.

Run directory layout::

    <run_dir>/config.json         the resolved config
    <run_dir>/metadata.json       versions, devices, XLA flags, git commit, data summary
    <run_dir>/summary.md|.csv     one row per method (printed at the end)
    <run_dir>/accuracy.png        mean client test accuracy vs round, all methods
    <run_dir>/accuracy_<family>.png   the same per method family (centralized, clustered,
                                  decentralized), when the methods span several
    <run_dir>/<method>/metrics.jsonl, metrics.csv, final.json, per_client.npz, checkpoints/
    <run_dir>/<method>/<artifact>.npz|.png|.json   what the method's report found (novelty
                                  matrix, federations, graph), see :func:`write_report`
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedrnd.driver import rundir
from fedrnd.driver.loggers import JsonlLogger
from fedrnd.engine.evaluate import clustering_scores  # noqa: F401 - the driver's scorer too


def write_json(path: Path, obj: Any) -> None:
    rundir.write_json(path, obj)


def savez(path: Path, **arrays: Any) -> None:
    """``np.savez`` written atomically (a crash never leaves half an archive)."""
    with rundir.atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure atomically, in the format of ``path``'s suffix."""
    with rundir.atomic_write(path, "wb") as f:
        fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png")


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata(cfg, data, dataset_info: dict[str, Any], mapper) -> dict[str, Any]:
    import fedrnd

    try:
        import jaxlib
        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_version = None
    return {
        "fedrnd": fedrnd.__version__, "jax": jax.__version__, "jaxlib": jaxlib_version,
        "python": platform.python_version(), "platform": platform.platform(),
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "num_devices_used": mapper.num_shards, "chunk_size": mapper.chunk,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "git_commit": _git_commit(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "data": dataset_info,
    }


MetricLogger = JsonlLogger
"""The ``metrics.jsonl`` logger under its former name (moved to :mod:`fedrnd.driver.loggers`)."""


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Whole rows of a metrics log; a last line cut short by a crash is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a crash: only whole rows count
    return rows


def read_history(path: Path, upto: int) -> list[dict[str, Any]]:
    """Rows of a metrics log with ``round <= upto`` (what a checkpoint at ``upto`` covers)."""
    rows = read_rows(path)
    return [r for r in rows if r["round"] <= upto]


def rewrite_history(path: Path, rows: list[dict[str, Any]]) -> None:
    rundir.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with rundir.atomic_write(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


_COLUMNS = [("test_acc/mean", "test acc (mean)"), ("test_acc/weighted", "test acc (weighted)"),
            ("test_acc/worst10", "worst 10%"), ("test_acc_ft/mean", "test acc +FT"),
            ("train_loss/mean", "train loss"), ("clusters", "clusters"), ("ari", "ARI"),
            ("bytes_per_client", "MB/client"), ("time", "time (s)")]
_OPTIONAL = ("clusters", "ari", "test_acc_ft/mean")
"""Columns shown as "-" for methods that do not report them (no clustering, no fine-tuning)."""


def summary_table(methods: dict[str, Any]) -> str:
    """A markdown table, one row per method, of the final evaluation.

    The fine-tune column appears when some method was evaluated with fine-tuning.
    """
    cols = [(k, c) for k, c in _COLUMNS if k != "test_acc_ft/mean" or
            any(k in res.final for res in methods.values())]
    head = "| method | " + " | ".join(c for _, c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for tag, res in methods.items():
        cells = []
        for k, _ in cols:
            v = res.final.get(k, float("nan"))
            if k in _OPTIONAL and k not in res.final:
                cells.append("-")
                continue
            cells.append(f"{v / 1e6:.2f}" if k == "bytes_per_client" else
                         f"{v:.1f}" if k == "time" else f"{v:.0f}" if k == "clusters" else
                         f"{v:.4f}")
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(run_dir: Path, methods: dict[str, Any]) -> None:
    rundir.write_text(run_dir / "summary.md", summary_table(methods) + "\n")
    write_csv(run_dir / "summary.csv", [{"method": t, **r.final} for t, r in methods.items()])


_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def accuracy_figure(methods: dict[str, Any], title: str = ""):
    """The figure of :func:`plot_accuracy` (a matplotlib ``Figure``, not saved).

    Why the styling: methods often reach the same accuracy, and same-styled lines then hide
    each other; every method gets its own line style and marker (cycled at different
    periods, so pairs repeat only after 8 methods), and the round axis only has integer ticks
    (a 3-round run showed 0.5, 1.5, ...). A light band below each line reaches down to the
    accuracy of the worst 10% of clients, which the mean hides.
    """
    # A bare Figure (no pyplot) leaves the user's backend alone, e.g. inline in notebooks.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.5, 4), dpi=120)
    ax = fig.subplots()
    plotted = 0
    for i, (tag, res) in enumerate(methods.items()):
        pts = [(r["round"], r["test_acc/mean"]) for r in res.history if "test_acc/mean" in r]
        if pts:
            xs, ys = zip(*pts, strict=True)
            (line,) = ax.plot(xs, ys, linestyle=_LINESTYLES[i % len(_LINESTYLES)],
                              marker=_MARKERS[i % len(_MARKERS)], ms=4, mfc="none", alpha=0.9,
                              label=tag)
            band = [(r["round"], r["test_acc/mean"], r["test_acc/worst10"]) for r in res.history
                    if "test_acc/mean" in r and "test_acc/worst10" in r]
            if band:
                bx, top, low = zip(*band, strict=True)
                ax.fill_between(bx, low, top, color=line.get_color(), alpha=0.12, lw=0)
            plotted += 1
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("mean client test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if plotted > 4:  # many methods: beside the axes, where it covers no line
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  fontsize="small")
    elif plotted:
        ax.legend(loc="best")
    fig.tight_layout()
    return fig


def plot_accuracy(path: Path, methods: dict[str, Any], title: str = "") -> None:
    """Mean client test accuracy vs round for every method (PNG, :func:`accuracy_figure`)."""
    save_figure(accuracy_figure(methods, title), path)


def plot_accuracy_by_family(run_dir: Path, methods: dict[str, Any], families: Mapping[str, str],
                            title: str = "") -> list[Path]:
    """``accuracy_<family>.png``, one figure per method family, when the methods span several.

    ``families`` maps a method's label to its family (the method class's metadata,
    :func:`fedrnd.algorithms.method_family`). With a dozen methods in one figure the lines of
    one family (the clustered methods, say) are hard to tell apart; a figure per family
    compares the methods that share a setting. Returns the paths written (none when all
    methods share one family: ``accuracy.png`` already is that figure).
    """
    groups: dict[str, dict[str, Any]] = {}
    for tag, res in methods.items():
        groups.setdefault(families.get(tag, "other"), {})[tag] = res
    if len(groups) < 2:
        return []
    paths = []
    for family, members in groups.items():
        path = Path(run_dir) / f"accuracy_{re.sub(r'[^A-Za-z0-9_.+-]', '_', family)}.png"
        save_figure(accuracy_figure(members, f"{title} ({family})" if title else family), path)
        paths.append(path)
    return paths


def plot_matrix(path: Path, matrix: np.ndarray, group: np.ndarray, title: str = "",
                label: str = "novelty", xlabel: str = "predictor of client j",
                ylabel: str = "data of client i") -> None:
    """Heat map of a client x client matrix, clients ordered by ground-truth group (PNG).

    The default axis names are those of RND's novelty matrix (row i: client i's data, column j:
    client j's predictor); other methods pass their own (e.g. PACFL's proximity)."""
    from matplotlib.figure import Figure

    order = np.argsort(np.asarray(group), kind="stable")
    m = np.asarray(matrix)[np.ix_(order, order)]
    fig = Figure(figsize=(5.5, 4.5), dpi=120)
    ax = fig.subplots()
    im = ax.imshow(m, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=label)
    # Group boundaries, so blocks are easy to read.
    bounds = np.flatnonzero(np.diff(np.asarray(group)[order])) + 0.5
    for b in bounds:
        ax.axhline(b, color="w", lw=0.6)
        ax.axvline(b, color="w", lw=0.6)
    ax.set_xlabel(f"{xlabel} (ordered by true group)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


_ARTIFACT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_RESERVED = frozenset({"final", "metrics", "per_client", "checkpoints", "events"})
"""Stems of the files the driver itself writes into a method's directory."""
_SUFFIX = {"arrays": ".npz", "matrix": ".npz", "graph": ".npz", "json": ".json"}


def write_report(out_dir: Path, report: Any, method: str = "") -> dict[str, float]:
    """Write a method's :class:`~fedrnd.algorithms.base.Report` into ``out_dir``; return its
    summary figures (for ``final.json``, which the caller writes last).

    Every artifact is written atomically under its name: ``arrays`` and ``graph`` as
    ``<name>.npz``; ``matrix`` as ``<name>.npz`` (unless ``meta["save"]`` is false) and a heat
    map ``<name>.png`` (:func:`plot_matrix`); ``json`` as ``<name>.json``. A plain mapping of
    numbers is read as figures only. Raises ``TypeError`` / ``ValueError`` naming ``method``
    for a report the driver cannot write (a method bug: better loud than a missing file).
    """
    from fedrnd.algorithms.base import Artifact, Report

    who = f"{method}: " if method else ""
    if isinstance(report, Mapping):
        report = Report(dict(report))
    if not isinstance(report, Report):
        raise TypeError(f"{who}report() must return a fedrnd.algorithms.Report, got "
                        f"{type(report).__name__}")
    scalars = {}
    for k, v in report.scalars.items():
        try:
            scalars[str(k)] = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"{who}report figure {k!r} must be a number, got "
                            f"{type(v).__name__}") from None
    out_dir = Path(out_dir)
    for name, art in report.artifacts.items():
        if not isinstance(art, Artifact):
            raise TypeError(f"{who}report artifact {name!r} must be an Artifact, got "
                            f"{type(art).__name__}")
        suffix = _SUFFIX[art.kind]
        stem = name[:-len(suffix)] if isinstance(name, str) and name.endswith(suffix) else name
        if (not isinstance(name, str) or not _ARTIFACT_NAME.fullmatch(name)
                or stem in _RESERVED):
            raise ValueError(f"{who}report artifact name {name!r} must be one file name of "
                             f"letters, digits, _ . - and not one of {sorted(_RESERVED)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_artifact(out_dir, stem, art)
    return scalars


def _write_artifact(out_dir: Path, stem: str, art: Any) -> None:
    if art.kind == "json":
        write_json(out_dir / f"{stem}.json", art.data)
        return
    arrays = {k: np.asarray(v) for k, v in art.data.items()}
    meta = dict(art.meta)
    if art.kind == "graph":
        u, v = arrays["u"], arrays["v"]
        if u.ndim != 1 or u.shape != v.shape:
            raise ValueError(f"graph artifact {stem!r}: u and v must be edge lists of one "
                             f"length, got shapes {u.shape} and {v.shape}")
    if art.kind != "matrix" or meta.get("save", True):
        savez(out_dir / f"{stem}.npz", **arrays)
    if art.kind == "matrix":
        m = arrays[meta.get("matrix", "matrix")]
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"matrix artifact {stem!r}: a client x client matrix must be "
                             f"square, got shape {m.shape}")
        group = arrays.get(meta.get("group", "group"))
        group = np.zeros(len(m), np.int32) if group is None else group
        kw = {k: str(meta[k]) for k in ("title", "label", "xlabel", "ylabel") if k in meta}
        plot_matrix(out_dir / f"{stem}.png", m, group, **kw)

