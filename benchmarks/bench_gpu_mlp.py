"""Parity on an accelerator: fnbp's MLP training step against autodiff, float32 and bfloat16.

Run: ``python benchmarks/bench_gpu_mlp.py`` on a GPU or TPU (about a minute on
an H200), ``--json FILE`` to keep the figures, ``--smoke`` for a tiny run that
also works on a CPU (seconds), ``--allow-cpu`` with explicit sizes for a CPU
proxy, e.g. ``--allow-cpu --width 1024 --batches 256``.

The network is the MLP 1024-4096-4096-4096-10 (ReLU; ``--input``,
``--width`` and ``--hidden`` change it) at batch 4096 and 16384, in float32
and in bfloat16 (parameters and inputs in bfloat16). One training step is:

- fnbp: ``fnbp.backprop`` (the hand-written rules, Algorithm 3) + an optax
  SGD update, jitted;
- autodiff: ``jax.value_and_grad`` of the same network in plain jnp with the
  same mean cross-entropy (``bench_mlp.plain_mean_loss``) + the same update,
  jitted;
- PyTorch (where torch is installed): its eager step of the same network
  (``bench_mlp.torch_step``), on the GPU when JAX runs on one and torch sees
  CUDA. Its float32 matrix products follow JAX's precision: TF32 on a GPU
  unless ``JAX_DEFAULT_MATMUL_PRECISION`` asks for full float32.

Each timing is ``k`` steps back to back (each step fed the previous step's
parameters, see ``timing.back_to_back``) and then one wait
(``jax.block_until_ready`` on the last output, ``torch.cuda.synchronize()``
for torch), so that launch overhead is amortized as in a training loop. The
ratios are medians of per-round ratios, each round timing the candidate right
beside autodiff (``timing.paired_ratios``); the A/A column times autodiff
against itself and shows how far from 1.00 noise alone moves a ratio. Compile
time is measured apart, as the first call (trace, compile and one step).

Throughput: TFLOP/s = 6 * B * P / (seconds per step), with P the number of
parameters (a multiply-add is 2 flops; the forward pass is 2 * B * P, the
backward pass 4 * B * P). It is approximate: it counts the input gradient of
the first layer, which neither program computes, and ignores the
elementwise work.

Every figure is printed as soon as it is measured and the JSON file is
rewritten after every row, so a run stopped by a time limit keeps what it
measured. ``--time-limit`` skips the configurations that would not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mlp import steps, torch_step  # noqa: E402
from timing import back_to_back, paired_ratios  # noqa: E402

import fnbp  # noqa: E402

CLASSES = 10
FULL = {
    "input": 1024,
    "width": 4096,
    "hidden": 3,
    "batches": [4096, 16384],
    "k": 10,
    "rounds": 15,
    "warmup": 2,
}
SMOKE = {
    "input": 64,
    "width": 64,
    "hidden": 3,
    "batches": [32, 64],
    "k": 2,
    "rounds": 3,
    "warmup": 1,
}
DTYPES = ("float32", "bfloat16")


def parameter_count(n_in: int, widths: list[int]) -> int:
    """Weights and biases of the MLP n_in-widths[0]-...-widths[-1]."""
    count, fan_in = 0, n_in
    for w in widths:
        count += fan_in * w + w
        fan_in = w
    return count


def tflops(batch: int, params: int, seconds: float) -> float:
    """6 * B * P flops per step (forward 2BP, backward 4BP), in TFLOP/s."""
    return 6.0 * batch * params / seconds / 1e12


def random_params(model, n_in: int, dtype, seed: int = 0):
    """Parameters shaped as ``model.init`` makes them, drawn by NumPy and copied to the device.

    Weights are N(0, 1 / fan_in), biases 0: for timing, the values only need to
    be of the right scale. NumPy's draws compile nothing (``model.init`` would
    compile one small program per operation: most of a smoke run's time).
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: model.init(key, (n_in,), dtype)[1], jax.random.PRNGKey(0))

    def draw(leaf):
        if leaf.ndim < 2:
            return jnp.asarray(np.zeros(leaf.shape, leaf.dtype))
        w = rng.standard_normal(leaf.shape, np.float32) / np.sqrt(leaf.shape[-1])
        return jnp.asarray(w.astype(leaf.dtype))

    return jax.tree_util.tree_map(draw, shapes)


def torch_setup(use_torch: bool) -> dict[str, Any] | None:
    """Where PyTorch's step runs, or None (not installed, not asked, or no GPU for torch)."""
    if not use_torch:
        return None
    try:
        import torch
    except ImportError:
        print("PyTorch: not installed, no torch column", flush=True)
        return None
    if jax.default_backend() == "cpu":
        device = "cpu"
    elif jax.default_backend() == "gpu" and torch.cuda.is_available():
        device = "cuda"
    else:
        print(
            f"PyTorch {torch.__version__}: cannot use this {jax.default_backend()} "
            "(no CUDA in torch), no torch column",
            flush=True,
        )
        return None
    precision = getattr(jax.config, "jax_default_matmul_precision", None)
    full = precision is not None and str(precision).lower() in ("highest", "float32")
    torch.set_float32_matmul_precision("highest" if full else "high")
    matmul = "full float32" if full or device == "cpu" else "TF32, as JAX's default precision"
    print(f"PyTorch {torch.__version__} on {device}; float32 matmuls: {matmul}", flush=True)
    return {
        "torch": torch,
        "device": device,
        "version": torch.__version__,
        "float32_matmul": matmul,
    }


