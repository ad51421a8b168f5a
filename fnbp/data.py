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

Every problem with the data (a missing file, arrays of the wrong shape, NaN in
the inputs, labels that are not integers) raises :class:`DataError`, a
``ValueError`` whose one-line message names the file and says how to fix it.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import importlib.util
import os
import zipfile
from typing import Any, Mapping

import numpy as np

DATASETS = ("digits", "spirals", "moons", "npz", "csv", "idx")
"""The names :func:`load_dataset` accepts."""

FILE_DATASETS = ("npz", "csv", "idx")
"""The datasets that are read from ``path``."""


class DataError(ValueError):
    """A problem with the data itself; the message says what and how to fix it."""


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


# --- validation ------------------------------------------------------------------


def validate_arrays(x: Any, y: Any, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Check inputs and labels and return them as float32 and int32 arrays.

    Args:
      x: inputs, any real numeric array of shape (n, d1, ...), n >= 1.
      y: labels, shape (n,), integers >= 0 (an integer dtype, or floats that
        are whole numbers, as a CSV file gives).
      source: where the arrays come from, for the error message.

    Returns:
      ``(x, y)`` as ``float32`` and ``int32`` arrays.

    Raises:
      DataError: a non-numeric or non-finite x, a y of the wrong shape, or
        labels that are negative or not whole numbers.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{source}: x has dtype {x.dtype}; inputs must be real numbers "
                        f"(int or float arrays)")
    if y.dtype.kind not in "biuf":
        raise DataError(f"{source}: y has dtype {y.dtype}; labels must be integer class "
                        f"indices 0, 1, ..., k-1")
    if x.ndim < 2:
        raise DataError(f"{source}: x has shape {x.shape}, but inputs must have shape "
                        f"(n, features...) with one row per example; for one feature use "
                        f"x.reshape(-1, 1)")
    if x.shape[0] == 0:
        raise DataError(f"{source}: x holds no examples (shape {x.shape})")
    if y.ndim != 1:
        hint = ("; for one-hot labels pass y.argmax(axis=1)" if y.ndim == 2 else "")
        raise DataError(f"{source}: y has shape {y.shape}, but labels must have shape "
                        f"(n,), one class index per example{hint}")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{source}: x has {x.shape[0]} examples but y has {y.shape[0]} "
                        f"labels; they must match one to one")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        bad = int(np.argwhere(~np.isfinite(x.reshape(x.shape[0], -1)))[0][0])
        raise DataError(f"{source}: x contains NaN or infinity (first in example {bad}); "
                        f"remove or impute those values")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            raise DataError(f"{source}: y contains NaN or infinity; labels must be "
                            f"integer class indices")
        if not np.all(y == np.round(y)):
            bad = int(np.flatnonzero(y != np.round(y))[0])
            raise DataError(f"{source}: y holds non-integer labels (e.g. {float(y[bad])!r} in "
                            f"example {bad}); labels must be class indices 0, 1, ..., k-1")
    if np.any(y < 0):
        raise DataError(f"{source}: y holds negative labels (min {y.min()}); labels must "
                        f"be class indices 0, 1, ..., k-1")
    if y.max() >= 2**31:
        raise DataError(f"{source}: y holds a label {y.max()} too large for a class index")
    return x.astype(np.float32), y.astype(np.int32)


def _check_split_shapes(source: str, x_train: np.ndarray, x_test: np.ndarray) -> None:
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{source}: training examples have shape {x_train.shape[1:]} but "
                        f"test examples have shape {x_test.shape[1:]}; they must match")


def _num_classes(source: str, *labels: np.ndarray) -> int:
    k = int(max(int(y.max()) for y in labels)) + 1
    if k < 2:
        raise DataError(f"{source}: every label is 0; classification needs at least two "
                        f"classes")
    return k


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
        raise DataError("the digits dataset ships with scikit-learn, which is not "
                        "installed; install the train extra: pip install \"fnbp[train]\"")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data",
                        "digits.csv.gz")
    table = None
    if os.path.isfile(path):
        try:
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        except (OSError, ValueError, EOFError):
            table = None
    if (table is None or table.shape != (1797, 65) or table.min() < 0
            or table[:, :64].max() > 16 or set(np.unique(table[:, 64])) != set(range(10))):
        from sklearn.datasets import load_digits as sklearn_load_digits

        bunch = sklearn_load_digits()
        table = np.concatenate([bunch.data, bunch.target[:, None]], axis=1)
    x = table[:, :64].reshape(-1, 8, 8, 1).astype(np.float32)
    return x, table[:, 64].astype(np.int32)


