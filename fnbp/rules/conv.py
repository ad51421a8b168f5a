"""Convolutions Conv1D and Conv2D (CS229 notes, eqs. 7.48-7.51) and their rules.

Forward, per example, channels last. Conv1D-S with a filter w in R^k,
k = 2l + 1, on z in R^m with zero padding (eq. 7.48)::

    Conv1D-S(z)_i = sum_{j=1}^{k} w_j z_{i - l + (j - 1)},   z_t = 0 outside 1..m

a cross-correlation (the filter is not flipped). It is linear in z: it equals
Q z for the banded m x m matrix Q with Q_{i, i-l+j-1} = w_j (eq. 7.49); fnbp
never builds Q. With C input and C2 output channels, z is m x C and the filters
are k x C x C2 (eq. 7.50); Conv2D does the same over two spatial axes (7.51).
Stride s, dilation d and explicit padding generalize the index to
``u[i] = sum_j w[j] zpad[s i + d j]``.

Backward, written as convolutions (never a dense matrix, never autodiff of
the forward). With the cotangent v of u:

- B[Conv, z](v) = Q^T v: the transposed convolution, i.e. a convolution of v,
  dilated by the stride (``lhs_dilation = s``), with the spatially flipped
  kernel whose channel roles are swapped (C2 -> C), padded by
  ``(d (k - 1) - low, m + low - 1 - s (m' - 1))`` per axis.
- B[Conv, w](v) = sum over examples and positions of zpad[s i + d j] v[i]^T:
  a convolution of z with v in which the examples are the contracted axis,
  the input channels play the batch, the forward dilation is the stride and
  the forward stride the dilation. One convolution sums over every example.
- B[Conv, b](v) = sum of v over examples and positions.

Layout: channels last throughout (NWC/WIO for 1-D, NHWC/HWIO for 2-D) in the
forward and in both backward convolutions, as autodiff of the same forward
would use. Leading axes of z are example axes: they are flattened into one
batch axis for the convolutions and restored after.

``padding="same"`` is the notes' zero padding: l = (k_eff - 1) / 2 zeros on
each side, k_eff = d (k - 1) + 1 the dilated kernel size, so the output length
is m for stride 1 and ceil(m / s) for stride s. It needs an odd k_eff; an even
k_eff with ``"same"`` is refused (there is no symmetric padding) and the error
says to pass an explicit ``(low, high)`` pair, e.g. ``(k_eff // 2 - 1,
k_eff // 2)``, the padding XLA's "SAME" would choose for stride 1. For stride
s > 1 fnbp's "same" pads l on both sides, which can differ from XLA's "SAME"
(XLA pads as little as needed for ceil(m / s) outputs, and more on the high
side).

Precision: the forward convolution and both backward ones have a result in
the dtype of their operands, as autodiff of ``lax.conv_general_dilated``
gives: bf16/f16 convolutions produce their input dtype; the hardware
accumulates in float32. The forward runs in ``result_type(z, w)``, the
backward in the cotangent's dtype (``result_type(z, w, b)``); each result is
cast to its argument's dtype. The one reduction kept in float32 is the bias
cotangent ``db``, a sum over every example and position accumulated in at
least float32 and cast back (and a bias of a wider dtype than a half-precision
convolution is added in float32).

Modules: the settings' parsing, the residuals and the two backward
convolutions are in :mod:`fnbp.rules._conv_ops`; the per-example hooks
``sq_norms``, ``sq_grads``, ``grads`` and ``moments`` (Gram form over the
output positions or the materialized per-example filter gradient) in
:mod:`fnbp.rules.conv_per_example`, imported here for the rules' ``declare``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from fnbp.checking import check_finite
from fnbp.rules import _validate
from fnbp.rules._conv_ops import (
    _FWD_DN,
    _NAME,
    _SETTINGS,
    _W_MEANING,
    _Z_MEANING,
    ConvResiduals,
    Ints,
    Padding,
    _conv_dw,
    _conv_dz,
    _flat,
    _settings,
)
from fnbp.rules._dtypes import accumulation_dtype
from fnbp.rules._examples import normal, rng
from fnbp.rules._rule import declare, jit_static
from fnbp.rules.conv_per_example import CONV1D_HOOKS, CONV2D_HOOKS

# --- the convolutions ----------------------------------------------------------------
# conv1d_fwd/_bwd and conv2d_fwd/_bwd are jitted with their settings static: one
# compiled call each when used eagerly, inlined when the caller is itself jitted.


def _conv_fwd(
    n: int, z: Array, w: Array, b: Array | None, stride, padding, dilation
) -> tuple[Array, ConvResiduals]:
    """The forward convolution with its residuals; settings as the public functions take."""
    stride, padding, dilation = _settings(n, w.shape, stride, padding, dilation)
    out = jnp.result_type(z, w) if b is None else jnp.result_type(z, w, b)
    compute = jnp.result_type(z, w)
    u = _convolve(n, z, w, compute, stride, padding, dilation)
    return _with_bias(n, z, u, b, out, compute), ConvResiduals(z, w, b)


def _convolve(n: int, z: Array, w: Array, compute, stride: Ints, padding, dilation: Ints) -> Array:
    """conv(z, w) on z's examples flattened to (N, *spatial, C), in ``compute``.

    A result in the operands' dtype: bf16/f16 convolutions produce their
    input dtype; the hardware accumulates in float32. Settings parsed.
    """
    return jax.lax.conv_general_dilated(
        _flat(z, n).astype(compute),
        w.astype(compute),
        window_strides=stride,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=_FWD_DN[n],
    )


def _with_bias(n: int, z: Array, u: Array, b: Array | None, out, compute) -> Array:
    """u + b in ``out`` with z's leading example axes restored."""
    if b is not None:
        # In the conv's dtype; a bias of another dtype is added in at least float32.
        add = compute if out == compute else accumulation_dtype(compute)
        u = u.astype(add) + b.astype(add)
    return u.astype(out).reshape(z.shape[: z.ndim - n - 1] + u.shape[1:])


