"""Poisoning once admitted: RND-clustered FL with poisoning clients, with and without robust
aggregation inside federations.

Run:   python experiments/adversarial/poison.py [--seeds 0 1 2] [--rounds 10]
Writes experiments/adversarial/poison.json; ``run.py`` puts its table into REPORT.md.
About 2-3 CPU minutes (3 seeds). Resumable per (seed, attack, aggregation) row.

Setup: scikit-learn digits, 40 clients in 4 rotation groups (0/90/180/270 degrees, 10 each),
MLP 64-10 trained with 1 local epoch of SGD (batch 16, lr 0.1) per round. Discovery runs once
per seed (``RNDClustered`` defaults, MLP pair) and is honest: the 4 poisoners (10 %, drawn
with ``rnd_seed``) are admitted to their own group's federation like anyone, then send their
honest update times 20 (``scale``) or times -10 (``sign_flip``) every round. Every
(attack, aggregation) pair starts from the same discovered state and round keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import numpy as np
from sklearn.metrics import adjusted_rand_score

from fedrnd.algorithms import RNDClustered
from fedrnd.data import build_federated, load_source, make_partition
from fedrnd.engine import ClientOptimizer, Engine, LocalSpec, client_hparams, evaluate_clients
from fedrnd.models import make_model

HERE = pathlib.Path(__file__).parent
OUT = HERE / "poison.json"
CLIENTS, FRACTION = 40, 0.10
ATTACKS = {"none": dict(), "scale x20": dict(poison="scale", poison_factor=20.0),
           "sign_flip x10": dict(poison="sign_flip", poison_factor=10.0)}
AGGREGATIONS = {"mean": dict(aggregation="mean"), "median": dict(aggregation="median"),
                "trimmed_mean 0.2": dict(aggregation="trimmed_mean", trim=0.2),
                "clip": dict(aggregation="clip")}
SETUP = ("Digits, 40 clients in 4 rotation groups, MLP 64-10, 1 local epoch of SGD (batch 16, "
         "lr 0.1) per round; honest discovery (RND defaults, MLP pair) once per seed; 10 % "
         "poisoners (4 clients) send their honest update times 20 (`scale x20`) or -10 "
         "(`sign_flip x10`) every round once in their federation.")


def run_seed(seed: int, rounds: int, done: dict) -> list[dict]:
    ds = load_source("digits")
    data = build_federated(ds, make_partition("rotation", ds, CLIENTS, seed, num_groups=4))
    model = make_model("mlp", data.feature_shape, data.num_classes, hidden=[64])
    engine = Engine(model, LocalSpec(batch_size=16, epochs=1), ClientOptimizer())
    _, hp = client_hparams(CLIENTS, lr=0.1)
    base = RNDClustered(engine=engine, network="mlp", rnd_seed=seed,
                        poison_fraction=FRACTION)
    t0 = time.time()
    state0 = base.init(jax.random.key(seed), data, hp)
    fed = np.asarray(state0["clients"]["cluster_id"])
    ari = float(adjusted_rand_score(np.asarray(data.group), fed))
    print(f"seed {seed}: discovery {time.time() - t0:.1f} s, ARI {ari:.3f}", flush=True)
    # One set of clients per seed, honest under "none": every row averages the same clients.
    bad = dataclasses.replace(base, poison="scale").poisoners(CLIENTS)
    rows = []
    for att, akw in ATTACKS.items():
        for agg, gkw in AGGREGATIONS.items():
            key = f"{seed}/{att}/{agg}"
            if key in done:
                rows.append(done[key])
                continue
            alg = dataclasses.replace(base, **akw, **gkw)
            alg.validate(data)
            step = jax.jit(alg.round)
            state = state0
            t1 = time.time()
            for r in range(rounds):
                state, _ = step(state, data, jax.random.fold_in(jax.random.key(seed), r))
            ev = evaluate_clients(model.apply, *alg.models(state), data)
            acc = np.asarray(ev["test_acc"])
            row = dict(seed=seed, attack=att, aggregation=agg, discovery_ari=ari,
                       poisoners=[int(i) for i in np.flatnonzero(bad)],
                       poisoner_federations=[int(f) for f in fed[bad]],
                       honest_acc=float(acc[~bad].mean()),
                       seconds=round(time.time() - t1, 1))
            print(json.dumps(row), flush=True)
            rows.append(row)
            done[key] = row
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    command = "python experiments/adversarial/poison.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    prev = json.loads(OUT.read_text()) if OUT.exists() else {}
    done = {f"{r['seed']}/{r['attack']}/{r['aggregation']}": r for r in prev.get("rows", [])
            if prev.get("rounds") == args.rounds}
    rows = []
    for seed in args.seeds:
        rows += run_seed(seed, args.rounds, done)
        OUT.write_text(json.dumps(dict(command=command.strip(), setup=SETUP, rounds=args.rounds,
                                       seeds=args.seeds, attacks=list(ATTACKS),
                                       aggregations=list(AGGREGATIONS), rows=rows), indent=1))


if __name__ == "__main__":
    main()
