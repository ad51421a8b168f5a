"""Datasets for training, none downloaded at run time.

Every loader returns plain NumPy arrays: inputs ``x`` of shape (n, *input_shape)
and integer class labels ``y`` of shape (n,). :func:`load_dataset` adds the
held-out split and the standardization and returns a :class:`Dataset`.

- ``digits``: the 1797 handwritten digits (8x8 pixels, 10 classes) that ship
  inside scikit-learn (``pip install "fnbp[train]"``), as images (8, 8, 1).
- ``spirals`` and ``moons``: synthetic 2-D classification problems drawn from a
  seeded NumPy generator, so the same seed gives the same points everywhere.
- ``npz`` and ``csv``: your own arrays from a local file.
- ``idx``: MNIST-format IDX files (``train-images-idx3-ubyte`` and its three
  siblings, each optionally gzipped) from a local folder.

Standardization is done right: the mean and standard deviation (per channel
for images, per feature otherwise) are computed on the training split only
and then applied to both splits, so nothing about the held-out examples leaks
into training.

Every problem with the data (a missing file, a file of another kind, arrays
of the wrong shape, NaN in the inputs or a value too large for float32, labels
that are not integers or not 0 .. k-1) raises :class:`DataError`, a
``ValueError`` whose one-line message names the file (and the row) and says
how to fix it. Data that can be trained on with a caveat (a test split that
lacks a class, ignored extra arrays in a ``.npz``) give a :class:`DataWarning`.

The number of classes k is the number of distinct labels in the training
split, and those labels must be exactly 0, 1, ..., k-1 (see
:func:`fnbp.train.data.count_classes`): a stray label is an error naming its row,
never a silently larger model. Test labels must be training classes; a class
with no test example is a warning. When fnbp makes the split itself, every
class keeps at least one training example.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
from collections.abc import Mapping

import numpy as np

from fnbp.train._data_checks import (
    DataError,
    DataWarning,
    check_memory,
    check_test_labels,
    count_classes,
    validate_arrays,
)
from fnbp.train.data_files import load_csv, load_idx, load_npz, read_csv, read_idx

__all__ = [
    "DATASETS",
    "FILE_DATASETS",
    "DataError",
    "DataWarning",
    "Dataset",
    "check_dataset_arguments",
    "check_synthetic_size",
    "check_test_labels",
    "count_classes",
    "load_csv",
    "load_dataset",
    "load_digits",
    "load_idx",
    "load_npz",
    "make_moons",
    "make_spirals",
    "read_idx",
    "standardize",
    "train_test_split",
    "validate_arrays",
]

DATASETS = ("digits", "spirals", "moons", "npz", "csv", "idx")
"""The names :func:`load_dataset` accepts."""

FILE_DATASETS = ("npz", "csv", "idx")
"""The datasets that are read from ``path``."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification dataset split into training and held-out test examples.

    Attributes:
      name: the dataset's name (``"digits"``, ``"spirals"``, ...).
      x_train: inputs, float32, shape (n_train, *input_shape).
      y_train: class labels, int32 in [0, num_classes), shape (n_train,).
      x_test: held-out inputs, float32, shape (n_test, *input_shape).
      y_test: held-out labels, int32, shape (n_test,).
      num_classes: the number of classes k (labels are 0 .. k-1).
      mean: the training mean that was subtracted (per channel for images, per
        feature otherwise), or ``None``.
      std: the training standard deviation divided by, or ``None``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, without the example axis."""
        return tuple(self.x_train.shape[1:])


# --- built-in datasets -------------------------------------------------------------


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The handwritten digits bundled with scikit-learn, read from disk.

    1797 grey-scale 8x8 images of the digits 0-9 with pixel values 0..16
    (the UCI optical recognition of handwritten digits test set). The file
    that scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``) is read
    directly, which skips the seconds that importing scikit-learn takes;
    should that file move in some scikit-learn release,
    ``sklearn.datasets.load_digits`` is used instead.

    Returns:
      ``(x, y)``: x float32 of shape (1797, 8, 8, 1) (channels last), y int32
      of shape (1797,).

    Raises:
      DataError: scikit-learn is not installed.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the digits dataset ships with scikit-learn, which is not "
            'installed; install the train extra: pip install "fnbp[train]"'
        )
    path = os.path.join(
        list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz"
    )
    table = None
    if os.path.isfile(path):
        try:
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        except (OSError, ValueError, EOFError):
            table = None
    if (
        table is None
        or table.shape != (1797, 65)
        or np.min(table) < 0
        or np.max(table[:, :64]) > 16
        or set(np.unique(table[:, 64])) != set(range(10))
    ):
        from sklearn.datasets import load_digits as sklearn_load_digits

        bunch = sklearn_load_digits()
        table = np.concatenate([bunch.data, bunch.target[:, None]], axis=1)
    x = table[:, :64].reshape(-1, 8, 8, 1).astype(np.float32)
    return x, table[:, 64].astype(np.int32)


def make_spirals(
    num_examples: int = 2000,
    *,
    num_classes: int = 2,
    turns: float = 1.5,
    noise: float = 0.02,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Interleaved spirals in the plane, one arm per class.

    Example i of class c sits at radius r = 0.1 + 0.9 t and angle
    theta = 2 pi (turns t + c / num_classes), with t uniform in [0, 1], plus
    Gaussian noise of standard deviation ``noise`` on each coordinate. Arms of
    neighbouring classes are 0.9 / (turns num_classes) apart along a radius, so
    with the defaults (gap 0.3, noise 0.02) the classes do not overlap and a
    small MLP separates them almost perfectly.

    Args:
      num_examples: total number of points, split evenly over the classes.
      num_classes: the number of arms (>= 2).
      turns: revolutions of each arm.
      noise: standard deviation of the added Gaussian noise.
      seed: seed of the NumPy generator; same seed, same points.

    Returns:
      ``(x, y)``: x float32 of shape (num_examples, 2), y int32.
    """
    if num_examples < num_classes or num_classes < 2:
        raise DataError(
            f"spirals: need num_classes >= 2 and at least one example per "
            f"class, got num_examples={num_examples}, num_classes={num_classes}"
        )
    check_synthetic_size("spirals", num_examples)
    rng = np.random.default_rng(seed)
    y = np.arange(num_examples) % num_classes
    t = rng.uniform(0.0, 1.0, num_examples)
    r = 0.1 + 0.9 * t
    theta = 2 * np.pi * (turns * t + y / num_classes)
    x = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
    x = x + noise * rng.standard_normal(x.shape)
    return x.astype(np.float32), y.astype(np.int32)


