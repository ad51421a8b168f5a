"""Average and max pooling over the spatial axes of channels-last inputs, with rules.

A pooling module slides a window of size k (1-D) or (kh, kw) (2-D) with stride
s over the spatial axes of z, channel by channel, without padding ("valid")::

    avg:  u[i, c] = (1/|K|) sum_{j in K} z[s i + j, c]
    max:  u[i, c] = max_{j in K} z[s i + j, c]

Per example z is (m, C) for 1-D pooling and (H, W, C) for 2-D pooling; any
leading axes are example axes. The number of spatial axes is given by
``window``: an int or a 1-tuple pools one axis (the one before the channels),
a 2-tuple pools two. So ``max_pool(z, (2, 2))`` is the usual 2 x 2 pooling of
an image batch (N, H, W, C), while ``max_pool(z, 2)`` pools only the W axis.

Backward functions, written out (never autodiff of the forward). Each input
entry receives the cotangent of every window it belongs to:

    B[avg, z](v)[t] = (1/|K|) sum over windows i containing t of v[i]
    B[max, z](v)[t] = sum over windows i whose selected maximum is t of v[i]

Both are computed as a sum over the |K| window offsets j: the cotangent is
scattered to the strided positions s i + j by one ``lax.pad`` with interior
padding s - 1 per offset (for max, masked to the windows whose selected
offset is j). No dense matrix, no scatter of indices.

Forward passes: max uses ``lax.reduce_window`` (max), and the forward rule
also records, per output, the offset of the selected maximum (an int8, the
only residual). avg sums the |K| strided slices z[s i + j] instead of a
``reduce_window`` sum: XLA on CPU then fuses a preceding element-wise module
(ReLU) into the same loop; with ``reduce_window`` it materialized a
broadcast zero tensor of the input's size and the whole conv-net step ran
1.7x slower (``benchmarks/bench_conv.py --pool avg``).

Tie convention for max: when several entries of a window share the maximum,
the whole cotangent of that window goes to the *first* of them in row-major
window order (smallest row offset, then smallest column offset), the
convention of XLA's select-and-scatter (and so of autodiff through
``lax.reduce_window`` with ``max``). A NaN in a window makes that output NaN
and its cotangent goes to offset 0.

The forward and backward bodies are jitted with the window and stride static:
one compiled call each when used eagerly, inlined under an outer ``jax.jit``.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from fnbp import _validate
from fnbp._dtypes import accumulation_dtype
from fnbp.checking import check_finite

Window = Union[int, Sequence[int]]
Ints = tuple[int, ...]


# --- settings ------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _window(fn: str, window) -> Ints:
    if _is_int(window):
        window = (int(window),)
    elif (isinstance(window, (tuple, list)) and len(window) in (1, 2)
          and all(_is_int(x) for x in window)):
        window = tuple(int(x) for x in window)
    else:
        raise TypeError(f"{fn}: window must be an int (1-D pooling) or a tuple of 1 or "
                        f"2 ints (1-D or 2-D pooling), got window={window!r}")
    if min(window) < 1:
        raise ValueError(f"{fn}: window must be >= 1 in every spatial axis, got "
                         f"window={window}")
    return window


def _stride(fn: str, stride, window: Ints) -> Ints:
    n = len(window)
    if stride is None:
        return window
    if _is_int(stride):
        stride = (int(stride),) * n
    elif (isinstance(stride, (tuple, list)) and len(stride) == n
          and all(_is_int(x) for x in stride)):
        stride = tuple(int(x) for x in stride)
    else:
        raise TypeError(f"{fn}: stride must be None (= window), an int or a tuple of "
                        f"{n} ints (one per pooled axis), got stride={stride!r}")
    if min(stride) < 1:
        raise ValueError(f"{fn}: stride must be >= 1 in every spatial axis, got "
                         f"stride={stride}; use stride=None for non-overlapping windows")
    return stride


def _validate_pool(fn: str, z, window, stride) -> tuple[Array, Ints, Ints]:
    _validate.require_float(fn, "z", z)
    window = _window(fn, window)
    stride = _stride(fn, stride, window)
    n = len(window)
    meaning = "(..., m, C) for 1-D pooling" if n == 1 else "(..., H, W, C) for 2-D pooling"
    _validate.require_min_ndim(fn, "z", z, n + 1, meaning)
    z = jnp.asarray(z)
    spatial = z.shape[z.ndim - n - 1:z.ndim - 1]
    if any(k > m for k, m in zip(window, spatial)):
        raise ValueError(
            f"{fn}: window={window} is larger than the input's spatial size {spatial} "
            f"(z.shape={z.shape}, channels last); use a window of at most {spatial}"
        )
    check_finite(fn, "z", z)
    return z, window, stride


# --- shared pieces -------------------------------------------------------------------


def _flat(z: Array, n: int) -> Array:
    return z.reshape((-1,) + z.shape[z.ndim - n - 1:])


def _unflat(u: Array, like_shape: tuple[int, ...], n: int) -> Array:
    return u.reshape(like_shape[:len(like_shape) - n - 1] + u.shape[1:])


def _reduce_window(zf: Array, init, op, window: Ints, stride: Ints) -> Array:
    return jax.lax.reduce_window(zf, init, op, (1, *window, 1), (1, *stride, 1), "VALID")


def _offsets(window: Ints):
    """Window offsets in row-major order: (0, 0), (0, 1), ..., (kh - 1, kw - 1)."""
    return itertools.product(*(range(k) for k in window))


def _out_shape(zf: Array, window: Ints, stride: Ints) -> Ints:
    return tuple((m - k) // s + 1 for m, k, s in zip(zf.shape[1:-1], window, stride))


def _tap(zf: Array, offset: Ints, stride: Ints, out: Ints) -> Array:
    """z[:, s i + j, :] for every output position i: the entries at window offset j."""
    n = len(offset)
    start = (0, *offset, 0)
    limit = (zf.shape[0], *(j + s * (o - 1) + 1 for j, s, o in zip(offset, stride, out)),
             zf.shape[-1])
    return jax.lax.slice(zf, start, limit, (1, *stride, 1)) if n else zf


def _place(x: Array, offset: Ints, stride: Ints, spatial: Ints) -> Array:
    """The transpose of :func:`_tap`: put x[i] at position s i + j, zeros elsewhere."""
    config = [(0, 0, 0)]
    for j, s, o, m in zip(offset, stride, x.shape[1:-1], spatial):
        config.append((j, m - j - s * (o - 1) - 1, s - 1))
    config.append((0, 0, 0))
    return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def _spatial_of(res_shape: Array) -> Ints:
    return tuple(res_shape.shape[:-1])


def _shape_record(zf: Array, n: int) -> Array:
    """An empty array whose shape records z's spatial size (no memory)."""
    return jnp.zeros(zf.shape[1:1 + n] + (0,), zf.dtype)


