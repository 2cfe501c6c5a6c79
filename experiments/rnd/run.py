#!/usr/bin/env python
"""RND experiments (issue 3): federation discovery and RND-clustered FL on known groups.

Run from the repository root::

    python experiments/rnd/run.py                     # every missing cell, then RESULTS.md
    python experiments/rnd/run.py --parts paper grid  # only some parts (then RESULTS.md)
    python experiments/rnd/run.py --report            # rebuild RESULTS.md from the cells only
    python experiments/rnd/run.py --quick --out /tmp/q  # smoke test: tiny settings, ~1 min

Parts (each result is one JSON *cell* per (part, population, variant, seed) under
``experiments/rnd/cells/``, stored through :class:`fedrnd.driver.sweep.CellCache`: a finished
cell is never recomputed while its key (:func:`discovery_key`, :func:`sim_key`) holds, so an
interrupted run resumes where it stopped and partial results are kept; a cell whose setting
changed is re-run. Cells written before the key existed carry none and are kept as they are):

``paper``    the paper's setup (``paper_fmnist.toml``, ``paper_cifar10.toml``): 12 clients in 4
             groups of 3 under additive feature patterns; RND's ARI/NMI against the true groups,
             the novelty heat maps and the final accuracy of ``rnd`` vs ``fedavg`` vs ``local``.
             CIFAR-10 goes through tfds and is skipped, with the loader's message, where the
             data is not prepared.
``control``  the negative control (``control_labelperm.toml``): the same 12 clients, same
             inputs, each group with its own label permutation; RND sees inputs only.
``grid``     discovery alone on the 12-client populations: predictor network (conv / MLP) x
             probe (train / holdout) x predictor budget (the library's 10 epochs / 400 steps).
             Every run's novelty matrix is then re-read with sigma ``row``/``self`` and eps
             ``auto``/0.25/0.5/1/2 (host-side, :func:`fedrnd.rnd.federations_from_scores`
             with ``criterion="eps"``: exactly what :func:`fedrnd.rnd.discover` does with that
             setting; ``tests/experiments`` checks the equivalence). Discovery runs here use
             the eps criterion (the library's default is the paired test).
``scaled``   discovery alone at 1,000 clients (``scaled_*.toml``): unequal feature-pattern and
             rotation groups, a Dirichlet label skew (no crisp groups) and label permutation.
``scaled_acc``  accuracy of rnd / fedavg / local on the 1,000-client pattern population.

All accuracy figures come from the task model, rounds and local schedule of the config file
named in the tables; the configs' headers state them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

SIGMAS = ("row", "self")
EPS_READS: tuple[str | float, ...] = ("auto", 0.25, 0.5, 1.0, 2.0)
DEFAULT_READ = "row/auto"


# --------------------------------------------------------------------------------------------
# what to run
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One discovery setting: :class:`fedrnd.rnd.RNDConfig` fields (sigma and eps are re-read)."""

    name: str
    rnd: dict[str, Any]
    label: str
    only: tuple[str, ...] | None = None  # populations it runs on (None: all)
    max_seeds: int | None = None  # at most this many seeds (None: the plan's)

    def runs(self, pop: str, seed_index: int) -> bool:
        return ((self.only is None or pop in self.only)
                and (self.max_seeds is None or seed_index < self.max_seeds))


@dataclasses.dataclass(frozen=True)
class Population:
    """A config file (its ``[data]`` section is the population) and the seeds to run it on."""

    name: str
    config: str
    title: str
    max_seeds: int | None = None  # at most this many of the plan's seeds (None: all)
    algorithms: tuple[dict[str, Any], ...] | None = None  # replaces the config's methods


PAPER = [Population("paper_fmnist", "paper_fmnist.toml",
                    "Fashion-MNIST, 12 clients, 4 pattern groups of 3"),
         Population("paper_cifar10", "paper_cifar10.toml",
                    "CIFAR-10 (tfds), 12 clients, 4 pattern groups of 3")]
# RND-clustered FL with a fixed eps = 0.5 on the paper setup (eps auto finds one federation
# there, which makes it FedAvg): what the method gains when discovery recovers the groups.
PAPER_EPS = [dataclasses.replace(PAPER[0], algorithms=(
    {"name": "rnd", "label": "rnd (eps 0.5)",
     "options": {"predictor_steps": 400, "criterion": "eps", "eps": 0.5}},))]
CONTROL = [Population("control_labelperm", "control_labelperm.toml",
                      "Fashion-MNIST, 12 clients, 4 label-permutation groups of 3")]
SCALED = [Population("scaled_pattern", "scaled_pattern.toml",
                     "1,000 clients, feature patterns, groups 400/300/200/100"),
          Population("scaled_rotation", "scaled_rotation.toml",
                     "1,000 clients, rotations, groups 400/300/200/100"),
          Population("scaled_dirichlet", "scaled_dirichlet.toml",
                     "1,000 clients, Dirichlet(0.3) label skew, no groups", max_seeds=2),
          Population("scaled_labelperm", "scaled_labelperm.toml",
                     "1,000 clients, label permutation, groups 400/300/200/100", max_seeds=2)]

GRID = [Variant("conv-train-400", {"network": "conv", "steps": 400},
                "conv, train probes, 400 steps"),
        Variant("mlp-train-400", {"network": "mlp", "steps": 400},
                "MLP, train probes, 400 steps"),
        Variant("conv-holdout-400", {"network": "conv", "steps": 400, "probe": "holdout"},
                "conv, holdout probes, 400 steps"),
        Variant("mlp-holdout-400", {"network": "mlp", "steps": 400, "probe": "holdout"},
                "MLP, holdout probes, 400 steps"),
        Variant("conv-train-e10", {"network": "conv", "min_steps": None},
                "conv, train probes, 10 epochs"),
        Variant("mlp-train-e10", {"network": "mlp", "min_steps": None},
                "MLP, train probes, 10 epochs")]
