"""A conv-net training step: fnbp's hand-written rules against autodiff of the same network.

Run: ``python benchmarks/bench_conv.py`` (``--quick`` for a short run,
``--json FILE`` to keep the figures). The network, float32, batch 128, input
28 x 28 x 1::

    conv2d 3x3, 1 -> 32 channels, "same"  ->  relu  ->  max_pool 2x2
      ->  flatten (14 * 14 * 32)  ->  mm to 10 classes  ->  cross-entropy (mean)

One training step is ``jax.value_and_grad`` of the mean loss plus an optax SGD
update, jitted. fnbp's step uses ``fnbp.conv2d``, ``fnbp.relu``,
``fnbp.max_pool``, ``fnbp.mm`` and ``fnbp.cross_entropy_loss`` (every gradient
from a hand-written rule); the baseline is the same network in plain jnp/lax
(``lax.conv_general_dilated``, ``lax.reduce_window`` max as flax's max_pool)
differentiated by autodiff, with two formulations of max pooling:
``lax.reduce_window`` (as flax's max_pool; its autodiff is XLA's
select-and-scatter) and ``jnp.max`` over a (2, 2) reshape. ``--pool avg`` runs
the same network with average pooling on both sides. Everything runs in one
process, interleaved (see ``timing.py``), median of the repeats; each ratio is
time(fnbp) / time(baseline), so < 1 means fnbp is faster.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import compare  # noqa: E402

import fnbp  # noqa: E402

SPATIAL, CHANNELS_IN, CHANNELS, CLASSES = 28, 1, 32, 10


def init_params(key: jax.Array) -> dict:
    kc, km = jax.random.split(key)
    fan_in = 3 * 3 * CHANNELS_IN
    features = (SPATIAL // 2) ** 2 * CHANNELS
    return {
        "w": jax.random.normal(kc, (3, 3, CHANNELS_IN, CHANNELS)) * np.sqrt(2.0 / fan_in),
        "b": jnp.zeros((CHANNELS,)),
        "W": jax.random.normal(km, (CLASSES, features)) * np.sqrt(1.0 / features),
        "c": jnp.zeros((CLASSES,)),
    }


def fnbp_loss(params: dict, x: jax.Array, y: jax.Array, pool: str = "max") -> jax.Array:
    h = fnbp.relu(fnbp.conv2d(x, params["w"], params["b"], padding="same"))
    h = fnbp.max_pool(h, (2, 2)) if pool == "max" else fnbp.avg_pool(h, (2, 2))
    t = fnbp.mm(h.reshape(h.shape[0], -1), params["W"], params["c"])
    return jnp.mean(fnbp.cross_entropy_loss(t, y))


def plain_loss(params: dict, x: jax.Array, y: jax.Array, pool: str = "max") -> jax.Array:
    """The plain network; ``pool`` is "max" (lax.reduce_window, as flax's max_pool),
    "max-reshape" (jnp.max over a (2, 2) reshape) or "avg" (lax.reduce_window sum)."""
    h = jax.lax.conv_general_dilated(
        x, params["w"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jnp.maximum(h + params["b"], 0.0)
    window = ((1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    if pool == "max":
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, *window)
    elif pool == "max-reshape":
        n, H, W, C = h.shape
        h = h.reshape(n, H // 2, 2, W // 2, 2, C).max(axis=(2, 4))
    else:
        h = jax.lax.reduce_window(h, 0.0, jax.lax.add, *window) / 4
    t = h.reshape(h.shape[0], -1) @ params["W"].T + params["c"]
    t_y = jnp.take_along_axis(t, y[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(t, axis=-1) - t_y)


def make_step(loss_fn, optimizer):
    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--pool",
        choices=["max", "avg"],
        default="max",
        help="max (default; baselines: lax.reduce_window max and a reshape max) or avg",
    )
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--inner", type=int, default=5, help="steps per timing")
    parser.add_argument("--quick", action="store_true", help="11 repeats, 2 steps each")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    repeats, inner = (11, 2) if args.quick else (args.repeats, args.inner)

    key = jax.random.PRNGKey(0)
    kp, kx, ky = jax.random.split(key, 3)
    params = init_params(kp)
    x = jax.random.normal(kx, (args.batch, SPATIAL, SPATIAL, CHANNELS_IN), jnp.float32)
    y = jax.random.randint(ky, (args.batch,), 0, CLASSES)
    optimizer = optax.sgd(0.05)
    opt_state = optimizer.init(params)

    fnbp_pool = "max" if args.pool == "max" else "avg"
    baselines = ["max", "max-reshape"] if args.pool == "max" else ["avg"]
    losses = {"fnbp": functools.partial(fnbp_loss, pool=fnbp_pool)}
    losses.update({f"autodiff ({b})": functools.partial(plain_loss, pool=b) for b in baselines})
    steps = {name: make_step(f, optimizer) for name, f in losses.items()}
    # Same loss and gradients before timing anything.
    grads = {name: jax.jit(jax.grad(f))(params, x, y) for name, f in losses.items()}
    worst = max(
        float(jnp.max(jnp.abs(grads["fnbp"][k] - g[k])) / jnp.max(jnp.abs(g[k])))
        for name, g in grads.items()
        for k in g
    )
    if worst > 1e-4:
        print(f"mismatch: gradient rel err {worst:.2e}")
        return 1

    times = compare(
        {name: (s, (params, opt_state, x, y)) for name, s in steps.items()},
        repeats=repeats,
        warmup=3,
        inner=inner,
    )
    device = jax.devices()[0]
    print(
        f"conv-net training step (conv2d 3x3x1x32 same, relu, {fnbp_pool} pool 2x2, mm, "
        f"cross-entropy), batch {args.batch}, 28x28x1, float32, on {jax.default_backend()} "
        f"({device.device_kind}), {platform.machine()}"
    )
    print(
        f"median of {repeats} interleaved repeats x {inner} steps; gradients agree to {worst:.1e}"
    )
    ratios = {}
    for name, t in times.items():
        line = f"  {name:<24} {t * 1e3:8.2f} ms/step"
        if name != "fnbp":
            ratios[name] = times["fnbp"] / t
            line += f"   ratio fnbp / this = {ratios[name]:.3f}"
        print(line)
    print("target: ratio <= 1.05")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "benchmark": "conv_step",
                    "pool": fnbp_pool,
                    "batch": args.batch,
                    "backend": jax.default_backend(),
                    "device": device.device_kind,
                    "repeats": repeats,
                    "inner": inner,
                    "seconds": times,
                    "ratios": ratios,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
