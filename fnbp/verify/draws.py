"""A factory of arguments, drawn at several keys and at shapes with distinct sizes.

``check_vjp(f, args=factory)`` (and ``fnbp check``'s ``example_args``) asks
the factory ``factory(key, dtype)`` for arguments several times: at ``draws``
keys, and, where the factory takes a keyword ``sizes`` (a tuple of the sizes
it builds its shapes from), once with every size distinct. A rule that is
right only for square shapes (``v @ W`` where ``v @ W.T`` was meant) passes
every check at a square shape; the distinct-sizes draw catches it, by a
wrong result or by a shape error. Write the factory like this to get that
coverage::

    def mm_args(key, dtype, sizes=(4, 4, 4)):      # examples, features in, out
        n, m, k = sizes
        kz, kw, kb = jax.random.split(key, 3)
        return (jax.random.normal(kz, (n, m), dtype),
                jax.random.normal(kw, (k, m), dtype),
                jax.random.normal(kb, (k,), dtype))

The first draw gets the full check with the probes; the other draws are
checked under one transform (``jit`` when asked for), and their rows say
which draw they came from (``key 2``, ``sizes (4, 5, 6)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fnbp.verify.programs import jit_fast
from fnbp.verify.report import VJPCheck, VJPReport


def default_sizes(factory: Callable[..., Any]) -> tuple[int, ...] | None:
    """The default of the factory's ``sizes`` keyword, if it has one of ints."""
    try:
        param = inspect.signature(factory).parameters.get("sizes")
    except (TypeError, ValueError):
        return None
    if param is None or not isinstance(param.default, (tuple, list)):
        return None
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in param.default):
        return None
    return tuple(param.default)


def distinct_sizes(sizes: Sequence[int] | None) -> tuple[int, ...] | None:
    """``sizes`` with repeats bumped up until every size differs; None if none repeat."""
    if not sizes or len(set(sizes)) == len(sizes):
        return None
    out: list[int] = []
    for size in sizes:
        while size in out:
            size += 1
        out.append(size)
    return tuple(out)


def draw(
    factory: Callable[..., Any], key: jax.Array, dtype: Any, sizes: tuple[int, ...] | None = None
) -> tuple:
    """One call of the factory, as a tuple of positional arguments."""
    try:
        made = factory(key, dtype) if sizes is None else factory(key, dtype, sizes=sizes)
    except Exception as err:
        at = "" if sizes is None else f" with sizes={sizes}"
        raise ValueError(
            f"check_vjp: the argument factory {getattr(factory, '__name__', '')}"
            f"(key, {jnp.dtype(dtype).name}){at} raised {type(err).__name__}: "
            f"{err}"
        ) from err
    return tuple(made) if isinstance(made, (tuple, list)) else (made,)


def check_factory(
    f: Callable[..., Any],
    factory: Callable[..., Any],
    dtype: Any,
    draws: int,
    kinds: Sequence[str],
    settings: dict,
) -> VJPReport:
    """check_vjp over the draws of a factory, as one report."""
    from fnbp.verify.check import check_vjp  # the entry point calls back in here

    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"check_vjp: draws must be an int >= 1, got {draws!r}")
    dtype = jnp.dtype("float64" if dtype is None else dtype)
    wide = dtype == jnp.float64 and not jax.config.jax_enable_x64
    with jax.enable_x64(True) if wide else contextlib.nullcontext():
        seed = settings["seed"]
        first = check_vjp(
            f, *draw(factory, jax.random.PRNGKey(seed), dtype), probes=kinds, **settings
        )
        transforms = settings["transforms"]
        quick = dict(settings, transforms=("jit",) if "jit" in transforms else transforms[:1])
        extra: list[tuple[str, jax.Array, tuple[int, ...] | None]] = [
            (f"key {k + 1}", jax.random.PRNGKey(seed + k), None) for k in range(1, draws)
        ]
        sizes = distinct_sizes(default_sizes(factory))
        if sizes is not None:
            extra.append((f"sizes {sizes}", jax.random.PRNGKey(seed), sizes))
        rows, notes = list(first.rows), list(first.notes)
        for label, key, at in extra:
            try:
                report = check_vjp(f, *draw(factory, key, dtype, at), probes=False, **quick)
            except ValueError as err:  # f rejects the new shapes: a finding of its own
                if at is None:
                    raise
                rows.append(_raised_row(first, label, err))
                continue
            rows += [dataclasses.replace(row, probe=label) for row in report.rows]
            notes += [n for n in report.notes if n not in notes]
    return dataclasses.replace(first, rows=tuple(rows), notes=tuple(notes))


def _raised_row(first: VJPReport, label: str, err: Exception) -> VJPCheck:
    tol = first.rows[0] if first.rows else None
    return VJPCheck(
        "(all)",
        "jit",
        "runs",
        float("nan"),
        float("nan"),
        "",
        tol.rtol if tol else 0.0,
        tol.atol if tol else 0.0,
        False,
        " ".join(str(err).split()),
        label,
        f"f fails at distinct sizes: {type(err.__cause__ or err).__name__}",
    )


def _call_factory(make_args, dtype, key):
    return _as_tuple(make_args(key, dtype))


def example_args(
    make_args: Callable[..., Any], dtype: str, seed: int = 0, drawn: dict | None = None
) -> tuple:
    """Example arguments from a factory ``make_args(key, dtype)`` (a rule record's ``examples``).

    A factory that draws with ``jax.random`` runs once, in float64, as one
    fast-compiled program (eager random sampling compiles slowly, and would
    compile again for every dtype); at another dtype each argument is that
    draw cast to the dtype the factory gives it there (found by tracing the
    factory at that dtype, which compiles nothing). For factories that draw
    and then cast, this is exactly what they return. A factory that cannot be
    traced (the catalog's draw with NumPy, which compiles nothing), or whose
    arguments change structure with the dtype, is simply called.

    Args:
      make_args: the factory.
      dtype: the dtype name, e.g. ``"bfloat16"``.
      seed: seed of ``jax.random.PRNGKey``.
      drawn: a dict the caller keeps to reuse float64 draws across dtypes.

    Returns:
      The tuple of positional arguments.
    """
    import numpy as np

    key = jax.random.PRNGKey(seed)
    drawn = {} if drawn is None else drawn
    if (make_args, seed) not in drawn:
        try:
            drawn[make_args, seed] = jit_fast(_call_factory)(make_args, jnp.dtype("float64"), key)
        except Exception:  # cannot be traced: remembered, so it is tried once
            drawn[make_args, seed] = None
    base = drawn[make_args, seed]
    if base is None:
        return _as_tuple(make_args(key, jnp.dtype(dtype)))
    try:
        shape = jax.eval_shape(lambda k: _call_factory(make_args, jnp.dtype(dtype), k), key)
        treedef: jax.tree_util.PyTreeDef
        leaves, treedef = jax.tree_util.tree_flatten(base)
        wanted, wanted_def = jax.tree_util.tree_flatten(shape)
        if treedef != wanted_def or [x.shape for x in leaves] != [w.shape for w in wanted]:
            raise ValueError("the arguments change structure with the dtype")
        return treedef.unflatten(
            [
                x if x.dtype == w.dtype else jax.device_put(np.asarray(x).astype(w.dtype))
                for x, w in zip(leaves, wanted)
            ]
        )
    except Exception:  # a factory that cannot be traced at this dtype runs as it is
        return _as_tuple(make_args(key, jnp.dtype(dtype)))


def _as_tuple(made: Any) -> tuple:
    return tuple(made) if isinstance(made, (tuple, list)) else (made,)