# --- average pooling ---------------------------------------------------------------------


class AvgPoolResiduals(NamedTuple):
    """B[avg, z] needs only z's spatial shape and dtype: an empty array records them."""

    z_shape: Array


@functools.partial(jax.jit, static_argnums=(1, 2))
def _avg_forward(z: Array, window: Ints, stride: Ints) -> Array:
    n = len(window)
    acc = accumulation_dtype(z)
    zf = _flat(z, n).astype(acc)
    out = _out_shape(zf, window, stride)
    total = functools.reduce(jnp.add, (_tap(zf, j, stride, out) for j in _offsets(window)))
    return _unflat((total / math.prod(window)).astype(z.dtype), z.shape, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _avg_pool(z: Array, window: Ints, stride: Ints) -> Array:
    return _avg_forward(z, window, stride)


def avg_pool_fwd(z: Array, window: Window, stride: Window | None = None
                 ) -> tuple[Array, AvgPoolResiduals]:
    """Forward pass of :func:`avg_pool` with its residuals."""
    window = _window("avg_pool", window)
    return _avg_fwd(z, window, _stride("avg_pool", stride, window))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _avg_fwd(z: Array, window: Ints, stride: Ints) -> tuple[Array, AvgPoolResiduals]:
    n = len(window)
    return _avg_forward(z, window, stride), AvgPoolResiduals(_shape_record(_flat(z, n), n))


def avg_pool_bwd(window: Window, stride: Window | None, res: AvgPoolResiduals,
                 v: Array) -> tuple[Array]:
    """B[avg, z](v): every entry gets v / |K| from each window that holds it.

    Computed as the sum over window offsets j of v / |K| placed at the
    positions s i + j (``lax.pad`` with interior padding s - 1).
    """
    window = _window("avg_pool", window)
    return (_avg_bwd(window, _stride("avg_pool", stride, window), res, v),)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _avg_bwd(window: Ints, stride: Ints, res: AvgPoolResiduals, v: Array) -> Array:
    n = len(window)
    spatial = _spatial_of(res.z_shape)
    vf = _flat(v, n)
    share = (vf.astype(accumulation_dtype(vf)) / math.prod(window))
    dz = sum(_place(share, j, stride, spatial) for j in _offsets(window))
    dz = dz.astype(res.z_shape.dtype)
    return dz.reshape(v.shape[:v.ndim - n - 1] + dz.shape[1:])


_avg_pool.defvjp(avg_pool_fwd, avg_pool_bwd)


def avg_pool(z: Array, window: Window, stride: Window | None = None) -> Array:
    """Average pooling: the mean of each window, channel by channel, no padding.

    Args:
      z: input, channels last: (..., m, C) for 1-D pooling, (..., H, W, C) for
        2-D pooling; leading axes are example axes.
      window: k (an int or (k,)) for 1-D pooling, (kh, kw) for 2-D (static).
      stride: None (default: the window, non-overlapping), an int for every
        pooled axis, or one per pooled axis (static).

    Returns:
      u of shape (..., m', C) or (..., H', W', C), m' = floor((m - k) / s) + 1,
      z's dtype. Gradient from :func:`avg_pool_bwd`.

    Raises:
      ValueError: window or stride < 1, a window larger than the input, z with
        too few axes.
      TypeError: a non-floating z or a malformed window or stride.
    """
    z, window, stride = _validate_pool("avg_pool", z, window, stride)
    return _avg_pool(z, window, stride)


# --- max pooling -----------------------------------------------------------------------------


class MaxPoolResiduals(NamedTuple):
    """``selected``: for each output, the window offset of its (first) maximum.

    An int8 index (int32 for windows of more than 127 entries), like ReLU's
    mask; ``z_shape`` is an empty array recording z's spatial shape and dtype.
    """

    selected: Array
    z_shape: Array


def _max_forward(zf: Array, window: Ints, stride: Ints) -> Array:
    # A concrete numpy init value makes this reduce_window_max, not a generic reduction.
    return _reduce_window(zf, np.array(-np.inf, zf.dtype), jax.lax.max, window, stride)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _max_primal(z: Array, window: Ints, stride: Ints) -> Array:
    n = len(window)
    return _unflat(_max_forward(_flat(z, n), window, stride), z.shape, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(z: Array, window: Ints, stride: Ints) -> Array:
    return _max_primal(z, window, stride)


def max_pool_fwd(z: Array, window: Window, stride: Window | None = None
                 ) -> tuple[Array, MaxPoolResiduals]:
    """Forward pass of :func:`max_pool`; residuals are the selected offsets."""
    window = _window("max_pool", window)
    return _max_fwd(z, window, _stride("max_pool", stride, window))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _max_fwd(z: Array, window: Ints, stride: Ints) -> tuple[Array, MaxPoolResiduals]:
    n = len(window)
    zf = _flat(z, n)
    u = _max_forward(zf, window, stride)
    out = u.shape[1:1 + n]
    index_dtype = jnp.int8 if math.prod(window) <= 127 else jnp.int32
    # Walk the offsets backwards so the first (row-major) maximum wins ties.
    offsets = list(_offsets(window))
    selected = jnp.zeros(u.shape, index_dtype)
    for number in reversed(range(len(offsets))):
        hit = _tap(zf, offsets[number], stride, out) == u
        selected = jnp.where(hit, jnp.asarray(number, index_dtype), selected)
    return _unflat(u, z.shape, n), MaxPoolResiduals(selected, _shape_record(zf, n))


def max_pool_bwd(window: Window, stride: Window | None, res: MaxPoolResiduals,
                 v: Array) -> tuple[Array]:
    """B[max, z](v): each window's cotangent goes to its selected (first) maximum.

    Computed as the sum over window offsets j of ``where(selected == j, v, 0)``
    placed at the positions s i + j (``lax.pad`` with interior padding s - 1).
    """
    window = _window("max_pool", window)
    return (_max_bwd(window, _stride("max_pool", stride, window), res, v),)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _max_bwd(window: Ints, stride: Ints, res: MaxPoolResiduals, v: Array) -> Array:
    n = len(window)
    spatial = _spatial_of(res.z_shape)
    vf = _flat(v, n)
    selected = res.selected.reshape(vf.shape)
    zero = jnp.zeros((), vf.dtype)
    dz = sum(_place(jnp.where(selected == number, vf, zero), j, stride, spatial)
             for number, j in enumerate(_offsets(window)))
    dz = dz.astype(res.z_shape.dtype)
    return dz.reshape(v.shape[:v.ndim - n - 1] + dz.shape[1:])


_max_pool.defvjp(max_pool_fwd, max_pool_bwd)


def max_pool(z: Array, window: Window, stride: Window | None = None) -> Array:
    """Max pooling: the maximum of each window, channel by channel, no padding.

    Tie convention: the cotangent of a window goes to its first maximum in
    row-major window order (see the module docstring).

    Args:
      z: input, channels last: (..., m, C) for 1-D pooling, (..., H, W, C) for
        2-D pooling; leading axes are example axes.
      window: k (an int or (k,)) for 1-D pooling, (kh, kw) for 2-D (static).
      stride: None (default: the window, non-overlapping), an int for every
        pooled axis, or one per pooled axis (static).

    Returns:
      u of shape (..., m', C) or (..., H', W', C), z's dtype. Gradient from
      :func:`max_pool_bwd`.

    Raises:
      ValueError: window or stride < 1, a window larger than the input, z with
        too few axes.
      TypeError: a non-floating z or a malformed window or stride.
    """
    z, window, stride = _validate_pool("max_pool", z, window, stride)
    return _max_pool(z, window, stride)