def make_moons(
    num_examples: int = 2000, *, noise: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half circles (class 0 on top, class 1 below, shifted).

    Args:
      num_examples: total number of points, split evenly over the two classes.
      noise: standard deviation of the Gaussian noise added to each coordinate.
      seed: seed of the NumPy generator; same seed, same points.

    Returns:
      ``(x, y)``: x float32 of shape (num_examples, 2), y int32.
    """
    if num_examples < 2:
        raise DataError(f"moons: need at least 2 examples, got {num_examples}")
    check_synthetic_size("moons", num_examples)
    rng = np.random.default_rng(seed)
    y = np.arange(num_examples) % 2
    angle = np.pi * rng.uniform(0.0, 1.0, num_examples)
    upper = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    lower = np.stack([1.0 - np.cos(angle), 0.5 - np.sin(angle)], axis=1)
    x = np.where(y[:, None] == 0, upper, lower)
    x = x + noise * rng.standard_normal(x.shape)
    return x.astype(np.float32), y.astype(np.int32)


SYNTHETIC_BYTES_PER_EXAMPLE = 96
"""The memory one point of spirals or moons takes while it is drawn, split and
standardized (the generators' float64 working arrays; measured peak 64 to 80
bytes), which :func:`check_synthetic_size` checks before anything is allocated."""


def check_synthetic_size(name: str, num_examples: int) -> None:
    """Raise :class:`DataError` when ``num_examples`` points of ``name`` cannot fit in memory.

    The points need about :data:`SYNTHETIC_BYTES_PER_EXAMPLE` bytes each, compared
    with the memory available now (:func:`fnbp.train._data_checks.available_memory`).
    """
    check_memory(
        f"{name}: `num_examples` {num_examples}",
        int(num_examples) * SYNTHETIC_BYTES_PER_EXAMPLE,
        "pass a smaller `num_examples`",
    )


# --- split and standardization -----------------------------------------------------


def _check_test_fraction(test_fraction: float) -> None:
    if (
        not isinstance(test_fraction, (int, float, np.integer, np.floating))
        or isinstance(test_fraction, bool)
        or not 0.0 < test_fraction < 1.0
    ):
        raise DataError(f"`test_fraction` must lie strictly between 0 and 1, got {test_fraction}")


def train_test_split(
    x: np.ndarray, y: np.ndarray, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out a stratified fraction of the examples for testing.

    ``round(test_fraction * n)`` examples go to the test split, shared out over
    the classes in proportion to their counts (largest remainder first) and
    chosen within each class by a seeded NumPy generator, so both splits keep
    the class proportions. Every class keeps at least one training example
    (a class of one example is never held out), so the test split may get a
    few fewer than ``round(test_fraction * n)``. Same seed, same split.

    Returns:
      ``(x_train, y_train, x_test, y_test)``.

    Raises:
      DataError: a fraction outside (0, 1), or a split that leaves either side
        empty.
    """
    _check_test_fraction(test_fraction)
    n = len(y)
    n_test = int(round(test_fraction * n))
    if n_test == 0 or n_test == n:
        raise DataError(
            f"{n} examples are too few to hold out a test fraction of "
            f"{test_fraction}; provide more examples or change the fraction"
        )
    classes, counts = np.unique(y, return_counts=True)
    # n_test split over the classes in proportion to their counts (largest remainder)
    share = test_fraction * counts
    per_class = np.floor(share).astype(np.int64)  # < counts, as test_fraction < 1
    left = n_test - int(per_class.sum())
    for c in np.argsort(-(share - per_class), kind="stable"):
        if left == 0:
            break
        if per_class[c] < counts[c] - 1:  # at least one training example per class
            per_class[c] += 1
            left -= 1
    if per_class.sum() == 0:
        raise DataError(
            f"{n} examples in {len(classes)} classes are too few to hold out "
            f"a test fraction of {test_fraction} and keep every class in "
            f"training; provide more examples"
        )
    rng = np.random.default_rng(seed)
    test_parts, train_parts = [], []
    for c, k in zip(classes, per_class, strict=True):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_parts.append(idx[:k])
        train_parts.append(idx[k:])
    test = rng.permutation(np.concatenate(test_parts))
    train = rng.permutation(np.concatenate(train_parts))
    return x[train], y[train], x[test], y[test]


def standardize(
    x_train: np.ndarray,
    x_test: np.ndarray,
    *,
    per_channel: bool | None = None,
    min_std: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Standardize the inputs with statistics of the training split only.

    x' = (x - mean) / std, applied to both splits with the training split's
    mean and std. For images (examples of shape (H, W, C)) the statistics are
    per channel, over all training pixels, as is usual for images: every pixel
    is scaled alike, so a pixel that happens to be constant in the training
    images (a corner) is not blown up. For other inputs they are per feature.
    A standard deviation below ``min_std`` (a constant feature) is taken as 1.

    Args:
      x_train: training inputs, shape (n, ...).
      x_test: held-out inputs, the same per-example shape.
      per_channel: statistics per channel over (n, H, W); default: for
        examples of shape (H, W, C), per feature otherwise.
      min_std: the smallest standard deviation divided by.

    Returns:
      ``(x_train', x_test', mean, std)``, float32; mean and std have the
      shape they broadcast with: (C,) per channel, x_train.shape[1:] per feature.
    """
    if per_channel is None:
        per_channel = x_train.ndim == 4
    axes = tuple(range(x_train.ndim - 1)) if per_channel else (0,)
    mean = x_train.mean(axis=axes, dtype=np.float64)
    std = x_train.std(axis=axes, dtype=np.float64)
    std = np.where(std < min_std, 1.0, std)
    scale = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    return scale(x_train), scale(x_test), mean.astype(np.float32), std.astype(np.float32)


# --- everything together -----------------------------------------------------------


def _check_split_shapes(source: str, x_train: np.ndarray, x_test: np.ndarray) -> None:
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{source}: training examples have shape {x_train.shape[1:]} but "
            f"test examples have shape {x_test.shape[1:]}; they must match"
        )


def check_dataset_arguments(
    name: str,
    path: str | os.PathLike | None = None,
    num_examples: int | None = None,
    test_fraction: float = 0.2,
) -> None:
    """Check :func:`load_dataset`'s ``name``, ``path``, ``num_examples`` and ``test_fraction``.

    Cheap and reads nothing (but the memory available, for ``num_examples``
    points of spirals or moons: :func:`check_synthetic_size`), so a caller can
    check them before any work. The
    message names the argument at fault in backticks ("pass its `path`"),
    which a front end such as the command line maps to its own option names.

    Raises:
      DataError: an unknown name, a file dataset without ``path``, a built-in
        one with it, ``num_examples`` that is not a positive int or is given
        for a dataset that is not synthetic or needs more memory than is
        available, ``test_fraction`` outside (0, 1).
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (`name`); choose one of {', '.join(DATASETS)}")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise DataError(
            f"`path` must be a file or folder name (str or os.PathLike), got {type(path).__name__}"
        )
    if name in FILE_DATASETS and path is None:
        raise DataError(f"dataset {name!r} is read from a file; pass its `path`")
    if name not in FILE_DATASETS and path is not None:
        raise DataError(
            f"dataset {name!r} is built in and reads no file; drop `path` "
            f"or pick {', '.join(FILE_DATASETS)}"
        )
    if num_examples is not None and name not in ("spirals", "moons"):
        raise DataError(f"`num_examples` only applies to spirals and moons, not {name!r}")
    if num_examples is not None and (
        not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 1
    ):
        raise DataError(f"`num_examples` must be a positive integer, got {num_examples!r}")
    if num_examples is not None and name in ("spirals", "moons"):
        check_synthetic_size(name, num_examples)
    _check_test_fraction(test_fraction)


def load_dataset(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    num_examples: int | None = None,
    standardized: bool = True,
) -> Dataset:
    """Load a dataset by name, split it and standardize it.

    Args:
      name: one of :data:`DATASETS`.
      path: the file (``npz``, ``csv``) or folder (``idx``) to read; only for
        those datasets.
      test_fraction: the fraction held out for testing when the data come
        without a split (digits, spirals, moons, an npz with x and y, csv).
      split_seed: the seed of the held-out split and of the synthetic data.
      num_examples: the number of synthetic points (spirals, moons; default
        2000).
      standardized: standardize with training-split statistics.

    Returns:
      The :class:`Dataset`.

    Raises:
      DataError: an unknown name, a missing or wrong ``path``, bad arrays, or
        labels that are not 0 .. k-1 (the class count rule above).

    Warns:
      DataWarning: a test split without examples of some class; arrays of a
        ``.npz`` that are not used.
    """
    check_dataset_arguments(name, path, num_examples, test_fraction)
    splits: Mapping[str, np.ndarray] | None = None
    rows = None  # the file's line of each example (csv), for the messages
    if path is not None:  # a file dataset: exactly those take a path (checked above)
        if name == "csv":
            x, y, rows = read_csv(path)
        elif name == "npz":
            arrays = load_npz(path)
            if "x" in arrays:
                x, y = arrays["x"], arrays["y"]
            else:
                splits = arrays
        else:
            splits = load_idx(path)
    elif name == "digits":
        x, y = load_digits()
    elif name == "spirals":
        x, y = make_spirals(2000 if num_examples is None else num_examples, seed=split_seed)
    else:  # moons
        x, y = make_moons(2000 if num_examples is None else num_examples, seed=split_seed)
    source = name if path is None else f"{name} {os.fspath(path)}"
    if splits is None:
        x, y = validate_arrays(x, y, source, rows=rows)
        # every class keeps a training example, so these are the training split's classes
        num_classes = count_classes(y, source, rows=rows)
        x_train, y_train, x_test, y_test = train_test_split(
            x, y, test_fraction=test_fraction, seed=split_seed
        )
        missing = check_test_labels(y_test, num_classes, source)
    else:
        train_source, test_source = f"{source} (training split)", f"{source} (test split)"
        x_train, y_train = validate_arrays(splits["x_train"], splits["y_train"], train_source)
        x_test, y_test = validate_arrays(splits["x_test"], splits["y_test"], test_source)
        _check_split_shapes(source, x_train, x_test)
        num_classes = count_classes(y_train, train_source)
        missing = check_test_labels(y_test, num_classes, test_source)
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        warnings.warn(
            f"{source}: the test split has no examples of class"
            f"{'es' if len(missing) > 1 else ''} {shown} (of {num_classes}); the "
            f"test accuracy does not measure {'them' if len(missing) > 1 else 'it'}",
            DataWarning,
            stacklevel=2,
        )
    mean = std = None
    if standardized:
        x_train, x_test, mean, std = standardize(x_train, x_test)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, mean, std)
