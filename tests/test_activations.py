"""Element-wise activations: every rule against autodiff of a plain reference.

The references below are written independently of fnbp (the exact GELU as
z Phi(z) with Phi from jax.scipy.stats, tanh from exponentials, softmax from
its definition), with the same kink conventions: relu'(0) = 0,
leaky_relu'(0) = gamma, elu'(0) = alpha. Every drawn z holds an exact 0 per
example, so the kinks are exercised by every contract test.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import Case, RuleContract, jit_cotangents

import fnbp


def relu_ref(z):
    return jnp.where(z > 0, z, 0.0)


def sigmoid_ref(z):
    return 1.0 / (1.0 + jnp.exp(-z))


def tanh_ref(z):
    return (jnp.exp(z) - jnp.exp(-z)) / (jnp.exp(z) + jnp.exp(-z))


def leaky_relu_ref(z, gamma):
    return jnp.where(z > 0, z, gamma * z)


def gelu_ref(z):
    return z * jax.scipy.stats.norm.cdf(z)


def gelu_tanh_ref(z):
    return 0.5 * z * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


def softplus_ref(z, beta):
    return jnp.log1p(jnp.exp(beta * z)) / beta


def silu_ref(z):
    return z / (1.0 + jnp.exp(-z))


def elu_ref(z, alpha):
    return jnp.where(z > 0, z, alpha * (jnp.exp(z) - 1.0))


def softmax_ref(z):
    e = jnp.exp(z)  # the draws are small: no shift needed in float64
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _z(rng, dtype, batch):
    """Five entries per example, the first exactly 0 (the kink)."""
    z = 2.0 * rng.standard_normal(batch + (5,))
    z[..., 0] = 0.0
    return jnp.asarray(z, dtype)


def _z_and(value):
    def make(rng, dtype, batch):
        return _z(rng, dtype, batch), jnp.asarray(value, dtype)

    return make


def _z_only(rng, dtype, batch):
    return (_z(rng, dtype, batch),)


CASES = [
    Case("relu", fnbp.relu, relu_ref, _z_only),
    Case("sigmoid", fnbp.sigmoid, sigmoid_ref, _z_only),
    Case("tanh", fnbp.tanh, tanh_ref, _z_only),
    Case("leaky_relu", fnbp.leaky_relu, leaky_relu_ref, _z_and(0.1), diff=(0, 1), shared=(1,)),
    Case("gelu", fnbp.gelu, gelu_ref, _z_only),
    Case(
        "gelu(approximate)", functools.partial(fnbp.gelu, approximate=True), gelu_tanh_ref, _z_only
    ),
    Case("softplus", fnbp.softplus, softplus_ref, _z_and(1.7), diff=(0, 1), shared=(1,)),
    Case("silu", fnbp.silu, silu_ref, _z_only),
    Case("elu", fnbp.elu, elu_ref, _z_and(0.6), diff=(0, 1), shared=(1,)),
    Case("elu(alpha=1)", fnbp.elu, elu_ref, _z_and(1.0), diff=(0, 1), shared=(1,)),
    Case("softmax", fnbp.softmax, softmax_ref, _z_only),
]
# Every declared activation, by name (the registry's list, not one kept here).
ACTIVATIONS = {
    name: rule.function
    for name, rule in fnbp.rules.registry().items()
    if rule.family == "activation"
}


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param


class TestActivationContract(RuleContract):
    pass


# --- kinks -------------------------------------------------------------------------


KINK_Z = jnp.array([-1.0, 0.0, 2.0])
KINK_V = jnp.array([3.0, 5.0, 7.0])


def test_relu_derivative_at_zero_is_zero():
    assert jax.grad(fnbp.relu)(0.0) == 0.0 == jax.grad(jax.nn.relu)(0.0)
    _, (dz,) = jit_cotangents(fnbp.relu, (KINK_Z,), KINK_V, (0,))
    np.testing.assert_array_equal(dz, [0.0, 0.0, 7.0])
    (dz,) = fnbp.rules.relu_bwd(
        fnbp.rules.relu_fwd(KINK_Z)[1], KINK_V
    )  # B[relu, z] called directly
    np.testing.assert_array_equal(dz, [0.0, 0.0, 7.0])


@pytest.mark.parametrize("gamma", [0.01, 0.3])
def test_leaky_relu_derivative_at_zero_is_gamma(gamma):
    assert jax.grad(fnbp.leaky_relu)(0.0, gamma) == np.float64(gamma)
    _, (dz, _) = jit_cotangents(fnbp.leaky_relu, (KINK_Z, jnp.asarray(gamma)), KINK_V, (0, 1))
    np.testing.assert_allclose(dz, [3.0 * gamma, 5.0 * gamma, 7.0], rtol=1e-15)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_elu_derivative_at_zero_is_alpha(alpha):
    assert jax.grad(fnbp.elu)(0.0, alpha) == np.float64(alpha) == jax.grad(jax.nn.elu)(0.0, alpha)
    _, (dz, _) = jit_cotangents(fnbp.elu, (KINK_Z, jnp.asarray(alpha)), KINK_V, (0, 1))
    np.testing.assert_allclose(dz, [3.0 * alpha * math.exp(-1.0), 5.0 * alpha, 7.0], rtol=1e-15)


def test_elu_alpha_cotangent_sums_the_nonpositive_side():
    """d alpha = sum of where(z > 0, 0, e^z - 1) v."""
    _, (_, dalpha) = jit_cotangents(fnbp.elu, (KINK_Z, jnp.asarray(0.5)), KINK_V, (0, 1))
    np.testing.assert_allclose(dalpha, 3.0 * math.expm1(-1.0), rtol=1e-15)


def test_softmax_backward_is_s_times_v_minus_its_mean_under_s():
    """B[softmax, z](v) = s (.) (v - <s, v>); a constant v has zero cotangent."""
    z = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.5, -1.0]])
    v = jnp.array([[1.0, -2.0, 0.5], [4.0, 4.0, 4.0]])
    s, res = fnbp.rules.softmax_fwd(z)
    (dz,) = fnbp.rules.softmax_bwd(res, v)
    s_np, v_np = np.asarray(s), np.asarray(v)
    want = s_np * (v_np - np.sum(s_np * v_np, axis=-1, keepdims=True))
    np.testing.assert_allclose(dz, want, rtol=1e-15)
    np.testing.assert_allclose(dz[1], 0.0, atol=1e-15)
    np.testing.assert_allclose(np.sum(s_np, axis=-1), 1.0, rtol=1e-15)


def test_leaky_relu_gamma_cotangent_sums_nonpositive_entries():
    """d gamma = sum of where(z > 0, 0, z) v: the slope is learnable (PReLU)."""
    _, (_, dgamma) = jit_cotangents(fnbp.leaky_relu, (KINK_Z, jnp.asarray(0.2)), KINK_V, (0, 1))
    assert dgamma == -1.0 * 3.0 + 0.0 * 5.0


# --- stability ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softplus_and_sigmoid_are_finite_for_large_inputs(dtype):
    z = jnp.array([-1e4, 1e4], dtype)

    @jax.jit
    def values_and_slopes(z):
        rules = (lambda z: fnbp.softplus(z, 2.0), fnbp.sigmoid, fnbp.silu)
        return ([f(z) for f in rules], [jax.vjp(f, z)[1](jnp.ones_like(z))[0] for f in rules])

    values, slopes = values_and_slopes(z)
    np.testing.assert_array_equal(values[0], [0.0, 1e4])  # softplus, beta = 2
    np.testing.assert_array_equal(slopes[0], [0.0, 1.0])
    np.testing.assert_array_equal(values[1], [0.0, 1.0])  # sigmoid
    np.testing.assert_array_equal(slopes[1], [0.0, 0.0])
    np.testing.assert_array_equal(values[2], [0.0, 1e4])  # silu
    np.testing.assert_array_equal(slopes[2], [0.0, 1.0])


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_softmax_is_stable_for_large_logits(dtype):
    z = jnp.array([[1e4, 0.0, -1e4], [6e4, 6e4, 0.0]], dtype)
    s, (dz,) = jit_cotangents(fnbp.softmax, (z,), jnp.array([[1.0, 0.0, 0.0]] * 2, dtype), (0,))
    np.testing.assert_array_equal(s, np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype))
    np.testing.assert_array_equal(dz, np.array([[0.0, 0.0, 0.0], [0.25, -0.25, 0.0]], dtype))


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("bad", [jnp.arange(3), jnp.ones(3, jnp.complex64)], ids=["int", "complex"])
def test_activation_rejects_non_float_z(name, bad):
    with pytest.raises(
        TypeError,
        match=rf"^{name}: z has dtype {bad.dtype}, but a real "
        r"floating dtype is needed .* z\.astype\(jnp\.float32\)",
    ):
        ACTIVATIONS[name](bad)


@pytest.mark.parametrize("gamma", [0.0, 1.0, -0.5, 1.5, 1])
@pytest.mark.parametrize("as_array", [False, True])
def test_leaky_relu_rejects_gamma_outside_open_unit_interval(gamma, as_array):
    if as_array:
        gamma = jnp.asarray(float(gamma))
    with pytest.raises(
        ValueError,
        match=r"^leaky_relu: gamma must lie in the open interval "
        rf"\(0\.0, 1\.0\), got {float(gamma)}$",
    ):
        fnbp.leaky_relu(jnp.ones(3), gamma)


def test_leaky_relu_rejects_non_scalar_gamma():
    with pytest.raises(
        ValueError,
        match=r"^leaky_relu: gamma must be a scalar, "
        r"got gamma\.shape=\(2,\)$",
    ):
        fnbp.leaky_relu(jnp.ones(3), jnp.array([0.1, 0.2]))


def test_leaky_relu_rejects_integer_gamma_array():
    with pytest.raises(TypeError, match=r"^leaky_relu: gamma has dtype int"):
        fnbp.leaky_relu(jnp.ones(3), jnp.asarray(0))


def test_softmax_rejects_a_scalar():
    with pytest.raises(
        ValueError,
        match=r"^softmax: z must have at least 1 axes \(\.\.\., k\): "
        r"the last axis is normalized, got z\.shape=\(\)$",
    ):
        fnbp.softmax(jnp.asarray(1.0))


@pytest.mark.parametrize("value", [0.0, -1.0, 0])
@pytest.mark.parametrize("rule, setting", [("softplus", "beta"), ("elu", "alpha")])
def test_positive_setting_rejects_nonpositive_values(rule, setting, value):
    with pytest.raises(ValueError, match=rf"^{rule}: {setting} must be > 0, got {float(value)}$"):
        getattr(fnbp, rule)(jnp.ones(3), value)


def test_softplus_rejects_non_scalar_beta():
    with pytest.raises(
        ValueError,
        match=r"^softplus: beta must be a scalar, "
        r"got beta\.shape=\(1, 2\)$",
    ):
        fnbp.softplus(jnp.ones(3), jnp.ones((1, 2)))


@pytest.mark.parametrize("approximate", ["yes", 1, 0, None, np.bool_(True)])
def test_gelu_rejects_non_bool_approximate(approximate):
    kind = type(approximate).__name__
    with pytest.raises(
        TypeError,
        match=r"^gelu: approximate must be a Python bool "
        rf"\(a static setting\), got {kind}$",
    ):
        fnbp.gelu(jnp.ones(3), approximate)


# --- infinities and NaN ------------------------------------------------------------------

# name: (f(-inf), f(inf), f'(-inf), f'(inf)), the limits; f(NaN) is NaN for all.
LIMITS = {
    "relu": (0.0, np.inf, 0.0, 1.0),
    "sigmoid": (0.0, 1.0, 0.0, 0.0),
    "tanh": (-1.0, 1.0, 0.0, 0.0),
    "leaky_relu": (-np.inf, np.inf, 0.01, 1.0),
    "gelu": (0.0, np.inf, 0.0, 1.0),
    "softplus": (0.0, np.inf, 0.0, 1.0),
    "silu": (0.0, np.inf, 0.0, 1.0),
    "elu": (-1.0, np.inf, 0.0, 1.0),
}
SMOOTH = ("sigmoid", "tanh", "gelu", "softplus", "silu")  # f'(NaN) is NaN too
ELEMENTWISE_AT_INF = {
    **{name: ACTIVATIONS[name] for name in LIMITS},
    "gelu(approximate)": functools.partial(fnbp.gelu, approximate=True),
}


@jax.jit
def _at_specials(z):
    out = {}
    for name, f in ELEMENTWISE_AT_INF.items():
        u, pull = jax.vjp(f, z)
        out[name] = (u, pull(jnp.ones_like(u))[0])
    return out


def test_every_elementwise_activation_has_its_limits_listed():
    assert set(LIMITS) == set(ACTIVATIONS) - {"softmax"}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_activations_take_their_limits_at_infinity_and_nan_stays_nan(dtype):
    """f(+-inf) and f'(+-inf) are the limits where they exist (gelu(-inf) = 0,
    gelu'(inf) = 1, silu likewise), never inf * 0 = NaN; NaN in is NaN out
    (and a NaN slope for the smooth rules)."""
    got = _at_specials(jnp.asarray([-np.inf, np.inf, np.nan], dtype))
    for name, (u, du) in got.items():
        f_lo, f_hi, d_lo, d_hi = LIMITS[name.split("(")[0]]
        u, du = np.asarray(u, np.float64), np.asarray(du, np.float64)
        np.testing.assert_array_equal(u[:2], [f_lo, f_hi], err_msg=name)
        np.testing.assert_allclose(du[:2], [d_lo, d_hi], rtol=1e-2, err_msg=name)
        assert np.isnan(u[2]), name
        if name.split("(")[0] in SMOOTH:
            assert np.isnan(du[2]), name


def test_softmax_with_minus_infinity_and_nan():
    """A -inf logit has probability 0; a NaN logit makes its example NaN, not finite."""
    s = jax.jit(fnbp.softmax)(jnp.asarray([[-np.inf, 0.0, 0.0], [np.nan, 0.0, 1.0]]))
    np.testing.assert_array_equal(s[0], [0.0, 0.5, 0.5])
    assert np.all(np.isnan(s[1]))


# --- arrays given as lists, tuples, NumPy arrays, numbers ------------------------------------


def test_activations_take_lists_tuples_numpy_arrays_and_numbers():
    want = fnbp.relu(jnp.asarray([1.0, -2.0]))
    for given in ([1.0, -2.0], (1.0, -2.0), np.array([1.0, -2.0])):
        np.testing.assert_array_equal(fnbp.relu(given), want)
    assert float(fnbp.relu(-2.0)) == 0.0 and float(fnbp.gelu(0.0)) == 0.0
    np.testing.assert_array_equal(fnbp.leaky_relu([[-1.0, 2.0]], np.float64(0.5)), [[-0.5, 2.0]])
    np.testing.assert_array_equal(fnbp.softmax([[0.0, 0.0]]), [[0.5, 0.5]])


@pytest.mark.parametrize(
    "bad, seen, error",
    [
        (
            [[1.0, 2.0], [3.0]],
            r"a ragged list \(its entries have different lengths or shapes\); "
            r"give every row the same length",
            ValueError,
        ),
        ("1.5", r"a string '1\.5'; pass its numbers as an array", TypeError),
        (
            [1.0, None],
            r"a list holding non-numbers \(NumPy reads it as dtype object\); pass its "
            r"numbers as an array",
            TypeError,
        ),
        (None, r"None; pass its numbers as an array", TypeError),
        ({"z": 1.0}, r"an object of type dict; pass its numbers as an array", TypeError),
    ],
    ids=["ragged", "string", "mixed", "None", "dict"],
)
def test_activation_refuses_what_is_not_an_array(bad, seen, error):
    with pytest.raises(
        error,
        match=r"^gelu: z must be an array \(a JAX or NumPy array, a "
        r"Python number, or a nested list or tuple of numbers of "
        rf"one rectangular shape\), got {seen}$",
    ):
        fnbp.gelu(bad)


def test_activation_setting_given_as_a_ragged_list_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^elu: alpha must be an array .*, got a ragged list"):
        fnbp.elu(jnp.ones(3), [[1.0], [1.0, 2.0]])
