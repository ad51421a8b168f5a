"""One command for a machine with a GPU or TPU: the card, the step benchmarks, the tests.

Run from anywhere (the package is found from this file's folder, installed or
not; nothing is installed, no network is needed)::

    python benchmarks/accelerator_check.py --out check/   # under 5 minutes on an H200
    python benchmarks/accelerator_check.py --allow-cpu --smoke --pytest-args tests/test_benchmarks.py

In order, each step in its own process (so that each gets the whole card) and
each under a time limit that keeps the whole run inside ``--budget`` seconds
(default 290); every figure is printed as soon as it is measured, so a step
stopped at its limit still shows what it measured:

1. the card: ``nvidia-smi`` where there is one, and what JAX sees (backend,
   device kind, count, versions); without an accelerator it stops, unless
   ``--allow-cpu``;
2. ``benchmarks/bench_gpu_mlp.py``: parity on the card, the training step of
   the MLP 1024-4096-4096-4096-10 at batch 4096 and 16384 in float32 and
   bfloat16, time(fnbp) / time(autodiff) with the A/A control, TFLOP/s, and
   PyTorch's eager step where torch is installed (``--smoke``: tiny sizes);
3. ``benchmarks/bench_conv.py --quick``: the conv-net training step, then
   ``benchmarks/bench_dp.py --quick`` without its slow baselines:
   ``clipped_grads``, ``grad_moments`` and ``per_example_grad_norms`` as
   ratios to ``fnbp.backprop`` (each where the budget leaves it time);
4. with several devices, the data-parallel step (:func:`fnbp.make_train_step`
   on :func:`fnbp.make_mesh`) against one device, examples per second;
5. the test suite (pytest), with float32 matrix products at full precision
   (``JAX_DEFAULT_MATMUL_PRECISION=highest``: GPUs otherwise use TF32, whose
   10-bit mantissa the suite's float32 tolerances are not written for), in
   parallel with pytest-xdist where it is installed, each worker taking GPU
   memory as it needs it (``XLA_PYTHON_CLIENT_PREALLOCATE=false``) instead
   of 75% of the card; ``--pytest-args`` runs a part of it, ``--skip-tests``
   none;

then a one-screen summary: the card, JAX's version, every step's status and
seconds, each fnbp/autodiff ratio with its A/A control and the ms per step of
autodiff, fnbp and PyTorch, the conv ratios, the per-example ratios, the
data-parallel speed-up,
pytest's last line and its slowest test files. ``--out DIR`` keeps the logs,
the benchmarks' JSON and ``accelerator_check.json`` (all of the summary). The
exit status is 0 when every step passed, 1 otherwise, 3 when there is no
accelerator (and no ``--allow-cpu``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
GRACE = 15.0  # seconds a step stopped at its limit gets to print its summary

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


def run(
    step: Step, command: list[str], timeout: float, env: dict[str, str], log: Path | None
) -> Step:
    """Run ``command``, echoing its output as it comes, within ``timeout`` seconds."""
    print(f"\n=== {step.name}: {' '.join(command)} (limit {timeout:.0f} s)", flush=True)
    if timeout < 5:
        print("    skipped: no time left in the budget", flush=True)
        return step
    started = time.perf_counter()
    lines: list[str] = []
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

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
        # Ctrl-C first: pytest then prints its counts so far; then kill what is left.
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        step.status = f"timeout ({timeout:.0f} s)"
        print(f"\n    stopped: over its limit of {timeout:.0f} s", flush=True)
    reader.join(timeout=10)
    step.seconds = time.perf_counter() - started
    print(f"    {step.name}: {step.status} in {step.seconds:.1f} s", flush=True)
    step.output = "".join(lines)
    if log is not None:
        log.write_text(step.output)
    return step


def card_lines() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def data_parallel_figures() -> int:
    """Examples per second of the MLP train step on one device and on all of them."""
    import jax
    import jax.numpy as jnp
    import optax

    sys.path.insert(0, str(BENCHMARKS))
    from timing import compare

    import fnbp

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
    sharded_x = fnbp.train.sharding.shard_batch(mesh, x)
    sharded_y = fnbp.train.sharding.shard_batch(mesh, y)
    placed = fnbp.train.sharding.shard_params((params, opt_state), mesh)
    times = compare(
        {
            "one device": (one, (params, opt_state, x[:per_device], y[:per_device])),
            f"{count} devices": (many, (*placed, sharded_x, sharded_y)),
        },
        repeats=11,
        inner=3,
    )
    rate_one = per_device / times["one device"]
    rate_many = batch / times[f"{count} devices"]
    print(
        f"data-parallel train step, MLP 784-1024-1024-10 float32, {per_device} examples "
        f"per device, on {fnbp.train.sharding.describe(mesh)}"
    )
    print(
        f"  one device: {rate_one:,.0f} examples/s; {count} devices: {rate_many:,.0f} "
        f"examples/s; speed-up {rate_many / rate_one:.2f} (ideal {count})"
    )
    print(
        json.dumps(
            {
                "data_parallel": {
                    "devices": count,
                    "one_device_examples_per_s": rate_one,
                    "all_devices_examples_per_s": rate_many,
                    "speedup": rate_many / rate_one,
                }
            }
        )
    )
    return 0


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def mlp_lines(figures: dict | None) -> list[str]:
    """The parity rows of bench_gpu_mlp.json, one line each."""
    if not figures:
        return []
    net = figures["network"]
    lines = [
        f"MLP {net['input']}-{'-'.join(map(str, net['widths']))} training step, "
        f"{figures['k']} steps per timing; ratio = fnbp / autodiff (A/A control); "
        f"ms per step; TFLOP/s = 6 * B * P / step time"
    ]
    for r in figures["rows"]:
        torch_part = ""
        if r.get("torch_ms") is not None:
            torch_part = f"; torch {r['torch_ms']:.3f} ms ({r['torch_ratio']:.3f} of autodiff)"
        lines.append(
            f"  B{r['batch']:<6} {r['dtype']:<8}: {r['ratio']:.3f} (A/A "
            f"{r['aa_ratio']:.3f}); autodiff {r['autodiff_ms']:.3f} ms "
            f"({r['autodiff_tflops']:.4g} TFLOP/s), fnbp {r['fnbp_ms']:.3f} ms"
            f"{torch_part}"
        )
    for r in figures.get("skipped", []):
        lines.append(f"  B{r['batch']:<6} {r['dtype']:<8}: skipped (time limit)")
    for r in figures.get("errors", []):
        lines.append(f"  B{r['batch']:<6} {r['dtype']:<8}: failed: {r['error']}")
    return lines


def conv_lines(figures: dict | None) -> list[str]:
    if not figures:
        return []
    return [
        f"conv-net step, fnbp / {name}: {ratio:.3f} "
        f"({1e3 * figures['seconds']['fnbp']:.3f} ms/step)"
        for name, ratio in figures.get("ratios", {}).items()
    ]


def dp_lines(figures: dict | None) -> list[str]:
    """The per-example rows of bench_dp.json, one line each."""
    if not figures:
        return []
    lines = []
    for row in figures.get("rows", []):
        ratios = row.get("ratios", {})
        shown = ", ".join(
            f"{name} {ratios[name]:.3f}"
            for name in ("clipped_grads", "grad_moments", "grad_norms", "aa")
            if isinstance(ratios.get(name), (int, float))
        )
        lines.append(f"per-example {row['net']} B{row['batch']}, x backprop: {shown}")
    return lines


def test_file_seconds(junit: Path) -> dict[str, float]:
    """Seconds per test file, from pytest's JUnit XML report (summed over its tests)."""
    try:
        tree = ElementTree.parse(junit)
    except (OSError, ElementTree.ParseError):
        return {}
    seconds: dict[str, float] = defaultdict(float)
    for case in tree.iter("testcase"):
        parts = case.get("classname", "").split(".")
        module = next((i for i, part in enumerate(parts) if part.startswith("test_")), None)
        name = "/".join(parts[: module + 1]) + ".py" if module is not None else "?"
        seconds[name] += float(case.get("time") or 0.0)
    return dict(sorted(seconds.items(), key=lambda item: -item[1]))


