"""Tests of fnbp.train.checkpoint: exact round trips, atomic writes, clear refusals."""

from __future__ import annotations

import io
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _checkpoint_files import edit_metadata, rewrite_members

from fnbp.train import checkpoint as ckpt
from fnbp.train.checkpoint import CheckpointError


def make_params(seed=0, hidden=3, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "W": jnp.asarray(rng.normal(size=(hidden, 2)), dtype),
            "b": jnp.zeros(hidden, dtype),
        },
        "out": (jnp.asarray(rng.normal(size=(1, hidden)), dtype), jnp.arange(1, dtype=dtype)),
    }


def adam_state(params):
    """An Adam state with non-trivial mu, nu and count (as after a few updates)."""
    state = optax.adam(1e-2).init(params)
    rng = np.random.default_rng(1)

    def fill(leaf):
        return jnp.asarray(rng.uniform(1, 2, np.shape(leaf)), jnp.result_type(leaf))

    return params, jax.tree_util.tree_map(fill, state)


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert jnp.result_type(x) == jnp.result_type(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def saved(tmp_path):
    params, state = adam_state(make_params())
    path = tmp_path / "checkpoint.npz"
    key = jax.random.key(7)
    ckpt.save_checkpoint(
        path,
        params,
        state,
        step=12,
        key=key,
        metadata={"epoch": 3, "config": {"lr": 0.01}, "history": [1.5, 0.25]},
    )
    return path, params, state, key


def test_round_trip_is_exact(saved):
    path, params, state, key = saved
    template_params = make_params(seed=1)
    template_state = optax.adam(1e-2).init(template_params)
    loaded = ckpt.load_checkpoint(path, template_params, template_state)
    assert_trees_equal(loaded.params, params)
    assert_trees_equal(loaded.opt_state, state)
    assert loaded.step == 12
    assert loaded.metadata == {"epoch": 3, "config": {"lr": 0.01}, "history": [1.5, 0.25]}
    assert jnp.issubdtype(loaded.key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(loaded.key), jax.random.key_data(key))
    # the restored key draws the same numbers
    np.testing.assert_array_equal(jax.random.normal(loaded.key, (3,)), jax.random.normal(key, (3,)))


def test_round_trip_raw_key_bfloat16_and_float64(tmp_path):
    params = {
        "w": jnp.asarray([1.5, -2.25, 3.0e-3], jnp.bfloat16),
        "v": jnp.asarray([1.0 / 3.0], jnp.float64),
    }
    state = optax.sgd(0.1, momentum=0.9).init(params)
    raw_key = jax.random.PRNGKey(3)
    path = tmp_path / "c.npz"
    ckpt.save_checkpoint(path, params, state, step=0, key=raw_key)
    loaded = ckpt.load_checkpoint(path, params, state)
    assert_trees_equal(loaded.params, params)
    assert_trees_equal(loaded.opt_state, state)
    np.testing.assert_array_equal(loaded.key, raw_key)
    assert loaded.metadata == {}


def test_file_is_a_plain_npz_of_arrays_and_json(saved):
    path = saved[0]
    with np.load(path, allow_pickle=False) as archive:
        names = set(archive.files)
        meta = json.loads(archive["__metadata__"].tobytes())
    assert "params.0" in names and "opt_state.0" in names
    assert meta["format"] == "fnbp-checkpoint" and meta["step"] == 12
    paths = [leaf["path"] for leaf in meta["trees"]["opt_state"]["leaves"]]
    assert "[0].count" in paths and "[0].mu['dense']['W']" in paths
    assert "ScaleByAdamState" in meta["trees"]["opt_state"]["treedef"]
    assert ckpt.read_checkpoint_metadata(path) == {
        "epoch": 3,
        "config": {"lr": 0.01},
        "history": [1.5, 0.25],
        "step": 12,
    }


def test_save_replaces_atomically_and_leaves_no_temporary_files(saved, tmp_path, monkeypatch):
    path, params, state, _ = saved
    before = path.read_bytes()

    def failing_savez(handle, **arrays):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, params, state, step=13)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.npz"]
    with pytest.raises(TypeError, match="JSON-serializable"):
        ckpt.save_checkpoint(path, params, state, step=13, metadata={"f": object()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.npz"]
    ckpt.save_checkpoint(path, params, state, step=14)
    assert ckpt.read_checkpoint_metadata(path)["step"] == 14
    assert os.listdir(tmp_path) == ["checkpoint.npz"]


def test_save_rejects_a_negative_step(tmp_path):
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        ckpt.save_checkpoint(tmp_path / "c.npz", {}, (), step=-1)


# --- corrupted files ------------------------------------------------------------------


def test_missing_folder_and_foreign_files(tmp_path):
    params = make_params()
    state = optax.adam(1e-2).init(params)
    with pytest.raises(CheckpointError, match="no such file"):
        ckpt.load_checkpoint(tmp_path / "none.npz", params, state)
    with pytest.raises(CheckpointError, match="is a folder"):
        ckpt.load_checkpoint(tmp_path, params, state)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match="not a readable .npz archive"):
        ckpt.load_checkpoint(garbage, params, state)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.ones(3))
    with pytest.raises(CheckpointError, match="has no __metadata__ entry"):
        ckpt.load_checkpoint(other, params, state)
    single = tmp_path / "single.npy"
    np.save(single, np.ones(3))
    with pytest.raises(CheckpointError, match="single .npy array"):
        ckpt.load_checkpoint(single, params, state)


