"""Plain jnp implementations of every rule, with no custom derivative.

These are what autodiff differentiates to give an *oracle*: ``jax.vjp`` of a
reference is compared with fnbp's hand-written rule by ``fnbp check``. They are
never used to compute fnbp's own gradients. The test suite does not import
them: it writes its own references, so a bug here cannot hide a bug in a rule.
Kink conventions match the rules (relu'(0) = 0, leaky_relu'(0) = gamma).
"""

from __future__ import annotations

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
