"""Forward mode through the forward functions against JAX's autodiff of the plain network.

Run: ``python benchmarks/bench_forward.py`` (``--smoke`` for a tiny net that
only checks the script, ``--json FILE`` to keep the figures). Each figure is a
ratio time(fnbp) / time(autodiff of a plain-jnp network with the same
parameters), compiled once, timed side by side round after round, the median
of the per-round ratios (``timing.paired_ratios``); ``aa`` times the plain jvp
against a second compiled copy of itself (the noise floor of a ratio).

MLP 784-1024-1024-10, ReLU, mean cross-entropy over 10 classes, batch 256,
float32; targets of the forward-functions issue in brackets:

- ``jvp``: ``fnbp.jvp`` of the loss along a direction v of the parameters
  against ``jax.jvp`` of the plain loss [<= 1.05];
- ``ggn_vp``: ``fnbp.ggn_vp(...)(v)`` against the same product composed from
  ``jax.jvp`` of the plain network, the loss Hessian's product at the logits
  (``jax.jvp`` of ``jax.grad``) and ``jax.vjp`` of the plain network [<= 1.05];
- ``hvp``: ``fnbp.hvp(...)(v)`` against ``jax.jvp`` of ``jax.grad`` of the
  plain loss (forward over reverse) [<= 1.05].
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import paired_ratios  # noqa: E402

import fnbp  # noqa: E402

TARGETS = {"jvp": 1.05, "ggn_vp": 1.05, "hvp": 1.05}
CLASSES = 10


def plain_net(params, x):
    """The MLP written with jnp alone, reading fnbp.mlp's params (linear, (), ..., linear)."""
    linears = params[0::2]
    for i, p in enumerate(linears):
        x = x @ p["W"].T + p["b"]
        x = jnp.maximum(x, 0) if i < len(linears) - 1 else x
    return x


def plain_loss_of_logits(t, y):
    picked = jnp.take_along_axis(t, y[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(t, axis=-1) - picked)


def programs(model, params, x, y):
    """name -> (fnbp's program, autodiff's program), each a function of (params, v)."""
    loss = fnbp.cross_entropy_loss

    def fnbp_jvp(p, v):
        return fnbp.jvp(lambda p: jnp.mean(loss(model.apply(p, x), y)), (p,), (v,))

    def plain_jvp(p, v):
        return jax.jvp(lambda p: plain_loss_of_logits(plain_net(p, x), y), (p,), (v,))

    def fnbp_ggn(p, v):
        return fnbp.ggn_vp(model, loss, p, x, y)(v)

    def plain_ggn(p, v):
        t, jv = jax.jvp(lambda p: plain_net(p, x), (p,), (v,))
        _, hjv = jax.jvp(jax.grad(lambda t: plain_loss_of_logits(t, y)), (t,), (jv,))
        _, vjp = jax.vjp(lambda p: plain_net(p, x), p)
        return vjp(hjv)[0]

    def fnbp_hvp(p, v):
        return fnbp.hvp(model, loss, p, x, y)(v)

    def plain_hvp(p, v):
        grad = jax.grad(lambda p: plain_loss_of_logits(plain_net(p, x), y))
        return jax.jvp(grad, (p,), (v,))[1]

    return {
        "jvp": (fnbp_jvp, plain_jvp),
        "ggn_vp": (fnbp_ggn, plain_ggn),
        "hvp": (fnbp_hvp, plain_hvp),
    }


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny net, a few rounds")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    opts = parser.parse_args(argv)
    widths, inputs, batch, rounds = (
        ((16, 16, CLASSES), 12, 8, 3) if opts.smoke else ((1024, 1024, CLASSES), 784, 256, 41)
    )
    model = fnbp.mlp(list(widths))
    _, params = model.init(jax.random.key(0), (inputs,))
    kx, ky, kv = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (batch, inputs))
    y = jax.random.randint(ky, (batch,), 0, CLASSES)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(kv, len(leaves))
    v = jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)]
    )
    args = (params, v)
    figures: dict[str, Any] = {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "net": f"mlp {inputs}-{'-'.join(map(str, widths))}",
        "batch": batch,
        "targets": TARGETS,
        "ratios": {},
        "ms": {},
    }
    plain_jvp = jax.jit(programs(model, params, x, y)["jvp"][1])
    aa = paired_ratios(
        {"aa": (plain_jvp, args)},
        (jax.jit(programs(model, params, x, y)["jvp"][1]), args),
        rounds=rounds,
    )
    figures["ratios"]["aa"] = aa.ratios["aa"]
    for name, (ours, theirs) in programs(model, params, x, y).items():
        measured = paired_ratios(
            {name: (jax.jit(ours), args)}, (jax.jit(theirs), args), rounds=rounds
        )
        figures["ratios"][name] = measured.ratios[name]
        figures["ms"][name] = {
            "fnbp": 1e3 * measured.seconds[name],
            "autodiff": 1e3 * measured.seconds["baseline"],
        }
    print(
        f"backend {figures['backend']}, jax {jax.__version__}, {figures['cpus']} cpus, "
        f"{figures['net']}, batch {batch}; ratio = time(fnbp) / time(autodiff), median of "
        f"{rounds} side-by-side rounds; * = above its target"
    )
    print(f"  aa {figures['ratios']['aa']:.3f}")
    for name, target in TARGETS.items():
        r, ms = figures["ratios"][name], figures["ms"][name]
        mark = "*" if r > target else " "
        print(
            f"  {name:>6} {r:.3f}{mark} (fnbp {ms['fnbp']:.2f} ms, autodiff {ms['autodiff']:.2f} ms)"
        )
    if opts.json:
        opts.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
