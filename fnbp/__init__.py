"""fnbp: backpropagation written by hand, as the CS229 notes teach it, on JAX.

Every module is a pure function whose derivative is a hand-written backward
function B[M, z] wired in with ``jax.custom_vjp``. The top level holds the
names the notes use, grouped as below; everything else is one floor down:

- the rules (``fnbp.mm``, ``fnbp.relu``, ..., one per record of
  ``fnbp.rules.registry()``), Algorithm 3 (:func:`backward`,
  :func:`backprop`), the per-example gradients and the curvature
  (:func:`diag_ggn`, :func:`kfac_factors`);
- checking a rule or a layer against autodiff (:func:`check_vjp`,
  :func:`check_layer`, :func:`checked`);
- networks: :class:`Layer`, the layers, :func:`serial`, :func:`residual`,
  :func:`mlp`, :func:`resnet_s`, :func:`cnn`;
- training: :func:`fit`, :func:`make_train_step`, data, checkpoints, meshes,
  mixed precision, and the types they return.

The floors, in import order (each imports only those before it):
:mod:`fnbp.rules` (``fnbp.rules.relu_fwd``, ``fnbp.rules.relu_bwd``, the
registry), :mod:`fnbp.nn` (layers and models), :mod:`fnbp.verify`,
:mod:`fnbp.train` (loop, steps, data, checkpoint, sharding, precision),
:mod:`fnbp.testing`; the command line, ``fnbp.cli``, is above them all and
is imported by nothing here.
"""

from importlib import metadata as _metadata
from typing import TYPE_CHECKING as _TYPE_CHECKING

from fnbp import rules
from fnbp.rules import registry as _registry

# --- the notes: the rules, Algorithm 3, per-example gradients -------------------------
# The rules (mm, relu, ..., cross_entropy_loss, conv2d, ...), one per record of the
# registry: a rule declared in fnbp/rules/ appears here under its notes-facing name.
globals().update({_name: _rule.function for _name, _rule in _registry().items()})
# The same functions by name for type checkers, which do not run the registry (a rule
# declared in fnbp/rules/ is named here too).
if _TYPE_CHECKING:
    from fnbp.rules.activations import elu as elu
    from fnbp.rules.activations import gelu as gelu
    from fnbp.rules.activations import leaky_relu as leaky_relu
    from fnbp.rules.activations import relu as relu
    from fnbp.rules.activations import sigmoid as sigmoid
    from fnbp.rules.activations import silu as silu
    from fnbp.rules.activations import softmax as softmax
    from fnbp.rules.activations import softplus as softplus
    from fnbp.rules.activations import tanh as tanh
    from fnbp.rules.conv import conv1d as conv1d
    from fnbp.rules.conv import conv2d as conv2d
    from fnbp.rules.linear import mm as mm
    from fnbp.rules.losses import cross_entropy_loss as cross_entropy_loss
    from fnbp.rules.losses import logistic_loss as logistic_loss
    from fnbp.rules.losses import mse_loss as mse_loss
    from fnbp.rules.normalization import layer_norm as layer_norm
    from fnbp.rules.normalization import layer_norm_s as layer_norm_s
    from fnbp.rules.normalization import rms_norm as rms_norm
    from fnbp.rules.pooling import avg_pool as avg_pool
    from fnbp.rules.pooling import max_pool as max_pool
# --- networks -----------------------------------------------------------------------
# --- training -----------------------------------------------------------------------
# --- the floors below ---------------------------------------------------------------
from fnbp import curvature, forward, nn, posterior, spectrum, testing, train, verify
from fnbp.backprop import backprop
from fnbp.backward import backward

# --- checking hand-written rules ----------------------------------------------------
from fnbp.checking import checked
from fnbp.curvature import KroneckerFactors, diag_ggn, kfac_factors
from fnbp.forward import ggn_vp, hvp, jacfwd, jvp, linearize
from fnbp.nn import (
    AvgPool,
    Conv1D,
    Conv2D,
    Elu,
    Flatten,
    Gelu,
    Layer,
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
    cnn,
    layer_from_rule,
    make_layer,
    mlp,
    remat,
    residual,
    resnet_s,
    serial,
)
from fnbp.per_example import (
    PerExampleFallbackWarning,
    clipped_grads,
    grad_moments,
    per_example_grad_norms,
    per_example_grads,
)
from fnbp.posterior import Laplace, laplace
from fnbp.spectrum import top_eigenvalues
from fnbp.train import (
    Checkpoint,
    CheckpointError,
    DataError,
    Dataset,
    DataWarning,
    DPConfig,
    DynamicLossScale,
    FitResult,
    Precision,
    ShardedEvalStep,
    ShardedTrainStep,
    TrainingStopped,
    TrainState,
    dynamic_loss_scale,
    epoch_order,
    evaluate,
    fit,
    init_state,
    initialize_distributed,
    load_checkpoint,
    load_dataset,
    loss_scaled,
    make_eval_step,
    make_mesh,
    make_train_step,
    save_checkpoint,
    stop_on_signals,
    with_precision,
)
from fnbp.verify import VJPReport, check_layer, check_vjp

try:
    __version__ = _metadata.version("fnbp")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# The one re-export list, grouped as above.
__all__ = [
    # the notes: the rules (generated from the registry), Algorithm 3, per-example
    *_registry(),
    "backward",
    "backprop",
    "per_example_grad_norms",
    "per_example_grads",
    "clipped_grads",
    "grad_moments",
    "PerExampleFallbackWarning",
    # curvature from the backward pass
    "diag_ggn",
    "kfac_factors",
    "KroneckerFactors",
    "laplace",
    "Laplace",
    # forward mode through the forward functions
    "jvp",
    "linearize",
    "jacfwd",
    "ggn_vp",
    "hvp",
    "top_eigenvalues",
    # checking
    "VJPReport",
    "check_layer",
    "check_vjp",
    "checked",
    # networks
    "Layer",
    "make_layer",
    "layer_from_rule",
    "serial",
    "residual",
    "remat",
    "mlp",
    "resnet_s",
    "cnn",
    "AvgPool",
    "Conv1D",
    "Conv2D",
    "Elu",
    "Flatten",
    "Gelu",
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
    # training, and the types it returns
    "fit",
    "evaluate",
    "epoch_order",
    "init_state",
    "make_train_step",
    "make_eval_step",
    "FitResult",
    "TrainState",
    "TrainingStopped",
    "stop_on_signals",
    "ShardedTrainStep",
    "ShardedEvalStep",
    "load_dataset",
    "Dataset",
    "DataError",
    "DataWarning",
    "save_checkpoint",
    "load_checkpoint",
    "Checkpoint",
    "CheckpointError",
    "make_mesh",
    "initialize_distributed",
    "Precision",
    "with_precision",
    "loss_scaled",
    "dynamic_loss_scale",
    "DynamicLossScale",
    "DPConfig",
    # the subpackages
    "rules",
    "nn",
    "train",
    "verify",
    "testing",
    "curvature",
    "forward",
    "posterior",
    "spectrum",
]
