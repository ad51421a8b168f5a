"""Tests of fnbp.train.data: the loaders, the split, the standardization, the errors."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from fnbp.train import data
from fnbp.train.data import DataError


def write_idx(path, array, *, compress=False, type_byte=None):
    """Write ``array`` as an IDX file: 0, 0, type, ndim, big-endian dims, data."""
    codes = {
        np.dtype("uint8"): 0x08,
        np.dtype("int8"): 0x09,
        np.dtype("int16"): 0x0B,
        np.dtype("int32"): 0x0C,
        np.dtype("float32"): 0x0D,
        np.dtype("float64"): 0x0E,
    }
    code = codes[array.dtype] if type_byte is None else type_byte
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        raw = gzip.compress(raw)
    with open(path, "wb") as handle:
        handle.write(raw)


# --- built-in datasets ---------------------------------------------------------------


def test_load_digits_images_and_labels():
    x, y = data.load_digits()
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int32
    assert set(np.unique(y)) == set(range(10))
    assert x.min() == 0.0 and x.max() == 16.0


def test_load_dataset_digits_standardized_with_training_statistics_only():
    d = data.load_dataset("digits", test_fraction=0.25, split_seed=3)
    raw = data.load_dataset("digits", test_fraction=0.25, split_seed=3, standardized=False)
    assert d.num_classes == 10 and d.input_shape == (8, 8, 1)
    assert d.x_train.shape[0] + d.x_test.shape[0] == 1797
    assert d.x_test.shape[0] == round(0.25 * 1797)
    # images: one mean and std per channel, over all training pixels
    mean = raw.x_train.astype(np.float64).mean()
    std = raw.x_train.astype(np.float64).std()
    np.testing.assert_allclose(d.x_train, (raw.x_train - mean) / std, rtol=1e-5, atol=1e-5)
    # the test split is scaled with the TRAINING statistics, not its own
    np.testing.assert_allclose(d.x_test, (raw.x_test - mean) / std, rtol=1e-5, atol=1e-5)
    test_mean = raw.x_test.astype(np.float64).mean()
    assert test_mean != mean
    np.testing.assert_allclose(d.x_test.mean(), (test_mean - mean) / std, rtol=1e-4)
    np.testing.assert_allclose(d.mean, [mean], rtol=1e-6)
    np.testing.assert_allclose(d.std, [std], rtol=1e-6)
    np.testing.assert_array_equal(d.y_test, raw.y_test)


def test_make_spirals_deterministic_balanced_and_seeded():
    x1, y1 = data.make_spirals(300, seed=5)
    x2, y2 = data.make_spirals(300, seed=5)
    x3, _ = data.make_spirals(300, seed=6)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert x1.shape == (300, 2) and x1.dtype == np.float32 and y1.dtype == np.int32
    assert np.bincount(y1).tolist() == [150, 150]
    radius = np.hypot(x1[:, 0], x1[:, 1])
    assert 0.0 < radius.min() and radius.max() < 1.2


def test_make_moons_two_balanced_classes():
    x, y = data.make_moons(101, seed=0)
    assert x.shape == (101, 2) and np.bincount(y).tolist() == [51, 50]
    # class 0 is the upper moon: its mean height is above class 1's
    assert x[y == 0, 1].mean() > x[y == 1, 1].mean()


# --- split and standardization ---------------------------------------------------------


def test_train_test_split_stratified_disjoint_and_complete():
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    y = np.repeat(np.arange(4), 25).astype(np.int32)
    xtr, ytr, xte, yte = data.train_test_split(x, y, test_fraction=0.2, seed=1)
    assert np.bincount(yte).tolist() == [5, 5, 5, 5]
    assert np.bincount(ytr).tolist() == [20, 20, 20, 20]
    rows = np.concatenate([xtr[:, 0], xte[:, 0]])
    np.testing.assert_array_equal(np.sort(rows), x[:, 0])
    # labels travel with their rows
    np.testing.assert_array_equal(ytr, (xtr[:, 0] // 2 // 25).astype(np.int32))
    again = data.train_test_split(x, y, test_fraction=0.2, seed=1)
    np.testing.assert_array_equal(again[2], xte)


def test_train_test_split_rejects_bad_fraction_and_too_few_examples():
    x, y = np.zeros((3, 1), np.float32), np.array([0, 1, 2], np.int32)
    with pytest.raises(DataError, match="`test_fraction` must lie strictly between 0 and 1"):
        data.train_test_split(x, y, test_fraction=1.0)
    with pytest.raises(DataError, match="too few to hold out"):
        data.train_test_split(x, y, test_fraction=0.1)


def test_standardize_per_feature_constant_feature_is_only_centred():
    x_train = np.array([[1.0, 5.0], [3.0, 5.0]], np.float32)
    x_test = np.array([[2.0, 7.0]], np.float32)
    a, b, mean, std = data.standardize(x_train, x_test)
    np.testing.assert_allclose(a, [[-1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(b, [[0.0, 2.0]])
    np.testing.assert_allclose(mean, [2.0, 5.0])
    np.testing.assert_allclose(std, [1.0, 1.0])


def test_standardize_images_per_channel():
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(5, 4, 3, 2)) * [1.0, 10.0] + [0.0, 3.0]
    x_test = rng.normal(size=(2, 4, 3, 2))
    a, b, mean, std = data.standardize(x_train, x_test)
    assert mean.shape == (2,) and std.shape == (2,)
    np.testing.assert_allclose(a.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(a.std(axis=(0, 1, 2)), 1.0, rtol=1e-5)
    want = (x_test - x_train.mean(axis=(0, 1, 2))) / x_train.std(axis=(0, 1, 2))
    np.testing.assert_allclose(b, want, rtol=1e-5, atol=1e-6)
    _, _, mean, _ = data.standardize(x_train, x_test, per_channel=False)
    assert mean.shape == (4, 3, 2)


# --- validation ----------------------------------------------------------------------


def test_validate_arrays_accepts_whole_float_labels_and_casts():
    x, y = data.validate_arrays(np.ones((3, 2), np.float64), np.array([0.0, 2.0, 1.0]), "t")
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert y.tolist() == [0, 2, 1]


@pytest.mark.parametrize(
    "x, y, match",
    [
        (np.ones(4), np.zeros(4), r"x has shape \(4,\).*one row per example"),
        (np.ones((4, 2)), np.zeros(3), "x has 4 examples but y has 3 labels"),
        (np.ones((4, 2)), np.eye(4)[:, :2], r"y has shape \(4, 2\).*argmax"),
        (
            np.array([[1.0], [np.nan]]),
            np.zeros(2),
            r"x contains NaN or infinity \(first in example 1\)",
        ),
        (np.array([[1.0], [np.inf]]), np.zeros(2), "NaN or infinity"),
        (
            np.ones((3, 1)),
            np.array([0.0, 1.5, 1.0]),
            r"non-integer labels \(e.g. 1.5 in example 1\)",
        ),
        (np.ones((2, 1)), np.array([0, -1]), "the negative label -1 in example 1"),
        (np.ones((2, 1)), np.array([0.0, np.nan]), "y holds nan in example 1"),
        (np.array([["a"], ["b"]]), np.zeros(2), "x has dtype <U1"),
        (np.zeros((0, 2)), np.zeros(0), "no examples"),
    ],
)
def test_validate_arrays_errors(x, y, match):
    with pytest.raises(DataError, match=match):
        data.validate_arrays(x, y, "mydata")


# --- npz -------------------------------------------------------------------------------


def test_load_dataset_npz_xy_is_split_and_standardized(tmp_path):
    x, y = data.make_moons(50, seed=0)
    path = tmp_path / "d.npz"
    np.savez(path, x=x.astype(np.float64), y=y.astype(np.int64))
    d = data.load_dataset("npz", path=path)
    assert d.x_train.shape[0] + d.x_test.shape[0] == 50
    assert d.num_classes == 2 and d.input_shape == (2,)
    np.testing.assert_allclose(d.x_train.mean(axis=0), 0.0, atol=1e-6)


def test_load_dataset_npz_keeps_the_given_split(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "split.npz"
    np.savez(
        path,
        x_train=rng.normal(size=(6, 3, 3)),
        y_train=np.array([0, 1, 2] * 2),
        x_test=rng.normal(size=(2, 3, 3)),
        y_test=np.array([1, 0]),
    )
    with pytest.warns(
        data.DataWarning,
        match="the test split has no examples of class 2 "
        r"\(of 3\)",
    ):
        d = data.load_dataset("npz", path=path, standardized=False)
    assert d.x_train.shape == (6, 3, 3) and d.x_test.shape == (2, 3, 3)
    assert d.num_classes == 3 and d.y_test.tolist() == [1, 0]


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"inputs": np.ones((2, 1)), "y": np.zeros(2)}, r"holds arrays \['inputs', 'y'\]"),
        ({"x": np.ones((2, 1)), "y": np.array([0.5, 1.0])}, "non-integer labels"),
        ({"x": np.ones((3, 2)), "y": np.zeros(2, int)}, "x has 3 examples but y has 2"),
        ({"x": np.array([[0.0], [np.nan]]), "y": np.array([0, 1])}, "NaN"),
        ({"x": np.ones((2, 1)), "y": np.zeros(2, int)}, "every label is 0"),
    ],
)
def test_load_dataset_npz_errors(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match):
        data.load_dataset("npz", path=path)


def test_load_dataset_npz_mismatched_split_shapes(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(
        path,
        x_train=np.ones((2, 3)),
        y_train=np.array([0, 1]),
        x_test=np.ones((2, 4)),
        y_test=np.array([0, 1]),
    )
    with pytest.raises(DataError, match=r"training examples have shape \(3,\) but test"):
        data.load_dataset("npz", path=path)


def test_load_npz_never_unpickles_and_rejects_garbage(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.zeros(2))
    with pytest.raises(DataError, match="the array x holds Python objects"):
        data.load_npz(path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 this is not really a zip archive")
    with pytest.raises(DataError, match="cannot read .* as a .npz archive"):
        data.load_npz(junk)
    with pytest.raises(DataError, match="no such file"):
        data.load_npz(tmp_path / "missing.npz")


# --- csv -------------------------------------------------------------------------------


def test_load_csv_with_header_and_named_label_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("label,a,b\n1,0.5,2\n0,1.5,3\n\n2,2.5,4\n")
    x, y = data.load_csv(path)
    np.testing.assert_array_equal(x, [[0.5, 2], [1.5, 3], [2.5, 4]])
    np.testing.assert_array_equal(y, [1, 0, 2])


def test_load_csv_without_header_label_last(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("0.5,2,1\n1.5,3,0\n2.5,4,1\n3.5,5,0\n")
    d = data.load_dataset("csv", path=path, test_fraction=0.5, standardized=False)
    assert sorted(d.y_train.tolist()) == sorted(d.y_test.tolist()) == [0, 1]
    assert d.input_shape == (2,)


@pytest.mark.parametrize(
    "text, match",
    [
        ("1,2,0\n3,oops,1\n", r"line 2 column 2 holds 'oops', which is not a number"),
        ("1,2,0\n3,1\n", "line 2 has 2 columns but line 1 has 3"),
        ("1,2,0.5\n3,4,1\n", "non-integer labels"),
        ("1,nan,0\n3,4,1\n", "x contains NaN"),
        ("", "is empty"),
        ("a,label\n", "has a header but no rows"),
        ("1\n2\n", "has one column"),
        # missing values on any row, and the header rule
        ("NA,2,0\n3,4,1\n", r"line 1 column 1 is a missing value \('NA'\); fill it in or drop"),
        ("1,2,0\nNA,4,1\n", r"line 2 column 1 is a missing value \('NA'\)"),
        ("1,,0\n3,4,1\n", r"line 1 column 2 is a missing value \(''\)"),
        (
            "id,2,label\n3,4,1\n",
            r"line 1 column 1 holds 'id', which is not a number; a header "
            r"row must have no numbers in it",
        ),
        ("a,b\n1,2,0\n", r"has 2 names in its header \(line 1\) but 3 columns in line 2"),
        ("1,2,0\n3,4,1e400\n", "y holds inf in line 2"),
        ("1,2,0\n3,4,-1\n", "the negative label -1 in line 2"),
    ],
)
def test_load_csv_errors(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        data.load_dataset("csv", path=path)


# --- idx -------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "float64"])
def test_read_idx_round_trip(tmp_path, compress, dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    path = tmp_path / "a-idx3-ubyte"
    write_idx(path, array, compress=compress)
    got = data.read_idx(path)
    np.testing.assert_array_equal(got, array)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative


def test_read_idx_errors(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    good = tmp_path / "good"
    write_idx(good, array)
    raw = good.read_bytes()
    cases = {
        "truncated": (
            raw[:-1],
            r"holds 23 bytes but its header \(shape \(3, 4\), uint8\) needs 24",
        ),
        "padded": (raw + b"\x00", "needs 24; the file is truncated or corrupted"),
        "magic": (b"\x01" + raw[1:], "not an IDX file"),
        "type": (raw[:2] + b"\x07" + raw[3:], "not an IDX file"),
        "header": (raw[:6], "truncated header"),
        "empty": (b"", "not an IDX file"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=match):
            data.read_idx(path)
    with pytest.raises(DataError, match="no such file"):
        data.read_idx(tmp_path / "nothing")


def test_load_dataset_idx_folder_with_mixed_gzip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 5, 5), dtype=np.uint8)
    labels = np.arange(10, dtype=np.uint8) % 3
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    write_idx(tmp_path / "t10k-images.idx3-ubyte", images[:4])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:4], compress=True)
    d = data.load_dataset("idx", path=tmp_path, standardized=False)
    assert d.x_train.shape == (10, 5, 5, 1) and d.x_test.shape == (4, 5, 5, 1)
    np.testing.assert_array_equal(d.x_train[..., 0], images)
    np.testing.assert_array_equal(d.y_test, labels[:4])
    assert d.num_classes == 3


def test_load_dataset_idx_missing_file_and_folder(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(DataError, match="has no train-labels-idx1-ubyte"):
        data.load_dataset("idx", path=tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        data.load_dataset("idx", path=tmp_path / "nope")


def test_load_dataset_idx_label_count_mismatch(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1], np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 2, 2), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1], np.uint8))
    with pytest.raises(DataError, match=r"\(training split\): x has 3 examples but y has 2"):
        data.load_dataset("idx", path=tmp_path)


# --- load_dataset arguments ------------------------------------------------------------


def test_load_dataset_argument_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        data.load_dataset("cifar")
    with pytest.raises(DataError, match="pass its `path`"):
        data.load_dataset("npz")
    with pytest.raises(DataError, match="built in and reads no file"):
        data.load_dataset("digits", path=tmp_path / "x.npz")
    with pytest.raises(DataError, match="no such file"):
        data.load_dataset("npz", path=tmp_path / "missing.npz")
    with pytest.raises(DataError, match="is a folder"):
        data.load_dataset("csv", path=tmp_path)
    with pytest.raises(DataError, match="`num_examples` only applies"):
        data.load_dataset("digits", num_examples=10)
    with pytest.raises(DataError, match="`num_examples` must be a positive integer, got 0"):
        data.load_dataset("spirals", num_examples=0)
    with pytest.raises(DataError, match="`test_fraction` must lie strictly between 0 and 1"):
        data.load_dataset("digits", test_fraction=0.0)
    assert os.listdir(tmp_path) == []


# --- the class count, the header rule, values after the cast (issue 14) ------------------


def test_a_stray_label_is_an_error_naming_its_line_not_a_bigger_model(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        "a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(8)) + "9,9,100000\n"
    )
    with pytest.raises(
        DataError,
        match=r"csv .*d\.csv: label 100000 in line 10 is not a "
        r"class index: the 3 distinct labels must be 0 \.\. 2, "
        r"but class 2 has no examples; fix or drop that row",
    ):
        data.load_dataset("csv", path=path)
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.ones((9, 2)), y=np.array([0, 1] * 4 + [5]))
    with pytest.raises(
        DataError,
        match=r"label 5 in example 8 is not a class index.*"
        r"class 2 has no examples",
    ):
        data.load_dataset("npz", path=npz)


@pytest.mark.parametrize(
    "labels, match",
    [
        ([1] * 6, "every label is 1; classification needs at least two classes"),
        ([0] * 6, "every label is 0"),
        ([1, 2] * 3, "label 2 in example 1 .* class 0 has no examples"),
    ],
)
def test_labels_must_be_0_to_k_minus_1(labels, match):
    with pytest.raises(DataError, match=match):
        data.count_classes(np.array(labels), "src")


def test_test_labels_are_checked_against_the_training_classes(tmp_path):
    path = tmp_path / "split.npz"
    np.savez(
        path,
        x_train=np.ones((4, 2)),
        y_train=np.array([0, 1, 0, 1]),
        x_test=np.ones((3, 2)),
        y_test=np.array([0, 1, 2]),
    )
    with pytest.raises(
        DataError,
        match=r"\(test split\): label 2 in example 2 is not one of "
        r"the 2 classes of the training split \(0 \.\. 1\)",
    ):
        data.load_dataset("npz", path=path)


def test_a_class_of_one_example_stays_in_training_and_the_test_split_warns():
    x = np.arange(21, dtype=np.float64).reshape(-1, 1)
    y = np.array([0] * 10 + [1] * 10 + [2])
    x_train, y_train, x_test, y_test = data.train_test_split(x, y, test_fraction=0.5)
    assert sorted(set(y_train.tolist())) == [0, 1, 2] and 2 not in y_test
    assert len(x_test) == 10 and len(x_train) == 11


def previous_split(y, test_fraction, seed):
    """The split before classes kept a training example: plain largest remainder."""
    classes, counts = np.unique(y, return_counts=True)
    share = test_fraction * counts
    per_class = np.floor(share).astype(np.int64)
    extra = np.argsort(-(share - per_class), kind="stable")
    per_class[extra[: int(round(test_fraction * len(y))) - per_class.sum()]] += 1
    rng = np.random.default_rng(seed)
    parts = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    test = rng.permutation(np.concatenate([p[:k] for p, k in zip(parts, per_class)]))
    train = rng.permutation(np.concatenate([p[k:] for p, k in zip(parts, per_class)]))
    return train, test


def test_the_split_is_unchanged_where_every_class_keeps_training_examples():
    # the same split as before for such data: old runs resume on the same data
    y = np.array([0] * 7 + [1] * 11 + [2] * 5)
    x = np.arange(len(y))[:, None]
    train, test = previous_split(y, 0.3, seed=4)
    x_train, _, x_test, _ = data.train_test_split(x, y, test_fraction=0.3, seed=4)
    np.testing.assert_array_equal(x_train[:, 0], train)
    np.testing.assert_array_equal(x_test[:, 0], test)


def test_the_test_split_missing_a_class_is_a_warning(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("".join(f"{i},{i % 2}\n" for i in range(20)) + "5,2\n")
    with pytest.warns(
        data.DataWarning,
        match="the test split has no examples of class 2 "
        r"\(of 3\); the test accuracy does not measure it",
    ):
        d = data.load_dataset("csv", path=path)
    assert d.num_classes == 3 and 2 in d.y_train


def test_csv_byte_order_mark_is_stripped_and_the_header_kept(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffa,b,label\n1,2,0\n3,4,1\n".encode("utf-8"))
    x, y = data.load_csv(path)
    np.testing.assert_array_equal(x, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(y, [0, 1])
    path.write_bytes("\ufeff1,2,0\n3,4,1\n".encode("utf-8"))  # no header: row 1 is data
    x, y = data.load_csv(path)
    assert x.shape == (2, 2) and y.tolist() == [0, 1]


def test_csv_header_can_be_forced(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("1,2,3\n4,5,0\n6,7,1\n")
    x, y = data.load_csv(path, header=True)
    assert x.shape == (2, 2) and y.tolist() == [0, 1]
    x, y = data.load_csv(path, header=False)
    assert x.shape == (3, 2) and y.tolist() == [3, 0, 1]


def test_values_are_checked_after_the_cast_to_float32(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("1,2,0\n3,1e300,1\n5,6,0\n7,8,1\n")
    with pytest.raises(
        DataError,
        match=r"csv .*d\.csv: x holds 1e\+300 in line 2, too large "
        r"for float32 \(largest 3.4e\+38\); rescale the inputs",
    ):
        data.load_dataset("csv", path=path)
    x, _ = data.validate_arrays(np.array([[1e300]]), np.array([0]), "t", dtype=np.float64)
    assert x.dtype == np.float64 and x[0, 0] == 1e300


# --- npz layouts and files of another kind --------------------------------------------------


def test_npz_layout_x_y_x_test_y_test_is_the_given_split(tmp_path):
    path = tmp_path / "mnist1d.npz"
    np.savez(
        path,
        x=np.arange(8.0).reshape(4, 2),
        y=np.array([0, 1, 0, 1]),
        x_test=np.ones((2, 2)),
        y_test=np.array([1, 0]),
    )
    d = data.load_dataset("npz", path=path, standardized=False)
    np.testing.assert_array_equal(d.x_train, np.arange(8.0).reshape(4, 2))
    assert d.y_test.tolist() == [1, 0] and d.num_classes == 2


def test_npz_extra_arrays_are_ignored_with_a_warning_and_not_read(tmp_path):
    path = tmp_path / "extra.npz"
    np.savez(
        path,
        x=np.ones((4, 2)),
        y=np.array([0, 1, 0, 1]),
        templates=np.array([{"a": 1}], dtype=object),
        t=np.arange(3),
    )
    with pytest.warns(
        data.DataWarning, match="training on x, y; ignoring the other arrays t, templates"
    ):
        arrays = data.load_npz(path)
    assert sorted(arrays) == ["x", "y"]


def test_a_file_of_another_kind_named_npz_says_what_it_is(tmp_path):
    npy = tmp_path / "renamed.npz"
    with open(npy, "wb") as handle:
        np.save(handle, np.ones(3))
    with pytest.raises(
        DataError,
        match=r"is a single NumPy array \(the .npy format, from "
        r"np.save\), not a .npz archive; write one with "
        r"np.savez\(path, x=x, y=y\)",
    ):
        data.load_npz(npy)
    png = tmp_path / "image.npz"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(DataError, match="image.npz is a PNG image, not a .npz archive"):
        data.load_npz(png)
    text = tmp_path / "table.npz"
    text.write_text("1,2,0\n")
    with pytest.raises(DataError, match="is a text file, not a .npz archive"):
        data.load_npz(text)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"is empty \(0 bytes\), not a .npz archive"):
        data.load_npz(empty)


# --- paths that are not files, sizes that memory cannot hold -------------------------------


def fifo(path):
    os.mkfifo(path)
    return path


def unix_socket(path):
    import socket

    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    return server


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("name", ["npz", "csv"])
def test_a_named_pipe_is_refused_before_it_is_opened(tmp_path, name):
    # opening it would block until something writes into it: the reader never opens it
    path = fifo(tmp_path / f"data.{name}")
    with pytest.raises(DataError) as info:
        data.load_dataset(name, path=path)
    assert str(info.value) == (
        f"{name}: {path} is a named pipe (FIFO), not a file; pass a regular file"
    )


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
@pytest.mark.parametrize("name", ["npz", "csv"])
def test_a_device_is_refused_not_read_forever(name):
    with pytest.raises(
        DataError,
        match=f"^{name}: /dev/zero is a character device, not a file; pass a regular file$",
    ):
        data.load_dataset(name, path="/dev/zero")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_idx_members_and_sockets_that_are_not_files(tmp_path):
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(4, dtype=np.uint8) % 2)
    member = fifo(tmp_path / "train-images-idx3-ubyte")
    with pytest.raises(
        DataError,
        match=f"^idx: {member} is a named pipe \\(FIFO\\), not a file; pass a regular file$",
    ):
        data.load_dataset("idx", path=tmp_path)
    with unix_socket(tmp_path / "s.csv"):
        with pytest.raises(DataError, match="s.csv is a socket, not a file"):
            data.load_csv(tmp_path / "s.csv")
    with pytest.raises(
        DataError, match=f"^npz: {tmp_path} is a folder, not a file; pass a regular file$"
    ):
        data.load_npz(tmp_path)


def test_available_memory_is_known_on_linux():
    from fnbp.train._data_checks import available_memory, size_text

    if os.path.isfile("/proc/meminfo"):
        assert 0 < available_memory() < 2**60
    assert [size_text(n) for n in (512, 3 * 2**30 + 2**29, 80 * 2**40)] == [
        "512 B",
        "3.5 GiB",
        "80.0 TiB",
    ]


@pytest.mark.parametrize(
    "call",
    [
        lambda n: data.check_dataset_arguments("spirals", num_examples=n),
        lambda n: data.load_dataset("moons", num_examples=n),
        lambda n: data.make_spirals(n),
    ],
)
def test_a_synthetic_size_memory_cannot_hold_is_refused_before_allocating(call, monkeypatch):
    from fnbp.train import _data_checks

    monkeypatch.setattr(_data_checks, "available_memory", lambda: 3 * 2**30)
    n = 10**9  # 96 GB of working arrays against 3 GiB
    with pytest.raises(DataError) as info:
        call(n)
    name = "moons" if "moons" in str(info.value) else "spirals"
    assert str(info.value) == (
        f"{name}: `num_examples` 1000000000 needs about 89.4 GiB of "
        f"memory, but 3.0 GiB is available; pass a smaller "
        f"`num_examples`"
    )
    call(1000)  # what fits is made


def test_a_huge_num_examples_is_refused_on_any_machine():
    with pytest.raises(
        DataError,
        match=r"^spirals: `num_examples` 10000000000000000 needs "
        r"about 852\.7 PiB of memory, but .* is available; "
        r"pass a smaller `num_examples`$",
    ):
        data.load_dataset("spirals", num_examples=10**16)


def test_an_npz_array_memory_cannot_hold_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from fnbp.train import _data_checks

    path = tmp_path / "big.npz"
    np.savez(path, x=np.zeros((1000, 8), np.float32), y=np.arange(1000) % 2)
    monkeypatch.setattr(_data_checks, "available_memory", lambda: 20000)
    with pytest.raises(DataError) as info:
        data.load_npz(path)
    assert str(info.value) == (
        f"npz: {path}: the array x needs about 31.4 KiB of memory, "
        f"but 19.5 KiB is available; train on a subset of the examples, "
        f"or on a machine with more memory"
    )


def test_a_path_that_is_not_a_name_is_refused():
    with pytest.raises(
        DataError,
        match=r"^`path` must be a file or folder name \(str or "
        r"os.PathLike\), got int$",
    ):
        data.load_dataset("npz", path=3)
