"""The mutation suite: deliberately broken custom_vjp rules that check_vjp must catch.

Each mutant is a small ``jax.custom_vjp`` rule written here with one bug, next
to a plain-jnp reference written here too. For each one the report must fail,
and its failing rows must name the right argument and transform (and oracle):
``MUTANTS`` lists, per mutant, the rows that must fail and the transforms the
bug may show under. Bugs that only show under one transform (vmap, second
order, the fwd rule's output) are checked against the rest of the matrix, so
the report points there and nowhere else.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnbp.verify import TRANSFORMS, check_vjp
from fnbp.verify.mutants import sin_wrong_under_vmap

RNG = np.random.default_rng(7)


def normal(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


def rule(primal: Callable, fwd: Callable, bwd: Callable, nondiff_argnums=()) -> Any:
    """A custom_vjp function from its primal, fwd and bwd."""
    f = jax.custom_vjp(primal, nondiff_argnums=nondiff_argnums)
    f.defvjp(fwd, bwd)
    return f


# --- plain references (autodiff of these is the oracle) ------------------------------


def ref_mm(z, W, b):
    return z @ W.T + b


def ref_sigmoid(z):
    return 1.0 / (1.0 + jnp.exp(-z))


def ref_relu(z):
    return jnp.where(z > 0, z, 0.0)


def ref_cross_entropy(t, y):
    log_p = t - jax.scipy.special.logsumexp(t, axis=-1, keepdims=True)
    return -jnp.take_along_axis(log_p, y[..., None], axis=-1)[..., 0]


def ref_logistic(t, y):
    return jnp.logaddexp(0.0, t) - y * t


def sin(z):
    return jnp.sin(z)


def tanh(z):
    return jnp.tanh(z)


# --- the mutants --------------------------------------------------------------------


def _mm_fwd(z, W, b):
    return z @ W.T + b, (z, W)


def mm_dropped_transpose():
    # B[MM, z](v) = W^T v; the bug computes W v (W is square, so shapes still match).
    def bwd(res, v):
        z, W = res
        return v @ W.T, v.T @ z, v.sum(0)

    return rule(lambda z, W, b: z @ W.T + b, _mm_fwd, bwd)


def mm_weight_not_summed():
    # dW = sum over examples of v z^T; the bug keeps the first example only.
    def bwd(res, v):
        z, W = res
        return v @ W, jnp.outer(v[0], z[0]), v.sum(0)

    return rule(lambda z, W, b: z @ W.T + b, _mm_fwd, bwd)


def mm_bias_mean():
    # db = sum over examples of v; the bug averages them.
    def bwd(res, v):
        z, W = res
        return v @ W, v.T @ z, v.mean(0)

    return rule(lambda z, W, b: z @ W.T + b, _mm_fwd, bwd)


def mm_bias_keepdims():
    # db comes back with shape (1, n): JAX itself rejects it, the report says where.
    def bwd(res, v):
        z, W = res
        return v @ W, v.T @ z, v.sum(0, keepdims=True)

    return rule(lambda z, W, b: z @ W.T + b, _mm_fwd, bwd)


def sigmoid_missing_factor():
    # sigma' = s (1 - s); the bug drops (1 - s).
    return rule(ref_sigmoid, lambda z: (ref_sigmoid(z), ref_sigmoid(z)), lambda s, v: (s * v,))


def tanh_wrong_sign():
    return rule(tanh, lambda z: (jnp.tanh(z), jnp.tanh(z)), lambda y, v: ((y * y - 1) * v,))


def relu_wrong_kink():
    # The convention (and the reference's) is relu'(0) = 0; the bug uses z >= 0.
    return rule(
        ref_relu, lambda z: (ref_relu(z), z >= 0), lambda mask, v: (jnp.where(mask, v, 0.0),)
    )


def square_wrong_dtype():
    # The cotangent of a float64 z comes back as float32.
    return rule(
        lambda z: z * z, lambda z: (z * z, z), lambda z, v: ((2 * z * v).astype(jnp.float32),)
    )


def sin_nonlinear_in_v():
    return rule(sin, lambda z: (jnp.sin(z), jnp.cos(z)), lambda c, v: (c * v * jnp.abs(v),))


def sin_affine_in_v():
    # Linear plus a constant: B(0) != 0.
    return rule(sin, lambda z: (jnp.sin(z), jnp.cos(z)), lambda c, v: (c * v + 1e-3,))


def sin_fwd_differs():
    # The fwd rule's primal output is not f's; B itself is right.
    return rule(sin, lambda z: (jnp.sin(z) + 1e-3, jnp.cos(z)), lambda c, v: (c * v,))


def sigmoid_bug_at_second_order():
    # The residual s depends on z, but stop_gradient hides that from the 2nd order.
    def bwd(s, v):
        s = jax.lax.stop_gradient(s)
        return (s * (1 - s) * v,)

    return rule(ref_sigmoid, lambda z: (ref_sigmoid(z), ref_sigmoid(z)), bwd)


def softmax_ignores_label():
    def fwd(t, y):
        return ref_cross_entropy(t, y), (jax.nn.softmax(t, axis=-1), y)

    def bwd(res, v):
        p, y = res
        return p * v[..., None], None  # the bug: softmax(t) v, without - e_y

    return rule(ref_cross_entropy, fwd, bwd)


def logistic_label_sign():
    # B[J, y](v) = -t v; the bug returns t v.
    def fwd(t, y):
        return ref_logistic(t, y), (t, y)

    def bwd(res, v):
        t, y = res
        return (ref_sigmoid(t) - y) * v, t * v

    return rule(ref_logistic, fwd, bwd)


def leaky_relu_dropped_gamma():
    # gamma is differentiable; the bug drops its cotangent.
    def primal(z, gamma):
        return jnp.where(z > 0, z, gamma * z)

    def bwd(res, v):
        z, gamma = res
        return jnp.where(z > 0, v, gamma * v), jnp.zeros_like(gamma)

    return rule(primal, lambda z, gamma: (primal(z, gamma), (z, gamma)), bwd)


def layer_norm_s_ignores_mean():
    # LN-S(z) = (z - mu) / sigma; the bug forgets that mu depends on z.
    def primal(z):
        mu = z.mean(-1, keepdims=True)
        sigma = jnp.sqrt(((z - mu) ** 2).mean(-1, keepdims=True))
        return (z - mu) / sigma

    def fwd(z):
        u = primal(z)
        mu = z.mean(-1, keepdims=True)
        return u, (u, jnp.sqrt(((z - mu) ** 2).mean(-1, keepdims=True)))

    def bwd(res, v):
        u, sigma = res
        return ((v - (v * u).mean(-1, keepdims=True) * u) / sigma,)

    return rule(primal, fwd, bwd)


def dense_params_bias_bug():
    # A pytree argument: params = {"w": (n, m), "b": (n,)}; db is scaled by 2.
    def primal(params, z):
        return z @ params["w"].T + params["b"]

    def bwd(res, v):
        params, z = res
        return {"w": v.T @ z, "b": 2 * v.sum(0)}, v @ params["w"]

    return rule(primal, lambda params, z: (primal(params, z), (params, z)), bwd)


def gelu_tanh_bug_only_when_approximate():
    # A static setting through nondiff_argnums: approximate=True uses the exact slope.
    k, c = np.sqrt(2 / np.pi), 0.044715

    def primal(z, approximate):
        if approximate:
            return 0.5 * z * (1 + jnp.tanh(k * (z + c * z**3)))
        return 0.5 * z * (1 + jax.scipy.special.erf(z / np.sqrt(2)))

    def bwd(approximate, z, v):
        cdf = 0.5 * (1 + jax.scipy.special.erf(z / np.sqrt(2)))
        return ((cdf + z * jnp.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)) * v,)

    return rule(
        primal, lambda z, approximate: (primal(z, approximate), z), bwd, nondiff_argnums=(1,)
    )


def ref_gelu(z, approximate):
    if approximate:
        return 0.5 * z * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    return 0.5 * z * (1 + jax.scipy.special.erf(z / np.sqrt(2)))


def sin_nondeterministic():
    # The backward function adds noise from the host: two runs differ.
    def noisy(c):
        return jax.pure_callback(
            lambda x: np.asarray(
                x + 1e-6 * np.random.default_rng().standard_normal(x.shape), dtype=x.dtype
            ),
            jax.ShapeDtypeStruct(c.shape, c.dtype),
            c,
        )

    return rule(sin, lambda z: (jnp.sin(z), jnp.cos(z)), lambda c, v: (noisy(c) * v,))


# --- the table ----------------------------------------------------------------------

FIRST = ("jit",)


@dataclass(frozen=True)
class Mutant:
    """A broken rule, where to check it, and what the report must say.

    ``fails``: (argument, transform, oracle) rows that must fail.
    ``only``: the transforms the bug may show under (None: any); every
    failing row must name one of ``arguments``.
    """

    name: str
    make: Callable[[], Any]
    args: Callable[[], tuple]
    reference: Callable | None
    fails: tuple[tuple[str, str, str], ...]
    arguments: tuple[str, ...]
    transforms: tuple[str, ...] = FIRST
    only: tuple[str, ...] | None = None
    static_kwargs: dict = field(default_factory=dict)


def _mm_args():
    return normal(4, 3), normal(3, 3), normal(3)


def _away_from_zero(*shape):
    x = normal(*shape)
    return np.where(np.abs(x) < 0.1, 0.5, x)


MUTANTS = (
    Mutant(
        "mm dropped transpose",
        mm_dropped_transpose,
        _mm_args,
        ref_mm,
        (("z", "jit", "reference"), ("z", "jit", "finite diff")),
        ("z",),
    ),
    Mutant(
        "mm weight cotangent not summed over examples",
        mm_weight_not_summed,
        _mm_args,
        ref_mm,
        (("W", "jit", "reference"), ("W", "jit", "finite diff")),
        ("W",),
    ),
    Mutant(
        "mm bias reduced with a mean",
        mm_bias_mean,
        _mm_args,
        ref_mm,
        (("b", "jit", "reference"), ("b", "jit", "finite diff")),
        ("b",),
    ),
    Mutant(
        "mm bias cotangent of the wrong shape",
        mm_bias_keepdims,
        _mm_args,
        ref_mm,
        (("b", "jit", "runs"),),
        ("b",),
    ),
    Mutant(
        "sigmoid missing factor",
        sigmoid_missing_factor,
        lambda: (normal(3, 4),),
        ref_sigmoid,
        (("z", "jit", "reference"), ("z", "jit", "finite diff")),
        ("z",),
    ),
    Mutant(
        "tanh wrong sign",
        tanh_wrong_sign,
        lambda: (normal(3, 4),),
        tanh,
        (("z", "jit", "reference"), ("z", "jit", "finite diff")),
        ("z",),
    ),
    Mutant(
        "relu wrong kink value",
        relu_wrong_kink,
        lambda: (np.array([-1.5, 0.0, 0.7, 0.0, 2.0, -0.3]),),
        ref_relu,
        (("z", "jit", "reference"),),
        ("z",),
    ),
    Mutant(
        "cotangent of the wrong dtype",
        square_wrong_dtype,
        lambda: (normal(5),),
        lambda z: z * z,
        (("z", "jit", "shape/dtype"),),
        ("z",),
    ),
    Mutant(
        "backward nonlinear in v",
        sin_nonlinear_in_v,
        lambda: (normal(5),),
        sin,
        (("z", "jit", "linearity"), ("z", "jit", "reference")),
        ("z",),
    ),
    Mutant(
        "backward not zero at v = 0",
        sin_affine_in_v,
        lambda: (normal(5),),
        sin,
        (("z", "jit", "zero v"), ("z", "jit", "linearity")),
        ("z",),
    ),
    Mutant(
        "fwd output differs from f",
        sin_fwd_differs,
        lambda: (normal(5),),
        sin,
        (("(output)", "jit", "primal"),),
        ("(output)",),
        TRANSFORMS,
        ("jit",),
    ),
    Mutant(
        "bug only under vmap",
        sin_wrong_under_vmap,
        lambda: (normal(2, 3),),
        sin,
        (
            ("z", "vmap", "loop"),
            ("z", "jit(vmap)", "loop"),
            ("z", "vmap(inputs)", "loop"),
            ("z", "jit(vmap(inputs))", "loop"),
        ),
        ("z",),
        TRANSFORMS,
        ("vmap", "jit(vmap)", "vmap(inputs)", "jit(vmap(inputs))"),
    ),
    Mutant(
        "bug only at second order",
        sigmoid_bug_at_second_order,
        lambda: (normal(3, 4),),
        ref_sigmoid,
        (("z", "2nd order", "reference"), ("z", "2nd order", "finite diff")),
        ("z",),
        TRANSFORMS,
        ("2nd order",),
    ),
    Mutant(
        "softmax rule ignores the label",
        softmax_ignores_label,
        lambda: (normal(4, 5), np.array([0, 3, 1, 4])),
        ref_cross_entropy,
        (("t", "jit", "reference"), ("t", "jit", "finite diff")),
        ("t",),
    ),
    Mutant(
        "logistic label cotangent of the wrong sign",
        logistic_label_sign,
        lambda: (normal(6), RNG.uniform(size=6)),
        ref_logistic,
        (("y", "jit", "reference"), ("y", "jit", "finite diff")),
        ("y",),
    ),
    Mutant(
        "leaky relu drops the gamma cotangent",
        leaky_relu_dropped_gamma,
        lambda: (_away_from_zero(3, 4), np.array(0.1)),
        lambda z, gamma: jnp.where(z > 0, z, gamma * z),
        (("gamma", "jit", "reference"), ("gamma", "jit", "finite diff")),
        ("gamma",),
    ),
    Mutant(
        "layer norm ignores that the mean depends on z",
        layer_norm_s_ignores_mean,
        lambda: (normal(3, 5),),
        lambda z: (z - z.mean(-1, keepdims=True)) / z.std(-1, keepdims=True),
        (("z", "jit", "reference"), ("z", "jit", "finite diff")),
        ("z",),
    ),
    Mutant(
        "pytree parameter with a wrong bias cotangent",
        dense_params_bias_bug,
        lambda: ({"w": normal(3, 4), "b": normal(3)}, normal(5, 4)),
        lambda params, z: z @ params["w"].T + params["b"],
        (("params", "jit", "reference"), ("params", "jit", "finite diff")),
        ("params",),
    ),
    Mutant(
        "bug only with approximate=True (a static setting)",
        gelu_tanh_bug_only_when_approximate,
        lambda: (normal(3, 4),),
        ref_gelu,
        (("z", "jit", "reference"), ("z", "jit", "finite diff")),
        ("z",),
        static_kwargs={"approximate": True},
    ),
    Mutant(
        "nondeterministic backward",
        sin_nondeterministic,
        lambda: (normal(5),),
        sin,
        (("z", "jit", "rerun"),),
        ("z",),
    ),
)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_check_vjp_catches_the_mutant(mutant: Mutant):
    report = check_vjp(
        mutant.make(),
        *mutant.args(),
        reference=mutant.reference,
        static_kwargs=mutant.static_kwargs,
        transforms=mutant.transforms,
    )
    failing = {(row.argument, row.transform, row.oracle) for row in report.failures}
    assert not report.ok
    assert set(mutant.fails) <= failing, str(report)
    assert {argument for argument, _, _ in failing} <= set(mutant.arguments), str(report)
    if mutant.only is not None:
        assert {transform for _, transform, _ in failing} <= set(mutant.only), str(report)
    argument, transform, oracle = mutant.fails[0]
    with pytest.raises(
        AssertionError,
        match=re.escape(f"argument {argument!r}, transform {transform!r}, oracle {oracle!r}"),
    ):
        report.assert_ok()


def test_mutation_suite_covers_at_least_15_bugs():
    assert len(MUTANTS) >= 15
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)


def test_the_fixed_rules_pass():
    # Not false alarms: the same wiring with the bug fixed passes the same matrix.
    def mm_bwd(res, v):
        z, W = res
        return v @ W, v.T @ z, v.sum(0)

    fixed = rule(lambda z, W, b: z @ W.T + b, _mm_fwd, mm_bwd)
    check_vjp(fixed, *_mm_args(), reference=ref_mm).assert_ok()

    def sigmoid_bwd(s, v):
        return (s * (1 - s) * v,)

    fixed = rule(ref_sigmoid, lambda z: (ref_sigmoid(z), ref_sigmoid(z)), sigmoid_bwd)
    check_vjp(
        fixed, normal(3, 4), reference=ref_sigmoid, transforms=("jit", "2nd order")
    ).assert_ok()


def test_wrong_kink_value_is_not_blamed_on_finite_differences():
    # At z = 0 central differences see a kink: they leave it out, the reference decides.
    report = check_vjp(
        relu_wrong_kink(),
        np.array([-1.5, 0.0, 0.7, 0.0, 2.0, -0.3]),
        reference=ref_relu,
        transforms=FIRST,
    )
    fd = [row for row in report.rows if row.oracle == "finite diff"]
    assert fd and all(row.passed and "kink" in row.note for row in fd)
    reference = next(r for r in report.failures if r.oracle == "reference")
    assert "kink" in reference.note
    assert re.match(r"\[(1|3)\]", reference.worst_index)  # an entry where z = 0


def test_pytree_failure_names_the_leaf():
    report = check_vjp(
        dense_params_bias_bug(),
        {"w": normal(3, 4), "b": normal(3)},
        normal(5, 4),
        reference=lambda p, z: z @ p["w"].T + p["b"],
        transforms=FIRST,
    )
    row = next(r for r in report.failures if r.oracle == "reference")
    assert row.worst_index.startswith("['b']")


def test_wrong_shape_error_names_the_argument():
    # Only fnbp's own words are matched: its account of the bwd output, not JAX's message.
    report = check_vjp(mm_bias_keepdims(), *_mm_args(), reference=ref_mm, transforms=FIRST)
    row = next(r for r in report.failures if r.oracle == "runs")
    assert row.argument == "b"
    assert row.diagnosis == (
        "the bwd rule returns a cotangent of shape (1, 3) for b of shape "
        "(3,); return one of shape (3,)"
    )
    assert re.search(r"at .*test_verify_mutations\.py:\d+; raised \w+: \S", row.note)
    assert [r.oracle for r in report.failures if not r.compared] == ["runs"]  # one row


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mutants_are_caught_at_low_precision(dtype):
    # A wrong factor of (1 - s) is far outside every dtype's tolerance.
    z = jnp.asarray(normal(3, 4), dtype)
    report = check_vjp(sigmoid_missing_factor(), z, reference=ref_sigmoid, transforms=FIRST)
    assert report.dtype == dtype
    failing = {(r.argument, r.oracle) for r in report.failures}
    assert {("z", "reference"), ("z", "finite diff")} <= failing


def test_partial_binds_a_static_setting_like_static_kwargs():
    f = functools.partial(gelu_tanh_bug_only_when_approximate(), approximate=True)
    report = check_vjp(
        f, normal(3, 4), reference=functools.partial(ref_gelu, approximate=True), transforms=FIRST
    )
    assert ("z", "jit", "reference") in {
        (r.argument, r.transform, r.oracle) for r in report.failures
    }
    exact = check_vjp(
        gelu_tanh_bug_only_when_approximate(),
        normal(3, 4),
        reference=ref_gelu,
        static_kwargs={"approximate": False},
        transforms=FIRST,
    )
    exact.assert_ok()
