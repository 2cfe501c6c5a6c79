"""From a validated config to the objects a run needs: federated data and the client engine.

:func:`~fedrnd.driver.config.validate` checks what it can before anything is loaded; what
only the data can tell (a corrupt file, too few examples for the clients, a conv model on
vectors) fails here, with a ``ValueError`` naming the config path (``data.source``,
``data.partition_options.k``, ``model.options``) rather than a builder's Python name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedrnd.data.drift import DriftingData, build_drifting
from fedrnd.data.federated import Dataset, FederatedData, build_federated, estimate_bytes
from fedrnd.driver.config import (
    Config,
    model_parameters,
    option_error,
    partition_parameters,
    source_parameters,
)
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


def _load(cfg: Config):
    """The data set of ``data.source``; errors name the source (and the file, if one is bad)."""
    from fedrnd.data.sources import load_source, source_kwargs

    d = cfg.data
    what = f"data.source = {d.source!r}"
    try:
        return load_source(d.source, **source_kwargs(d.source, d.source_options,
                                                     d.num_clients, cfg.seed))
    except (FileNotFoundError, ImportError) as e:
        raise type(e)(f"config: {what}: {e}") from None
    except (TypeError, ValueError) as e:
        raise option_error("data.source_options", what, e, list(source_parameters(d.source)),
                           general=True) from None


def _partition(cfg: Config, dataset: Dataset):
    from fedrnd.data.partition import make_partition

    d = cfg.data
    try:
        return make_partition(d.partition, dataset, d.num_clients, seed=cfg.seed,
                              **d.partition_options)
    except (TypeError, ValueError) as e:
        raise option_error("data.partition_options", f"data.partition = {d.partition!r}", e,
                           list(partition_parameters(d.partition)), general=True) from None


def build_data(cfg: Config, log: Callable[[str], None] | None = None
               ) -> tuple[FederatedData | DriftingData, dict[str, Any]]:
    """Load the source, partition it over ``cfg.data.num_clients`` clients, build FederatedData.

    With ``cfg.data.drift`` set, the data is a :class:`~fedrnd.data.drift.DriftingData` (one
    phase per drift, all on one pool); its pool size is reported in the info as built.
    """
    d = cfg.data
    # Generators that make data per client get the client count and the run's seed.
    dataset: Dataset = _load(cfg)
    part = _partition(cfg, dataset)
    need = estimate_bytes(dataset, part)
    if log:
        log(f"data: {dataset.name}, {part.num_clients} clients, partition {part.name or d.partition}"
            f", {need / 2**20:.1f} MiB on device")
    if d.drift is None:
        data = build_federated(dataset, part)
    else:
        # Clients switch group mid-run: every phase on one pool (fedrnd.data.drift).
        try:
            drift = build_drifting(dataset, part, d.drift.at_round, fraction=d.drift.fraction,
                                   clients=d.drift.clients,
                                   seed=cfg.seed if d.drift.seed is None else d.drift.seed)
        except (TypeError, ValueError) as e:
            raise option_error("data.drift", "data.drift", e,
                               ["at_round", "fraction", "clients", "seed"], general=True
                               ) from None
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
    try:
        model = make_model(cfg.model.name, data.feature_shape, data.num_classes,
                           **cfg.model.options)
    except (TypeError, ValueError) as e:
        raise option_error("model.options", f"model.name = {cfg.model.name!r}", e,
                           list(model_parameters(cfg.model.name)), general=True) from None
    per_group = loc.optimizer if isinstance(loc.optimizer, list) else None
    opt, hp = client_hparams(data.num_clients,
                             optimizer="sgd" if per_group else loc.optimizer, lr=loc.lr,
                             prox_mu=loc.prox_mu, seed=cfg.seed,
                             group=np.asarray(data.group) if per_group else None,
                             per_group=per_group)
    def with_rounds(name: str, opts: dict) -> dict:
        # The built-in cosine runs over the whole run unless told otherwise.
        return {"rounds": cfg.rounds, **opts} if name == "cosine" else dict(opts)

    own = loc.schedule if isinstance(loc.schedule, dict) else {}
    # Validation has checked every schedule (a per-kind one too) against its options.
    opt = ClientOptimizer(opt.kinds, tuple(sorted(loc.optimizer_options.items())),
                          tuple(sorted(loc.optax_options.items())),
                          tuple((k, n, tuple(sorted(with_rounds(
                              n, loc.schedule_options.get(k, {})).items())))
                                for k, n in own.items() if n != "constant"))
    schedule = None
    if not own and loc.schedule != "constant":
        try:
            schedule = lr_schedule(loc.schedule, **with_rounds(loc.schedule,
                                                               loc.schedule_options))
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"config: local.schedule_options (local.schedule = "
                             f"{loc.schedule!r}): {e}") from None
    mesh = _mesh(cfg)
    mapper = ClientMapper(cfg.chunk_size, mesh)
    if mesh is not None:
        mapper._check_divisible(data.train_count)
        if cfg.cohort_size is not None:
            mapper._check_divisible(np.zeros(cfg.cohort_size))
    spec = LocalSpec(loc.batch_size, loc.epochs, loc.steps)
    hp = mapper.shard(hp)
    return Engine(model, spec, opt, mapper, schedule, loss=loc.loss, path=loc.path), hp, mapper
