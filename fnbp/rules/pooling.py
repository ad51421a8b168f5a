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

``avg_pool_fwd``/``_bwd`` and ``max_pool_fwd``/``_bwd`` are jitted with the
window and stride static: one compiled call each when used eagerly, inlined
under an outer ``jax.jit``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from fnbp.checking import check_finite
from fnbp.rules import _validate
from fnbp.rules._conv_ops import _offsets, _tap
from fnbp.rules._dtypes import accumulation_dtype
from fnbp.rules._examples import normal, rng
from fnbp.rules._rule import declare, jit_static
from fnbp.rules._settings import ints_at_least

Window = int | Sequence[int]
Ints = tuple[int, ...]


# --- settings ------------------------------------------------------------------------


def _window(fn: str, value) -> Ints:
    n = len(value) if isinstance(value, (tuple, list)) and len(value) in (1, 2) else 1
    return ints_at_least(
        value,
        n,
        1,
        f"{fn}: window must be an int (1-D pooling) or a tuple of 1 or 2 ints (1-D or "
        f"2-D pooling), got window={value!r}",
        lambda window: f"{fn}: window must be >= 1 in every spatial axis, got window={window}",
    )


def _stride(fn: str, value, window: Ints) -> Ints:
    if value is None:
        return window
    n = len(window)
    return ints_at_least(
        value,
        n,
        1,
        f"{fn}: stride must be None (= window), an int or a tuple of {n} ints (one per "
        f"pooled axis), got stride={value!r}",
        lambda stride: (
            f"{fn}: stride must be >= 1 in every spatial axis, got "
            f"stride={stride}; use stride=None for non-overlapping windows"
        ),
    )


def _validate_pool(fn: str, z, window, stride) -> tuple[Array, Ints, Ints]:
    z = _validate.float_array(fn, "z", z)
    window = _window(fn, window)
    stride = _stride(fn, stride, window)
    n = len(window)
    meaning = "(..., m, C) for 1-D pooling" if n == 1 else "(..., H, W, C) for 2-D pooling"
    _validate.require_min_ndim(fn, "z", z, n + 1, meaning)
    spatial = z.shape[z.ndim - n - 1 : z.ndim - 1]
    if any(k > m for k, m in zip(window, spatial)):
        raise ValueError(
            f"{fn}: window={window} is larger than the input's spatial size {spatial} "
            f"(z.shape={z.shape}, channels last); use a window of at most {spatial}"
        )
    check_finite(fn, "z", z)
    return z, window, stride


# --- shared pieces -------------------------------------------------------------------


def _flat(z: Array, n: int) -> Array:
    return z.reshape((-1,) + z.shape[z.ndim - n - 1 :])


def _unflat(u: Array, like_shape: tuple[int, ...], n: int) -> Array:
    return u.reshape(like_shape[: len(like_shape) - n - 1] + u.shape[1:])


def _reduce_window(zf: Array, init, op, window: Ints, stride: Ints) -> Array:
    return jax.lax.reduce_window(zf, init, op, (1, *window, 1), (1, *stride, 1), "VALID")