def _conv_bwd(
    n: int, res: ConvResiduals, v: Array, stride, padding, dilation
) -> tuple[Array, Array, Array | None]:
    z, w, b = res
    stride, padding, dilation = _settings(n, w.shape, stride, padding, dilation)
    compute = v.dtype
    vf = _flat(v, n)
    zf = _flat(z, n)
    dz = _conv_dz(z, w, vf, stride, padding, dilation)
    dz = dz.astype(z.dtype).reshape(z.shape)
    dw = _conv_dw(zf, w, vf, stride, padding, dilation).astype(w.dtype)
    db = None
    if b is not None:
        db = jnp.sum(vf, axis=tuple(range(n + 1)), dtype=accumulation_dtype(compute)).astype(
            b.dtype
        )
    return dz, dw, db


def _conv_jvp(n: int, res: ConvResiduals, t: tuple, stride, padding, dilation) -> Array:
    z, w, b = res
    t_z, t_w, t_b = (tuple(t) + (None, None, None))[:3]
    stride, padding, dilation = _settings(n, w.shape, stride, padding, dilation)
    out = jnp.result_type(z, w) if b is None else jnp.result_type(z, w, b)
    compute = jnp.result_type(z, w)
    terms = []
    if t_z is not None:
        terms.append(_convolve(n, t_z, w, compute, stride, padding, dilation))
    if t_w is not None:
        terms.append(_convolve(n, z, t_w, compute, stride, padding, dilation))
    if terms:
        u = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    else:
        shape = jax.eval_shape(lambda: _convolve(n, z, w, compute, stride, padding, dilation)).shape
        u = jnp.zeros(shape, compute)
    return _with_bias(n, z, u, t_b if b is not None else None, out, compute)


