"""Tests of `fnbp train`: outputs, determinism, resume after a real kill, clean errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from _checkpoint_files import edit_metadata
from _small_run import SMALL

from fnbp import cli


def train(*args):
    return cli.main(["train", *map(str, args)])


def params_of(run_folder):
    """The parameter arrays of a run's checkpoint, by name."""
    with np.load(os.path.join(run_folder, "checkpoint.npz"), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files if name.startswith("params.")}


def metadata_of(run_folder):
    with np.load(os.path.join(run_folder, "checkpoint.npz"), allow_pickle=False) as archive:
        return json.loads(archive["__metadata__"].tobytes())


def history_of(run_folder):
    return json.loads((run_folder / "metrics.json").read_text())["history"]


def assert_same_params(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def snapshot(folder):
    """Every file under ``folder`` with its bytes, to prove nothing was written."""
    import stat

    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if not stat.S_ISREG(os.stat(path).st_mode):  # a named pipe: never opened
                files[os.path.relpath(path, folder)] = os.stat(path).st_mode
                continue
            with open(path, "rb") as handle:
                files[os.path.relpath(path, folder)] = handle.read()
    return files


# --- a successful run ---------------------------------------------------------------


def test_train_writes_metrics_plot_config_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*SMALL, "--out", out) == 0
    printed = capsys.readouterr()
    assert "test accuracy" in printed.out and str(out) in printed.out
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "config.json", "metrics.json", "plot.png"]
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "spirals" and config["model"] == "mlp"
    assert config["optimizer"] == "adam" and config["lr"] == pytest.approx(1e-2)
    assert config["num_train"] == 160 and config["num_test"] == 40
    assert config["steps_per_epoch"] == 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["steps"] == 16
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["test_accuracy"] == metrics["history"][-1]["test_accuracy"]
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = metadata_of(out)
    assert meta["step"] == 16 and meta["metadata"]["config"]["width"] == 16
    assert meta["metadata"]["history"] == metrics["history"]


def test_track_sharpness_records_the_ggns_top_eigenvalue_every_epoch(tmp_path, capsys):
    """--track-sharpness: each epoch's history entry gets 'sharpness', the largest GGN
    eigenvalue on the first training examples (fnbp.top_eigenvalues of fnbp.ggn_vp, whose
    values tests/test_jvp.py checks against NumPy); without the flag there is none."""
    out = tmp_path / "run"
    assert train(*SMALL, "--track-sharpness", "--out", out) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["sharpness"]) and h["sharpness"] > 0 for h in history)
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert train(*SMALL, "--out", tmp_path / "plain") == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())["history"]
    assert all("sharpness" not in h for h in plain)


