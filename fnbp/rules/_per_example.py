"""Shared arithmetic of the rules' per-example hooks (``sq_norms``, ``sq_grads``).

A rule M(z, p_1, ..., p_k) sees, in its backward pass, the cotangent ``v`` of
a whole batch. Example i's gradient of a parameter is ``g_i``, the part of
the batched parameter cotangent that example i contributes (its own
positions summed in: a sequence's tokens, an image's pixels). The hooks
return, without building every ``g_i`` where the shapes allow it:

- ``sq_norms``: ``||g_i||^2`` per example, shape (n,);
- ``sq_grads``: ``sum_i g_i (.) g_i``, shaped like the parameter.

For a parameter whose per-example gradient is a sum of outer products over
T positions, ``g_i = sum_t a_t b_t^T`` with a_t in R^p and b_t in R^q (MM:
a = v, b = z, eq. 7.65; a convolution: a = the input patch, b = v, in the
filters' (k... C) x C2 layout), two exact forms of ``||g_i||^2`` exist:

- Gram form: ``sum_{t,s} (a_t . a_s)(b_t . b_s)``, memory n T^2, never
  building g_i (for T = 1 it is ``||a||^2 ||b||^2``);
- materialized: build g_i (n p q numbers) and sum its squares.

:func:`use_gram` chooses between them from the static shapes: the Gram form
when ``2 T^2 <= p q`` (the rule of paxml's ghost norms and, with ``<``, of
mixed ghost clipping: the two T x T Gram matrices against one p x q
gradient per example). Every sum here runs in at least float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import Array

from fnbp.rules._dtypes import accumulation_dtype


def require_examples(hook: str, v: Array, per_example_ndim: int, meaning: str) -> None:
    """Refuse a cotangent without a leading example axis before the per-example axes."""
    if v.ndim < per_example_ndim + 1:
        raise ValueError(
            f"{hook}: v must have a leading example axis before the per-example axes "
            f"{meaning}, got v.shape={v.shape}; add one (v[None]) for a single example"
        )


def use_gram(positions: int, params: int) -> bool:
    """The cost rule: the Gram form when ``2 T^2 <= p q``, else materialize.

    Args:
      positions: T, the number of positions summed into one example's gradient.
      params: p q, the size of one example's gradient of the parameter.
    """
    return 2 * positions * positions <= params


def as_positions(x: Array, feature_ndim: int) -> Array:
    """(n, ..., *features) -> (n, T, prod(features)) in the accumulation dtype."""
    n = x.shape[0]
    features = math.prod(x.shape[x.ndim - feature_ndim:])
    return x.astype(accumulation_dtype(x)).reshape(n, -1, features)


def gram_sq_norms(a: Array, b: Array) -> Array:
    """``||sum_t a_t b_t^T||_F^2 = sum_{t,s} (a_t . a_s)(b_t . b_s)`` per example.

    Args:
      a, b: shapes (n, T, p) and (n, T, q), in the accumulation dtype.

    Returns:
      Shape (n,). For T = 1, ``||a||^2 ||b||^2`` without the Gram matrices.
    """
    if a.shape[1] == 1:
        return jnp.sum(a * a, axis=(1, 2)) * jnp.sum(b * b, axis=(1, 2))
    gram_a = jnp.einsum("itp,isp->its", a, a)
    gram_b = jnp.einsum("itq,isq->its", b, b)
    return jnp.sum(gram_a * gram_b, axis=(1, 2))


def outer_sums(a: Array, b: Array) -> Array:
    """The materialized per-example gradients ``g_i = sum_t a_t b_t^T``, (n, p, q)."""
    return jnp.einsum("itp,itq->ipq", a, b)


def outer_sq_norms(a: Array, b: Array) -> Array:
    """``||g_i||^2`` for ``g_i = sum_t a_t b_t^T`` by the cost rule: Gram form or materialized.

    Args:
      a, b: shapes (n, T, p) and (n, T, q), in the accumulation dtype.

    Returns:
      Shape (n,).
    """
    if use_gram(a.shape[1], a.shape[2] * b.shape[2]):
        return gram_sq_norms(a, b)
    return squares(outer_sums(a, b))[0]


def outer_sq_grads(a: Array, b: Array) -> Array:
    """``sum_i g_i (.) g_i`` for ``g_i = sum_t a_t b_t^T``, shape (p, q).

    One position: ``(A (.) A)^T (B (.) B)``, a single contraction over the
    examples. T > 1 positions: the g_i are materialized (n p q numbers) and
    squared; a Gram-like form would cost T times the flops.
    """
    if a.shape[1] == 1:
        return jnp.einsum("ip,iq->pq", a[:, 0] ** 2, b[:, 0] ** 2)
    return squares(outer_sums(a, b))[1]


def squares(g: Array) -> tuple[Array, Array]:
    """Per-example gradients g (n, ...) -> (``||g_i||^2`` (n,), ``sum_i g_i (.) g_i``).

    Summed in at least float32.
    """
    g = g.astype(accumulation_dtype(g))
    sq = g * g
    return jnp.sum(sq, axis=tuple(range(1, g.ndim))), jnp.sum(sq, axis=0)
