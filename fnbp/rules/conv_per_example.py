"""Per-example hooks of Conv1D and Conv2D: ``sq_norms`` and ``sq_grads``.

Kept apart from :mod:`fnbp.rules.conv` (which imports them for its
``declare``) so that each module stays one concern; the settings are parsed
by the rule's own :func:`fnbp.rules._conv_ops._settings`, so stride,
padding and dilation mean exactly what they mean in the rule's backward.

Example i's gradient of the filters (eqs. 7.48-7.51, with stride s,
dilation d and padding as the rule's) sums over its output positions t
(and over any position axes before the spatial ones)::

    g_i[j, c, c2] = sum_t zpad_i[s t + d j, c] v_i[t, c2] = sum_t (p_t v_t^T)[(j, c), c2]

with p_t in R^{k... C} the input patch that output position t sees (one
strided slice of the padded input per kernel tap); the bias' is
``sum_t v_t``. This is MM's per-example gradient (eq. 7.65) with the
patches as inputs, and the same two exact forms of ``||g_i||^2`` serve
(T positions, D = k... C C2 numbers per filter gradient):

- Gram form over the output positions: ``sum_{t,s} (p_t . p_s)(v_t . v_s)``,
  memory n T^2 for the two Gram matrices;
- materialized: every g_i as one batched contraction of the patches with v
  over the positions, memory n D, then the squares summed.

Both need the patches (n T k... C numbers, k... times the input). The
cost rule, from the static shapes at each call (mixed ghost clipping's
choice, with paxml's ``<=`` as for MM): the Gram form when ``2 T^2 <= D``,
else materialize. ``sq_grads`` (``sum_i g_i (.) g_i``, shaped like w)
always materializes (a Gram-like form would cost T times the flops; a
chunk of examples at a time), or for one output position takes
``(P (.) P)^T (V (.) V)``. Every sum runs in at least float32.

Mixed ghost clipping: ``grads`` hands over the g_i where ``sq_norms``
materializes them (the clipped sum is then ``sum_i s_i g_i``, no second
weight-gradient convolution) and ``moments`` the pair ``(sum_i g_i,
sum_i g_i (.) g_i)`` where ``sq_grads`` does (the mean gradient then comes
from the same g_i).

The contraction of the patches is used to materialize rather than the
rule's weight-cotangent convolution under ``jax.vmap``: vmapped over the
examples, that convolution becomes a grouped one with one group per example,
which XLA:CPU ran 2 to 9 times slower than the contraction on the two layers
of ``fnbp.cnn(10, (32, 64))`` on 8x8x1 inputs at batch 256 (jax 0.10 and
0.12), and about as fast on a 14x14x32 -> 64 layer.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import Array

from fnbp.rules import _per_example as _pe
from fnbp.rules._conv_ops import (
    _NAME,
    _SETTINGS,
    ConvResiduals,
    Ints,
    Padding,
    Pairs,
    _flat,
    _offsets,
    _settings,
    _tap,
)
from fnbp.rules._dtypes import accumulation_dtype
from fnbp.rules._rule import jit_static


def _patches(zf: Array, w: Array, out: Ints, stride: Ints, padding: Pairs, dilation: Ints) -> Array:
    """The input patch of every output position: (N, *out, k... * C), taps in w's order.

    ``patch[i][j, c] = zpad[s i + d j, c]``: the numbers each output position
    multiplies with w (eq. 7.48), gathered by one strided slice per kernel tap.
    """
    zp = jnp.pad(zf, ((0, 0),) + tuple(padding) + ((0, 0),))
    taps = [
        _tap(zp, tuple(d * t for d, t in zip(dilation, j)), stride, out)
        for j in _offsets(w.shape[: w.ndim - 2])
    ]
    return jnp.stack(taps, axis=-2).reshape(zf.shape[:1] + tuple(out) + (-1,))


_V_MEANING = {1: "(m', C2)", 2: "(H', W', C2)"}


def _per_example(n: int, res: ConvResiduals, v: Array, hook: str, settings) -> tuple[Array, Array]:
    """The patches (n, T, k... C) and v as (n, T, C2), in >= float32: g_i = sum_t p_t v_t^T."""
    _pe.require_examples(f"{_NAME[n]}_{hook}", v, n + 1, _V_MEANING[n])
    z, w = res.z, res.w
    acc = accumulation_dtype(z, v)
    vt = _pe.as_positions(v, 1).astype(acc)
    patches = _patches(
        _flat(z, n).astype(acc),
        w,
        v.shape[v.ndim - n - 1 : v.ndim - 1],
        *_settings(n, w.shape, *settings),
    )
    return patches.reshape(vt.shape[:2] + (-1,)), vt


def _conv_sq_norms(n: int, res: ConvResiduals, v: Array, *settings) -> tuple[Array, Array | None]:
    patches, vt = _per_example(n, res, v, "sq_norms", settings)
    return _pe.outer_sq_norms(patches, vt), _pe.bias_squares(res.b, vt, 0)


def _conv_sq_grads(n: int, res: ConvResiduals, v: Array, *settings) -> tuple[Array, Array | None]:
    _pe.require_examples(f"{_NAME[n]}_sq_grads", v, n + 1, _V_MEANING[n])
    m_w, m_b = _conv_moments(n, res, v, *settings)
    if m_w is not None:
        # More than one output position: the g_i of the moments, a chunk of examples at a time.
        return m_w[1], None if m_b is None else m_b[1]
    patches, vt = _per_example(n, res, v, "sq_grads", settings)
    return _pe.outer_sq_grads(patches, vt).reshape(res.w.shape), _pe.bias_squares(res.b, vt, 1)


def _conv_grads(
    n: int, res: ConvResiduals, v: Array, *settings
) -> tuple[Array | None, Array | None]:
    patches, vt = _per_example(n, res, v, "grads", settings)
    g_w = _pe.outer_grads(patches, vt)
    g_b = _pe.bias_grads(res.b, vt, g_w)
    return (None if g_w is None else g_w.reshape(vt.shape[:1] + res.w.shape)), g_b


def _conv_moments(
    n: int, res: ConvResiduals, v: Array, *settings
) -> tuple[tuple[Array, Array] | None, tuple[Array, Array] | None]:
    _pe.require_examples(f"{_NAME[n]}_moments", v, n + 1, _V_MEANING[n])
    if math.prod(v.shape[1 : v.ndim - 1]) == 1:  # one output position: T of as_positions(v, 1)
        return None, None

    def moments(z, v):
        # The patches of a chunk of examples only: k... times its input, not the batch's.
        patches, vt = _per_example(n, res._replace(z=z), v, "moments", settings)
        m_w = _pe.sums(_pe.outer_sums(patches, vt))
        g_b = _pe.bias_grads(res.b, vt)
        return m_w if g_b is None else m_w + _pe.sums(g_b)

    lead = v.shape[0]
    z = res.z.reshape((lead, -1) + res.z.shape[res.z.ndim - n - 1 :])
    out = _pe.chunked_sums(
        moments, (z, v.reshape((lead, -1) + v.shape[v.ndim - n - 1 :])), res.w.size
    )
    m_w = tuple(m.reshape(res.w.shape) for m in out[:2])
    return m_w, (None if res.b is None else out[2:])


def _conv_kfac(n: int, res: ConvResiduals, columns: Array, *settings) -> tuple[Array, Array]:
    _pe.require_examples(f"{_NAME[n]}_kfac", columns, n + 2, "(C columns, n examples, ...)")
    patches, _ = _per_example(n, res, columns[0], "kfac", settings)
    cols = columns.astype(patches.dtype).reshape(columns.shape[0], -1, columns.shape[-1])
    return _pe.kronecker_factors(patches, cols, res.b is not None)


_KFAC_DOC = """K-FAC's Kronecker factors ``(A, B)`` of the filters (``kfac`` hook).

    The filters as a matrix ``W = w.reshape(-1, C2).T`` of shape
    (C2, k... C) (the patch layout, taps in w's order), with the bias as its
    last column when there is one: the GGN block of W (row-major vec) is
    approximated by B (x) A, KFAC-expand (Grosse & Martens 2016): every
    output position t of every example is an example of its own, ::

        A = (1 / (n T)) sum_{{i,t}} p~_it p~_it^T     p~ = [input patch; 1]
        B = sum_c sum_{{i,t}} b_ict b_ict^T           (C2, C2)

    from the input patches and the columns (C, n, ..., C2) pulled back to the
    layer's output. In at least float32.
    """

_GRADS_DOC = """The per-example gradients that ``sq_norms`` materializes (``grads`` hook).

    Mixed ghost clipping (Bu et al.): where the cost rule of
    :func:`{name}_sq_norms` materializes the per-example filter gradients
    (``2 T^2 > D``), they are returned, shape (n, *w.shape), so that the
    clipped sum is one contraction ``sum_i s_i g_i`` with no second
    weight-gradient convolution; ``None`` for the filters under the Gram
    form. The bias' ``g_i = sum_t v_t``, (n, C2), alongside the filters'
    (``None`` when theirs is, or without a bias). In at least float32.
    Args and Raises as :func:`{name}_sq_norms`.
    """

_MOMENTS_DOC = """``(sum_i g_i, sum_i g_i (.) g_i)`` from one materialization (``moments`` hook).

    Where :func:`{name}_sq_grads` materializes the per-example filter
    gradients (more than one output position), the sum of the g_i comes from
    the same g_i, so the backward's own weight-gradient convolution is not
    needed. The g_i and the patches they need are built a chunk of examples
    at a time (:func:`fnbp.rules._per_example.chunked_sums`). ``None`` for
    the filters with one output position; the bias' pair alongside the
    filters' (``None`` when theirs is, or without a bias). Each entry shaped
    like its parameter, in at least float32. Args and Raises as
    :func:`{name}_sq_norms`.
    """


def _hook(body, n: int, name: str, doc: str):
    """The jitted hook ``name`` of conv{n}d with the rule's keyword settings."""

    def hook(
        res: ConvResiduals,
        v: Array,
        *,
        stride: int | Ints = 1,
        padding: Padding = "same",
        dilation: int | Ints = 1,
    ):
        return body(n, res, v, stride, padding, dilation)

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = doc.format(name=f"conv{n}d")
    return jit_static(*_SETTINGS)(hook)


conv1d_grads = _hook(_conv_grads, 1, "conv1d_grads", _GRADS_DOC)
conv2d_grads = _hook(_conv_grads, 2, "conv2d_grads", _GRADS_DOC)
conv1d_moments = _hook(_conv_moments, 1, "conv1d_moments", _MOMENTS_DOC)
conv1d_kfac = _hook(_conv_kfac, 1, "conv1d_kfac", _KFAC_DOC)
conv2d_kfac = _hook(_conv_kfac, 2, "conv2d_kfac", _KFAC_DOC)
conv2d_moments = _hook(_conv_moments, 2, "conv2d_moments", _MOMENTS_DOC)


@jit_static(*_SETTINGS)
def conv1d_sq_norms(
    res: ConvResiduals,
    v: Array,
    *,
    stride: int | Ints = 1,
    padding: Padding = "same",
    dilation: int | Ints = 1,
) -> tuple[Array, Array | None]:
    """Per-example squared norms of Conv1D's parameter gradients (``sq_norms`` hook).

    ``||g_i||^2`` for the filters (eq. 7.50), by the Gram form over the
    output positions when ``2 T^2 <= k C C2`` (T: output positions of one
    example, position axes included), else by materializing each example's
    (k, C, C2) gradient (see the module doc); ``||sum_t v_t||^2`` for the
    bias.

    Args:
      res: the residuals of ``conv1d_fwd``.
      v: the cotangent, shape (n, ..., m', C2): n examples, then any position
        axes, then the output's length and channels.
      stride, padding, dilation: the rule's settings, as its bwd gets them.

    Returns:
      ``(sq_w, sq_b)``, each of shape (n,) in at least float32; ``sq_b`` is
      ``None`` without a bias.

    Raises:
      ValueError: v without an example axis before (m', C2).
    """
    return _conv_sq_norms(1, res, v, stride, padding, dilation)


@jit_static(*_SETTINGS)
def conv1d_sq_grads(
    res: ConvResiduals,
    v: Array,
    *,
    stride: int | Ints = 1,
    padding: Padding = "same",
    dilation: int | Ints = 1,
) -> tuple[Array, Array | None]:
    """Sums over examples of Conv1D's squared per-example gradients (``sq_grads`` hook).

    ``sum_i g_i (.) g_i`` with each example's (k, C, C2) filter gradient
    materialized (one contraction of its input patches with v); for the bias
    ``sum_i (sum_t v_t)^2``. Args and Raises as :func:`conv1d_sq_norms`.

    Returns:
      ``(sq_w, sq_b)`` shaped like w and b, in at least float32; ``sq_b`` is
      ``None`` without a bias.
    """
    return _conv_sq_grads(1, res, v, stride, padding, dilation)


@jit_static(*_SETTINGS)
def conv2d_sq_norms(
    res: ConvResiduals,
    v: Array,
    *,
    stride: int | Ints = 1,
    padding: Padding = "same",
    dilation: int | Ints = 1,
) -> tuple[Array, Array | None]:
    """As :func:`conv1d_sq_norms` for Conv2D (eq. 7.51): v of shape (n, ..., H', W', C2).

    The Gram form when ``2 T^2 <= kh kw C C2`` (T = H' W' times the position
    axes), else each example's (kh, kw, C, C2) gradient is materialized.
    """
    return _conv_sq_norms(2, res, v, stride, padding, dilation)


@jit_static(*_SETTINGS)
def conv2d_sq_grads(
    res: ConvResiduals,
    v: Array,
    *,
    stride: int | Ints = 1,
    padding: Padding = "same",
    dilation: int | Ints = 1,
) -> tuple[Array, Array | None]:
    """As :func:`conv1d_sq_grads` for Conv2D: shaped like w (kh, kw, C, C2) and b (C2,)."""
    return _conv_sq_grads(2, res, v, stride, padding, dilation)


# The per-example hooks each rule declares (fnbp.rules.conv: ``declare(..., hooks=...)``).
CONV1D_HOOKS = {
    "sq_norms": conv1d_sq_norms,
    "sq_grads": conv1d_sq_grads,
    "grads": conv1d_grads,
    "moments": conv1d_moments,
    "kfac": conv1d_kfac,
}
CONV2D_HOOKS = {
    "sq_norms": conv2d_sq_norms,
    "sq_grads": conv2d_sq_grads,
    "grads": conv2d_grads,
    "moments": conv2d_moments,
    "kfac": conv2d_kfac,
}
