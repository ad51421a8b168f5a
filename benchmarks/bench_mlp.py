"""fnbp's hand-written backprop against autodiff of the same plain network.

Run: ``python benchmarks/bench_mlp.py`` (``--quick`` for a short run,
``--json FILE`` to keep the figures). All timings are ratios measured in one
process (see ``timing.py``): time(fnbp) / time(autodiff), so < 1 means fnbp is
faster. The ratios are medians of per-round ratios, each round timing fnbp and
autodiff side by side; the ``A/A`` column times autodiff against a second
compiled copy of itself and shows how far from 1.00 noise alone moves a ratio.

Rows, for an MLP 784-1024-1024-10, float32, at batch 32, 256 and 1024:

- ``train step``: the documented batch path, ``fnbp.backprop`` + an optax SGD
  update, jitted, against ``jax.value_and_grad`` of the plain network + the
  same update;
- ``jax.grad(apply)``: ``jax.grad`` of the mean loss through ``model.apply``
  (the model's own custom_vjp) + the same update;
- ``per-example grads``: ``fnbp.per_example_grads`` against
  ``jax.vmap(jax.grad(...))`` of the plain per-example loss;
- ``vmap(loss) mean``: the mean loss written as ``jax.vmap`` of the
  per-example loss through ``model.apply``, differentiated with ``jax.grad``;
- compiled temporary memory and compile time of the train step;
- cost against depth: time(forward + backward) / time(forward) for depth 2..32
  (Theorem 7.4.1), and step time against depth (linear growth).
Where PyTorch is installed, its eager training step of the same network is
added as a column.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import compare, compile_seconds, paired_ratios, temp_bytes  # noqa: E402

import fnbp  # noqa: E402

WIDTHS = (1024, 1024, 10)
INPUT = 784


def plain_apply(params, x):
    """The same network in plain jnp, differentiated by autodiff (the baseline)."""
    h = x
    for p in params:
        if p:
            h = h @ p["W"].T + p["b"]
        else:
            h = jnp.maximum(h, 0.0)
    return h


def plain_loss(t, y):
    t_y = jnp.take_along_axis(t, y[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(t, axis=-1) - t_y


def plain_mean_loss(params, x, y):
    return jnp.mean(plain_loss(plain_apply(params, x), y))


def make_data(batch, seed=0):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (batch, INPUT), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, WIDTHS[-1])
    return x, y


def steps(model, optimizer):
    loss = fnbp.cross_entropy_loss

    def fnbp_step(params, state, x, y):
        J, grads = fnbp.backprop(model, loss, params, x, y)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, J

    def grad_apply_step(params, state, x, y):
        J, grads = jax.value_and_grad(lambda p: jnp.mean(loss(model.apply(p, x), y)))(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, J

    def autodiff_step(params, state, x, y):
        J, grads = jax.value_and_grad(plain_mean_loss)(params, x, y)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, J

    return fnbp_step, grad_apply_step, autodiff_step


def per_example(model):
    def fnbp_pe(params, x, y):
        return fnbp.per_example_grads(model, fnbp.cross_entropy_loss, params, x, y)

    def autodiff_pe(params, x, y):
        one = jax.value_and_grad(lambda p, x_i, y_i: plain_loss(plain_apply(p, x_i), y_i))
        return jax.vmap(one, in_axes=(None, 0, 0))(params, x, y)

    return fnbp_pe, autodiff_pe


def vmapped_mean(model):
    def fnbp_vm(params, x, y):
        def mean_loss(p):
            per = jax.vmap(lambda x_i, y_i: fnbp.cross_entropy_loss(model.apply(p, x_i), y_i))
            return jnp.mean(per(x, y))

        return jax.value_and_grad(mean_loss)(params)

    def autodiff_vm(params, x, y):
        def mean_loss(p):
            per = jax.vmap(lambda x_i, y_i: plain_loss(plain_apply(p, x_i), y_i))
            return jnp.mean(per(x, y))

        return jax.value_and_grad(mean_loss)(params)

    return fnbp_vm, autodiff_vm


def torch_step(widths, n_in, batch, *, dtype="float32", device="cpu"):
    """PyTorch's eager training step of the same MLP, or None where torch is not installed.

    Linear, ReLU, ..., Linear with PyTorch's default initialization, mean
    cross-entropy, ``torch.optim.SGD(lr=0.01)``; parameters and inputs in
    ``dtype`` on ``device``. Returns ``step()``, one training step (on a GPU it
    returns before the work is done: synchronize to wait for it).
    """
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    layers, width = [], n_in
    for i, w in enumerate(widths):
        layers.append(torch.nn.Linear(width, w))
        if i < len(widths) - 1:
            layers.append(torch.nn.ReLU())
        width = w
    torch_dtype = getattr(torch, dtype)
    net = torch.nn.Sequential(*layers).to(device=device, dtype=torch_dtype)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(batch, n_in, device=device, dtype=torch_dtype)
    y = torch.randint(0, widths[-1], (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    return step


def torch_step_seconds(batch, repeats):
    """Median seconds of PyTorch's eager CPU step of the 784-1024-1024-10 MLP, or None."""
    import statistics
    import time

    step = torch_step(WIDTHS, INPUT, batch)
    if step is None:
        return None
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_batches(batches, repeats, rounds):
    """The MLP rows; ``repeats`` is for PyTorch's eager step, timed on its own."""
    model = fnbp.mlp(WIDTHS, "relu")
    _, params = model.init(jax.random.PRNGKey(0), (INPUT,), jnp.float32)
    optimizer = optax.sgd(0.01)
    state = optimizer.init(params)
    fnbp_step, grad_apply_step, autodiff_step = steps(model, optimizer)
    fnbp_pe, autodiff_pe = per_example(model)
    fnbp_vm, autodiff_vm = vmapped_mean(model)
    print(
        "\nMLP 784-1024-1024-10 float32; ratio = time(fnbp) / time(autodiff), median over "
        f"{rounds} rounds of side-by-side timings (A/A: autodiff against a copy of itself)"
    )
    print(
        f"{'batch':>6} {'autodiff ms':>12} {'fnbp ms':>9} {'train step':>11} {'A/A':>6} "
        f"{'grad(apply)':>12} {'per-example':>12} {'vmap mean':>10} {'torch ms':>9}",
        flush=True,
    )
    rows = []
    for batch in batches:
        x, y = make_data(batch)
        step_args, grad_args = (params, state, x, y), (params, x, y)
        # Each ratio is the median of per-round ratios against a baseline
        # timed right beside it; "A/A" is autodiff against a second compiled
        # copy of itself, the noise floor of the machine.
        step = paired_ratios(
            {
                "fnbp": (jax.jit(fnbp_step), step_args),
                "grad_apply": (jax.jit(grad_apply_step), step_args),
                "aa": (jax.jit(autodiff_step), step_args),
            },
            (jax.jit(autodiff_step), step_args),
            rounds=rounds,
        )
        pe = paired_ratios(
            {"fnbp": (jax.jit(fnbp_pe), grad_args)},
            (jax.jit(autodiff_pe), grad_args),
            rounds=max(rounds // 2, 11),
        )
        vm = paired_ratios(
            {"fnbp": (jax.jit(fnbp_vm), grad_args)},
            (jax.jit(autodiff_vm), grad_args),
            rounds=max(rounds // 2, 11),
        )
        torch_s = torch_step_seconds(batch, repeats)
        rows.append(
            {
                "batch": batch,
                "step_autodiff_ms": 1e3 * step.seconds["baseline"],
                "step_fnbp_ms": 1e3 * step.seconds["fnbp"],
                "train_step_ratio": step.ratios["fnbp"],
                "grad_apply_ratio": step.ratios["grad_apply"],
                "autodiff_aa_ratio": step.ratios["aa"],
                "per_example_ratio": pe.ratios["fnbp"],
                "vmap_mean_ratio": vm.ratios["fnbp"],
                "torch_eager_step_ms": None if torch_s is None else 1e3 * torch_s,
            }
        )
        print_row(rows[-1])
    x, y = make_data(256)
    step_args = (params, state, x, y)
    mem = {
        "fnbp": temp_bytes(fnbp_step, step_args),
        "autodiff": temp_bytes(autodiff_step, step_args),
    }
    comp = {
        "fnbp": compile_seconds(fnbp_step, step_args),
        "autodiff": compile_seconds(autodiff_step, step_args),
    }
    return rows, mem, comp


def print_row(r):
    torch_ms = "-" if r["torch_eager_step_ms"] is None else f"{r['torch_eager_step_ms']:.2f}"
    print(
        f"{r['batch']:>6} {r['step_autodiff_ms']:>12.2f} {r['step_fnbp_ms']:>9.2f} "
        f"{r['train_step_ratio']:>11.3f} {r['autodiff_aa_ratio']:>6.3f} "
        f"{r['grad_apply_ratio']:>12.3f} "
        f"{r['per_example_ratio']:>12.3f} {r['vmap_mean_ratio']:>10.3f} {torch_ms:>9}",
        flush=True,
    )


def bench_depth(depths, repeats, batch=256, width=256):
    rows = []
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, width), jnp.float32)
    y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)
    for depth in depths:
        model = fnbp.mlp([width] * (depth - 1) + [10], "relu")
        _, params = model.init(jax.random.PRNGKey(0), (width,), jnp.float32)
        forward = jax.jit(
            lambda p, x, y, m=model: jnp.mean(fnbp.cross_entropy_loss(m.apply(p, x), y))
        )
        both = jax.jit(lambda p, x, y, m=model: fnbp.backprop(m, fnbp.cross_entropy_loss, p, x, y))
        t = compare(
            {"forward": (forward, (params, x, y)), "both": (both, (params, x, y))}, repeats=repeats
        )
        rows.append(
            {
                "depth": depth,
                "forward_ms": 1e3 * t["forward"],
                "forward_backward_ms": 1e3 * t["both"],
                "backward_cost_ratio": t["both"] / t["forward"],
            }
        )
        r = rows[-1]
        print(
            f"  depth {r['depth']:>3}: forward {r['forward_ms']:.3f} ms, forward+backward "
            f"{r['forward_backward_ms']:.3f} ms, ratio {r['backward_cost_ratio']:.2f}",
            flush=True,
        )
    return rows


