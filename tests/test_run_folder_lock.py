"""A run folder is owned by one `fnbp train` run: a second is refused, a killed one frees it."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from _small_run import SMALL

from fnbp import cli
from fnbp.cli import _run_folder

RUN_FILES = ["checkpoint.npz", "config.json", "metrics.json", "plot.png"]


def train(*args):
    return cli.main(["train", *map(str, args)])


def snapshot(folder):
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                files[os.path.relpath(os.path.join(root, name), folder)] = handle.read()
    return files


def in_use(words, pid=None):
    """fnbp's refusal of a folder held by process ``pid`` (default: this one) of this host."""
    pid = os.getpid() if pid is None else pid
    return (
        f"fnbp train: error: {words} is in use by another fnbp train run (process {pid} on "
        f"{socket.gethostname()}, since "
    )


def assert_refused(capsys, args, words, pid=None):
    assert train(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith(in_use(words, pid)) and err.count("\n") == 1, err
    assert err.endswith(
        "); wait for it to end (a run that is stopped keeps its last "
        "checkpoint, for --resume), or pass another --out\n"
    ), err


def test_a_held_folder_refuses_a_new_run_and_a_resume_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*SMALL, "--epochs", "1", "--out", out) == 0
    assert sorted(os.listdir(out)) == RUN_FILES  # the lock file goes with the run
    lock = _run_folder.RunLock(str(out))
    lock.acquire("--out test")  # as a live run holds it (flock on its own file description)
    before = snapshot(out)
    capsys.readouterr()
    assert_refused(capsys, [*SMALL, "--out", out], f"--out {out}")
    assert_refused(capsys, ["--resume", out, "--epochs", "2"], f"--resume {out}")
    assert snapshot(out) == before  # nothing of the holder's run was touched
    lock.release()
    assert sorted(os.listdir(out)) == RUN_FILES
    assert train("--resume", out, "--epochs", "2") == 0  # free again: it continues
    assert json.loads((out / "metrics.json").read_text())["steps"] == 16


def test_a_held_new_folder_refuses_a_second_run_before_its_first_file(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = _run_folder.RunLock(str(out))
    lock.acquire("--out test")
    try:
        assert_refused(capsys, [*SMALL, "--out", out], f"--out {out}")
        assert os.listdir(out) == [_run_folder.LOCK]  # the holder's lock, nothing else
    finally:
        lock.release()
    assert os.listdir(out) == []


def spawn(*args):
    command = [sys.executable, "-m", "fnbp.cli", "train", *map(str, args)]
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # processes side by side
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def finish(process, timeout=120):
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, err


def stored(out):
    with np.load(out / "checkpoint.npz", allow_pickle=False) as archive:
        return json.loads(archive["__metadata__"].tobytes())


def test_a_live_process_holds_its_folder_and_a_sigkilled_one_leaves_it_resumable(tmp_path, capsys):
    out = tmp_path / "run"
    holder = spawn(*SMALL, "--epochs", "100000", "--checkpoint-every", "3", "--out", out)
    try:
        deadline = time.monotonic() + 120
        while (
            not (out / "checkpoint.npz").exists()
            and holder.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        assert holder.poll() is None, holder.communicate()[1]
        assert_refused(capsys, [*SMALL, "--out", out], f"--out {out}", holder.pid)
        assert_refused(capsys, ["--resume", out, "--epochs", "1"], f"--resume {out}", holder.pid)
        holder.send_signal(signal.SIGKILL)
        status, _ = finish(holder)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert status == -signal.SIGKILL
    assert (out / _run_folder.LOCK).exists()  # left behind, but no longer locked
    epochs = stored(out)["step"] // 8 + 1
    assert train("--resume", out, "--epochs", epochs) == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == RUN_FILES
    assert stored(out)["step"] == 8 * epochs


def test_two_runs_started_together_on_one_out_never_mix(tmp_path):
    out = tmp_path / "run"
    first = spawn(*SMALL, "--seed", "1", "--out", out)
    second = spawn(*SMALL, "--seed", "2", "--out", out)
    results = [finish(first), finish(second)]
    assert sorted(status for status, _ in results) == [0, 2], results
    err = next(err for status, err in results if status == 2)
    assert err.count("\n") == 1 and err.startswith("fnbp train: error: "), err
    assert any(
        reason in err
        for reason in (
            "is in use by another fnbp train run",
            "already holds files",
            "the run folder changed while this run was starting",
        )
    ), err
    # one run's files, all of them: its config, checkpoint and metrics agree
    seed = json.loads((out / "config.json").read_text())["seed"]
    assert stored(out)["metadata"]["config"]["seed"] == seed
    assert sorted(os.listdir(out)) == RUN_FILES


def test_without_file_locks_the_run_goes_on_with_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_run_folder, "_lock", lambda descriptor, exclusive: None)
    out = tmp_path / "run"
    assert train(*SMALL, "--epochs", "1", "--out", out) == 0
    assert capsys.readouterr().err == (
        f"fnbp train: warning: the file system of {out} supports no file locks, so nothing "
        f"keeps a second run from writing into it meanwhile\n"
    )
    assert sorted(os.listdir(out)) == RUN_FILES


def test_where_flock_is_missing_posix_record_locks_hold_the_folder(tmp_path, monkeypatch):
    import fcntl

    def no_flock(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = _run_folder.RunLock(str(tmp_path))
    lock.acquire("--out test")
    try:  # another process sees the record lock
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import fcntl, sys\n"
                f"handle = open({str(tmp_path / _run_folder.LOCK)!r}, 'r+')\n"
                "try:\n    fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                "except OSError:\n    sys.exit(3)\n",
            ],
            timeout=60,
        )
        assert probe.returncode == 3
    finally:
        lock.release()
    assert os.listdir(tmp_path) == []


def test_default_run_folders_are_claimed_exclusively(tmp_path, monkeypatch):
    base = str(tmp_path / "runs" / "spirals-mlp-seed0")
    assert _run_folder.claim_numbered(base) == base
    assert _run_folder.claim_numbered(base) == base + "-2"
    os.mkdir(base + "-3")  # made by another run meanwhile
    assert _run_folder.claim_numbered(base) == base + "-4"


@pytest.mark.parametrize("names, in_use_check", [([], False), (["config.json"], True)])
def test_the_lock_file_is_not_a_file_of_the_run(tmp_path, names, in_use_check):
    for name in [_run_folder.LOCK, *names]:
        (tmp_path / name).write_text("{}")
    assert _run_folder.contents(str(tmp_path)) == names
    assert _run_folder.unstarted_run(str(tmp_path)) is in_use_check
    _run_folder.check_not_in_use(str(tmp_path), "--out x")  # a lock file no run holds


def test_a_folder_another_run_wrote_into_meanwhile_is_refused(tmp_path, capsys, monkeypatch):
    from fnbp.cli import train as train_command

    out = tmp_path / "run"
    real = train_command._prepare

    def prepare_while_another_run_finishes(*args, **kwargs):
        run = real(*args, **kwargs)
        out.mkdir()  # another run, started after this one's checks, wrote its files
        (out / "config.json").write_text("{}")
        (out / "checkpoint.npz").write_bytes(b"theirs")
        return run

    monkeypatch.setattr(train_command, "_prepare", prepare_while_another_run_finishes)
    assert train(*SMALL, "--out", out) == 2
    assert capsys.readouterr().err == (
        f"fnbp train: error: --out {out}: the run folder changed while this run was starting "
        f"(another fnbp train run wrote into it); run the command again\n"
    )
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "config.json"]  # theirs, untouched
    assert (out / "checkpoint.npz").read_bytes() == b"theirs"
