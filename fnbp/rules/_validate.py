"""Trace-time checks of user input, shared by every rule.

Every check raises a ``TypeError`` or ``ValueError`` whose message names the
function, the argument, what was seen and how to fix it. None of them uses
``assert``: user input is never validated with assertions.

Every array argument of a rule enters through :func:`as_array` (directly or
through :func:`float_array` and :func:`int_array`): JAX arrays and tracers
pass as they are; NumPy arrays, Python numbers and (nested) lists or tuples
of numbers are converted with ``jnp.asarray``, so ``fnbp.relu([1.0, -2.0])``
is ``fnbp.relu(jnp.asarray([1.0, -2.0]))``; what cannot be converted (a
ragged list, strings, other objects) is refused with the rule's message.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

_ARRAY_LIKE = (
    "an array (a JAX or NumPy array, a Python number, or a nested list or tuple "
    "of numbers of one rectangular shape)"
)


def _not_an_array(x: Any) -> str:
    """What ``x`` is, for the message of :func:`as_array`."""
    if x is None:
        return "None"
    if isinstance(x, (list, tuple)):
        kind = type(x).__name__
        try:
            read = np.asarray(x)
        except (ValueError, TypeError):
            return f"a ragged {kind} (its entries have different lengths or shapes)"
        if read.dtype.kind in "OUSV":
            return f"a {kind} holding non-numbers (NumPy reads it as dtype {read.dtype})"
        return f"a {kind} NumPy reads as dtype {read.dtype}"
    if isinstance(x, np.ndarray):
        return f"a NumPy array of dtype {x.dtype}"
    if isinstance(x, (str, bytes)):
        return f"a string {x!r:.40}"
    return f"an object of type {type(x).__name__}"


def as_array(fn: str, name: str, x: Any) -> jax.Array:
    """``x`` as a JAX array (a tracer stays a tracer).

    Lists, tuples, NumPy arrays and Python numbers are converted with
    ``jnp.asarray`` (as numbers, a list of Python floats takes JAX's default
    float dtype); JAX arrays are returned as they are.

    Raises:
      ValueError: a ragged (nested) list or tuple.
      TypeError: anything else that ``jnp.asarray`` cannot turn into an array
        of numbers (strings, None, other objects).
    """
    if isinstance(x, jax.Array):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError, OverflowError):
        pass
    seen = _not_an_array(x)
    if seen.startswith("a ragged"):
        raise ValueError(
            f"{fn}: {name} must be {_ARRAY_LIKE}, got {seen}; give every row the same length"
        ) from None
    raise TypeError(
        f"{fn}: {name} must be {_ARRAY_LIKE}, got {seen}; pass its numbers as an array"
    ) from None


def float_array(fn: str, name: str, x: Any) -> jax.Array:
    """:func:`as_array` of ``x``, which must have a real floating dtype."""
    x = as_array(fn, name, x)
    require_float(fn, name, x)
    return x


def int_array(fn: str, name: str, x: Any, why: str) -> jax.Array:
    """:func:`as_array` of ``x``, which must have an integer dtype (labels)."""
    x = as_array(fn, name, x)
    require_int(fn, name, x, why)
    return x


def labels_in_range(y: jax.Array, k: int) -> jax.Array:
    """The mask ``0 <= y < k`` of integer labels, exact in every integer dtype.

    Compared in y's own dtype without converting ``k`` to it: where k exceeds
    the dtype's largest value (uint8 labels and 256 classes, int8 and 200),
    ``y < k`` holds for every label and is not computed; an unsigned y is
    never negative. No label wraps around and no class count overflows.
    """
    info = jnp.iinfo(y.dtype)
    valid = jnp.ones(y.shape, bool) if info.min == 0 else y >= 0
    if k <= info.max:
        valid = valid & (y < k)
    return valid


def require_float(fn: str, name: str, x: Any) -> None:
    """Raise ``TypeError`` unless ``x`` has a real floating dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{fn}: {name} has dtype {dtype}, but a real floating dtype is needed "
            f"(one of {', '.join(FLOAT_DTYPES)}); convert it, e.g. "
            f"{name}.astype(jnp.float32)"
        )


def require_int(fn: str, name: str, x: Any, why: str) -> None:
    """Raise ``TypeError`` unless ``x`` has an integer dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{fn}: {name} has dtype {dtype}, but integer class labels are needed "
            f"({why}); pass {name}.astype(jnp.int32)"
        )


def require_ndim(fn: str, name: str, x: Any, ndim: int, meaning: str) -> None:
    """Raise ``ValueError`` unless ``x`` has exactly ``ndim`` axes."""
    shape = jnp.shape(x)
    if len(shape) != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D {meaning}, got {name}.shape={shape}")


def require_min_ndim(fn: str, name: str, x: Any, ndim: int, meaning: str) -> None:
    """Raise ``ValueError`` unless ``x`` has at least ``ndim`` axes."""
    shape = jnp.shape(x)
    if len(shape) < ndim:
        raise ValueError(
            f"{fn}: {name} must have at least {ndim} axes {meaning}, got {name}.shape={shape}"
        )


def concrete_float(x: Any) -> float | None:
    """``float(x)`` when ``x`` is a concrete scalar, ``None`` when it is traced."""
    try:
        return float(np.asarray(x))
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def require_scalar(fn: str, name: str, x: Any) -> None:
    """Raise ``ValueError`` unless ``x`` is a scalar (shape ``()``)."""
    if jnp.shape(x) != ():
        raise ValueError(f"{fn}: {name} must be a scalar, got {name}.shape={jnp.shape(x)}")


def require_open_interval(fn: str, name: str, x: Any, low: float, high: float) -> None:
    """Raise ``ValueError`` when a concrete ``x`` lies outside ``(low, high)``.

    A traced ``x`` cannot be seen at trace time; ``fnbp.checked`` tests it at
    run time instead.
    """
    value = concrete_float(x)
    if value is not None and not low < value < high:
        raise ValueError(f"{fn}: {name} must lie in the open interval ({low}, {high}), got {value}")


def require_positive(fn: str, name: str, x: Any) -> None:
    """Raise ``ValueError`` when a concrete ``x`` is not > 0."""
    value = concrete_float(x)
    if value is not None and not value > 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value}")
