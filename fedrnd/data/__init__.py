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
from fedrnd.data.partition import (
    PARTITIONS,
    DirichletSplit,
    IIDSplit,
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
    quantity_skew,
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
    synthetic,
    tfds_source,
)

__all__ = [
    "Dataset", "FederatedData", "Partition", "build_federated", "check_dataset",
    "check_federated", "estimate_bytes",
    # drift
    "DriftEvent", "DriftingData", "build_drifting", "build_phases", "drift_groups",
    # partitioners
    "PARTITIONS", "DirichletSplit", "IIDSplit", "QuantitySkew",
    "ShardSplit", "dirichlet", "feature_pattern", "feature_patterns", "grouped", "iid",
    "label_permutation", "make_partition", "natural", "quantity_skew",
    "rotation", "shards",
    # sources
    "SOURCES", "TFDS_NAMES", "digits", "fashion_mnist", "gaussian_mixture", "load_source",
    "read_idx", "synthetic", "tfds_source",
]