# The control only needs the settings the paper run uses (does RND split it? it must not).
CONTROL_GRID = GRID[:2]
# 1,000 clients of 60 images: probes capped at 10 per client (the matrix is 10^6 pairs). The
# conv pair costs about 7x the MLP pair here, so the 10-epoch conv run is kept to one cell.
SCALED_GRID = [Variant("mlp-train-e10", {"network": "mlp", "probe_cap": 10, "min_steps": None},
                       "MLP, train probes, 10 epochs (10 steps), cap 10"),
               Variant("mlp-train-300", {"network": "mlp", "steps": 300, "probe_cap": 10},
                       "MLP, train probes, 300 steps (= min_steps), cap 10"),
               Variant("mlp-train-100", {"network": "mlp", "steps": 100, "probe_cap": 10},
                       "MLP, train probes, 100 steps, cap 10", only=("scaled_pattern",)),
               Variant("conv-train-100", {"network": "conv", "steps": 100, "probe_cap": 10},
                       "conv, train probes, 100 steps, cap 10", only=("scaled_pattern",)),
               Variant("conv-train-e10", {"network": "conv", "probe_cap": 10, "min_steps": None},
                       "conv, train probes, 10 epochs (10 steps), cap 10",
                       only=("scaled_pattern",), max_seeds=1),
               Variant("mlp-holdout-100", {"network": "mlp", "steps": 100, "probe": "holdout",
                                           "probe_cap": 10},
                       "MLP, holdout probes, 100 steps, cap 10",
                       only=("scaled_pattern",), max_seeds=1)]


@dataclasses.dataclass
class Plan:
    seeds: list[int]
    control_acc_seeds: list[int]
    scaled_seeds: list[int]
    scaled_acc_seeds: list[int]
    quick: bool = False


FULL = Plan(seeds=list(range(10)), control_acc_seeds=list(range(3)),
            scaled_seeds=list(range(3)), scaled_acc_seeds=[0])
QUICK = Plan(seeds=[0], control_acc_seeds=[0], scaled_seeds=[0], scaled_acc_seeds=[0],
             quick=True)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


def _quick_raw(raw: dict[str, Any]) -> dict[str, Any]:
    """Tiny settings for a smoke test: scikit-learn digits instead of Fashion-MNIST, at most 24
    clients of 40 images, 2 rounds, 20 predictor steps."""
    raw = json.loads(json.dumps(raw))
    d = raw["data"]
    if d["source"] == "fashion_mnist":  # 8x8 digits: same code paths, a fraction of the work
        d["source"] = "digits"
    opts = d.setdefault("partition_options", {})
    n = d["num_clients"]
    if n > 24:
        gs = opts.get("group_sizes")
        if gs is not None:
            scaled = np.maximum(1, np.floor(np.asarray(gs) * 24 / n)).astype(int)
            scaled[0] += 24 - scaled.sum()
            opts["group_sizes"] = scaled.tolist()
        n = d["num_clients"] = 24
        if raw.get("cohort_size"):
            raw["cohort_size"] = 8
    opts["sizes"] = [40] * n
    if d["partition"] == "dirichlet":  # sizes do not combine with a Dirichlet split
        opts.pop("sizes")
        d.setdefault("source_options", {})
    opts["test_size"] = 20
    raw.update(rounds=2, eval_every=1)
    for a in raw.get("algorithms", []):
        if a["name"] == "rnd":
            a.setdefault("options", {})["predictor_steps"] = 20
    return raw


def load_cfg(pop: Population, seed: int, quick: bool = False, out_dir: Path | None = None):
    """The population's config with ``seed`` (and the quick settings) applied."""
    from fedrnd.driver.config import from_dict, validate

    with open(HERE / pop.config, "rb") as f:
        raw = from_dict(tomllib.load(f)).to_dict()
    if quick:
        raw = _quick_raw(raw)
    if pop.algorithms is not None:
        raw["algorithms"] = [dict(a) for a in pop.algorithms]
        if quick:
            raw = _quick_raw(raw)
    raw["seed"] = int(seed)
    raw["progress"] = False
    if out_dir is not None:
        raw["out_dir"] = str(out_dir)
    return validate(from_dict(raw))


def rnd_config(variant: Variant, quick: bool = False):
    from fedrnd.rnd import RNDConfig

    # These experiments measure the paper's eps rule (re-read with every sigma / eps below);
    # the library's default criterion is the paired test.
    kw = {"criterion": "eps", **variant.rnd}
    if quick:
        kw["steps"] = 20
    return RNDConfig(**kw)


# --------------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------------


def host_info() -> dict[str, Any]:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
            "jax": jax.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_avg_1min": round(load, 2)}


def cell_name(part: str, pop: str, variant: str, seed: int) -> str:
    """A cell's file under the cells directory."""
    return f"{part}/{pop}/{variant}/seed{seed}.json"


def cell_cache(cells: Path):
    """The cells directory as a :class:`~fedrnd.driver.sweep.CellCache`: records written
    atomically and stamped with their key's hash; ``legacy``: cells written before this script
    used the cache carry no hash and are reused as they are (as the script always did)."""
    from fedrnd.driver.sweep import CellCache

    return CellCache(cells, legacy=True, indent=1, default=_jsonable)


def discovery_key(cfg, rc, seed: int) -> dict[str, Any]:
    """What a discovery cell depends on: the data (its config and split seed), the RND settings
    and the discovery key."""
    from fedrnd.driver.sweep.cells import config_key

    d = config_key(cfg)
    return {"data": d["data"], "data_seed": d["seed"], "rnd": dataclasses.asdict(rc),
            "key": int(seed)}


def sim_key(cfg) -> dict[str, Any]:
    """What a simulation cell depends on: its resolved config (without where it runs) and the
    defaults of its methods, as for the cells of ``fedrnd compare``."""
    from fedrnd.driver.sweep.cells import config_key, method_defaults

    return {**config_key(cfg), "defaults": {a.tag: method_defaults(a.name)
                                            for a in cfg.algorithms}}


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def read_cells(cells: Path, part: str, pop: str, variant: str) -> list[dict[str, Any]]:
    d = cells / part / pop / variant
    if not d.is_dir():
        return []
    out = [json.loads(p.read_text()) for p in d.glob("seed*.json")]
    return sorted(out, key=lambda c: c["seed"])


def skip_path(cells: Path, part: str, pop: str) -> Path:
    return cells / part / pop / "skipped.json"


