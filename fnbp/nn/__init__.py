"""fnbp.nn: the Layer record, the layers, the combinators and the model builders.

The floors read from the files: :mod:`fnbp.nn.layer` (the Layer record,
:func:`make_layer`, :func:`layer_from_rule`), :mod:`fnbp.nn.layers` (the
activations derived from the rule registry, Linear, Conv1D/Conv2D, pooling,
normalization, Flatten), :mod:`fnbp.nn.combinators` (serial, residual, remat)
and :mod:`fnbp.nn.models` (mlp, resnet_s, cnn). nn imports :mod:`fnbp.rules`
and nothing above it.
"""

from fnbp.nn.combinators import remat, residual, serial
from fnbp.nn.layer import Layer, layer_from_rule, make_layer
from fnbp.nn.layers import (
    AvgPool,
    Conv1D,
    Conv2D,
    Elu,
    Flatten,
    Gelu,
    LayerNorm,
    LeakyRelu,
    Linear,
    MaxPool,
    Relu,
    RMSNorm,
    Sigmoid,
    Silu,
    Softmax,
    Softplus,
    Tanh,
    activation_layer,
    rule_layer,
)
from fnbp.nn.models import cnn, mlp, resnet_s

__all__ = [
    "AvgPool",
    "Conv1D",
    "Conv2D",
    "Elu",
    "Flatten",
    "Gelu",
    "Layer",
    "LayerNorm",
    "LeakyRelu",
    "Linear",
    "MaxPool",
    "RMSNorm",
    "Relu",
    "Sigmoid",
    "Silu",
    "Softmax",
    "Softplus",
    "Tanh",
    "activation_layer",
    "cnn",
    "layer_from_rule",
    "make_layer",
    "mlp",
    "remat",
    "residual",
    "resnet_s",
    "rule_layer",
    "serial",
]
