"""Forward mode through the hand-written forward functions: jvp, linearize, jacfwd.

The notes' backward function B[M, z](v) = (dM/dz)^T v has a mirror, the
forward function F[M, z](t) = (dM/dz) t, declared beside it for every rule
(``fnbp.rules.<name>_jvp``) and every layer (``make_layer(..., tangent=...)``).
The two are adjoint: <F t, v> = <t, B v>.

JAX's own forward mode (``jax.jvp``, ``jax.linearize``, ``jax.jacfwd``) does
not go through a ``jax.custom_vjp``, so it refuses fnbp's functions. The
functions here trace ``f`` with every rule and layer as a ``jax.custom_jvp``
whose rule is F instead: the forward pass stores each module's residuals and
the tangent pass chains the F's from the first module to the last, the mirror
of Algorithm 3::

    out, tangent_out = fnbp.jvp(lambda p: model.apply(p, x), (params,), (direction,))

They compose with ``jax.jit`` and ``jax.vmap`` around them. Trace ``f`` here
first: a function jitted on its own and already called in reverse mode is
reused from JAX's cache as it was traced (with its ``custom_vjp``); jit the
whole ``fnbp.jvp`` call instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from fnbp.rules._rule import forward_mode

__all__ = ["jacfwd", "jvp", "linearize"]

_NOTE = (
    "fnbp.jvp: f was traced in forward mode, with fnbp's rules and layers as custom_jvp "
    "functions; a jax.custom_vjp that is not fnbp's (or a function jitted on its own and "
    "called before, reused from JAX's cache) cannot be: jit the whole fnbp.jvp call, and give "
    "your own layers a forward function (fnbp.make_layer(..., tangent=...))"
)


def _primals(fn: str, primals: Any, tangents: Any) -> tuple[tuple, tuple]:
    if not isinstance(primals, (tuple, list)) or not isinstance(tangents, (tuple, list)):
        raise TypeError(
            f"{fn}: primals and tangents must be tuples (one entry per argument of f), got "
            f"{type(primals).__name__} and {type(tangents).__name__}; write (x,) for one"
        )
    if len(primals) != len(tangents):
        raise ValueError(
            f"{fn}: primals and tangents must have one entry per argument of f each, got "
            f"{len(primals)} and {len(tangents)}"
        )
    return tuple(primals), tuple(tangents)


def _traced(call: Callable[[], Any]) -> Any:
    with forward_mode():
        try:
            return call()
        except TypeError as error:
            error.add_note(_NOTE)
            raise


def jvp(f: Callable[..., Any], primals: Sequence[Any], tangents: Sequence[Any]) -> tuple:
    """``(f(*primals), J_f tangents)``, through the forward functions F of fnbp's rules.

    As ``jax.jvp``: ``primals`` and ``tangents`` are tuples with one entry per
    argument of ``f``, each tangent a pytree like its primal.

    Args:
      f: a function built from fnbp's rules and layers (``model.apply``, a loss
        of a model, a rule) and plain jnp code.
      primals, tangents: tuples of f's arguments and their tangents.

    Returns:
      ``(out, tangent_out)``.

    Raises:
      TypeError: primals or tangents not tuples; ``f`` calls a
        ``jax.custom_vjp`` that is not fnbp's (a note says what to do).
      ValueError: primals and tangents of different lengths.
      NotImplementedError: a layer or rule of ``f`` without a forward function
        (it is named).
    """
    primals, tangents = _primals("jvp", primals, tangents)
    return _traced(lambda: jax.jvp(f, primals, tangents))


def linearize(f: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[..., Any]]:
    """``(f(*primals), t -> J_f t)``: as ``jax.linearize``, through fnbp's forward functions.

    The forward pass runs once; the returned linear function applies the
    chained F's to any tangent (it is jit-able and vmap-able).
    """
    return _traced(lambda: jax.linearize(f, *primals))


def jacfwd(f: Callable[..., Any], argnums: int | Sequence[int] = 0) -> Callable[..., Any]:
    """The Jacobian of ``f`` by forward mode (``jax.jacfwd``) through fnbp's forward functions.

    One F pass per input entry, batched with ``jax.vmap``: the right choice when
    ``f`` has fewer inputs than outputs.
    """
    argnums = argnums if isinstance(argnums, int) else tuple(argnums)

    def jacobian(*args: Any) -> Any:
        return _traced(lambda: jax.jacfwd(f, argnums=argnums)(*args))

    return jacobian
