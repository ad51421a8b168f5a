"""Losses: MSE (7.1), logistic (2.3), cross-entropy (2.14) against autodiff of
plain references written from the notes' formulas, their stability for large
logits, and their trace-time errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import Case, RuleContract, jit_cotangents

import fnbp

K = 4  # classes / outputs per example


def mse_ref(t, y):
    return 0.5 * jnp.sum((t - y) ** 2, axis=-1)


def logistic_ref(t, y):
    """Eq. 2.3 literally (fine for the moderate logits drawn here)."""
    return y * jnp.log1p(jnp.exp(-t)) + (1 - y) * jnp.log1p(jnp.exp(t))


def cross_entropy_ref(t, y):
    """-log softmax(t)_y with a one-hot e_y, eq. 2.14."""
    log_p = t - jnp.log(jnp.sum(jnp.exp(t), axis=-1, keepdims=True))
    return -jnp.sum(jax.nn.one_hot(y, t.shape[-1], dtype=t.dtype) * log_p, axis=-1)


def _mse_args(rng, dtype, batch):
    return tuple(jnp.asarray(rng.standard_normal(batch + (K,)), dtype) for _ in range(2))


def _logistic_args(rng, dtype, batch):
    return (jnp.asarray(3.0 * rng.standard_normal(batch), dtype),
            jnp.asarray(rng.uniform(size=batch), dtype))


def _cross_entropy_args(rng, dtype, batch):
    return (jnp.asarray(2.0 * rng.standard_normal(batch + (K,)), dtype),
            jnp.asarray(rng.integers(0, K, size=batch), jnp.int32))


CASES = [
    Case("mse_loss", fnbp.mse_loss, mse_ref, _mse_args, diff=(0, 1)),
    Case("logistic_loss", fnbp.logistic_loss, logistic_ref, _logistic_args, diff=(0, 1)),
    Case("cross_entropy_loss", fnbp.cross_entropy_loss, cross_entropy_ref, _cross_entropy_args),
]


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param


class TestLossContract(RuleContract):
    pass


def _by_hand(name, *args, v):
    """``name_bwd(name_fwd(*args).residuals, v)``, the public pieces of a rule."""
    fwd, bwd = getattr(fnbp.rules, f"{name}_fwd"), getattr(fnbp.rules, f"{name}_bwd")
    return jax.jit(lambda args, v: bwd(fwd(*args)[1], v))(args, v)


def test_losses_backward_are_the_notes_formulas():
    """(t - y) v for MSE, (sigmoid(t) - y) v (7.70), (softmax(t) - e_y) v (7.71)."""
    t = np.array([[1.0, -2.0, 0.5]])
    y = np.array([[0.0, 1.0, 1.0]])
    dt, dy = _by_hand("mse_loss", t, y, v=np.array([2.0]))
    np.testing.assert_allclose(dt, 2.0 * (t - y), rtol=1e-15)
    np.testing.assert_allclose(dy, -2.0 * (t - y), rtol=1e-15)

    dt, dy = _by_hand("logistic_loss", t[0], y[0], v=3.0 * np.ones(3))
    np.testing.assert_allclose(dt, 3.0 * (1 / (1 + np.exp(-t[0])) - y[0]), rtol=1e-14)
    np.testing.assert_allclose(dy, -3.0 * t[0], rtol=1e-15)

    dt, dy = _by_hand("cross_entropy_loss", t, np.array([2]), v=np.array([2.0]))
    softmax = np.exp(t) / np.exp(t).sum()
    np.testing.assert_allclose(dt, 2.0 * (softmax - np.array([[0.0, 0.0, 1.0]])), rtol=1e-14)
    assert dy is None


@pytest.mark.parametrize("rule", [fnbp.mse_loss, fnbp.logistic_loss], ids=lambda f: f.__name__)
def test_loss_cotangents_keep_each_argument_dtype_when_dtypes_mix(rule):
    t = jnp.ones((2, 3), jnp.float32)
    y = jnp.full((2, 3), 0.25, jnp.float64)
    v = jnp.ones(jax.eval_shape(rule, t, y).shape)
    out, (dt, dy) = jit_cotangents(rule, (t, y), v, (0, 1))
    assert (out.dtype, dt.dtype, dy.dtype) == (jnp.float64, jnp.float32, jnp.float64)


# --- stability ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("size", [1e4, 1e30])
def test_logistic_loss_is_exact_for_huge_logits(size, dtype):
    size = float(np.asarray(size, dtype))  # 1e30 rounded to the dtype
    t = jnp.array([size, size, -size, -size], dtype)
    y = jnp.array([0.0, 1.0, 0.0, 1.0], dtype)
    loss, (dt, dy) = jit_cotangents(fnbp.logistic_loss, (t, y), jnp.ones(4, dtype), (0, 1))
    np.testing.assert_array_equal(loss, [size, 0.0, 0.0, size])
    np.testing.assert_array_equal(dt, [1.0, 0.0, 0.0, -1.0])
    np.testing.assert_array_equal(dy, -t)
    assert loss.dtype == dt.dtype == dy.dtype == jnp.dtype(dtype)


def test_logistic_loss_soft_target_with_huge_logit():
    loss = jax.jit(fnbp.logistic_loss)(jnp.array([1e4, -1e4]), jnp.array([0.25, 0.25]))
    np.testing.assert_allclose(loss, [0.75e4, 0.25e4], rtol=1e-15)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_is_exact_for_huge_logits(dtype):
    t = jnp.array([[1e4, 0.0, -1e4], [1e4, 0.0, -1e4], [1e4, 1e4, 0.0]], dtype)
    y = jnp.array([0, 1, 2])
    loss, (dt,) = jit_cotangents(fnbp.cross_entropy_loss, (t, y), jnp.ones(3, dtype), (0,))
    np.testing.assert_allclose(loss, [0.0, 1e4, 1e4 + np.log(2.0)], rtol=1e-7)
    np.testing.assert_allclose(dt, [[0.0, 0.0, 0.0], [1.0, -1.0, 0.0], [0.5, 0.5, -1.0]],
                               atol=1e-7)


def test_cross_entropy_is_shift_invariant_for_logits_near_1e4():
    rng = np.random.default_rng(0)
    t = jnp.asarray(rng.standard_normal((5, K)))
    y = jnp.asarray(rng.integers(0, K, 5))
    v = jnp.ones(5)
    shifted = jit_cotangents(fnbp.cross_entropy_loss, (t + 1e4, y), v, (0,))
    plain = jit_cotangents(fnbp.cross_entropy_loss, (t, y), v, (0,))
    np.testing.assert_allclose(shifted[0], plain[0], rtol=1e-10)
    np.testing.assert_allclose(shifted[1][0], plain[1][0], atol=1e-10)


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("rule", [fnbp.mse_loss, fnbp.logistic_loss], ids=lambda f: f.__name__)
def test_loss_rejects_t_y_shape_mismatch(rule):
    name = rule.__name__
    with pytest.raises(ValueError, match=rf"^{name}: t and y must have the same shape .*, got "
                                         r"t\.shape=\(5, 4\) and y\.shape=\(5, 3\); reshape "
                                         r"y to \(5, 4\)$"):
        rule(jnp.ones((5, 4)), jnp.ones((5, 3)))


def test_mse_loss_rejects_scalar_t():
    with pytest.raises(ValueError, match=r"^mse_loss: t must have at least 1 axes"):
        fnbp.mse_loss(jnp.float32(1.0), jnp.float32(0.0))


@pytest.mark.parametrize("y_shape", [(5, 1), (4,), (5, K), ()], ids=str)
def test_cross_entropy_rejects_labels_of_wrong_shape(y_shape):
    with pytest.raises(ValueError, match=r"^cross_entropy_loss: y must have shape "
                                         r"t\.shape\[:-1\]=\(5,\) \(one label per example\), "
                                         rf"got y\.shape=\({', '.join(map(str, y_shape))},?\)"):
        fnbp.cross_entropy_loss(jnp.ones((5, K)), jnp.zeros(y_shape, jnp.int32))


@pytest.mark.parametrize("labels", [jnp.zeros(5), jax.nn.one_hot(jnp.zeros(5, int), K)],
                         ids=["float", "one-hot"])
def test_cross_entropy_rejects_float_labels(labels):
    with pytest.raises(TypeError, match=r"^cross_entropy_loss: y has dtype float\d+, but "
                                        r"integer class labels are needed .* "
                                        r"y\.astype\(jnp\.int32\)$"):
        fnbp.cross_entropy_loss(jnp.ones((5, K)), labels)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64], ids=["int", "complex"])
@pytest.mark.parametrize("rule", [fnbp.mse_loss, fnbp.logistic_loss, fnbp.cross_entropy_loss],
                         ids=lambda f: f.__name__)
def test_loss_rejects_non_float_logits(rule, dtype):
    y = jnp.zeros(5, jnp.int32) if rule is fnbp.cross_entropy_loss else jnp.zeros((5, K))
    with pytest.raises(TypeError, match=rf"^{rule.__name__}: t has dtype "
                                        rf"{jnp.dtype(dtype)}, but a real floating dtype"):
        rule(jnp.ones((5, K), dtype), y)


@pytest.mark.parametrize("rule", [fnbp.mse_loss, fnbp.logistic_loss], ids=lambda f: f.__name__)
def test_loss_rejects_integer_targets(rule):
    with pytest.raises(TypeError, match=rf"^{rule.__name__}: y has dtype int32, but a real "
                                        r"floating dtype"):
        rule(jnp.ones((5, K)), jnp.ones((5, K), jnp.int32))
