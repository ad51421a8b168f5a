"""The verifier's arguments: names, leaves, dtypes, and the host-side array helpers."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.verify.report import _f64


@dataclass(frozen=True)
class _Arg:
    """One top-level positional argument: its name, leaves and floating leaves."""

    name: str
    treedef: Any
    leaves: tuple[jax.Array, ...]
    paths: tuple[str, ...]
    floats: tuple[int, ...]  # indices of the floating leaves

    def rebuild(self, leaves: Sequence[Any]) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))

    def with_floats(self, values: Sequence[Any]) -> Any:
        leaves = list(self.leaves)
        for index, value in zip(self.floats, values):
            leaves[index] = value
        return self.rebuild(leaves)


def _argument_names(f: Callable[..., Any], n: int) -> list[str]:
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):
        params = []
    names: list[str] = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            names += [f"{p.name}[{k}]" for k in range(n - len(names))]
            break
    names = names[:n]
    return names + [f"arg{k}" for k in range(len(names), n)]


def _as_leaf(fn: str, name: str, leaf: Any) -> jax.Array:
    if isinstance(leaf, (bool, str, bytes)) or not (
        isinstance(leaf, (int, float, np.ndarray, np.generic, jax.Array))
    ):
        raise TypeError(
            f"{fn}: argument {name!r} holds a {type(leaf).__name__} leaf, not an array; "
            f"pass static settings through static_kwargs={{...}} or functools.partial"
        )
    if isinstance(leaf, (np.ndarray, np.generic)):
        leaf = _put(leaf)
    elif not isinstance(leaf, jax.Array):
        leaf = jnp.asarray(leaf)  # a Python number: weakly typed, as JAX treats it
    if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
        raise TypeError(
            f"{fn}: argument {name!r} is complex; only real floating and "
            f"integer arguments are supported"
        )
    return leaf


def _describe_arg(name: str, arg: Any) -> _Arg:
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(arg)
    leaves = tuple(_as_leaf("check_vjp", name, leaf) for _, leaf in with_paths)
    paths = tuple(jax.tree_util.keystr(path) for path, _ in with_paths)
    floats = tuple(k for k, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.floating))
    return _Arg(name, treedef, leaves, paths, floats)


def _coarsest(dtypes: Sequence[Any]) -> np.dtype:
    return max((jnp.dtype(d) for d in dtypes), key=lambda d: float(jnp.finfo(d).eps))


# --- host-side arrays (numpy casts and stacks compile nothing) --------------------


def _put(x: np.ndarray | np.generic) -> jax.Array:
    # jax.device_put compiles nothing; jnp.asarray compiles a program per shape.
    return jax.device_put(x)


def _as_dtype(x: np.ndarray, dtype: Any) -> jax.Array:
    # The cast happens in numpy, so no XLA program is compiled for it.
    return _put(np.asarray(x).astype(np.dtype(dtype)))


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: _put(np.stack([np.asarray(x) for x in xs])), *trees)


def _to64(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: _put(_f64(x)), tree)


def _fetch(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


def _unstack(tree: Any, n: int) -> list[Any]:
    tree = _fetch(tree)
    return [jax.tree_util.tree_map(lambda x, j=j: x[j], tree) for j in range(n)]
