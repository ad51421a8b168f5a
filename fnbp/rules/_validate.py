"""Trace-time checks of user input, shared by every rule.

Every check raises a ``TypeError`` or ``ValueError`` whose message names the
function, the argument, what was seen and how to fix it. None of them uses
``assert``: user input is never validated with assertions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


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
        raise ValueError(
            f"{fn}: {name} must be {ndim}-D {meaning}, got {name}.shape={shape}"
        )


def require_min_ndim(fn: str, name: str, x: Any, ndim: int, meaning: str) -> None:
    """Raise ``ValueError`` unless ``x`` has at least ``ndim`` axes."""
    shape = jnp.shape(x)
    if len(shape) < ndim:
        raise ValueError(
            f"{fn}: {name} must have at least {ndim} axes {meaning}, "
            f"got {name}.shape={shape}"
        )


def concrete_float(x: Any) -> float | None:
    """``float(x)`` when ``x`` is a concrete scalar, ``None`` when it is traced."""
    try:
        return float(np.asarray(x))
    except (TypeError, jax.errors.ConcretizationTypeError,
            jax.errors.TracerArrayConversionError):
        return None


def require_scalar(fn: str, name: str, x: Any) -> None:
    """Raise ``ValueError`` unless ``x`` is a scalar (shape ``()``)."""
    if jnp.shape(x) != ():
        raise ValueError(
            f"{fn}: {name} must be a scalar, got {name}.shape={jnp.shape(x)}"
        )


def require_open_interval(fn: str, name: str, x: Any, low: float, high: float) -> None:
    """Raise ``ValueError`` when a concrete ``x`` lies outside ``(low, high)``.

    A traced ``x`` cannot be seen at trace time; ``fnbp.checked`` tests it at
    run time instead.
    """
    value = concrete_float(x)
    if value is not None and not low < value < high:
        raise ValueError(
            f"{fn}: {name} must lie in the open interval ({low}, {high}), got {value}"
        )


def require_positive(fn: str, name: str, x: Any) -> None:
    """Raise ``ValueError`` when a concrete ``x`` is not > 0."""
    value = concrete_float(x)
    if value is not None and not value > 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value}")
