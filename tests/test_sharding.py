"""Tests of fnbp.train.sharding and of training on a mesh: data parallel, FSDP, several processes.

The in-process tests run on whatever devices jax gives this process (one CPU,
one GPU, several GPUs): their expectations take the backend and the device
count from jax. The checks that need several devices run this file as a script
in subprocesses on the CPU with 8 devices (jax's own ``JAX_NUM_CPU_DEVICES``
setting, read before JAX starts there): one process does every 8-device check
and prints JSON, and a pair of processes with 2 devices each trains through
``jax.distributed``. Both start once, together, and the tests read what they
printed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _small_run import SPIRALS

import fnbp
from fnbp import cli, train
from fnbp.train import sharding

HERE = Path(__file__).resolve()
SMALL = [*SPIRALS, "--epochs", "1", "--no-progress"]
SUBPROCESS_TIMEOUT = 240

# --- an independent plain-jnp reference: the MLP of eq. 7.36 and cross-entropy (2.14) ---


MODEL = fnbp.mlp([16, 16, 3])
ADAM = optax.adam(1e-2)
SGD = optax.sgd(0.1)


# --- the worker: runs in a subprocess with 8 (or 2 per process) CPU devices ----------------


def spec_of(array):
    """The PartitionSpec of an array's NamedSharding as JSON: entries None, "a" or ["a", "b"]."""
    return [e if e is None or isinstance(e, str) else list(e) for e in array.sharding.spec]


