"""From a validated config to the objects a run needs: federated data and the client engine."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from fedrnd.data.drift import DriftingData, build_drifting
from fedrnd.data.federated import Dataset, FederatedData, build_federated, estimate_bytes
from fedrnd.driver.config import Config
from fedrnd.engine import (
    ClientHParams,
    ClientMapper,
    ClientOptimizer,
    Engine,
    LocalSpec,
    client_hparams,
    lr_schedule,
    make_mesh,
)
from fedrnd.models import make_model


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def build_data(cfg: Config, log: Callable[[str], None] | None = None
               ) -> tuple[FederatedData | DriftingData, dict[str, Any]]:
    """Load the source, partition it over ``cfg.data.num_clients`` clients, build FederatedData.

    With ``cfg.data.drift`` set, the data is a :class:`~fedrnd.data.drift.DriftingData` (one
    phase per drift, all on one pool); its pool size is reported in the info as built.
    """
    from fedrnd.data.partition import make_partition
    from fedrnd.data.sources import SOURCES, load_source

    d = cfg.data
    opts = dict(d.source_options)
    fn = SOURCES.get(d.source)
    # Generators that make data per client need the client count and the run's seed.
    if fn is not None and _accepts(fn, "num_clients"):
        opts.setdefault("num_clients", d.num_clients)
    if fn is not None and _accepts(fn, "seed"):
        opts.setdefault("seed", cfg.seed)
    dataset: Dataset = load_source(d.source, **opts)
    part = make_partition(d.partition, dataset, d.num_clients, seed=cfg.seed,
                          **d.partition_options)
    need = estimate_bytes(dataset, part)
    if log:
        log(f"data: {dataset.name}, {part.num_clients} clients, partition {part.name or d.partition}"
            f", {need / 2**20:.1f} MiB on device")
    if d.drift is None:
        data = build_federated(dataset, part)
    else:
        # Clients switch group mid-run: every phase on one pool (fedrnd.data.drift).
        drift = build_drifting(dataset, part, d.drift.at_round, fraction=d.drift.fraction,
                               clients=d.drift.clients,
                               seed=cfg.seed if d.drift.seed is None else d.drift.seed)
        data = drift.initial
        # The pool also holds the moved clients' examples under their new groups.
        need = data.nbytes() + (len(drift.phases) - 1) * sum(
            v.nbytes for v in data.client_arrays().values())
        if log:
            for e in drift.events:
                log(f"drift: after round {e.at_round}, {len(e.clients)} clients switch group")
    info = {"source": dataset.name, "partition": part.name, "clients": part.num_clients,
            "train_examples": int(np.asarray(data.train_count).sum()),
            "test_examples": int(np.asarray(data.test_count).sum()),
            "pool_rows": int(data.x.shape[0]), "device_bytes": need,
            "feature_shape": list(data.feature_shape), "num_classes": data.num_classes,
            "groups": int(np.max(np.asarray(data.group))) + 1}
    if d.drift is not None:
        info["drift"] = drift.summary()
        return drift, info
    return data, info


def _mesh(cfg: Config):
    import jax

    if jax.process_count() > 1:
        # Multi-host: the client axis always spans the devices of every process.
        n = jax.device_count()
        if cfg.num_devices not in (1, n):
            raise ValueError(f"config: num_devices = {cfg.num_devices}, but a run over "
                             f"{jax.process_count()} processes shards the clients over all "
                             f"{n} devices; leave num_devices unset or set it to {n}")
        return make_mesh(n)
    return make_mesh(cfg.num_devices) if cfg.num_devices > 1 else None


def build_engine(cfg: Config, data: FederatedData) -> tuple[Engine, ClientHParams, ClientMapper]:
    """The task model, local schedule, per-client optimizers and the client map of a run."""
    loc = cfg.local
    model = make_model(cfg.model.name, data.feature_shape, data.num_classes, **cfg.model.options)
    per_group = loc.optimizer if isinstance(loc.optimizer, list) else None
    opt, hp = client_hparams(data.num_clients,
                             optimizer="sgd" if per_group else loc.optimizer, lr=loc.lr,
                             prox_mu=loc.prox_mu, seed=cfg.seed,
                             group=np.asarray(data.group) if per_group else None,
                             per_group=per_group)
    opt = ClientOptimizer(opt.kinds, tuple(sorted(loc.optimizer_options.items())))
    schedule = None
    if loc.schedule != "constant":
        opts = dict(loc.schedule_options)
        if loc.schedule == "cosine":
            opts.setdefault("rounds", cfg.rounds)
        schedule = lr_schedule(loc.schedule, **opts)
    mesh = _mesh(cfg)
    mapper = ClientMapper(cfg.chunk_size, mesh)
    if mesh is not None:
        mapper._check_divisible(data.train_count)
        if cfg.cohort_size is not None:
            mapper._check_divisible(np.zeros(cfg.cohort_size))
    spec = LocalSpec(loc.batch_size, loc.epochs, loc.steps)
    hp = mapper.shard(hp)
    return Engine(model, spec, opt, mapper, schedule, path=loc.path), hp, mapper
