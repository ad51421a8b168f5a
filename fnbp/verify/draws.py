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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

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


def draw(factory: Callable[..., Any], key: jax.Array, dtype: Any,
         sizes: tuple[int, ...] | None = None) -> tuple:
    """One call of the factory, as a tuple of positional arguments."""
    try:
        made = factory(key, dtype) if sizes is None else factory(key, dtype, sizes=sizes)
    except Exception as err:
        at = "" if sizes is None else f" with sizes={sizes}"
        raise ValueError(f"check_vjp: the argument factory {getattr(factory, '__name__', '')}"
                         f"(key, {jnp.dtype(dtype).name}){at} raised {type(err).__name__}: "
                         f"{err}") from err
    return tuple(made) if isinstance(made, (tuple, list)) else (made,)


def check_factory(f: Callable[..., Any], factory: Callable[..., Any], dtype: Any, draws: int,
                  kinds: Sequence[str], settings: dict) -> VJPReport:
    """check_vjp over the draws of a factory, as one report."""
    from fnbp.verify.check import check_vjp   # the entry point calls back in here

    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"check_vjp: draws must be an int >= 1, got {draws!r}")
    dtype = jnp.dtype("float64" if dtype is None else dtype)
    wide = dtype == jnp.float64 and not jax.config.jax_enable_x64
    with jax.enable_x64(True) if wide else contextlib.nullcontext():
        seed = settings["seed"]
        first = check_vjp(f, *draw(factory, jax.random.PRNGKey(seed), dtype), probes=kinds,
                          **settings)
        transforms = settings["transforms"]
        quick = dict(settings, transforms=("jit",) if "jit" in transforms else transforms[:1])
        extra = [(f"key {k + 1}", jax.random.PRNGKey(seed + k), None) for k in range(1, draws)]
        sizes = distinct_sizes(default_sizes(factory))
        if sizes is not None:
            extra.append((f"sizes {sizes}", jax.random.PRNGKey(seed), sizes))
        rows, notes = list(first.rows), list(first.notes)
        for label, key, at in extra:
            try:
                report = check_vjp(f, *draw(factory, key, dtype, at), probes=False, **quick)
            except ValueError as err:   # f rejects the new shapes: a finding of its own
                if at is None:
                    raise
                rows.append(_raised_row(first, label, err))
                continue
            rows += [dataclasses.replace(row, probe=label) for row in report.rows]
            notes += [n for n in report.notes if n not in notes]
    return dataclasses.replace(first, rows=tuple(rows), notes=tuple(notes))


def _raised_row(first: VJPReport, label: str, err: Exception) -> VJPCheck:
    tol = first.rows[0] if first.rows else None
    return VJPCheck("(all)", "jit", "runs", float("nan"), float("nan"), "",
                    tol.rtol if tol else 0.0, tol.atol if tol else 0.0, False,
                    " ".join(str(err).split()), label,
                    f"f fails at distinct sizes: {type(err.__cause__ or err).__name__}")
