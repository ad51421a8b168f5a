"""Readers of your own data files: ``.npz`` archives, CSV tables, IDX (MNIST) files.

Each reader returns plain NumPy arrays, unvalidated (:func:`fnbp.train.data.load_dataset`
validates them), and raises :class:`fnbp.DataError` with a one-line message
for anything it cannot read: a missing file, a file of another kind (a
``.npy`` array or a PNG image named ``.npz``; the message says what the file
really is), a truncated or corrupted archive, a missing value in a CSV cell.
No other exception escapes them (a property-based test feeds them random and
corrupted files).
"""

from __future__ import annotations

import csv
import gzip
import os
import stat
import struct
import warnings
import zipfile
import zlib
from typing import Any

import numpy as np

from fnbp.train._data_checks import DataError, DataWarning, check_memory

# Everything a corrupted archive, .npy header or compressed stream can raise.
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    MemoryError,
    NotImplementedError,
    OverflowError,
    SyntaxError,
    TypeError,
    IndexError,
    RuntimeError,
)


def _require_file(path: str | os.PathLike, what: str) -> str:
    """``path`` as a string, once it is known to name a regular file (checked unopened)."""
    path = os.fspath(path)
    problem = not_a_regular_file(path)
    if problem is not None:
        raise DataError(f"{what}: {problem}")
    return path


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def not_a_regular_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a data file, in words, or None when it is a file.

    Decided from ``os.stat`` alone, without opening the path: opening a named
    pipe blocks until something writes into it, and a device such as
    ``/dev/zero`` never ends. A symbolic link is followed.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"no such file: {path}"
    except OSError as error:
        return f"cannot read {path} ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return None
    kind = next((kind for test, kind in _KINDS if test(mode)), "not a regular file")
    return f"{path} is {kind}, not a file; pass a regular file"