def load_data(cfg, cells: Path, part: str, pop: Population):
    """Build the population's data, or record why it cannot be built here (``None``)."""
    from fedrnd.driver.setup import build_data

    try:
        data, _ = build_data(cfg)
    except (FileNotFoundError, ImportError, RuntimeError) as e:
        msg = f"{type(e).__name__}: {e}"
        print(f"[{pop.name}] skipped: {msg}")
        cell_cache(cells).rewrite(skip_path(cells, part, pop.name).relative_to(cells),
                                  {"population": pop.name, "reason": msg, **host_info()})
        return None
    sp = skip_path(cells, part, pop.name)
    if sp.exists():
        sp.unlink()
    return data


# --------------------------------------------------------------------------------------------
# reading a novelty matrix with another sigma / eps (host side)
# --------------------------------------------------------------------------------------------


def read_decision(scores: np.ndarray, self_std: np.ndarray, sigma: str, eps: str | float,
                  rule: str = "mutual"):
    """The paper's eps rule on a dense novelty matrix under ``sigma``, ``eps`` and ``rule``:
    :func:`fedrnd.rnd.federations_from_scores` with ``criterion="eps"``, i.e. what
    :func:`fedrnd.rnd.discover` decides for the same scores with that setting."""
    from fedrnd.rnd import RNDConfig, federations_from_scores

    cfg = RNDConfig(criterion="eps", eps=eps, sigma=sigma, rule=rule)
    return federations_from_scores(np.asarray(scores, np.float32), cfg,
                                   self_std=np.asarray(self_std, np.float64))


def read_federations(scores: np.ndarray, self_std: np.ndarray, sigma: str,
                     eps: str | float, rule: str = "mutual") -> tuple[np.ndarray, float]:
    """Federations of a dense novelty matrix under ``sigma`` and ``eps`` and the eps used
    (:func:`read_decision`)."""
    dec = read_decision(scores, self_std, sigma, eps, rule)
    return dec.federation, float(dec.eps)


def label_tv(y_hist: np.ndarray, fed: np.ndarray, tv: np.ndarray | None = None
             ) -> tuple[float, float]:
    """Mean total-variation distance of client label distributions within / across federations.

    ``y_hist [C, K]`` label proportions (``tv``: their ``[C, C]`` distances, if already known).
    ``nan`` where there is no such pair.
    """
    if tv is None:
        p = np.asarray(y_hist, np.float64)
        tv = 0.5 * np.abs(p[:, None, :] - p[None, :, :]).sum(-1)
    same = fed[:, None] == fed[None, :]
    off = ~np.eye(len(fed), dtype=bool)
    w, b = tv[same & off], tv[~same]
    return (float(w.mean()) if w.size else float("nan"),
            float(b.mean()) if b.size else float("nan"))


RULES = ("mutual", "leader")


def read_key(sigma: str, eps: str | float, rule: str = "mutual") -> str:
    """``"row/auto"`` for the mutual rule (the default), ``"row/auto/leader"`` otherwise."""
    return f"{sigma}/{eps}" if rule == "mutual" else f"{sigma}/{eps}/{rule}"


