"""The client engine: local training, the client map, aggregation, evaluation, ledger."""

from fedrnd.engine.aggregate import (
    EdgeList,
    broadcast,
    edge_aggregate,
    grow_slots,
    keep_local,
    keep_nonempty,
    local_leaves,
    segment_weighted_mean,
    shared_leaves,
    slot_means,
    weighted_mean,
    with_local_leaves,
)
from fedrnd.engine.clientmap import CLIENT_AXIS, ClientMapper, default_chunk_size, make_mesh
from fedrnd.engine.clusters import cluster_losses
from fedrnd.engine.core import Engine, client_keys, sample_cohort
from fedrnd.engine.evaluate import clustering_scores, evaluate_clients, summarize
from fedrnd.engine.finetune import finetune_clients, finetune_evaluate, finetune_key
from fedrnd.engine.ledger import comm, per_client, tree_bytes
from fedrnd.engine.local import LOSSES, LocalSpec, cross_entropy_loss, local_train, named_loss
from fedrnd.engine.optim import (
    OPTIMIZERS,
    SERVER_OPTIMIZERS,
    ClientHParams,
    ClientOptimizer,
    client_hparams,
    lr_schedule,
    register_optimizer,
    server_optimizer,
)

__all__ = [
    "CLIENT_AXIS",
    "OPTIMIZERS",
    "SERVER_OPTIMIZERS",
    "ClientHParams",
    "ClientMapper",
    "ClientOptimizer",
    "EdgeList",
    "Engine",
    "LOSSES",
    "LocalSpec",
    "broadcast",
    "client_hparams",
    "client_keys",
    "cluster_losses",
    "clustering_scores",
    "comm",
    "cross_entropy_loss",
    "default_chunk_size",
    "edge_aggregate",
    "evaluate_clients",
    "finetune_clients",
    "finetune_evaluate",
    "finetune_key",
    "grow_slots",
    "keep_local",
    "keep_nonempty",
    "local_leaves",
    "local_train",
    "lr_schedule",
    "make_mesh",
    "named_loss",
    "per_client",
    "register_optimizer",
    "sample_cohort",
    "segment_weighted_mean",
    "slot_means",
    "server_optimizer",
    "shared_leaves",
    "summarize",
    "tree_bytes",
    "weighted_mean",
    "with_local_leaves",
]
