"""Per-example clipping and second moments from one backward pass, against ``fnbp.backprop``.

Run: ``python benchmarks/bench_dp.py`` (``--quick`` for a short run, ``--smoke``
for a tiny one that only checks the script, ``--json FILE`` or ``--out FILE``
to keep the figures). Every figure is a ratio time(program) / time(backprop of
the same model and batch), measured in one process (see ``timing.py``): each
program is compiled once, warmed up, and timed right beside the baseline in
alternating order, round after round; the ratio is the median of the
per-round ratios. The ``A/A`` column times ``fnbp.backprop`` against a second
compiled copy of itself: how far from 1.00 noise alone moves a ratio.

Networks, float32, cross-entropy, clip norm C = 1 (``--clip``):

- ``mlp``: ``fnbp.mlp([1024, 1024, 10], "relu")`` on 784 inputs, batch 32, 256
  and 1024;
- ``cnn``: the conv net of docs/benchmarks.md, the one ``fnbp train --model cnn`` trains on
  the digits: ``fnbp.cnn(10, (32, 64))`` (conv 3x3 -> relu -> max pool 2x2,
  twice; flatten; mm) on 8 x 8 x 1 images, batch 32 (the CLI's default) and 256.

Programs (each jitted):

- ``clipped_grads``: ``fnbp.clipped_grads(model, loss, params, x, y, C)``
  (target <= 1.15x on the MLP at batch 256, <= 1.5x on the conv net);
- ``grad_moments``: ``fnbp.grad_moments(model, loss, params, x, y)`` (target
  <= 1.2x);
- ``grad_norms``: ``fnbp.per_example_grad_norms`` (norms only);
- ``vmap_dot``: the same per-example gradients, clipped and summed with one
  ``jnp.tensordot`` of the scales per leaf (what a careful user writes);
- ``vmap_clip``: the way jax-privacy clips: ``jax.vmap`` of ``jax.grad`` of the
  model's loss on one example (through ``model.apply``, with a batch axis of
  1), each gradient scaled by min(1, C / ||g_i||), then the mean over the
  batch. It materializes n copies of the parameters' gradient, so it is
  skipped where those would pass ``--max-materialize-gb``;
- ``jax_privacy``: ``jax_privacy.clipped_grad`` (jax-privacy 2.x) of the same
  mean loss, ``normalize_by=n``, where jax-privacy is installed; above the
  memory cap it runs in microbatches (its ``microbatch_size``), as the
  library intends;
- ``opacus ghost`` (PyTorch, a ratio within torch): Opacus' ghost clipping
  (``GradSampleModuleFastGradientClipping`` with ``use_ghost_clipping=True``,
  ``DPOptimizerFastGradientClipping`` with noise multiplier 0,
  ``DPLossFastGradientClipping``: two backward passes) on the same MLP against
  torch's own non-private step (forward, ``backward()``, SGD step), both eager
  on the same device, timed side by side like the rest.

Peak memory: the temporary memory XLA reports for each compiled program
(``compiled.memory_analysis().temp_size_in_bytes``; arguments and outputs not
counted) against backprop's; where the backend reports none, the table says so.

What each fnbp program compiled to is printed under its row (and kept in the
JSON): its dot and convolution instructions, its largest floating-point array
(a materialized per-example weight gradient shows as one with the batch as
an axis) and XLA's flops and bytes against backprop's (``cost_analysis``).

The slow baselines (``vmap_clip``, ``vmap_dot``, ``jax_privacy``) are timed
for fewer rounds (as many as ``--slow-seconds`` allows, at least 3); one too
slow for 3 is timed once, its first call after compiling, against backprop's
median (rounds 1). The JSON records the rounds of every ratio. A program that fnbp does not have yet (``clipped_grads``
and ``grad_moments`` are new) shows as ``-`` and is listed under ``missing``.

The optional columns need packages that are not fnbp dependencies, the
``bench`` extra (torch, opacus, jax-privacy); install them next to fnbp in a
virtual environment of their own, e.g.::

    python3.11 -m venv /tmp/vbench
    /tmp/vbench/bin/pip install -e ".[bench]"

(jax-privacy 2.0, opacus 1.6 and torch 2.14 resolve on Python 3.11 to 3.13;
jax-privacy asks for jax >= 0.7.1 and dp-accounting >= 0.6, so it pins no
jax of its own). Without them the columns print "not installed".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import paired_ratios  # noqa: E402

import fnbp  # noqa: E402

LOSS = fnbp.cross_entropy_loss
CLASSES = 10
FAST = ("aa", "clipped_grads", "grad_moments", "grad_norms")
SLOW = ("vmap_clip", "vmap_dot", "jax_privacy")
TARGETS = {
    ("mlp", "clipped_grads"): 1.15,
    ("cnn", "clipped_grads"): 1.5,
    ("mlp", "grad_moments"): 1.2,
    ("cnn", "grad_moments"): 1.2,
}


class Net(NamedTuple):
    name: str
    model: Any
    example_shape: tuple[int, ...]
    batches: tuple[int, ...]
    description: str


def nets(mode: str) -> list[Net]:
    """The benchmarked networks; ``mode`` is "full", "quick" or "smoke" (tiny)."""
    if mode == "smoke":
        return [
            Net("mlp", fnbp.mlp([16, 10], "relu"), (12,), (4,), "MLP 12-16-10"),
            Net("cnn", fnbp.cnn(CLASSES, (4,)), (8, 8, 1), (4,), "cnn(10, (4,)) on 8x8x1"),
        ]
    mlp_batches = (32, 256) if mode == "quick" else (32, 256, 1024)
    cnn_batches = (32,) if mode == "quick" else (32, 256)
    return [
        Net("mlp", fnbp.mlp([1024, 1024, 10], "relu"), (784,), mlp_batches, "MLP 784-1024-1024-10"),
        Net(
            "cnn",
            fnbp.cnn(CLASSES, (32, 64)),
            (8, 8, 1),
            cnn_batches,
            "cnn(10, (32, 64)) on 8x8x1 (fnbp train --model cnn, digits)",
        ),
    ]


def make_batch(example_shape, batch, seed=0):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (batch, *example_shape), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, CLASSES)
    return x, y


def example_loss(model):
    """J(params, x, y) of a batch, for the baselines that add a batch axis of 1 per example."""

    def mean_loss(params, x, y):
        return jnp.mean(LOSS(model.apply(params, x), y))

    return mean_loss


def vmap_clip(model, clip):
    """vmap(grad) of each example's loss, clip each gradient to norm ``clip``, then the mean."""
    one = jax.value_and_grad(example_loss(model))

    def clipped_one(params, x_i, y_i):
        loss_i, g = one(params, x_i[None], y_i[None])
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(g)))
        scale = jnp.minimum(1.0, clip / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))
        return loss_i, jax.tree_util.tree_map(lambda leaf: scale * leaf, g), norm

    def run(params, x, y):
        losses, g, norms = jax.vmap(clipped_one, in_axes=(None, 0, 0))(params, x, y)
        return jnp.mean(losses), jax.tree_util.tree_map(lambda leaf: jnp.mean(leaf, 0), g), norms

    return run


