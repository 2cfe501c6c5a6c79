"""A Flax NNX model as a fedrnd plug-in: an MLP with BatchNorm and dropout.

``register_model`` sees the ``rngs`` parameter and wraps the NNX module into fedrnd's pure
``init``/``apply`` (``nnx.split``/``nnx.merge``): the BatchNorm statistics travel beside the
weights (FedAvg averages them like the weights), dropout draws from each client's own key, and
evaluation runs with dropout off and the statistics frozen. Load it with ``--import``::

    fedrnd run examples/plugins/nnx_momentum.toml \\
        --import examples/plugins/my_nnx_mlp.py --import examples/plugins/my_fedavg_momentum.py
"""

from __future__ import annotations

import math

from flax import nnx

import fedrnd


class BNDropMLP(nnx.Module):
    """``x [B, *feature_shape] -> logits [B, num_classes]``: Linear, BatchNorm, ReLU, Dropout,
    Linear."""

    def __init__(self, din: int, hidden: int, num_classes: int, dropout: float, *,
                 rngs: nnx.Rngs):
        self.hidden = nnx.Linear(din, hidden, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.out = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x):
        h = self.bn(self.hidden(x.reshape(x.shape[0], -1)))
        return self.out(self.drop(nnx.relu(h)))


@fedrnd.register_model
def nnx_bn_mlp(num_classes, hidden=32, dropout=0.1, *, feature_shape, rngs):
    """An NNX MLP with BatchNorm and dropout; options ``hidden`` (width), ``dropout`` (rate)."""
    return BNDropMLP(math.prod(feature_shape), hidden, num_classes, dropout, rngs=rngs)