def test_train_progress_bar_shows_running_loss_and_accuracy(tmp_path, capsys):
    args = [a for a in SMALL if a != "--no-progress"]
    assert train(*args, "--epochs", "1", "--out", tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss=" in err and "acc=" in err and "8/8" in err


def test_train_same_seed_identical_parameters(tmp_path, capsys):
    assert train(*SMALL, "--seed", "3", "--out", tmp_path / "a") == 0
    assert train(*SMALL, "--seed", "3", "--out", tmp_path / "b") == 0
    assert_same_params(params_of(tmp_path / "a"), params_of(tmp_path / "b"))
    assert history_of(tmp_path / "a") == history_of(tmp_path / "b")
    assert train(*SMALL, "--seed", "4", "--out", tmp_path / "c") == 0
    assert not np.array_equal(
        params_of(tmp_path / "a")["params.0"], params_of(tmp_path / "c")["params.0"]
    )


def test_resume_continues_to_the_uninterrupted_result(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(*SMALL, "--epochs", "3", "--out", straight) == 0
    assert train(*SMALL, "--epochs", "1", "--out", split) == 0
    assert metadata_of(split)["step"] == 8
    # the run's flags come from the checkpoint; only --epochs is raised
    capsys.readouterr()
    assert train("--resume", split, "--epochs", "3", "--no-progress") == 0
    start = capsys.readouterr().out.splitlines()[0]
    assert start.endswith(f"3 epochs; resumed at step 8 of 24; run folder {split}"), start
    assert_same_params(params_of(straight), params_of(split))
    assert history_of(split) == history_of(straight)


def test_default_out_folder_is_numbered_not_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [*SMALL, "--epochs", "1"]
    assert train(*args) == 0 and train(*args) == 0
    assert sorted(os.listdir(tmp_path / "runs")) == ["spirals-mlp-seed0", "spirals-mlp-seed0-2"]


def test_train_user_npz_images_with_cnn_and_resnet_s(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    x = rng.normal(size=(60, 6, 6)) + y[:, None, None]  # (n, H, W): a channel axis is added
    np.savez(tmp_path / "images.npz", x=x, y=y)
    common = [
        "--data-path",
        tmp_path / "images.npz",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--width",
        "4",
        "--depth",
        "1",
        "--no-progress",
    ]
    assert train(*common, "--model", "cnn", "--out", tmp_path / "cnn") == 0
    config = json.loads((tmp_path / "cnn" / "config.json").read_text())
    assert config["dataset"] == "npz" and config["input_shape"] == [6, 6, 1]
    assert (
        train(*common, "--model", "resnet-s", "--optimizer", "momentum", "--out", tmp_path / "res")
        == 0
    )
    config = json.loads((tmp_path / "res" / "config.json").read_text())
    assert config["input_shape"] == [36] and config["lr"] == pytest.approx(0.01)


def signals_npz(path, channels: int | None):
    """64 examples of 16 samples, class 0 slow and class 1 fast sines; (L,) or (L, C)."""
    rng = np.random.default_rng(0)
    y = np.arange(64) % 2
    t = np.arange(16) / 16
    angle = 2 * np.pi * (np.where(y == 0, 1.0, 4.0)[:, None] * t + rng.random((64, 1)))
    x = (
        np.sin(angle)
        if channels is None
        else np.stack([np.sin(angle + c) for c in range(channels)], axis=-1)
    )
    np.savez(path, x=x.astype(np.float32), y=y)
    return path


def conv_run(tmp_path, model, channels):
    """Train ``model`` on signals_npz for an epoch; its config and parameter shapes."""
    data = signals_npz(tmp_path / "signals.npz", channels)
    assert (
        train(
            "--data-path",
            data,
            "--model",
            model,
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--width",
            "4",
            "--depth",
            "2",
            "--no-progress",
            "--out",
            tmp_path / "run",
        )
        == 0
    )
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    with np.load(tmp_path / "run" / "checkpoint.npz", allow_pickle=False) as archive:
        shapes = [archive[k].shape for k in archive.files if k.startswith("params.")]
    return config, shapes


def test_train_user_npz_1d_signals_with_cnn(tmp_path, capsys):
    # examples of shape (L,) are 1-D signals: cnn gets a channel axis, Conv1D and 1-D pooling
    config, shapes = conv_run(tmp_path, "cnn", None)
    assert config["model"] == "cnn" and config["input_shape"] == [16, 1]
    assert (3, 1, 4) in shapes and (3, 4, 8) in shapes, shapes  # Conv1D filters (k, C, C2)


def test_train_user_npz_multichannel_signals_with_cnn1d(tmp_path, capsys):
    # examples of shape (L, C) are signals for cnn1d (for cnn they would be (H, W) images)
    config, shapes = conv_run(tmp_path, "cnn1d", 2)
    assert config["model"] == "cnn1d" and config["input_shape"] == [16, 2]
    assert (3, 2, 4) in shapes and (3, 4, 8) in shapes, shapes  # Conv1D filters (k, C, C2)


def test_cnn1d_refuses_images_in_one_line(tmp_path, capsys):
    np.savez(tmp_path / "images.npz", x=np.zeros((20, 4, 4, 3), np.float32), y=np.arange(20) % 2)
    assert (
        train(
            "--data-path",
            tmp_path / "images.npz",
            "--model",
            "cnn1d",
            "--no-progress",
            "--out",
            tmp_path / "run",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model cnn1d needs 1-D signals" in err, err
    assert "(4, 4, 3)" in err and "use --model cnn for images" in err, err


# --- a real kill, then --resume --------------------------------------------------------


KILL_ARGS = [
    "--dataset",
    "spirals",
    "--width",
    "16",
    "--depth",
    "1",
    "--batch-size",
    "16",
    "--epochs",
    "4",
    "--checkpoint-every",
    "10",
    "--seed",
    "1",
    "--no-progress",
]


def spawn(env, *args):
    command = [sys.executable, "-m", "fnbp.cli", "train", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_killed_run_resumed_equals_uninterrupted_run(tmp_path):
    # Three processes; JAX's persistent compilation cache lets the last reuse the
    # executables the first two compiled (the same executables, the same numbers).
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    reference = spawn(env, *KILL_ARGS, "--out", tmp_path / "reference")
    victim = spawn(env, *KILL_ARGS, "--out", tmp_path / "victim")
    checkpoint = tmp_path / "victim" / "checkpoint.npz"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    reference_out = reference.communicate(timeout=180)
    assert reference.returncode == 0, reference_out[1].decode()
    assert victim.returncode == -signal.SIGKILL
    killed_at = metadata_of(tmp_path / "victim")["step"]
    total = metadata_of(tmp_path / "reference")["step"]
    assert 0 < killed_at < total == 400  # really killed mid-way, with a checkpoint written
    assert not (tmp_path / "victim" / "metrics.json").exists()
    resumed = spawn(env, "--resume", tmp_path / "victim", "--no-progress")
    resumed_out = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, resumed_out[1].decode()
    assert_same_params(params_of(tmp_path / "victim"), params_of(tmp_path / "reference"))
    assert history_of(tmp_path / "victim") == history_of(tmp_path / "reference")


# --- user errors: one line, exit status 2, nothing written -------------------------------


def assert_clean_error(tmp_path, capsys, args, match):
    before = snapshot(tmp_path)
    assert train(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fnbp train: error: ") and err.endswith("\n")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert match in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["--lr", "-0.1"], "--lr must be a positive finite number, got -0.1"),
        (["--lr", "nan"], "--lr must be a positive finite number"),
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (
            ["--batch-size", "500"],
            "fnbp train: error: --batch-size 500 is larger than the 160 "
            "training examples; pass a --batch-size of 160 or less\n",
        ),
        (["--test-fraction", "1.5"], "--test-fraction must lie strictly between 0 and 1"),
        (["--data-path", "x.npz"], "is built in and reads no file; drop --data-path"),
        (["--dataset", "digits"], "--num-examples only applies to spirals and moons, not 'digits'"),
        (["--num-examples", "0"], "--num-examples must be a positive integer, got 0"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
        (
            ["--num-examples", "10000000000000000"],
            "fnbp train: error: spirals: --num-examples 10000000000000000 needs about 852.7 PiB of "
            "memory, but ",
        ),
    ],
)
def test_bad_flags(tmp_path, capsys, extra, match):
    assert_clean_error(tmp_path, capsys, [*SMALL, *extra, "--out", tmp_path / "run"], match)


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def write_csv(path, text, bom=False):
    path.write_bytes((("\ufeff" if bom else "") + text).encode("utf-8"))
    return path


ROWS = "".join(f"{i % 7 / 3:.3f},{i % 5 / 2:.3f},{i % 2}\n" for i in range(40))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "missing.npz", "no such file"),
        (
            lambda d: write_npz(d / "shape.npz", x=np.ones((10, 2)), y=np.zeros(9, int)),
            "x has 10 examples but y has 9 labels",
        ),
        (
            lambda d: write_npz(d / "onehot.npz", x=np.ones((10, 2)), y=np.eye(10)[:, :2]),
            "labels must have shape (n,)",
        ),
        (
            lambda d: write_npz(
                d / "nan.npz", x=np.where(np.eye(10, 2) > 0, np.nan, 1.0), y=np.arange(10) % 2
            ),
            "x contains NaN or infinity",
        ),
        (
            lambda d: write_npz(d / "float.npz", x=np.ones((10, 2)), y=np.linspace(0, 1, 10)),
            "non-integer labels",
        ),
        (lambda d: write_npz(d / "keys.npz", inputs=np.ones((10, 2))), "but fnbp expects"),
        (
            lambda d: write_csv(d / "stray.csv", "a,b,label\n" + ROWS + "1,2,100000\n"),
            "stray.csv: label 100000 in line 42 is not a class index: the 3 distinct labels must "
            "be 0 .. 2, but class 2 has no examples; fix or drop that row",
        ),
        (
            lambda d: write_npz(d / "ones.npz", x=np.ones((10, 2)), y=np.ones(10, int)),
            "every label is 1; classification needs at least two classes",
        ),
        (
            lambda d: write_csv(d / "big.csv", ROWS + "1e300,2,1\n"),
            "big.csv: x holds 1e+300 in line 41, too large for float32",
        ),
        (
            lambda d: write_csv(d / "na.csv", "NA,2,0\n" + ROWS),
            "na.csv line 1 column 1 is a missing value ('NA'); fill it in or drop the row",
        ),
        (
            lambda d: write_csv(d / "na2.csv", ROWS + "NA,2,0\n"),
            "na2.csv line 41 column 1 is a missing value ('NA')",
        ),
        (
            lambda d: (
                np.save(d / "a.npy", np.ones(3)),
                os.replace(d / "a.npy", d / "a.npz"),
                d / "a.npz",
            )[-1],
            "a.npz is a single NumPy array (the .npy format, from np.save), not a .npz archive",
        ),
        (
            lambda d: (
                (d / "image.npz").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)) and d / "image.npz"
            ),
            "image.npz is a PNG image, not a .npz archive",
        ),
        # not files: refused before they are opened (a named pipe would block, a device never end)
        (
            lambda d: (os.mkfifo(d / "pipe.npz"), d / "pipe.npz")[-1],
            "pipe.npz is a named pipe (FIFO), not a file; pass a regular file\n",
        ),
    ],
)
def test_bad_data(tmp_path, capsys, make, match):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = make(data_dir)
    assert_clean_error(tmp_path, capsys, ["--data-path", path, "--out", tmp_path / "run"], match)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_as_data_or_checkpoint_is_one_line(tmp_path, capsys):
    assert_clean_error(
        tmp_path,
        capsys,
        ["--dataset", "csv", "--data-path", "/dev/zero", "--out", tmp_path / "run"],
        "fnbp train: error: csv: /dev/zero is a character device, not a file; "
        "pass a regular file\n",
    )
    assert_clean_error(
        tmp_path,
        capsys,
        ["--resume", "/dev/zero"],
        "fnbp train: error: checkpoint: /dev/zero is a character device, not "
        "a file; pass a regular file\n",
    )


def test_bad_csv_labels(tmp_path, capsys):
    (tmp_path / "d.csv").write_text("a,b,label\n1,2,0\n3,4,1.5\n5,6,1\n")
    assert_clean_error(
        tmp_path,
        capsys,
        ["--data-path", tmp_path / "d.csv", "--dataset", "csv", "--out", tmp_path / "run"],
        "non-integer labels",
    )


def test_out_folder_in_use_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert_clean_error(tmp_path, capsys, [*SMALL, "--out", tmp_path / "run"], "already holds files")


@pytest.fixture(scope="module")
def finished_run_original(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train(*SMALL, "--epochs", "1", "--out", out) == 0
    return out


@pytest.fixture
def finished_run(finished_run_original, tmp_path):
    """A private copy of a finished one-epoch run, free to damage."""
    return shutil.copytree(finished_run_original, tmp_path / "run")


def test_resume_with_a_different_model_is_refused(finished_run, capsys):
    capsys.readouterr()
    assert_clean_error(
        finished_run.parent,
        capsys,
        ["--resume", finished_run, "--model", "cnn", "--epochs", "2"],
        "the run was made with --model mlp but --model cnn was given",
    )


def test_resume_with_a_different_batch_size_is_refused(finished_run, capsys):
    capsys.readouterr()
    assert_clean_error(
        finished_run.parent,
        capsys,
        ["--resume", finished_run, "--epochs", "2", "--batch-size", "10"],
        "--batch-size 20 but --batch-size 10 was given",
    )


def test_corrupted_checkpoint_is_refused(finished_run, capsys):
    capsys.readouterr()
    path = finished_run / "checkpoint.npz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    assert_clean_error(
        finished_run.parent, capsys, ["--resume", finished_run, "--epochs", "2"], "corrupted"
    )
    path.write_bytes(b"\x00" * 100)
    assert_clean_error(finished_run.parent, capsys, ["--resume", finished_run], "corrupted")


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda m: m["metadata"]["config"].update(width=32),
            "has shape (16, 2) and dtype float32, but this model needs (32, 2)",
        ),
        (
            lambda m: m["metadata"]["config"].update(model="cnn"),
            "its params do not match this model/optimizer",
        ),
        (lambda m: m["key"].update(data=[0, 7]), "its PRNG key does not belong to seed 0"),
        (
            lambda m: m["metadata"].update(data_sha256="0" * 64),
            "the data of spirals differ from those the run was trained on",
        ),
        (lambda m: m["metadata"].pop("config"), "holds no fnbp train config"),
        # a bad stored value is the file's, never a flag's the user did not pass
        (
            lambda m: m["metadata"]["config"].update(batch_size=0),
            "checkpoint.npz has batch_size 0, but batch_size must be a positive integer; the file was "
            "edited or is corrupted, so its run cannot be resumed\n",
        ),
        (
            lambda m: m["metadata"]["config"].update(lr="fast"),
            "checkpoint.npz has lr 'fast', but lr must be a positive finite number; the file",
        ),
        (
            lambda m: m["metadata"]["config"].update(seed=None),
            "checkpoint.npz has seed None, but seed must lie in [0, 2**32); the file",
        ),
        (
            lambda m: m["metadata"]["config"].update(optimizer="lbfgs"),
            "has optimizer 'lbfgs', but optimizer must be one of sgd, momentum, adam",
        ),
        (
            lambda m: m["metadata"]["config"].update(num_examples=-3),
            "checkpoint.npz is not a valid run: the stored num_examples must be a positive integer, "
            "got -3; the file was edited or is corrupted, so its run cannot be resumed\n",
        ),
        (
            lambda m: m["metadata"]["config"].update(dp_noise=1.0),
            "is not a valid run: the stored dp_noise needs the stored dp_clip C too",
        ),
    ],
)
def test_checkpoint_that_does_not_fit_its_run_is_refused(finished_run, capsys, edit, match):
    capsys.readouterr()
    path = finished_run / "checkpoint.npz"
    edit_metadata(path, path, edit)
    assert_clean_error(
        finished_run.parent, capsys, ["--resume", finished_run, "--epochs", "2"], match
    )


