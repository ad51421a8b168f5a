"""Probe points: where bugs hide that the caller's own arguments do not reach.

A wrong rule is often right almost everywhere: a derivative wrong only at
exactly 0, an exp(x)/(1 + exp(x)) that overflows for large x, a variance
E[z^2] - E[z]^2 that cancels at a large mean, a tie in a max. Random
arguments never hit those points, so :func:`fnbp.check_vjp` derives its own
from the caller's arguments (every floating leaf of two or more entries; a
scalar is left alone, since it is usually a setting such as eps or gamma):

- ``zeros``: a third of the entries set to exactly 0;
- ``kink z=c``: a third of the entries set to a constant c at which the
  reference (or f) compares or clips (found in its jaxpr: ``z > c``,
  ``max(z, c)``, ``clip``);
- ``signs``: the signs of about half the entries flipped;
- ``large x10^k``: every entry times the largest 10^k (k <= 8) at which the
  reference and its cotangents, evaluated in the working dtype, stay finite
  and below a tenth of the dtype's largest value (without a reference: f's
  output);
- ``offset +m``: every entry plus m = spread * rtol / (10 eps), the largest
  mean the working dtype can carry while a correct rule still meets the
  tolerance (the spread is the entries' standard deviation): about 4.5e4
  spreads in float64, 83 in float32;
- ``ties``: entries rounded to a grid of half a spread, so that many are
  equal (only for functions with a max-like operation).

Every probe has the caller's shapes and dtypes, so the compiled programs of
the check are reused (no compile). At each probe B is compared with the
reference (float64; at a kink or tie its convention decides), or without a
reference, with finite differences. Below float64 the tolerance at a probe
also allows the reference's own round-off in the working dtype (computed
there, one more compile): a correct rule cannot do better than that, and a
cancellation E[z^2] - E[z]^2 does far worse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from fnbp.verify.arguments import _Arg, _as_dtype

PROBES: tuple[str, ...] = ("zeros", "kinks", "signs", "large", "offset", "ties")
"""Every probe kind :func:`fnbp.check_vjp` derives (all by default)."""

_COMPARISONS = frozenset({"gt", "ge", "lt", "le", "max", "min", "clamp"})
_MAX_LIKE = frozenset(
    {
        "max",
        "reduce_max",
        "argmax",
        "reduce_window_max",
        "cummax",
        "sort",
        "min",
        "reduce_min",
        "argmin",
        "reduce_window_min",
        "select_and_scatter_add",
        "select_and_gather_add",
    }
)
_MAX_KINKS = 2
_LARGEST_POWER = 8


def _literals(jaxpr: core.Jaxpr, consts: set, names: set) -> None:
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        if eqn.primitive.name in _COMPARISONS:
            for var in eqn.invars:
                value = getattr(var, "val", None)
                if value is not None and np.ndim(value) == 0:
                    try:
                        number = float(value)
                    except (TypeError, ValueError):
                        continue
                    if math.isfinite(number) and number != 0.0:
                        consts.add(number)
        for sub in core.jaxprs_in_params(eqn.params):
            _literals(sub, consts, names)


def inspect_function(fn: Callable[..., Any], args: tuple) -> tuple[list[float], bool]:
    """The constants fn compares its values with (its likely kinks), and whether it has a max.

    Traces fn (nothing is compiled). A function that cannot be traced gives
    ``([], False)``.
    """
    try:
        jaxpr = jax.make_jaxpr(fn)(*args)
    except Exception:  # noqa: BLE001 - probing is best effort; the check itself reports errors
        return [], False
    consts: set = set()
    names: set = set()
    _literals(jaxpr.jaxpr, consts, names)
    return sorted(consts, key=abs)[:_MAX_KINKS], bool(names & _MAX_LIKE)


def _spread(x: np.ndarray) -> float:
    s = float(np.std(x)) if x.size else 0.0
    return s if s > 0 else max(1.0, float(np.abs(x).max(initial=0.0)))


def _map(
    infos: Sequence[_Arg], diff: Sequence[int], fn: Callable[[np.ndarray, Any], np.ndarray | None]
) -> tuple | None:
    """The arguments with fn applied to every probed leaf (float64 in, cast back)."""
    changed, out = False, []
    for i, info in enumerate(infos):
        if i not in diff:
            out.append(info.rebuild(info.leaves))
            continue
        values = []
        for k in info.floats:
            leaf = info.leaves[k]
            x = np.asarray(leaf, dtype=np.float64)
            new = fn(x, leaf.dtype) if x.size >= 2 else None
            changed |= new is not None
            values.append(leaf if new is None else _as_dtype(new, leaf.dtype))
        out.append(info.with_floats(values))
    return tuple(out) if changed else None


def fixed_probes(
    infos: Sequence[_Arg],
    diff: Sequence[int],
    kinks: Sequence[float],
    max_like: bool,
    kinds: Sequence[str],
    rng: np.random.Generator,
) -> list[tuple[str, tuple]]:
    """The probes that need no evaluation: zeros, kinks, signs, ties."""
    points = []

    def subset(x: np.ndarray) -> np.ndarray:
        mask = rng.random(x.shape) < 1 / 3
        mask.flat[int(rng.integers(x.size))] = True
        return mask

    if "zeros" in kinds:
        points.append(("zeros", _map(infos, diff, lambda x, d: np.where(subset(x), 0.0, x))))
    if "kinks" in kinds:

        def to_kink(c: float) -> Callable[[np.ndarray, Any], np.ndarray]:
            return lambda x, d: np.where(subset(x), c, x)

        for c in kinks:
            points.append((f"kink z={c:g}", _map(infos, diff, to_kink(c))))
    if "signs" in kinds:

        def flip(x, d):
            sign = np.where(rng.random(x.shape) < 0.5, -1.0, 1.0)
            if np.all(x >= 0) or np.all(x <= 0):
                sign.flat[::2] = -1.0
            return x * sign

        points.append(("signs", _map(infos, diff, flip)))
    if "ties" in kinds and max_like:

        def tie(x, d):
            grid = _spread(x) / 2
            return np.round(x / grid) * grid

        points.append(("ties", _map(infos, diff, tie)))
    return [(name, p) for name, p in points if p is not None]


def scaled(infos: Sequence[_Arg], diff: Sequence[int], factor: float) -> tuple | None:
    """Every probed leaf times ``factor``."""
    return _map(infos, diff, lambda x, d: x * factor)


def offset(infos: Sequence[_Arg], diff: Sequence[int], rtol: float) -> tuple[str, tuple] | None:
    """Every probed leaf plus spread * rtol / (10 eps) of its dtype."""
    shifts = []

    def shift(x, dtype):
        m = _spread(x) * rtol / (10 * float(jnp.finfo(dtype).eps))
        shifts.append(m)
        return x + m

    point = _map(infos, diff, shift)
    if point is None:
        return None
    return f"offset +{max(shifts):.2g}", point


def large_factors(dtype: Any) -> list[float]:
    """Candidate factors 10^k, largest first, that stay below the dtype's range."""
    top = min(_LARGEST_POWER, int(math.log10(float(jnp.finfo(dtype).max))) // 2)
    return [10.0**k for k in range(top, 0, -1)]


def fits(values: Sequence[Any], dtype: Any) -> bool:
    """Every value finite and below a tenth of the dtype's largest value."""
    limit = float(jnp.finfo(dtype).max) / 10
    for value in values:
        x = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(x)) or float(np.abs(x).max(initial=0.0)) > limit:
            return False
    return True