def tests_step(
    tests: Step, args: argparse.Namespace, out: Path, env: dict[str, str], timeout: float
) -> Step:
    """The suite (or ``--pytest-args``) in parallel, float32 products at full precision."""
    workers = args.workers
    has_xdist = importlib.util.find_spec("xdist") is not None
    if workers is None:
        workers = min(12, os.cpu_count() or 1) if has_xdist else 0
    targets = shlex.split(args.pytest_args) if args.pytest_args else [str(ROOT / "tests")]
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--durations=5",
        f"--junitxml={out / 'tests.xml'}",
    ]
    if has_xdist:
        command += ["-n", str(workers)] + (["--dist", args.dist] if workers > 0 else [])
    else:  # pyproject's addopts name pytest-xdist's -n: drop them
        print(
            "pytest-xdist is not installed: the tests run in one process, which may not "
            "fit the budget",
            flush=True,
        )
        command += ["-o", "addopts=-ra"]
    test_env = dict(
        env,
        JAX_DEFAULT_MATMUL_PRECISION="highest",
        # several processes share the card: none takes 75% of its memory
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
    )
    return run(tests, command + targets, timeout, test_env, out / "tests.log")


def last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "(no output)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget", type=float, default=290.0, help="seconds for the whole run (default 290)"
    )
    parser.add_argument("--out", type=Path, help="folder for the logs and JSON figures")
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run even when JAX sees no accelerator (to try the script)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the MLP benchmark at tiny sizes (seconds, any backend; always so on a CPU)",
    )
    parser.add_argument("--skip-tests", "--no-tests", action="store_true", help="benchmarks only")
    parser.add_argument(
        "--pytest-args",
        default=None,
        help="what pytest runs instead of the whole suite, e.g. "
        '"tests/test_benchmarks.py" or "tests -k linear"',
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="pytest-xdist workers (default: min(12, CPU cores) when "
        "pytest-xdist is installed; 0 runs the tests in one process)",
    )
    parser.add_argument(
        "--dist",
        default="loadfile",
        help="pytest-xdist scheduling (default loadfile: a file's module "
        "fixtures, such as test_sharding's subprocesses, and compiled "
        "programs are made once, by one worker)",
    )
    parser.add_argument("--data-parallel", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data_parallel:
        return data_parallel_figures()

    started = time.perf_counter()

    def left(reserve: float = 0.0) -> float:
        return args.budget - (time.perf_counter() - started) - reserve

    out = args.out or Path(tempfile.mkdtemp(prefix="fnbp-accelerator-check-"))
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("bench_gpu_mlp.json", "bench_conv.json", "bench_dp.json", "tests.xml"):
        (out / stale).unlink(missing_ok=True)  # a step cut short must not show old figures
    env = environment()
    python = sys.executable

    print("=== the card", flush=True)
    cards = card_lines()
    for line in cards:
        print(f"nvidia-smi: {line}")
    card = Step("card")
    try:
        query = subprocess.run(
            [python, "-c", DEVICE_QUERY],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=min(90.0, left(60)),
        )
    except subprocess.TimeoutExpired:
        print("JAX did not start within its time limit; nothing was measured")
        return 1
    card.seconds, card.status = time.perf_counter() - started, "ok"
    if query.returncode != 0:
        print(query.stdout + query.stderr)
        print("JAX could not start; nothing was measured")
        return 1
    device = json.loads(query.stdout.strip().splitlines()[-1])
    print(
        f"JAX {device['jax']} (Python {device['python']}): backend {device['backend']}, "
        f"{device['count']} x {device['kind']} ({card.seconds:.1f} s)",
        flush=True,
    )
    if device["backend"] == "cpu" and not args.allow_cpu:
        print(
            "no GPU or TPU is visible to JAX (backend cpu): install the accelerator's jax "
            '(e.g. pip install -U "jax[cuda12]") or pass --allow-cpu to run here anyway'
        )
        return 3

    steps: list[Step] = [card]
    # The benchmarks first (the tests would share the card with them), each
    # capped so that the tests keep at least 150 s of the budget; the conv-net
    # step only runs where the MLP benchmark left the tests more than that.
    bench_env = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # PyTorch shares the card
    limit = min(120.0, left(170))
    command = [
        python,
        str(BENCHMARKS / "bench_gpu_mlp.py"),
        "--json",
        str(out / "bench_gpu_mlp.json"),
        "--time-limit",
        f"{max(limit - 20, 1):.0f}",
    ]
    if args.smoke or device["backend"] == "cpu":
        command.append("--smoke")  # on a CPU the full sizes take far longer than the budget
    steps.append(run(Step("bench_gpu_mlp"), command, limit, bench_env, out / "bench_gpu_mlp.log"))
    conv = Step("bench_conv --quick")
    if left(190) >= 30:
        run(
            conv,
            [
                python,
                str(BENCHMARKS / "bench_conv.py"),
                "--quick",
                "--json",
                str(out / "bench_conv.json"),
            ],
            min(45.0, left(190)),
            env,
            out / "bench_conv.log",
        )
    else:
        print(f"\n=== {conv.name}: skipped, the tests keep the {left():.0f} s left", flush=True)
    steps.append(conv)
    per_example = Step("bench_dp --quick")
    if left(190) >= 25:
        run(
            per_example,
            [
                python,
                str(BENCHMARKS / "bench_dp.py"),
                "--quick",
                "--max-materialize-gb",
                "0",
                "--no-torch",
                "--no-jax-privacy",
                "--json",
                str(out / "bench_dp.json"),
            ]
            + (["--smoke"] if args.smoke else []),
            min(40.0, left(190)),
            env,
            out / "bench_dp.log",
        )
    else:
        print(
            f"\n=== {per_example.name}: skipped, the tests keep the {left():.0f} s left", flush=True
        )
    steps.append(per_example)
    data_parallel = Step("data parallel")
    if device["count"] > 1:
        steps.append(
            run(
                data_parallel,
                [python, str(Path(__file__).resolve()), "--data-parallel"],
                min(40.0, left(150)),
                env,
                out / "data_parallel.log",
            )
        )
    else:
        data_parallel.output = "one device: the data-parallel figures need several"
        steps.append(data_parallel)
    tests = Step("tests")
    if not args.skip_tests:
        tests_step(tests, args, out, env, left(GRACE + 5))
    steps.append(tests)

    mlp = read_json(out / "bench_gpu_mlp.json")
    conv_figures = read_json(out / "bench_conv.json")
    dp_figures = read_json(out / "bench_dp.json")
    files = test_file_seconds(out / "tests.xml") if tests.output else {}
    pytest_line = last_line(tests.output) if tests.output else None
    speedup = [
        line.strip()
        for line in data_parallel.output.splitlines()
        if "speed-up" in line or line.startswith("one device")
    ]
    total = time.perf_counter() - started
    (out / "accelerator_check.json").write_text(
        json.dumps(
            {
                "card": cards,
                "jax": device,
                "steps": [
                    {"name": s.name, "status": s.status, "seconds": s.seconds} for s in steps
                ],
                "gpu_mlp": mlp,
                "conv": conv_figures,
                "per_example": dp_figures,
                "data_parallel": speedup,
                "pytest": pytest_line,
                "test_file_seconds": files,
                "seconds": total,
            },
            indent=2,
        )
    )

    print("\n=== summary")
    if cards:
        print(f"card: {'; '.join(cards)}")
    print(
        f"JAX {device['jax']} (Python {device['python']}): {device['count']} x "
        f"{device['kind']} ({device['backend']})"
    )
    for step in steps:
        print(f"  {step.name:<20} {step.status:<22} {step.seconds:6.1f} s")
    for line in mlp_lines(mlp) + conv_lines(conv_figures) + dp_lines(dp_figures) + speedup:
        print(line)
    if pytest_line is not None:
        cut = " (stopped at its time limit: counts so far)" if "timeout" in tests.status else ""
        print(f"pytest: {pytest_line}{cut}")
        if files:
            slowest = ", ".join(
                f"{Path(name).name} {sec:.0f} s" for name, sec in list(files.items())[:5]
            )
            print(f"  slowest test files (summed test time): {slowest}")
    print(f"total {total:.1f} s; logs and figures in {out}")
    failed = [s for s in steps if s.status not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