def _validate_conv(n: int, z, w, b, stride, padding, dilation):
    fn = _NAME[n]
    z = _validate.float_array(fn, "z", z)
    w = _validate.float_array(fn, "w", w)
    _validate.require_ndim(fn, "w", w, n + 2, _W_MEANING[n])
    _validate.require_min_ndim(fn, "z", z, n + 1, _Z_MEANING[n])
    C, C2 = w.shape[n], w.shape[n + 1]
    if z.shape[-1] != C:
        raise ValueError(
            f"{fn}: z has {z.shape[-1]} channels (last axis, z.shape={z.shape}) but w "
            f"expects C={C} (w.shape={w.shape} is {_W_MEANING[n]}); pass z with shape "
            f"{_Z_MEANING[n][:-2]}{C}) or w with C={z.shape[-1]}"
        )
    if min(w.shape) < 1:
        raise ValueError(f"{fn}: w has an empty axis, w.shape={w.shape}")
    if b is not None:
        b = _validate.float_array(fn, "b", b)
        if b.shape != (C2,):
            raise ValueError(
                f"{fn}: b must have shape ({C2},) to match w.shape="
                f"{w.shape} (C2={C2} output channels), got b.shape={b.shape}"
            )
        check_finite(fn, "b", b)
    stride, pads, dilation = _settings(n, w.shape, stride, padding, dilation)
    spatial = z.shape[z.ndim - n - 1 : z.ndim - 1]
    for i in range(n):
        k_eff = dilation[i] * (w.shape[i] - 1) + 1
        padded = spatial[i] + pads[i][0] + pads[i][1]
        if padded < k_eff:
            axis = "" if n == 1 else f" along {'HW'[i]}"
            raise ValueError(
                f"{fn}: the kernel{axis} (size {w.shape[i]}, dilated size {k_eff}) is "
                f"longer than the padded input (size {spatial[i]} + padding {pads[i]} = "
                f"{padded}), z.shape={z.shape}, w.shape={w.shape}; use a smaller kernel "
                f"or dilation, more padding, or padding='same'"
            )
    check_finite(fn, "z", z)
    check_finite(fn, "w", w)
    return z, w, b, stride, pads, dilation


# --- Conv1D (7.48-7.50) --------------------------------------------------------------


@jit_static(*_SETTINGS)
def conv1d_fwd(
    z: Array,
    w: Array,
    b: Array | None = None,
    *,
    stride: int | Ints = 1,
    padding: Padding = "same",
    dilation: int | Ints = 1,
) -> tuple[Array, ConvResiduals]:
    """Forward pass of :func:`conv1d` with its residuals (settings as in conv1d)."""
    return _conv_fwd(1, z, w, b, stride, padding, dilation)


@jit_static(*_SETTINGS)
def conv1d_bwd(
    res: ConvResiduals,
    v: Array,
    *,
    stride: int | Ints = 1,
    padding: Padding = "same",
    dilation: int | Ints = 1,
) -> tuple[Array, Array, Array | None]:
    """B[Conv1D, .]: map v (..., m', C2) to (dz, dw, db), each as a convolution.

    ``dz = Q^T v`` (the transposed convolution: v dilated by the stride,
    correlated with the flipped kernel), shape (..., m, C); ``dw[j, c, c2] =
    sum over examples and i of zpad[s i + d j, c] v[i, c2]``, one convolution
    over all examples, shape (k, C, C2); ``db = sum of v`` over examples and
    positions, shape (C2,), or ``None`` without a bias. The static settings
    are the forward's.

    Precision: ``dz`` and ``dw`` are convolutions in v's dtype with results in
    that dtype (bf16/f16 convolutions produce their input dtype; the hardware
    accumulates in float32); ``db`` is summed in at least float32 and cast
    back to b's dtype.
    """
    return _conv_bwd(1, res, v, stride, padding, dilation)


@jit_static(*_SETTINGS)
def conv1d_jvp(
    res: ConvResiduals,
    t: tuple,
    *,
    stride: int | Ints = 1,
    padding: Padding = "same",
    dilation: int | Ints = 1,
) -> Array:
    """F[Conv1D, .]: the tangents (t_z, t_w, t_b) to u's, conv(t_z, w) + conv(z, t_w) + t_b.

    The mirror of :func:`conv1d_bwd`: Conv1D is bilinear in (z, w) plus the
    bias (eqs. 7.48-7.50), so its change is the forward convolution applied
    to each tangent with the other argument fixed, ``Q t_z`` and the same
    correlation of z with the filters t_w, plus t_b broadcast over examples
    and positions. ``None`` tangents (an absent bias, an argument held fixed)
    add nothing. Precision as the forward pass: convolutions in
    ``result_type(z, w)`` with results in that dtype, the output in
    ``result_type(z, w, b)``.
    """
    return _conv_jvp(1, res, t, stride, padding, dilation)


