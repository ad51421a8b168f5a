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

Where a form materializes the g_i, :func:`outer_grads` and
:func:`outer_moments` hand them (or their sums) to the ``grads`` and
``moments`` hooks, so that the engine does not compute them twice (mixed
ghost clipping).
"""

from __future__ import annotations

import math

import jax
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
    features = math.prod(x.shape[x.ndim - feature_ndim :])
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
    examples. T > 1 positions: the g_i are materialized, a chunk of examples
    at a time (:func:`outer_moments`), and squared; a Gram-like form would
    cost T times the flops.
    """
    moments = outer_moments(a, b)  # None for one position
    if moments is None:
        return jnp.einsum("ip,iq->pq", a[:, 0] ** 2, b[:, 0] ** 2)
    return moments[1]


def outer_grads(a: Array, b: Array) -> Array | None:
    """The g_i that :func:`outer_sq_norms` materializes for these shapes, else None.

    The ``grads`` hook's part for a parameter with ``g_i = sum_t a_t b_t^T``:
    the (n, p, q) per-example gradients when the cost rule builds them
    (``2 T^2 > p q``), ``None`` for the Gram form (and for one position).
    """
    if a.shape[1] == 1 or use_gram(a.shape[1], a.shape[2] * b.shape[2]):
        return None
    return outer_sums(a, b)


# Examples per step of the materialized moments: at most this many numbers per step's g_i.
CHUNK_NUMBERS = 1 << 20


def outer_moments(a: Array, b: Array) -> tuple[Array, Array] | None:
    """``(sum_i g_i, sum_i g_i (.) g_i)`` for ``g_i = sum_t a_t b_t^T``, or None for one position.

    The ``moments`` hook's part: where :func:`outer_sq_grads` materializes the
    g_i (T > 1), the mean gradient's sum comes from the same g_i, one dot
    with ones, instead of the backward's own contraction; the g_i are built
    a chunk of examples at a time (:func:`chunked_sums`).
    """
    if a.shape[1] == 1:
        return None
    return chunked_sums(lambda a, b: sums(outer_sums(a, b)), (a, b), a.shape[2] * b.shape[2])


