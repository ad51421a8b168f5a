"""fnbp: backpropagation written by hand, as the CS229 notes teach it, on JAX.

Every module is a pure function whose derivative is a hand-written backward
function B[M, z] wired in with ``jax.custom_vjp``. The notes-facing rules are
here (``fnbp.mm``, ``fnbp.relu``, ..., one per record of
``fnbp.rules.registry()``); their forward and backward functions are in
:mod:`fnbp.rules` (``fnbp.rules.relu_fwd``, ``fnbp.rules.relu_bwd``).
"""

from fnbp.backprop import backprop, per_example_grad_norms, per_example_grads
from fnbp.backward import backward
from fnbp.checking import checked
from fnbp import rules
from fnbp.rules import registry as _registry

# The notes-facing rules (mm, relu, ..., cross_entropy_loss, conv2d, ...), one
# per record of the registry: a rule declared in fnbp/rules/ appears here.
globals().update({_name: _rule.function for _name, _rule in _registry().items()})
from fnbp import nn
from fnbp.nn import (
    AvgPool,
    Conv1D,
    Conv2D,
    Elu,
    Flatten,
    Gelu,
    LayerNorm,
    LeakyRelu,
    Layer,
    Linear,
    MaxPool,
    RMSNorm,
    Relu,
    Sigmoid,
    Silu,
    Softplus,
    Tanh,
    activation_layer,
    cnn,
    layer_from_rule,
    make_layer,
    mlp,
    remat,
    residual,
    resnet_s,
    serial,
)
from fnbp.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fnbp.train.data import DataError, DataWarning, Dataset, load_dataset
from fnbp import train
from fnbp.train import sharding
from fnbp.train.sharding import initialize_distributed, make_mesh
from fnbp.train.precision import (
    DynamicLossScale,
    Precision,
    dynamic_loss_scale,
    loss_scaled,
    with_precision,
)
from fnbp.train.loop import FitResult, TrainState, epoch_order, evaluate, fit, init_state
from fnbp.train.steps import ShardedEvalStep, ShardedTrainStep, make_eval_step, make_train_step
from fnbp.verify import VJPReport, check_layer, check_vjp
from fnbp import testing

__version__ = "0.1.0"


def __getattr__(name: str):
    """Transitional, until tests/test_cli_check.py reads fnbp.rules.relu_fwd/_bwd:
    the forward and backward functions live in :mod:`fnbp.rules`."""
    if name.endswith(("_fwd", "_bwd")) and hasattr(rules, name):
        return getattr(rules, name)
    raise AttributeError(f"module 'fnbp' has no attribute {name!r}")

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
    "Softplus",
    "Tanh",
    "activation_layer",
    "backprop",
    "cnn",
    "layer_from_rule",
    "make_layer",
    "mlp",
    "per_example_grad_norms",
    "per_example_grads",
    "remat",
    "residual",
    "resnet_s",
    "serial",
    "backward",
    "checked",
    "CheckpointError",
    "DataError",
    "Dataset",
    "FitResult",
    "TrainState",
    "epoch_order",
    "evaluate",
    "fit",
    "init_state",
    "load_checkpoint",
    "load_dataset",
    "make_eval_step",
    "make_train_step",
    "save_checkpoint",
    "ShardedEvalStep",
    "ShardedTrainStep",
    "initialize_distributed",
    "make_mesh",
    "sharding",
    "DynamicLossScale",
    "Precision",
    "dynamic_loss_scale",
    "loss_scaled",
    "with_precision",
    "VJPReport",
    "check_layer",
    "check_vjp",
    "testing",
    "rules",
    "nn",
] + list(_registry())
