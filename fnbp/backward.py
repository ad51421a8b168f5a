"""B[f, args]: the backward function of a rule, callable on its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core


def _uses_custom_vjp(jaxpr: core.Jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if "custom_vjp" in eqn.primitive.name:
            return True
        for sub in core.jaxprs_in_params(eqn.params):
            if _uses_custom_vjp(sub):
                return True
    return False


def _none_if_float0(ct: Any) -> Any:
    leaves = jax.tree_util.tree_leaves(ct)
    if leaves and all(getattr(x, "dtype", None) == jax.dtypes.float0 for x in leaves):
        return None
    return ct


def backward(f: Callable[..., Any], *args: Any) -> Callable[[Any], tuple[Any, ...]]:
    """Return B[f, args], the function ``v -> cotangents`` of ``f`` at ``args``.

    The cotangents are computed by ``f``'s own hand-written ``jax.custom_vjp``
    rule (for a composite ``f``, by the rules of the pieces it is built from),
    through ``jax.vjp``. Works for fnbp's rules and for any user function
    written with ``jax.custom_vjp``.

    Example::

        B = fnbp.backward(fnbp.mm, z, W, b)
        dz, dW, db = B(v)          # W^T v, v z^T, v   (eqs. 7.63-7.66)

    Args:
      f: a function whose derivative is defined by ``jax.custom_vjp``.
      *args: the point z at which B is taken (positional arguments of f).

    Returns:
      A function of the cotangent ``v`` (shaped like ``f(*args)``) returning a
      tuple with one cotangent per argument; ``None`` for an argument that has
      none (integer labels, ``None``).

    Raises:
      TypeError: ``f`` is not callable.
      ValueError: ``f`` contains no ``jax.custom_vjp`` rule, so its derivative
        would come from autodiff, not from a hand-written backward function.
    """
    if not callable(f):
        raise TypeError(f"backward: f must be callable, got {type(f).__name__}")
    name = getattr(f, "__name__", repr(f))
    jaxpr = jax.make_jaxpr(f)(*args)
    if not _uses_custom_vjp(jaxpr.jaxpr):
        raise ValueError(
            f"backward: {name} has no jax.custom_vjp rule, so B[{name}, z] would "
            f"come from autodiff; define it with jax.custom_vjp and defvjp(fwd, bwd)"
        )
    _, vjp_fn = jax.vjp(f, *args)

    def B(v: Any) -> tuple[Any, ...]:
        return tuple(_none_if_float0(ct) for ct in vjp_fn(v))

    B.__name__ = f"B[{name}]"
    return B