def conv1d(
    z: Array,
    w: Array,
    b: Array | None = None,
    *,
    stride: int = 1,
    padding: Padding = "same",
    dilation: int = 1,
) -> Array:
    """Conv1D: the notes' 1-D convolution (eqs. 7.48-7.50), channels last.

    ``u[i, c2] = b[c2] + sum_{j, c} w[j, c, c2] zpad[s i + d j, c]``: a
    cross-correlation (the kernel is not flipped), as eq. 7.48 with
    ``zpad`` the zero-padded z. For stride 1 and ``padding="same"`` it is
    Conv1D-S, equal to Q z with the banded matrix Q of eq. 7.49. Leading axes
    of z are example axes; the parameter cotangents are summed over them.
    Gradient from :func:`conv1d_bwd`.

    Args:
      z: input, shape (..., m, C), floating.
      w: filters, shape (k, C, C2), floating.
      b: bias, shape (C2,), or ``None``.
      stride: int s >= 1 (static).
      padding: ``"same"`` (default: (k_eff - 1) / 2 zeros on each side, the
        notes' zero padding; needs an odd dilated kernel size k_eff = d (k - 1)
        + 1, even sizes are refused), ``"valid"`` (none), an int p (p zeros on
        each side) or a ``(low, high)`` pair (static).
      dilation: int d >= 1, spacing between kernel taps (static).

    Returns:
      u of shape (..., m', C2), m' = floor((m + low + high - k_eff) / s) + 1,
      dtype ``result_type(z, w, b)``. The convolution runs in
      ``result_type(z, w)`` with a result of that dtype: bf16/f16
      convolutions produce their input dtype; the hardware accumulates in
      float32.

    Raises:
      ValueError: w not 3-D, channel mismatch, b not (C2,), stride or dilation
        < 1, negative padding, "same" with an even dilated kernel, or a kernel
        longer than the padded input.
      TypeError: a non-floating array or a malformed setting.
    """
    z, w, b, stride, padding, dilation = _validate_conv(1, z, w, b, stride, padding, dilation)
    return CONV1D.apply(z, w, b, stride=stride, padding=padding, dilation=dilation)


def _conv_reference(z, w, b, stride, padding, dilation):
    """Plain ``lax.conv_general_dilated`` with the same settings (no custom rule)."""
    n = w.ndim - 2
    stride, pads, dilation = _settings(n, w.shape, stride, padding, dilation)
    lead = z.shape[: z.ndim - n - 1]
    u = jax.lax.conv_general_dilated(
        _flat(z, n), w, stride, pads, rhs_dilation=dilation, dimension_numbers=_FWD_DN[n]
    )
    u = u.reshape(lead + u.shape[1:])
    return u if b is None else u + b


def _conv1d_reference(z, w, b=None, *, stride=1, padding="same", dilation=1):
    return _conv_reference(z, w, b, stride, padding, dilation)


def _conv_args(spatial, kernel):
    def make(key, dtype):
        gen = rng(key)
        return (
            normal(gen, (2,) + spatial + (2,), dtype),
            normal(gen, kernel + (2, 3), dtype),
            normal(gen, (3,), dtype),
        )

    return make


CONV1D = declare(
    conv1d,
    conv1d_fwd,
    conv1d_bwd,
    jvp=conv1d_jvp,
    reference=_conv1d_reference,
    examples={
        "conv1d": _conv_args((9,), (3,)),
        "conv1d(s2, p(1,2), d2)": (
            _conv_args((9,), (3,)),
            {"stride": 2, "padding": (1, 2), "dilation": 2},
        ),
    },
    equations=("7.48", "7.49", "7.50"),
    kink="none: linear.",
    family="conv",
    hooks=CONV1D_HOOKS,
)


# --- Conv2D (7.51) ---------------------------------------------------------------------


@jit_static(*_SETTINGS)
def conv2d_fwd(
    z: Array,
    w: Array,
    b: Array | None = None,
    *,
    stride: int | Ints = 1,
    padding: Padding = "same",
    dilation: int | Ints = 1,
) -> tuple[Array, ConvResiduals]:
    """Forward pass of :func:`conv2d` with its residuals.

    Settings as in :func:`conv2d`; the residuals are the arguments z, w and b
    (:class:`ConvResiduals`), all that both backward convolutions need.
    """
    return _conv_fwd(2, z, w, b, stride, padding, dilation)


