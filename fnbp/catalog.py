"""Every built-in rule with a plain reference and example arguments.

One :class:`RuleCase` per rule: what ``fnbp check`` runs and what the
verifier sweeps. ``make_args(key, dtype)`` draws arguments away from kinks
(|z| >= 0.1 for the piecewise rules), so finite differences and autodiff agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp

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


def _away_from_zero(key, shape, dtype):
    k1, k2 = jax.random.split(key)
    magnitude = jax.random.uniform(k1, shape, minval=0.1, maxval=2.0)
    sign = jnp.where(jax.random.bernoulli(k2, 0.5, shape), 1.0, -1.0)
    return (sign * magnitude).astype(dtype)


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape).astype(dtype)


def _elementwise(key, dtype):
    return (_away_from_zero(key, (4, 7), dtype),)


def _mm_args(key, dtype):
    kz, kw, kb = jax.random.split(key, 3)
    return (_normal(kz, (5, 6), dtype), _normal(kw, (3, 6), dtype), _normal(kb, (3,), dtype))


def _mse_args(key, dtype):
    kt, ky = jax.random.split(key)
    return (_normal(kt, (5, 3), dtype), _normal(ky, (5, 3), dtype))


def _logistic_args(key, dtype):
    kt, ky = jax.random.split(key)
    return (_normal(kt, (6,), dtype) * 3, jax.random.uniform(ky, (6,)).astype(dtype))


def _cross_entropy_args(key, dtype):
    kt, ky = jax.random.split(key)
    return (_normal(kt, (5, 4), dtype) * 2, jax.random.randint(ky, (5,), 0, 4))


def _layer_norm_s_args(key, dtype):
    return (_normal(key, (5, 8), dtype) * 2 + 1, jnp.asarray(0.1, dtype))


def _layer_norm_args(key, dtype):
    kz, kg, kb = jax.random.split(key, 3)
    return (_normal(kz, (5, 8), dtype) * 2 + 1, _normal(kg, (8,), dtype) + 1,
            _normal(kb, (8,), dtype), jnp.asarray(0.1, dtype))


def _rms_norm_args(key, dtype):
    kz, kg = jax.random.split(key)
    return (_normal(kz, (5, 8), dtype), _normal(kg, (8,), dtype) + 1, jnp.asarray(0.1, dtype))


def _conv_args(spatial, kernel):
    def make(key, dtype):
        kz, kw, kb = jax.random.split(key, 3)
        return (_normal(kz, (2,) + spatial + (2,), dtype),
                _normal(kw, kernel + (2, 3), dtype), _normal(kb, (3,), dtype))
    return make


def _pool_args(key, dtype):
    return (_normal(key, (2, 6, 7, 3), dtype),)


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
