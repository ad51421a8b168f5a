"""Rules with a known bug that shows under one transform only, for testing a checker.

A checker of hand-written VJPs is itself tested by giving it rules that are
wrong in a known way and asking whether, and where, it says so. Most such
mutants are a line each (a wrong factor, a dropped term); the one here needs
JAX's batching machinery and is shared by the mutation suite
(``tests/test_verify_mutations.py``) and the checker comparison
(``benchmarks/bench_verifier.py``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import custom_batching


@custom_batching.custom_vmap
def _scale(c, v):
    return c * v


@_scale.def_vmap
def _scale_batched(axis_size, in_batched, c, v):
    # The bug: the batched rule uses the first member's cotangent for every member.
    c_batched, v_batched = in_batched
    out = c * (v[0] if v_batched else v)
    batched = c_batched or v_batched
    return (jnp.broadcast_to(out, v.shape) if batched else out), batched


@jax.custom_jvp
def scale_wrong_under_vmap(c, v):
    """c * v, right one call at a time; under ``jax.vmap`` every member gets c * v[0].

    Differentiable (its JVP is dc * v + c * dv), so a rule built on it is also
    right at second order: only a batched transform shows the bug.
    """
    return _scale(c, v)


@scale_wrong_under_vmap.defjvp
def _scale_jvp(primals, tangents):
    (c, v), (dc, dv) = primals, tangents
    return _scale(c, v), dc * v + c * dv


def sin_wrong_under_vmap() -> Any:
    """sin with B[sin, z](v) = cos(z) v, except under ``jax.vmap`` (see :func:`scale_wrong_under_vmap`)."""

    def sin(z):
        return jnp.sin(z)

    f = jax.custom_vjp(sin)
    f.defvjp(lambda z: (jnp.sin(z), jnp.cos(z)), lambda c, v: (scale_wrong_under_vmap(c, v),))
    return f