def vmap_dot(model, clip):
    """vmap(grad) of each example's loss, then the clipped mean as one contraction per leaf.

    The same materialized per-example gradients as :func:`vmap_clip`, with the
    clipping written as a careful user would: the norms, then
    sum_i s_i g_i / n as ``jnp.tensordot(s, g, 1) / n`` (one dot per leaf)
    instead of a scaled copy and a reduction over the batch axis.
    """
    one = jax.value_and_grad(example_loss(model))

    def run(params, x, y):
        losses, g = jax.vmap(lambda x_i, y_i: one(params, x_i[None], y_i[None]))(x, y)
        leaves = jax.tree_util.tree_leaves(g)
        norms = jnp.sqrt(
            sum(jnp.sum(jnp.square(leaf), axis=tuple(range(1, leaf.ndim))) for leaf in leaves)
        )
        scale = jnp.minimum(1.0, clip / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny))
        n = x.shape[0]
        return (
            jnp.mean(losses),
            jax.tree_util.tree_map(lambda leaf: jnp.tensordot(scale, leaf, 1) / n, g),
            norms,
        )

    return run


def jax_privacy_clip(model, clip, batch, microbatch_size):
    """``jax_privacy.clipped_grad`` of the mean loss, or the reason it is not available."""
    try:
        import jax_privacy
    except ImportError:
        return "not installed"
    grad_fn = jax_privacy.clipped_grad(
        example_loss(model),
        l2_clip_norm=clip,
        batch_argnums=(1, 2),
        normalize_by=batch,
        return_values=True,
        return_grad_norms=True,
        microbatch_size=microbatch_size,
    )

    def run(params, x, y):
        grads, aux = grad_fn(params, x, y)
        return jnp.mean(aux.values), grads, aux.grad_norms

    return run


