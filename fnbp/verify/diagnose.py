"""The verifier's diagnoses: what a failing row most likely means, and where an error came from.

A number says *that* B is wrong; these say *how*, when the evidence is clear:

- ``off by a constant factor c``: got = c want on every entry that matters;
- ``sign flipped where z < 0``: got = want where z >= 0 and -want where z < 0;
  ``right magnitude, wrong sign at some entries``: |got| = |want| otherwise;
- ``the cotangents of t and y look swapped``: two arguments of one shape,
  each holding the other's cotangent;
- ``not linear in v`` / ``B(0) != 0``: from the property rows;
- ``NaN at index i``: a NaN in B where the oracle has a number;
- an exception: one row, with the file:line in the user's code that raised
  (or, when JAX itself rejected the rule's output, the line of the bwd rule)
  and fnbp's own account of a cotangent of the wrong shape or dtype.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import sysconfig
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

_FACTOR_AGREE = 1e-3  # got / want within this (relative) of one constant: a factor
_SIGNIFICANT = 1e-6  # entries with |want| above this fraction of max |want| count


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    scale = max(float(np.abs(b).max(initial=0.0)), float(np.abs(a).max(initial=0.0)))
    return bool(np.all(np.abs(a - b) <= rtol * scale + 1e-300))


def constant_factor(got: np.ndarray, want: np.ndarray, rtol: float) -> float | None:
    """The constant c with got = c want on every significant entry, else None."""
    if got.shape != want.shape or not np.all(np.isfinite(got)) or not np.all(np.isfinite(want)):
        return None
    big = np.abs(want) > _SIGNIFICANT * float(np.abs(want).max(initial=0.0))
    if big.sum() < 2:
        return None
    ratios = got[big] / want[big]
    c = float(np.median(ratios))
    if not math.isfinite(c) or abs(c - 1.0) <= 10 * rtol:
        return None
    agree = max(_FACTOR_AGREE, 10 * rtol)
    if np.all(np.abs(ratios - c) <= agree * abs(c) + 1e-300) and _close(got, c * want, agree):
        return c
    return None


def sign_flip_where_negative(
    got: np.ndarray, want: np.ndarray, z: np.ndarray | None, rtol: float
) -> bool:
    """got = want where z >= 0 and -want where z < 0 (with both parts present)."""
    if z is None or z.shape != got.shape or got.shape != want.shape:
        return False
    negative = z < 0
    if not negative.any() or negative.all():
        return False
    flipped = np.where(negative, -want, want)
    scale = float(np.abs(want[negative]).max(initial=0.0))
    return (
        scale > 0
        and _close(got, flipped, max(10 * rtol, 1e-6))
        and not _close(got, want, max(10 * rtol, 1e-6))
    )


def _explain_leaf(got: np.ndarray, want: np.ndarray, rtol: float) -> str:
    c = constant_factor(got, want, rtol)
    if c is None:
        return ""
    if c == 0 or abs(c) < 1e-12:
        return "returns zeros: a dropped cotangent or term"
    if abs(c + 1) <= 1e-3:
        return "sign flipped (factor -1)"
    return f"off by a constant factor {c:.4g}"


def explain(
    got: Sequence[np.ndarray],
    want: Sequence[np.ndarray],
    points: Sequence[np.ndarray | None],
    leaves: Sequence[str],
    rtol: float,
) -> str:
    """A diagnosis of one argument's failing comparison, or ``""``.

    ``got``/``want`` are that argument's cotangent leaves, one per (leaf,
    cotangent drawn); ``points`` the primal leaf each belongs to (for the
    sign test), or None; ``leaves`` the leaf's path ("" for an array).
    """
    got = [_f64(g) for g in got]
    want = [_f64(w) for w in want]
    if any(g.shape != w.shape for g, w in zip(got, want)) or any(
        (np.isnan(g) & ~np.isnan(w)).any() for g, w in zip(got, want)
    ):
        return ""  # a shape error or "NaN at index ..." says it already
    flat = [np.concatenate([x.ravel() for x in xs]) for xs in (got, want)]
    text = _explain_leaf(flat[0], flat[1], rtol) if got else ""
    if text:
        return text
    paths = list(dict.fromkeys(leaves))
    if len(paths) > 1:  # a pytree argument: which leaf is wrong, and how
        found = []
        for path in paths:
            g = np.concatenate([x.ravel() for x, q in zip(got, leaves) if q == path])
            w = np.concatenate([x.ravel() for x, q in zip(want, leaves) if q == path])
            if not _close(g, w, max(10 * rtol, 1e-6)):
                found.append((path, _explain_leaf(g, w, rtol)))
        if len(found) == 1 and found[0][1]:
            return f"{found[0][0]} {found[0][1]}"
    if got and all(sign_flip_where_negative(g, w, z, rtol) for g, w, z in zip(got, want, points)):
        return "sign flipped where z < 0"
    if got and _close(np.abs(flat[0]), np.abs(flat[1]), max(10 * rtol, 1e-6)):
        return "right magnitude, wrong sign at some entries (a lost sign or abs)"
    return ""


def swapped(
    got: Sequence[Sequence[np.ndarray]], want: Sequence[Sequence[np.ndarray]], rtol: float
) -> bool:
    """Two arguments whose cotangents look exchanged: got[a] = want[b], got[b] = want[a]."""
    a, b = (np.concatenate([_f64(x).ravel() for x in leaves]) for leaves in got)
    wa, wb = (np.concatenate([_f64(x).ravel() for x in leaves]) for leaves in want)
    if a.shape != wb.shape or b.shape != wa.shape or _close(wa, wb, 1e-6):
        return False
    agree = max(10 * rtol, 1e-6)
    return _close(a, wb, agree) and _close(b, wa, agree)


# --- exceptions -------------------------------------------------------------------

_NOT_USER = (
    os.path.dirname(jax.__file__) + os.sep,
    os.path.dirname(np.__file__) + os.sep,
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    sysconfig.get_paths()["stdlib"] + os.sep,
)


def _jaxlib_dir() -> str | None:
    try:
        import jaxlib
    except ImportError:  # pragma: no cover - jax needs jaxlib
        return None
    return os.path.dirname(jaxlib.__file__) + os.sep


def raised_at(err: BaseException) -> str:
    """file:line of the innermost frame in the caller's code that the error passed through."""
    skip = _NOT_USER + tuple(d for d in (_jaxlib_dir(),) if d)
    seen, chain = set(), []
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        chain.append(link)
        link = link.__cause__ or link.__context__
    for e in chain:
        frames = [
            fr
            for fr in traceback.extract_tb(e.__traceback__)
            if not os.path.abspath(fr.filename).startswith(skip) and not fr.filename.startswith("<")
        ]
        if frames:
            return f"{frames[-1].filename}:{frames[-1].lineno}"
    return ""