def test_resume_of_a_missing_run(tmp_path, capsys):
    assert_clean_error(
        tmp_path,
        capsys,
        ["--resume", tmp_path / "nothing"],
        "no such run folder or checkpoint file",
    )
    (tmp_path / "empty").mkdir()
    assert_clean_error(tmp_path, capsys, ["--resume", tmp_path / "empty"], "no such file")


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train("--batch-size", "many")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'many'" in err


def test_missing_train_extra_is_a_clean_error(tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tqdm" else real_find_spec(name, *a),
    )
    assert_clean_error(
        tmp_path,
        capsys,
        [*SMALL, "--out", tmp_path / "run"],
        'needs tqdm, from the train extra: python -m pip install ".[train]" '
        "from a clone of the repository, or python -m pip install "
        '"fnbp[train]" from a package index',
    )


# --- bad data and file-system faults: one line, exit status 2 (issue 14) --------------------


def test_usable_data_trains_and_says_what_it_did(tmp_path, capsys):
    # a byte-order mark (Excel's "CSV UTF-8") is not data; the header row stays a header
    path = write_csv(tmp_path / "excel.csv", "a,b,label\n" + ROWS, bom=True)
    assert (
        train(*SMALL[4:], "--data-path", path, "--batch-size", "8", "--out", tmp_path / "csv") == 0
    )
    config = json.loads((tmp_path / "csv" / "config.json").read_text())
    assert config["num_train"] + config["num_test"] == 40 and config["num_classes"] == 2
    # mnist1d's layout x, y, x_test, y_test, with a test split that lacks class 2
    rng = np.random.default_rng(0)
    npz = write_npz(
        tmp_path / "m.npz",
        x=rng.normal(size=(30, 2)),
        y=np.arange(30) % 3,
        x_test=rng.normal(size=(6, 2)),
        y_test=np.arange(6) % 2,
    )
    capsys.readouterr()
    assert (
        train(*SMALL[4:], "--data-path", npz, "--batch-size", "10", "--out", tmp_path / "npz") == 0
    )
    err = capsys.readouterr().err
    assert err == (
        f"fnbp train: warning: npz {npz}: the test split has no examples of "
        f"class 2 (of 3); the test accuracy does not measure it\n"
    )
    config = json.loads((tmp_path / "npz" / "config.json").read_text())
    assert (config["num_train"], config["num_test"], config["num_classes"]) == (30, 6, 3)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_out_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("mine")
    assert_clean_error(
        tmp_path,
        capsys,
        [*SMALL, "--out", tmp_path / "file.txt" / "sub"],
        f"{tmp_path / 'file.txt'} is a file, not a folder, so no run folder can be made under it",
    )
    assert_clean_error(
        tmp_path,
        capsys,
        [*SMALL, "--out", "/proc/fnbp-run"],
        "cannot create the run folder /proc/fnbp-run",
    )


