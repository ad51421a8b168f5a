"""Shared pieces of the rules' example-argument factories.

Each rule declares ``(key, dtype) -> args`` factories (see
:class:`fnbp.rules.Example`) that draw arguments away from its kinks
(|z| >= 0.1 for the piecewise rules), so finite differences and autodiff
agree. The draws use NumPy seeded from the JAX key: eager ``jax.random``
would compile a small program for every shape and dtype, which once took most
of the time of ``fnbp check``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rng(key) -> np.random.Generator:
    """A NumPy generator seeded by a JAX PRNG key (typed or raw uint32 data)."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())


def away_from_zero(gen: np.random.Generator, shape, dtype):
    """Entries of random sign with magnitude in [0.1, 2): away from a kink at 0."""
    magnitude = gen.uniform(0.1, 2.0, shape)
    sign = np.where(gen.random(shape) < 0.5, 1.0, -1.0)
    return jnp.asarray(sign * magnitude, dtype)


def normal(gen: np.random.Generator, shape, dtype, scale=1.0, shift=0.0):
    """``scale * N(0, 1) + shift`` entries in ``dtype``."""
    return jnp.asarray(scale * gen.standard_normal(shape) + shift, dtype)


def elementwise(key, dtype):
    """One (4, 7) input away from 0: the example of an element-wise rule."""
    return (away_from_zero(rng(key), (4, 7), dtype),)


def with_scalar(value):
    """:func:`elementwise` followed by the scalar setting ``value`` in ``dtype``."""

    def make(key, dtype):
        return elementwise(key, dtype) + (jnp.asarray(value, dtype),)

    return make
