"""The matrix multiplication module MM (CS229 notes, eq. 7.35) and its rule.

Forward, per example::

    MM_{W,b}(z) = W z + b,        z in R^m, W in R^{n x m}, b in R^n    (7.35)

Backward function B[MM, z] and the parameter cotangents::

    B[MM, z](v) = W^T v                                                  (7.63)
    B[MM, W](v) = v z^T                                                  (7.65)
    B[MM, b](v) = v                                                      (7.66)

Leading axes of ``z`` are example axes (eq. 7.84: examples stacked as rows,
Z = X W^T + b). The parameter cotangents are summed over all of them with one
contraction: ``dW = V^T Z`` is a single ``dot_general`` over the example
axes, never a stack of per-example outer products.

Precision: every product (the forward ``Z W^T``, ``dz`` and ``dW``) is a
``dot_general`` whose result has the dtype of its operands, as autodiff of
``z @ W.T + b`` gives. bf16/f16 GEMMs produce their input dtype; the hardware
accumulates in float32 and rounds the sum once (a GPU's tensor cores; XLA:CPU
runs a bf16 kernel with float32 sums or upcasts the operands, by version).
Asking for a float32 result instead doubles the bytes the GEMM writes and, on a
GPU, costs cuBLAS's bias epilogue. The one reduction kept in float32 is the bias
cotangent ``db``, a sum over all examples accumulated in at least float32
and cast back. Mixed dtypes follow ``jnp.result_type``: the forward product
runs in ``result_type(z, W)``, the backward ones in the cotangent's dtype
(``result_type(z, W, b)``), and each result is cast to its argument's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from fnbp.checking import check_finite
from fnbp.rules import _per_example, _validate
from fnbp.rules._dtypes import accumulation_dtype
from fnbp.rules._examples import normal, rng
from fnbp.rules._rule import declare


class MMResiduals(NamedTuple):
    """What B[MM, .] needs: the input (for v z^T) and the weight (for W^T v).

    ``b`` is kept only so the rule knows whether there is a bias (``None``
    or not): it is a parameter that stays alive anyway, so this costs nothing.
    """

    z: Array
    W: Array
    b: Array | None


def _example_axes(x: Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _dot(a: Array, b: Array, dims, dtype) -> Array:
    """``dot_general`` of a and b, both in ``dtype``, with a result in ``dtype``."""
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims)


def mm_fwd(z: Array, W: Array, b: Array | None = None) -> tuple[Array, MMResiduals]:
    """Forward pass of :func:`mm` that also returns the residuals B needs."""
    out_dtype = jnp.result_type(z, W) if b is None else jnp.result_type(z, W, b)
    # Z W^T as one dot_general over the feature axis (eq. 7.84), in z and W's dtype.
    u = _dot(z, W, (((z.ndim - 1,), (1,)), ((), ())), jnp.result_type(z, W))
    if b is not None:
        u = u + b
    return u.astype(out_dtype), MMResiduals(z, W, b)


def mm_bwd(res: MMResiduals, v: Array) -> tuple[Array, Array, Array | None]:
    """B[MM, .]: map the cotangent ``v`` of shape (..., n) to (dz, dW, db).

    Args:
      res: the residuals returned by :func:`mm_fwd`.
      v: dJ/du for u = MM(z), shape (..., n).

    Returns:
      ``dz = v W`` (eq. 7.63, W^T v per example), shape (..., m);
      ``dW = sum over examples of v z^T`` (eq. 7.65), shape (n, m), one
      contraction over all leading axes; ``db = sum over examples of v``
      (eq. 7.66), shape (n,), or ``None`` when there is no bias.

    Precision: ``dz`` and ``dW`` are dots in the cotangent's dtype
    (``result_type(z, W, v)``) with results in that dtype: bf16/f16 GEMMs
    produce their input dtype; the hardware accumulates in float32. ``db`` is
    summed in at least float32 and cast back to b's dtype.
    """
    z, W, b = res
    compute = jnp.result_type(z, W, v)
    dz = _dot(v, W, (((v.ndim - 1,), (0,)), ((), ())), compute).astype(z.dtype)
    examples = _example_axes(v)
    dW = _dot(v, z, ((examples, examples), ((), ())), compute).astype(W.dtype)
    db = None
    if b is not None:
        db = jnp.sum(v, axis=examples, dtype=accumulation_dtype(v)).astype(b.dtype)
    return dz, dW, db


def mm_jvp(res: MMResiduals, t: tuple) -> Array:
    """F[MM, .]: the tangents (t_z, t_W, t_b) to the output's, W t_z + t_W z + t_b.

    The mirror of :func:`mm_bwd`: MM is linear in z and in (W, b) separately,
    so its change is the sum of MM applied to each tangent with the other
    arguments fixed (eq. 7.35 twice). ``None`` tangents (an absent bias, or
    an argument held fixed) add nothing. Dots in ``result_type`` of the
    arrays involved, like the forward pass.
    """
    z, W, b = res
    t_z, t_W, t_b = (tuple(t) + (None, None, None))[:3]
    out_dtype = jnp.result_type(z, W) if b is None else jnp.result_type(z, W, b)
    u = jnp.zeros(z.shape[:-1] + W.shape[:1], out_dtype)
    if t_z is not None:
        u = u + _dot(t_z, W, (((t_z.ndim - 1,), (1,)), ((), ())), jnp.result_type(t_z, W))
    if t_W is not None:
        u = u + _dot(z, t_W, (((z.ndim - 1,), (1,)), ((), ())), jnp.result_type(z, t_W))
    if t_b is not None and b is not None:
        u = u + t_b
    return u.astype(out_dtype)


def mm(z: Array, W: Array, b: Array | None = None) -> Array:
    """The matrix multiplication module MM_{W,b}(z) = W z + b (eq. 7.35).

    Per example ``z`` is a vector of m features; any leading axes of ``z`` are
    example axes, so a batch Z of shape (n_examples, m) gives Z W^T + b
    (eq. 7.84). The gradient comes from the hand-written rule
    :func:`mm_bwd` (eqs. 7.63, 7.65, 7.66).

    Args:
      z: input, shape (..., m), floating.
      W: weight, shape (n, m), floating.
      b: bias, shape (n,), or ``None`` for no bias.

    Returns:
      ``u`` of shape (..., n) and dtype ``result_type(z, W, b)``. The product
      is a dot in ``result_type(z, W)`` with a result of that dtype: bf16/f16
      GEMMs produce their input dtype; the hardware accumulates in float32.

    Raises:
      ValueError: W not 2-D, z's last axis not W's second, b not (n,).
      TypeError: a non-floating z, W or b.
    """
    z = _validate.float_array("mm", "z", z)
    W = _validate.float_array("mm", "W", W)
    _validate.require_ndim("mm", "W", W, 2, "(n outputs, m inputs)")
    _validate.require_min_ndim("mm", "z", z, 1, "(..., m)")
    n, m = W.shape
    if z.shape[-1] != m:
        raise ValueError(
            f"mm: z has {z.shape[-1]} features but W expects {m} "
            f"(W.shape={W.shape}, z.shape={z.shape}); pass z with shape (..., {m}) "
            f"or W with shape ({n}, {z.shape[-1]})"
        )
    if b is not None:
        b = _validate.float_array("mm", "b", b)
        if b.shape != (n,):
            raise ValueError(
                f"mm: b must have shape ({n},) to match W.shape={W.shape}, got b.shape={b.shape}"
            )
        check_finite("mm", "b", b)
    check_finite("mm", "z", z)
    check_finite("mm", "W", W)
    return MM.apply(z, W, b)


def _positions(res: MMResiduals, v: Array, hook: str) -> tuple[Array, Array]:
    """v and z as (n, T, d_out) and (n, T, d_in) in at least float32."""
    _per_example.require_examples(hook, v, 1, "(d_out,)")
    return _per_example.as_positions(v, 1), _per_example.as_positions(res.z, 1)


def mm_sq_norms(res: MMResiduals, v: Array) -> tuple[Array, Array | None]:
    """Per-example squared norms of the parameter gradients: the ``sq_norms`` hook.

    Example i's gradients are ``g_W = sum_t v_t z_t^T`` (eq. 7.65) and
    ``g_b = sum_t v_t`` (eq. 7.66), summed over its positions t (a
    sequence's tokens: the axes between the example axis and the features).

    - One position (v of shape (n, d_out)): ``||v z^T||_F^2 = ||v||^2 ||z||^2``.
    - T positions, Gram form: ``sum_{t,s} (v_t . v_s)(z_t . z_s)``, memory
      n T^2, when ``2 T^2 <= d_in d_out`` (paxml's rule); otherwise the
      per-example gradients are materialized (one contraction over the
      positions, memory n d_out d_in) and their squares summed.
    - ``||g_b||^2 = ||sum_t v_t||^2``.

    Args:
      res: the residuals of :func:`mm_fwd`.
      v: the cotangent, shape (n, T..., d_out): n examples, any position axes.

    Returns:
      ``(sq_W, sq_b)``, each of shape (n,) in at least float32; ``sq_b`` is
      ``None`` without a bias.

    Raises:
      ValueError: v without an example axis (v.ndim < 2).
    """
    vt, zt = _positions(res, v, "mm_sq_norms")
    sq_W = _per_example.outer_sq_norms(vt, zt)
    sq_b = _per_example.bias_squares(res.b, vt, 0)
    return sq_W, sq_b


def mm_sq_grads(res: MMResiduals, v: Array) -> tuple[Array, Array | None]:
    """Sums over examples of the squared per-example gradients: the ``sq_grads`` hook.

    BackPACK's SumGradSquared: ``sum_i g_i (.) g_i`` with g_i the gradients of
    eqs. 7.65 and 7.66 for example i.

    - One position: ``(V (.) V)^T (Z (.) Z)``, a single contraction over the
      examples; the per-example gradients are never built.
    - T positions: the per-example ``g_W = sum_t v_t z_t^T`` are materialized
      (memory n d_out d_in) and squared; the Gram form would cost T times the
      flops of the outer products.
    - For b: ``sum_i (sum_t v_t)^2``.

    Args, Raises: as :func:`mm_sq_norms`.

    Returns:
      ``(sq_W, sq_b)`` shaped like W (d_out, d_in) and b (d_out,), in at least
      float32; ``sq_b`` is ``None`` without a bias.
    """
    vt, zt = _positions(res, v, "mm_sq_grads")
    sq_W = _per_example.outer_sq_grads(vt, zt)
    sq_b = _per_example.bias_squares(res.b, vt, 1)
    return sq_W, sq_b


def mm_grads(res: MMResiduals, v: Array) -> tuple[Array | None, Array | None]:
    """The per-example gradients that ``sq_norms`` materializes: the ``grads`` hook.

    Mixed ghost clipping: on sequences with ``2 T^2 > d_in d_out``,
    :func:`mm_sq_norms` builds every ``g_W = sum_t v_t z_t^T``; they are
    returned, shape (n, d_out, d_in), so that the clipped sum is
    ``sum_i s_i g_i`` (one contraction over n) instead of a second one over
    every position. For b, ``g_b = sum_t v_t``, (n, d_out), alongside. Both
    ``None`` under the Gram form or with one position (the backward's
    contraction is then the cheaper one); b's ``None`` without a bias. In at
    least float32. Args, Raises: as :func:`mm_sq_norms`.
    """
    vt, zt = _positions(res, v, "mm_grads")
    g_W = _per_example.outer_grads(vt, zt)
    return g_W, _per_example.bias_grads(res.b, vt, g_W)


def mm_moments(res: MMResiduals, v: Array) -> tuple[tuple | None, tuple | None]:
    """``(sum_i g_i, sum_i g_i (.) g_i)`` from one materialization: the ``moments`` hook.

    On sequences (T > 1) :func:`mm_sq_grads` materializes the g_W; the sum
    of the g_W comes from the same ones (a chunk of examples at a time), so
    the backward's weight contraction is not needed; b's pair alongside.
    Both ``None`` with one position; b's ``None`` without a bias. Shaped like
    W and b, in at least float32. Args, Raises: as :func:`mm_sq_norms`.
    """
    vt, zt = _positions(res, v, "mm_moments")
    m_W = _per_example.outer_moments(vt, zt)
    g_b = _per_example.bias_grads(res.b, vt, m_W)
    return m_W, None if g_b is None else _per_example.sums(g_b)


def mm_diag_ggn(res: MMResiduals, columns: Array) -> tuple[Array, Array | None]:
    """The GGN's diagonal for W and b from the pulled-back columns: the ``diag_ggn`` hook.

    ``columns`` is (C, n, T..., d_out): the C columns of every example's
    loss-Hessian factor carried back to this layer's output (see
    :mod:`fnbp.curvature`). Each column c is a batch of pseudo-examples with
    gradients ``g_ic = sum_t b_ict z_it^T`` (eq. 7.65), and the diagonal is
    ``sum_{c,i} g_ic (.) g_ic``.

    - One position: ``(sum_c B_c (.) B_c)^T (Z (.) Z)``, the columns' squares
      summed first: one contraction over the examples, whatever C.
    - T positions: :func:`mm_sq_grads` column by column, summed.
    - For b: ``sum_{c,i} (sum_t b_ict)^2``.

    Returns:
      ``(diag_W, diag_b)`` shaped like W and b, in at least float32; ``diag_b``
      is ``None`` without a bias.
    """
    _per_example.require_examples("mm_diag_ggn", columns, 2, "(C columns, n examples, d_out)")
    zt = _per_example.as_positions(res.z, 1)
    if zt.shape[1] != 1:
        return _per_example.columns_diag_ggn(lambda v: mm_sq_grads(res, v), columns)
    ct = jax.vmap(lambda v: _per_example.as_positions(v, 1))(columns)
    diag_W = _per_example.outer_diag_ggn(ct, zt)
    diag_b = None if res.b is None else jnp.sum(ct[:, :, 0] ** 2, axis=(0, 1))
    return diag_W, diag_b


def mm_kfac(res: MMResiduals, columns: Array) -> tuple[Array, Array]:
    """K-FAC's Kronecker factors ``(A, B)`` of MM: the ``kfac`` hook.

    The GGN block of the weight ``[W | b]`` (shape (d_out, d_in + 1) with a
    bias, (d_out, d_in) without; row-major vec) is approximated by B (x) A,
    ::

        A = (1 / (n T)) sum_{i,t} z~_it z~_it^T      (d_in [+ 1])^2, z~ = [z; 1]
        B = sum_c sum_{i,t} b_ict b_ict^T            d_out^2

    from the input z the forward pass stored and the columns (C, n, T...,
    d_out) pulled back to this layer's output. Positions of a sequence count
    as examples (KFAC-expand). In at least float32.
    """
    _per_example.require_examples("mm_kfac", columns, 2, "(C columns, n examples, d_out)")
    zt = _per_example.as_positions(res.z, 1)
    ct = columns.astype(zt.dtype).reshape(columns.shape[:1] + zt.shape[:2] + columns.shape[-1:])
    return _per_example.kronecker_factors(zt, ct, res.b is not None)


def _mm_reference(z, W, b=None):
    u = z @ W.T
    return u if b is None else u + b


def _mm_args(key, dtype):
    gen = rng(key)
    return (normal(gen, (5, 6), dtype), normal(gen, (3, 6), dtype), normal(gen, (3,), dtype))


MM = declare(
    mm,
    mm_fwd,
    mm_bwd,
    jvp=mm_jvp,
    reference=_mm_reference,
    examples=_mm_args,
    equations=("7.35", "7.63", "7.65", "7.66", "7.84"),
    kink="none: linear.",
    family="linear",
    hooks={
        "sq_norms": mm_sq_norms,
        "sq_grads": mm_sq_grads,
        "grads": mm_grads,
        "moments": mm_moments,
        "diag_ggn": mm_diag_ggn,
        "kfac": mm_kfac,
    },
)
