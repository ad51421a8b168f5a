"""The argument checks of every layer factory, model builder and ``init``, in one place.

Each check raises a ``TypeError`` (a value of the wrong kind) or ``ValueError``
(the right kind, out of range) whose message names the factory (or the layer)
and the argument, shows what was seen and says how to fix it:
``Conv2D: channels must be a positive int (the number of output channels), got 0``.
A count (a width, a number of channels, a kernel size) that is not an int is a
``ValueError`` like one out of range, as fnbp's factories have always raised.
Each returns the value in the form the layer keeps (a Python int, a tuple of
ints, a bool, a float).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.rules import _validate


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _meaning(name: str, what: str) -> str:
    """`` (n is the output width)``: what the argument is, after what was seen."""
    return f" ({name} is {what})" if what else ""


def positive_int(fn: str, name: str, value: Any, what: str = "") -> int:
    """``value`` as an int >= 1; ``what`` says what it is, in the message."""
    if not is_int(value) or value < 1:
        raise ValueError(
            f"{fn}: {name} must be a positive int, got {value!r}{_meaning(name, what)}"
        )
    return int(value)


def non_negative_int(fn: str, name: str, value: Any, what: str = "") -> int:
    """``value`` as an int >= 0."""
    if not is_int(value) or value < 0:
        raise ValueError(f"{fn}: {name} must be an int >= 0, got {value!r}{_meaning(name, what)}")
    return int(value)


def positive_ints(fn: str, name: str, value: Any, n: int, what: str = "") -> tuple[int, ...]:
    """An int (the same in every one of the n axes) or a tuple of n ints, each >= 1."""
    values = (value,) * n if is_int(value) else value
    if (
        not isinstance(values, (tuple, list))
        or len(values) != n
        or not all(is_int(v) and v >= 1 for v in values)
    ):
        raise ValueError(
            f"{fn}: {name} must be a positive int or a tuple of {n} positive "
            f"int{'s' if n > 1 else ''}, got {value!r}{_meaning(name, what)}"
        )
    return tuple(int(v) for v in values)


def flag(fn: str, name: str, value: Any) -> bool:
    """``value`` as a bool; only True or False (a static setting)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be True or False, got {value!r}")
    return bool(value)


def _real(fn: str, name: str, value: Any, what: str, kind: str) -> float:
    """A real number (Python, NumPy or a concrete scalar array) as a float; ``kind`` names
    what it must be in the TypeError ("a number >= 0")."""
    if isinstance(value, (bool, np.bool_)) or not (
        isinstance(value, numbers.Real)
        or (
            hasattr(value, "dtype")
            and jnp.ndim(value) == 0
            and (
                jnp.issubdtype(value.dtype, jnp.floating)
                or jnp.issubdtype(value.dtype, jnp.integer)
            )
        )
    ):
        raise TypeError(
            f"{fn}: {name} must be {kind}, got "
            f"{type(value).__name__} {value!r}{_meaning(name, what)}"
        )
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            f"{fn}: {name} is a fixed setting and must be a concrete number, got "
            f"a traced value; pass a Python float"
        ) from None


def non_negative_float(fn: str, name: str, value: Any, what: str = "") -> float:
    """A finite real number >= 0 (a Python or NumPy number or a concrete scalar array)."""
    number = _real(fn, name, value, what, "a number >= 0")
    if not math.isfinite(number) or number < 0:
        raise ValueError(
            f"{fn}: {name} must be a finite number >= 0, got {number}{_meaning(name, what)}"
        )
    return number


def positive_float(fn: str, name: str, value: Any, what: str = "") -> float:
    """A finite real number > 0 (as :func:`non_negative_float`, and not 0)."""
    number = _real(fn, name, value, what, "a positive float")
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(
            f"{fn}: {name} must be a positive finite float, got {number}{_meaning(name, what)}"
        )
    return number


