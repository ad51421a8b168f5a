"""fnbp: backpropagation written by hand, as the CS229 notes teach it, on JAX.

Every module is a pure function whose derivative is a hand-written backward
function B[M, z] wired in with ``jax.custom_vjp``.
"""

from fnbp.activations import (
    gelu,
    gelu_bwd,
    gelu_fwd,
    leaky_relu,
    leaky_relu_bwd,
    leaky_relu_fwd,
    relu,
    relu_bwd,
    relu_fwd,
    sigmoid,
    sigmoid_bwd,
    sigmoid_fwd,
    silu,
    silu_bwd,
    silu_fwd,
    softplus,
    softplus_bwd,
    softplus_fwd,
    tanh,
    tanh_bwd,
    tanh_fwd,
)
from fnbp.backward import backward
from fnbp.checking import checked
from fnbp.linear import mm, mm_bwd, mm_fwd
from fnbp.losses import (
    cross_entropy_loss,
    cross_entropy_loss_bwd,
    cross_entropy_loss_fwd,
    logistic_loss,
    logistic_loss_bwd,
    logistic_loss_fwd,
    mse_loss,
    mse_loss_bwd,
    mse_loss_fwd,
)

__version__ = "0.1.0"

__all__ = [
    "backward",
    "checked",
    "cross_entropy_loss",
    "cross_entropy_loss_bwd",
    "cross_entropy_loss_fwd",
    "gelu",
    "gelu_bwd",
    "gelu_fwd",
    "leaky_relu",
    "leaky_relu_bwd",
    "leaky_relu_fwd",
    "logistic_loss",
    "logistic_loss_bwd",
    "logistic_loss_fwd",
    "mm",
    "mm_bwd",
    "mm_fwd",
    "mse_loss",
    "mse_loss_bwd",
    "mse_loss_fwd",
    "relu",
    "relu_bwd",
    "relu_fwd",
    "sigmoid",
    "sigmoid_bwd",
    "sigmoid_fwd",
    "silu",
    "silu_bwd",
    "silu_fwd",
    "softplus",
    "softplus_bwd",
    "softplus_fwd",
    "tanh",
    "tanh_bwd",
    "tanh_fwd",
]
