"""Wrong VJPs, side by side: what fnbp.check_vjp, jax.test_util.check_grads and torch gradcheck catch.

Each mutant is a ``jax.custom_vjp`` rule with one bug of a kind people really
write, the plain function it should differentiate (the reference) and the
arguments a user would pass (random, zero-mean, square where a shape is
square). Every checker gets the same function and arguments:

- fnbp: ``check_vjp(f, *args, reference=ref)`` with its defaults (every
  transform, probes on); caught when the report fails. Where the mutant has
  a factory of arguments (a user's ``example_args``), fnbp is given that
  (``args=factory``), which it also draws at distinct sizes; the other two
  get the factory's square draw;
- ``jax.test_util.check_grads(f, args, order=2, modes=["rev"])``: caught when
  it raises AssertionError; any other exception is counted as "crashed";
- ``torch.autograd.gradcheck`` (when torch is installed): the same rule
  wrapped in a ``torch.autograd.Function`` whose forward and backward call
  f and its VJP through NumPy, run in float64 (gradcheck's requirement);
  caught when it returns False or raises GradcheckError.

Run: ``python benchmarks/bench_verifier.py`` (about a minute on 2 cores).
Mutants checked in float32 use float32 arguments; gradcheck always sees float64.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

jax.config.update("jax_enable_x64", True)

from fnbp.verify import check_vjp  # noqa: E402
from fnbp.verify.mutants import sin_wrong_under_vmap  # noqa: E402

RNG = np.random.default_rng(2026)


def normal(*shape: int, dtype=np.float64) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def rule(primal: Callable, fwd: Callable, bwd: Callable) -> Any:
    f = jax.custom_vjp(primal)
    f.defvjp(fwd, bwd)
    return f


class Mutant(NamedTuple):
    name: str
    category: str
    f: Any
    reference: Callable
    args: tuple
    factory: Callable | None = None  # fnbp draws from it (args= ...); the others get args


def mm_factory(key, dtype, sizes=(3, 3, 3)):
    """mm's arguments, square by default; fnbp asks for distinct sizes too."""
    n, m, k = sizes
    kz, kw, kb = jax.random.split(key, 3)
    return (
        jax.random.normal(kz, (n, m), dtype),
        jax.random.normal(kw, (k, m), dtype),
        jax.random.normal(kb, (k,), dtype),
    )


def sigmoid(z):
    return jax.nn.sigmoid(z)


def relu(z):
    return jnp.where(z > 0, z, 0.0)


def mm(z, W, b):
    return z @ W.T + b


def mse(t, y):
    return 0.5 * (t - y) ** 2


def ln_s(z):
    mu = z.mean(-1, keepdims=True)
    return (z - mu) / jnp.sqrt(((z - mu) ** 2).mean(-1, keepdims=True))


def softmax(z):
    return jax.nn.softmax(z, axis=-1)


def ce(t, y):
    return jax.nn.logsumexp(t, -1) - jnp.take_along_axis(t, y[:, None], -1)[:, 0]


def _ln_bwd(variance):
    def bwd(z, v):
        mu = z.mean(-1, keepdims=True)
        sigma = jnp.sqrt(variance(z, mu))
        u = (z - mu) / sigma
        return ((v - v.mean(-1, keepdims=True) - (v * u).mean(-1, keepdims=True) * u) / sigma,)

    return bwd


def _noisy(c):
    return jax.pure_callback(
        lambda x: np.asarray(x + 1e-6 * np.random.default_rng().standard_normal(x.shape), x.dtype),
        jax.ShapeDtypeStruct(c.shape, c.dtype),
        c,
    )


def _callback_cos(z):
    return jax.pure_callback(lambda x: np.cos(x), jax.ShapeDtypeStruct(z.shape, z.dtype), z)