def _out_shape(zf: Array, window: Ints, stride: Ints) -> Ints:
    return tuple((m - k) // s + 1 for m, k, s in zip(zf.shape[1:-1], window, stride))


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
    return jnp.zeros(zf.shape[1 : 1 + n] + (0,), zf.dtype)


# --- average pooling ---------------------------------------------------------------------


class AvgPoolResiduals(NamedTuple):
    """B[avg, z] needs only z's spatial shape and dtype: an empty array records them."""

    z_shape: Array


def _settings(fn: str, window, stride) -> tuple[Ints, Ints]:
    window = _window(fn, window)
    return window, _stride(fn, stride, window)


def _prepared(fn: str, x: Array, window, stride) -> tuple[Ints, Ints, int, Array]:
    """Parsed window and stride, the number n of pooled axes and x as (N, *spatial, C)."""
    window, stride = _settings(fn, window, stride)
    return window, stride, len(window), _flat(x, len(window))


def _cotangent(dz: Array, res_shape: Array, v: Array, n: int) -> Array:
    """dz (N, *spatial, C) in z's dtype with v's leading example axes."""
    dz = dz.astype(res_shape.dtype)
    return dz.reshape(v.shape[: v.ndim - n - 1] + dz.shape[1:])


_SETTINGS = ("window", "stride")


@jit_static(*_SETTINGS)
def avg_pool_fwd(
    z: Array, *, window: Window, stride: Window | None = None
) -> tuple[Array, AvgPoolResiduals]:
    """Forward pass of :func:`avg_pool` with its residuals."""
    window, stride, n, zf = _prepared("avg_pool", z, window, stride)
    za = zf.astype(accumulation_dtype(z))
    out = _out_shape(za, window, stride)
    total = functools.reduce(jnp.add, (_tap(za, j, stride, out) for j in _offsets(window)))
    u = _unflat((total / math.prod(window)).astype(z.dtype), z.shape, n)
    return u, AvgPoolResiduals(_shape_record(zf, n))


@jit_static(*_SETTINGS)
def avg_pool_bwd(
    res: AvgPoolResiduals, v: Array, *, window: Window, stride: Window | None = None
) -> tuple[Array]:
    """B[avg, z](v): every entry gets v / |K| from each window that holds it.

    Computed as the sum over window offsets j of v / |K| placed at the
    positions s i + j (``lax.pad`` with interior padding s - 1).
    """
    window, stride, n, vf = _prepared("avg_pool", v, window, stride)
    spatial = _spatial_of(res.z_shape)
    share = vf.astype(accumulation_dtype(vf)) / math.prod(window)
    dz = functools.reduce(jnp.add, (_place(share, j, stride, spatial) for j in _offsets(window)))
    return (_cotangent(dz, res.z_shape, v, n),)


def _pool_tangent(fn: str, t: tuple) -> Array:
    """The one tangent t_z; the residuals do not record z's example axes, so a
    ``None`` (which jax never passes here: z is floating) cannot become zeros."""
    (t_z,) = t
    if t_z is None:
        raise ValueError(
            f"{fn}_jvp: the tangent of z is None; pass zeros of z's shape for no change "
            f"(the residuals record only z's spatial shape, not its example axes)"
        )
    return t_z


@jit_static(*_SETTINGS)
def avg_pool_jvp(
    res: AvgPoolResiduals, t: tuple, *, window: Window, stride: Window | None = None
) -> Array:
    """F[avg, z](t) = avg_pool(t_z): the mean of each window of the tangent.

    avg pooling is linear, so its forward function is the pooling itself with
    the same window and stride (the sum of the |K| strided slices t_z[s i + j]
    in at least float32, divided by |K|), the transpose of :func:`avg_pool_bwd`.
    Output in z's dtype.
    """
    t_z = _pool_tangent("avg_pool", t)
    u, _ = avg_pool_fwd(t_z, window=window, stride=stride)
    return u.astype(res.z_shape.dtype)


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
    return AVG_POOL.apply(z, window=window, stride=stride)


def _pool_reference(z, window, stride, init, op):
    """Plain ``lax.reduce_window`` over the pooled axes (no custom rule)."""
    window, stride = _settings("pool", window, stride)
    n = len(window)
    return _unflat(_reduce_window(_flat(z, n), init, op, window, stride), z.shape, n)


def _avg_pool_reference(z, window, stride=None):
    size = math.prod(_window("avg_pool", window))
    return _pool_reference(z, window, stride, 0.0, jax.lax.add) / size


def _pool_args(key, dtype):
    return (normal(rng(key), (2, 6, 7, 3), dtype),)


AVG_POOL = declare(
    avg_pool,
    avg_pool_fwd,
    avg_pool_bwd,
    jvp=avg_pool_jvp,
    reference=_avg_pool_reference,
    examples=(_pool_args, {"window": (2, 2)}),
    kink="none: linear.",
    family="pooling",
)


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


@jit_static(*_SETTINGS)
def max_pool_fwd(
    z: Array, *, window: Window, stride: Window | None = None
) -> tuple[Array, MaxPoolResiduals]:
    """Forward pass of :func:`max_pool`; residuals are the selected offsets."""
    window, stride, n, zf = _prepared("max_pool", z, window, stride)
    u = _max_forward(zf, window, stride)
    out = u.shape[1 : 1 + n]
    index_dtype = jnp.int8 if math.prod(window) <= 127 else jnp.int32
    # Walk the offsets backwards so the first (row-major) maximum wins ties.
    offsets = list(_offsets(window))
    selected = jnp.zeros(u.shape, index_dtype)
    for number in reversed(range(len(offsets))):
        hit = _tap(zf, offsets[number], stride, out) == u
        selected = jnp.where(hit, jnp.asarray(number, index_dtype), selected)
    return _unflat(u, z.shape, n), MaxPoolResiduals(selected, _shape_record(zf, n))


@jit_static(*_SETTINGS)
def max_pool_bwd(
    res: MaxPoolResiduals, v: Array, *, window: Window, stride: Window | None = None
) -> tuple[Array]:
    """B[max, z](v): each window's cotangent goes to its selected (first) maximum.

    Computed as the sum over window offsets j of ``where(selected == j, v, 0)``
    placed at the positions s i + j (``lax.pad`` with interior padding s - 1).
    """
    window, stride, n, vf = _prepared("max_pool", v, window, stride)
    spatial = _spatial_of(res.z_shape)
    selected = res.selected.reshape(vf.shape)
    zero = jnp.zeros((), vf.dtype)
    dz = functools.reduce(
        jnp.add,
        (
            _place(jnp.where(selected == number, vf, zero), j, stride, spatial)
            for number, j in enumerate(_offsets(window))
        ),
    )
    return (_cotangent(dz, res.z_shape, v, n),)


@jit_static(*_SETTINGS)
def max_pool_jvp(
    res: MaxPoolResiduals, t: tuple, *, window: Window, stride: Window | None = None
) -> Array:
    """F[max, z](t): each window's tangent is that of its selected (first) maximum.

    ``u_t[i] = t_z[s i + j*(i)]`` with ``j*(i)`` the offset recorded in
    ``selected``, the same one :func:`max_pool_bwd` routes v to, so F and B
    are exact adjoints (the same tie convention). Computed as the sum over
    window offsets j of ``where(selected == j, t_z[s i + j], 0)``, the
    transpose of bwd's placement. Output in z's dtype.
    """
    t_z = _pool_tangent("max_pool", t)
    window, stride, n, tf = _prepared("max_pool", t_z, window, stride)
    selected = res.selected
    out = selected.shape[1 : 1 + n]
    zero = jnp.zeros((), tf.dtype)
    u = functools.reduce(
        jnp.add,
        (
            jnp.where(selected == number, _tap(tf, j, stride, out), zero)
            for number, j in enumerate(_offsets(window))
        ),
    )
    return _unflat(u.astype(res.z_shape.dtype), t_z.shape, n)


def max_pool(z: Array, window: Window, stride: Window | None = None) -> Array:
    """Max pooling: the maximum of each window, channel by channel, no padding.

    Tie convention: the cotangent of a window goes to its first maximum in
    row-major window order (see the module docstring).

    Args:
      z, window, stride: as :func:`avg_pool`.

    Returns:
      u of shape (..., m', C) or (..., H', W', C), z's dtype. Gradient from
      :func:`max_pool_bwd`.

    Raises:
      ValueError, TypeError: as :func:`avg_pool`.
    """
    z, window, stride = _validate_pool("max_pool", z, window, stride)
    return MAX_POOL.apply(z, window=window, stride=stride)


MAX_POOL = declare(
    max_pool,
    max_pool_fwd,
    max_pool_bwd,
    jvp=max_pool_jvp,
    reference=lambda z, window, stride=None: _pool_reference(
        z, window, stride, -jnp.inf, jax.lax.max
    ),
    examples={
        "max_pool": (_pool_args, {"window": (2, 2)}),
        "max_pool(3x3, s1)": (_pool_args, {"window": (3, 3), "stride": 1}),
    },
    kink="ties: the whole cotangent of a window goes to its first maximum in row-major "
    "order, as XLA's select-and-scatter.",
    family="pooling",
)
