"""Discovery under adversarial clients: every attack strategy x attacker fraction, with and
without defences, on populations of 4 Gaussian groups of equal size, 200 and 1,000 clients,
3 seeds.

Run:   python experiments/adversarial/run.py [--clients 200 1000] [--seeds 0 1 2]
Resumable: each (clients, seed) cell is cached in experiments/adversarial/cells/ (delete a
file to redo it). Writes experiments/adversarial/results.json (every row) and REPORT.md
(generated from it, with the poisoning table of ``poison.py`` when its results exist).
Takes about 2 CPU minutes per 200-client seed and 4 per 1,000-client seed. Honest
predictors are trained once per cell (:func:`fedrnd.rnd.adversarial.prepare`); each attack
re-scores only its attackers' rows and columns.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from fedrnd.data import Dataset, Partition, build_federated
from fedrnd.rnd import STRICT, AttackConfig, Defences, RNDConfig
from fedrnd.rnd.adversarial import attack_population, decide, outcome, prepare

HERE = pathlib.Path(__file__).parent
FRACTIONS = (0.0, 0.01, 0.05, 0.10, 0.20)
TARGET = 0
STRATEGIES = {  # name -> AttackConfig fields (attackers come from groups other than TARGET)
    "replay": dict(predictor="replay", target_group=TARGET),
    "junk": dict(predictor="junk"),
    "other_group": dict(predictor="other_group", target_group=TARGET),
    "mixture+zeros": dict(predictor="other_group", target_group=(0, 1), row="zeros"),
    "zeros": dict(row="zeros"),
    "constant": dict(row="constant"),
    "reversed": dict(row="reversed"),
    "nan": dict(row="nan"),
    "inf": dict(row="inf"),
    "junk+zeros": dict(predictor="junk", row="zeros"),
    # Sybils: blocks of k identities share one mixture predictor (junk predictors are all
    # identical anyway), each uploading a zero row; k = 1 is "mixture+zeros".
    **{f"mixture+zeros sybil{k}": dict(predictor="other_group", target_group=(0, 1),
                                       row="zeros", sybil=k) for k in (3, 10)},
}
# Every strategy at every fraction at both scales (at 1,000 clients a STRICT decision costs
# about 10 CPU s: consent regroups).
LARGE = dict(fractions=FRACTIONS, strategies=tuple(STRATEGIES))
DEFENCES = {"none": Defences(validate=False, robust="mean"), "default": Defences(),
            "pair clip": Defences(robust="clip", clip=3.0), "strict": STRICT}
CELLS = HERE / "cells"


def population(c: int, groups: int = 4, n: int = 40, n_test: int = 10, dim: int = 6,
               sep: float = 8.0, seed: int = 0):
    """``c`` clients in ``groups`` equal groups; ``x = m_y + shift_g + N(0, I)``, 3 classes."""
    rng = np.random.default_rng(seed)
    g = rng.permutation(np.arange(c) % groups).astype(np.int32)
    shift = rng.normal(size=(groups, dim))
    shift *= sep / np.linalg.norm(shift, axis=1, keepdims=True)
    means = 2.0 * rng.normal(size=(3, dim))

    def draw(m):
        gg = np.repeat(g, m)
        y = rng.integers(0, 3, c * m)
        return (means[y] + shift[gg] + rng.normal(size=(c * m, dim))).astype(np.float32), \
            y.astype(np.int32)

    x_tr, y_tr = draw(n)
    x_te, y_te = draw(n_test)
    part = Partition([np.arange(i * n, (i + 1) * n) for i in range(c)],
                     [np.arange(i * n_test, (i + 1) * n_test) for i in range(c)], g)
    return build_federated(Dataset(x_tr, y_tr, x_te, y_te, 3, "gaussian_groups"), part)


def honest_accuracy(data, fed: np.ndarray, attackers: np.ndarray) -> float:
    """Honest clients' mean test accuracy after training inside the decided federations.

    The model is trained in closed form, so thousands of cells cost seconds: a federated
    nearest-class-mean classifier. Every member (attackers included: they train on their own
    data; poisoning is measured separately) sends its per-class sums and counts of training
    inputs, the federation averages them into class means (FedAvg of the class means, exact
    in one round), and each honest client classifies its test inputs by the nearest mean of
    its federation. With this population's shared labels and group shifts of norm 8, a
    federation that merges groups blurs every class mean across the shifts.
    """
    x = np.asarray(data.x, np.float64)
    y = np.asarray(data.y)
    k = int(y.max()) + 1
    tr_idx, tr_cnt = np.asarray(data.train_idx), np.asarray(data.train_count)
    te_idx, te_cnt = np.asarray(data.test_idx), np.asarray(data.test_count)
    c = len(fed)
    client = np.repeat(np.arange(c), tr_cnt)
    rows = np.concatenate([tr_idx[i, :tr_cnt[i]] for i in range(c)])
    f = int(fed.max()) + 1
    sums = np.zeros((f, k, x.shape[1]))
    cnt = np.zeros((f, k))
    np.add.at(sums, (fed[client], y[rows]), x[rows])
    np.add.at(cnt, (fed[client], y[rows]), 1.0)
    means = sums / np.maximum(cnt, 1.0)[..., None]
    honest = np.setdiff1d(np.arange(c), attackers)
    acc = []
    for i in honest:
        t = te_idx[i, :te_cnt[i]]
        d = ((x[t][:, None, :] - means[fed[i]][None]) ** 2).sum(-1)
        d[:, cnt[fed[i]] == 0] = np.inf
        acc.append(float(np.mean(np.argmin(d, 1) == y[t])))
    return float(np.mean(acc))


def run(c: int, seeds: list[int]) -> list[dict]:
    rows = []
    for seed in seeds:
        path = CELLS / f"c{c}_s{seed}.json"
        cell = json.loads(path.read_text()) if path.exists() else []
        cell = [r for r in cell if (r["strategy"] in STRATEGIES or r["strategy"] == "none")
                and "honest_acc" in r]  # rows from before the accuracy column are redone
        have = {r["strategy"] for r in cell} | ({"replay"} if any(
            r["strategy"] == "none" for r in cell) else set())
        todo = [s for s in STRATEGIES if s not in have
                and (c < 1000 or s in LARGE["strategies"])]
        if todo:  # only the strategies the cache lacks (e.g. one added since)
            cell += run_cell(c, seed, todo)
            CELLS.mkdir(exist_ok=True)
            path.write_text(json.dumps(cell, indent=0))
        rows += cell
    return rows


def run_cell(c: int, seed: int, strategies: list[str]) -> list[dict]:
    rows = []
    data = population(c, seed=seed)
    cfg = RNDConfig(network="mlp", seed=seed)
    t0 = time.time()
    pop = prepare(data, cfg)
    print(f"seed {seed}: honest population trained and scored in {time.time() - t0:.1f} s",
          flush=True)
    for name in strategies:
        kw = STRATEGIES[name]
        for frac in FRACTIONS if c < 1000 else LARGE["fractions"]:
            if frac == 0.0 and name != "replay":
                continue  # no attacker: one baseline row (listed under "none")
            attack = AttackConfig(fraction=frac, seed=seed, **kw)
            up = attack_population(pop, attack)
            for dname, dfn in DEFENCES.items():
                t1 = time.time()
                row = dict(seed=seed, clients=c, strategy=name if frac else "none",
                           fraction=frac, attackers=int(up.attackers.size), defences=dname)
                try:
                    fed = decide(pop, up, dfn).federation
                    res = outcome(fed, pop.groups, up.attackers,
                                  attack.target_group if attack.target_group is not None
                                  else None)
                    row.update(rejected=False, honest_ari=res["honest_ari"],
                               merged=res["merged"], admitted_share=res["admitted_share"],
                               isolated=len(res["isolated"]),
                               federations=int(fed.max()) + 1,
                               honest_acc=honest_accuracy(data, fed, up.attackers))
                except ValueError as e:
                    row.update(rejected=True, error=str(e)[:160], honest_acc=None)
                row["seconds"] = round(time.time() - t1, 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def _cell(rr: list[dict]) -> str:
    """Mean over seeds of one (strategy, fraction, defences) cell, with its spread."""
    if not rr:
        return ""
    if all(r["rejected"] for r in rr):
        return "rejected"
    ok = [r for r in rr if not r["rejected"]]
    ari = np.array([r["honest_ari"] for r in ok])
    out = f"{ari.mean():.2f}"
    if len(ari) > 1:
        out += f" ± {ari.std():.2f}"
    merged = sum(r["merged"] for r in ok)
    if merged:
        out += f" **M{merged}/{len(ok)}**"
    adm = [r["admitted_share"] for r in ok if r["admitted_share"] is not None]
    if adm:
        out += f", adm {np.mean(adm):.2f}"
    iso = np.mean([r["isolated"] for r in ok])
    if iso:
        out += f", iso {iso:.1f}"
    acc = [r["honest_acc"] for r in ok if r.get("honest_acc") is not None]
    if acc:
        out += f", acc {np.mean(acc):.3f}"
    if len(ok) < len(rr):
        out += f", rejected {len(rr) - len(ok)}/{len(rr)}"
    return out


def report(rows: list[dict], command: str, poison: dict | None = None) -> str:
    scales = sorted({r["clients"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# Discovery under adversarial clients",
        "",
        f"Generated by `{command}` from [`results.json`](results.json) (cached per cell in",
        "[`cells/`](cells)); threat model and defences:",
        "[docs/methods/threat-model.md](../../docs/methods/threat-model.md).",
        "",
        f"Populations: {', '.join(map(str, scales))} clients in 4 Gaussian groups of equal size "
        "(6-d, group shifts of norm 8), MLP pair, `RNDConfig(network=\"mlp\")` (criterion "
        f"`test`), seeds {seeds} (a new population per seed). Attackers are drawn from groups "
        "1-3; the target group is 0.",
        "",
        "Each cell: honest clients' ARI against their groups, mean ± standard deviation over "
        "seeds; **M*k*/*n***: in *k* of *n* seeds two true federations merged (a federation "
        "holds at least half of two groups' honest members); `adm`: mean share of attackers "
        "whose federation's honest majority is the target group (strategies with a target); "
        "`iso`: mean number of honest clients left alone; `acc`: honest clients' mean test "
        "accuracy after training inside the decided federations (a federated nearest-class-"
        "mean classifier, trained exactly in closed form: `honest_accuracy` in `run.py`); "
        "`rejected`: the uploads were refused "
        "(a `ValueError` naming the clients). Defences: `none` = "
        "`Defences(validate=False, robust=\"mean\")`, `default` = `Defences()` (validation "
        "and the per-direction clip: each direction's log novelty ratio floored at 6 median "
        "standard errors before a pair's two directions are averaged), `pair clip` = "
        "`Defences(robust=\"clip\", clip=3)` (the previous default: the averaged statistic "
        "floored), `strict` = `STRICT` (the default's clip, replay detection at 1e-3 and "
        "majority consent). `mixture+zeros sybil`*k*: the attackers come in blocks of *k* "
        "identities sharing one predictor trained on an even mixture of groups 0 and 1, each "
        "uploading a zero row (k = 1: `mixture+zeros`).",
        "",
    ]
    fracs = sorted({r["fraction"] for r in rows if r["fraction"] > 0})
    for c in scales:
        at = [r for r in rows if r["clients"] == c]
        lines += [f"## {c} clients", ""]
        lines += ["| strategy | defences | " + " | ".join(f"{f:.0%}" for f in fracs) + " |",
                  "|---|---|" + "---|" * len(fracs)]
        for d in DEFENCES:
            b = [r for r in at if r["strategy"] == "none" and r["defences"] == d]
            if b:
                lines.append(f"| no attacker | {d} | " + _cell(b) + " |" + " |" * (len(fracs) - 1))
        for s in STRATEGIES:
            if not any(r["strategy"] == s for r in at):
                continue
            for d in DEFENCES:
                cells = [_cell([r for r in at if r["strategy"] == s and r["defences"] == d
                                and r["fraction"] == f]) for f in fracs]
                lines.append(f"| {s} | {d} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Against the issue's bar", "",
              "With the defences on and at most 10 % attackers: no two true federations merge "
              "and honest ARI >= 0.95 (mean over seeds). Strategy x defences that miss it:", ""]
    for d in ("default", "strict"):
        miss = []
        for s in STRATEGIES:
            where = []
            for c in scales:
                bad = []
                for f in fracs:
                    rr = [r for r in rows if r["clients"] == c and r["strategy"] == s
                          and r["defences"] == d and r["fraction"] == f and not r["rejected"]]
                    if f <= 0.10 and rr and (any(r["merged"] for r in rr)
                                             or np.mean([r["honest_ari"] for r in rr]) < 0.95):
                        bad.append(f"{f:.0%}")
                if bad:
                    where.append(f"{c} clients: {', '.join(bad)}")
            if where:
                miss.append(f"{s} ({'; '.join(where)})")
        lines.append(f"* `{d}`: " + ("none" if not miss else "; ".join(miss)))
    lines += ["", "Why uploads were rejected (first message per defence setting):", ""]
    for d in DEFENCES:
        err = next((r["error"] for r in rows if r["rejected"] and r["defences"] == d), None)
        if err:
            lines.append(f"* `{d}`: {err}")
    if poison:
        lines += ["", poison_section(poison)]
    return "\n".join(lines) + "\n"


def poison_section(res: dict) -> str:
    """The poisoning table of ``poison.py``'s results."""
    lines = ["## Poisoning once admitted: robust aggregation inside federations", "",
             f"Generated by `{res['command']}` into [`poison.json`](poison.json). "
             f"{res['setup']}", "",
             "Honest clients' mean test accuracy after training (mean ± sd over seeds "
             f"{res['seeds']}):", "",
             "| aggregation | " + " | ".join(res["attacks"]) + " |",
             "|---|" + "---|" * len(res["attacks"])]
    for agg in res["aggregations"]:
        cells = []
        for att in res["attacks"]:
            v = np.array([r["honest_acc"] for r in res["rows"]
                          if r["aggregation"] == agg and r["attack"] == att])
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if v.size else "")
        lines.append(f"| {agg} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)
    command = "python experiments/adversarial/run.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv)
    rows = [r for c in args.clients for r in run(c, args.seeds)]
    (HERE / "results.json").write_text(json.dumps(dict(command=command.strip(), rows=rows),
                                                  indent=1))
    pj = HERE / "poison.json"
    poison = json.loads(pj.read_text()) if pj.exists() else None
    (HERE / "REPORT.md").write_text(report(rows, command.strip(), poison))


if __name__ == "__main__":
    main()