def mutants() -> list[Mutant]:
    sin, cos = jnp.sin, jnp.cos
    z45 = lambda: (normal(4, 5),)  # noqa: E731
    z5 = lambda: (normal(5),)  # noqa: E731
    mm_args = (normal(3, 3), normal(3, 3), normal(3))
    sq = lambda z: z * z  # noqa: E731
    out = [
        # wrong values everywhere
        Mutant(
            "sin: cos dropped for -sin",
            "value",
            rule(sin, lambda z: (sin(z), z), lambda z, v: (-sin(z) * v,)),
            sin,
            z5(),
        ),
        Mutant(
            "square: factor 2 missing",
            "factor",
            rule(sq, lambda z: (sq(z), z), lambda z, v: (z * v,)),
            sq,
            z5(),
        ),
        Mutant(
            "tanh: wrong sign",
            "sign",
            rule(jnp.tanh, lambda z: (jnp.tanh(z), jnp.tanh(z)), lambda y, v: ((y * y - 1) * v,)),
            jnp.tanh,
            z45(),
        ),
        Mutant(
            "sigmoid: (1 - s) dropped",
            "value",
            rule(sigmoid, lambda z: (sigmoid(z), sigmoid(z)), lambda s, v: (s * v,)),
            sigmoid,
            z45(),
        ),
        Mutant(
            "abs: sign(z) dropped (sign flipped where z < 0)",
            "sign",
            rule(jnp.abs, lambda z: (jnp.abs(z), z), lambda z, v: (v,)),
            jnp.abs,
            z5(),
        ),
        Mutant(
            "mm: bias cotangent averaged",
            "factor",
            rule(
                mm,
                lambda z, W, b: (mm(z, W, b), (z, W)),
                lambda r, v: (v @ r[1], v.T @ r[0], v.mean(0)),
            ),
            mm,
            mm_args,
        ),
        Mutant(
            "mm: dW not summed over examples (last example only)",
            "value",
            rule(
                mm,
                lambda z, W, b: (mm(z, W, b), (z, W)),
                lambda r, v: (v @ r[1], jnp.outer(v[-1], r[0][-1]), v.sum(0)),
            ),
            mm,
            mm_args,
        ),
        Mutant(
            "mse: cotangents of t and y swapped",
            "swap",
            rule(mse, lambda t, y: (mse(t, y), t - y), lambda d, v: (-d * v, d * v)),
            mse,
            (normal(5), normal(5)),
        ),
        Mutant(
            "layer norm: mean's dependence on z ignored",
            "value",
            rule(
                ln_s,
                lambda z: (ln_s(z), z),
                lambda z, v: (
                    (v - (v * ln_s(z)).mean(-1, keepdims=True) * ln_s(z))
                    / jnp.std(z, -1, keepdims=True),
                ),
            ),
            ln_s,
            z45(),
        ),
        Mutant(
            "softmax: Jacobian transposed term dropped",
            "value",
            rule(softmax, lambda z: (softmax(z), softmax(z)), lambda p, v: (p * v,)),
            softmax,
            z45(),
        ),
        Mutant(
            "cross-entropy: label term dropped",
            "value",
            rule(
                ce, lambda t, y: (ce(t, y), (softmax(t), y)), lambda r, v: (r[0] * v[:, None], None)
            ),
            ce,
            (normal(4, 5), np.array([0, 3, 1, 4])),
        ),
        # special points: zeros, kinks, ties
        Mutant(
            "relu: derivative 1 at z = 0 (reference says 0)",
            "zero",
            rule(relu, lambda z: (relu(z), z >= 0), lambda m, v: (jnp.where(m, v, 0.0),)),
            relu,
            z45(),
        ),
        Mutant(
            "abs: derivative 1 at z = 0",
            "zero",
            rule(
                jnp.abs, lambda z: (jnp.abs(z), z), lambda z, v: (jnp.where(z >= 0, 1.0, -1.0) * v,)
            ),
            lambda z: jnp.where(z > 0, z, jnp.where(z < 0, -z, 0.0)),
            z5(),
        ),
        Mutant(
            "x/|x| gradient NaN at 0 (0/0)",
            "nan",
            rule(
                lambda z: jnp.sqrt(z * z + 1e-300) * 0 + jnp.abs(z),
                lambda z: (jnp.abs(z), z),
                lambda z, v: (z / jnp.abs(z) * v,),
            ),
            lambda z: jnp.where(z > 0, z, jnp.where(z < 0, -z, 0.0)),
            z5(),
        ),
        Mutant(
            "clip at 1: kink at 1 gets slope 1",
            "kink",
            rule(
                lambda z: jnp.where(z > 1.0, 1.0, z),
                lambda z: (jnp.where(z > 1.0, 1.0, z), z),
                lambda z, v: (jnp.where(z > 1.0, 0.0, v),),
            ),
            lambda z: jnp.where(z >= 1.0, 1.0, z),
            z5(),
        ),
        Mutant(
            "max: every tied entry gets the cotangent",
            "tie",
            rule(
                lambda z: z.max(-1),
                lambda z: (z.max(-1), z),
                lambda z, v: ((z == z.max(-1, keepdims=True)) * v[..., None],),
            ),
            lambda z: z.max(-1),
            z45(),
        ),
        # large magnitudes and offset means
        Mutant(
            "sigmoid': exp(x)/(1+exp(x))^2 overflows (float32)",
            "large",
            rule(
                sigmoid,
                lambda z: (sigmoid(z), z),
                lambda z, v: (jnp.exp(z) / (1 + jnp.exp(z)) ** 2 * v,),
            ),
            sigmoid,
            (normal(4, 5, dtype=np.float32),),
        ),
        Mutant(
            "softplus': exp(x)/(1+exp(x)) overflows (float32)",
            "large",
            rule(
                jax.nn.softplus,
                lambda z: (jax.nn.softplus(z), z),
                lambda z, v: (jnp.exp(z) / (1 + jnp.exp(z)) * v,),
            ),
            jax.nn.softplus,
            (normal(4, 5, dtype=np.float32),),
        ),
        Mutant(
            "log-cosh': (e^x - e^-x)/(e^x + e^-x) overflows (float32)",
            "large",
            rule(
                lambda z: jnp.logaddexp(z, -z) - np.log(2.0),
                lambda z: (jnp.logaddexp(z, -z) - np.log(2.0), z),
                lambda z, v: ((jnp.exp(z) - jnp.exp(-z)) / (jnp.exp(z) + jnp.exp(-z)) * v,),
            ),
            lambda z: jnp.logaddexp(z, -z) - np.log(2.0),
            (normal(4, 5, dtype=np.float32),),
        ),
        Mutant(
            "layer norm: variance as E[z^2] - E[z]^2",
            "offset",
            rule(
                ln_s,
                lambda z: (ln_s(z), z),
                _ln_bwd(lambda z, mu: (z * z).mean(-1, keepdims=True) - mu * mu),
            ),
            ln_s,
            z45(),
        ),
        Mutant(
            "layer norm: variance as E[z^2] - E[z]^2 (float32)",
            "offset",
            rule(
                ln_s,
                lambda z: (ln_s(z), z),
                _ln_bwd(lambda z, mu: (z * z).mean(-1, keepdims=True) - mu * mu),
            ),
            ln_s,
            (normal(4, 5, dtype=np.float32),),
        ),
        # square shapes
        Mutant(
            "mm: dz = v @ W sliced by the wrong size (right when square)",
            "shape",
            rule(
                mm,
                lambda z, W, b: (mm(z, W, b), (z, W)),
                lambda r, v: (v @ r[1][:, : r[0].shape[0]], v.T @ r[0], v.sum(0)),
            ),
            mm,
            mm_args,
            mm_factory,
        ),
        # properties of B
        Mutant(
            "sin: backward not linear in v",
            "linearity",
            rule(sin, lambda z: (sin(z), cos(z)), lambda c, v: (c * v * jnp.abs(v),)),
            sin,
            z5(),
        ),
        Mutant(
            "sin: backward affine in v (B(0) != 0)",
            "linearity",
            rule(sin, lambda z: (sin(z), cos(z)), lambda c, v: (c * v + 1e-3,)),
            sin,
            z5(),
        ),
        Mutant(
            "sin: fwd primal differs from f",
            "primal",
            rule(sin, lambda z: (sin(z) + 1e-3, cos(z)), lambda c, v: (c * v,)),
            sin,
            z5(),
        ),
        Mutant(
            "square: cotangent returned as float32",
            "dtype",
            rule(sq, lambda z: (sq(z), z), lambda z, v: ((2 * z * v).astype(jnp.float32),)),
            sq,
            z5(),
        ),
        Mutant(
            "mm: bias cotangent of shape (1, n)",
            "shape",
            rule(
                mm,
                lambda z, W, b: (mm(z, W, b), (z, W)),
                lambda r, v: (v @ r[1], v.T @ r[0], v.sum(0, keepdims=True)),
            ),
            mm,
            mm_args,
        ),
        Mutant(
            "sin: nondeterministic backward",
            "rerun",
            rule(sin, lambda z: (sin(z), cos(z)), lambda c, v: (_noisy(c) * v,)),
            sin,
            z5(),
        ),
        Mutant(
            "sin: callback backward with a wrong factor",
            "callback",
            rule(sin, lambda z: (sin(z), z), lambda z, v: (1.01 * _callback_cos(z) * v,)),
            sin,
            z5(),
        ),
        # transforms
        Mutant(
            "sin: wrong only under vmap (a batching rule)",
            "vmap",
            sin_wrong_under_vmap(),
            sin,
            (normal(2, 3),),
        ),
        Mutant(
            "sigmoid: residual hidden from 2nd order (stop_gradient)",
            "2nd order",
            rule(
                sigmoid,
                lambda z: (sigmoid(z), sigmoid(z)),
                lambda s, v: (jax.lax.stop_gradient(s) * (1 - jax.lax.stop_gradient(s)) * v,),
            ),
            sigmoid,
            z45(),
        ),
        Mutant(
            "leaky relu: gamma cotangent dropped",
            "value",
            rule(
                lambda z, g: jnp.where(z > 0, z, g * z),
                lambda z, g: (jnp.where(z > 0, z, g * z), (z, g)),
                lambda r, v: (jnp.where(r[0] > 0, v, r[1] * v), jnp.zeros_like(r[1])),
            ),
            lambda z, g: jnp.where(z > 0, z, g * z),
            (normal(4, 5), np.array(0.1)),
        ),
    ]
    return out


