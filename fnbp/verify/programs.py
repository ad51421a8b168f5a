"""The verifier's compiled programs: f bound to its settings, B, second order, batches."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from fnbp._compile import FAST_CPU_COMPILE, fast_compile_options

TRANSFORMS: tuple[str, ...] = (
    "eager",
    "jit",
    "vmap",
    "jit(vmap)",
    "vmap(inputs)",
    "jit(vmap(inputs))",
    "2nd order",
)
"""Every transform :func:`check_vjp` runs B under (all by default)."""


def _x64():
    """float64 for the oracles, also when the caller has not enabled it."""
    return contextlib.nullcontext() if jax.config.jax_enable_x64 else jax.enable_x64(True)


Cotangents = tuple  # per differentiable argument, the cotangents of its floating leaves
Selection = tuple  # per differentiable argument: (its position, its floating leaves)


class _Bound:
    """f with its static keyword settings, hashable so that jit reuses programs.

    Two checks of the same function with the same settings (another dtype,
    another seed) then share the compiled float64 oracles.
    """

    def __init__(self, f: Callable[..., Any], kwargs: Mapping[str, Any]):
        self.f, self.kwargs = f, tuple(sorted(kwargs.items()))
        self._key: int | None
        try:
            self._key = hash((self.f, self.kwargs))
        except TypeError:  # unhashable settings: this object is its own key
            self._key = None
        self.__name__ = getattr(f, "__name__", None) or type(f).__name__

    def __call__(self, *args: Any) -> Any:
        return self.f(*args, **dict(self.kwargs))

    def __hash__(self) -> int:
        return id(self) if self._key is None else self._key

    def __eq__(self, other: object) -> bool:
        if self._key is None or not isinstance(other, _Bound) or other._key is None:
            return self is other
        return self.f is other.f and self.kwargs == other.kwargs


def _select(sel: Selection, cts: Sequence[Any]) -> Cotangents:
    """Per differentiable argument, the cotangents of its floating leaves."""
    return tuple(tuple(jax.tree_util.tree_leaves(cts[i])[k] for k in floats) for i, floats in sel)


def _B(fk: Callable[..., Any], sel: Selection, args: tuple, v: Any) -> Cotangents:
    """B[f, args](v) by f's own rule, through ``jax.vjp``."""
    _, pull = jax.vjp(fk, *args)
    return _select(sel, pull(v))


def _second(fk: Callable[..., Any], sel: Selection, args: tuple, v0: Any, u: Any) -> Cotangents:
    """grad_z <B[f, z](v0), u>: the vjp of z -> B[f, z](v0), reverse over reverse."""
    return _B(lambda *z: _B(fk, sel, z, v0), sel, args, u)


def _core(fk: Callable[..., Any], sel: Selection, args: tuple, v: Any):
    """f(*args), the vjp's primal output (the fwd rule's) and B(v)."""
    primal, pull = jax.vjp(fk, *args)
    return fk(*args), primal, _select(sel, pull(v))


def _batched_v(fk, sel, args, V):
    return jax.vmap(functools.partial(_B, fk, sel), in_axes=(None, 0))(args, V)


def _batched_inputs(fk, sel, A, V):
    return jax.vmap(functools.partial(_B, fk, sel))(A, V)


FAST_COMPILE: Mapping[str, Any] = FAST_CPU_COMPILE
"""XLA options of the verifier's programs on CPU (speed only): small programs
run a few times each, so compiling is nearly all their cost. Options the
installed jaxlib does not know are skipped; see :mod:`fnbp._compile`."""


@functools.cache
def _compiled(
    fn: Callable[..., Any], backend: str, options: tuple[tuple[str, Any], ...]
) -> Callable[..., Any]:
    return jax.jit(
        fn, static_argnums=(0, 1), compiler_options=fast_compile_options(backend, dict(options))
    )


def jit_fast(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``jax.jit(fn)`` with its first two arguments static, compiled for speed.

    Used for the verifier's own programs (and by ``fnbp check`` for the
    catalog's example arguments); see :data:`FAST_COMPILE`.
    """
    return _compiled(fn, jax.default_backend(), tuple(sorted(FAST_COMPILE.items())))