def torch_k_steps(
    tsetup: dict[str, Any], widths: list[int], n_in: int, batch: int, dtype: str, k: int
):
    """``k`` eager PyTorch steps, then one wait for the GPU; returns None (nothing to wait for)."""
    torch, device = tsetup["torch"], tsetup["device"]
    step = torch_step(widths, n_in, batch, dtype=dtype, device=device)

    def run(*_):
        for _ in range(k):
            step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def measure(
    widths: list[int],
    n_in: int,
    batch: int,
    dtype: str,
    opts: argparse.Namespace,
    tsetup: dict[str, Any] | None,
) -> dict[str, Any]:
    """One row: compile seconds, ms per step, ratios with the A/A control, TFLOP/s, torch."""
    started = time.perf_counter()
    dt = jnp.dtype(dtype)
    model = fnbp.mlp(widths, "relu")
    optimizer = optax.sgd(0.01)

    params = random_params(model, n_in, dt)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((batch, n_in), np.float32).astype(dt))
    y = jnp.asarray(rng.integers(0, widths[-1], batch, dtype=np.int32))
    args = (params, optimizer.init(params), x, y)
    fnbp_step, _, autodiff_step = steps(model, optimizer)
    count = parameter_count(n_in, widths)
    label = f"B{batch:<6} {dtype:<8}"
    row: dict[str, Any] = {"batch": batch, "dtype": dtype}

    compiled = {}
    for name, fn in (("fnbp", fnbp_step), ("autodiff", autodiff_step)):
        jitted = jax.jit(fn)
        t0 = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        row[f"compile_{name}_s"] = time.perf_counter() - t0
        compiled[name] = jitted
    print(
        f"{label} compile (first call: trace, compile, one step): fnbp "
        f"{row['compile_fnbp_s']:.2f} s, autodiff {row['compile_autodiff_s']:.2f} s",
        flush=True,
    )

    k = opts.k
    autodiff_k = back_to_back(compiled["autodiff"], k)
    paired = paired_ratios(
        {"fnbp": (back_to_back(compiled["fnbp"], k), args), "aa": (autodiff_k, args)},
        (autodiff_k, args),
        rounds=opts.rounds,
        warmup=opts.warmup,
    )
    auto_s, fnbp_s = paired.seconds["baseline"] / k, paired.seconds["fnbp"] / k
    row.update(
        {
            "autodiff_ms": 1e3 * auto_s,
            "fnbp_ms": 1e3 * fnbp_s,
            "ratio": paired.ratios["fnbp"],
            "aa_ratio": paired.ratios["aa"],
            "autodiff_tflops": tflops(batch, count, auto_s),
            "fnbp_tflops": tflops(batch, count, fnbp_s),
        }
    )
    print(
        f"{label} autodiff {row['autodiff_ms']:8.3f} ms ({row['autodiff_tflops']:.4g} TFLOP/s)"
        f"  fnbp {row['fnbp_ms']:8.3f} ms ({row['fnbp_tflops']:.4g} TFLOP/s)"
        f"  fnbp/autodiff {row['ratio']:.3f}  A/A {row['aa_ratio']:.3f}",
        flush=True,
    )

    row.update({"torch_ms": None, "torch_ratio": None, "torch_tflops": None})
    if tsetup is not None:
        try:
            torch_k = torch_k_steps(tsetup, widths, n_in, batch, dtype, k)
            tp = paired_ratios(
                {"torch": (torch_k, ())}, (autodiff_k, args), rounds=opts.rounds, warmup=opts.warmup
            )
            torch_s = tp.seconds["torch"] / k
            row.update(
                {
                    "torch_ms": 1e3 * torch_s,
                    "torch_ratio": tp.ratios["torch"],
                    "torch_tflops": tflops(batch, count, torch_s),
                }
            )
            print(
                f"{label} torch eager {row['torch_ms']:8.3f} ms "
                f"({row['torch_tflops']:.4g} TFLOP/s)  torch/autodiff "
                f"{row['torch_ratio']:.3f}",
                flush=True,
            )
        except Exception as error:  # a torch failure keeps the JAX figures
            row["torch_error"] = f"{type(error).__name__}: {error}"
            print(f"{label} torch eager step failed: {row['torch_error']}", flush=True)
    row["seconds"] = time.perf_counter() - started
    return row


