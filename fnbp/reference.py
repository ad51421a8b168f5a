"""Plain jnp implementations of every rule, with no custom derivative.

These are what autodiff differentiates to give an *oracle*: ``jax.vjp`` of a
reference is compared with fnbp's hand-written rule by ``fnbp check``. They are
never used to compute fnbp's own gradients. The test suite does not import
them: it writes its own references, so a bug here cannot hide a bug in a rule.
Kink conventions match the rules (relu'(0) = 0, leaky_relu'(0) = gamma).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import erf


def mm(z, W, b=None):
    u = z @ W.T
    return u if b is None else u + b


def relu(z):
    return jnp.where(z > 0, z, 0.0)


def sigmoid(z):
    return 1.0 / (1.0 + jnp.exp(-z))


def tanh(z):
    return jnp.tanh(z)


def leaky_relu(z, gamma):
    return jnp.where(z > 0, z, gamma * z)


def gelu(z, approximate=False):
    if approximate:
        return 0.5 * z * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (z + 0.044715 * z**3)))
    return 0.5 * z * (1 + erf(z / jnp.sqrt(2.0)))


def softplus(z, beta):
    return jnp.log1p(jnp.exp(beta * z)) / beta


def silu(z):
    return z / (1.0 + jnp.exp(-z))


def mse_loss(t, y):
    return 0.5 * jnp.sum((t - y) ** 2, axis=-1)


def logistic_loss(t, y):
    return y * jnp.log1p(jnp.exp(-t)) + (1 - y) * jnp.log1p(jnp.exp(t))


def cross_entropy_loss(t, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(t, axis=-1), y[..., None], axis=-1)[..., 0]


def layer_norm_s(z, eps=1e-5):
    mu = jnp.mean(z, axis=-1, keepdims=True)
    return (z - mu) / jnp.sqrt(jnp.mean((z - mu) ** 2, axis=-1, keepdims=True) + eps)


def layer_norm(z, gamma, beta, eps=1e-5):
    return beta + gamma * layer_norm_s(z, eps)


def rms_norm(z, gamma, eps=1e-6):
    return gamma * z / jnp.sqrt(jnp.mean(z * z, axis=-1, keepdims=True) + eps)


def _conv_padding(padding, kernel, dilation):
    n = len(kernel)
    k_eff = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    if isinstance(padding, str):
        specs = [padding] * n
    elif isinstance(padding, int):
        specs = [padding] * n
    elif n == 1 and len(padding) == 2 and all(isinstance(p, int) for p in padding):
        specs = [padding]
    else:
        specs = list(padding)
    pairs = []
    for spec, k in zip(specs, k_eff):
        if isinstance(spec, str):
            pairs.append((0, 0) if spec.lower() == "valid" else ((k - 1) // 2, (k - 1) // 2))
        elif isinstance(spec, int):
            pairs.append((spec, spec))
        else:
            pairs.append(tuple(spec))
    return pairs


def _conv(z, w, b, stride, padding, dilation):
    n = w.ndim - 2
    stride = (stride,) * n if isinstance(stride, int) else tuple(stride)
    dilation = (dilation,) * n if isinstance(dilation, int) else tuple(dilation)
    lead = z.shape[:z.ndim - n - 1]
    zf = z.reshape((-1,) + z.shape[z.ndim - n - 1:])
    spec = ("NWC", "WIO", "NWC") if n == 1 else ("NHWC", "HWIO", "NHWC")
    u = jax.lax.conv_general_dilated(zf, w, stride, _conv_padding(padding, w.shape[:n], dilation),
                                     rhs_dilation=dilation, dimension_numbers=spec)
    u = u.reshape(lead + u.shape[1:])
    return u if b is None else u + b


def conv1d(z, w, b=None, *, stride=1, padding="same", dilation=1):
    return _conv(z, w, b, stride, padding, dilation)


def conv2d(z, w, b=None, *, stride=1, padding="same", dilation=1):
    return _conv(z, w, b, stride, padding, dilation)


def _pool(z, window, stride, init, op):
    window = (window,) if isinstance(window, int) else tuple(window)
    n = len(window)
    stride = window if stride is None else (stride,) * n if isinstance(stride, int) else stride
    lead = z.shape[:z.ndim - n - 1]
    zf = z.reshape((-1,) + z.shape[z.ndim - n - 1:])
    u = jax.lax.reduce_window(zf, init, op, (1, *window, 1), (1, *stride, 1), "VALID")
    return u.reshape(lead + u.shape[1:])


def avg_pool(z, window, stride=None):
    size = window if isinstance(window, int) else math.prod(window)
    return _pool(z, window, stride, 0.0, jax.lax.add) / size


def max_pool(z, window, stride=None):
    return _pool(z, window, stride, -jnp.inf, jax.lax.max)
