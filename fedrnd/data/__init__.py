"""Federated data: sources (numpy arrays), partitioners (client splits) and FederatedData."""

from fedrnd.data.federated import (
    Dataset,
    FederatedData,
    Partition,
    build_federated,
    estimate_bytes,
)

__all__ = ["Dataset", "FederatedData", "Partition", "build_federated", "estimate_bytes"]
