"""One command for a machine with a GPU or TPU: the card, the step benchmarks, the tests.

Run from anywhere (the package is found from this file's folder, installed or
not)::

    python benchmarks/accelerator_check.py            # about 5 minutes at most
    python benchmarks/accelerator_check.py --out check/ --budget 240

In order, each step in its own process (so that each gets the whole card) and
each under a time limit that keeps the whole run inside ``--budget`` seconds:

1. the card: ``nvidia-smi`` where there is one, and what JAX sees (backend,
   device kind, count, versions); without an accelerator it stops, unless
   ``--allow-cpu``;
2. ``benchmarks/bench_mlp.py --quick``: the MLP training step and the other
   rows, time(fnbp) / time(autodiff);
3. ``benchmarks/bench_conv.py --quick``: the conv-net training step;
4. with several devices, the data-parallel step (:func:`fnbp.make_train_step`
   on :func:`fnbp.make_mesh`) against one device, examples per second;
5. the test suite (pytest), with float32 matrix products at full precision
   (``JAX_DEFAULT_MATMUL_PRECISION=highest``: GPUs otherwise use TF32, whose
   10-bit mantissa the suite's float32 tolerances are not written for), in
   parallel with pytest-xdist where it is installed;

then a summary: the card, every step's status and seconds, the train-step
ratios per batch, the conv ratios, the data-parallel speed-up and pytest's
last line. ``--out DIR`` keeps the logs and the benchmarks' JSON. The exit
status is 0 when every step passed, 1 otherwise, 3 when there is no
accelerator (and no ``--allow-cpu``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

DEVICE_QUERY = """
import json, platform, jax
devices = jax.devices()
print(json.dumps({"backend": jax.default_backend(), "kind": devices[0].device_kind,
                  "count": len(devices), "jax": jax.__version__,
                  "python": platform.python_version()}))
"""


def environment() -> dict[str, str]:
    """The child processes' environment: this checkout first on the path."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Step:
    """One step's outcome: status ("ok", "failed", "timeout", "skipped"), seconds, output."""

    def __init__(self, name: str):
        self.name, self.status, self.seconds, self.output = name, "skipped", 0.0, ""


def run(step: Step, command: list[str], timeout: float, env: dict[str, str],
        log: Path | None) -> Step:
    """Run ``command``, echoing its output as it comes, within ``timeout`` seconds."""
    print(f"\n=== {step.name}: {' '.join(command)} (limit {timeout:.0f} s)", flush=True)
    if timeout < 5:
        print("    skipped: no time left in the budget", flush=True)
        return step
    started = time.perf_counter()
    lines: list[str] = []
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def echo() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        process.wait(timeout=timeout)
        step.status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        step.status = f"timeout ({timeout:.0f} s)"
        print(f"\n    stopped: over its limit of {timeout:.0f} s", flush=True)
    reader.join(timeout=10)
    step.seconds = time.perf_counter() - started
    step.output = "".join(lines)
    if log is not None:
        log.write_text(step.output)
    return step


def card_lines() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def data_parallel_figures() -> int:
    """Examples per second of the MLP train step on one device and on all of them."""
    import jax
    import jax.numpy as jnp
    import optax

    sys.path.insert(0, str(BENCHMARKS))
    import fnbp
    from timing import compare

    count = jax.device_count()
    model = fnbp.mlp([1024, 1024, 10])
    optimizer = optax.sgd(0.01)
    per_device = 256
    batch = per_device * count
    _, params = model.init(jax.random.PRNGKey(0), (784,), jnp.float32)
    opt_state = optimizer.init(params)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, 784), jnp.float32)
    y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)
    one = fnbp.make_train_step(model, fnbp.cross_entropy_loss, optimizer)
    mesh = fnbp.make_mesh(count)
    many = fnbp.make_train_step(model, fnbp.cross_entropy_loss, optimizer, mesh=mesh)
    sharded_x = fnbp.sharding.shard_batch(mesh, x)
    sharded_y = fnbp.sharding.shard_batch(mesh, y)
    placed = fnbp.sharding.shard_params((params, opt_state), mesh)
    times = compare({"one device": (one, (params, opt_state, x[:per_device], y[:per_device])),
                     f"{count} devices": (many, (*placed, sharded_x, sharded_y))},
                    repeats=11, inner=3)
    rate_one = per_device / times["one device"]
    rate_many = batch / times[f"{count} devices"]
    print(f"data-parallel train step, MLP 784-1024-1024-10 float32, {per_device} examples "
          f"per device, on {fnbp.sharding.describe(mesh)}")
    print(f"  one device: {rate_one:,.0f} examples/s; {count} devices: {rate_many:,.0f} "
          f"examples/s; speed-up {rate_many / rate_one:.2f} (ideal {count})")
    print(json.dumps({"data_parallel": {"devices": count, "one_device_examples_per_s":
                                        rate_one, "all_devices_examples_per_s": rate_many,
                                        "speedup": rate_many / rate_one}}))
    return 0