def fnbp_catches(m: Mutant) -> str:
    try:
        if m.factory is not None:  # drawn at the user's (square) sizes and at distinct ones
            report = check_vjp(m.f, args=m.factory, reference=m.reference, draws=1)
        else:
            report = check_vjp(m.f, *m.args, reference=m.reference)
    except Exception as err:  # noqa: BLE001 - counted as a crash
        return f"crashed ({type(err).__name__})"
    return "caught" if not report.ok else "missed"


def check_grads_catches(m: Mutant) -> str:
    diff = [k for k, a in enumerate(m.args) if np.issubdtype(np.asarray(a).dtype, np.floating)]

    def f(*floats):
        args = list(m.args)
        for k, x in zip(diff, floats):
            args[k] = x
        return m.f(*args)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_grads(f, tuple(jnp.asarray(m.args[k]) for k in diff), order=2, modes=["rev"])
    except AssertionError:
        return "caught"
    except Exception as err:  # noqa: BLE001
        return f"crashed ({type(err).__name__})"
    return "missed"


def gradcheck_catches(m: Mutant) -> str:
    try:
        import torch
    except ImportError:
        return "n/a"
    diff = [k for k, a in enumerate(m.args) if np.issubdtype(np.asarray(a).dtype, np.floating)]

    class Bridge(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *floats):
            ctx.save_for_backward(*floats)
            return torch.from_numpy(np.asarray(m.f(*_args(floats)), np.float64))

        @staticmethod
        def backward(ctx, g):
            floats = ctx.saved_tensors
            _, pull = jax.vjp(lambda *a: m.f(*_merge(a)), *[jnp.asarray(t.numpy()) for t in floats])
            return tuple(
                torch.from_numpy(np.asarray(c, np.float64).copy())
                for c in pull(jnp.asarray(g.numpy()))
            )

    def _merge(floats):
        args = list(m.args)
        for k, x in zip(diff, floats):
            args[k] = x
        return args

    def _args(floats):
        return _merge([jnp.asarray(t.detach().numpy()) for t in floats])

    inputs = tuple(
        torch.tensor(np.asarray(m.args[k], np.float64), requires_grad=True) for k in diff
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok = torch.autograd.gradcheck(Bridge.apply, inputs, raise_exception=True)
    except RuntimeError as err:  # GradcheckError is a RuntimeError
        if type(err).__name__ == "GradcheckError":
            return "caught"
        return f"crashed ({type(err).__name__})"
    except Exception as err:  # noqa: BLE001
        return f"crashed ({type(err).__name__})"
    return "missed" if ok else "caught"


def main() -> None:
    rows = []
    started = time.perf_counter()
    suite = mutants()
    for m in suite:
        rows.append(
            (m.name, m.category, fnbp_catches(m), check_grads_catches(m), gradcheck_catches(m))
        )
    head = ("mutant", "category", "fnbp", "check_grads", "gradcheck")
    widths = [max(len(str(r[c])) for r in [head, *rows]) for c in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())
    print()
    for c, label in (
        (2, "fnbp.check_vjp"),
        (3, "jax check_grads(order=2, rev)"),
        (4, "torch gradcheck"),
    ):
        caught = sum(r[c] == "caught" for r in rows)
        crashed = sum(r[c].startswith("crashed") for r in rows)
        na = sum(r[c] == "n/a" for r in rows)
        print(
            f"{label}: caught {caught} of {len(rows)}"
            + (f", crashed on {crashed}" if crashed else "")
            + (" (torch not installed)" if na else "")
        )
    print(f"\n{len(rows)} wrong VJPs in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