_MAGIC = (
    (b"\x93NUMPY", "a single NumPy array (the .npy format, from np.save)"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"BZh", "bzip2-compressed data"),
    (b"\xfd7zXZ\x00", "xz-compressed data"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
)


def describe_content(head: bytes) -> str:
    """What a file that starts with ``head`` is, in words ("a PNG image", "text").

    Used to say what a file given as a ``.npz`` archive really is.
    """
    if not head:
        return "empty (0 bytes)"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "a Python pickle"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file"
    return f"not a known format (it starts with the bytes {head[:8].hex()})"


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")

NPZ_LAYOUTS = (
    ("x_train", "y_train", "x_test", "y_test"),
    ("x", "y", "x_test", "y_test"),
    ("x", "y"),
)
"""The array names :func:`load_npz` accepts, in order of preference."""


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read your own arrays from a NumPy ``.npz`` file (never unpickles).

    The file holds one of three layouts (the names of ``np.savez``'s keyword
    arguments):

    - ``x`` and ``y``: fnbp makes the held-out split;
    - ``x_train``, ``y_train``, ``x_test`` and ``y_test``: your split is kept;
    - ``x``, ``y``, ``x_test`` and ``y_test`` (as in mnist1d's dict): the
      same, with ``x``, ``y`` the training split.

    Other arrays next to a complete layout are ignored, with a
    :class:`fnbp.train.data.DataWarning` naming them (and are not read, so an
    array of Python objects among them does no harm).

    Returns:
      Either ``{"x", "y"}`` or ``{"x_train", "y_train", "x_test", "y_test"}``,
      unvalidated (see :func:`fnbp.train.data.validate_arrays`).

    Raises:
      DataError: a missing or unreadable file, a file that is not a ``.npz``
        archive (the message says what it is), an array of Python objects,
        or none of the layouts above.
    """
    path = _require_file(path, "npz")
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise DataError(f"npz: cannot read {path} ({error.strerror or error})") from error
    with handle:  # opened here, so that it is closed however np.load fails
        return _read_npz(path, handle)


def _read_npz(path: str, handle: Any) -> dict[str, np.ndarray]:
    try:
        head = handle.read(16)
        handle.seek(0)
    except OSError as error:
        raise DataError(f"npz: cannot read {path} ({error.strerror or error})") from error
    if not head.startswith(_ZIP_MAGIC):
        raise DataError(
            f"npz: {path} is {describe_content(head)}, not a .npz archive; "
            f"write one with np.savez(path, x=x, y=y)"
        )
    try:
        archive = np.load(handle, allow_pickle=False)
    except _READ_ERRORS as error:
        raise DataError(
            f"npz: cannot read {path} as a .npz archive ({_reason(error)}); "
            f"the file is corrupted, write it again with "
            f"np.savez(path, x=x, y=y)"
        ) from error
    if not isinstance(archive, np.lib.npyio.NpzFile):  # pragma: no cover - magic checked
        raise DataError(f"npz: {path} is not a .npz archive")
    with archive:
        names = set(archive.files)
        layout = next((keys for keys in NPZ_LAYOUTS if set(keys) <= names), None)
        if layout is None:
            raise DataError(
                f"npz: {path} holds arrays {sorted(names)}, but fnbp expects "
                f"x and y; or x_train, y_train, x_test and y_test; or x, y, "
                f"x_test and y_test"
            )
        ignored = sorted(names - set(layout))
        if ignored:
            warnings.warn(
                f"npz: {path}: training on {', '.join(layout)}; ignoring the "
                f"other arrays {', '.join(ignored)}",
                DataWarning,
                stacklevel=2,
            )
        arrays = {name: _read_member(path, archive, name) for name in layout}
    if len(layout) == 4 and "x" in arrays:
        arrays = {
            "x_train": arrays["x"],
            "y_train": arrays["y"],
            "x_test": arrays["x_test"],
            "y_test": arrays["y_test"],
        }
    return arrays


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _read_member(path: str, archive: Any, name: str) -> np.ndarray:
    try:  # the size its .npy member says, checked before anything is allocated
        size = archive.zip.getinfo(f"{name}.npy").file_size
    except (KeyError, AttributeError):
        size = None
    if size:
        check_memory(
            f"npz: {path}: the array {name}",
            size,
            "train on a subset of the examples, or on a machine with more memory",
        )
    try:
        value = archive[name]
    except _READ_ERRORS as error:
        if isinstance(error, ValueError) and "pickle" in str(error).lower():
            raise DataError(
                f"npz: {path}: the array {name} holds Python objects, which "
                f"fnbp does not unpickle; save plain numeric arrays (x as float, "
                f"y as int)"
            ) from error
        raise DataError(
            f"npz: {path}: the array {name} is unreadable ({_reason(error)}); "
            f"the file is corrupted, write it again with np.savez"
        ) from error
    if not isinstance(value, np.ndarray):
        raise DataError(
            f"npz: {path}: the member {name} is not a NumPy array; write the "
            f"file with np.savez(path, x=x, y=y)"
        )
    return value


_LABEL_COLUMNS = ("label", "labels", "y", "target", "class")

MISSING_VALUES = ("", "na", "n/a", "nan", "null", "none", "?", "-")
"""Cells (compared lower-case, stripped) that mark a missing value in a CSV file."""


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _is_missing(cell: str) -> bool:
    return cell.strip().lower() in MISSING_VALUES


def read_csv(
    path: str | os.PathLike, *, header: bool | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`load_csv`, plus each example's line number in the file (for messages)."""
    path = _require_file(path, "csv")
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is removed, not read
        # as part of the first cell
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [
                (n, row)
                for n, row in enumerate(csv.reader(handle), start=1)
                if row and any(cell.strip() for cell in row)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(
            f"csv: cannot read {path} ({_reason(error)}); save it as UTF-8 "
            f"text with comma-separated numbers"
        ) from error
    if not rows:
        raise DataError(f"csv: {path} is empty")
    label_column = -1
    first_line, first = rows[0]
    if header is None:
        header = not any(_is_number(cell) or _is_missing(cell) and cell.strip() for cell in first)
    if header:
        names = [cell.strip().lower() for cell in first]
        label_column = next((names.index(name) for name in _LABEL_COLUMNS if name in names), -1)
        rows = rows[1:]
        if not rows:
            raise DataError(f"csv: {path} has a header but no rows")
    width = len(rows[0][1])
    if width < 2:
        raise DataError(
            f"csv: {path} has one column; it needs at least one input column and a label column"
        )
    if header and len(first) != width:
        raise DataError(
            f"csv: {path} has {len(first)} names in its header (line "
            f"{first_line}) but {width} columns in line {rows[0][0]}; give every "
            f"column one name"
        )
    values = np.empty((len(rows), width), dtype=np.float64)
    for i, (line, row) in enumerate(rows):
        if len(row) != width:
            raise DataError(
                f"csv: {path} line {line} has {len(row)} columns but line "
                f"{rows[0][0]} has {width}; every row needs the same columns"
            )
        try:
            values[i] = [float(cell) for cell in row]
        except ValueError:
            column, bad = next(
                (c, cell) for c, cell in enumerate(row, start=1) if not _is_number(cell)
            )
            if _is_missing(bad):
                raise DataError(
                    f"csv: {path} line {line} column {column} is a missing value "
                    f"({bad.strip()!r}); fill it in or drop the row"
                ) from None
            hint = (
                "; a header row must have no numbers in it (row 1 is a header only when "
                "none of its cells is a number)"
                if line == first_line
                else "; every cell must be a number"
            )
            raise DataError(
                f"csv: {path} line {line} column {column} holds {bad.strip()!r}, "
                f"which is not a number{hint}"
            ) from None
    y = values[:, label_column]
    x = np.delete(values, label_column % width, axis=1)
    return x, y, np.array([line for line, _ in rows], dtype=np.int64)


def load_csv(
    path: str | os.PathLike, *, header: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read your own examples from a CSV file (UTF-8), one example per row.

    The header rule: row 1 is a header when none of its cells is a number or
    a missing-value marker (``NA``, ``N/A``, ``NaN``, ``null``, ``None``, ``?``,
    ``-``); pass ``header=True`` or ``False`` to decide it yourself. A UTF-8
    byte-order mark is removed. The label is the last column, or the column
    whose header is one of ``label``, ``labels``, ``y``, ``target``, ``class``.
    Every other cell must be a number: a missing value anywhere (row 1
    included) is an error naming its line and column.

    Returns:
      ``(x, y)``: x float64 of shape (n, columns - 1), y float64 of shape (n,)
      (whole numbers checked by :func:`fnbp.train.data.validate_arrays`).

    Raises:
      DataError: a missing or non-UTF-8 file, a non-numeric or missing cell,
        or rows of unequal length.
    """
    x, y, _ = read_csv(path, header=header)
    return x, y


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
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"idx: cannot read {path} ({_reason(error)})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(
            f"idx: {path} is not an IDX file (bad magic number "
            f"{raw[:4].hex() or 'empty'}); expected 0000 then a type byte "
            f"(08, 09, 0b, 0c, 0d or 0e) and the number of dimensions"
        )
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"idx: {path} has a truncated header ({ndim} dimensions, {len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = 1
    for d in shape:  # Python ints: no overflow for any header
        size *= d
    expected = header + size * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"idx: {path} holds {len(raw)} bytes but its header (shape "
            f"{shape}, {dtype.name}) needs {expected}; the file is truncated "
            f"or corrupted"
        )
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
        raise DataError(
            f"idx: no such folder: {folder} (pass the folder that holds "
            f"train-images-idx3-ubyte and its three siblings)"
        )
    arrays = {}
    for key, names in _IDX_FILES.items():
        candidates = [
            os.path.join(folder, name + suffix) for name in names for suffix in ("", ".gz")
        ]
        # anything of that name: read_idx says what it is when it is not a file
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:
            raise DataError(
                f"idx: {folder} has no {names[0]} (or {names[0]}.gz); it "
                f"needs the four MNIST files train-images-idx3-ubyte, "
                f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                f"t10k-labels-idx1-ubyte"
            )
        array = read_idx(found)
        if key.startswith("x") and array.ndim == 3:
            array = array[..., None]
        arrays[key] = array
    return arrays
