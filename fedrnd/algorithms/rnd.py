"""RND-clustered FL: discover federations with RND, then FedAvg inside each federation.

Domini et al. 2026, "Discovering Collaboration from Novelty: Random Network Distillation for
Clustered Federated Learning" (arXiv 2606.30499): before training, every client trains a
narrow predictor of one frozen random target on its inputs; peers' predictors are scored on
each client's data, compatible peers form federations (:mod:`fedrnd.rnd.discovery`), and
each federation runs plain FedAvg. Optionally discovery is repeated every ``tau`` rounds (data
drift).

Federations live in the engine's per-cluster *slots*: ``state["slots"]`` holds ``K`` models
(leaves ``[K, ...]``) and ``state["clients"]["cluster_id"]`` the federation of each client
``[C]``. A round trains every (cohort) client from its federation's model and averages into the
slots by sample count, all federations in one jitted program. ``K`` is a static slot count,
the next power of two at or above the number of federations (:func:`grow_slots`), so rounds
recompile only when re-discovery finds more federations than there are slots.

Ledger: ``up/model``, ``down/model`` (participating clients, one model each way), and
``up/discovery``, ``down/discovery``: the discovery traffic (a predictor and one row of scores
up, the peers' predictors down), reported in the first round after each discovery.

Discovery runs on the host in :meth:`RNDClustered.init` (its heavy parts are jitted programs;
the driver never calls ``host_hook`` before round 0) and again in ``host_hook`` every ``tau``
rounds. The state also keeps the ``eps`` used and, for up to 2048 clients by default, the
novelty matrix as one row per client; :meth:`RNDClustered.report` returns it (the driver
writes it out with a heat map).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.algorithms._clusters import cluster_round
from fedrnd.algorithms._discovery import FederationOptions
from fedrnd.algorithms.base import Algorithm, Artifact, Metrics, Report, State, option
from fedrnd.data.federated import FederatedData
from fedrnd.engine import ClientHParams, comm, grow_slots
from fedrnd.engine.robust import AGGREGATORS, POISONS
from fedrnd.rnd.discovery import Discovery, discover
from fedrnd.rnd.rules import novelty_view


@dataclasses.dataclass(frozen=True)
class RNDClustered(FederationOptions, Algorithm):
    """RND federation discovery + FedAvg per federation (Domini et al. 2026).

    The discovery options are :class:`~fedrnd.algorithms._discovery.FederationOptions`."""

    name: ClassVar[str] = "rnd"
    clusters_clients: ClassVar[bool] = True
    input_only: ClassVar[bool] = True  # the predictors see client inputs, never labels
    tau: int | None = option(None, low=1, doc="Re-discover every ``tau`` rounds (unset: once, "
                                              "before round 0).")
    max_slots: int = option(4096, low=1, doc="Hard cap on federation slots.")
    keep_scores: bool | None = option(
        None, doc="Keep the latest novelty matrix in the state, one row per client (``C x C`` "
                  "floats), for the report (unset: up to 2048 clients).")
    aggregation: str = option(
        "mean", choices=AGGREGATORS,
        doc="Inside each federation: ``mean`` (FedAvg, sample-weighted), ``median`` "
            "(coordinate-wise), ``trimmed_mean`` (drop the ``trim`` share at each end per "
            "coordinate) or ``clip`` (updates clipped to the federation's median update norm; "
            ":mod:`fedrnd.engine.robust`). Anything but ``mean`` trains one model per cohort "
            "client (memory of ``M`` models, not ``K``).")
    trim: float = option(0.1, low=0, high=0.5, high_open=True,
                         doc="``trimmed_mean``: the share dropped at each end.")
    poison: str | None = option(
        None, choices=POISONS,
        doc="The poisoning attacker (``docs/methods/threat-model.md``): ``round(poison_fraction "
            "* C)`` clients (drawn with ``rnd_seed``) send their honest update times "
            "``poison_factor`` (``scale``) or ``-poison_factor`` (``sign_flip``); unset: none.")
    poison_fraction: float = option(0.0, low=0, high=1, doc="Share of poisoning clients.")
    poison_factor: float = option(10.0, finite=True, doc="The poisoners' update multiplier.")

    @property
    def hook_every(self) -> int | None:  # type: ignore[override]
        # The base declares a class-level constant; re-discovery makes it an option.
        return self.tau

    # ---------------------------------------------------------------------------------------
    def discover(self, data: FederatedData, key: jax.Array) -> Discovery:
        """Run RND discovery on ``data`` (host side; the heavy parts are jitted)."""
        return discover(data, self.rnd_config, key=key, mapper=self.engine.mapper,
                        attack=self.attack_config, defences=self.discovery_defences)

    def init(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        disc = self.discover(data, jax.random.fold_in(key, 1))
        found = {"federation": disc.federation, "num_federations": disc.num_federations,
                 "eps": disc.eps, "bytes_up": disc.bytes_up, "bytes_down": disc.bytes_down}
        if self._keeps_scores(data.num_clients):
            found.update(scores=disc.scores, sigma=disc.sigma)
        return self._initial_state(key, hp, found,
                                   grow_slots(disc.num_federations, 1, self.max_slots))

    def init_template(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        """``init``'s structure without running discovery (one slot; a resumed run restores
        the checkpoint's shapes)."""
        c, f32 = data.num_clients, jnp.float32
        sds = jax.ShapeDtypeStruct
        found = {"federation": sds((c,), jnp.int32), "num_federations": sds((), jnp.int32),
                 "eps": sds((), f32), "bytes_up": sds((c,), f32), "bytes_down": sds((c,), f32)}
        if self._keeps_scores(c):
            found.update(scores=sds((c, c), f32), sigma=sds((c,), f32))
        return jax.eval_shape(lambda k, h, f: self._initial_state(k, h, f, 1), key, hp, found)

    def _initial_state(self, key: jax.Array, hp: ClientHParams, found: dict, k: int) -> State:
        # Every federation starts from the same initial weights as the other methods.
        params = self.engine.model.init(key)
        slots = jax.tree.map(lambda p: jnp.broadcast_to(p, (k, *p.shape)).copy(), params)
        state = {"round": jnp.zeros((), jnp.int32), "slots": slots,
                 "num_federations": jnp.asarray(found["num_federations"], jnp.int32),
                 "eps": jnp.asarray(found["eps"], jnp.float32),
                 "clients": {"hp": hp, "cluster_id": jnp.asarray(found["federation"], jnp.int32),
                             "pending_up": jnp.asarray(found["bytes_up"], jnp.float32),
                             "pending_down": jnp.asarray(found["bytes_down"], jnp.float32)}}
        if "scores" in found:
            # Row i is client i's own scores: a per-client leaf, sharded with the clients.
            state["clients"]["novelty"] = jnp.asarray(found["scores"], jnp.float32)
            state["clients"]["sigma"] = jnp.asarray(found["sigma"], jnp.float32)
        return state

    def _keeps_scores(self, num_clients: int) -> bool:
        return num_clients <= 2048 if self.keep_scores is None else bool(self.keep_scores)

    def poisoners(self, num_clients: int) -> np.ndarray:
        """``[C]`` bool: the clients that poison their federation (none without ``poison``)."""
        out = np.zeros(num_clients, bool)
        if self.poison is not None:
            n = int(round(self.poison_fraction * num_clients))
            rng = np.random.default_rng(self.rnd_seed + 17)
            out[rng.choice(num_clients, n, replace=False)] = True
        return out

    def round(self, state: State, data: FederatedData, key: jax.Array) -> tuple[State, Metrics]:
        slots, metrics, _ = cluster_round(
            self, state, data, key, aggregation=self.aggregation, trim=self.trim,
            poisoners=self.poisoners(data.num_clients), poison=self.poison,
            factor=self.poison_factor)
        cl = state["clients"]
        zero = jnp.zeros_like(cl["pending_up"])
        metrics = {**metrics,
                   "num_federations": state["num_federations"].astype(jnp.float32),
                   **comm(up_discovery=cl["pending_up"], down_discovery=cl["pending_down"])}
        state = {**state, "round": state["round"] + 1, "slots": slots,
                 "clients": {**cl, "pending_up": zero, "pending_down": zero}}
        return state, metrics

    def models(self, state: State):
        return state["slots"], state["clients"]["cluster_id"]

    def host_hook(self, state: State, data: FederatedData, round_idx: int) -> State:
        """Re-discovery every ``tau`` rounds; each new federation inherits the model of the old
        federation most of its members (by sample count) came from."""
        if not self.tau:
            return state
        key = jax.random.fold_in(jax.random.key(self.rnd_seed), 1_000_003 + int(round_idx))
        disc = self.discover(data, key)
        return self.adopt(state, disc, np.asarray(data.train_count))

    def adopt(self, state: State, disc: Discovery, train_count: np.ndarray) -> State:
        """Move ``state`` to the federations of ``disc`` (host side)."""
        old = np.asarray(state["clients"]["cluster_id"])
        new = np.asarray(disc.federation)
        f = disc.num_federations
        k_old = jax.tree.leaves(state["slots"])[0].shape[0]
        k = grow_slots(f, k_old, self.max_slots)
        w = np.asarray(train_count, np.float64)
        votes = np.zeros((f, k_old))
        np.add.at(votes, (new, old), w)
        src = np.zeros(k, np.int64)
        src[:f] = np.argmax(votes, axis=1)
        slots = jax.tree.map(lambda s: s[jnp.asarray(src)], state["slots"])
        cl = {**state["clients"], "cluster_id": jnp.asarray(new, jnp.int32)}
        cl["pending_up"] = cl["pending_up"] + jnp.asarray(disc.bytes_up, jnp.float32)
        cl["pending_down"] = cl["pending_down"] + jnp.asarray(disc.bytes_down, jnp.float32)
        if "novelty" in cl and getattr(disc, "scores", None) is not None:
            cl["novelty"] = jnp.asarray(disc.scores, jnp.float32)
            cl["sigma"] = jnp.asarray(disc.sigma, jnp.float32)
        return {**state, "slots": slots, "num_federations": jnp.asarray(f, jnp.int32),
                "eps": jnp.asarray(disc.eps, jnp.float32), "clients": cl}

    def report(self, state: State, data: FederatedData) -> Report:
        """``eps``, the federation count and the latest discovery as artifacts: ``novelty``
        (matrix, sigma, federations, eps, true groups; a heat map of the raw matrix) and
        ``novelty_normalised``, a heat map of the scores as the decision reads them
        (:func:`fedrnd.rnd.novelty_view`; clients ordered by true group)."""
        cl = state["clients"]
        eps = float(state["eps"])
        nfed = float(int(state["num_federations"]))
        rep = Report({"eps": eps, "federations": nfed})
        if "novelty" in cl:
            s, sigma, group = (np.asarray(a) for a in (cl["novelty"], cl["sigma"], data.group))
            what = f"eps={eps:.3g}, {nfed:.0f} federations"
            rep.artifacts["novelty"] = Artifact(
                "matrix", {"scores": s, "sigma": sigma, "federation": np.asarray(cl["cluster_id"]),
                           "eps": eps, "group": group},
                {"matrix": "scores", "title": f"RND novelty S ({what})"})
            view, formula, label = novelty_view(s, sigma, eps)
            if not np.isfinite(eps):
                what = f"{nfed:.0f} federations, paired test"
            # A view of the arrays saved above: drawn, not saved again.
            rep.artifacts["novelty_normalised"] = Artifact(
                "matrix", {"matrix": view, "group": group},
                {"title": f"{formula} ({what})", "label": label, "save": False})
        found = self.attack_report(np.asarray(cl["cluster_id"]), np.asarray(data.group))
        if found:
            rep.artifacts["attack.json"] = Artifact("json", found)
            rep.scalars.update(attack_honest_ari=found["honest_ari"],
                               attack_merged=float(found["merged"]))
        return rep
