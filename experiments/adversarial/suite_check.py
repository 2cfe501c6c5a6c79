"""Do the score-only defences change any federation of an honest population?

Re-decides every stored cell of the discovery suite (``experiments/discovery/cells``, written
by ``python experiments/discovery/suite.py run``) with the plain decision (validation only,
the default before the defences) and with the defences that need only the uploaded scores:
the per-direction clip (``robust="direction"``, the default), the previous averaged clip
(``robust="clip"`` at 3), majority consent (``consent=0.5``) and the default with consent.
Replay detection needs the predictors, which the cells do not store; it is checked on freshly
trained populations by the tests (``tests/rnd/test_adversarial.py``).

Run:   python experiments/adversarial/suite_check.py
Writes experiments/adversarial/SUITE_CHECK.md (and suite_check.json, the per-cell cache: the
script resumes from it; delete it to redo every cell). About 8 CPU minutes for the 166
dense cells, plus about 45 CPU s for each sparse two-stage cell at 10,000 clients (clip only:
consent is dense-only): seed 0 of each sparse population, ``--all-sparse`` for all 19.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sklearn.metrics import adjusted_rand_score  # noqa: E402

from fedrnd.rnd import Defences, RNDConfig, federations_from_scores  # noqa: E402

HERE = Path(__file__).resolve().parent
CELLS = HERE.parent / "discovery" / "cells"
SINGLE = ("iid", "dirichlet", "labelperm")  # one-distribution populations: truth = one group
CACHE = HERE / "suite_check.json"
OUT = HERE / "SUITE_CHECK.md"
COMMAND = "python experiments/adversarial/suite_check.py"
PLAIN = Defences(validate=True, robust="mean", consent=None, replay=None)
VARIANTS = {"default": Defences(),
            "pair clip": Defences(robust="clip", clip=3.0, consent=None, replay=None),
            "consent": Defences(robust="mean", consent=0.5, replay=None),
            "default+consent": Defences(consent=0.5)}
VERSION = 2  # cache rows of older variants (version 1: the averaged clip as default) are redone


def _decide(arr: dict, dfn: Defences) -> np.ndarray:
    if "scores" not in arr:  # sparse (two-stage) cell: the observed edges only
        return federations_from_scores(
            arr["edge_scores"], RNDConfig(), second=arr["edge_second"], count=arr["count"],
            s_self=arr["self_novelty"], self_std=arr["self_std"], edges=(arr["src"], arr["dst"]),
            num_clients=len(arr["group"]), defences=dfn).federation
    return federations_from_scores(arr["scores"], RNDConfig(), second=arr["second"],
                                   count=arr["count"], self_std=arr["self_std"],
                                   defences=dfn).federation


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as partitions (federation ids are arbitrary)."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


CONSENT_MAX = 200
"""Majority consent is re-checked on dense cells of at most this many clients unless
``--consent-all`` (at 1,000 clients a consent decision costs tens of CPU seconds)."""


def check_cell(path: Path, consent_all: bool = False) -> dict:
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    dense = "scores" in z.files
    keys = (("scores", "second") if dense else
            ("edge_scores", "edge_second", "src", "dst", "self_novelty"))
    arr = {k: z[k] for k in (*keys, "count", "self_std", "group")}
    t0 = time.process_time()
    plain = _decide(arr, PLAIN)
    row = dict(cell=path.stem, clients=meta["clients"], dense=dense,
               federations=int(plain.max()) + 1,
               stored_equal=_same(plain, np.asarray(z["federation"])))
    for name, dfn in VARIANTS.items():
        if dfn.consent is not None and (not dense or (meta["clients"] > CONSENT_MAX
                                                      and not consent_all)):
            continue  # consent is dense-only, and costly at 1,000 clients
        fed = _decide(arr, dfn)
        same = _same(plain, fed)
        row[name] = dict(same=same, federations=int(fed.max()) + 1,
                         ari_vs_plain=float(adjusted_rand_score(plain, fed)),
                         moved=int(len(plain) - _overlap(plain, fed)))
    row["cpu_s"] = round(time.process_time() - t0, 2)
    row["version"] = VERSION
    return row


def _overlap(a: np.ndarray, b: np.ndarray) -> int:
    """Clients in the best one-to-one matching of federations (a greedy lower bound)."""
    pairs, n = np.unique(np.stack([a, b], 1), axis=0, return_counts=True)
    used_a, used_b, tot = set(), set(), 0
    for k in np.argsort(-n, kind="stable"):
        fa, fb = pairs[k]
        if fa not in used_a and fb not in used_b:
            used_a.add(fa)
            used_b.add(fb)
            tot += int(n[k])
    return tot


def _truth_ari(cell: str, dfn: Defences) -> float:
    """ARI of a cell's decision against its true groups (one-distribution populations: one
    group, as in the discovery report)."""
    z = np.load(CELLS / f"{cell}.npz")
    arr = {k: z[k] for k in z.files if k != "meta"}
    pop = json.loads(str(z["meta"]))["population"]
    truth = np.zeros_like(arr["group"]) if pop in SINGLE else arr["group"]
    return float(adjusted_rand_score(truth, _decide(arr, dfn)))


def _tag(r: dict, name: str) -> str:
    v = r.get(name)
    if v is None:
        return "n/a"
    if v["same"]:
        return "same"
    return f"{v['federations']} ({v['moved']} moved, ARI vs plain {v['ari_vs_plain']:.3f})"


def report(rows: list[dict]) -> str:
    dense = [r for r in rows if r["dense"]]
    sparse = [r for r in rows if not r["dense"]]
    changed = [r for r in rows if not all(r[v]["same"] for v in VARIANTS if v in r)]
    lines = [
        "# Score-only defences on the honest discovery suite",
        "",
        f"Generated by `{COMMAND}` from the stored cells of the discovery suite",
        "([experiments/discovery/cells](../discovery/cells)) into",
        "[suite_check.json](suite_check.json).",
        "",
        "Every cell is decided again from its stored scores with the plain decision "
        "(validation only) and with the defences that need only the uploaded scores: the "
        "default `Defences()` (the per-direction clip at 6 median standard errors), the "
        "previous default `robust=\"clip\"` at 3 (the averaged statistic floored), "
        "majority consent (`consent=0.5`, dense only) and the default with consent; a cell "
        "*changed* when the partitions differ. Replay detection needs the "
        "predictors, which cells do not store (see the threat model page for why it stays off "
        "by default).",
        "",
        f"* cells: {len(rows)} ({len(dense)} dense, every one; {len(sparse)} sparse two-stage "
        "at 10,000 clients, seed 0 of each population (a sparse decision costs about 20-100 "
        "CPU s; `--all-sparse` for all): no consent there, it is dense-only; consent is "
        f"re-checked on the dense cells of at most {CONSENT_MAX} clients (`--consent-all` for "
        "the 1,000-client ones, tens of CPU seconds each)",
        *(f"* changed by {v}: **{sum(not r[v]['same'] for r in rows if v in r)}** of "
          f"{sum(v in r for r in rows)}" for v in VARIANTS),
        f"* plain decision equal to the stored one: {sum(r['stored_equal'] for r in rows)} "
        f"of {len(rows)} (the rest were stored by an older decision rule)",
        "",
        "| cell | plain federations | " + " | ".join(VARIANTS) + " |",
        "|---|---|" + "---|" * len(VARIANTS),
    ]
    for r in changed:
        lines.append(f"| {r['cell']} | {r['federations']} | "
                     + " | ".join(_tag(r, v) for v in VARIANTS) + " |")
    for v in ("default", "pair clip"):
        moved = [r for r in rows if not r[v]["same"]]
        if moved:
            lines += ["", f"Cells `{v}` changes, ARI against the true groups:", ""]
            for r in moved:
                lines.append(f"* {r['cell']}: plain {_truth_ari(r['cell'], PLAIN):.3f}, {v} "
                             f"{_truth_ari(r['cell'], VARIANTS[v]):.3f}")
    lines += ["", "Cells unchanged by every variant: " + ", ".join(
        r["cell"] for r in rows if r not in changed) + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--consent-all", action="store_true",
                    help="majority consent on every dense cell (default: up to 200 clients)")
    ap.add_argument("--all-sparse", action="store_true",
                    help="every sparse cell (default: seed 0 only, ~45 CPU s per cell)")
    args = ap.parse_args(argv)
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    paths = sorted(CELLS.glob("*.npz"), key=lambda p: (p.stat().st_size, p.name))
    if not args.all_sparse:
        paths = [p for p in paths if p.stem.endswith("_s0") or "_10000_" not in p.stem]
    for p in paths:
        if p.stem in cache and cache[p.stem].get("version") == VERSION:
            continue
        row = check_cell(p, args.consent_all)
        cache[p.stem] = row
        CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True))
        print(json.dumps({k: row[k] for k in row if k in ("cell", "cpu_s")}
                         | {"same": all(row[v]["same"] for v in VARIANTS if v in row)}),
              flush=True)
    rows = [cache[p.stem] for p in sorted(paths, key=lambda p: p.name)]
    OUT.write_text(report(rows))
    print(OUT.read_text())


if __name__ == "__main__":
    main()