def programs(
    net: Net, batch: int, clip: float, params, max_bytes: float, use_jax_privacy: bool
) -> tuple[dict[str, Callable], dict[str, str]]:
    """name -> function(params, x, y), and name -> why it is left out."""
    model = net.model
    progs: dict[str, Callable] = {
        "backprop": lambda p, x, y: fnbp.backprop(model, LOSS, p, x, y),
        "aa": lambda p, x, y: fnbp.backprop(model, LOSS, p, x, y),
        "grad_norms": lambda p, x, y: fnbp.per_example_grad_norms(model, LOSS, p, x, y),
        "clipped_grads": lambda p, x, y: fnbp.clipped_grads(model, LOSS, p, x, y, clip),
        "grad_moments": lambda p, x, y: fnbp.grad_moments(model, LOSS, p, x, y),
    }
    missing: dict[str, str] = {}
    per_example_bytes = 4 * sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    if batch * per_example_bytes <= max_bytes:
        progs["vmap_clip"] = vmap_clip(model, clip)
        progs["vmap_dot"] = vmap_dot(model, clip)
        microbatch = None
    else:
        missing["vmap_clip"] = missing["vmap_dot"] = (
            f"skipped: {batch} per-example gradients of {per_example_bytes / 1e6:.1f} MB "
            f"pass --max-materialize-gb"
        )
        microbatch = 2 ** int(np.log2(max(max_bytes / per_example_bytes, 1.0)))
    if use_jax_privacy:
        jp = jax_privacy_clip(model, clip, batch, microbatch)
        if isinstance(jp, str):
            missing["jax_privacy"] = jp
        else:
            progs["jax_privacy"] = jp
    else:
        missing["jax_privacy"] = "not run (--no-jax-privacy)"
    return progs, missing


def compile_all(progs, args, missing, outputs):
    """name -> (compiled, compile seconds, temp bytes or None, seconds of the first call).

    Each program's first output goes into ``outputs``; a program that fails to
    trace, compile or run goes into ``missing`` with its error (backprop's is raised).
    """
    out = {}
    for name, fn in progs.items():
        try:
            start = time.perf_counter()
            compiled = jax.jit(fn).lower(*args).compile()
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            outputs[name] = jax.block_until_ready(compiled(*args))
            first = time.perf_counter() - start
        except Exception as error:  # a program under construction must not stop the run
            if name == "backprop":
                raise
            missing[name] = f"error: {type(error).__name__}: {str(error).splitlines()[0]}"
            continue
        try:
            analysis = compiled.memory_analysis()
        except (NotImplementedError, RuntimeError):
            analysis = None
        temp = None if analysis is None else int(analysis.temp_size_in_bytes)
        out[name] = (compiled, seconds, temp, first)
    return out


_ARRAY = re.compile(r"\b(?:f64|f32|bf16|f16)\[([\d,]*)\]")


def hlo_summary(compiled) -> dict:
    """What the compiled program does: from its HLO text, the number of dot and
    convolution instructions and its largest floating-point array (a per-example
    weight gradient, materialized, shows up as one with the batch as an axis);
    from XLA's cost analysis, its flops and bytes accessed (None where not reported)."""
    text = compiled.as_text()
    try:
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    except (NotImplementedError, RuntimeError):
        cost = {}
    shapes = {m.group(0) for m in _ARRAY.finditer(text)}
    sizes = {
        shape: int(
            np.prod([int(d) for d in shape[shape.index("[") + 1 : -1].split(",") if d] or [1])
        )
        for shape in shapes
    }
    largest = max(sizes, key=sizes.get) if sizes else None
    return {
        "dots": len(re.findall(r"\bdot\(", text)),
        "convolutions": len(re.findall(r"\bconvolution\(", text)),
        "largest_array": largest,
        "largest_elements": sizes.get(largest, 0),
        "flops": cost.get("flops"),
        "bytes_accessed": cost.get("bytes accessed"),
    }


