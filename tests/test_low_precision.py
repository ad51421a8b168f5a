"""bfloat16 and float16: fnbp's products compile to what autodiff's do.

A bf16/f16 GEMM or convolution produces its input dtype; the hardware
accumulates in float32. fnbp's rules (``mm``, ``conv1d``, ``conv2d``) ask for
nothing more, so a jitted bf16 training step of fnbp has the same
``stablehlo.dot_general`` and ``stablehlo.convolution`` results, shape and
dtype, as autodiff's step of the same plain-jnp network: read here from
``jax.jit(step).lower(...).as_text()`` (nothing is compiled for that).

The numbers: a weight cotangent summed over thousands of examples, with a
bf16/f16 result, stays within one ulp of the dtype (eps) of the float64
oracle at the same rounded inputs: the sum is accumulated in float32 and
rounded once.
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _oracle import TOLERANCE, normal, ref_loss, rel_err, rule_and_oracle

import fnbp

HALF = ["bfloat16", "float16"]
OPS = ("stablehlo.dot_general", "stablehlo.convolution")

# --- reading the lowered program ------------------------------------------------------

_FUNC = re.compile(r"func\.func\s+(?:\w+\s+)*@([\w.$-]+)\s*\(")
_CALL = re.compile(r"\bcall\s+@([\w.$-]+)\s*\(")
_RESULT = re.compile(r"->\s*tensor<([^>]*)>")


def op_results(text: str, op: str) -> collections.Counter:
    """Result types (``"3x10xbf16"``) of every ``op`` that @main runs, with multiplicity.

    Each ``func.func`` of the module lists its own ops and the functions it
    calls; a function called twice counts twice, as it runs twice. The result
    type is the last ``-> tensor<...>`` of the op's line.
    """
    own: dict[str, collections.Counter] = {}
    calls: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        func = _FUNC.search(line)
        if func:
            name = func.group(1)
            own[name], calls[name] = collections.Counter(), []
            continue
        if name is None:
            continue
        calls[name] += _CALL.findall(line)
        if op in line:
            results = _RESULT.findall(line)
            assert results, f"no result type on the {op} line: {line.strip()}"
            own[name][results[-1].split(",")[0].strip()] += 1

    def total(f: str) -> collections.Counter:
        count = collections.Counter(own[f])
        for callee in calls[f]:
            count += total(callee)
        return count

    assert "main" in own, "no @main function in the lowered text"
    return total("main")


def element_type(result: str) -> str:
    """``"3x10xbf16"`` -> ``"bf16"``."""
    return result.split("x")[-1]


SHORT = {"bfloat16": "bf16", "float16": "f16"}


# --- the two training steps ---------------------------------------------------------

OPT = optax.sgd(0.1)


def fnbp_step(model):
    """fnbp.backprop (Algorithm 3) + an optax SGD update."""

    def step(params, state, x, y):
        J, grads = fnbp.backprop(model, fnbp.cross_entropy_loss, params, x, y)
        updates, state = OPT.update(grads, state, params)
        return optax.apply_updates(params, updates), state, J

    return step


def autodiff_step(loss):
    """jax.value_and_grad of a plain-jnp loss + the same update."""

    def step(params, state, x, y):
        J, grads = jax.value_and_grad(loss)(params, x, y)
        updates, state = OPT.update(grads, state, params)
        return optax.apply_updates(params, updates), state, J

    return step


def lowered(step, params, x, y) -> str:
    return jax.jit(step).lower(params, OPT.init(params), x, y).as_text()


def problem(model, example_shape, dtype, n=8, classes=10, seed=0):
    """float32 params from ``model.init`` cast to ``dtype``, inputs and labels."""
    _, params = model.init(jax.random.key(seed), example_shape)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    rng = np.random.default_rng(seed)
    x = normal(rng, (n,) + example_shape, dtype)
    y = jnp.asarray(rng.integers(0, classes, n), jnp.int32)
    return params, x, y


# --- plain-jnp networks (autodiff's side) ---------------------------------------------


def plain_cross_entropy(t, y):
    t_y = jnp.take_along_axis(t, y[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(t, axis=1) - t_y)


_DN = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}


def plain_conv(p, h, stride=1):
    """Channels-last convolution, "same" zero padding for odd kernels, + bias."""
    n = p["w"].ndim - 2
    pads = [((k - 1) // 2, (k - 1) // 2) for k in p["w"].shape[:n]]
    u = jax.lax.conv_general_dilated(h, p["w"], (stride,) * n, pads, dimension_numbers=_DN[n])
    return u + p["b"]


def plain_cnn2d_loss(params, x, y):
    conv, _, _, linear = params
    h = jnp.maximum(plain_conv(conv, x), 0)
    t = h.reshape(h.shape[0], -1) @ linear["W"].T + linear["b"]
    return plain_cross_entropy(t, y)


def plain_cnn1d_loss(params, x, y):
    conv1, _, conv2, _, _, linear = params
    h = jnp.maximum(plain_conv(conv1, x), 0)
    h = jnp.maximum(plain_conv(conv2, h, stride=2), 0)
    t = h.reshape(h.shape[0], -1) @ linear["W"].T + linear["b"]
    return plain_cross_entropy(t, y)


MLP = fnbp.mlp([16, 12, 10], "relu")
CNN2D = fnbp.serial(fnbp.Conv2D(4, 3), fnbp.Relu(), fnbp.Flatten(3), fnbp.Linear(10))
CNN1D = fnbp.serial(
    fnbp.Conv1D(4, 3),
    fnbp.Relu(),
    fnbp.Conv1D(6, 3, stride=2),
    fnbp.Relu(),
    fnbp.Flatten(2),
    fnbp.Linear(10),
)

NETWORKS = {
    # name: (fnbp model, per-example input shape, autodiff's plain loss)
    "mlp": (MLP, (20,), ref_loss),
    "conv2d+relu+mm": (CNN2D, (6, 6, 3), plain_cnn2d_loss),
    "conv1d+relu+conv1d+relu+mm": (CNN1D, (9, 3), plain_cnn1d_loss),
}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("network", list(NETWORKS))
def test_train_step_has_autodiffs_dots_and_convolutions(network, dtype):
    """Every dot_general and convolution of fnbp's half-precision step has the
    result type (shape and dtype) of one in autodiff's step, one for one."""
    model, example_shape, plain_loss = NETWORKS[network]
    params, x, y = problem(model, example_shape, dtype)
    ours = lowered(fnbp_step(model), params, x, y)
    theirs = lowered(autodiff_step(plain_loss), params, x, y)
    got = {}
    for op in OPS:
        got[op], want = op_results(ours, op), op_results(theirs, op)
        assert got[op] == want, f"{op} results: fnbp {dict(got[op])} != autodiff {dict(want)}"
    every = list(got[OPS[0]].elements()) + list(got[OPS[1]].elements())
    assert {element_type(r) for r in every} == {SHORT[dtype]}, got
    # at least the last MM's forward and dW; convolutions exactly in the CNNs
    assert sum(got["stablehlo.dot_general"].values()) >= 2, got
    assert (sum(got["stablehlo.convolution"].values()) > 0) == (network != "mlp"), got