@jit_static(*_SETTINGS)
def conv2d_bwd(
    res: ConvResiduals,
    v: Array,
    *,
    stride: int | Ints = 1,
    padding: Padding = "same",
    dilation: int | Ints = 1,
) -> tuple[Array, Array, Array | None]:
    """B[Conv2D, .]: map v (..., H', W', C2) to (dz, dw, db), each as a convolution.

    As :func:`conv1d_bwd` over two spatial axes: ``dz`` (..., H, W, C) is the
    transposed convolution of v with the flipped kernel; ``dw`` (kh, kw, C, C2)
    one convolution of z with v over all examples; ``db`` (C2,) the sum of v.
    Precision as in :func:`conv1d_bwd`: bf16/f16 convolutions produce their
    input dtype; the hardware accumulates in float32; ``db`` sums in float32.
    """
    return _conv_bwd(2, res, v, stride, padding, dilation)


@jit_static(*_SETTINGS)
def conv2d_jvp(
    res: ConvResiduals,
    t: tuple,
    *,
    stride: int | Ints = 1,
    padding: Padding = "same",
    dilation: int | Ints = 1,
) -> Array:
    """F[Conv2D, .]: the tangents (t_z, t_w, t_b) to u's, conv(t_z, w) + conv(z, t_w) + t_b.

    As :func:`conv1d_jvp` over two spatial axes (eq. 7.51): each tangent
    through the forward convolution with the other argument fixed, plus t_b;
    ``None`` tangents add nothing; precision as the forward pass.
    """
    return _conv_jvp(2, res, t, stride, padding, dilation)


def conv2d(
    z: Array,
    w: Array,
    b: Array | None = None,
    *,
    stride: int | Ints = 1,
    padding: Padding = "same",
    dilation: int | Ints = 1,
) -> Array:
    """Conv2D (eq. 7.51), channels last: a 2-D cross-correlation of z with w.

    ``u[i1, i2, c2] = b[c2] + sum_{j1, j2, c} w[j1, j2, c, c2]
    zpad[s1 i1 + d1 j1, s2 i2 + d2 j2, c]``. Leading axes of z are example
    axes; the parameter cotangents are summed over them. Gradient from
    :func:`conv2d_bwd`.

    Args:
      z: input, shape (..., H, W, C), floating.
      w: filters, shape (kh, kw, C, C2), floating.
      b: bias, shape (C2,), or ``None``.
      stride: int >= 1 or (sh, sw) (static).
      padding: ``"same"`` (default; (k_eff - 1) / 2 zeros on each side of each
        axis, needs odd dilated kernel sizes), ``"valid"``, an int for every
        side, or two per-axis entries ``(ph, pw)`` each ``"same"``,
        ``"valid"``, an int or a ``(low, high)`` pair, e.g. ``((0, 1), 2)``
        (static). A pair of ints ``(1, 2)`` means 1 on both sides of H and 2 on
        both sides of W.
      dilation: int >= 1 or (dh, dw) (static).

    Returns:
      u of shape (..., H', W', C2), dtype ``result_type(z, w, b)``. As in
      :func:`conv1d`, bf16/f16 convolutions produce their input dtype; the
      hardware accumulates in float32.

    Raises:
      ValueError, TypeError: as :func:`conv1d`, with w 4-D (kh, kw, C, C2).
    """
    z, w, b, stride, padding, dilation = _validate_conv(2, z, w, b, stride, padding, dilation)
    return CONV2D.apply(z, w, b, stride=stride, padding=padding, dilation=dilation)


def _conv2d_reference(z, w, b=None, *, stride=1, padding="same", dilation=1):
    return _conv_reference(z, w, b, stride, padding, dilation)


CONV2D = declare(
    conv2d,
    conv2d_fwd,
    conv2d_bwd,
    jvp=conv2d_jvp,
    reference=_conv2d_reference,
    examples={
        "conv2d": _conv_args((7, 6), (3, 3)),
        "conv2d(s2, valid)": (_conv_args((7, 6), (3, 2)), {"stride": 2, "padding": "valid"}),
    },
    equations=("7.51",),
    kink="none: linear.",
    family="conv",
    hooks=CONV2D_HOOKS,
)