def max_rel_err(a, b) -> float:
    errs = [
        float(jnp.max(jnp.abs(u - v)) / jnp.maximum(jnp.max(jnp.abs(v)), 1e-30))
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    ]
    return max(errs) if errs else 0.0


def agreement(outputs: dict[str, Any]) -> dict[str, float]:
    """Relative differences between programs that compute the same quantity."""
    out = {}
    ref = outputs.get("vmap_clip", outputs.get("jax_privacy"))
    if ref is not None and "clipped_grads" in outputs:
        out["clipped_grads_vs_vmap_grads"] = max_rel_err(outputs["clipped_grads"][1], ref[1])
        out["clipped_grads_vs_vmap_norms"] = max_rel_err(outputs["clipped_grads"][2], ref[2])
    if "jax_privacy" in outputs and "vmap_clip" in outputs:
        out["jax_privacy_vs_vmap_grads"] = max_rel_err(
            outputs["jax_privacy"][1], outputs["vmap_clip"][1]
        )
    if "grad_moments" in outputs:
        out["grad_moments_vs_backprop_grads"] = max_rel_err(
            outputs["grad_moments"][1], outputs["backprop"][1]
        )
    if ref is not None and "grad_norms" in outputs:
        out["grad_norms_vs_vmap_norms"] = max_rel_err(outputs["grad_norms"][1], ref[2])
    return out


def bench_one(net: Net, batch: int, opts) -> dict:
    """Every program on one network and batch: ratios, seconds, memory, compile time."""
    _, params = net.model.init(jax.random.PRNGKey(0), net.example_shape, jnp.float32)
    x, y = make_batch(net.example_shape, batch)
    args = (params, x, y)
    progs, missing = programs(
        net, batch, opts.clip, params, opts.max_materialize_gb * 1e9, opts.jax_privacy
    )
    outputs: dict[str, Any] = {}
    compiled = compile_all(progs, args, missing, outputs)
    agree = agreement(outputs)
    del outputs
    base = (compiled["backprop"][0], args)
    fast = {n: (compiled[n][0], args) for n in FAST if n in compiled}
    timed = paired_ratios(fast, base, rounds=opts.rounds)
    ratios, seconds = dict(timed.ratios), dict(timed.seconds)
    rounds = {n: opts.rounds for n in fast}
    for name in SLOW:
        if name not in compiled:
            continue
        fn, once = compiled[name][0], compiled[name][3]
        n_rounds = min(opts.rounds, int(opts.slow_seconds / (once + seconds["baseline"])))
        if n_rounds >= 3:
            slow = paired_ratios({name: (fn, args)}, base, rounds=n_rounds, warmup=0)
            ratios[name], seconds[name] = slow.ratios[name], slow.seconds[name]
        else:  # too slow to repeat: its first call (after compiling) against backprop's median
            ratios[name], seconds[name], n_rounds = once / seconds["baseline"], once, 1
        rounds[name] = n_rounds
    temp = {n: c[2] for n, c in compiled.items()}
    return {
        "net": net.name,
        "batch": batch,
        "backprop_ms": 1e3 * seconds["baseline"],
        "ratios": ratios,
        "ms": {n: 1e3 * s for n, s in seconds.items() if n != "baseline"},
        "rounds": rounds,
        "temp_bytes": temp,
        "temp_ratios": {
            n: (None if t is None or not temp["backprop"] else t / temp["backprop"])
            for n, t in temp.items()
        },
        "compile_s": {n: c[1] for n, c in compiled.items()},
        "hlo": {n: hlo_summary(c[0]) for n, c in compiled.items() if n not in SLOW},
        "agreement": agree,
        "missing": missing,
    }


COLUMNS = (
    "aa",
    "clipped_grads",
    "grad_moments",
    "grad_norms",
    "vmap_clip",
    "vmap_dot",
    "jax_privacy",
)
HEAD = ("A/A", "clipped", "moments", "norms", "vmap+clip", "vmap+dot", "jax-privacy")


