"""Task models as pure ``(init, apply)`` pairs.

Every model is a :class:`Model`: ``init(key) -> params`` and ``apply(params, x) -> logits`` with
``x: [B, *feature_shape]`` and ``logits: [B, num_classes]``. Any flax module plugs in through
:func:`from_flax` (linen) or :func:`from_nnx` (NNX); models are registered in :data:`MODELS`
by name with :func:`register_model` (the built-ins too), as builders
``(num_classes, **options) -> flax module``.
"""

from fedrnd.models._core import (
    CNN,
    MLP,
    MODELS,
    DenseStack,
    LogisticRegression,
    Model,
    ResNet,
    check_model_options,
    count_flops,
    from_flax,
    from_nnx,
    make_model,
    model_parameters,
    register_model,
)
from fedrnd.models.generator import ConditionalGenerator, Generator, make_generator
from fedrnd.models.text import CharRNN

__all__ = [
    "CNN",
    "CharRNN",
    "ConditionalGenerator",
    "Generator",
    "DenseStack",
    "MLP",
    "MODELS",
    "LogisticRegression",
    "Model",
    "ResNet",
    "check_model_options",
    "count_flops",
    "from_flax",
    "from_nnx",
    "make_generator",
    "make_model",
    "model_parameters",
    "register_model",
]
