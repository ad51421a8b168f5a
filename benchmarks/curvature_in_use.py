"""What the curvature is for: K-FAC against Adam, and the Laplace approximation's calibration.

Run: ``python benchmarks/curvature_in_use.py`` (``--smoke`` for a tiny run that
only checks the script, ``--json FILE`` to keep the figures). Needs the
``train`` extra (scikit-learn's digits).

1. ``fnbp train --optimizer kfac`` against ``--optimizer adam`` at the same
   batch size (256), each at the command line's default learning rate and at
   a tuned one (Adam 0.003, K-FAC 0.03), on the digits (the MLP 64-1024-1024-10
   of the command line's defaults; target 97%) and with ``--model cnn`` on an
   MNIST-1D-style ``.npz`` written here (target 50%; ``mnist1d_like``: ten
   1-D templates, each example one of them stretched, shifted, scaled and
   noised, 40 samples long; made from a seed, nothing downloaded): the first
   step at which the test accuracy reaches the stated target, and the wall
   time to it, from the runs' metrics.json (the command line evaluates once
   an epoch, so steps come in whole epochs).
2. The Laplace approximation on the digits: an MLP 64-512-10 trained to its
   MAP with Adam on 300 examples for 200 epochs (plain cross entropy, no
   weight decay: overconfident), then ``fnbp.laplace`` with
   ``structure="diag"`` and ``"kfac"``, over all parameters and the last
   layer, the prior precision chosen by the evidence and by the NLL on 300
   held-out validation examples (``optimize_prior_precision(grid,
   validation=...)``), the probit predictive. Test accuracy, negative
   log-likelihood and expected calibration error (ECE, 15 equal-width
   confidence bins) of the MAP network and of each posterior.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fnbp
from fnbp import cli

TRAIN = 300  # the digits' training (and validation) examples of the Laplace part


def mnist1d_like(n: int, seed: int = 0, length: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """An MNIST-1D-style dataset: (n, length) float32 signals and their labels 0-9."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 1, 12)
    templates = np.stack(
        [np.sin(2 * np.pi * (k % 5 + 1) * grid / 2 + (k // 5) * np.pi / 2) for k in range(10)]
    )
    y = rng.integers(0, 10, n)
    x = np.zeros((n, length), np.float32)
    for i, label in enumerate(y):
        width = rng.integers(10, 20)
        signal = np.interp(np.linspace(0, 1, width), grid, templates[label])
        signal = signal * rng.uniform(0.7, 1.3)
        start = rng.integers(0, length - width)
        x[i, start : start + width] = signal
    x += 0.25 * rng.standard_normal(x.shape).astype(np.float32)
    x += np.cumsum(0.05 * rng.standard_normal(x.shape), axis=1).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def first_reaching(folder: Path, target: float) -> dict[str, Any]:
    metrics = json.loads((folder / "metrics.json").read_text())
    history = metrics["history"]
    per_epoch = metrics["seconds"] / max(len(history), 1)
    for h in history:
        if h["test_accuracy"] >= target:
            return {
                "epoch": h["epoch"],
                "step": h["step"],
                "seconds": round(per_epoch * h["epoch"], 2),
                "final": metrics["test_accuracy"],
            }
    return {"epoch": None, "step": None, "seconds": None, "final": metrics["test_accuracy"]}


BATCH = 256  # both optimizers' batch size
# each optimizer at two learning rates: the command line's default and a tuned one
RATES = {"adam": (None, "0.003"), "kfac": (None, "0.03")}


def optimizers(smoke: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        x, y = mnist1d_like(400 if smoke else 4000)
        np.savez(root / "mnist1d.npz", x=x, y=y)
        runs = {
            "digits": (["--dataset", "digits"], 0.97, 15),
            "mnist1d": (["--data-path", str(root / "mnist1d.npz"), "--model", "cnn"], 0.50, 10),
        }
        for data, (flags, target, epochs) in runs.items():
            extra = ["--width", "16", "--epochs", "2"] if smoke else ["--epochs", str(epochs)]
            out[data] = {"target": target, "batch": BATCH, "flags": flags[2:] + extra}
            for name, rates in RATES.items():
                for lr in rates:
                    label = name if lr is None else f"{name} lr {lr}"
                    folder = root / f"{data}-{label.replace(' ', '-')}"
                    args = ["train", *flags, *extra, "--optimizer", name]
                    args += ["--batch-size", str(BATCH)] + ([] if lr is None else ["--lr", lr])
                    code = cli.main([*args, "--no-progress", "--out", str(folder)])
                    if code != 0:
                        raise SystemExit(f"fnbp {' '.join(args)} failed with {code}")
                    out[data][label] = first_reaching(folder, target)
    return out


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    confidence, predicted = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            gap = abs(np.mean(predicted[inside] == y[inside]) - np.mean(confidence[inside]))
            total += inside.mean() * gap
    return float(total)


def scores(probs, y) -> dict[str, float]:
    probs = np.clip(np.asarray(probs, np.float64), 1e-12, 1)
    return {
        "accuracy": float(np.mean(probs.argmax(1) == y)),
        "nll": float(-np.mean(np.log(probs[np.arange(len(y)), y]))),
        "ece": ece(probs, y),
    }


def laplace_on_digits(smoke: bool) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    # few training examples and many epochs: a MAP network that is overconfident
    train, val = (x[:TRAIN], y[:TRAIN]), (x[TRAIN : 2 * TRAIN], y[TRAIN : 2 * TRAIN])
    x_test, y_test = x[2 * TRAIN :], y[2 * TRAIN :]
    width, epochs = (16, 3) if smoke else (512, 200)
    model = fnbp.mlp([width, 10])
    _, params = model.init(jax.random.key(0), (64,))
    result = fnbp.fit(
        model,
        fnbp.cross_entropy_loss,
        optax.adam(3e-3),
        params,
        *train,
        key=jax.random.key(1),
        epochs=epochs,
        batch_size=32,
    )
    params = result.params
    out: dict[str, Any] = {
        "width": width,
        "epochs": epochs,
        "train": TRAIN,
        "validation": TRAIN,
        "test": len(x_test),
    }
    out["map"] = scores(jax.nn.softmax(model.apply(params, x_test)), y_test)
    grid = np.logspace(-2, 6, 33)
    for subset in ("all", "last_layer"):
        for structure in ("diag", "kfac"):
            start = time.perf_counter()
            la = fnbp.laplace(
                model, fnbp.cross_entropy_loss, params, train, structure=structure, subset=subset
            )
            seconds = time.perf_counter() - start
            for chosen_by in ("evidence", "validation"):
                start = time.perf_counter()
                best = la.optimize_prior_precision(
                    grid, validation=val if chosen_by == "validation" else None
                )
                probs = best.predictive(jnp.asarray(x_test))
                out[f"{structure}/{subset}/{chosen_by}"] = scores(probs, y_test) | {
                    "prior_precision": best.prior_precision,
                    "seconds": round(seconds + time.perf_counter() - start, 2),
                }
    return out


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run of both parts")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    opts = parser.parse_args(argv)
    figures: dict[str, Any] = {"jax": jax.__version__, "backend": jax.default_backend()}
    figures["optimizers"] = optimizers(opts.smoke)
    for data, row in figures["optimizers"].items():
        print(
            f"{data} ({' '.join(row['flags'])}, batch {row['batch']}): test accuracy >= "
            f"{row['target']:.0%} first reached at"
        )
        for label, r in row.items():
            if isinstance(r, dict):
                print(
                    f"  {label:>13}: epoch {r['epoch']}, step {r['step']}, {r['seconds']} s "
                    f"(final test accuracy {r['final']:.2%})"
                )
    figures["laplace"] = laplace_on_digits(opts.smoke)
    lap = figures["laplace"]
    print(
        f"Laplace on the digits (MLP 64-{lap['width']}-10, {lap['epochs']} Adam epochs on "
        f"{lap['train']} examples; prior precision by the evidence or the validation NLL "
        f"of {lap['validation']} more; {lap['test']} test examples):"
    )
    for name, s in lap.items():
        if isinstance(s, dict):
            extra = f", prior precision {s['prior_precision']:g}" if name != "map" else ""
            print(
                f"  {name:>26}: accuracy {s['accuracy']:.2%}, NLL {s['nll']:.4f}, "
                f"ECE {s['ece']:.4f}{extra}"
            )
    if opts.json:
        opts.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    sys.exit(main() and 0)