def test_pickled_member_is_refused_not_executed(tmp_path, saved):
    path = saved[0]
    buffer = io.BytesIO()
    np.save(buffer, np.array([print], dtype=object), allow_pickle=True)
    evil = tmp_path / "evil.npz"
    rewrite_members(path, evil, lambda name, c: buffer.getvalue() if name == "params.0.npy" else c)
    params = make_params()
    with pytest.raises(CheckpointError, match=r"params.0 is unreadable.*pickle"):
        ckpt.load_checkpoint(evil, params, optax.adam(1e-2).init(params))


def test_truncated_and_bit_flipped_files(saved, tmp_path):
    path, params, state, _ = saved
    raw = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        ckpt.load_checkpoint(truncated, params, state)
    # flip one byte inside the stored data of the first parameter array
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("params.0.npy")
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size - 1
    flipped = bytearray(raw)
    flipped[offset] ^= 0xFF
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"params.0 is unreadable .*CRC.*corrupted"):
        ckpt.load_checkpoint(bad, params, state)


def test_valid_zip_with_altered_data_fails_the_digest(saved, tmp_path):
    path, params, state, _ = saved

    def change(name, content):
        if name != "params.0.npy":
            return content
        array = np.load(io.BytesIO(content))
        buffer = io.BytesIO()
        np.save(buffer, array + 1)
        return buffer.getvalue()

    target = tmp_path / "altered.npz"
    rewrite_members(path, target, change)
    with pytest.raises(
        CheckpointError, match=r"params\['dense'\]\['W'\] do not match their SHA-256"
    ):
        ckpt.load_checkpoint(target, params, state)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(version=99), "format version 99; this fnbp reads version 1"),
        (lambda m: m.update(format="other"), "is not an fnbp checkpoint"),
        (lambda m: m.pop("trees"), "lacks 'trees'"),
        (lambda m: m.update(step=-3), "step -3 is not an int >= 0"),
        (lambda m: m.update(key={"typed": True}), "PRNG key record is unreadable"),
        (lambda m: m["trees"]["params"]["leaves"][0].pop("sha256"), "malformed"),
        (
            lambda m: m["trees"]["params"]["leaves"][0].update(shape=[9]),
            r"params\['dense'\]\['W'\] has shape \(9,\)",
        ),
    ],
)
def test_tampered_metadata(saved, tmp_path, edit, match):
    path, params, state, _ = saved
    target = tmp_path / "tampered.npz"
    edit_metadata(path, target, edit)
    with pytest.raises(CheckpointError, match=match):
        ckpt.load_checkpoint(target, params, state)


def test_metadata_that_is_not_json(saved, tmp_path):
    path, params, state, _ = saved
    buffer = io.BytesIO()
    np.save(buffer, np.frombuffer(b"{not json", np.uint8))
    target = tmp_path / "notjson.npz"
    rewrite_members(path, target, lambda n, c: buffer.getvalue() if n == "__metadata__.npy" else c)
    with pytest.raises(CheckpointError, match="metadata is not valid JSON"):
        ckpt.read_checkpoint_metadata(target)


# --- mismatched templates --------------------------------------------------------------


def test_mismatched_shapes_optimizer_and_dtype(saved):
    path, params, state, _ = saved
    wider = make_params(hidden=4)
    with pytest.raises(
        CheckpointError,
        match=r"params\['dense'\]\['W'\] has shape \(3, 2\) and dtype float32, "
        r"but this model needs \(4, 2\)",
    ):
        ckpt.load_checkpoint(path, wider, optax.adam(1e-2).init(wider))
    with pytest.raises(CheckpointError, match="its opt_state do not match this model/optimizer"):
        ckpt.load_checkpoint(path, params, optax.sgd(0.1, momentum=0.9).init(params))
    with pytest.raises(CheckpointError, match="its opt_state do not match"):
        ckpt.load_checkpoint(path, params, optax.sgd(0.1).init(params))
    doubles = make_params(dtype=jnp.float64)
    with pytest.raises(CheckpointError, match="dtype float32, but this model needs .* float64"):
        ckpt.load_checkpoint(path, doubles, optax.adam(1e-2).init(doubles))
    renamed = {"dense": params["dense"], "head": params["out"]}
    with pytest.raises(CheckpointError, match=r"missing from it: \['head'\]"):
        ckpt.load_checkpoint(path, renamed, optax.adam(1e-2).init(renamed))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_or_a_device_is_refused_before_it_is_opened(tmp_path):
    params = make_params()
    state = optax.adam(1e-2).init(params)
    pipe = tmp_path / "checkpoint.npz"
    os.mkfifo(pipe)  # np.load would block on it until something wrote into it
    for load in (
        lambda path: ckpt.load_checkpoint(path, params, state),
        ckpt.read_checkpoint_metadata,
    ):
        with pytest.raises(CheckpointError) as info:
            load(pipe)
        assert str(info.value) == (
            f"checkpoint: {pipe} is a named pipe (FIFO), not a file; pass a regular file"
        )
    if os.path.exists("/dev/zero"):
        with pytest.raises(
            CheckpointError, match="^checkpoint: /dev/zero is a character device, not a file"
        ):
            ckpt.load_checkpoint("/dev/zero", params, state)