def test_op_results_counts_a_function_per_call():
    """The reader counts an op inside a called function once per call, and
    takes the result type after the op's last ``->``."""
    text = """
module @m {
  func.func public @main(%arg0: tensor<2x3xbf16>) -> tensor<2x2xbf16> {
    %0 = call @f(%arg0) : (tensor<2x3xbf16>) -> tensor<2x2xbf16>
    %1 = call @f(%arg0) : (tensor<2x3xbf16>) -> tensor<2x2xbf16>
    %2 = stablehlo.convolution(%a, %b) dim_numbers = [b, 0, f]x[0, i, o]->[b, 0, f] : (tensor<1x4x1xf16>, tensor<3x1x1xf16>) -> tensor<1x4x1xf16>
    return %0 : tensor<2x2xbf16>
  }
  func.func private @f(%arg0: tensor<2x3xbf16>) -> tensor<2x2xbf16> {
    %0 = stablehlo.dot_general %arg0, %arg0, contracting_dims = [1] x [1] : (tensor<2x3xbf16>, tensor<2x3xbf16>) -> tensor<2x2xbf16>
    return %0 : tensor<2x2xbf16>
  }
}
"""
    assert op_results(text, "stablehlo.dot_general") == {"2x2xbf16": 2}
    assert op_results(text, "stablehlo.convolution") == {"1x4x1xf16": 1}
    assert element_type("2x2xbf16") == "bf16"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float32_and_float64_steps_keep_their_dtype(dtype):
    """The wide dtypes: fnbp's MLP step has autodiff's dots, in its own dtype."""
    params, x, y = problem(MLP, (20,), dtype)
    ours = lowered(fnbp_step(MLP), params, x, y)
    theirs = lowered(autodiff_step(ref_loss), params, x, y)
    got = op_results(ours, "stablehlo.dot_general")
    assert got == op_results(theirs, "stablehlo.dot_general")
    assert {element_type(r) for r in got.elements()} == {"f32" if dtype == "float32" else "f64"}