def make_spirals(num_examples: int = 2000, *, num_classes: int = 2, turns: float = 1.5,
                 noise: float = 0.02, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
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
        raise DataError(f"spirals: need num_classes >= 2 and at least one example per "
                        f"class, got num_examples={num_examples}, num_classes={num_classes}")
    rng = np.random.default_rng(seed)
    y = np.arange(num_examples) % num_classes
    t = rng.uniform(0.0, 1.0, num_examples)
    r = 0.1 + 0.9 * t
    theta = 2 * np.pi * (turns * t + y / num_classes)
    x = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
    x = x + noise * rng.standard_normal(x.shape)
    return x.astype(np.float32), y.astype(np.int32)


def make_moons(num_examples: int = 2000, *, noise: float = 0.1,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
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
    rng = np.random.default_rng(seed)
    y = np.arange(num_examples) % 2
    angle = np.pi * rng.uniform(0.0, 1.0, num_examples)
    upper = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    lower = np.stack([1.0 - np.cos(angle), 0.5 - np.sin(angle)], axis=1)
    x = np.where(y[:, None] == 0, upper, lower)
    x = x + noise * rng.standard_normal(x.shape)
    return x.astype(np.float32), y.astype(np.int32)


# --- user files --------------------------------------------------------------------


def _require_file(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{what}: no such file: {path}")
    if os.path.isdir(path):
        raise DataError(f"{what}: {path} is a folder, not a file")
    return path


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read your own arrays from a NumPy ``.npz`` file (never unpickles).

    The file holds either ``x`` and ``y`` (fnbp makes the held-out split) or
    ``x_train``, ``y_train``, ``x_test`` and ``y_test`` (your split is kept),
    for example from ``np.savez("data.npz", x=x, y=y)``.

    Returns:
      The arrays by name, unvalidated (see :func:`validate_arrays`).

    Raises:
      DataError: a missing or unreadable file, an array of Python objects, or
        keys other than the two layouts above.
    """
    path = _require_file(path, "npz")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise DataError(f"npz: {path} holds an array of Python objects; save plain "
                            f"numeric arrays (x as float, y as int)") from error
        raise DataError(f"npz: cannot read {path} as a .npz archive ({error})") from error
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"npz: cannot read {path} as a .npz archive ({error}); "
                        f"write it with np.savez(path, x=x, y=y)") from error
    keys = set(arrays)
    if keys not in ({"x", "y"}, {"x_train", "y_train", "x_test", "y_test"}):
        raise DataError(f"npz: {path} holds arrays {sorted(keys)}, but fnbp expects "
                        f"either x and y, or x_train, y_train, x_test and y_test")
    return arrays


_LABEL_COLUMNS = ("label", "labels", "y", "target", "class")


def load_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read your own examples from a CSV file, one example per row.

    Every cell must be a number. The label is the last column, or the column
    whose header is one of ``label``, ``y``, ``target``, ``class`` when the
    first row is a header (a first row with any non-numeric cell is taken as
    the header).

    Returns:
      ``(x, y)``: x float64 of shape (n, columns - 1), y float64 of shape (n,)
      (whole numbers checked by :func:`validate_arrays`).

    Raises:
      DataError: a missing file, a non-numeric cell, or rows of unequal length.
    """
    path = _require_file(path, "csv")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [(n, row) for n, row in enumerate(csv.reader(handle), start=1)
                    if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"csv: cannot read {path} ({error})") from error
    if not rows:
        raise DataError(f"csv: {path} is empty")
    label_column = -1
    _, first = rows[0]
    if not all(_is_number(cell) for cell in first):
        names = [cell.strip().lower() for cell in first]
        for name in _LABEL_COLUMNS:
            if name in names:
                label_column = names.index(name)
                break
        rows = rows[1:]
        if not rows:
            raise DataError(f"csv: {path} has a header but no rows")
    width = len(rows[0][1])
    if width < 2:
        raise DataError(f"csv: {path} has one column; it needs at least one input column "
                        f"and a label column")
    values = np.empty((len(rows), width), dtype=np.float64)
    for i, (line, row) in enumerate(rows):
        if len(row) != width:
            raise DataError(f"csv: {path} line {line} has {len(row)} columns but the first "
                            f"row has {width}; every row needs the same columns")
        try:
            values[i] = [float(cell) for cell in row]
        except ValueError:
            bad = next(cell for cell in row if not _is_number(cell))
            raise DataError(f"csv: {path} line {line} holds {bad.strip()!r}, which is not "
                            f"a number; every cell must be numeric") from None
    y = values[:, label_column]
    x = np.delete(values, label_column % width, axis=1)
    return x, y


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (the MNIST format), plain or gzip-compressed.

    The header is two zero bytes, a type byte (0x08 unsigned byte, 0x09 signed
    byte, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of
    dimensions, then each dimension as a big-endian uint32; the data follow in
    big-endian order, C layout. Compression is detected from the content (the
    gzip magic bytes), not from the file name.

    Returns:
      The array with the header's shape and the native-endian dtype.

    Raises:
      DataError: a missing file, a bad header, or a data length that does not
        match the header (a truncated or padded file).
    """
    path = _require_file(path, "idx")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"idx: cannot read {path} ({error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"idx: {path} is not an IDX file (bad magic number "
                        f"{raw[:4].hex() or 'empty'}); expected 0000 then a type byte "
                        f"(08, 09, 0b, 0c, 0d or 0e) and the number of dimensions")
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"idx: {path} has a truncated header ({ndim} dimensions, "
                        f"{len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"idx: {path} holds {len(raw)} bytes but its header (shape "
                        f"{shape}, {dtype.name}) needs {expected}; the file is truncated "
                        f"or corrupted")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


_IDX_FILES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def load_idx(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read MNIST-format data from a folder holding the four standard IDX files.

    The folder holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (also with a dot
    before ``idx``, and each optionally ending in ``.gz``), as distributed for
    MNIST, Fashion-MNIST and KMNIST. Their train/test split is kept.

    Returns:
      ``x_train``, ``y_train``, ``x_test``, ``y_test``; images (n, rows, cols)
      get a channel axis, (n, rows, cols, 1).

    Raises:
      DataError: a missing folder or file, or an unreadable file.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DataError(f"idx: no such folder: {folder} (pass the folder that holds "
                        f"train-images-idx3-ubyte and its three siblings)")
    arrays = {}
    for key, names in _IDX_FILES.items():
        candidates = [os.path.join(folder, name + suffix)
                      for name in names for suffix in ("", ".gz")]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            raise DataError(f"idx: {folder} has no {names[0]} (or {names[0]}.gz); it "
                            f"needs the four MNIST files train-images-idx3-ubyte, "
                            f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                            f"t10k-labels-idx1-ubyte")
        array = read_idx(found)
        if key.startswith("x") and array.ndim == 3:
            array = array[..., None]
        arrays[key] = array
    return arrays


# --- split and standardization -----------------------------------------------------


def train_test_split(x: np.ndarray, y: np.ndarray, *, test_fraction: float = 0.2,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out a stratified fraction of the examples for testing.

    ``round(test_fraction * n)`` examples go to the test split, shared out over
    the classes in proportion to their counts (largest remainder first) and
    chosen within each class by a seeded NumPy generator, so both splits keep
    the class proportions. Same seed, same split.

    Returns:
      ``(x_train, y_train, x_test, y_test)``.

    Raises:
      DataError: a fraction outside (0, 1), or a split that leaves either side
        empty.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n = len(y)
    n_test = int(round(test_fraction * n))
    if n_test == 0 or n_test == n:
        raise DataError(f"{n} examples are too few to hold out a test fraction of "
                        f"{test_fraction}; provide more examples or change the fraction")
    classes, counts = np.unique(y, return_counts=True)
    # n_test split over the classes in proportion to their counts (largest remainder)
    share = test_fraction * counts
    per_class = np.floor(share).astype(np.int64)
    extra = np.argsort(-(share - per_class), kind="stable")[: n_test - per_class.sum()]
    per_class[extra] += 1
    rng = np.random.default_rng(seed)
    test_parts, train_parts = [], []
    for c, k in zip(classes, per_class, strict=True):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_parts.append(idx[:k])
        train_parts.append(idx[k:])
    test = rng.permutation(np.concatenate(test_parts))
    train = rng.permutation(np.concatenate(train_parts))
    return x[train], y[train], x[test], y[test]


def standardize(x_train: np.ndarray, x_test: np.ndarray, *, per_channel: bool | None = None,
                min_std: float = 1e-6
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


def load_dataset(name: str, *, path: str | os.PathLike | None = None,
                 test_fraction: float = 0.2, split_seed: int = 0,
                 num_examples: int | None = None, standardized: bool = True) -> Dataset:
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
      DataError: an unknown name, a missing or wrong ``path``, or bad arrays.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name in FILE_DATASETS and path is None:
        raise DataError(f"dataset {name!r} is read from a file; pass its path "
                        f"(--data-path)")
    if name not in FILE_DATASETS and path is not None:
        raise DataError(f"dataset {name!r} is built in and reads no file; drop the path "
                        f"or pick npz, csv or idx")
    if num_examples is not None and name not in ("spirals", "moons"):
        raise DataError(f"num_examples only applies to spirals and moons, not {name!r}")
    splits: Mapping[str, np.ndarray] | None = None
    if name == "digits":
        x, y = load_digits()
    elif name == "spirals":
        x, y = make_spirals(2000 if num_examples is None else num_examples, seed=split_seed)
    elif name == "moons":
        x, y = make_moons(2000 if num_examples is None else num_examples, seed=split_seed)
    elif name == "csv":
        x, y = load_csv(path)
    elif name == "npz":
        arrays = load_npz(path)
        if "x" in arrays:
            x, y = arrays["x"], arrays["y"]
        else:
            splits = arrays
    else:
        splits = load_idx(path)
    source = name if path is None else f"{name} {os.fspath(path)}"
    if splits is None:
        x, y = validate_arrays(x, y, source)
        _num_classes(source, y)
        x_train, y_train, x_test, y_test = train_test_split(
            x, y, test_fraction=test_fraction, seed=split_seed)
    else:
        x_train, y_train = validate_arrays(splits["x_train"], splits["y_train"],
                                           f"{source} (training split)")
        x_test, y_test = validate_arrays(splits["x_test"], splits["y_test"],
                                         f"{source} (test split)")
        _check_split_shapes(source, x_train, x_test)
    num_classes = _num_classes(source, y_train, y_test)
    mean = std = None
    if standardized:
        x_train, x_test, mean, std = standardize(x_train, x_test)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, mean, std)
