"""Checks of training data on the host: inputs, labels, and the class count.

Every check raises :class:`DataError` (a ``ValueError``) with a one-line
message that names the source (the file), the row and the value, and says how
to fix it. Usable data with a gap that does not stop training (a test split
without some class) give a :class:`DataWarning` instead.

How the class count is determined: it is the number k of distinct labels in
the training split, and those labels must be exactly 0, 1, ..., k-1. A label
outside that range (one stray 100000 among 0 and 1) is an error naming its
row, never a model with 100001 outputs. Test labels must be among the
training classes; a class missing from the test split is a warning.

:func:`check_label_range` is the cheap host-side check that :func:`fnbp.fit`
and :func:`fnbp.make_train_step` run on integer labels before training,
against the number of outputs of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class DataError(ValueError):
    """A problem with the data itself; the message says what and how to fix it."""


class DataWarning(UserWarning):
    """Data that can be trained on, with a caveat (a class missing from the test split)."""


def _where(i: int, rows: Sequence[int] | np.ndarray | None) -> str:
    """How to name example ``i``: the file's line number when known."""
    return f"example {i}" if rows is None else f"line {int(rows[i])}"


def validate_arrays(
    x: Any,
    y: Any,
    source: str,
    *,
    dtype: Any = np.float32,
    rows: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Check inputs and labels and return them as ``dtype`` and int32 arrays.

    The inputs are checked for NaN and infinity both as given and after the
    cast to ``dtype``: a float64 value of 1e300 is finite but becomes inf in
    float32, which is reported here as a data error naming the value, not
    later as a diverging loss.

    Args:
      x: inputs, any real numeric array of shape (n, d1, ...), n >= 1.
      y: labels, shape (n,), integers >= 0 (an integer dtype, or floats that
        are whole numbers, as a CSV file gives).
      source: where the arrays come from, for the error message.
      dtype: the training dtype the inputs are cast to (default float32).
      rows: for example i, the line of the file it came from (named in the
        messages instead of "example i").

    Returns:
      ``(x, y)`` as ``dtype`` and ``int32`` arrays.

    Raises:
      DataError: a non-numeric or non-finite x, a value that overflows
        ``dtype``, a y of the wrong shape, or labels that are negative or not
        whole numbers.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype.kind not in "biuf":
        raise DataError(
            f"{source}: x has dtype {x.dtype}; inputs must be real numbers (int or float arrays)"
        )
    if y.dtype.kind not in "biuf":
        raise DataError(
            f"{source}: y has dtype {y.dtype}; labels must be integer class indices 0, 1, ..., k-1"
        )
    if x.ndim < 2:
        raise DataError(
            f"{source}: x has shape {x.shape}, but inputs must have shape "
            f"(n, features...) with one row per example; for one feature use "
            f"x.reshape(-1, 1)"
        )
    if x.shape[0] == 0:
        raise DataError(f"{source}: x holds no examples (shape {x.shape})")
    if y.ndim != 1:
        hint = "; for one-hot labels pass y.argmax(axis=1)" if y.ndim == 2 else ""
        raise DataError(
            f"{source}: y has shape {y.shape}, but labels must have shape "
            f"(n,), one class index per example{hint}"
        )
    if y.shape[0] != x.shape[0]:
        raise DataError(
            f"{source}: x has {x.shape[0]} examples but y has {y.shape[0]} "
            f"labels; they must match one to one"
        )
    flat = x.reshape(x.shape[0], -1)
    check_finite(source, "x", x, rows=rows)
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        cast = x.astype(dtype)
    if not np.all(np.isfinite(cast)):
        bad_example, bad_feature = (
            int(i) for i in np.argwhere(~np.isfinite(cast.reshape(flat.shape)))[0]
        )
        value = flat[bad_example, bad_feature]
        raise DataError(
            f"{source}: x holds {value:g} in {_where(bad_example, rows)}, too "
            f"large for {dtype.name} (largest {float(np.finfo(dtype).max):.3g}); "
            f"rescale the inputs (e.g. divide by {float(abs(value)):.0e}) or "
            f"remove that value"
        )
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            bad = int(np.flatnonzero(~np.isfinite(y))[0])
            raise DataError(
                f"{source}: y holds {float(y[bad])} in {_where(bad, rows)}; "
                f"labels must be integer class indices 0, 1, ..., k-1"
            )
        if not np.all(y == np.round(y)):
            bad = int(np.flatnonzero(y != np.round(y))[0])
            raise DataError(
                f"{source}: y holds non-integer labels (e.g. {float(y[bad])!r} in "
                f"{_where(bad, rows)}); labels must be class indices 0, 1, ..., "
                f"k-1"
            )
    if np.any(y < 0):
        bad = int(np.argmin(y))
        raise DataError(
            f"{source}: y holds the negative label {y[bad]:g} in "
            f"{_where(bad, rows)}; labels must be class indices 0, 1, ..., k-1"
        )
    if np.any(y >= 2**31):
        bad = int(np.argmax(y))
        raise DataError(
            f"{source}: y holds the label {y[bad]:g} in {_where(bad, rows)}, "
            f"too large for a class index; labels must be 0, 1, ..., k-1"
        )
    return cast, y.astype(np.int32)


def check_finite(
    source: str, name: str, x: Any, *, rows: Sequence[int] | np.ndarray | None = None
) -> None:
    """Raise :class:`DataError` if the floating-point array ``x`` holds NaN or infinity.

    The one check of non-finite inputs, for the data loaders (``source`` the
    file, ``name`` "x") and for :func:`fnbp.fit` (``source`` "fit", ``name``
    "`x`", "`y`", ...): the message names the first example that holds one.
    Integer arrays pass. A ``jax.Array`` is checked where it lives and only a
    bool comes back, unless it fails.

    Args:
      source: where the array comes from (a file, or the function checking).
      name: the array's name in the message.
      x: the array, shape (n, ...): example i is ``x[i]``.
      rows: for example i, the line of the file it came from.
    """
    import jax
    import jax.numpy as jnp

    dtype = getattr(x, "dtype", None)
    if dtype is None:
        x = np.asarray(x)
        dtype = x.dtype
    if not jnp.issubdtype(dtype, jnp.inexact) or np.size(x) == 0:
        return
    if isinstance(x, jax.Array):
        if bool(jnp.isfinite(x).all()):
            return
        finite = np.asarray(jnp.isfinite(x))
    else:
        finite = np.isfinite(x)
        if finite.all():
            return
    finite = finite.reshape(finite.shape[0], -1) if finite.ndim else finite.reshape(1, 1)
    bad = int(np.argwhere(~finite)[0][0])
    raise DataError(
        f"{source}: {name} contains NaN or infinity (first in "
        f"{_where(bad, rows)}); remove or impute those values"
    )


def available_memory() -> int | None:
    """The bytes of memory this process can still allocate, or None where unknown.

    Linux's ``MemAvailable`` (``/proc/meminfo``), lowered to what the
    process' control group still allows (``memory.max`` less
    ``memory.current``, cgroup v2; ``memory.limit_in_bytes`` less
    ``memory.usage_in_bytes``, v1) when it sets a limit; elsewhere
    ``os.sysconf``'s available physical pages.
    """
    import os

    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        available = None
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            with open(limit_file, encoding="ascii") as handle:
                limit = handle.read().strip()
            with open(usage_file, encoding="ascii") as handle:
                usage = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max", or v1's "no limit" 2**63 - 4096
            available = min(available, max(int(limit) - usage, 0))
        break
    return available


def size_text(nbytes: float) -> str:
    """A byte count in words: ``"512 B"``, ``"3.2 GiB"``, ``"72.8 TiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def check_memory(what: str, nbytes: int, remedy: str) -> None:
    """Raise :class:`DataError` before allocating ``nbytes`` that memory cannot hold.

    Compared with :func:`available_memory` (no check where it is unknown).
    The message gives both sizes: "{what} needs about 72.8 TiB of memory, but
    21.9 GiB is available; {remedy}".
    """
    available = available_memory()
    if available is not None and nbytes > available:
        raise DataError(
            f"{what} needs about {size_text(nbytes)} of memory, but "
            f"{size_text(available)} is available; {remedy}"
        )


def count_classes(
    y: np.ndarray, source: str, *, rows: Sequence[int] | np.ndarray | None = None
) -> int:
    """The number of classes k: the distinct labels, which must be 0 .. k-1.

    Args:
      y: the (training) labels, non-negative integers.
      source: where they come from, for the message.
      rows: for example i, the line of the file it came from.

    Returns:
      k >= 2.

    Raises:
      DataError: fewer than two distinct labels, or labels that are not
        0 .. k-1 (a stray label, named with its row).
    """
    labels, counts = np.unique(y, return_counts=True)
    k = len(labels)
    if k < 2:
        value = int(labels[0]) if k else None
        raise DataError(
            f"{source}: every label is {value}; classification needs at "
            f"least two classes, labelled 0, 1, ..., k-1"
        )
    if int(labels[-1]) == k - 1:
        return k
    present = labels[labels < k]
    missing = np.setdiff1d(np.arange(k), present)
    stray, stray_counts = labels[labels >= k], counts[labels >= k]
    # name the stray label with the fewest examples (a typo), the largest on ties
    fewest = np.flatnonzero(stray_counts == np.min(stray_counts))[-1]
    label = int(stray[fewest])
    rows_of = np.flatnonzero(y == label)
    first = _where(int(rows_of[0]), rows)
    more = f" (and {len(rows_of) - 1} more)" if len(rows_of) > 1 else ""
    shown = ", ".join(str(int(c)) for c in missing[:3]) + (", ..." if len(missing) > 3 else "")
    empty = f"classes {shown} have" if len(missing) > 1 else f"class {shown} has"
    raise DataError(
        f"{source}: label {label} in {first}{more} is not a class index: the "
        f"{k} distinct labels must be 0 .. {k - 1}, but {empty} no examples; fix "
        f"or drop that row, or renumber the labels 0 .. {k - 1} "
        f"(np.unique(y, return_inverse=True)[1])"
    )


def check_test_labels(
    y_test: np.ndarray,
    num_classes: int,
    source: str,
    *,
    rows: Sequence[int] | np.ndarray | None = None,
) -> list[int]:
    """Check held-out labels against the training classes.

    Returns:
      The classes 0 .. num_classes-1 that the test split has no example of
      (for a warning: its accuracy does not measure them).

    Raises:
      DataError: a test label that is not a training class, named with its row.
    """
    outside = np.flatnonzero(y_test >= num_classes)
    if outside.size:
        i = int(outside[0])
        raise DataError(
            f"{source}: label {int(y_test[i])} in {_where(i, rows)} is not one of "
            f"the {num_classes} classes of the training split (0 .. "
            f"{num_classes - 1}); fix or drop that row, or add training examples "
            f"of that class"
        )
    return [int(c) for c in np.setdiff1d(np.arange(num_classes), y_test)]


def check_label_range(fn: str, name: str, y: Any, num_classes: int) -> None:
    """Raise ``ValueError`` unless every integer label lies in [0, num_classes).

    Args:
      fn: the function checking, for the message.
      name: the argument's name (``y``, ``y_test``).
      y: the labels (host or device data; read once).
      num_classes: the model's number of outputs k.
    """
    y = np.asarray(y)
    if y.size == 0:
        return
    low, high = y.min(), y.max()
    if low >= 0 and high < num_classes:
        return
    bad = np.flatnonzero((y.ravel() < 0) | (y.ravel() >= num_classes))[0]
    index = np.unravel_index(int(bad), y.shape)
    at = index[0] if len(index) == 1 else tuple(int(i) for i in index)
    raise ValueError(
        f"{fn}: {name} holds the label {int(y.ravel()[bad])} (at {at}), "
        f"outside [0, {num_classes}): the model has {num_classes} outputs, one "
        f"per class; fix the labels or give the model's last layer as many "
        f"outputs as there are classes"
    )


def model_classes(model: Any, params: Any, x: Any, y: Any, output: Any = None) -> int | None:
    """The number of outputs k of ``model`` when (x, y) is integer-label classification.

    Found from shapes alone (``jax.eval_shape``, nothing computed; or from
    ``output``, the outputs' ShapeDtypeStruct when the caller has it): the
    outputs t have one axis more than the labels, and the labels are
    integers. ``None`` otherwise (regression targets, say).
    """
    import jax
    import jax.numpy as jnp

    y_dtype = getattr(y, "dtype", None)
    if y_dtype is None or not jnp.issubdtype(y_dtype, jnp.integer):
        return None
    t = (
        output
        if output is not None
        else jax.eval_shape(
            model.apply, params, jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))
        )
    )
    if len(t.shape) != np.ndim(y) + 1:
        return None
    return int(t.shape[-1])


class LabelCheck:
    """The host-side label check of a training step, at no per-step device cost.

    Labels given as NumPy data are checked on the host at every call (a
    minimum and maximum over the batch, no device work); labels already on a
    device are read back once, at the first call. Traced labels (the step
    called inside your own ``jax.jit``) are not checked: wrap the loss in
    :func:`fnbp.checked` for that. The model's number of outputs is found
    once per input shape.
    """

    def __init__(self, fn: str, model: Any):
        self.fn, self.model = fn, model
        self._classes: dict[Any, int | None] = {}
        self._device_checked = False

    def __call__(self, params: Any, x: Any, y: Any) -> None:
        import jax

        if isinstance(y, jax.core.Tracer) or isinstance(x, jax.core.Tracer):
            return
        on_host = not isinstance(y, jax.Array)
        if not on_host and self._device_checked:
            return
        y = np.asarray(y) if on_host and not isinstance(y, np.ndarray) else y
        key = (np.shape(x)[1:], str(getattr(x, "dtype", type(x))), np.ndim(y))
        if key not in self._classes:
            self._classes[key] = model_classes(self.model, params, x, y)
        classes = self._classes[key]
        if classes is not None:
            check_label_range(self.fn, "y", y, classes)
        if not on_host:
            self._device_checked = True


def check_fit_labels(
    fn: str,
    model: Any,
    params: Any,
    x: Any,
    y: Any,
    x_test: Any = None,
    y_test: Any = None,
    *,
    output: Any = None,
) -> None:
    """Once before training: integer labels lie in [0, k), k the model's outputs.

    A label outside that range makes the cross-entropy NaN and training
    silently useless; this reads the labels back to the host once (no
    per-step cost) and raises ``ValueError`` naming the label and its index.
    """
    classes = model_classes(model, params, x, y, output)
    if classes is None:
        return
    check_label_range(fn, "y", y, classes)
    if y_test is not None:
        check_label_range(fn, "y_test", y_test, classes)


def with_label_check(fn: str, model: Any, step: Any) -> Any:
    """``step(params, opt_state, x, y)`` preceded by a :class:`LabelCheck`."""
    check = LabelCheck(fn, model)

    def checked_step(params: Any, opt_state: Any, x: Any, y: Any) -> Any:
        check(params, x, y)
        return step(params, opt_state, x, y)

    return checked_step