# --- numbers: long sums over examples, half results -----------------------------------


def mm_plain(z, W, *b):
    return z @ W.T + sum(b)


def conv_plain(z, w, *b):
    return plain_conv({"w": w, "b": sum(b)}, z)


conv2d_plain = conv1d_plain = conv_plain


LONG_SUMS = {
    # name: (rule, plain reference, argument shapes); the weight cotangent sums
    # over 4096 examples (mm) and 64 examples x 64 positions (conv2d).
    "mm": (fnbp.mm, mm_plain, ((4096, 8), (4, 8))),
    "conv2d": (fnbp.conv2d, conv2d_plain, ((64, 8, 8, 2), (3, 3, 2, 3))),
}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(LONG_SUMS))
def test_long_sums_with_half_results_are_within_one_ulp(name, dtype):
    """Output, dz and the weight cotangent summed over 4096 terms, all in the
    half dtype, are within eps of the float64 oracle at the same rounded
    inputs (relative to the largest entry): float32 accumulation and one
    rounding give eps / 2; a sum accumulated in bf16 would be far off."""
    rule, reference, shapes = LONG_SUMS[name]
    rng = np.random.default_rng(3)
    args = tuple(normal(rng, s, dtype) for s in shapes)
    v = normal(rng, jax.eval_shape(rule, *args).shape, dtype)
    (out, cts), (want_out, want_cts) = rule_and_oracle(rule, reference, args, v, (0, 1))
    assert [a.dtype for a in (out, *cts)] == [jnp.dtype(dtype)] * 3
    eps = float(jnp.finfo(dtype).eps)
    for what, g, w in zip(("u", "dz", "dW"), (out, *cts), (want_out, *want_cts)):
        error = rel_err(g, w)
        assert error <= eps, f"{name} {what}: relative error {error:.2e} > eps {eps:.1e}"


# --- mixed dtypes: jnp.result_type promotion, dtype in = dtype out ---------------------

MIXED = [  # (z, W or w, b or None)
    ("bfloat16", "float32", None),
    ("float32", "bfloat16", "bfloat16"),
    ("bfloat16", "bfloat16", "float32"),
    ("float16", "bfloat16", None),
    ("float32", "float64", "float32"),
]
MIXED_RULES = {
    "mm": (fnbp.mm, mm_plain, ((5, 6), (3, 6), (3,))),
    "conv1d": (fnbp.conv1d, conv1d_plain, ((2, 7, 2), (3, 2, 3), (3,))),
    "conv2d": (fnbp.conv2d, conv2d_plain, ((2, 5, 5, 2), (3, 3, 2, 3), (3,))),
}


@pytest.mark.parametrize("dtypes", MIXED, ids=lambda d: "/".join(map(str, d)))
@pytest.mark.parametrize("name", list(MIXED_RULES))
def test_mixed_dtypes_promote_and_cotangents_keep_each_dtype(name, dtypes):
    """u has dtype result_type(z, W, b) and each cotangent its argument's
    dtype; all agree with the float64 oracle within the tolerance of the
    narrowest argument dtype (a float32 product may run in TF32 on a GPU)."""
    rule, reference, shapes = MIXED_RULES[name]
    rng = np.random.default_rng(5)
    args = tuple(normal(rng, s, d) for s, d in zip(shapes, dtypes) if d is not None)
    out_dtype = jnp.result_type(*args)
    v = normal(rng, jax.eval_shape(rule, *args).shape, out_dtype)
    diff = tuple(range(len(args)))
    (out, cts), (want_out, want_cts) = rule_and_oracle(rule, reference, args, v, diff)
    assert out.dtype == out_dtype
    assert [c.dtype for c in cts] == [a.dtype for a in args]
    rtol = max(TOLERANCE[a.dtype.name] for a in args)
    assert rel_err(out, want_out) <= rtol
    for arg, got, want in zip(args, cts, want_cts):
        assert rel_err(got, want) <= rtol, arg.dtype
