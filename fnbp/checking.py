"""Checked mode: run-time errors for what trace-time checks cannot see.

Shapes and dtypes are checked when a rule is traced. Values are not known
then: a class label out of range, a NaN in the input, a ``gamma`` passed as a
traced array. By default (unchecked) the rules do no run-time work for this
and document what they return instead (``cross_entropy_loss`` returns NaN for a
label out of range, never a plausible-looking number). Wrapping a function
with :func:`checked` compiles it with :mod:`jax.experimental.checkify` and the
rules' own run-time checks, and raises a clear error instead::

    loss = fnbp.checked(fnbp.cross_entropy_loss)(logits, labels)
    # ValueError: cross_entropy_loss: y holds a label outside [0, 10) ...

Models are covered at one place, the Layer machinery (:mod:`fnbp.nn.layer`):
under :func:`checked`, ``model.apply``, :func:`fnbp.backprop` and the
per-example functions check the model's input x, each layer's parameters
(named by their path in the model's params) and each layer's output, so the
first non-finite value is reported where it enters::

    fnbp.checked(model.apply)(params, x)
    # ValueError: mlp[2] linear(10): params[2]['W'] contains NaN or infinity
    # (the first is at index (0, 3): nan); the parameters were not finite ...

The checks are added while ``f`` is traced by :func:`checked`. A function you
have already jitted on its own and called before was traced without them and
is reused from JAX's cache; call :func:`checked` on the outermost function.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify

_CHECKING: contextvars.ContextVar[bool] = contextvars.ContextVar("fnbp_checking", default=False)


def is_checking() -> bool:
    """True while a function is being traced by :func:`checked`."""
    return _CHECKING.get()


def check(pred: Any, message: str) -> None:
    """Add the run-time check ``pred`` (a boolean scalar) when checking.

    Does nothing outside :func:`checked`, so unchecked code pays nothing.
    """
    if is_checking():
        checkify.check(pred, _literal(message))


def _literal(text: str) -> str:
    """``text`` with its braces doubled: checkify formats every message."""
    return text.replace("{", "{{").replace("}", "}}")


_FIX = (
    "clean the input or find where the non-finite values come from "
    "(jax.config.update('jax_debug_nans', True))"
)


def check_finite(fn: str, name: str, x: Any, *, fix: str = _FIX, locate: bool = False) -> None:
    """Check at run time that every entry of ``x`` is finite.

    Does nothing outside :func:`checked`, or for an ``x`` that cannot hold a
    non-finite value (integers, bools, empty arrays).

    Args:
      fn: who checks, the start of the message (``"mm"``, ``"mlp[2] linear(10)"``).
      name: what is checked (``"z"``, ``"params[2]['W']"``).
      x: the array.
      fix: the message's last part: how to fix it.
      locate: also say where the first non-finite entry is and what it holds:
        ``(the first is at index (3, 1): nan)``.

    The message: ``"{fn}: {name} contains NaN or infinity; {fix}"``.
    """
    if not is_checking():
        return
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact) or x.size == 0:
        return
    finite = jnp.isfinite(x)
    if not locate:
        checkify.check(jnp.all(finite), _literal(f"{fn}: {name} contains NaN or infinity; {fix}"))
        return
    first = jnp.argmin(finite.reshape(-1))
    index = jnp.unravel_index(first, x.shape) if x.ndim else ()
    slots = ", ".join("{}" for _ in index) + ("," if len(index) == 1 else "")
    where = f"the first is at index ({slots}): {{}}" if index else "it is {}"
    checkify.check(
        jnp.all(finite),
        f"{_literal(f'{fn}: {name}')} contains NaN or infinity ({where}); {_literal(fix)}",
        *index,
        x.reshape(-1)[first],
    )


def checked(f: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``f`` compiled with the rules' run-time checks.

    The returned function has ``f``'s signature. Positional arguments are
    traced; keyword arguments are static settings (they must be hashable).
    A failing check raises ``ValueError`` (JAX's ``JaxRuntimeError``) with the
    rule's message. Compilations are cached per set of keyword arguments.

    Args:
      f: any function built from fnbp rules (a single rule, a loss, a model).

    Returns:
      A function that returns what ``f`` returns, or raises.
    """
    if not callable(f):
        raise TypeError(f"checked: f must be callable, got {type(f).__name__}")
    compiled: dict[tuple, Callable[..., Any]] = {}

    @functools.wraps(f)
    def run_checked(*args: Any, **kwargs: Any) -> Any:
        key = tuple(sorted(kwargs.items()))
        if key not in compiled:
            compiled[key] = jax.jit(
                checkify.checkify(functools.partial(f, **kwargs), errors=checkify.user_checks)
            )
        token = _CHECKING.set(True)
        try:
            err, out = compiled[key](*args)
        finally:
            _CHECKING.reset(token)
        err.throw()
        return out

    return run_checked