def summary_ratios(out: Path) -> list[str]:
    lines = []
    mlp = out / "bench_mlp.json"
    if mlp.exists():
        rows = json.loads(mlp.read_text()).get("batches", [])
        for row in rows:
            lines.append(f"  MLP train step, batch {row['batch']:>5}: fnbp "
                         f"{row['step_fnbp_ms']:.3f} ms, autodiff "
                         f"{row['step_autodiff_ms']:.3f} ms, ratio "
                         f"{row['train_step_ratio']:.3f} (per-example "
                         f"{row['per_example_ratio']:.3f})")
    conv = out / "bench_conv.json"
    if conv.exists():
        figures = json.loads(conv.read_text())
        for name, ratio in figures.get("ratios", {}).items():
            lines.append(f"  conv-net step, fnbp / {name}: {ratio:.3f} "
                         f"({1e3 * figures['seconds']['fnbp']:.3f} ms/step)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=290.0,
                        help="seconds for the whole run (default 290)")
    parser.add_argument("--out", type=Path, help="folder for the logs and JSON figures")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run even when JAX sees no accelerator (to try the script)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    parser.add_argument("--workers", type=int, default=None,
                        help="pytest-xdist workers (default 8 when pytest-xdist is "
                             "installed, else the suite runs in one process)")
    parser.add_argument("--data-parallel", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data_parallel:
        return data_parallel_figures()

    started = time.perf_counter()

    def left(reserve: float = 0.0) -> float:
        return args.budget - (time.perf_counter() - started) - reserve

    out = args.out or Path(tempfile.mkdtemp(prefix="fnbp-accelerator-check-"))
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    python = sys.executable

    print("=== the card", flush=True)
    cards = card_lines()
    for line in cards:
        print(f"nvidia-smi: {line}")
    query = subprocess.run([python, "-c", DEVICE_QUERY], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    if query.returncode != 0:
        print(query.stdout + query.stderr)
        print("JAX could not start; nothing was measured")
        return 1
    device = json.loads(query.stdout.strip().splitlines()[-1])
    print(f"JAX {device['jax']} (Python {device['python']}): backend {device['backend']}, "
          f"{device['count']} x {device['kind']}", flush=True)
    if device["backend"] == "cpu" and not args.allow_cpu:
        print("no GPU or TPU is visible to JAX (backend cpu): install the accelerator's jax "
              "(e.g. pip install -U \"jax[cuda12]\") or pass --allow-cpu to run here anyway")
        return 3

    steps: list[Step] = []
    # the benchmarks first, leaving the tests at least 150 s of the budget
    steps.append(run(Step("bench_mlp --quick"),
                     [python, str(BENCHMARKS / "bench_mlp.py"), "--quick", "--json",
                      str(out / "bench_mlp.json")],
                     min(90.0, left(180)), env, out / "bench_mlp.log"))
    steps.append(run(Step("bench_conv --quick"),
                     [python, str(BENCHMARKS / "bench_conv.py"), "--quick", "--json",
                      str(out / "bench_conv.json")],
                     min(45.0, left(160)), env, out / "bench_conv.log"))
    data_parallel = Step("data parallel")
    if device["count"] > 1:
        steps.append(run(data_parallel, [python, str(Path(__file__).resolve()),
                                         "--data-parallel"],
                         min(40.0, left(150)), env, out / "data_parallel.log"))
    else:
        data_parallel.output = "one device: the data-parallel figures need several"
        steps.append(data_parallel)
    tests = Step("tests")
    if not args.skip_tests:
        workers = args.workers
        if workers is None:
            workers = 8 if importlib.util.find_spec("xdist") is not None else 1
        command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5",
                   str(ROOT / "tests")]
        test_env = dict(env, JAX_DEFAULT_MATMUL_PRECISION="highest")
        if workers > 1:
            command[4:4] = ["-n", str(workers), "--dist", "loadfile"]
            # several processes share the card: no process takes 75% of its memory
            test_env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        steps.append(run(tests, command, left(5), test_env, out / "tests.log"))
    else:
        steps.append(tests)

    print("\n=== summary")
    if cards:
        print(f"card: {'; '.join(cards)}")
    print(f"JAX {device['jax']}: {device['count']} x {device['kind']} ({device['backend']})")
    for step in steps:
        print(f"  {step.name:<20} {step.status:<22} {step.seconds:6.1f} s")
    for line in summary_ratios(out):
        print(line)
    for line in data_parallel.output.splitlines():
        if "speed-up" in line or line.startswith("one device"):
            print(f"  {line.strip()}")
    if tests.output:
        last = [line for line in tests.output.splitlines() if line.strip()]
        print(f"  pytest: {last[-1].strip('= ') if last else '(no output)'}")
    print(f"total {time.perf_counter() - started:.1f} s; logs and figures in {out}")
    failed = [s for s in steps if s.status not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
