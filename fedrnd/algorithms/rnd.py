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

from fedrnd.algorithms._clusters import check_choice, fixed_cluster_round
from fedrnd.algorithms.base import Algorithm, Artifact, Metrics, Report, State
from fedrnd.data.federated import FederatedData
from fedrnd.engine import (
    ClientHParams,
    broadcast,
    comm,
    grow_slots,
    keep_nonempty,
    per_client,
    tree_bytes,
)
from fedrnd.engine.robust import AGGREGATORS, POISONS, poison_updates, robust_aggregate
from fedrnd.rnd.discovery import Discovery, RNDConfig, check_eps, discover, normalised_scores


@dataclasses.dataclass(frozen=True)
class RNDClustered(Algorithm):
    """RND federation discovery + FedAvg per federation (Domini et al. 2026).

    Options (besides the engine and ``cohort_size``):
      criterion: ``"test"`` (default: the paired held-out test with Benjamini-Hochberg and
        average-linkage federations, :class:`fedrnd.rnd.RNDConfig`) or ``"eps"`` (the paper's
        rule, Eq. 9, with ``eps``, ``sigma`` and ``rule`` below).
      alpha, min_effect, within_ratio: the test's level (0.05), the smallest log novelty
        ratio that counts (0.025) and the homogeneity a split must reach (0.3); see
        :class:`fedrnd.rnd.RNDConfig`.
      candidates, random_peers: two-stage discovery for large populations: each client scores
        only its ``candidates`` nearest peers by fingerprint plus ``random_peers`` random ones
        (``None``: every pair).
      eps: ``"eps"`` criterion: tolerance ``>= 0`` or ``"auto"`` (:func:`fedrnd.rnd.auto_eps`).
      sigma: ``"row"`` (std of the novelty row, default) or ``"self"``.
      rule: federation extraction, ``"mutual"`` (default), ``"one_sided"`` or ``"leader"``.
      tau: re-discover every ``tau`` rounds (``None``: once, before round 0).
      network: RND pair, ``"auto"`` (conv for images, else MLP), ``"conv"`` or ``"mlp"``;
        input_pool: average-pool images by this factor first (1: full resolution; ``"auto"``,
        the default: 2 for the MLP pair on images of 28 x 28 pixels or more, else 1).
      predictor_epochs, predictor_steps, predictor_batch, predictor_lr: predictor training
        (Adam; the paper's 10 epochs, batch 128, lr 1e-3); steps replace epochs when set;
        predictor_min_steps (300): at least this many steps when the epochs come to fewer
        (small clients; ``None`` = the paper's schedule as is; see ``RNDConfig.min_steps``).
      probe: ``"auto"`` (default: ``"holdout"`` for the test criterion, ``"train"`` for
        ``"eps"``), ``"train"``, ``"holdout"`` or ``"test"``; probe_cap: at most this many
        probe examples per client.
      rnd_seed: the global seed of the frozen target.
      max_slots: hard cap on federation slots.
      keep_scores: keep the latest novelty matrix in the state, one row per client
        (``state["clients"]["novelty"]``, ``C x C`` floats) for :meth:`report`; ``None``: keep
        it up to 2048 clients.
      aggregation: inside each federation, ``"mean"`` (default: FedAvg, sample-weighted),
        ``"median"`` (coordinate-wise), ``"trimmed_mean"`` (drop the ``trim`` share at each
        end per coordinate) or ``"clip"`` (updates clipped to the federation's median update
        norm); see :mod:`fedrnd.engine.robust`. Anything but ``"mean"`` trains with one model
        per cohort client (memory of ``M`` models, not ``K``).
      trim: ``"trimmed_mean"``: the share dropped at each end, in ``[0, 0.5)`` (0.1).
      poison, poison_fraction, poison_factor: the poisoning attacker of the threat model
        (``docs/methods/threat-model.md``): ``round(poison_fraction * C)`` clients (drawn with
        ``rnd_seed``, :meth:`poisoners`) send their honest update times ``poison_factor``
        (``"scale"``) or times ``-poison_factor`` (``"sign_flip"``) to their federation;
        ``None`` (default): no poisoner.
    """

    name: ClassVar[str] = "rnd"
    clusters_clients: ClassVar[bool] = True
    input_only: ClassVar[bool] = True  # the predictors see client inputs, never labels
    criterion: str = "test"
    alpha: float = 0.05
    min_effect: float = 0.025
    within_ratio: float = 0.3
    input_pool: int | str = "auto"
    candidates: int | None = None
    random_peers: int = 4
    eps: float | str = "auto"
    sigma: str = "row"
    rule: str = "mutual"
    tau: int | None = None
    network: str = "auto"
    predictor_epochs: int = 10
    predictor_steps: int | None = None
    predictor_min_steps: int | None = 300
    predictor_batch: int = 128
    predictor_lr: float = 1e-3
    probe: str = "auto"
    probe_cap: int | None = None
    rnd_seed: int = 0
    max_slots: int = 4096
    keep_scores: bool | None = None
    aggregation: str = "mean"
    trim: float = 0.1
    poison: str | None = None
    poison_fraction: float = 0.0
    poison_factor: float = 10.0

    @property
    def hook_every(self) -> int | None:  # type: ignore[override]
        # The base declares a class-level constant; re-discovery makes it an option.
        return self.tau

    @property
    def rnd_config(self) -> RNDConfig:
        check_eps(self.eps)
        return RNDConfig(network=self.network, seed=self.rnd_seed, epochs=self.predictor_epochs,
                         steps=self.predictor_steps, min_steps=self.predictor_min_steps,
                         batch_size=self.predictor_batch,
                         lr=self.predictor_lr, probe=self.probe, probe_cap=self.probe_cap,
                         eps=self.eps, sigma=self.sigma, rule=self.rule,
                         criterion=self.criterion, alpha=self.alpha, min_effect=self.min_effect,
                         within_ratio=self.within_ratio, input_pool=self.input_pool,
                         candidates=self.candidates,
                         random_peers=self.random_peers)

    def validate(self, data: FederatedData) -> None:
        super().validate(data)
        if self.tau is not None and (not isinstance(self.tau, int | np.integer) or self.tau < 1):
            raise ValueError(f"rnd tau (re-discovery period) must be an integer >= 1 or None, "
                             f"got {self.tau!r}")
        if self.max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {self.max_slots}")
        check_choice("rnd", "aggregation", self.aggregation, AGGREGATORS)
        if not (isinstance(self.trim, int | float) and 0.0 <= self.trim < 0.5):
            raise ValueError(f"rnd trim must be a number in [0, 0.5), got {self.trim!r}")
        check_choice("rnd", "poison", self.poison, (None, *POISONS))
        if not (isinstance(self.poison_fraction, int | float)
                and 0.0 <= self.poison_fraction <= 1.0):
            raise ValueError(f"rnd poison_fraction must be in [0, 1], got "
                             f"{self.poison_fraction!r}")
        if not (isinstance(self.poison_factor, int | float) and np.isfinite(self.poison_factor)):
            raise ValueError(f"rnd poison_factor must be a finite number, got "
                             f"{self.poison_factor!r}")
        self.rnd_config.pair(data.feature_shape)  # raises for a conv pair on vector data

    # ---------------------------------------------------------------------------------------
    def discover(self, data: FederatedData, key: jax.Array) -> Discovery:
        """Run RND discovery on ``data`` (host side; the heavy parts are jitted)."""
        return discover(data, self.rnd_config, key=key, mapper=self.engine.mapper)

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
        if self.aggregation == "mean" and self.poison is None:
            slots, metrics, _ = fixed_cluster_round(self, state, data, key)
        else:
            slots, metrics = self._robust_round(state, data, key)
        cl = state["clients"]
        zero = jnp.zeros_like(cl["pending_up"])
        metrics = {**metrics,
                   "num_federations": state["num_federations"].astype(jnp.float32),
                   **comm(up_discovery=cl["pending_up"], down_discovery=cl["pending_down"])}
        state = {**state, "round": state["round"] + 1, "slots": slots,
                 "clients": {**cl, "pending_up": zero, "pending_down": zero}}
        return state, metrics

    def _robust_round(self, state: State, data: FederatedData, key: jax.Array):
        """:func:`fixed_cluster_round` with one model per cohort client, so updates can be
        poisoned and aggregated by :func:`~fedrnd.engine.robust.robust_aggregate`."""
        k_cohort, k_train = jax.random.split(key)
        ids, part = self.cohort(k_cohort, data.num_clients)
        cl, slots = state["clients"], state["slots"]
        cid = cl["cluster_id"] if ids is None else cl["cluster_id"][ids]
        start = broadcast(slots, cid)
        params, _, m = self.engine.train(None, data, cl["hp"], k_train, state["round"], ids=ids,
                                         client_params=start)
        updates = jax.tree.map(jnp.subtract, params, start)
        if self.poison is not None:
            bad = jnp.asarray(self.poisoners(data.num_clients))
            updates = poison_updates(updates, bad if ids is None else bad[ids], self.poison,
                                     self.poison_factor)
        w = (data.train_count if ids is None else data.train_count[ids]).astype(jnp.float32)
        k = jax.tree.leaves(slots)[0].shape[0]
        agg, mass = robust_aggregate(self.aggregation, updates, w, cid, k, trim=self.trim)
        new = keep_nonempty(jax.tree.map(jnp.add, slots, agg), slots, mass)
        nbytes = tree_bytes(jax.tree.map(lambda x: x[0], slots))
        metrics = {"train_loss": jnp.sum(w * m["loss"]) / jnp.sum(w),
                   "local_steps": jnp.sum(m["steps"].astype(jnp.float32)),
                   **comm(up_model=per_client(nbytes, part), down_model=per_client(nbytes, part))}
        return new, metrics

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
        """``eps``, the federation count and the latest discovery as artifacts.

        ``novelty`` (matrix, sigma, federations, eps, true groups; a heat map of the raw
        matrix) and ``novelty_normalised``: a heat map of the scores the rule thresholds,
        ``(s_ij - s_ii) / sigma_i`` (clients ordered by true group).
        """
        cl = state["clients"]
        fed = np.asarray(cl["cluster_id"])
        eps = float(state["eps"])
        nfed = float(int(state["num_federations"]))
        rep = Report({"eps": eps, "federations": nfed})
        if "novelty" in cl:
            s = np.asarray(cl["novelty"])
            sigma = np.asarray(cl["sigma"])
            group = np.asarray(data.group)
            title = f"eps={eps:.3g}, {nfed:.0f} federations"
            rep.artifacts["novelty"] = Artifact(
                "matrix", {"scores": s, "sigma": sigma, "federation": fed, "eps": eps,
                           "group": group},
                {"matrix": "scores", "title": f"RND novelty S ({title})"})
            # Raw rows differ in scale (some data are more novel to everyone); the rule
            # compares within a row, so the normalised view is the one that shows federations.
            if np.isfinite(eps):
                view = np.minimum(normalised_scores(s, np.diag(s), sigma), 3 * eps + 1)
                meta = {"title": f"(s_ij - s_ii) / sigma_i ({title})",
                        "label": "normalised novelty"}
            else:
                # The test criterion compares each peer with the client's own predictor,
                # relative to the client's own error (held-out probes).
                d = np.diag(s)
                view = np.clip((s - d[:, None]) / np.where(d > 0, d, 1.0)[:, None], -1, 3)
                meta = {"title": f"(s_ij - s_ii) / s_ii ({nfed:.0f} federations, paired test)",
                        "label": "relative excess"}
            # A view of the arrays saved above: drawn, not saved again.
            rep.artifacts["novelty_normalised"] = Artifact(
                "matrix", {"matrix": view, "group": group}, {**meta, "save": False})
        return rep