def stored_bytes(model, params, x):
    """Bytes of activations (residual arrays with the batch axis) stored by the forward pass.

    The residuals also reference the parameters (W for W^T v); those are alive
    anyway and are not counted.
    """
    _, residuals = jax.eval_shape(model.forward, params, x)
    return sum(
        leaf.size * leaf.dtype.itemsize
        for leaf in jax.tree_util.tree_leaves(residuals)
        if leaf.ndim and leaf.shape[0] == x.shape[0]
    )


def remat_memory(depth=16, width=512, batch=256):
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, width), jnp.float32)
    y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)
    out = {"depth": depth, "width": width, "batch": batch}
    for k in (0, 4):
        model = fnbp.mlp([width] * (depth - 1) + [10], "relu", remat_every=k)
        _, params = model.init(jax.random.PRNGKey(0), (width,), jnp.float32)
        out[f"stored_bytes_remat_{k}"] = stored_bytes(model, params, x)
        out[f"temp_bytes_remat_{k}"] = temp_bytes(
            lambda p, x, y, m=model: fnbp.backprop(m, fnbp.cross_entropy_loss, p, x, y),
            (params, x, y),
        )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and depths")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    repeats = 11 if args.quick else 41
    rounds = 21 if args.quick else 101
    depths = (2, 8, 32) if args.quick else (2, 4, 8, 16, 32)

    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    rows, mem, comp = bench_batches((32, 256, 1024), repeats, rounds)
    print(
        f"\ncompiled temporary memory (batch 256): fnbp {mem['fnbp']} B, autodiff {mem['autodiff']} B"
    )
    print(
        f"compile time: fnbp {comp['fnbp']:.3f} s, autodiff {comp['autodiff']:.3f} s, "
        f"ratio {comp['fnbp'] / comp['autodiff']:.3f}"
    )
    print(
        "\ncost against depth (width 256, batch 256): time(forward + backward) / time(forward)",
        flush=True,
    )
    depth_rows = bench_depth(depths, repeats)
    depth_ms = np.array([[r["depth"], r["forward_backward_ms"]] for r in depth_rows])
    slope, intercept = np.polyfit(depth_ms[:, 0], depth_ms[:, 1], 1)
    fitted = slope * depth_ms[:, 0] + intercept
    r2 = 1 - np.sum((depth_ms[:, 1] - fitted) ** 2) / np.sum(
        (depth_ms[:, 1] - depth_ms[:, 1].mean()) ** 2
    )
    per_layer = ", ".join(f"{ms / d:.3f}" for d, ms in depth_ms)
    print(
        f"  step time against depth: linear fit {slope:.3f} ms per layer, R^2 {r2:.4f}; "
        f"time per layer {per_layer} ms"
    )
    rm = remat_memory()
    print(
        f"\nrematerialization (MLP depth {rm['depth']}, width {rm['width']}, batch {rm['batch']}):"
    )
    print(
        f"  residuals stored by the forward pass: {rm['stored_bytes_remat_0']} B storing all, "
        f"{rm['stored_bytes_remat_4']} B with remat_every=4 "
        f"({rm['stored_bytes_remat_4'] / rm['stored_bytes_remat_0']:.2f}x)"
    )
    print(
        f"  compiled temp memory: {rm['temp_bytes_remat_0']} B storing all, "
        f"{rm['temp_bytes_remat_4']} B with remat_every=4 (XLA:CPU schedules the whole "
        f"step and may merge the recomputation; jax.checkpoint behaves the same there)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"batches": rows, "memory": mem, "compile": comp, "depth": depth_rows, "remat": rm},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
