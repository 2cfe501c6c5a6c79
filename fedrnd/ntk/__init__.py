"""Neural tangent kernel machinery for NTK-DFL and SPARK (:mod:`fedrnd.algorithms.ntk_dfl`)."""

from fedrnd.ntk.evolve import LOSSES, evolve, mse_closed_form, residual
from fedrnd.ntk.kernel import (
    LayerFeatures,
    check_dense,
    dense_jacobian,
    dense_kernel,
    draw_projections,
    flat_params,
    jacobian_transpose,
    layer_block_sizes,
    layer_features,
    project_features,
    projection_dims,
    structured_kernel,
    unproject_update,
)

__all__ = [
    "LOSSES",
    "LayerFeatures",
    "check_dense",
    "dense_jacobian",
    "dense_kernel",
    "draw_projections",
    "evolve",
    "flat_params",
    "jacobian_transpose",
    "layer_block_sizes",
    "layer_features",
    "mse_closed_form",
    "project_features",
    "projection_dims",
    "residual",
    "structured_kernel",
    "unproject_update",
]