def write(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=2))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes and few repeats (width 64, batches 32 and 64): "
        "checks that the benchmark runs, on any backend",
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run the full-size (or given) sizes even when JAX has no accelerator",
    )
    parser.add_argument("--input", type=int, help="input width (default 1024)")
    parser.add_argument("--width", type=int, help="hidden width (default 4096)")
    parser.add_argument("--hidden", type=int, help="hidden layers (default 3)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 4096 16384)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--k", type=int, help="steps per timing, back to back (default 10)")
    parser.add_argument("--rounds", type=int, help="timed rounds per ratio (default 15)")
    parser.add_argument("--warmup", type=int, help="untimed calls of each function (default 2)")
    parser.add_argument("--no-torch", action="store_true", help="no PyTorch column")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds: skip the configurations that would end past it",
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    profile = SMOKE if args.smoke else FULL
    for name, value in profile.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("input", "width", "hidden", "k", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.batches) < 1:
        parser.error(f"--batches must be >= 1, got {args.batches}")
    if jax.default_backend() == "cpu" and not (args.smoke or args.allow_cpu):
        parser.exit(
            3,
            "bench_gpu_mlp: JAX sees no GPU or TPU (backend cpu); the full sizes "
            "would take hours here. Pass --smoke for a tiny run, or --allow-cpu "
            "with small sizes (e.g. --width 1024 --batches 256) to run anyway\n",
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and with ``--json`` writes) the figures."""
    started = time.perf_counter()
    args = parse(argv)
    widths = [args.width] * args.hidden + [CLASSES]
    count = parameter_count(args.input, widths)
    device = jax.devices()[0]
    print(
        f"MLP {args.input}-{'-'.join(map(str, widths))} ({count / 1e6:.2f}M parameters), "
        f"training step with SGD; backend {jax.default_backend()} ({device.device_kind}), "
        f"jax {jax.__version__}",
        flush=True,
    )
    print(
        f"each timing: {args.k} steps back to back, then one wait; {args.rounds} rounds of "
        f"side-by-side timings per ratio; TFLOP/s = 6 * B * P / step time, P = {count}",
        flush=True,
    )
    tsetup = torch_setup(not args.no_torch)
    result: dict[str, Any] = {
        "device": {
            "backend": jax.default_backend(),
            "kind": device.device_kind,
            "count": jax.device_count(),
        },
        "jax": jax.__version__,
        "torch": None
        if tsetup is None
        else {
            "version": tsetup["version"],
            "device": tsetup["device"],
            "float32_matmul": tsetup["float32_matmul"],
        },
        "network": {"input": args.input, "widths": widths, "parameters": count},
        "k": args.k,
        "rounds": args.rounds,
        "flops_per_step": "6 * batch * parameters",
        "rows": [],
        "skipped": [],
        "errors": [],
    }
    last: dict[str, Any] | None = None  # the last row measured
    for batch in args.batches:
        for dtype in args.dtypes:
            elapsed = time.perf_counter() - started
            if args.time_limit is not None and last is not None:
                # compiling does not grow with the batch much; the timed steps do
                compiling = last["compile_fnbp_s"] + last["compile_autodiff_s"]
                scale = max(1.0, batch / last["batch"])
                estimate = compiling + (last["seconds"] - compiling) * scale
                if elapsed + estimate > args.time_limit:
                    print(
                        f"B{batch} {dtype}: skipped, about {estimate:.0f} s would pass the "
                        f"time limit of {args.time_limit:.0f} s ({elapsed:.0f} s used)",
                        flush=True,
                    )
                    result["skipped"].append({"batch": batch, "dtype": dtype})
                    continue
            try:
                row = measure(widths, args.input, batch, dtype, args, tsetup)
            except Exception as error:  # e.g. out of memory: keep the other rows
                message = f"{type(error).__name__}: {error}".splitlines()[0]
                print(f"B{batch} {dtype}: failed: {message}", flush=True)
                result["errors"].append({"batch": batch, "dtype": dtype, "error": message})
                continue
            result["rows"].append(row)
            last = row
            write(args.json, result)
    result["seconds"] = time.perf_counter() - started
    write(args.json, result)
    print(
        f"\n{'batch':>6} {'dtype':<9} {'autodiff ms':>11} {'fnbp ms':>9} {'ratio':>6} "
        f"{'A/A':>6} {'TFLOP/s ad':>10} {'fnbp':>6} {'torch ms':>9} {'torch/ad':>8}"
    )
    for r in result["rows"]:
        torch_ms = "-" if r["torch_ms"] is None else f"{r['torch_ms']:.3f}"
        torch_ratio = "-" if r["torch_ratio"] is None else f"{r['torch_ratio']:.3f}"
        print(
            f"{r['batch']:>6} {r['dtype']:<9} {r['autodiff_ms']:>11.3f} {r['fnbp_ms']:>9.3f} "
            f"{r['ratio']:>6.3f} {r['aa_ratio']:>6.3f} {r['autodiff_tflops']:>10.4g} "
            f"{r['fnbp_tflops']:>6.4g} "
            f"{torch_ms:>9} {torch_ratio:>8}"
        )
    print(f"total {result['seconds']:.1f} s", flush=True)
    return result


if __name__ == "__main__":
    # Several processes (and PyTorch) may share the card: take memory as needed.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    figures = main()
    sys.exit(1 if figures["errors"] or not figures["rows"] else 0)
