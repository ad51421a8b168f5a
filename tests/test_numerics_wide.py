"""The smooth rules against float64 oracles over wide ranges, in every dtype.

GELU (both forms), softplus, SiLU, softmax, the logistic loss and
cross-entropy, values and cotangents, on dense grids (z in [-40, 40] and
beyond, logits offset up to 1e4) in float16, bfloat16, float32 and float64.
The oracles are float64 formulas written here (math.erfc, the logistic
function, log-sum-exp with fsum), evaluated at the rule's own rounded inputs.

Tolerances, per entry (not relative to the array's largest entry):

    |got - want| <= rounding |want| + ULPS * eps_w * scale + tiny

- ``eps_w`` is the epsilon of the dtype the rule computes in: float32 for
  float16/bfloat16 inputs (see fnbp.rules._dtypes.at_least_float32), the
  dtype itself otherwise; ``rounding`` is one ulp of the output dtype (the
  one rounding from float32 is half of it) for half precision, else 0.
- ``scale`` is the error a correctly implemented formula has: the sum of the
  magnitudes of the terms it adds (|f| + |z f'(z)| for a function of z,
  where |z f'/f| is its condition number: e^{-z^2/2} or erfc evaluated at a
  z rounded once, and any relative error in z, is amplified z^2 times).
  Where a result is a sum of non-negative terms (the logistic loss), the
  scale is the result itself; cross-entropy's log(sum_j e^{t_j - max t})
  adds an ulp of 1 (the sum is at least 1) and what rounding each
  t_j - max(t) once gives.
- ``tiny`` is the dtype's smallest normal number: below it there is no
  relative precision, and a GPU flushes subnormals to zero.

One jitted program per dtype computes every rule's values and cotangents.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import jit

import fnbp

DTYPES = ("float16", "bfloat16", "float32", "float64")
ULPS = 8  # a few ulps of the working dtype, on the scale above
SQRT_2PI = math.sqrt(2.0 * math.pi)
TANH_K = math.sqrt(2.0 / math.pi)
TANH_C = 0.044715


def finfo(dtype):
    return jnp.finfo(jnp.dtype(dtype))


def working_eps(dtype) -> float:
    return float(finfo(jnp.promote_types(dtype, jnp.float32)).eps)


def rounding(dtype) -> float:
    eps = float(finfo(dtype).eps)
    return eps if eps > working_eps(dtype) else 0.0


def assert_within(name, got, want, scale, dtype, x=None):
    """Every entry within the tolerance of the module doc; NaN nowhere.

    With ``x`` (an element-wise rule's z) the floor is tiny (1 + |z|^3): a
    factor below tiny (Phi(z), e^{-z^2/2}, sigmoid(2a)) may be flushed before
    the polynomial factors of z (degree <= 3: z, z (1 + 3 c z^2)) multiply it,
    which happens for |z| < 40 alone (|z| is capped there).
    """
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    floor = float(finfo(dtype).tiny)
    if x is not None:
        floor = floor * (1 + np.minimum(np.abs(x), 40.0) ** 3)
    tol = rounding(dtype) * np.abs(want) + ULPS * working_eps(dtype) * scale + floor
    bad = ~(np.abs(got - want) <= tol)
    if bad.any():
        i = np.flatnonzero(bad.ravel())[0]
        at = "" if x is None else f" at {np.asarray(x, np.float64).ravel()[i]!r}"
        raise AssertionError(
            f"{name} {dtype}: {bad.sum()} entries off; first{at}: got "
            f"{got.ravel()[i]!r}, want {want.ravel()[i]!r}, tolerance {tol.ravel()[i]:.3e}"
        )


# --- float64 oracles ------------------------------------------------------------------


def _safe(product, z):
    """The limit 0 at z = -inf of z * (a factor that vanishes there)."""
    return np.where(z == -np.inf, 0.0, product)


def sigmoid64(x):
    """sigmoid(x) in float64 for any x (e^{-|x|} never overflows)."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0, e) / (1.0 + e)


def times(z, factor):
    """z * factor with the limit 0 where z is infinite and the factor vanishes."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(np.isinf(z), 0.0, z * factor)


_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def gelu64(z):
    """(f, f', f'') of z Phi(z), Phi(z) = erfc(-z / sqrt 2) / 2."""
    cdf = 0.5 * _erfc(-z / math.sqrt(2.0))
    with np.errstate(under="ignore", over="ignore"):
        pdf = np.exp(-0.5 * z * z) / SQRT_2PI
    with np.errstate(invalid="ignore", over="ignore"):
        return _safe(z * cdf, z), cdf + times(z, pdf), np.where(pdf == 0, 0.0, pdf * (2 - z * z))


def gelu_tanh64(z):
    """(f, f', f'') of z sigmoid(2a), a = sqrt(2/pi)(z + 0.044715 z^3)."""
    with np.errstate(over="ignore", invalid="ignore"):
        a = TANH_K * (z + TANH_C * z**3)
        da = TANH_K * (1 + 3 * TANH_C * z * z)
        s, sm = sigmoid64(2 * a), sigmoid64(-2 * a)
        bump = s * sm
        f = _safe(z * s, z)
        tail = np.where(bump == 0, 0.0, 2 * z * bump * da)
        f1 = s + tail
        f2 = np.where(
            bump == 0,
            0.0,
            4 * bump * da + 4 * z * da * da * bump * (sm - s) + 12 * TANH_K * TANH_C * z * z * bump,
        )
    return f, f1, f2


def softplus64(beta):
    def f(z):
        with np.errstate(over="ignore", invalid="ignore"):
            e = np.exp(-np.abs(beta * z))
            value = np.maximum(z, 0.0) + np.log1p(e) / beta
            s = sigmoid64(beta * z)
            return value, s, beta * s * sigmoid64(-beta * z)

    return f


def silu64(z):
    s, sm = sigmoid64(z), sigmoid64(-z)
    with np.errstate(invalid="ignore"):
        return _safe(z * s, z), s + times(z, s * sm), times(s * sm, 2 + times(z, sm - s))


ELEMENTWISE = {
    # name: (fnbp function of z, float64 oracle (f, f', f''))
    "gelu": (fnbp.gelu, gelu64),
    "gelu(approximate)": (functools.partial(fnbp.gelu, approximate=True), gelu_tanh64),
    "softplus": (fnbp.softplus, softplus64(1.0)),
    "softplus(beta=100)": (lambda z: fnbp.softplus(z, 100.0), softplus64(100.0)),
    "silu": (fnbp.silu, silu64),
}


def grid(dtype) -> np.ndarray:
    """[-40, 40] every 1/256 (and 1e-3 near 0), huge values up to the dtype's max."""
    big = float(finfo(dtype).max)
    huge = [x for x in (1e3, 6e4, 1e10, 1e30, 1e100, 1e300) if x < big] + [big]
    z = np.concatenate(
        [
            np.arange(-40 * 256, 40 * 256 + 1) / 256.0,
            np.linspace(-1, 1, 2001),
            huge,
            [-x for x in huge],
        ]
    )
    return np.asarray(jnp.asarray(z, dtype)).astype(np.float64)  # the rule's rounded inputs


@jit
def _elementwise_values_and_slopes(z):
    out = {}
    for name, (f, _) in ELEMENTWISE.items():
        u, pull = jax.vjp(f, z)
        out[name] = (u, pull(jnp.ones_like(u))[0])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_smooth_activations_match_float64_over_wide_ranges(dtype):
    """Values and slopes of GELU (erfc and tanh forms), softplus (beta 1 and
    100) and SiLU from -40 to 40 and out to the dtype's largest value: within
    a few ulps on the scale |f| + |z f'| (the conditioning of the function),
    dtype in = dtype out; e.g. gelu(-5.42) is negative and gelu'(-5.4)
    correct to the ulp in float32, softplus(1000, beta=100) = 1000 and the
    tanh-GELU's slopes at -1000 and 1000 are 0 and 1 in float16."""
    z = grid(dtype)
    got = _elementwise_values_and_slopes(jnp.asarray(z, dtype))
    for name, (_, oracle) in ELEMENTWISE.items():
        f, f1, f2 = oracle(z)
        u, du = got[name]
        assert u.dtype == du.dtype == jnp.dtype(dtype), name
        with np.errstate(invalid="ignore", over="ignore"):
            assert_within(name, u, f, np.abs(f) + np.abs(times(z, f1)), dtype, z)
            assert_within(f"{name}'", du, f1, np.abs(f1) + np.abs(times(z, f2)), dtype, z)


def test_exact_gelu_keeps_its_sign_and_digits_for_negative_inputs():
    """The issue's float32 points: 0.5 z (1 + erf(z / sqrt 2)) gave gelu(-5.42) > 0."""
    z = jnp.asarray([-5.42, -5.4, -12.0], jnp.float32)
    u, pull = jax.vjp(fnbp.gelu, z)
    zr = np.asarray(z, np.float64)
    f, f1, _ = gelu64(zr)
    assert np.all(np.asarray(u) < 0)
    np.testing.assert_allclose(u, f, rtol=2e-5)
    np.testing.assert_allclose(pull(jnp.ones(3, jnp.float32))[0], f1, rtol=2e-5)


# --- softmax and the losses ------------------------------------------------------------


OFFSETS = {
    "float16": (0.0, -30.0, 100.0, 1e4),
    "bfloat16": (0.0, -30.0, 100.0, 1e4),
    "float32": (0.0, -30.0, 100.0, 1e4, 1e6),
    "float64": (0.0, -30.0, 100.0, 1e4, 1e8),
}
K = 10


def logits(dtype, rng):
    """Rows of K logits: N(0, 3^2), and confident rows (the label 30 above the
    rest), at every offset; labels uniform. Rounded to the dtype."""
    rows, labels = [], []
    for offset in OFFSETS[dtype]:
        spread = 3.0 * rng.standard_normal((64, K))
        confident = rng.standard_normal((16, K))
        y = rng.integers(0, K, 80)
        confident[np.arange(16), y[64:]] += 30.0
        rows.append(offset + np.concatenate([spread, confident]))
        labels.append(y)
    t = np.asarray(jnp.asarray(np.concatenate(rows), dtype)).astype(np.float64)
    return t, np.concatenate(labels)


def log_softmax64(t):
    """(d, p, lse) with d = t - max t (exact: the float64 data are rounded values
    within a factor 2), lse = log sum e^d = log1p of the fsum below the max."""
    d = t - t.max(axis=-1, keepdims=True)
    e = np.exp(d)
    below = np.array([math.fsum(e_row[d_row < 0]) for e_row, d_row in zip(e, d)])
    ties = np.sum(d == 0, axis=-1)
    lse = np.log1p(below + (ties - 1))
    return d, e / (below + ties)[:, None], lse


@jit
def _losses_and_cotangents(t, y):
    loss, pull = jax.vjp(lambda t: fnbp.cross_entropy_loss(t, y), t)
    s = fnbp.softmax(t)
    return loss, pull(jnp.ones_like(loss))[0], s


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_and_softmax_match_float64_at_wide_offsets(dtype):
    """Loss, its cotangent and softmax for logits offset by up to 1e4 (1e8):
    J = log(sum e^d) - d_y, d = t - max(t), within a few ulps of J + 1 (the
    logarithm of a sum >= 1 is accurate to an ulp of 1; -d_y adds no
    rounding of the offset), plus what rounding each t_j - max(t) once costs
    (|d_j| weighted by p_j). The offset itself never costs digits."""
    t, y = logits(dtype, np.random.default_rng(0))
    loss, dt, s = _losses_and_cotangents(jnp.asarray(t, dtype), jnp.asarray(y, jnp.int32))
    assert loss.dtype == dt.dtype == s.dtype == jnp.dtype(dtype)
    d, p, lse = log_softmax64(t)
    d_y = d[np.arange(len(y)), y]
    want = lse - d_y
    spread = np.sum(p * np.abs(d), axis=-1)
    assert_within(
        "cross_entropy_loss", loss, want, (1 + K / ULPS) * (want + 1) + spread + np.abs(d_y), dtype
    )
    one_hot = np.eye(K)[y]
    entry = (1 + K / ULPS + np.abs(d)) * (p + one_hot)
    assert_within("cross_entropy_loss'", dt, p - one_hot, entry, dtype)
    assert_within("softmax", s, p, (1 + K / ULPS + np.abs(d)) * p, dtype)


def test_cross_entropy_near_1e4_is_log1p_e():
    """The issue's case: f32 logits (1e4, 1e4 - 1), label 1: log1p(e) = 1.31326."""
    t = jnp.asarray([[1e4, 1e4 - 1.0]], jnp.float32)
    loss = jit(fnbp.cross_entropy_loss)(t, jnp.asarray([1]))
    assert abs(float(loss[0]) - math.log1p(math.e)) <= 2 * 1.2e-7 * 1.32


@jit
def _logistic_and_cotangents(t, y):
    loss, pull = jax.vjp(fnbp.logistic_loss, t, y)
    return (loss,) + pull(jnp.ones_like(loss))


@pytest.mark.parametrize("dtype", DTYPES)
def test_logistic_loss_matches_float64_over_wide_ranges(dtype):
    """J(t, y) = y log1p(e^-t) + (1 - y) log1p(e^t) (a sum of non-negative
    terms, stable in float64 for |t| <= 700) for t in [-700, 700] (clipped to
    the dtype) and y in {0, 1/4, 1}: J within a few ulps of itself (J(20, 1)
    is 2.06e-9, not 0), dJ/dt = sigmoid(t) - y within a few ulps of its two
    terms, dJ/dy = -t."""
    big = min(700.0, float(finfo(dtype).max))
    t = np.concatenate([np.arange(-40 * 64, 40 * 64 + 1) / 64.0, np.linspace(-big, big, 1001)])
    t = np.tile(t, 3)
    y = np.repeat([0.0, 0.25, 1.0], len(t) // 3)
    t = np.asarray(jnp.asarray(t, dtype)).astype(np.float64)
    y = np.asarray(jnp.asarray(y, dtype)).astype(np.float64)
    loss, dt, dy = _logistic_and_cotangents(jnp.asarray(t, dtype), jnp.asarray(y, dtype))
    assert loss.dtype == dt.dtype == dy.dtype == jnp.dtype(dtype)
    with np.errstate(over="ignore"):
        want = y * np.log1p(np.exp(-t)) + (1 - y) * np.log1p(np.exp(t))
    assert_within("logistic_loss", loss, want, want, dtype)
    # sigmoid(t) - y with sigmoid(t) = 1 - sigmoid(-t) for t > 0: no cancellation
    # of the oracle's own (y = 1, t = 30 is -9.4e-14 to the last digit).
    sig, sig_minus = sigmoid64(t), sigmoid64(-t)
    want = np.where(t > 0, (1 - y) - sig_minus, sig - y)
    assert_within("logistic_loss'", dt, want, np.where(t > 0, 1 - y + sig_minus, sig + y), dtype)
    assert_within("logistic_loss' (y)", dy, -t, np.abs(t), dtype)


@jit
def _softplus_beta_slopes(z, beta):
    return jax.vmap(jax.grad(fnbp.softplus, argnums=1), in_axes=(0, None))(z, beta)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softplus_beta_cotangent_matches_float64_over_wide_ranges(dtype):
    """d softplus / d beta = -(|z| sigmoid(-beta |z|) + log1p(e^{-beta |z|}) / beta) / beta,
    per entry (z s - u would cancel for large beta z: 0 instead of -4.3e-8 at
    z = 20 in float32): within a few ulps on the scale (1 + beta |z|) |want|,
    e^{-beta |z|} evaluated at a beta |z| rounded once."""
    z = grid(dtype)
    z = z[np.abs(z) <= 1e3]
    for beta in (1.0, 100.0):
        got = _softplus_beta_slopes(jnp.asarray(z, dtype), jnp.asarray(beta, dtype))
        assert got.dtype == jnp.dtype(dtype)
        with np.errstate(under="ignore"):
            e = np.exp(-beta * np.abs(z))
            want = -(np.abs(z) * e / (1 + e) + np.log1p(e) / beta) / beta
        assert_within(
            f"softplus d beta (beta={beta})",
            got,
            want,
            (1 + beta * np.abs(z)) * np.abs(want),
            dtype,
            z,
        )
