"""Curvature from the backward pass against ``fnbp.backprop``, and BackPACK's against torch's.

Run: ``python benchmarks/bench_curvature.py`` (``--quick`` for fewer rounds,
``--smoke`` for tiny nets that only check the script, ``--json FILE`` to keep
the figures). Every figure is a ratio time(program) / time(fnbp.backprop of
the same model and batch), measured in one process: compiled once, warmed up,
timed beside the baseline in alternating order round after round, the median
of the per-round ratios (``timing.paired_ratios``). ``aa`` times backprop
against a second compiled copy of itself: the noise floor of a ratio.

Networks, float32, cross-entropy over C = 10 classes, batch 256:

- ``mlp``: ``fnbp.mlp([1024, 1024, 10])`` on 784 inputs;
- ``cnn``: ``fnbp.cnn(10, (32, 64))`` on 8 x 8 x 1 (the README's conv net).

Programs (each jitted; targets of the curvature issue in brackets):

- ``grad_moments``: for scale, the one-extra-contraction quantity;
- ``diag_mc``: ``fnbp.diag_ggn(mc_samples=1)`` [<= 1.6];
- ``kfac_mc``: ``fnbp.kfac_factors(kind="mc")`` [<= 1.6];
- ``diag_exact``: ``fnbp.diag_ggn`` exact, 10 columns [<= 1 + 0.6 C = 7];
- ``kflr``: ``fnbp.kfac_factors(kind="exact")`` [<= 7];
- ``kfac_step`` / ``adam_step``: a K-FAC training step (``fnbp.train.kfac``,
  inverses every 10 steps: each timing is 10 steps back to back, so the
  inverses are amortized as in training) against an Adam step
  (``optax.adam``) of the same model and batch, both through
  ``fnbp.make_train_step``; the ratio kfac/adam [<= 2].

``flops`` is XLA's cost analysis of each program against backprop's: the
arithmetic floor a ratio can be judged by. ``memory`` is the temporary memory
XLA reports for the compiled program against backprop's.

BackPACK (PyTorch, where ``backpack-for-pytorch`` is installed; never a
dependency of fnbp): DiagGGNExact, DiagGGNMC, KFAC and KFLR on the same MLP
and batch, each as the ratio of ``loss.backward()`` inside
``backpack(extension)`` to torch's own ``loss.backward()``, eager, timed side
by side the same way. kfac-jax (where ``kfac-jax`` is installed and runs
with this jax): its optimizer's step on the same MLP in plain JAX, against an
optax Adam step of that network, with fnbp's K-FAC settings. ``--no-torch``
skips both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import compiled_costs, paired_ratios  # noqa: E402

import fnbp  # noqa: E402

LOSS = fnbp.cross_entropy_loss
CLASSES = 10
TARGETS = {
    "diag_mc": 1.6,
    "kfac_mc": 1.6,
    "diag_exact": 1 + 0.6 * CLASSES,
    "kflr": 1 + 0.6 * CLASSES,
    "kfac_step_over_adam": 2.0,
}
INVERSE_EVERY = 10


def nets(mode: str):
    if mode == "smoke":
        return [
            ("mlp", fnbp.mlp([16, CLASSES]), (12,), 8),
            ("cnn", fnbp.cnn(CLASSES, (4,)), (8, 8, 1), 8),
        ]
    return [
        ("mlp", fnbp.mlp([1024, 1024, CLASSES]), (784,), 256),
        ("cnn", fnbp.cnn(CLASSES, (32, 64)), (8, 8, 1), 256),
    ]


def programs(model):
    key = jax.random.key(7)

    def backprop(p, x, y):
        return fnbp.backprop(model, LOSS, p, x, y)

    return {
        "aa": backprop,
        "grad_moments": lambda p, x, y: fnbp.grad_moments(model, LOSS, p, x, y),
        "diag_mc": lambda p, x, y: fnbp.diag_ggn(model, LOSS, p, x, y, mc_samples=1, key=key),
        "kfac_mc": lambda p, x, y: fnbp.kfac_factors(model, LOSS, p, x, y, key=key),
        "diag_exact": lambda p, x, y: fnbp.diag_ggn(model, LOSS, p, x, y),
        "kflr": lambda p, x, y: fnbp.kfac_factors(model, LOSS, p, x, y, kind="exact"),
    }, backprop


def bench_steps(model, params, x, y, rounds: int) -> dict[str, Any]:
    """kfac_step / adam_step, INVERSE_EVERY steps back to back per timing."""
    out: dict[str, Any] = {}
    steps = {}
    for name, optimizer in (
        ("adam", optax.adam(1e-3)),
        ("kfac", fnbp.train.kfac(1e-3, inverse_every=INVERSE_EVERY)),
    ):
        step = fnbp.make_train_step(model, LOSS, optimizer)
        state = optimizer.init(params)

        def run(p, s, step=step):
            for _ in range(INVERSE_EVERY):
                p, s, _ = step(p, s, x, y)
            return p, s

        steps[name] = (run, (params, state))
    measured = paired_ratios({"kfac": steps["kfac"]}, steps["adam"], rounds=rounds, warmup=2)
    out["kfac_step_over_adam"] = measured.ratios["kfac"]
    out["ms_per_step"] = {
        "kfac": 1e3 * measured.seconds["kfac"] / INVERSE_EVERY,
        "adam": 1e3 * measured.seconds["baseline"] / INVERSE_EVERY,
    }
    return out


def bench_net(name, model, example_shape, batch, rounds) -> dict[str, Any]:
    _, params = model.init(jax.random.key(0), example_shape)
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (batch, *example_shape), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, CLASSES)
    args = (params, x, y)
    candidates, _ = programs(model)
    compiled = {k: jax.jit(f).lower(*args).compile() for k, f in candidates.items()}
    base = compiled["aa"]  # the same program as the baseline, compiled once for both
    measured = paired_ratios(
        {k: (f, args) for k, f in compiled.items()}, (base, args), rounds=rounds
    )
    base_flops, base_mem = compiled_costs(base)
    row: dict[str, Any] = {
        "net": name,
        "batch": batch,
        "ratios": measured.ratios,
        "ms": {k: 1e3 * v for k, v in measured.seconds.items()},
        "flops": {},
        "memory": {},
    }
    for k, f in compiled.items():
        fl, mem = compiled_costs(f)
        row["flops"][k] = None if not (fl and base_flops) else fl / base_flops
        row["memory"][k] = None if mem is None or not base_mem else mem / base_mem
    row.update(bench_steps(model, params, x, y, max(3, rounds // 4)))
    return row


# --- BackPACK, in PyTorch ------------------------------------------------------------------


def bench_backpack(batch: int, rounds: int, smoke: bool) -> dict[str, Any] | str:
    try:
        import torch
        from backpack import backpack, extend, extensions
    except ImportError:
        return "not installed (pip install backpack-for-pytorch)"
    torch.manual_seed(0)
    widths = (12, 16, CLASSES) if smoke else (784, 1024, 1024, CLASSES)
    layers: list[Any] = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    model = extend(torch.nn.Sequential(*layers))
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    x = torch.randn(batch, widths[0])
    y = torch.randint(0, CLASSES, (batch,))

    def plain():
        model.zero_grad()
        loss_fn(model(x), y).backward()

    def with_ext(ext):
        def run():
            model.zero_grad()
            with backpack(ext()):
                loss_fn(model(x), y).backward()

        return run

    def once(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    # x needs no gradient: torch's note that its full backward hooks see only outputs.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    out: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for name, ext in (
        ("diag_exact", extensions.DiagGGNExact),
        ("diag_mc", extensions.DiagGGNMC),
        ("kfac_mc", extensions.KFAC),
        ("kflr", extensions.KFLR),
    ):
        run = with_ext(ext)
        for _ in range(2):
            run()
            plain()
        ratios = []
        for r in range(rounds):
            if r % 2:
                base, t = once(plain), once(run)
            else:
                t, base = once(run), once(plain)
            ratios.append(t / base)
        out[name] = statistics.median(ratios)
    return out


# --- kfac-jax, the same step in plain JAX ----------------------------------------------------


def bench_kfac_jax(batch: int, rounds: int, smoke: bool) -> dict[str, Any] | str:
    """kfac-jax's optimizer step against an optax Adam step of the same plain-JAX MLP.

    Its settings match ``fnbp.train.kfac``'s in bench_steps: fixed learning rate,
    momentum 0.9 and damping 0.1, factors averaged with 0.95, inverses every
    INVERSE_EVERY steps, one sampled label per example (``"fisher_gradients"``);
    each timing is INVERSE_EVERY steps back to back.
    """
    try:
        import kfac_jax
    except ImportError:
        return "not installed (pip install kfac-jax)"
    widths = (12, 16, CLASSES) if smoke else (784, 1024, 1024, CLASSES)
    keys = jax.random.split(jax.random.key(0), len(widths) + 1)
    params = [
        {"W": jax.random.normal(k, (i, o)) / i**0.5, "b": jnp.zeros(o)}
        for k, i, o in zip(keys, widths[:-1], widths[1:])
    ]
    x = jax.random.normal(keys[-1], (batch, widths[0]))
    y = jax.random.randint(keys[-2], (batch,), 0, CLASSES)

    def net(params, x):
        for i, p in enumerate(params):
            x = x @ p["W"] + p["b"]
            x = jax.nn.relu(x) if i < len(params) - 1 else x
        return x

    def mean_loss(params, batch):
        logits = net(params, batch[0])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))

    def registered_loss(params, batch):
        kfac_jax.register_softmax_cross_entropy_loss(net(params, batch[0]), batch[1])
        return mean_loss(params, batch)

    adam = optax.adam(1e-3)

    @jax.jit
    def adam_steps(p, s):
        for _ in range(INVERSE_EVERY):
            u, s = adam.update(jax.grad(mean_loss)(p, (x, y)), s, p)
            p = optax.apply_updates(p, u)
        return p, s

    out: dict[str, Any] = {"kfac_jax": getattr(kfac_jax, "__version__", "?")}
    try:
        optimizer = kfac_jax.Optimizer(
            value_and_grad_func=jax.value_and_grad(registered_loss),
            l2_reg=0.0,
            learning_rate_schedule=lambda step: 1e-3,
            momentum_schedule=lambda step: 0.9,
            damping_schedule=lambda step: 0.1,
            curvature_ema=0.95,
            inverse_update_period=INVERSE_EVERY,
            estimation_mode="fisher_gradients",
            num_burnin_steps=0,
            multi_device=False,
        )
        rng = jax.random.key(3)
        state = optimizer.init(params, rng, (x, y))
        step_count = [0]

        def kfac_steps(p, s):
            for _ in range(INVERSE_EVERY):
                p, s, _ = optimizer.step(p, s, rng, batch=(x, y), global_step_int=step_count[0])
                step_count[0] += 1
            return p, s

        kfac_state: Any = (params, state)
        fresh = jax.tree_util.tree_map(jnp.copy, params)  # kfac-jax donates its arguments
        adam_state: Any = (fresh, adam.init(fresh))
        for _ in range(2):  # compile and warm up
            kfac_state = jax.block_until_ready(kfac_steps(*kfac_state))
            adam_state = jax.block_until_ready(adam_steps(*adam_state))
        # timed here, not by timing.paired_ratios: kfac-jax donates its arguments, so each
        # call must take the state the previous one returned, not the same arguments again
        ratios, ms = [], []
        for r in range(max(3, rounds // 4)):
            times = {}
            for name in ("kfac", "adam") if r % 2 else ("adam", "kfac"):
                start = time.perf_counter()
                if name == "kfac":
                    kfac_state = jax.block_until_ready(kfac_steps(*kfac_state))
                else:
                    adam_state = jax.block_until_ready(adam_steps(*adam_state))
                times[name] = time.perf_counter() - start
            ratios.append(times["kfac"] / times["adam"])
            ms.append(1e3 * times["kfac"] / INVERSE_EVERY)
    except Exception as error:  # a kfac-jax that does not run with this jax
        return (
            f"kfac-jax {out['kfac_jax']} failed with jax {jax.__version__}: "
            + (f"{type(error).__name__}: {error}".splitlines()[0][:160])
        )
    out["kfac_step_over_adam"] = statistics.median(ratios)
    out["ms_per_step"] = statistics.median(ms)
    return out


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer rounds")
    mode.add_argument("--smoke", action="store_true", help="tiny nets, a few rounds")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--no-torch", action="store_true", help="skip BackPACK")
    opts = parser.parse_args(argv)
    opts.mode = "smoke" if opts.smoke else "quick" if opts.quick else "full"
    opts.rounds = {"smoke": 3, "quick": 15, "full": 41}[opts.mode]
    return opts


def main(argv=None) -> dict[str, Any]:
    opts = parse(argv)
    figures: dict[str, Any] = {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "mode": opts.mode,
        "targets": TARGETS,
        "rows": [],
    }
    print(
        f"backend {figures['backend']} ({figures['device']}), jax {jax.__version__}, "
        f"{figures['cpus']} cpus; ratio = time / time(fnbp.backprop), median of "
        f"{opts.rounds} side-by-side rounds; * = above its target"
    )
    names = ["aa", "grad_moments", "diag_mc", "kfac_mc", "diag_exact", "kflr"]
    print(f"{'net':>5} {'batch':>5} " + " ".join(f"{n:>12}" for n in names) + f" {'kfac/adam':>10}")
    for name, model, shape, batch in nets(opts.mode):
        row = bench_net(name, model, shape, batch, opts.rounds)
        figures["rows"].append(row)

        def cell(k, row=row):
            mark = "*" if k in TARGETS and row["ratios"][k] > TARGETS[k] else " "
            return f"{row['ratios'][k]:>11.2f}{mark}"

        step = row["kfac_step_over_adam"]
        print(
            f"{name:>5} {batch:>5} "
            + " ".join(cell(k) for k in names)
            + f" {step:>9.2f}{'*' if step > TARGETS['kfac_step_over_adam'] else ' '}"
        )
        print(
            f"{'':>11}flops "
            + " ".join(
                f"{'-' if row['flops'][k] is None else format(row['flops'][k], '.2f'):>12}"
                for k in names
            )
        )
        print(
            f"{'':>10}memory "
            + " ".join(
                f"{'-' if row['memory'][k] is None else format(row['memory'][k], '.2f'):>12}"
                for k in names
            )
        )
        ms = row["ms_per_step"]
        print(f"{'':>11}steps: kfac {ms['kfac']:.2f} ms, adam {ms['adam']:.2f} ms per step")
    batch = nets(opts.mode)[0][3]
    figures["backpack"] = (
        "not run (--no-torch)" if opts.no_torch else bench_backpack(batch, opts.rounds, opts.smoke)
    )
    if isinstance(figures["backpack"], dict):
        bp = figures["backpack"]
        print(
            f"BackPACK (torch {bp['torch']}, {bp['threads']} threads), MLP batch {batch}, ratio "
            f"to torch's backward: "
            + ", ".join(f"{k} {bp[k]:.2f}" for k in ("diag_mc", "kfac_mc", "diag_exact", "kflr"))
        )
    else:
        print(f"BackPACK: {figures['backpack']}")
    figures["kfac_jax"] = (
        "not run (--no-torch)" if opts.no_torch else bench_kfac_jax(batch, opts.rounds, opts.smoke)
    )
    if isinstance(figures["kfac_jax"], dict):
        kj = figures["kfac_jax"]
        print(
            f"kfac-jax {kj['kfac_jax']}, MLP batch {batch}: its step / an Adam step "
            f"{kj['kfac_step_over_adam']:.2f} ({kj['ms_per_step']:.2f} ms per step)"
        )
    else:
        print(f"kfac-jax: {figures['kfac_jax']}")
    if opts.json:
        opts.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
