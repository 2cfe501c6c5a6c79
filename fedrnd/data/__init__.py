"""Federated data: sources (numpy arrays), partitioners (client splits), FederatedData, drift."""

from fedrnd.data.drift import DriftEvent, DriftingData, build_drifting, build_phases, drift_groups
from fedrnd.data.federated import (
    Dataset,
    FederatedData,
    Partition,
    build_federated,
    check_dataset,
    check_federated,
    estimate_bytes,
)
from fedrnd.data.leaf import SHAKESPEARE_VOCAB, femnist, leaf_users, shakespeare
from fedrnd.data.partition import (
    PARTITION_INFO,
    PARTITIONS,
    DirichletSplit,
    IIDSplit,
    PartitionInfo,
    QuantitySkew,
    ShardSplit,
    dirichlet,
    feature_pattern,
    feature_patterns,
    grouped,
    iid,
    label_permutation,
    make_partition,
    natural,
    partition_info,
    quantity_skew,
    register_partition,
    rotation,
    shards,
)
from fedrnd.data.sources import (
    SOURCES,
    TFDS_NAMES,
    digits,
    fashion_mnist,
    gaussian_mixture,
    load_source,
    read_idx,
    register_source,
    synthetic,
    tfds_source,
)
from fedrnd.data.tff import read_tff_h5, tff_emnist, tff_shakespeare

__all__ = [
    "Dataset", "FederatedData", "Partition", "build_federated", "check_dataset",
    "check_federated", "estimate_bytes",
    # drift
    "DriftEvent", "DriftingData", "build_drifting", "build_phases", "drift_groups",
    # partitioners
    "PARTITIONS", "PARTITION_INFO", "DirichletSplit", "IIDSplit", "PartitionInfo",
    "QuantitySkew", "ShardSplit", "dirichlet", "feature_pattern", "feature_patterns", "grouped",
    "iid", "label_permutation", "make_partition", "natural", "partition_info", "quantity_skew",
    "register_partition", "rotation", "shards",
    # sources
    "SOURCES", "TFDS_NAMES", "digits", "fashion_mnist", "gaussian_mixture", "load_source",
    "read_idx", "register_source", "synthetic", "tfds_source",
    # LEAF (natural federated data)
    "SHAKESPEARE_VOCAB", "femnist", "leaf_users", "shakespeare",
    # TensorFlow Federated h5 files (natural federated data; needs h5py)
    "read_tff_h5", "tff_emnist", "tff_shakespeare",
]
