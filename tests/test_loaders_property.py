"""Property-based tests of the data loaders: random and corrupted .npz, CSV and IDX files.

Whatever bytes a file holds, ``fnbp.load_dataset`` either returns a valid
:class:`fnbp.train.data.Dataset` or raises :class:`fnbp.DataError` with a one-line
message; no other exception escapes. NumPy only: nothing here compiles.
"""

from __future__ import annotations

import gzip
import io
import os
import tempfile
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fnbp.train import data, data_files
from fnbp.train.data import DataError, DataWarning

SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def outcome(name, path):
    """Load; return the Dataset, or the DataError's message (checked to be one line)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy's overflow/invalid warnings would be silent bugs
        warnings.simplefilter("ignore", DataWarning)
        try:
            dataset = data.load_dataset(name, path=path)
        except DataError as error:
            message = str(error)
            assert message and "\n" not in message and "\r" not in message, repr(message)
            return message
    n_train, n_test = len(dataset.y_train), len(dataset.y_test)
    assert dataset.x_train.dtype == dataset.x_test.dtype == np.float32
    assert dataset.y_train.dtype == dataset.y_test.dtype == np.int32
    assert n_train >= 1 and n_test >= 1 and np.all(np.isfinite(dataset.x_train))
    assert np.all(np.isfinite(dataset.x_test))
    k = dataset.num_classes
    assert sorted(set(dataset.y_train.tolist())) == list(range(k))
    assert 0 <= dataset.y_test.min() and dataset.y_test.max() < k
    return dataset


def record(name, result):
    """Count the outcomes (shown by pytest --hypothesis-show-statistics)."""
    event(f"{name}: {'DataError' if isinstance(result, str) else 'loaded'}")


def write(folder, name, raw):
    path = os.path.join(folder, name)
    with open(path, "wb") as handle:
        handle.write(raw)
    return path


def corrupt(draw, raw):
    """Flip some bytes, truncate, append junk, or replace everything."""
    how = draw(st.sampled_from(["flip", "truncate", "append", "replace"] + ["keep"] * 4))
    if how == "flip" and raw:
        raw = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(raw) - 1))
            raw[at] = draw(st.integers(0, 255))
        return bytes(raw)
    if how == "truncate":
        return raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    if how == "append":
        return raw + draw(st.binary(min_size=1, max_size=64))
    if how == "replace":
        return draw(st.binary(max_size=256))
    return raw


DTYPES = st.sampled_from(["float64", "float32", "int64", "uint8", "int8", "float16", "bool"])


@st.composite
def arrays(draw, n, ndim_min=1, ndim_max=3, label=False):
    clean = draw(st.booleans())  # half of them plausible data, to reach the loaded path
    if label:
        dtype = draw(st.sampled_from(["int64", "int32", "uint8", "float64"]))
        shape = (n,) if clean or draw(st.booleans()) else (n, draw(st.integers(1, 3)))
        pool = [0, 1] if clean else [0, 1, 2, 3, 1.5, -1, 1e9, np.nan]
    else:
        dtype = draw(DTYPES)
        shape = (n,) + tuple(
            draw(st.lists(st.integers(1, 3), min_size=ndim_min - 1, max_size=ndim_max - 1))
        )
        pool = [0.0, 1.0, -2.5, 7.0] + ([] if clean else [1e300, np.inf, np.nan])
    values = draw(
        st.lists(st.sampled_from(pool), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
    )
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array(values, dtype=np.float64).astype(dtype).reshape(shape)


@st.composite
def npz_files(draw):
    layout = draw(st.sampled_from(data_files.NPZ_LAYOUTS * 3 + (("x", "y", "extra"), ("inputs",))))
    members = {}
    sizes = {"train": draw(st.integers(0, 12)), "test": draw(st.integers(0, 6))}
    for name in layout:
        n = sizes["test" if name.endswith("test") else "train"]
        n = n if draw(st.integers(0, 7)) else draw(st.integers(0, 12))  # sometimes unequal
        if draw(st.integers(0, 9)) == 0:
            members[name] = np.array([{"a": 1}, None], dtype=object)
        else:
            members[name] = draw(arrays(n, label=name.startswith("y"), ndim_min=2))
    buffer = io.BytesIO()
    if draw(st.booleans()):
        np.savez_compressed(buffer, **members)
    else:
        np.savez(buffer, **members)
    return corrupt(draw, buffer.getvalue())


@SETTINGS
@given(raw=npz_files())
def test_any_npz_file_loads_or_is_one_data_error(raw):
    with tempfile.TemporaryDirectory() as folder:
        record("npz", outcome("npz", write(folder, "d.npz", raw)))


NUMBERS = ["0", "1", "2", "1.5", "-3", "7", " 4 ", "1e3"]
CELLS = st.sampled_from(
    NUMBERS * 4
    + [
        "1e300",
        "nan",
        "inf",
        "NA",
        "",
        " ",
        "x",
        "label",
        "\ufeff1",
        '"1"',
        '"a,b"',
        "1e400",
        "\x00",
    ]
)
LABELS = st.sampled_from(["0", "1"] * 8 + ["2", "1.5", "-1", "NA", "5"])


@st.composite
def csv_files(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    width = draw(st.integers(1, 4))
    ragged = draw(st.integers(0, 3)) == 0
    rows = draw(
        st.lists(
            st.lists(CELLS, min_size=width - 1 if ragged else width, max_size=width),
            min_size=1,
            max_size=12,
        )
    )
    if draw(st.booleans()):  # mostly well-formed labels in the last column
        rows = [row[:-1] + [draw(LABELS)] if row else row for row in rows]
    text = "\n".join(",".join(row) for row in rows)
    if draw(st.booleans()):
        text = "\ufeff" + text
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["utf-16", "latin-1"]))
    return text.encode(encoding, errors="replace")


@SETTINGS
@given(raw=csv_files())
def test_any_csv_file_loads_or_is_one_data_error(raw):
    with tempfile.TemporaryDirectory() as folder:
        record("csv", outcome("csv", write(folder, "d.csv", raw)))


def idx_bytes(array):
    codes = {
        np.dtype("uint8"): 0x08,
        np.dtype("int8"): 0x09,
        np.dtype("float64"): 0x0E,
        np.dtype("float32"): 0x0D,
    }
    header = (
        bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    )
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@st.composite
def idx_folders(draw):
    files = {}
    sizes = {"train": draw(st.integers(0, 12)), "t10k": draw(st.integers(0, 6))}
    for key, names in data_files._IDX_FILES.items():
        n = sizes[names[0].split("-")[0]]
        if key.startswith("x"):
            shape = (n,) + tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
            dtype = draw(st.sampled_from(["uint8", "float32", "float64"]))
        else:
            shape = (n,)
            dtype = draw(st.sampled_from(["uint8", "int8"]))
        values = draw(
            st.lists(
                st.integers(0, 3 if key.startswith("x") else 1),
                min_size=int(np.prod(shape)),
                max_size=int(np.prod(shape)),
            )
        )
        raw = idx_bytes(np.array(values, dtype=dtype).reshape(shape))
        if draw(st.integers(0, 7)) == 0:
            raw = corrupt(draw, raw)
        compressed = draw(st.booleans())
        if compressed:
            raw = gzip.compress(raw)
            if draw(st.integers(0, 4)) == 0:
                raw = corrupt(draw, raw)
        files[names[0] + (".gz" if compressed else "")] = raw
    return files


@SETTINGS
@given(files=idx_folders())
def test_any_idx_folder_loads_or_is_one_data_error(files):
    with tempfile.TemporaryDirectory() as folder:
        for name, raw in files.items():
            write(folder, name, raw)
        record("idx", outcome("idx", folder))


@pytest.mark.parametrize(
    "name, raw, match",
    [
        (
            "npz",
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }",
            "is a single NumPy array",
        ),
        ("npz", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a PNG image, not a .npz archive"),
        ("npz", b"PK\x03\x04" + bytes(60), "cannot read"),
        ("csv", "\ufeff\x00,1\n".encode(), "line 1 column 1 holds '\\x00', which is not a number"),
        ("csv", b"\xff\xfe1\x00,\x000\x00", "cannot read"),
    ],
)
def test_examples_found_by_the_property_tests(tmp_path, name, raw, match):
    message = outcome(name, write(tmp_path, "d." + name, raw))
    assert isinstance(message, str) and match in message, message