def chunked_sums(fn, xs, numbers: int):
    """``fn(xs)`` for a function that sums over the examples, a chunk of examples at a time.

    ``fn`` maps arrays whose first axis holds examples to a tuple of sums
    over them; the chunks' results are added. A chunk holds at most
    :data:`CHUNK_NUMBERS` / ``numbers`` examples (``numbers``: what ``fn``
    builds per example), preferring a divisor of n not under half that (the
    inputs then split without a copy); a ``jax.lax.scan`` runs the full
    chunks and one last call the rest. The memory is one chunk's rather than
    n examples': on XLA:CPU a program's large temporaries are fresh pages on
    every call, and faulting them in cost more than the arithmetic (a
    (256, 288, 64) g_i and its square: 24 ms against 4 ms for the dot alone).

    Args:
      fn: ``fn(*xs) -> tuple of arrays``, each a sum over the examples of xs.
      xs: a tuple of arrays with the same first axis n.
      numbers: how many numbers ``fn`` builds per example.
    """
    n = xs[0].shape[0]
    step = max(1, min(n, CHUNK_NUMBERS // max(numbers, 1)))
    if step == n:
        return fn(*xs)
    step = max([d for d in range(step // 2 + 1, step + 1) if n % d == 0], default=step)
    full = (n // step) * step

    def add(total, part):
        return part if total is None else tuple(t + p for t, p in zip(total, part))

    total = None
    if full:
        split = [x[:full].reshape((full // step, step) + x.shape[1:]) for x in xs]
        first = jax.eval_shape(fn, *(x[0] for x in split))
        zeros = tuple(jnp.zeros(o.shape, o.dtype) for o in first)
        total, _ = jax.lax.scan(
            lambda carry, chunk: (add(carry, fn(*chunk)), None), zeros, tuple(split)
        )
    if full < n:
        total = add(total, fn(*(x[full:] for x in xs)))
    return total


def example_sum(g: Array, s: Array | None = None) -> Array:
    """``sum_i s_i g_i`` over the leading example axis of g (all s_i = 1 when s is None).

    One contraction with the (n,) vector of weights rather than a reduction
    over the outermost axis: XLA:CPU ran ``jnp.sum(g, axis=0)`` of a
    (256, 288, 64) array 4 to 5 times slower than this dot.
    """
    s = jnp.ones(g.shape[:1], g.dtype) if s is None else s.astype(g.dtype)
    return jnp.tensordot(s, g, axes=1)


def sums(g: Array) -> tuple[Array, Array]:
    """Per-example gradients g (n, ...) -> ``(sum_i g_i, sum_i g_i (.) g_i)``, in g's dtype."""
    return example_sum(g), example_sum(g * g)


def squares(g: Array) -> tuple[Array, Array]:
    """Per-example gradients g (n, ...) -> (``||g_i||^2`` (n,), ``sum_i g_i (.) g_i``).

    Summed in at least float32.
    """
    g = g.astype(accumulation_dtype(g))
    sq = g * g
    return jnp.sum(sq, axis=tuple(range(1, g.ndim))), example_sum(sq)


# --- curvature: columns of the loss Hessian's factor, pulled back (fnbp.curvature) --------


def columns_diag_ggn(sq_grads, columns: Array) -> tuple:
    """``sum_c sq_grads(v_c)``: the GGN's diagonal from a ``sq_grads`` hook, column by column.

    ``columns`` is (C, n, ...): the C pulled-back columns of every example's
    loss-Hessian factor; each is a batch of n pseudo-examples, so the sum
    over c of their ``sum_i g_ic (.) g_ic`` is the diagonal of
    ``sum_i J_i^T H_i J_i`` (the columns carry the 1/n). One ``jax.vmap``
    over the columns, then the sum; ``None`` entries stay ``None``.
    """
    per_column = jax.vmap(sq_grads)(columns)
    return tuple(None if q is None else jnp.sum(q, axis=0) for q in per_column)


def outer_diag_ggn(a: Array, b: Array) -> Array:
    """``sum_{c,i} g_ic (.) g_ic`` for ``g_ic = a_ic b_i^T`` with one position.

    Args:
      a: the columns, (C, n, 1, p), in the accumulation dtype.
      b: the residual side, (n, 1, q).

    Returns:
      ``(sum_c A_c (.) A_c)^T (B (.) B)``, shape (p, q): the columns' squares
      are summed first, so the cost is one contraction over the examples,
      whatever C.
    """
    return jnp.einsum("ip,iq->pq", jnp.sum(a[:, :, 0] ** 2, axis=0), b[:, 0] ** 2)


def kronecker_factors(z: Array, columns: Array, bias: bool) -> tuple[Array, Array]:
    """K-FAC's ``(A, B)`` of a weight whose per-example gradient is ``sum_t v_t z_t^T``.

    KFAC-expand (Grosse & Martens 2016; Eschenhagen et al. 2023): the n T
    positions count as examples, ::

        A = (1 / (n T)) sum_{i,t} z~_it z~_it^T,   z~ = [z; 1] with a bias
        B = sum_c sum_{i,t} b_ict b_ict^T

    so that the GGN block of the weight (row-major vec, the bias as its last
    column) is approximated by B (x) A; with one example and one position it
    is exact (the columns carry the 1/n of the mean loss).

    Args:
      z: the layer's input as (n, T, p) rows, in the accumulation dtype.
      columns: the pulled-back columns, (C, n, T, q).
      bias: append a 1 to z (the bias as the weight's last column).
    """
    rows = z.reshape(-1, z.shape[-1])
    if bias:
        rows = jnp.concatenate([rows, jnp.ones(rows.shape[:1] + (1,), rows.dtype)], axis=1)
    A = jnp.einsum("rp,rq->pq", rows, rows) / rows.shape[0]
    cols = columns.reshape(-1, columns.shape[-1])
    return A, jnp.einsum("rp,rq->pq", cols, cols)


def bias_grads(b: Array | None, vt: Array, w_part=()) -> Array | None:
    """A bias' per-example gradients ``g_i = sum_t v_t`` (eq. 7.66), shape (n, q).

    Args:
      b: the bias, or None for a rule without one.
      vt: the cotangent as (n, T, q), in the accumulation dtype.
      w_part: the weight's part of the same hook; where it is None the
        bias' is None too (a hook hands both or neither).

    Returns:
      ``sum_t v_t`` per example, or None without a bias or a weight part.
    """
    return None if b is None or w_part is None else jnp.sum(vt, axis=1)


def bias_squares(b: Array | None, vt: Array, which: int) -> Array | None:
    """A bias' ``||sum_t v_t||^2`` per example (which=0, ``sq_norms``), shape (n,),
    or ``sum_i (sum_t v_t)^2`` (which=1, ``sq_grads``), shape (q,); None without a bias.
    """
    g = bias_grads(b, vt)
    return None if g is None else squares(g)[which]