def score_reads(scores, self_std, group, y_hist=None) -> dict[str, dict[str, Any]]:
    """Every (sigma, eps, rule) read of one novelty matrix: ARI/NMI vs ``group``, sizes.

    Rules: ``mutual`` (connected components of mutually compatible pairs, the default) and
    ``leader`` (no chaining through intermediaries); see :func:`fedrnd.rnd.federations`.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    tv = None
    if y_hist is not None:
        p = np.asarray(y_hist, np.float32)
        tv = np.zeros((len(p), len(p)), np.float32)
        for k in range(p.shape[1]):  # per class: no [C, C, K] temporary at 1,000 clients
            tv += np.abs(p[:, None, k] - p[None, :, k])
        tv *= 0.5
    reads = {}
    for rule in RULES:
        for sg in SIGMAS:
            for e in EPS_READS:
                dec = read_decision(scores, self_std, sg, e, rule)
                fed = dec.federation
                sizes = np.sort(np.bincount(fed))[::-1]
                r = {"eps": float(dec.eps), "federations": int(fed.max()) + 1,
                     "sizes": sizes.tolist(),
                     "ari": float(adjusted_rand_score(group, fed)),
                     "nmi": float(normalized_mutual_info_score(group, fed))}
                if tv is not None:
                    r["label_tv_within"], r["label_tv_across"] = label_tv(y_hist, fed, tv)
                if e == "auto" and rule == "mutual":
                    r["silhouette"] = float(dec.silhouette)
                reads[read_key(sg, e, rule)] = r
    return reads


def _label_hist(data) -> np.ndarray:
    y = np.asarray(data.y)
    idx, cnt = np.asarray(data.train_idx), np.asarray(data.train_count)
    valid = np.arange(idx.shape[1])[None, :] < cnt[:, None]
    k = data.num_classes
    h = np.zeros((idx.shape[0], k))
    rows = np.repeat(np.arange(idx.shape[0]), valid.sum(1))
    np.add.at(h, (rows, y[idx[valid]]), 1.0)
    return h / np.maximum(h.sum(1, keepdims=True), 1)


# --------------------------------------------------------------------------------------------
# running cells
# --------------------------------------------------------------------------------------------


def run_discovery_cell(pop: Population, variant: Variant, seed: int, cells: Path, part: str,
                       quick: bool, figures: Path | None, keep_matrix: bool,
                       matrices: Path | None = None, data_seed: int | None = None) -> None:
    """Discovery on ``pop`` split with ``data_seed`` (default ``seed``), discovery key
    ``key(seed)``: one cell with every sigma/eps/rule read."""
    name, cache = cell_name(part, pop.name, variant.name, seed), cell_cache(cells)
    data_seed = seed if data_seed is None else data_seed
    cfg = load_cfg(pop, data_seed, quick)
    rc = rnd_config(variant, quick)
    key = discovery_key(cfg, rc, seed)
    if cache.get(key, name=name) is not None:
        return
    import jax

    from fedrnd.rnd import discover

    data = load_data(cfg, cells, part, pop)
    if data is None:
        return
    info = host_info()
    print(f"[{part}/{pop.name}/{variant.name}] seed {seed}: {data.num_clients} clients ...",
          flush=True)
    t0 = time.perf_counter()
    disc = discover(data, rc, key=jax.random.key(seed))
    elapsed = time.perf_counter() - t0
    group = np.asarray(data.group)
    y_hist = _label_hist(data)
    reads = score_reads(disc.scores, disc.self_std, group, y_hist)
    d = reads[DEFAULT_READ]
    # The re-read of the run's own setting must be the run itself.
    assert d["federations"] == disc.num_federations and np.isclose(d["eps"], disc.eps), \
        (d["federations"], disc.num_federations, d["eps"], disc.eps)
    cell = {"part": part, "population": pop.name, "variant": variant.name, "seed": seed,
            "data_seed": data_seed, "key": seed,
            "config": pop.config, "rnd": dataclasses.asdict(rc), "quick": quick,
            "num_clients": data.num_clients, "group_sizes": np.bincount(group).tolist(),
            "train_per_client": float(np.mean(np.asarray(data.train_count))),
            "time_s": elapsed, "predictor_loss": float(np.mean(disc.train_loss)),
            "reads": reads, "host": {**info, "load_avg_1min_end": round(os.getloadavg()[0], 2)}}
    if keep_matrix:
        cell.update(scores=disc.scores, self_std=disc.self_std, group=group)
    elif matrices is not None:
        # Too big for a cell (4 MB per 1,000 clients); kept outside git for later re-reads.
        m = matrices / part / pop.name / variant.name
        m.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(m / f"seed{seed}.npz", scores=disc.scores, self_std=disc.self_std,
                            sigma=disc.sigma, group=group, label_hist=y_hist)
    if figures is not None and seed == min(FULL.seeds) and not keep_matrix:
        _plot_normalised(figures / f"{pop.name}_{variant.name}_seed{seed}.png", disc.z, group,
                         f"{pop.name}, {variant.name}: eps={disc.eps:.2f}, "
                         f"{disc.num_federations} federations")
    cache.put(key, cell, name=name)
    print(f"  {elapsed:.0f} s, {d['federations']} federations, ARI {d['ari']:.3f}", flush=True)


def _plot_normalised(path: Path, z, group, title: str, max_side: int = 250) -> None:
    """Heat map of the normalised novelty ``z`` (``Discovery.z``), clients ordered by true
    group; above ``max_side`` clients, the ordered matrix is shown as means of ``f x f`` blocks
    (an image of 1,000^2 cells would be megabytes and no more readable)."""
    from fedrnd.driver import outputs

    z = np.clip(np.asarray(z), -1.0, 4.0)
    g = np.asarray(group)
    f = -(-len(g) // max_side)
    if f > 1:
        o = np.argsort(g, kind="stable")
        n = len(g) // f * f
        z = z[np.ix_(o, o)][:n, :n].reshape(n // f, f, n // f, f).mean(axis=(1, 3))
        g = g[o][:n:f]
        title += f" ({f}x{f} block means)"
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs.plot_matrix(path, z, g, title=title,
                        label="(s_ij - s_ii) / sigma_i, clipped to [-1, 4]")


def run_sim_cell(pop: Population, seed: int, cells: Path, part: str, quick: bool,
                 runs: Path, figures: Path | None) -> None:
    """One seed of rnd vs fedavg vs local through :func:`fedrnd.simulate`."""
    name, cache = cell_name(part, pop.name, "sim", seed), cell_cache(cells)
    cfg = load_cfg(pop, seed, quick, out_dir=runs)
    key = sim_key(cfg)
    if cache.get(key, name=name) is not None:
        return
    import fedrnd

    data = load_data(cfg, cells, part, pop)
    if data is None:
        return
    info = host_info()
    print(f"[{part}/{pop.name}] seed {seed}: simulate {[a.tag for a in cfg.algorithms]} ...",
          flush=True)
    run_dir = runs / part / pop.name / f"seed{seed}"
    t0 = time.perf_counter()
    # An interrupted cell continues from its checkpoint; a leftover run of another config is
    # moved aside (never deleted).
    from fedrnd.driver.rundir import RunDirError

    try:
        res = fedrnd.simulate(cfg, run_dir=run_dir, progress=False, verbose=False, data=data,
                              resume=True)
    except RunDirError:
        res = fedrnd.simulate(cfg, run_dir=run_dir, progress=False, verbose=False, data=data,
                              overwrite=True)
    elapsed = time.perf_counter() - t0
    methods = {}
    for tag, m in res.methods.items():
        curve = [(h["round"], h["test_acc/mean"]) for h in m.history if "test_acc/mean" in h]
        methods[tag] = {k: m.final.get(k) for k in
                        ("test_acc/mean", "test_acc/weighted", "test_acc/worst10",
                         "train_acc/mean", "ari", "nmi", "clusters", "eps", "federations",
                         "time", "bytes_per_client")}
        methods[tag]["curve"] = curve
        if m.final.get("eps") is not None:
            methods[tag]["auto"] = "silhouette"  # eps auto criterion (gap_eps before it)
    cell = {"part": part, "population": pop.name, "variant": "sim", "seed": seed,
            "config": pop.config, "quick": quick, "num_clients": data.num_clients,
            "rounds": cfg.rounds, "model": {"name": cfg.model.name, **cfg.model.options},
            "local": dataclasses.asdict(cfg.local), "wall_s": elapsed, "methods": methods,
            "host": {**info, "load_avg_1min_end": round(os.getloadavg()[0], 2)}}
    rnd_tag = next((a.tag for a in cfg.algorithms if a.name == "rnd"), None)
    npz = run_dir / rnd_tag / "novelty.npz" if rnd_tag else None
    if npz is not None and npz.exists():
        z = np.load(npz)
        cell.update(scores=z["scores"], sigma=z["sigma"], federation=z["federation"],
                    group=z["group"])
        if figures is not None and seed == min(FULL.seeds):
            figures.mkdir(parents=True, exist_ok=True)
            prefix = pop.name if part in ("paper", "control") else f"{pop.name}_{part}"
            for f in ("novelty.png", "novelty_normalised.png"):
                shutil.copyfile(run_dir / rnd_tag / f,
                                figures / f"{prefix}_{f[:-4]}_seed{seed}.png")
    cache.put(key, cell, name=name)
    acc = {t: round(m["test_acc/mean"], 4) for t, m in methods.items()}
    print(f"  {elapsed:.0f} s, test acc {acc}", flush=True)


def run_part(part: str, plan: Plan, cells: Path, runs: Path, figures: Path | None) -> None:
    q = plan.quick
    if part == "paper":
        for seed in plan.seeds:
            for pop in PAPER:
                run_sim_cell(pop, seed, cells, part, q, runs, figures)
    elif part == "keys":
        # Same data (split seed 0), discovery keys 100, 101, ...: what the key alone changes.
        for k in plan.seeds:
            for pop in PAPER[:1]:
                run_discovery_cell(pop, GRID[0], 100 + k, cells, part, q, None,
                                   keep_matrix=True, data_seed=0)
    elif part == "paper_eps":
        for seed in plan.seeds:
            for pop in PAPER_EPS:
                run_sim_cell(pop, seed, cells, part, q, runs, figures)
    elif part == "control":
        for seed in plan.control_acc_seeds:
            for pop in CONTROL:
                run_sim_cell(pop, seed, cells, part, q, runs, figures)
    elif part == "grid":
        for seed in plan.seeds:
            for pop, grid in [(p, GRID) for p in PAPER] + [(c, CONTROL_GRID) for c in CONTROL]:
                for v in grid:
                    if skip_path(cells, part, pop.name).exists() and seed != plan.seeds[0]:
                        continue  # data known to be absent; tried again once per run
                    run_discovery_cell(pop, v, seed, cells, part, q, figures, keep_matrix=True)
    elif part == "scaled":
        for i, seed in enumerate(plan.scaled_seeds):
            for pop in SCALED:
                if pop.max_seeds is not None and i >= pop.max_seeds:
                    continue
                for v in SCALED_GRID:
                    if not v.runs(pop.name, i):
                        continue
                    run_discovery_cell(pop, v, seed, cells, part, q, figures, keep_matrix=False,
                                       matrices=runs / "matrices")
    elif part == "scaled_acc":
        for seed in plan.scaled_acc_seeds:
            run_sim_cell(SCALED[0], seed, cells, part, q, runs, figures)
    else:
        raise ValueError(f"unknown part {part!r}; allowed: {PARTS}")


PARTS = ("paper", "control", "grid", "keys", "scaled", "paper_eps", "scaled_acc")


def reread(cells: Path, runs: Path) -> int:
    """Recompute the sigma/eps/rule reads of existing discovery cells from their stored
    matrices (in the cell for 12 clients, ``runs/matrices`` for 1,000); returns how many.
    A re-read cell keeps the key hash it was stamped with (or its lack of one)."""
    n, cache = 0, cell_cache(cells)
    for path in sorted(cells.rglob("seed*.json")):
        cell = json.loads(path.read_text())
        if "reads" not in cell:
            continue
        if "scores" in cell:
            s, sd, g, yh = cell["scores"], cell["self_std"], cell["group"], None
        else:
            npz = runs / "matrices" / cell["part"] / cell["population"] / cell["variant"] \
                / path.name.replace(".json", ".npz")
            if not npz.exists():
                continue
            z = np.load(npz)
            s, sd, g, yh = z["scores"], z["self_std"], z["group"], z["label_hist"]
        cell["reads"] = score_reads(np.asarray(s, np.float32), np.asarray(sd), np.asarray(g),
                                    yh)
        cache.rewrite(path.relative_to(cells), cell)
        n += 1
    return n


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    """``mean ± std`` (population std over seeds) of the finite values, ``n/a`` if none."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "n/a"
    if v.size == 1:
        return fmt.format(v[0])
    return f"{fmt.format(v.mean())} ± {fmt.format(v.std())}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _sizes_summary(sizes_per_seed: list[list[int]], top: int = 4) -> str:
    """Federation counts and largest sizes, one entry per seed (e.g. ``4: 400/300/200/100``)."""
    parts = []
    for s in sizes_per_seed:
        head = "/".join(str(x) for x in s[:top]) + ("/..." if len(s) > top else "")
        single = sum(1 for x in s if x == 1)
        parts.append(f"{len(s)}: {head}" + (f" ({single} singletons)" if single > 1 else ""))
    return "; ".join(parts)