def failing_checkpoint_writes(monkeypatch, error):
    """Make every write of checkpoint.npz fail with ``error`` (other files write)."""
    import fnbp.train.checkpoint

    real = fnbp.train.checkpoint.atomic_write

    def atomic_write(path, write):
        if os.path.basename(path) == "checkpoint.npz":
            raise error
        return real(path, write)

    monkeypatch.setattr(fnbp.train.checkpoint, "atomic_write", atomic_write)


def test_disk_full_keeps_the_checkpoint_and_the_config(finished_run, capsys, monkeypatch):
    import errno

    before = snapshot(finished_run)
    failing_checkpoint_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    capsys.readouterr()
    assert train("--resume", finished_run, "--epochs", "3", "--no-progress") == 2
    err = capsys.readouterr().err
    assert err == (
        f"fnbp train: error: cannot write {finished_run / 'checkpoint.npz'}: No "
        f"space left on device; the checkpoint of step 8 is kept; free some space "
        f"and continue with: fnbp train --resume {finished_run}\n"
    )
    assert snapshot(finished_run) == before  # config.json still says --epochs 1


def test_run_folder_deleted_mid_run_is_one_line(tmp_path, capsys, monkeypatch):
    import fnbp.train.checkpoint

    real = fnbp.train.checkpoint.save_checkpoint

    def save_checkpoint(path, *args, **kwargs):
        shutil.rmtree(os.path.dirname(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fnbp.train.checkpoint, "save_checkpoint", save_checkpoint)
    assert train(*SMALL, "--out", tmp_path / "run") == 2
    assert capsys.readouterr().err == (
        f"fnbp train: error: the run folder {tmp_path / 'run'} was deleted or moved while the "
        f"run was writing checkpoint.npz; nothing more can be saved, start the run again\n"
    )


class ClosingPipe:
    """A stdout whose reader stops after the first line, like `| head -1`."""

    def __init__(self):
        self.lines = []

    def write(self, text):
        if self.lines and text.strip():
            raise BrokenPipeError(32, "Broken pipe")
        if text.strip():
            self.lines.append(text)
        return len(text)

    def flush(self):
        pass


def test_stdout_closed_by_head_does_not_stop_the_run(tmp_path, capsys, monkeypatch):
    pipe = ClosingPipe()
    monkeypatch.setattr(sys, "stdout", pipe)
    assert train(*SMALL, "--out", tmp_path / "run") == 2
    assert pipe.lines[0].startswith("fnbp train: mlp on spirals")
    assert (tmp_path / "run" / "metrics.json").exists()  # the run finished
    assert capsys.readouterr().err == (
        f"fnbp train: error: standard output was closed before the run ended (piped into "
        f"head?), so its last lines were not printed; the run finished, its results are in "
        f"{tmp_path / 'run'}\n"
    )


def test_divergence_before_any_checkpoint_then_the_same_out_again(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*SMALL, "--lr", "1e30", "--out", out) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the loss became NaN or infinite at step" in err
    assert err.endswith(
        f"lower --lr (now 1e+30); no checkpoint was written, so start again "
        f"with a lower --lr (the same --out {out} may be reused)\n"
    )
    assert os.listdir(out) == ["config.json"]
    assert train(*SMALL, "--out", out) == 0
    assert capsys.readouterr().err == (
        f"fnbp train: --out {out} holds a run that stopped "
        f"before its first checkpoint; starting a run there "
        f"again\n"
    )


def test_a_run_stopped_before_its_first_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(
        json.dumps({"dataset": "spirals", "num_examples": 200, "epochs": 2, "data_path": None})
    )
    (out / ".checkpoint.npz.999999999.0123abcd.tmp").write_bytes(b"half")
    assert_clean_error(
        tmp_path,
        capsys,
        ["--resume", out],
        f"--resume {out}: the run stopped before its first checkpoint, so "
        f"there is nothing to resume; start it again: fnbp train --dataset "
        f"spirals --num-examples 200 --epochs 2 --out {out}",
    )
    assert train(*SMALL, "--out", out) == 0
    assert "removed 1 temporary file(s) left in" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "config.json", "metrics.json", "plot.png"]