def print_header(title: str) -> None:
    print(f"\n{title}")
    print(
        f"{'net':>4} {'batch':>6} {'backprop ms':>12} " + " ".join(f"{h:>11}" for h in HEAD),
        flush=True,
    )


def fmt_ratio(row, name) -> str:
    r = row["ratios"].get(name)
    if r is None:
        return f"{'-':>11}"
    text = f"{r:.3f}" if r < 100 else f"{r:.0f}"
    target = TARGETS.get((row["net"], name))
    return f"{text + ('*' if target and r > target else ''):>11}"


def print_row(row) -> None:
    print(
        f"{row['net']:>4} {row['batch']:>6} {row['backprop_ms']:>12.2f} "
        + " ".join(fmt_ratio(row, n) for n in COLUMNS),
        flush=True,
    )


def flops_ratio(h: dict, base: dict) -> str:
    if h is base or not h.get("flops") or not base.get("flops"):
        return ""
    return (
        f", {h['flops'] / base['flops']:.2f}x flops, "
        f"{h['bytes_accessed'] / base['bytes_accessed']:.2f}x bytes"
    )


def print_memory(rows) -> None:
    print("\ncompiled temporary memory (MB; x backprop's)")
    print(f"{'net':>4} {'batch':>6} {'backprop':>10} " + " ".join(f"{h:>17}" for h in HEAD[1:]))
    for row in rows:
        temp, base = row["temp_bytes"], row["temp_bytes"]["backprop"]
        if base is None:
            print(f"{row['net']:>4} {row['batch']:>6}   (this backend reports no memory analysis)")
            continue
        cells = []
        for n in COLUMNS[1:]:
            t = temp.get(n)
            cells.append(
                f"{'-':>17}" if t is None else f"{f'{t / 1e6:.3g} ({t / max(base, 1):.2f}x)':>17}"
            )
        print(f"{row['net']:>4} {row['batch']:>6} {base / 1e6:>10.3g} " + " ".join(cells))


