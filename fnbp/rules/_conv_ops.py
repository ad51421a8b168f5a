"""The convolutions' shared pieces: settings, residuals and the backward convolutions.

Used by the rules Conv1D and Conv2D (:mod:`fnbp.rules.conv`, where the
math and the layouts are explained) and by their per-example hooks
(:mod:`fnbp.rules.conv_per_example`): the parsing of stride, padding and
dilation, the residuals, and the two backward convolutions B[Conv, z] and
B[Conv, w]. The window taps (one strided slice per kernel or window
offset) serve the per-example hooks' patches and the pooling rules
(:mod:`fnbp.rules.pooling`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import jax
from jax import Array

from fnbp.rules._settings import ints_at_least
from fnbp.rules._settings import is_int as _is_int

Padding = str | int | Sequence
Pairs = tuple[tuple[int, int], ...]
Ints = tuple[int, ...]

# Channels-last dimension numbers, one set per number of spatial axes.
# Forward: u = conv(z, w).
_FWD_DN = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}
# Input cotangent: conv(v, flip(w)) with w's channel roles swapped (read O as
# w's C axis, I as its C2 axis), so the kernel is never transposed in memory.
_DZ_DN = {1: ("NWC", "WOI", "NWC"), 2: ("NHWC", "HWOI", "NHWC")}
# Weight cotangent: conv(z, v) with z's channels as the batch and the examples
# as the contracted features; the output lands in w's (k..., C, C2) layout.
_DW_DN = {1: ("CWN", "IWO", "WNC"), 2: ("CHWN", "IHWO", "HWNC")}

_NAME = {1: "conv1d", 2: "conv2d"}
_W_MEANING = {1: "(k, C, C2)", 2: "(kh, kw, C, C2)"}
_Z_MEANING = {1: "(..., m, C)", 2: "(..., H, W, C)"}


# --- settings ------------------------------------------------------------------------


def _per_axis_ints(fn: str, name: str, value, n: int) -> Ints:
    """stride / dilation: one int >= 1 or one per spatial axis."""
    per_axis = "an int" if n == 1 else f"an int or a tuple of {n} ints (one per spatial axis)"
    return ints_at_least(
        value,
        n,
        1,
        f"{fn}: {name} must be {per_axis}, got {name}={value!r}",
        lambda _: (
            f"{fn}: {name} must be >= 1 in every spatial axis, got {name}={value!r}; "
            f"use {name}=1 for the notes' convolution"
        ),
    )


def _axis_padding(fn: str, spec, k_eff: int, axis: str) -> tuple[int, int]:
    if isinstance(spec, str):
        mode = spec.lower()
        if mode == "valid":
            return (0, 0)
        if mode == "same":
            if k_eff % 2 == 0:
                raise ValueError(
                    f"{fn}: padding='same' needs an odd dilated kernel size along "
                    f"{axis} (the notes' k = 2l + 1 with l zeros on each side), got "
                    f"k_eff = dilation * (k - 1) + 1 = {k_eff}; fnbp refuses to pad "
                    f"asymmetrically on its own: pass padding=({k_eff // 2 - 1}, "
                    f"{k_eff // 2}) for XLA's 'SAME' choice, or use an odd kernel"
                )
            return ((k_eff - 1) // 2, (k_eff - 1) // 2)
        raise ValueError(
            f"{fn}: padding must be 'same', 'valid', an int or a "
            f"(low, high) pair, got padding={spec!r}"
        )
    low, high = ints_at_least(
        spec,
        2,
        0,
        f"{fn}: padding along {axis} must be 'same', 'valid', an int or a (low, high) pair "
        f"of ints, got {spec!r}",
        lambda pair: (
            f"{fn}: padding must be >= 0 (zeros added), got {pair} along {axis}; "
            f"crop the input instead of padding negatively"
        ),
    )
    return low, high


def _padding(fn: str, padding: Padding, k_eff: Ints) -> Pairs:
    """Normalize ``padding`` to one (low, high) pair per spatial axis.

    1-D: 'same', 'valid', an int, a (low, high) pair or a 1-tuple of one.
    2-D: 'same', 'valid', an int for both axes, or a sequence of 2 per-axis
    entries, each 'same', 'valid', an int or a (low, high) pair. Idempotent.
    """
    n = len(k_eff)
    axes = ("the length axis",) if n == 1 else ("H", "W")
    if isinstance(padding, str) or _is_int(padding):
        specs = (padding,) * n
    elif (
        n == 1
        and isinstance(padding, (tuple, list))
        and len(padding) == 2
        and all(_is_int(x) for x in padding)
    ):
        specs = (padding,)
    elif isinstance(padding, (tuple, list)) and len(padding) == n:
        specs = tuple(padding)
    elif n == 1:
        raise TypeError(
            f"{fn}: padding must be 'same', 'valid', an int or a (low, high) "
            f"pair of ints, got padding={padding!r}"
        )
    else:
        raise TypeError(
            f"{fn}: padding must be 'same', 'valid', an int, or {n} per-axis entries "
            f"(each 'same', 'valid', an int or a (low, high) pair), got padding={padding!r}"
        )
    return tuple(_axis_padding(fn, s, k, a) for s, k, a in zip(specs, k_eff, axes))


def _settings(
    n: int, w_shape: tuple[int, ...], stride, padding, dilation
) -> tuple[Ints, Pairs, Ints]:
    fn = _NAME[n]
    stride = _per_axis_ints(fn, "stride", stride, n)
    dilation = _per_axis_ints(fn, "dilation", dilation, n)
    k_eff = tuple(d * (k - 1) + 1 for d, k in zip(dilation, w_shape[:n]))
    return stride, _padding(fn, padding, k_eff), dilation


# --- window taps -----------------------------------------------------------------------


def _offsets(window: Ints):
    """Window offsets in row-major order: (0, 0), (0, 1), ..., (kh - 1, kw - 1)."""
    return itertools.product(*(range(k) for k in window))


def _tap(zf: Array, offset: Ints, stride: Ints, out: Ints) -> Array:
    """z[:, s i + j, :] for every output position i: the entries at window offset j."""
    n = len(offset)
    start = (0, *offset, 0)
    limit = (
        zf.shape[0],
        *(j + s * (o - 1) + 1 for j, s, o in zip(offset, stride, out)),
        zf.shape[-1],
    )
    return jax.lax.slice(zf, start, limit, (1, *stride, 1)) if n else zf


# --- residuals and the backward convolutions ------------------------------------------


def _flat(z: Array, n: int) -> Array:
    """(..., *spatial, C) -> (N, *spatial, C): leading axes as one example axis."""
    return z.reshape((-1,) + z.shape[z.ndim - n - 1 :])


class ConvResiduals(NamedTuple):
    """What B[Conv, .] needs: the input z (for B[Conv, w]) and the kernel w (for Q^T v).

    ``b`` is kept only so the rule knows whether there is a bias and its dtype.
    """

    z: Array
    w: Array
    b: Array | None


_SETTINGS = ("stride", "padding", "dilation")


def _conv_dz(z: Array, w: Array, v: Array, stride: Ints, padding: Pairs, dilation: Ints) -> Array:
    """B[Conv, z](v) = Q^T v as a convolution of the stride-dilated v with flip(w)."""
    n = w.ndim - 2
    m = z.shape[z.ndim - n - 1 : z.ndim - 1]
    out = v.shape[1 : 1 + n]
    pads = []
    for i in range(n):
        k_eff = dilation[i] * (w.shape[i] - 1) + 1
        low = k_eff - 1 - padding[i][0]
        high = m[i] + padding[i][0] - 1 - stride[i] * (out[i] - 1)
        pads.append((low, high))
    w_flipped = jax.lax.rev(w.astype(v.dtype), tuple(range(n)))
    return jax.lax.conv_general_dilated(
        v,
        w_flipped,
        window_strides=(1,) * n,
        padding=pads,
        lhs_dilation=stride,
        rhs_dilation=dilation,
        dimension_numbers=_DZ_DN[n],
    )


def _conv_dw(zf: Array, w: Array, v: Array, stride: Ints, padding: Pairs, dilation: Ints) -> Array:
    """B[Conv, w](v) = sum over examples, positions of zpad[s i + d j] v[i]^T, one conv."""
    n = w.ndim - 2
    m = zf.shape[1 : 1 + n]
    out = v.shape[1 : 1 + n]
    pads = []
    for i in range(n):
        # Pad so that exactly k kernel taps fit: the high side may crop (negative).
        used = dilation[i] * (w.shape[i] - 1) + stride[i] * (out[i] - 1) + 1
        pads.append((padding[i][0], used - m[i] - padding[i][0]))
    return jax.lax.conv_general_dilated(
        zf.astype(v.dtype),
        v,
        window_strides=dilation,
        padding=pads,
        rhs_dilation=stride,
        dimension_numbers=_DW_DN[n],
    )
