"""SIGINT and SIGTERM stop `fnbp train` cleanly wherever they arrive, and the folder resumes.

Each case starts a real `fnbp train` process and sends one signal at a moment measured from
an anchor it can see from outside: its SIGTERM handler installed (Linux's
/proc/PID/status: start-up, then the data, the model, its compilation), its config.json
written (the run folder made; the first step compiling), its first checkpoint written
(training). Every time: exit status 128 + the signal, one line saying where it stopped and
how to continue, no "Exception ignored" and no traceback, and a run folder that continues.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fnbp import cli

pytestmark = pytest.mark.skipif(
    not os.path.isfile("/proc/self/status"),
    reason="finds the moment a handler is installed in /proc",
)

PER_EPOCH = 20  # 400 spiral points, 80 held out, batches of 16
ARGS = [
    "--dataset",
    "spirals",
    "--num-examples",
    "400",
    "--width",
    "8",
    "--depth",
    "1",
    "--batch-size",
    "16",
    "--checkpoint-every",
    "7",
    "--seed",
    "0",
    "--no-progress",
]
LONG = ["--epochs", "100000"]  # never ends before its signal

# (anchor, seconds after it, signal): spread over start-up, compilation and training.
# "import": the console script's first handlers (before `import fnbp` imports jax, which
# takes seconds); the other anchors run `python -m fnbp.cli`, whose handlers come after it.
MOMENTS = [
    ("import", 0.0, signal.SIGINT),
    ("import", 0.05, signal.SIGTERM),
    ("import", 0.3, signal.SIGINT),
    ("handler", 0.0, signal.SIGINT),
    ("handler", 0.02, signal.SIGTERM),
    ("handler", 0.1, signal.SIGINT),
    ("handler", 0.3, signal.SIGTERM),
    ("handler", 1.0, signal.SIGINT),
    ("config", 0.0, signal.SIGTERM),
    ("config", 0.01, signal.SIGINT),
    ("config", 0.2, signal.SIGTERM),
    ("checkpoint", 0.0, signal.SIGINT),
    ("checkpoint", 0.01, signal.SIGTERM),
    ("checkpoint", 0.05, signal.SIGINT),
    ("checkpoint", 0.3, signal.SIGTERM),
]


def catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler of its own for SIGTERM (its SigCgt mask)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            mask = next(line for line in handle if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(mask.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def signalled_run(out, anchor, delay, signum, env):
    """Start a run, send ``signum`` ``delay`` s after ``anchor``; (status, stderr)."""
    entry = (
        ["-c", "import sys, _fnbp_launch; sys.argv[0] = 'fnbp'; sys.exit(_fnbp_launch.main())"]
        if anchor == "import"
        else ["-m", "fnbp.cli"]
    )
    command = [sys.executable, *entry, "train", *ARGS, *LONG, "--out", str(out)]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        seen = {
            "handler": lambda: catches_sigterm(process.pid),
            "import": lambda: catches_sigterm(process.pid),
            "config": lambda: (out / "config.json").exists(),
            "checkpoint": lambda: (out / "checkpoint.npz").exists(),
        }[anchor]
        deadline = time.monotonic() + 120
        while not seen() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(delay)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:  # the test failed: never leave it running
            process.kill()
            process.wait()
    return process.returncode, err


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """Every moment of MOMENTS, run four at a time: (anchor, delay, signum, out, status, err)."""
    tmp = tmp_path_factory.mktemp("signals")
    # the processes share their compilations (the same executables, the same numbers)
    # (on an accelerator, four processes at once each take only the memory they use)
    env = {
        **os.environ,
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [
            (moment, out, pool.submit(signalled_run, out, *moment, env))
            for i, moment in enumerate(MOMENTS)
            for out in [tmp / f"run{i}"]
        ]
        return [(*moment, out, *future.result()) for moment, out, future in futures]


def stored_step(out):
    with np.load(out / "checkpoint.npz", allow_pickle=False) as archive:
        return json.loads(archive["__metadata__"].tobytes())["step"]


def test_every_signal_stops_the_run_in_one_line_with_its_exit_status(stopped):
    for anchor, delay, signum, out, status, err in stopped:
        moment = f"{signal.Signals(signum).name} {delay} s after the {anchor}"
        assert status == 128 + signum, (moment, err)
        assert "Exception ignored" not in err and "Traceback" not in err, (moment, err)
        lines = [line for line in err.splitlines() if line.startswith("fnbp train")]
        assert len(lines) == 1, (moment, err)
        line = lines[0]
        assert line.startswith(f"fnbp train: interrupted by {signal.Signals(signum).name} "), (
            moment,
            line,
        )
        if (out / "checkpoint.npz").exists():
            step = stored_step(out)
            assert re.fullmatch(
                rf"fnbp train: interrupted by SIG[A-Z]+ at step {step} of "
                rf"{100000 * PER_EPOCH}, (in|after) epoch \d+ of 100000; the checkpoint of "
                rf"step {step} is kept \(continue with: fnbp train --resume {re.escape(str(out))}"
                rf"\)",
                line,
            ), (moment, line)
        elif (out / "config.json").exists():
            assert line.endswith(
                f"; it stopped before its first checkpoint, so start it "
                f"again with the same command (its --out {out} may be "
                f"reused)"
            ), (moment, line)
        else:
            assert re.fullmatch(
                r"fnbp train: interrupted by SIG[A-Z]+ while [a-z ]+; nothing "
                r"was written",
                line,
            ), (moment, line)
            assert not out.exists(), moment
    # the moments really were spread over the start-up and the training
    assert any(not (out / "config.json").exists() for *_, out, _, _ in stopped)
    assert sum((out / "checkpoint.npz").exists() for *_, out, _, _ in stopped) >= 4


def test_every_stopped_run_folder_continues(stopped, capsys):
    for anchor, delay, signum, out, _status, _err in stopped:
        moment = f"{signal.Signals(signum).name} {delay} s after the {anchor}"
        if (out / "checkpoint.npz").exists():
            epochs = stored_step(out) // PER_EPOCH + 1  # to the end of its epoch
            args = ["--resume", out, "--epochs", epochs, "--no-progress"]
        elif out.exists():
            args = [*ARGS, "--epochs", 1, "--out", out]  # the same command, a shorter run
        else:
            continue  # nothing was written: nothing to continue
        assert cli.main(["train", *map(str, args)]) == 0, (moment, capsys.readouterr().err)
        assert sorted(os.listdir(out)) == [
            "checkpoint.npz",
            "config.json",
            "metrics.json",
            "plot.png",
        ], moment
    capsys.readouterr()