def opacus_rows(batches, rounds, clip, device="cpu") -> list[dict] | str:
    """Opacus ghost clipping against torch's non-private step on the MLP, or why not."""
    try:
        import opacus  # noqa: F401
        import torch
        from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
            GradSampleModuleFastGradientClipping,
        )
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    except ImportError:
        return "not installed"

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(784, 1024),
            torch.nn.ReLU(),
            torch.nn.Linear(1024, 1024),
            torch.nn.ReLU(),
            torch.nn.Linear(1024, 10),
        ).to(device)

    rows = []
    for batch in batches:
        x = torch.randn(batch, 784, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        plain = net()
        plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
        ce = torch.nn.CrossEntropyLoss()

        def plain_step():
            plain_opt.zero_grad(set_to_none=True)
            ce(plain(x), y).backward()
            plain_opt.step()

        ghost = GradSampleModuleFastGradientClipping(
            net(), max_grad_norm=clip, use_ghost_clipping=True
        )
        ghost_opt = DPOptimizerFastGradientClipping(
            torch.optim.SGD(ghost.parameters(), lr=0.01),
            noise_multiplier=0.0,
            max_grad_norm=clip,
            expected_batch_size=batch,
        )
        ghost_loss = DPLossFastGradientClipping(ghost, ghost_opt, torch.nn.CrossEntropyLoss())

        def ghost_step():
            ghost_opt.zero_grad(set_to_none=True)
            ghost_loss(ghost(x), y).backward()
            ghost_opt.step()

        with warnings.catch_warnings():  # torch's note on Opacus' second backward pass
            warnings.filterwarnings("ignore", "Full backward hook", UserWarning)
            timed = paired_ratios({"ghost": (ghost_step, ())}, (plain_step, ()), rounds=rounds)
        rows.append(
            {
                "batch": batch,
                "torch_ms": 1e3 * timed.seconds["baseline"],
                "ghost_ms": 1e3 * timed.seconds["ghost"],
                "ratio": timed.ratios["ghost"],
                "rounds": rounds,
            }
        )
        r = rows[-1]
        print(
            f"  batch {batch:>5}: torch step {r['torch_ms']:.2f} ms, Opacus ghost clipping "
            f"{r['ghost_ms']:.2f} ms, ratio {r['ratio']:.3f}",
            flush=True,
        )
    return rows


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for package in ("jax", "jaxlib", "jax-privacy", "torch", "opacus"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and batches")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny networks and 2 rounds: checks the script, measures nothing",
    )
    parser.add_argument(
        "--json",
        "--out",
        dest="json",
        type=Path,
        help="write the figures to this file (rewritten after every row)",
    )
    parser.add_argument("--clip", type=float, default=1.0, help="clip norm C (default 1)")
    parser.add_argument(
        "--rounds",
        type=int,
        help="timed rounds per ratio (default 101; 21 with --quick, 2 with --smoke)",
    )
    parser.add_argument(
        "--slow-seconds",
        type=float,
        help="time budget of each slow baseline's rounds (default 60 s; 15 with --quick)",
    )
    parser.add_argument(
        "--max-materialize-gb",
        type=float,
        default=2.5,
        help="skip vmap+clip (and microbatch jax-privacy) where the "
        "per-example gradients would pass this many GB (default 2.5)",
    )
    parser.add_argument("--nets", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--no-torch", action="store_true", help="skip the Opacus column")
    parser.add_argument(
        "--no-jax-privacy",
        dest="jax_privacy",
        action="store_false",
        help="skip the jax-privacy column",
    )
    opts = parser.parse_args(argv)
    opts.mode = "smoke" if opts.smoke else "quick" if opts.quick else "full"
    default_rounds = {"smoke": 2, "quick": 21, "full": 101}[opts.mode]
    opts.rounds = opts.rounds or default_rounds
    if opts.slow_seconds is None:
        opts.slow_seconds = {"smoke": 0.0, "quick": 15.0, "full": 60.0}[opts.mode]
    return opts


def main(argv=None) -> dict:
    opts = parse(argv)
    device = jax.devices()[0]
    figures: dict[str, Any] = {
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "versions": versions(),
        "mode": opts.mode,
        "clip": opts.clip,
        "targets": {f"{net} {prog}": t for (net, prog), t in TARGETS.items()},
        "rows": [],
        "opacus": None,
    }

    def save():
        if opts.json:
            opts.json.write_text(json.dumps(figures, indent=2))

    print(
        f"backend {figures['backend']} ({figures['device']}), jax {jax.__version__}, "
        f"{figures['machine']}, {figures['cpus']} cpus; clip norm {opts.clip}"
    )
    print(
        "ratio = time(program) / time(fnbp.backprop), median of per-round side-by-side "
        f"ratios ({opts.rounds} rounds; the slow baselines fewer); * = above its target"
    )
    wanted = opts.nets.split(",")
    for net in nets(opts.mode):
        if net.name not in wanted:
            continue
        print_header(f"{net.description}, float32")
        for batch in net.batches:
            row = bench_one(net, batch, opts)
            figures["rows"].append(row)
            print_row(row)
            for name, why in row["missing"].items():
                print(f"{'':>12}{name}: {why}")
            if row["agreement"]:
                print(
                    f"{'':>12}agree: "
                    + ", ".join(f"{k} {v:.1e}" for k, v in row["agreement"].items())
                )
            print(
                f"{'':>12}compiled: "
                + "; ".join(
                    f"{n} {h['dots']} dots + {h['convolutions']} convs, largest {h['largest_array']}"
                    + flops_ratio(h, row["hlo"]["backprop"])
                    for n, h in row["hlo"].items()
                    if n != "aa"
                )
            )
            save()
    print_memory(figures["rows"])
    mlp = [n for n in nets(opts.mode) if n.name == "mlp"]
    if opts.no_torch or opts.mode == "smoke" or not mlp:
        figures["opacus"] = "not run"
    else:
        print(
            "\nOpacus ghost clipping on the same MLP in PyTorch (eager, CPU); "
            "ratio = time(ghost clipping step) / time(torch's non-private step)"
        )
        figures["opacus"] = opacus_rows(mlp[0].batches, max(opts.rounds // 2, 11), opts.clip)
        if isinstance(figures["opacus"], str):
            print(f"  Opacus: {figures['opacus']}")
    save()
    return figures


if __name__ == "__main__":
    main()