def _unwrap(f: Callable[..., Any]) -> tuple[Callable[..., Any], tuple, dict]:
    args: tuple = ()
    kwargs: dict[str, Any] = {}
    while isinstance(f, functools.partial):
        args, kwargs = f.args + args, {**f.keywords, **kwargs}
        f = f.func
    return f, args, kwargs


def rule_location(f: Callable[..., Any]) -> str:
    """file:line of f's bwd rule (a ``jax.custom_vjp``), or ``""``."""
    f = _unwrap(f)[0]
    bwd = getattr(f, "bwd", None)
    code = getattr(inspect.unwrap(bwd), "__code__", None) if callable(bwd) else None
    return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else ""


def cotangent_mismatch(
    f: Callable[..., Any], kwargs: dict, args: tuple, v: Any, names: Sequence[str]
) -> tuple[str, str]:
    """fnbp's own account of a bwd output that does not match the primal arguments.

    Calls f's fwd and bwd rules (shapes only, nothing runs) and compares each
    cotangent with its argument. Returns (argument name, account), or
    ``("", "")`` when f is not a ``jax.custom_vjp`` function or everything
    matches.
    """
    f, bound_args, bound_kwargs = _unwrap(f)
    fwd, bwd, fun = (getattr(f, name, None) for name in ("fwd", "bwd", "fun"))
    if not (callable(fwd) and callable(bwd) and callable(fun)):
        return "", ""
    try:
        full = inspect.signature(fun).bind(*bound_args, *args, **{**bound_kwargs, **kwargs})
        full.apply_defaults()
        primal = tuple(full.args)
        nondiff = tuple(getattr(f, "nondiff_argnums", ()) or ())
        diff = [k for k in range(len(primal)) if k not in nondiff]
        offset = len(bound_args)

        def run():
            _, res = fwd(*primal)
            return bwd(*[primal[k] for k in nondiff], res, v)

        cts = jax.eval_shape(run)
    except Exception:  # noqa: BLE001 - no account; the exception row says what happened
        return "", ""
    if not isinstance(cts, (tuple, list)):
        return "", (
            f"the bwd rule returns a {type(cts).__name__}, not a tuple of one "
            f"cotangent per argument"
        )
    if len(cts) != len(diff):
        return "", (
            f"the bwd rule returns {len(cts)} cotangent(s) for {len(diff)} "
            f"differentiable argument(s)"
        )
    for k, ct in zip(diff, cts):
        if ct is None or k < offset:
            continue
        name = names[k - offset] if k - offset < len(names) else f"arg{k - offset}"
        for leaf_ct, leaf in zip(
            jax.tree_util.tree_leaves(ct), jax.tree_util.tree_leaves(primal[k])
        ):
            shape = tuple(np.shape(leaf))
            if tuple(leaf_ct.shape) != shape:
                return name, (
                    f"the bwd rule returns a cotangent of shape "
                    f"{tuple(leaf_ct.shape)} for {name} of shape {shape}; "
                    f"return one of shape {shape}"
                )
    return "", ""


def error_note(err: BaseException, where: str, account: str = "") -> str:
    """The note of an exception row: fnbp's account, the location, then the message."""
    message = " ".join(str(err).split())
    if len(message) > 1200:
        message = message[:1200] + " ..."
    parts = [account] if account else []
    if where:
        parts.append(f"at {where}")
    parts.append(f"raised {type(err).__name__}: {message}")
    return "; ".join(parts)
