"""Layer norm LN-S, LN (eqs. 7.40-7.42) and RMSNorm against autodiff of plain references.

The references below write the notes' formulas directly (mean, biased variance,
square root), independently of fnbp; their autodiff is the oracle. The whole
rule contract of ``_oracle.RuleContract`` runs for every case, eps included as
a differentiable argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import (
    Case,
    RuleContract,
    assert_batch_vjp_equals_reference_float64,
    assert_close,
    normal,
    rel_err,
)

import fnbp

M = 6  # features per example


# --- independent references ----------------------------------------------------------


def ln_s_ref(z, eps):
    m = z.shape[-1]
    mu = jnp.sum(z, axis=-1, keepdims=True) / m
    var = jnp.sum((z - mu) ** 2, axis=-1, keepdims=True) / m
    return (z - mu) / jnp.sqrt(var + eps)


def ln_ref(z, gamma, beta, eps):
    return beta + gamma * ln_s_ref(z, eps)


def rms_ref(z, gamma, eps):
    return gamma * z / jnp.sqrt(jnp.sum(z * z, axis=-1, keepdims=True) / z.shape[-1] + eps)


# --- cases -----------------------------------------------------------------------------


def _z(rng, dtype, batch):
    return normal(rng, batch + (M,), dtype, scale=2.0) + jnp.asarray(0.5, dtype)


def _ln_s_args(eps):
    def make(rng, dtype, batch):
        return _z(rng, dtype, batch), jnp.asarray(eps, dtype)

    return make


def _ln_args(gamma_shape, beta_shape):
    def make(rng, dtype, batch):
        gamma = normal(rng, gamma_shape, dtype) + jnp.asarray(1.0, dtype)
        beta = normal(rng, beta_shape, dtype)
        return _z(rng, dtype, batch), gamma, beta, jnp.asarray(0.2, dtype)

    return make


def _rms_args(gamma_shape):
    def make(rng, dtype, batch):
        gamma = normal(rng, gamma_shape, dtype) + jnp.asarray(1.0, dtype)
        return _z(rng, dtype, batch), gamma, jnp.asarray(0.3, dtype)

    return make


CASES = [
    Case("layer_norm_s", fnbp.layer_norm_s, ln_s_ref, _ln_s_args(0.1), diff=(0, 1), shared=(1,)),
    Case(
        "layer_norm(vector gamma, scalar beta)",
        fnbp.layer_norm,
        ln_ref,
        _ln_args((M,), ()),
        diff=(0, 1, 2, 3),
        shared=(1, 2, 3),
    ),
    Case(
        "rms_norm(vector gamma)",
        fnbp.rms_norm,
        rms_ref,
        _rms_args((M,)),
        diff=(0, 1, 2),
        shared=(1, 2),
    ),
]
# More settings against the float64 oracle (the full contract runs for CASES).
SETTINGS = [
    Case(
        "layer_norm_s(eps=0)",
        fnbp.layer_norm_s,
        ln_s_ref,
        _ln_s_args(0.0),
        diff=(0, 1),
        shared=(1,),
    ),
    Case(
        "layer_norm(scalar gamma, vector beta)",
        fnbp.layer_norm,
        ln_ref,
        _ln_args((), (M,)),
        diff=(0, 1, 2, 3),
        shared=(1, 2, 3),
    ),
    Case(
        "layer_norm(scalars)",
        fnbp.layer_norm,
        ln_ref,
        _ln_args((), ()),
        diff=(0, 1, 2, 3),
        shared=(1, 2, 3),
    ),
    Case(
        "rms_norm(scalar gamma)",
        fnbp.rms_norm,
        rms_ref,
        _rms_args(()),
        diff=(0, 1, 2),
        shared=(1, 2),
    ),
]


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param


class TestNormalizationContract(RuleContract):
    pass


@pytest.mark.parametrize("case", SETTINGS, ids=lambda c: c.name)
def test_vjp_equals_oracle_float64_for_more_settings(case):
    assert_batch_vjp_equals_reference_float64(case)


# --- the notes' properties -----------------------------------------------------------------


def test_layer_norm_s_eps_zero_is_the_notes_formula_exactly():
    z = np.asarray(normal(np.random.default_rng(2), (4, 9), jnp.float64, scale=3.0))
    mu = z.mean(axis=-1, keepdims=True)
    sigma = np.sqrt(((z - mu) ** 2).mean(axis=-1, keepdims=True))
    assert rel_err(fnbp.layer_norm_s(z, 0.0), (z - mu) / sigma) <= 1e-14


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_layer_norm_s_output_has_mean_zero_and_mean_square_one(eps):
    z = normal(np.random.default_rng(3), (5, 3, 16), jnp.float64, scale=4.0) + 7.0
    y = fnbp.layer_norm_s(z, eps)
    var = jnp.var(z, axis=-1)
    np.testing.assert_allclose(jnp.mean(y, axis=-1), 0.0, atol=1e-14)
    # mean square var / (var + eps): exactly 1 for the notes' eps = 0.
    np.testing.assert_allclose(jnp.mean(y * y, axis=-1), var / (var + eps), rtol=1e-14)
    if eps == 0.0:
        np.testing.assert_allclose(jnp.mean(y * y, axis=-1), 1.0, rtol=1e-14)


@jax.jit
def _ln_of_mm(z, W, b, gamma, beta):
    return fnbp.layer_norm(fnbp.mm(z, W, b), gamma, beta, 0.0)


_ln_of_mm_grad = jax.jit(
    jax.grad(lambda W, b, z, gamma, beta, c: jnp.sum(c * _ln_of_mm(z, W, b, gamma, beta)))
)


@pytest.mark.parametrize("a", [1e-3, 0.37, 25.0, 4e3])
def test_layer_norm_is_scale_invariant_eq_7_42(a):
    rng = np.random.default_rng(4)
    z = normal(rng, (6, 5), jnp.float64)
    W = normal(rng, (8, 5), jnp.float64)
    b = normal(rng, (8,), jnp.float64)
    gamma, beta = normal(rng, (8,), jnp.float64), jnp.asarray(0.3)
    # LN(MM_{aW, ab}(z)) = LN(MM_{W, b}(z)) for a > 0, with the notes' eps = 0.
    plain = _ln_of_mm(z, W, b, gamma, beta)
    assert rel_err(_ln_of_mm(z, a * W, a * b, gamma, beta), plain) <= 1e-13
    # So the gradient with respect to W scales as 1/a.
    grad_a = _ln_of_mm_grad(a * W, a * b, z, gamma, beta, plain)
    assert rel_err(a * grad_a, _ln_of_mm_grad(W, b, z, gamma, beta, plain)) <= 1e-11


def test_layer_norm_s_backward_is_the_derived_formula():
    rng = np.random.default_rng(5)
    z, v = rng.standard_normal((3, 7)), rng.standard_normal((3, 7))
    sigma = z.std(axis=-1, keepdims=True)
    y = (z - z.mean(axis=-1, keepdims=True)) / sigma
    want = (v - v.mean(-1, keepdims=True) - y * (v * y).mean(-1, keepdims=True)) / sigma
    dz, _ = fnbp.rules.layer_norm_s_bwd(fnbp.rules.layer_norm_s_fwd(z, jnp.asarray(0.0))[1], v)
    assert rel_err(dz, want) <= 1e-13


def test_layer_norm_accepts_python_scalars_and_mixed_shapes():
    rng = np.random.default_rng(7)
    z = jnp.asarray(rng.standard_normal((2, M)), jnp.float32)
    beta = jnp.arange(M, dtype=jnp.float32)
    u = fnbp.layer_norm(z, 2.0, beta)
    assert u.dtype == jnp.float32
    zf = np.asarray(z, np.float64)
    mu = zf.mean(axis=-1, keepdims=True)
    want = 2.0 * (zf - mu) / np.sqrt(((zf - mu) ** 2).mean(-1, keepdims=True) + 1e-5) + beta
    assert_close(u, want, 1e-6)
    dgamma, dbeta = jax.jit(
        jax.grad(lambda g, b: jnp.sum(fnbp.layer_norm(z, g, b) ** 2), argnums=(0, 1))
    )(jnp.float32(2.0), beta)
    assert dgamma.shape == () and dbeta.shape == (M,)


def test_rms_norm_output_has_mean_square_gamma_squared():
    z = normal(np.random.default_rng(8), (4, 10), jnp.float64)
    u = fnbp.rms_norm(z, 3.0, 0.0)
    np.testing.assert_allclose(jnp.mean(u * u, axis=-1), 9.0, rtol=1e-14)


def test_layer_norm_s_constant_example_with_eps_zero_is_nan_and_checked_raises():
    z = jnp.ones((2, 4)).at[1].set(jnp.arange(4.0))
    assert np.all(np.isnan(fnbp.layer_norm_s(z, 0.0)[0]))
    assert np.all(np.isfinite(fnbp.layer_norm_s(z)))
    with pytest.raises(
        ValueError,
        match=r"layer_norm_s: an example has variance = 0 with "
        r"eps = 0",
    ):
        fnbp.checked(fnbp.layer_norm_s)(z, jnp.asarray(0.0))


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gamma", "beta"])
def test_layer_norm_rejects_parameter_of_wrong_length(name):
    z, good = jnp.ones((3, 4)), jnp.ones(4)
    args = {"gamma": good, "beta": good, name: jnp.ones(5)}
    with pytest.raises(
        ValueError,
        match=rf"^layer_norm: {name} must be a scalar \(shape \(\)\) "
        rf"or a vector of length m=4, z's last axis "
        rf"\(z\.shape=\(3, 4\)\), got {name}\.shape=\(5,\); "
        rf"pass {name} with shape \(\) or \(4,\)$",
    ):
        fnbp.layer_norm(z, args["gamma"], args["beta"])


def test_rms_norm_rejects_gamma_of_wrong_length():
    with pytest.raises(
        ValueError,
        match=r"^rms_norm: gamma must be a scalar .* got "
        r"gamma\.shape=\(2, 4\)",
    ):
        fnbp.rms_norm(jnp.ones((3, 4)), jnp.ones((2, 4)))


@pytest.mark.parametrize("eps", [-1e-3, jnp.asarray(-1.0)])
@pytest.mark.parametrize("fn", ["layer_norm_s", "rms_norm"])
def test_norms_reject_negative_eps(fn, eps):
    z = jnp.ones((2, 3))
    call = {
        "layer_norm_s": lambda: fnbp.layer_norm_s(z, eps),
        "rms_norm": lambda: fnbp.rms_norm(z, 1.0, eps),
    }[fn]
    with pytest.raises(ValueError, match=rf"^{fn}: eps must be >= 0, got eps=-"):
        call()


def test_layer_norm_rejects_non_scalar_eps_and_scalar_z():
    with pytest.raises(
        ValueError,
        match=r"^layer_norm: eps must be a scalar, "
        r"got eps\.shape=\(3,\)$",
    ):
        fnbp.layer_norm(jnp.ones((2, 3)), 1.0, 0.0, jnp.ones(3))
    with pytest.raises(ValueError, match=r"^layer_norm_s: z must have at least 1 axes"):
        fnbp.layer_norm_s(jnp.asarray(1.0))


def test_layer_norm_rejects_integer_z():
    with pytest.raises(TypeError, match=r"^layer_norm: z has dtype int"):
        fnbp.layer_norm(jnp.arange(4), 1.0, 0.0)