def _config_header(name: str) -> str:
    """The ``# Data: ...`` part of a config file's header (data, model, rounds, methods)."""
    lines = []
    for line in (HERE / name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    text = " ".join(lines)
    return text[text.find("Data:"):] if "Data:" in text else text


def _plot_seeds(path: Path, cells: list[dict[str, Any]], title: str) -> None:
    """Normalised novelty of every seed, clients ordered by true group (small multiples)."""
    from matplotlib.figure import Figure

    from fedrnd.rnd import normalised_scores

    cells = [c for c in cells if "scores" in c]
    if not cells:
        return
    cols = min(5, len(cells))
    rows = -(-len(cells) // cols)
    fig = Figure(figsize=(2.4 * cols, 2.4 * rows + 0.4), dpi=110)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, c in zip(axes, cells, strict=False):
        s = np.asarray(c["scores"], np.float32)
        g = np.asarray(c["group"])
        o = np.argsort(g, kind="stable")
        z = normalised_scores(s, np.diag(s), np.asarray(c["sigma"]))[np.ix_(o, o)]
        ax.imshow(np.clip(z, -1, 4), cmap="viridis", vmin=-1, vmax=4, interpolation="nearest")
        for b in np.flatnonzero(np.diff(g[o])) + 0.5:
            ax.axhline(b, color="w", lw=0.5)
            ax.axvline(b, color="w", lw=0.5)
        fed = c["methods"]["rnd"]
        ax.set_title(f"seed {c['seed']}: {fed['federations']:.0f} fed., ARI {fed['ari']:.2f}",
                     fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(cells):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def report(cells: Path, out: Path, figures: Path, plan: Plan, runs: Path) -> str:
    """RESULTS.md from the cells (every number below is computed here)."""
    L: list[str] = []
    all_cells = [json.loads(p.read_text()) for p in sorted(cells.rglob("seed*.json"))]
    hosts = [c["host"] for c in all_cells]
    L += ["# RND experiments (issue 3): results", "",
          "Generated by `python experiments/rnd/run.py` from the cells in "
          f"`{_rel(cells)}/` (one JSON per part, population, setting and seed; delete a cell "
          "to recompute it). Do not edit by hand.", ""]
    if plan.quick:
        L += ["**QUICK SMOKE RUN: tiny settings, the numbers mean nothing.**", ""]
    if hosts:
        dates = sorted(h["date"] for h in hosts)
        loads = [h["load_avg_1min"] for h in hosts]
        L += ["## Machine and settings", "",
              f"- machine: {hosts[0]['cpu']}, {hosts[0]['cores']} cores, "
              f"backend {hosts[0]['backend']}; jax {hosts[0]['jax']}, "
              f"Python {hosts[0]['python']}",
              f"- cells computed {dates[0][:16]} to {dates[-1][:16]}; the CPU was shared with "
              f"other jobs (1-minute load average at cell start: median {np.median(loads):.1f}, "
              f"max {max(loads):.1f} on {hosts[0]['cores']} cores), so wall times are only "
              "comparable within a table and carry that noise",
              "- mean ± std over seeds (population std); ARI/NMI from scikit-learn against the "
              "true groups; a seed is one data split (partition, patterns/permutations), model "
              "init and discovery key",
              "- RND discovery defaults of the library: network auto (= conv for images), "
              "Adam 1e-3, batch 128, 10 epochs, sigma row, probe train, eps auto, mutual rule",
              ""]
    L += _paper_section(cells, figures, plan)
    L += _control_section(cells, plan)
    L += _grid_section(cells)
    L += _scaled_section(cells, figures, runs)
    L += _scaled_acc_section(cells)
    disc = HERE / "DISCUSSION.md"
    if disc.exists() and not plan.quick:
        L += ["## Discussion", "", disc.read_text().strip(), ""]
    text = "\n".join(L) + "\n"
    out.write_text(text)
    return text


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def _acc_rows(sims: list[dict[str, Any]]) -> list[list[str]]:
    tags = list(sims[0]["methods"])
    rows = []
    for t in tags:
        ms = [c["methods"][t] for c in sims]
        rows.append([t, len(ms), mean_std([m["test_acc/mean"] for m in ms]),
                     mean_std([m["test_acc/worst10"] for m in ms]),
                     mean_std([m["train_acc/mean"] for m in ms]),
                     mean_std([m.get("clusters") for m in ms], "{:.1f}")
                     if ms[0].get("clusters") is not None else "-",
                     mean_std([m["time"] for m in ms], "{:.0f}")])
    return rows


_ACC_HEAD = ["method", "seeds", "test acc (client mean)", "worst 10%", "train acc",
             "federations", "training time (s)"]


def _paper_section(cells: Path, figures: Path, plan: Plan) -> list[str]:
    L = ["## 1. The paper's setup: 12 clients in 4 feature-pattern groups of 3", ""]
    for pop in PAPER:
        L += [f"### {pop.title} (`{pop.config}`)", ""]
        sp = skip_path(cells, "paper", pop.name)
        sims = read_cells(cells, "paper", pop.name, "sim")
        if sp.exists() and not sims:
            L += ["**Skipped here**: the data is not available on this machine. The loader "
                  "says:", "", f"> {json.loads(sp.read_text())['reason']}", ""]
            continue
        if not sims:
            L += ["(no cells yet)", ""]
            continue
        L += [_config_header(pop.config), ""]
        rnd = [c["methods"]["rnd"] for c in sims]
        exact = sum(1 for c in sims if c["methods"]["rnd"]["ari"] == 1.0)
        from sklearn.metrics import adjusted_rand_score
        stored = [c for c in sims if "scores" in c]
        decs = [read_decision(c["scores"], np.zeros(len(c["group"])), "row", "auto")
                for c in stored]
        sil = [float(d.silhouette) for d in decs]
        now = [adjusted_rand_score(c["group"], d.federation)
               for c, d in zip(stored, decs, strict=True)]
        old = sum(1 for c in sims if c["methods"]["rnd"].get("auto") != "silhouette")
        L += [f"**Discovery** ({len(sims)} seeds, the `rnd` method's own discovery"
              + (f"; {old} of these seeds ran with the earlier largest-gap eps auto, "
                 "now `fedrnd.rnd.gap_eps`" if old else "") + "): "
              f"ARI {mean_std([r['ari'] for r in rnd])}, NMI {mean_std([r['nmi'] for r in rnd])}, "
              f"federations {mean_std([r['federations'] for r in rnd], '{:.1f}')} "
              f"(4 true groups; exact recovery in {exact}/{len(sims)} seeds), "
              f"eps (auto) {mean_std([r['eps'] for r in rnd], '{:.2f}')}.", ""]
        if stored:
            L += [f"The current eps auto (best silhouette, splits iff >= 0.5; see "
                  f"[AUTO_EPS.md](AUTO_EPS.md)) re-read on the same stored matrices: ARI "
                  f"{mean_std(now)}, exact recovery in {sum(a == 1.0 for a in now)}/"
                  f"{len(now)} seeds, silhouette {_ratio_summary(sil)}. Where it recovers the "
                  f"groups, the federations are those of the `rnd (eps 0.5)` row below "
                  f"whenever that row's ARI is 1, so its accuracy is what the current default "
                  f"trains.", ""]
        L += [f"**Accuracy** after {sims[0]['rounds']} rounds ({len(sims)} seeds; each "
              "client's test set is drawn from its own distribution):", ""]
        extra = [c for p in PAPER_EPS if p.name == pop.name
                 for c in read_cells(cells, "paper_eps", p.name, "sim")]
        L += _table(_ACC_HEAD, _acc_rows(sims) + (_acc_rows(extra) if extra else [])) + [""]
        if extra:
            r = [c["methods"]["rnd (eps 0.5)"] for c in extra]
            L += [f"`rnd (eps 0.5)`: the same runs with a fixed eps = 0.5 instead of auto "
                  f"(`paper_eps` part; eps chosen after seeing the discovery grid below, so "
                  f"this row is not a blind test): ARI {mean_std([x['ari'] for x in r])}, "
                  f"federations {mean_std([x['federations'] for x in r], '{:.1f}')}.", ""]
        seeds_png = figures / f"{pop.name}_novelty_seeds.png"
        _plot_seeds(seeds_png, sims, f"{pop.name}: normalised novelty (s_ij - s_ii)/sigma_i, "
                                     "clients ordered by true group")
        for name, what in ((f"{pop.name}_novelty_seed0.png", "raw novelty S, seed 0"),
                           (f"{pop.name}_novelty_normalised_seed0.png",
                            "normalised novelty, seed 0"),
                           (seeds_png.name, "normalised novelty, every seed")):
            if (figures / name).exists():
                L += [f"![{what}](figures/{name})", ""]
    return L


def _control_section(cells: Path, plan: Plan) -> list[str]:
    L = []
    for pop in CONTROL:
        L += ["## 2. Negative control: label permutation (same inputs, different labels)", "",
              f"`{pop.config}`: {_config_header(pop.config)}", "",
              "RND scores inputs only, so groups that differ only in their labelling are "
              "invisible to it by design: the expected answer is one federation (ARI 0 against "
              "the true groups), after which RND-clustered FL is FedAvg.", ""]
        rows = []
        for v in CONTROL_GRID:
            cs = read_cells(cells, "grid", pop.name, v.name)
            if not cs:
                continue
            r = [c["reads"][DEFAULT_READ] for c in cs]
            one = sum(1 for x in r if x["federations"] == 1)
            rows.append([v.label, len(cs), f"{one}/{len(cs)}",
                         mean_std([x["federations"] for x in r], "{:.1f}"),
                         mean_std([x["ari"] for x in r])])
        if rows:
            L += ["Discovery (sigma row, eps auto):", ""]
            L += _table(["setting", "seeds", "one federation", "federations", "ARI"], rows)
            L += [""]
        sims = read_cells(cells, "control", pop.name, "sim")
        if sims:
            L += [f"Accuracy after {sims[0]['rounds']} rounds ({len(sims)} seeds):", ""]
            L += _table(_ACC_HEAD, _acc_rows(sims)) + [""]
    return L


def _read_row(cs: list[dict[str, Any]], read: str) -> list[str]:
    r = [c["reads"][read] for c in cs]
    return [mean_std([x["ari"] for x in r]), mean_std([x["nmi"] for x in r]),
            mean_std([x["federations"] for x in r], "{:.1f}")]


def _grid_section(cells: Path) -> list[str]:
    L = ["## 3. Discovery settings on the 12-client populations", "",
         "Discovery alone (`fedrnd.rnd.discover`), same populations and seeds as above. "
         "Each run's novelty matrix is re-read with every sigma x eps; the eps = auto, "
         "sigma = row read is the run itself. Time: wall seconds of one `discover` call "
         "(compilation included; cached across seeds by shape).", ""]
    for pop in PAPER:
        have = [(v, read_cells(cells, "grid", pop.name, v.name)) for v in GRID]
        have = [(v, cs) for v, cs in have if cs]
        if not have:
            if skip_path(cells, "grid", pop.name).exists():
                L += [f"### {pop.title}: skipped (data not available here)", ""]
            continue
        L += [f"### {pop.title}", "", "Network, probe and predictor budget "
              "(sigma row, eps auto):", ""]
        rows = [[v.label, len(cs), *_read_row(cs, DEFAULT_READ),
                 _ratio_summary(_read_values(cs, DEFAULT_READ, "silhouette")),
                 mean_std([c["time_s"] for c in cs], "{:.0f}"),
                 mean_std([c["predictor_loss"] for c in cs], "{:.2f}")] for v, cs in have]
        L += _table(["setting", "seeds", "ARI", "NMI", "federations", "silhouette",
                     "time (s)", "predictor loss"], rows) + [""]
        L += ["Silhouette: the best silhouette eps = auto finds among the candidate cuts of "
              "the normalised scores (sigma row), median (min); auto splits the population "
              "only when it is >= 0.5, otherwise it returns one federation.", ""]
        L += _eps_table(have, with_federations=False)
    for pop in PAPER[:1]:
        cs = read_cells(cells, "keys", pop.name, GRID[0].name)
        if not cs:
            continue
        r = [c["reads"][DEFAULT_READ] for c in cs]
        exact = sum(1 for x in r if x["ari"] == 1.0)
        L += [f"**Discovery key alone** ({pop.name}, {GRID[0].label}, library defaults "
              f"otherwise): one data split (seed 0), {len(cs)} discovery keys (predictor "
              f"init and batch order): exact recovery with eps auto in {exact}/{len(cs)}, "
              f"ARI {mean_std([x['ari'] for x in r])}, silhouette "
              f"{_ratio_summary(_read_values(cs, DEFAULT_READ, 'silhouette'))}; with eps 0.5 "
              f"(sigma row): ARI {mean_std(_read_values(cs, read_key('row', 0.5), 'ari'))}.",
              ""]
    return L


def _ratio_summary(values: Sequence[float]) -> str:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return "n/a"
    return f"{np.median(v):.2f} (min {v.min():.2f})"


def _read_values(cs: list[dict[str, Any]], key: str, field: str) -> list[float]:
    return [c["reads"][key][field] for c in cs if field in c["reads"].get(key, {})]


def _eps_table(have, with_federations: bool) -> list[str]:
    """ARI (and federations) for every sigma x eps, one row per (setting, rule)."""
    cols = [(s, e) for s in SIGMAS for e in EPS_READS]
    rows = []
    for v, cs in have:
        for rule in RULES:
            cells_ = []
            for s, e in cols:
                k = read_key(s, e, rule)
                a = mean_std(_read_values(cs, k, "ari"), "{:.2f}")
                if with_federations:
                    a += f" ({mean_std(_read_values(cs, k, 'federations'), '{:.0f}')})"
                cells_.append(a)
            rows.append([v.label, rule, *cells_])
    head = ["setting", "rule", *[f"{s} {e}" for s, e in cols]]
    what = "ARI (federations)" if with_federations else "ARI"
    return [f"sigma x eps x rule, {what}, mean ± std over seeds:", "", *_table(head, rows), ""]


def _plot_z_hist(path: Path, npz: Path, title: str) -> bool:
    """Histogram of the normalised scores (sigma row) of same-group and cross-group pairs, with
    the auto eps of that matrix: what the compatibility rule has to separate."""
    from matplotlib.figure import Figure

    if not npz.exists():
        return False
    m = np.load(npz)
    g = np.asarray(m["group"])
    # The scaled runs use sigma row: the stored sigma is the row std of the stored matrix.
    dec = read_decision(m["scores"], m["self_std"], "row", "auto")
    z, eps = dec.z, dec.eps
    off = ~np.eye(len(g), dtype=bool)
    same = (g[:, None] == g[None, :]) & off
    cross = g[:, None] != g[None, :]
    fig = Figure(figsize=(6, 3.4), dpi=110)
    ax = fig.subplots()
    lo, hi = np.percentile(z[off], [0.1, 99.9])
    bins = np.linspace(lo, hi, 120)
    ax.hist(z[same], bins=bins, alpha=0.6, density=True, label=f"same group ({same.sum():,})")
    if cross.any():
        ax.hist(z[cross], bins=bins, alpha=0.6, density=True,
                label=f"different groups ({cross.sum():,})")
    if lo <= eps <= hi:
        ax.axvline(eps, color="k", lw=1, ls="--", label=f"auto eps {eps:.2f}")
    ax.set_xlabel("(s_ij - s_ii) / sigma_i  (sigma row)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return True


def _scaled_section(cells: Path, figures: Path, runs: Path) -> list[str]:
    L = ["## 4. Scaled: 1,000 clients", "",
         "Discovery alone; 60 training images per client (all 60,000 Fashion-MNIST training "
         "images over 1,000 clients), probes capped at 10 per client; fewer seeds than above "
         "(the CPU budget). Federation sizes are listed per seed as `count: largest sizes`. "
         "† marks settings whose cells predate the silhouette eps auto: their matrices were "
         "not kept, so their auto columns show the earlier largest-gap rule (`gap_eps`); the "
         "fixed-eps columns are unaffected.", ""]
    for pop in SCALED:
        have = [(v, read_cells(cells, "scaled", pop.name, v.name)) for v in SCALED_GRID]
        have = [(v, cs) for v, cs in have if cs]
        if not have:
            continue
        L += [f"### {pop.title} (`{pop.config}`)", ""]
        rows = []
        for v, cs in have:
            r = [c["reads"][DEFAULT_READ] for c in cs]
            old = any("silhouette" not in x for x in r)
            row = [v.label + (" †" if old else ""), len(cs), *_read_row(cs, DEFAULT_READ),
                   _sizes_summary([x["sizes"] for x in r]),
                   mean_std([c["time_s"] for c in cs], "{:.0f}")]
            if pop.name == "scaled_dirichlet":
                row.insert(5, f"{mean_std([x['label_tv_within'] for x in r], '{:.2f}')} / "
                              f"{mean_std([x['label_tv_across'] for x in r], '{:.2f}')}")
            rows.append(row)
        head = ["setting", "seeds", "ARI", "NMI", "federations", "sizes per seed", "time (s)"]
        if pop.name == "scaled_dirichlet":
            head.insert(5, "label TV within / across")
            L += ["No true groups here (ARI/NMI against one group are degenerate). The label "
                  "column compares clients' label distributions (total variation distance) "
                  "inside federations with pairs across federations: lower inside means RND "
                  "grouped clients with similar label mixes (it sees only their images).", ""]
        L += _table(head, rows) + [""]
        L += _eps_table(have, with_federations=True)
        for v, _ in sorted(have, key=lambda vc: "conv-train-100" not in vc[0].name):
            png = figures / f"{pop.name}_{v.name}_seed0.png"
            if png.exists():
                L += [f"Normalised novelty, {v.label}, seed 0 (clients ordered by true group):",
                      "", f"![{pop.name} {v.name}](figures/{png.name})", ""]
                hist = figures / f"{pop.name}_{v.name}_zhist_seed0.png"
                npz = runs / "matrices" / "scaled" / pop.name / v.name / "seed0.npz"
                if _plot_z_hist(hist, npz, f"{pop.name}, {v.label}, seed 0") or hist.exists():
                    L += ["Distribution of the normalised scores the rule thresholds:", "",
                          f"![{pop.name} {v.name} scores](figures/{hist.name})", ""]
                break
    return L


def _scaled_acc_section(cells: Path) -> list[str]:
    pop = SCALED[0]
    sims = read_cells(cells, "scaled_acc", pop.name, "sim")
    if not sims:
        return []
    return ["## 5. Scaled accuracy: 1,000 clients, feature patterns", "",
            f"`{pop.config}`: {_config_header(pop.config)}", "",
            *_table(_ACC_HEAD, _acc_rows(sims)), ""]


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="parts to run (default: all, in order)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny populations and schedules, one seed")
    p.add_argument("--report", action="store_true", help="only rebuild RESULTS.md")
    p.add_argument("--reread", action="store_true",
                   help="recompute the sigma/eps/rule reads of existing discovery cells from "
                        "their stored novelty matrices (no discovery), then the report")
    p.add_argument("--out", type=Path, default=None,
                   help="where cells, figures and RESULTS.md go (default: experiments/rnd; "
                        "--quick needs it)")
    p.add_argument("--seeds", type=int, default=None, help="seeds of the 12-client parts")
    p.add_argument("--scaled-seeds", type=int, default=None, help="seeds of the scaled part")
    args = p.parse_args(argv)
    if args.quick and args.out is None:
        p.error("--quick writes to --out DIR (it must not overwrite the real cells)")
    plan = dataclasses.replace(QUICK if args.quick else FULL)
    if args.seeds is not None:
        plan.seeds = list(range(args.seeds))
        plan.control_acc_seeds = plan.control_acc_seeds[: args.seeds]
    if args.scaled_seeds is not None:
        plan.scaled_seeds = list(range(args.scaled_seeds))
    out = (args.out or HERE).resolve()
    cells, figures, runs = out / "cells", out / "figures", out / "runs"
    if out == HERE:
        runs = ROOT / "runs" / "rnd_experiments"  # git-ignored
    _compilation_cache()
    if args.reread:
        print(f"re-read {reread(cells, runs)} cells")
    elif not args.report:
        for part in args.parts:
            run_part(part, plan, cells, runs, figures)
    report(cells, out / "RESULTS.md", figures, plan, runs)
    print(f"wrote {out / 'RESULTS.md'}")
    return 0


def _compilation_cache() -> None:
    from fedrnd import compilation_cache

    compilation_cache.enable(min_compile_secs=0.5)


if __name__ == "__main__":
    sys.exit(main())