def specs(tree):
    return [spec_of(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def max_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64))))
        for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def identical(a, b):
    return all(
        np.array_equal(np.asarray(p), np.asarray(q))
        for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def error_of(fn):
    try:
        fn()
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def cli_run(*args):
    """``fnbp train`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(["train", *map(str, args)])
        except SystemExit as exit_info:
            status = exit_info.code
    return status, out.getvalue(), err.getvalue()


def eight_device_checks(tmp: Path) -> dict:
    """Every check that needs 8 devices; returns JSON-able findings."""
    # Imported here, not at the top: the two-process run imports this file too
    # and must not touch a JAX backend before jax.distributed.initialize.
    from _oracle import mlp_problem, ref_loss

    found: dict = {"devices": jax.device_count()}
    loss = fnbp.cross_entropy_loss

    # float64: one data-parallel step against jax.grad of the plain reference
    jax.config.update("jax_enable_x64", True)
    params64, x64, y64 = mlp_problem((4, 16, 16, 3), 64, np.float64)
    mesh = fnbp.make_mesh(8)
    step = train.make_train_step(MODEL, loss, SGD, mesh=mesh)
    new_params, _, metrics = step(params64, SGD.init(params64), x64[:16], y64[:16])
    J, grads = jax.jit(jax.value_and_grad(ref_loss))(params64, x64[:16], y64[:16])
    got = jax.tree_util.tree_map(
        lambda p, q: (np.asarray(p) - np.asarray(q)) / 0.1, params64, new_params
    )
    scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(grads))
    found["dp_f64_grad_rel_err"] = max_diff(got, grads) / scale
    found["dp_f64_loss_err"] = abs(float(metrics["loss"]) - float(J)) / abs(float(J))
    jax.config.update("jax_enable_x64", False)

    params, x, y = mlp_problem((4, 16, 16, 3), 64, np.float32)
    key = jax.random.key(7)
    kwargs = dict(key=key, epochs=2, batch_size=16, x_test=x[:40], y_test=y[:40])
    single = train.fit(MODEL, loss, ADAM, params, x, y, **kwargs)

    # data parallel: the input and parameter shardings of the compiled step
    step = train.make_train_step(MODEL, loss, ADAM, mesh=mesh)
    compiled = step.lower(params, ADAM.init(params), x[:16], y[:16]).compile()
    in_params, in_state, in_x, in_y = compiled.input_shardings[0]
    found["dp_in_x"], found["dp_in_y"] = spec_of_sharding(in_x), spec_of_sharding(in_y)
    found["dp_in_params"] = [spec_of_sharding(s) for s in jax.tree_util.tree_leaves(in_params)]
    out_params, out_state, out_metrics = step(params, ADAM.init(params), x[:16], y[:16])
    found["dp_out_params"] = specs(out_params)
    found["dp_out_params_devices"] = [
        len(p.sharding.device_set) for p in jax.tree_util.tree_leaves(out_params)
    ]
    found["dp_out_mu"] = specs(out_state[0].mu)
    found["dp_out_loss"] = spec_of(out_metrics["loss"])
    batch = fnbp.train.sharding.shard_batch(mesh, x[:16])
    found["dp_batch"] = spec_of(batch)
    found["dp_batch_shards"] = sorted(list(s.data.shape) for s in batch.addressable_shards)
    found["dp_batch_rows"] = sorted(s.index[0].start for s in batch.addressable_shards)

    # init_state on an FSDP mesh: created split, the same values as one device's draw
    # (a toy layer with a cheap initializer: the real ones compile slowly)
    def toy_init(key, input_shape, dtype=jnp.float32):
        return (16,), {
            "W": jax.random.normal(key, (16,) + tuple(input_shape), dtype),
            "b": jnp.zeros((16,), dtype),
        }

    toy = fnbp.make_layer(
        "toy",
        toy_init,
        lambda p, z: (z @ p["W"].T, z),
        lambda p, z, v: ({"W": v.T @ z, "b": v.sum(0)}, v @ p["W"]),
    )
    key3 = jax.random.key(3)
    state = train.init_state(
        toy, ADAM, key3, (4,), mesh=fnbp.make_mesh(8, fsdp=8), min_shard_size=64
    )
    found["init_max_diff"] = float(
        np.max(np.abs(np.asarray(state.params["W"]) - np.asarray(jax.random.normal(key3, (16, 4)))))
    )
    found["init_specs"] = [specs(state.params), specs(state.opt_state[0].mu)]

    # data parallel fit: the same trajectory as one device, in float32
    seen = []
    parallel = train.fit(
        MODEL,
        loss,
        ADAM,
        params,
        x,
        y,
        mesh=mesh,
        on_step=lambda s, running: seen.append(specs(s.params)),
        **kwargs,
    )
    found["dp_fit_step_specs"] = seen[0]
    found["dp_fit_steps"] = len(seen)
    found["dp_history"] = [parallel.history, single.history]
    found["dp_params_max_diff"] = max_diff(parallel.params, single.params)
    found["dp_result_specs"] = specs(parallel.params)

    # exact resume on the mesh: stop mid-epoch, go through host memory, continue
    class Stop(Exception):
        pass

    saved = {}

    def stop_at_5(s, running):
        if s.step == 5:
            saved["state"] = s
            raise Stop

    try:
        train.fit(MODEL, loss, ADAM, params, x, y, mesh=mesh, on_step=stop_at_5, **kwargs)
    except Stop:
        pass
    host_state = train.TrainState(*sharding.to_host(saved["state"]))
    resumed = train.fit(
        MODEL,
        loss,
        ADAM,
        None,
        x,
        y,
        mesh=mesh,
        state=host_state,
        history=[parallel.history[0]],
        **kwargs,
    )
    found["resume_identical"] = (
        identical(resumed.params, parallel.params)
        and identical(resumed.state.opt_state, parallel.state.opt_state)
        and resumed.history == parallel.history
    )

    # FSDP: a (data=2, fsdp=4) mesh, parameters of >= 32 elements split
    fsdp_mesh = fnbp.make_mesh(8, fsdp=4)
    step = train.make_train_step(MODEL, loss, ADAM, mesh=fsdp_mesh, min_shard_size=32)
    compiled = step.lower(params, ADAM.init(params), x[:16], y[:16]).compile()
    in_params, in_state, in_x, in_y = compiled.input_shardings[0]
    found["fsdp_in_x"] = spec_of_sharding(in_x)
    found["fsdp_in_params"] = [spec_of_sharding(s) for s in jax.tree_util.tree_leaves(in_params)]
    found["fsdp_in_mu"] = [spec_of_sharding(s) for s in jax.tree_util.tree_leaves(in_state[0].mu)]
    sharded = train.fit(
        MODEL, loss, ADAM, params, x, y, mesh=fsdp_mesh, min_shard_size=32, **kwargs
    )
    found["fsdp_result_specs"] = specs(sharded.params)
    found["fsdp_result_mu_specs"] = specs(sharded.state.opt_state[0].mu)
    first = jax.tree_util.tree_leaves(sharded.params)[0]
    found["fsdp_w1_shard_shapes"] = sorted({tuple(s.data.shape) for s in first.addressable_shards})
    found["fsdp_history"] = sharded.history
    found["fsdp_params_max_diff"] = max_diff(sharded.params, single.params)

    # clear errors
    found["err_fit_batch"] = error_of(
        lambda: train.fit(
            MODEL, loss, ADAM, params, x, y, key=key, epochs=1, batch_size=12, mesh=mesh
        )
    )
    found["err_step_batch"] = error_of(lambda: step(params, ADAM.init(params), x[:12], y[:12]))
    found["err_mesh_16"] = error_of(lambda: fnbp.make_mesh(16))
    found["err_mesh_fsdp"] = error_of(lambda: fnbp.make_mesh(8, fsdp=3))
    found["err_other_axes"] = error_of(
        lambda: train.make_train_step(
            MODEL, loss, ADAM, mesh=jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
        )
    )

    # the command line: errors on one line with exit status 2, and a real run
    found["cli_devices_16"] = cli_run(
        *SMALL, "--devices", "16", "--batch-size", "16", "--out", tmp / "bad1"
    )
    found["cli_batch_20"] = cli_run(
        *SMALL, "--devices", "8", "--batch-size", "20", "--out", tmp / "bad2"
    )
    # without --devices: as many of the 8 as the batch of 20 splits evenly over
    found["cli_auto_devices"] = cli_run(*SMALL, "--batch-size", "20", "--out", tmp / "auto")
    found["cli_auto_devices_config"] = json.loads((tmp / "auto" / "config.json").read_text())
    found["cli_fsdp_3"] = cli_run(
        *SMALL, "--fsdp", "3", "--batch-size", "16", "--out", tmp / "bad3"
    )
    # DP-SGD runs on one device: an explicit --devices 8 is refused (fnbp.train.dp's check)
    found["cli_dp_8"] = cli_run(
        *SMALL,
        "--devices",
        "8",
        "--batch-size",
        "16",
        "--dp-clip",
        "1",
        "--dp-noise",
        "1",
        "--out",
        tmp / "bad4",
    )
    found["cli_nothing_written"] = not any((tmp / f"bad{i}").exists() for i in (1, 2, 3, 4))
    return found


def spec_of_sharding(named):
    return [e if e is None or isinstance(e, str) else list(e) for e in named.spec]


def checkpoint_params(run):
    with np.load(run / "checkpoint.npz", allow_pickle=False) as archive:
        return [archive[name] for name in sorted(archive.files) if name.startswith("params.")]


def worker_main(argv: list[str]) -> int:
    """``python test_sharding.py eight TMP`` or ``... process ID PORT OUT``."""
    if argv[0] == "eight":
        print("RESULT " + json.dumps(eight_device_checks(Path(argv[1]))), flush=True)
        return 0
    process_id, port, out = int(argv[1]), argv[2], argv[3]
    return cli.main(
        [
            "train",
            *SMALL,
            "--batch-size",
            "16",
            "--fsdp",
            "--out",
            out,
            "--coordinator",
            f"localhost:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(process_id),
        ]
    )


# --- the subprocesses, started once for the whole module ---------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(args, devices, log):
    env = dict(
        os.environ,
        JAX_NUM_CPU_DEVICES=str(devices),
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    )  # the default in newer JAX
    return subprocess.Popen(
        [sys.executable, str(HERE), *map(str, args)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=HERE.parent,
    )


def wait(process, log_path):
    try:
        status = process.wait(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        status = "timeout"
    return status, Path(log_path).read_text()


@pytest.fixture(scope="module", autouse=True)
def started(tmp_path_factory):
    """Start the 8-device worker and the two processes of the multi-host run, together,
    while the one-device tests run."""
    tmp = tmp_path_factory.mktemp("sharding")
    port = free_port()
    logs = {name: open(tmp / f"{name}.log", "w") for name in ("eight", "p0", "p1")}
    processes = {
        "eight": start(["eight", tmp], 8, logs["eight"]),
        "p0": start(["process", 0, port, tmp / "multi"], 2, logs["p0"]),
        "p1": start(["process", 1, port, tmp / "multi"], 2, logs["p1"]),
    }
    yield tmp, processes, logs
    for name, process in processes.items():  # a test that failed early: stop them
        if process.poll() is None:
            process.kill()
            process.wait()
        logs[name].close()


@pytest.fixture(scope="module")
def one_device_run(started):
    """``fnbp train`` on this process' one device, done while the subprocesses work."""
    tmp = started[0]
    return cli_run(*SMALL, "--batch-size", "16", "--out", tmp / "one"), tmp / "one"


@pytest.fixture(scope="module")
def workers(started, one_device_run):
    """Wait for the subprocesses: name -> (exit status, output), and the folder."""
    tmp, processes, logs = started
    results = {}
    for name, process in processes.items():
        logs[name].flush()
        results[name] = wait(process, tmp / f"{name}.log")
    results["tmp"] = tmp
    return results


@pytest.fixture(scope="module")
def eight(workers):
    status, log = workers["eight"]
    assert status == 0, log[-3000:]
    line = next(line for line in log.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


# --- in this process: one device ---------------------------------------------------------


def present() -> tuple[int, str]:
    """This process' device count and fnbp's summary of them, e.g. ``(1, "1 cpu")``."""
    n = jax.device_count()
    return n, f"{n} {jax.devices()[0].platform}"


def test_make_mesh_on_this_process_devices_and_its_errors():
    n, summary = present()
    mesh = fnbp.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == n
    assert sharding.batch_spec(mesh) == jax.sharding.PartitionSpec("data")
    are = "device is" if n == 1 else "devices are"
    with pytest.raises(ValueError) as error:
        fnbp.make_mesh(n + 1)
    assert str(error.value) == (
        f"make_mesh: `devices` {n + 1}: only {n} {are} present "
        f"({summary}); pass `devices` {n} or fewer"
    )
    with pytest.raises(ValueError, match="`devices` must be a positive int, got 0"):
        fnbp.make_mesh(0)
    with pytest.raises(ValueError, match="`fsdp` must be a positive int"):
        fnbp.make_mesh(1, fsdp=0)


class FakeMesh:
    """The two attributes param_spec and check_batch read, for meshes larger than this host."""

    def __init__(self, **shape):
        self.shape = shape
        self.axis_names = tuple(shape)


P = jax.sharding.PartitionSpec


@pytest.mark.parametrize(
    "shape, want",
    [
        ((1024, 784), P("fsdp")),  # largest axis divides: the output features
        ((10, 1024), P(None, "fsdp")),  # 10 does not divide by 4: the input features
        ((3, 3, 16, 32), P(None, None, None, "fsdp")),  # a conv kernel: its largest axis
        ((64, 64), P("fsdp")),  # a tie: the first axis
        ((1024,), P("fsdp")),
        ((15,), P()),  # under min_shard_size
        ((1001, 33), P()),  # no axis divides by 4
        ((), P()),  # Adam's count
    ],
)
def test_param_spec_shards_large_leaves_along_their_largest_divisible_axis(shape, want):
    assert sharding.param_spec(shape, FakeMesh(data=2, fsdp=4), min_shard_size=16) == want
    # a data-parallel mesh replicates everything
    assert sharding.param_spec(shape, FakeMesh(data=8), min_shard_size=0) == P()


def test_check_batch_message():
    with pytest.raises(ValueError) as error:
        sharding.check_batch("fit", FakeMesh(data=2, fsdp=4), 30, "batch_size")
    assert str(error.value) == (
        "fit: `batch_size` 30 does not split evenly over the 8 devices of the mesh (data=2, "
        "fsdp=4), each of which takes an equal part of every batch; pass a `batch_size` that "
        "is a multiple of 8 (24 or 32) or fewer `devices`"
    )
    with pytest.raises(
        ValueError,
        match=r"^train_step: a batch of 4 examples does not split "
        r".* pass a batch of a multiple of 8 examples \(8\) or "
        r"fewer `devices`$",
    ):
        sharding.check_batch("train_step", FakeMesh(data=8), 4)
    sharding.check_batch("fit", FakeMesh(data=2, fsdp=4), 32)


def test_initialize_distributed_degrades_to_one_process():
    assert sharding.initialize_distributed() == 1
    assert sharding.initialize_distributed(num_processes=1, process_id=0) == 1
    assert not jax.distributed.is_initialized()
    with pytest.raises(ValueError, match="2 processes need a `coordinator_address`"):
        sharding.initialize_distributed(num_processes=2, process_id=0)
    with pytest.raises(ValueError, match=r"`process_id` must be an int in \[0, 2\), got 2"):
        sharding.initialize_distributed("localhost:1", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="`process_id` 1 needs `num_processes` > 1"):
        sharding.initialize_distributed(process_id=1)


@pytest.mark.parametrize(
    "address, message",
    [
        (
            "localhost",
            "`coordinator_address` 'localhost' has no port; pass 'host:port', e.g. "
            "'localhost:1234' or '10.0.0.1:1234'",
        ),
        (
            "localhost:http",
            "`coordinator_address` 'localhost:http': the port 'http' is not a "
            "number; pass 'host:port'",
        ),
        (":1234", "`coordinator_address` ':1234' has no host; pass 'host:port'"),
        ("localhost:0", "`coordinator_address` 'localhost:0': the port 0 is outside 1 .. 65535"),
        (
            "localhost:65536",
            "`coordinator_address` 'localhost:65536': the port 65536 is outside 1 .. 65535",
        ),
        (
            "::1:1234",
            "`coordinator_address` '::1:1234': write an IPv6 host in brackets, e.g. '[::1]:1234'",
        ),
        (
            "[::1]1234",
            "`coordinator_address` '[::1]1234': an IPv6 host in brackets is followed "
            "by ':port', e.g. '[::1]:1234'",
        ),
        ("local host:1", "`coordinator_address` 'local host:1' has spaces in its host"),
    ],
)
def test_a_malformed_coordinator_address_is_refused_before_jax_sees_it(address, message):
    with pytest.raises(ValueError) as info:
        sharding.initialize_distributed(address, num_processes=2, process_id=1)
    assert str(info.value).startswith(f"initialize_distributed: {message}"), str(info.value)
    assert sharding.check_distributed_arguments("[::1]:1234", 2, 1) == ("::1", 1234)
    assert sharding.check_distributed_arguments("host-0.local:80") == ("host-0.local", 80)


def test_other_distributed_arguments_are_refused_with_fnbp_s_message():
    with pytest.raises(
        TypeError,
        match="^initialize_distributed: `coordinator_address` must "
        "be a string 'host:port', got int$",
    ):
        sharding.initialize_distributed(1234, num_processes=2, process_id=0)
    for timeout in (0, -1, float("nan"), float("inf"), "60", True):
        with pytest.raises(
            ValueError,
            match="^initialize_distributed: `timeout` must be a positive number of seconds, got ",
        ):
            sharding.initialize_distributed("localhost:1", 2, 0, timeout=timeout)


def timeout_script(process_id, port, timeout):
    """Python that joins a 2-process run nobody else joins, and says how it ended."""
    return (
        "import fnbp\n"
        "try:\n"
        f"    fnbp.initialize_distributed('127.0.0.1:{port}', 2, {process_id}, "
        f"timeout={timeout})\n"
        "except TimeoutError as error:\n"
        "    print('TimeoutError:', error)\n"
    )


def test_a_coordinator_nobody_runs_or_joins_times_out_in_one_line(tmp_path):
    # Each case in a subprocess with a hard limit, so that the suite never hangs.
    port = free_port()  # nothing listens there
    train_args = [
        sys.executable,
        "-m",
        "fnbp.cli",
        "train",
        *SMALL,
        "--out",
        tmp_path / "run",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--coordinator-timeout",
        "1",
        "--process-id",
    ]
    commands = {
        "library 1": [sys.executable, "-c", timeout_script(1, port, 1)],
        "library 0": [sys.executable, "-c", timeout_script(0, free_port(), 1)],
        "cli 1": [*train_args, "1"],
    }
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # nothing here needs an accelerator
    processes = {
        name: subprocess.Popen(
            list(map(str, command)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, command in commands.items()
    }
    results = {}
    for name, process in processes.items():
        try:
            out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        results[name] = process.returncode, out, err
    status, out, err = results["library 1"]  # nothing answers at the port: a Python error
    assert status == 0 and out == (
        f"TimeoutError: initialize_distributed: nothing answers at the coordinator "
        f"127.0.0.1:{port} (`coordinator_address`) after 1 s (`timeout`); start process 0 "
        f"with the same `coordinator_address`, check the host and the port, or pass a larger "
        f"`timeout`\n"
    ), (status, out, err)
    status, out, err = results["library 0"]  # the other process never joins: one line, exit 2
    assert status == 2 and out == "", (status, err)
    assert "Traceback" not in err and "Check failure" not in err, err
    assert err.splitlines()[-1].startswith(
        "initialize_distributed: the 2 processes did not all join the coordinator 127.0.0.1:"
    ), err
    assert err.splitlines()[-1].endswith(
        "within 1 s (`timeout`); start every process with the same `coordinator_address` and "
        "`num_processes` and its own `process_id`, or pass a larger `timeout`"
    ), err
    status, out, err = results["cli 1"]
    assert status == 2 and err == (
        f"fnbp train: error: nothing answers at the coordinator 127.0.0.1:{port} "
        f"(--coordinator) after 1 s (--coordinator-timeout); start process 0 with the same "
        f"--coordinator, check the host and the port, or pass a larger "
        f"--coordinator-timeout\n"
    ), (status, err)
    assert not (tmp_path / "run").exists()


def test_wrong_mesh_is_refused():
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        train.make_train_step(MODEL, fnbp.cross_entropy_loss, SGD, mesh="data")


def cli_error(capsys, args, match):
    assert cli.main(["train", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fnbp train: error: ") and err.count("\n") == 1, err
    assert match in err, err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--devices", "0"], "--devices must be a positive integer, got 0"),
        (["--fsdp", "0"], "--fsdp must be a positive integer, got 0"),
        (
            ["--num-processes", "2", "--process-id", "0"],
            "--num-processes 2 needs --coordinator HOST:PORT",
        ),
        (
            ["--num-processes", "2", "--coordinator", "localhost:1"],
            "--num-processes 2 needs --process-id, this process' number in 0 .. 1, got None",
        ),
        (["--process-id", "1"], "--process-id 1 needs --num-processes greater than 1"),
        (
            ["--num-processes", "2", "--process-id", "1", "--coordinator", "host"],
            "fnbp train: error: --coordinator 'host' has no port; pass 'host:port', e.g. "
            "'localhost:1234' or '10.0.0.1:1234'\n",
        ),
        (
            ["--coordinator", "host:99999"],
            "--coordinator 'host:99999': the port 99999 is outside 1 .. 65535",
        ),
        (
            [
                "--num-processes",
                "2",
                "--process-id",
                "1",
                "--coordinator",
                "h:1",
                "--coordinator-timeout",
                "0",
            ],
            "--coordinator-timeout must be a positive number of seconds, got 0.0",
        ),
    ],
)
def test_cli_parallel_flag_errors_are_one_line(tmp_path, capsys, extra, match):
    cli_error(capsys, [*SMALL, *extra, "--out", tmp_path / "run"], match)
    assert not (tmp_path / "run").exists()


def test_cli_more_devices_than_present_is_one_line(tmp_path, capsys):
    # make_mesh's own check, its message in the flags' words
    n, summary = present()
    are = "device is" if n == 1 else "devices are"
    cli_error(
        capsys,
        [*SMALL, "--devices", n + 1, "--out", tmp_path / "run"],
        f"fnbp train: error: --devices {n + 1}: only {n} {are} present ({summary}); "
        f"pass --devices {n} or fewer",
    )
    assert not (tmp_path / "run").exists()


def test_cli_fsdp_must_divide_the_devices_is_one_line(tmp_path, capsys):
    # make_mesh's check, even on one device (the mesh of 1 device is never used)
    cli_error(
        capsys,
        [*SMALL, "--devices", 1, "--fsdp", 2, "--out", tmp_path / "run"],
        "fnbp train: error: --fsdp 2 does not divide --devices 1; the devices form a "
        "(1 // fsdp) x fsdp mesh, so pass an --fsdp that divides 1",
    )
    assert not (tmp_path / "run").exists()


# --- with 8 devices (the subprocess) -------------------------------------------------------


def test_data_parallel_step_equals_the_float64_oracle(eight):
    assert eight["devices"] == 8
    assert eight["dp_f64_grad_rel_err"] <= 1e-10
    assert eight["dp_f64_loss_err"] <= 1e-12


def test_data_parallel_shardings_actually_used(eight):
    # the compiled step's inputs: the batch split over "data", the parameters replicated
    assert eight["dp_in_x"] == ["data"] and eight["dp_in_y"] == ["data"]
    assert all(spec == [] for spec in eight["dp_in_params"]) and len(eight["dp_in_params"]) == 6
    # what the step returns: replicated over all 8 devices, and so is the loss
    assert all(spec == [] for spec in eight["dp_out_params"] + eight["dp_out_mu"])
    assert eight["dp_out_params_devices"] == [8] * 6
    assert eight["dp_out_loss"] == []
    # a batch of 16 placed on the mesh: 8 slices of 2 rows each
    assert eight["dp_batch"] == ["data"]
    assert eight["dp_batch_shards"] == [[2, 4]] * 8
    assert eight["dp_batch_rows"] == list(range(0, 16, 2))
    assert eight["dp_fit_step_specs"] == [[]] * 6 and eight["dp_result_specs"] == [[]] * 6


def assert_same_trajectory(got, want, tol=2e-5):
    assert [h["step"] for h in got] == [h["step"] for h in want]
    for a, b in zip(got, want, strict=True):
        for name in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
            assert a[name] == pytest.approx(b[name], rel=tol, abs=tol), name


def test_data_parallel_fit_equals_single_device_fit_float32(eight):
    parallel, single = eight["dp_history"]
    assert eight["dp_fit_steps"] == 8
    assert_same_trajectory(parallel, single)
    assert eight["dp_params_max_diff"] <= 1e-5


def test_init_state_on_a_mesh_is_the_same_draw(eight):
    # The same random bits; turning them into normal draws may round differently by an
    # ulp when XLA lays out the split program otherwise (seen with jax 0.12 on CPU).
    assert eight["init_max_diff"] <= 1e-6
    # W (16, 4) has 64 elements: split over the 8 fsdp devices, its Adam moments too
    assert eight["init_specs"] == [[["fsdp"], []], [["fsdp"], []]]


def test_resume_on_the_mesh_is_exact(eight):
    assert eight["resume_identical"] is True


def test_fsdp_shardings_and_trajectory(eight):
    # leaves in tree order: W1 (16, 4), b1 (16,) under 32 elements, W2 (16, 16), b2,
    # W3 (3, 16) split along its 16 inputs, b3
    ordered = [["fsdp"], [], ["fsdp"], [], [None, "fsdp"], []]
    assert eight["fsdp_in_x"] == [["data", "fsdp"]]
    assert eight["fsdp_in_params"] == ordered and eight["fsdp_in_mu"] == ordered
    assert eight["fsdp_result_specs"] == ordered == eight["fsdp_result_mu_specs"]
    assert eight["fsdp_w1_shard_shapes"] == [[4, 4]]  # W1 (16, 4): 4 rows per fsdp device
    assert_same_trajectory(eight["fsdp_history"], eight["dp_history"][1])
    assert eight["fsdp_params_max_diff"] <= 1e-5


def test_clear_errors_with_8_devices(eight):
    assert eight["err_fit_batch"] == (
        "ValueError: fit: `batch_size` 12 does not split evenly over the 8 devices of the "
        "mesh (data=8), each of which takes an equal part of every batch; pass a "
        "`batch_size` that is a multiple of 8 (8 or 16) or fewer `devices`"
    )
    assert eight["err_step_batch"].startswith(
        "ValueError: train_step: a batch of 12 examples does not split evenly over the 8 "
        "devices of the mesh (data=2, fsdp=4)"
    )
    assert eight["err_mesh_16"] == (
        "ValueError: make_mesh: `devices` 16: only 8 devices are present (8 cpu); pass "
        "`devices` 8 or fewer"
    )
    assert "`fsdp` 3 does not divide `devices` 8" in eight["err_mesh_fsdp"]
    assert (
        "the mesh axes must be ('data',) or ('data', 'fsdp'), got ('batch',)"
        in eight["err_other_axes"]
    )


@pytest.mark.parametrize(
    "name, match",
    [
        # the library's checks (make_mesh, check_batch), their messages in the flags' words
        (
            "cli_devices_16",
            "fnbp train: error: --devices 16: only 8 devices are present "
            "(8 cpu); pass --devices 8 or fewer\n",
        ),
        (
            "cli_batch_20",
            "fnbp train: error: --batch-size 20 does not split evenly over the 8 "
            "devices of the mesh (data=8), each of which takes an equal part of every "
            "batch; pass a --batch-size that is a multiple of 8 (16 or 24) or fewer "
            "--devices\n",
        ),
        (
            "cli_fsdp_3",
            "fnbp train: error: --fsdp 3 does not divide --devices 8; the devices form "
            "a (8 // fsdp) x fsdp mesh, so pass an --fsdp that divides 8\n",
        ),
        (
            "cli_dp_8",
            "fnbp train: error: DP-SGD runs on one device; its per-example clipping and "
            "noise are not sharded over a device mesh yet, so train without a mesh, on "
            "one device (--devices 1)\n",
        ),
    ],
)
def test_cli_errors_with_8_devices(eight, name, match):
    status, out, err = eight[name]
    assert status == 2 and out == ""
    assert err.startswith("fnbp train: error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert eight["cli_nothing_written"] is True


def test_cli_without_devices_uses_as_many_as_the_batch_splits_over(eight):
    status, _, err = eight["cli_auto_devices"]
    assert status == 0, err
    assert (
        "fnbp train: --batch-size 20 does not split evenly over the 8 devices present; "
        "training on 5 (pass --devices to choose)"
    ) in err
    assert eight["cli_auto_devices_config"]["devices"] == 5


def run_outputs(run):
    config = json.loads((run / "config.json").read_text())
    history = json.loads((run / "metrics.json").read_text())["history"]
    return config, history, checkpoint_params(run)


# --- two processes of 2 devices each, joined by jax.distributed ---------------------------


def test_two_processes_train_as_one_device_does(workers, one_device_run):
    (status, out, err), one = one_device_run
    assert status == 0, err
    assert "data parallel" not in out
    want_config, want_history, want_params = run_outputs(one)
    assert (want_config["devices"], want_config["processes"]) == (1, 1)
    for name in ("p0", "p1"):
        status, log = workers[name]
        assert status == 0, log[-3000:]
    # process 0 prints and writes the run folder; process 1 only computes
    assert "data parallel on 4 cpu devices, mesh (data=1, fsdp=4)" in workers["p0"][1]
    assert "test accuracy" in workers["p0"][1] and "test accuracy" not in workers["p1"][1]
    config, history, params = run_outputs(workers["tmp"] / "multi")
    assert (config["devices"], config["fsdp"], config["processes"]) == (4, 4, 2)
    # the parameters, split over the devices of both processes and gathered for the
    # checkpoint, and the losses are the one-device run's
    assert [h["step"] for h in history] == [10] and [p.shape for p in params] == [
        (16, 2),
        (16,),
        (2, 16),
        (2,),
    ]
    assert_same_trajectory(history, want_history)
    assert max_diff(params, want_params) <= 1e-5


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
