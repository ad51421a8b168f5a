"""Every built-in rule with a plain reference and example arguments.

One :class:`RuleCase` per rule: what ``fnbp check`` runs and what the
verifier sweeps. ``make_args(key, dtype)`` draws arguments away from kinks
(|z| >= 0.1 for the piecewise rules), so finite differences and autodiff agree.
The draws use NumPy seeded from the JAX key: eager ``jax.random`` would compile
a small program for every shape and dtype, which once took most of the time
of ``fnbp check``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import fnbp
from fnbp import reference


@dataclass(frozen=True)
class RuleCase:
    """A built-in rule, its plain reference and a factory of example arguments.

    Attributes:
      name: the rule's public name.
      rule: the fnbp function (hand-written custom_vjp rule).
      reference: a plain jnp function with the same signature.
      make_args: ``(key, dtype) -> tuple`` of positional arguments.
      kwargs: static keyword settings passed to both.
    """

    name: str
    rule: Callable[..., Any]
    reference: Callable[..., Any]
    make_args: Callable[[jax.Array, Any], tuple]
    kwargs: dict = field(default_factory=dict)


def _rng(key) -> np.random.Generator:
    """A NumPy generator seeded by a JAX PRNG key (typed or raw uint32 data)."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())


def _away_from_zero(rng, shape, dtype):
    magnitude = rng.uniform(0.1, 2.0, shape)
    sign = np.where(rng.random(shape) < 0.5, 1.0, -1.0)
    return jnp.asarray(sign * magnitude, dtype)


def _normal(rng, shape, dtype, scale=1.0, shift=0.0):
    return jnp.asarray(scale * rng.standard_normal(shape) + shift, dtype)


def _elementwise(key, dtype):
    return (_away_from_zero(_rng(key), (4, 7), dtype),)


def _mm_args(key, dtype):
    rng = _rng(key)
    return (_normal(rng, (5, 6), dtype), _normal(rng, (3, 6), dtype), _normal(rng, (3,), dtype))


def _mse_args(key, dtype):
    rng = _rng(key)
    return (_normal(rng, (5, 3), dtype), _normal(rng, (5, 3), dtype))


def _logistic_args(key, dtype):
    rng = _rng(key)
    return (_normal(rng, (6,), dtype, scale=3.0), jnp.asarray(rng.random(6), dtype))


def _cross_entropy_args(key, dtype):
    rng = _rng(key)
    return (_normal(rng, (5, 4), dtype, scale=2.0), jnp.asarray(rng.integers(0, 4, 5), jnp.int32))


def _layer_norm_s_args(key, dtype):
    return (_normal(_rng(key), (5, 8), dtype, scale=2.0, shift=1.0), jnp.asarray(0.1, dtype))


def _layer_norm_args(key, dtype):
    rng = _rng(key)
    return (_normal(rng, (5, 8), dtype, scale=2.0, shift=1.0), _normal(rng, (8,), dtype, shift=1.0),
            _normal(rng, (8,), dtype), jnp.asarray(0.1, dtype))


def _rms_norm_args(key, dtype):
    rng = _rng(key)
    return (_normal(rng, (5, 8), dtype), _normal(rng, (8,), dtype, shift=1.0), jnp.asarray(0.1, dtype))


def _conv_args(spatial, kernel):
    def make(key, dtype):
        rng = _rng(key)
        return (_normal(rng, (2,) + spatial + (2,), dtype),
                _normal(rng, kernel + (2, 3), dtype), _normal(rng, (3,), dtype))
    return make


def _pool_args(key, dtype):
    return (_normal(_rng(key), (2, 6, 7, 3), dtype),)


def _with_scalar(value):
    def make(key, dtype):
        return _elementwise(key, dtype) + (jnp.asarray(value, dtype),)
    return make


CASES: tuple[RuleCase, ...] = (
    RuleCase("mm", fnbp.mm, reference.mm, _mm_args),
    RuleCase("relu", fnbp.relu, reference.relu, _elementwise),
    RuleCase("sigmoid", fnbp.sigmoid, reference.sigmoid, _elementwise),
    RuleCase("tanh", fnbp.tanh, reference.tanh, _elementwise),
    RuleCase("leaky_relu", fnbp.leaky_relu, reference.leaky_relu, _with_scalar(0.1)),
    RuleCase("gelu", fnbp.gelu, reference.gelu, _elementwise),
    RuleCase("gelu(approximate)", fnbp.gelu, reference.gelu, _elementwise,
             {"approximate": True}),
    RuleCase("softplus", fnbp.softplus, reference.softplus, _with_scalar(1.5)),
    RuleCase("silu", fnbp.silu, reference.silu, _elementwise),
    RuleCase("mse_loss", fnbp.mse_loss, reference.mse_loss, _mse_args),
    RuleCase("logistic_loss", fnbp.logistic_loss, reference.logistic_loss, _logistic_args),
    RuleCase("cross_entropy_loss", fnbp.cross_entropy_loss, reference.cross_entropy_loss,
             _cross_entropy_args),
    # Structured rules (normalization, convolution, pooling) are added below.
    RuleCase("layer_norm_s", fnbp.layer_norm_s, reference.layer_norm_s, _layer_norm_s_args),
    RuleCase("layer_norm", fnbp.layer_norm, reference.layer_norm, _layer_norm_args),
    RuleCase("rms_norm", fnbp.rms_norm, reference.rms_norm, _rms_norm_args),
    RuleCase("conv1d", fnbp.conv1d, reference.conv1d, _conv_args((9,), (3,))),
    RuleCase("conv1d(s2, p(1,2), d2)", fnbp.conv1d, reference.conv1d,
             _conv_args((9,), (3,)), {"stride": 2, "padding": (1, 2), "dilation": 2}),
    RuleCase("conv2d", fnbp.conv2d, reference.conv2d, _conv_args((7, 6), (3, 3))),
    RuleCase("conv2d(s2, valid)", fnbp.conv2d, reference.conv2d,
             _conv_args((7, 6), (3, 2)), {"stride": 2, "padding": "valid"}),
    RuleCase("avg_pool", fnbp.avg_pool, reference.avg_pool, _pool_args, {"window": (2, 2)}),
    RuleCase("max_pool", fnbp.max_pool, reference.max_pool, _pool_args, {"window": (2, 2)}),
    RuleCase("max_pool(3x3, s1)", fnbp.max_pool, reference.max_pool, _pool_args,
             {"window": (3, 3), "stride": 1}),
)