def test_the_restart_command_of_a_private_run_keeps_its_dp_flags(tmp_path):
    from fnbp.cli._train_config import restart_command

    config = {"dataset": "spirals", "epochs": 2, "dp_clip": 1.0, "dp_noise": 1.1}
    config |= {"dp_delta": 1e-5, "dp_accountant": "pld", "precision": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert restart_command(str(tmp_path)) == (
        "fnbp train --dataset spirals --precision float32 --dp-clip 1.0 --dp-noise 1.1 "
        f"--dp-delta 1e-05 --dp-accountant pld --epochs 2 --out {tmp_path}"
    )
    (tmp_path / "config.json").write_text("{not json")
    assert restart_command(str(tmp_path)) == f"fnbp train ... --out {tmp_path}"


def test_stale_temporary_checkpoints_are_removed_at_resume(finished_run, capsys):
    stale = finished_run / ".checkpoint.npz.999999999.0123abcd.tmp"
    stale.write_bytes(b"x" * 1000)
    mine = finished_run / f".checkpoint.npz.{os.getppid()}.0123abcd.tmp"  # a live process
    mine.write_bytes(b"x")
    capsys.readouterr()
    assert train("--resume", finished_run, "--epochs", "2", "--no-progress") == 0
    assert not stale.exists() and mine.exists()
    assert (
        f"fnbp train: removed 1 temporary file(s) left in {finished_run} by an interrupted write\n"
    ) in capsys.readouterr().err
    assert json.loads((finished_run / "config.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_stop_alike(tmp_path, capsys, monkeypatch, signum, status):
    import fnbp.train.checkpoint

    real = fnbp.train.checkpoint.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        real(*args, **kwargs)
        signal.raise_signal(signum)

    monkeypatch.setattr(fnbp.train.checkpoint, "save_checkpoint", save_checkpoint)
    assert train(*SMALL, "--out", tmp_path / "run") == status
    # the signal only sets a flag; the run stops at the next step boundary, after the save
    assert capsys.readouterr().err == (
        f"fnbp train: interrupted by {signal.Signals(signum).name} at step 8 of 16, after "
        f"epoch 1 of 2; the checkpoint of step 8 is kept (continue with: fnbp train --resume "
        f"{tmp_path / 'run'})\n"
    )
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