def layer(fn: str, name: str, value: Any) -> Any:
    """``value`` if it is a :class:`fnbp.Layer`, with a hint when it is a factory."""
    from fnbp.nn.layer import Layer

    if not isinstance(value, Layer):
        hint = ""
        if getattr(value, "__module__", "").startswith("fnbp.nn") and callable(value):
            hint = f" (a layer factory: call it, fnbp.{value.__name__}(...))"
        raise TypeError(
            f"{fn}: {name} is {type(value).__name__}{hint}, not a Layer; use "
            f"fnbp.Linear(n), fnbp.Relu(), ... or fnbp.make_layer"
        )
    return value


def input_shape(fn: str, shape: Any) -> tuple[int, ...]:
    """One example's shape as a tuple of positive ints; an int n is taken as (n,).

    As NumPy takes ``np.zeros(784)`` for ``np.zeros((784,))``, ``init(key, 784)``
    is ``init(key, (784,))``. A zero or negative dimension is refused: an
    example with no entries has nothing to compute on.
    """
    if is_int(shape):
        shape = (shape,)
    elif isinstance(shape, np.ndarray) and shape.ndim == 1:
        shape = tuple(shape.tolist())
    if not isinstance(shape, (tuple, list)) or not all(is_int(d) for d in shape):
        raise TypeError(
            f"{fn}: input_shape must be one example's shape, a tuple of ints "
            f"without the batch axis (e.g. (784,) or (28, 28, 1)), got "
            f"{type(shape).__name__} {shape!r}"
        )
    if not all(d >= 1 for d in shape):
        raise ValueError(
            f"{fn}: input_shape {tuple(shape)} has a zero or negative dimension; "
            f"every axis of an example needs at least one entry (the batch axis "
            f"is not part of it)"
        )
    return tuple(int(d) for d in shape)


def prng_key(fn: str, key: Any) -> Any:
    """A PRNG key: ``jax.random.key(seed)`` or a raw ``jax.random.PRNGKey(seed)``."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and jnp.ndim(key) == 0:
        return key
    if dtype is not None and dtype == jnp.uint32 and jnp.ndim(key) == 1:
        return key
    got = (
        f"an array of shape {jnp.shape(key)} and dtype {dtype}"
        if dtype is not None
        else f"{type(key).__name__} {key!r:.80}"
    )
    fix = f"jax.random.key({key!r})" if is_int(key) else "jax.random.key(0)"
    raise TypeError(f"{fn}: key must be one PRNG key, got {got}; pass e.g. {fix}")


def float_dtype(fn: str, dtype: Any) -> Any:
    """A real floating dtype for the parameters (float32, bfloat16, ...)."""
    try:
        as_dtype = jnp.dtype(dtype)
    except TypeError:
        as_dtype = None
    if as_dtype is None or not jnp.issubdtype(as_dtype, jnp.floating):
        got = repr(dtype) if as_dtype is None else as_dtype.name
        raise TypeError(
            f"{fn}: dtype must be a real floating dtype for the parameters "
            f"(jnp.float32, jnp.bfloat16, jnp.float16 or jnp.float64), got {got}"
        )
    return dtype


def float_input(fn: str, name: str, z: Any) -> None:
    """A layer whose rule computes in floating point refuses other inputs, as the rule does."""
    _validate.require_float(fn, name, z)


def model_input(fn: str, x: Any) -> Any:
    """The model's input as an array: a list or a number is converted, anything else refused."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        array = x
    else:
        try:
            array = jnp.asarray(x)
        except (TypeError, ValueError):
            raise TypeError(
                f"{fn}: x must be an array of numbers (a jax or NumPy array, or a "
                f"nested list of numbers), got {type(x).__name__} {x!r:.80}"
            ) from None
    dtype = np.result_type(array) if isinstance(array, (np.ndarray, np.generic)) else array.dtype
    if not (
        jnp.issubdtype(dtype, jnp.floating)
        or jnp.issubdtype(dtype, jnp.integer)
        or jnp.issubdtype(dtype, jnp.bool_)
    ):
        raise TypeError(
            f"{fn}: x has dtype {dtype}; a layer computes on real numbers "
            f"(float32, bfloat16, ...; integers for index inputs); convert it, "
            f"e.g. x.astype(jnp.float32)"
        )
    return array
