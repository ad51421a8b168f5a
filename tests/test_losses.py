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
    return (
        jnp.asarray(3.0 * rng.standard_normal(batch), dtype),
        jnp.asarray(rng.uniform(size=batch), dtype),
    )


def _cross_entropy_args(rng, dtype, batch):
    return (
        jnp.asarray(2.0 * rng.standard_normal(batch + (K,)), dtype),
        jnp.asarray(rng.integers(0, K, size=batch), jnp.int32),
    )


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
    np.testing.assert_allclose(dt, [[0.0, 0.0, 0.0], [1.0, -1.0, 0.0], [0.5, 0.5, -1.0]], atol=1e-7)


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
    with pytest.raises(
        ValueError,
        match=rf"^{name}: t and y must have the same shape .*, got "
        r"t\.shape=\(5, 4\) and y\.shape=\(5, 3\); reshape "
        r"y to \(5, 4\)$",
    ):
        rule(jnp.ones((5, 4)), jnp.ones((5, 3)))


def test_mse_loss_rejects_scalar_t():
    with pytest.raises(ValueError, match=r"^mse_loss: t must have at least 1 axes"):
        fnbp.mse_loss(jnp.float32(1.0), jnp.float32(0.0))


@pytest.mark.parametrize("y_shape", [(5, 1), (4,), (5, K), ()], ids=str)
def test_cross_entropy_rejects_labels_of_wrong_shape(y_shape):
    with pytest.raises(
        ValueError,
        match=r"^cross_entropy_loss: y must have shape "
        r"t\.shape\[:-1\]=\(5,\) \(one label per example\), "
        rf"got y\.shape=\({', '.join(map(str, y_shape))},?\)",
    ):
        fnbp.cross_entropy_loss(jnp.ones((5, K)), jnp.zeros(y_shape, jnp.int32))


@pytest.mark.parametrize(
    "labels", [jnp.zeros(5), jax.nn.one_hot(jnp.zeros(5, int), K)], ids=["float", "one-hot"]
)
def test_cross_entropy_rejects_float_labels(labels):
    with pytest.raises(
        TypeError,
        match=r"^cross_entropy_loss: y has dtype float\d+, but "
        r"integer class labels are needed .* "
        r"y\.astype\(jnp\.int32\)$",
    ):
        fnbp.cross_entropy_loss(jnp.ones((5, K)), labels)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64], ids=["int", "complex"])
@pytest.mark.parametrize(
    "rule", [fnbp.mse_loss, fnbp.logistic_loss, fnbp.cross_entropy_loss], ids=lambda f: f.__name__
)
def test_loss_rejects_non_float_logits(rule, dtype):
    y = jnp.zeros(5, jnp.int32) if rule is fnbp.cross_entropy_loss else jnp.zeros((5, K))
    with pytest.raises(
        TypeError,
        match=rf"^{rule.__name__}: t has dtype "
        rf"{jnp.dtype(dtype)}, but a real floating dtype",
    ):
        rule(jnp.ones((5, K), dtype), y)


@pytest.mark.parametrize("rule", [fnbp.mse_loss, fnbp.logistic_loss], ids=lambda f: f.__name__)
def test_loss_rejects_integer_targets(rule):
    with pytest.raises(
        TypeError,
        match=rf"^{rule.__name__}: y has dtype int32, but a real "
        r"floating dtype",
    ):
        rule(jnp.ones((5, K)), jnp.ones((5, K), jnp.int32))


# --- labels of every integer dtype -------------------------------------------------------


def _softmax_minus_one_hot(t, y):
    """float64 oracle of the cross-entropy cotangent: softmax(t) - e_y per row."""
    t = np.asarray(t, np.float64)
    e = np.exp(t - t.max(axis=-1, keepdims=True))
    out = e / e.sum(axis=-1, keepdims=True)
    out[np.arange(len(out)), np.asarray(y, np.int64)] -= 1  # e_y, without a k x k identity
    return out


@jax.jit
def _loss_and_grad(t, y):
    loss, pull = jax.vjp(lambda t: fnbp.cross_entropy_loss(t, y), t)
    return loss, pull(jnp.ones_like(loss))[0]


@pytest.mark.parametrize(
    "dtype, k, labels",
    [
        ("uint8", 256, [0, 255, 128, 7]),  # a byte vocabulary: 256 does not fit in uint8
        ("int8", 200, [0, 127, 64, 5]),  # 200 does not fit in int8
        ("int16", 40000, [0, 32767, 39, 1]),  # 40000 does not fit in int16
        ("uint16", 300, [0, 299, 150, 2]),
        ("int64", 5, [0, 4, 2, 1]),
    ],
    ids=lambda x: str(x) if not isinstance(x, list) else "",
)
def test_cross_entropy_accepts_labels_of_every_integer_dtype(dtype, k, labels):
    """The range check never converts k to the labels' dtype: every label in
    [0, k) is valid, loss and cotangent equal the int32 labels' exactly and
    the float64 oracle's softmax(t) - e_y."""
    t = jnp.asarray(np.random.default_rng(0).standard_normal((4, k)), jnp.float64)
    y = jnp.asarray(np.asarray(labels, dtype))
    loss, dt = _loss_and_grad(t, y)
    want_loss, want_dt = _loss_and_grad(t, jnp.asarray(labels, jnp.int32))
    np.testing.assert_array_equal(loss, want_loss)
    np.testing.assert_array_equal(dt, want_dt)
    assert np.all(np.isfinite(loss))
    np.testing.assert_allclose(dt, _softmax_minus_one_hot(t, labels), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(fnbp.checked(fnbp.cross_entropy_loss)(t, y), loss)


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64"])
def test_cross_entropy_negative_labels_give_nan_rows_in_signed_dtypes(dtype):
    """Unchecked, a label < 0 (or >= k) is NaN in its loss and its cotangent
    row and nowhere else; checked, it raises."""
    t = jnp.asarray(np.random.default_rng(1).standard_normal((3, 200)), jnp.float32)
    y = jnp.asarray(np.asarray([-1, 5, -128], dtype))
    loss, dt = _loss_and_grad(t, y)
    assert np.isnan(loss[0]) and np.isnan(loss[2]) and np.isfinite(loss[1])
    assert np.all(np.isnan(dt[0])) and np.all(np.isnan(dt[2])) and np.all(np.isfinite(dt[1]))
    with pytest.raises(
        ValueError,
        match=r"cross_entropy_loss: y holds a label outside "
        r"\[0, 200\)",
    ):
        fnbp.checked(fnbp.cross_entropy_loss)(t, y)


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_cross_entropy_label_at_or_above_k_is_nan_and_refused_checked(dtype):
    t = jnp.zeros((2, 100), jnp.float32)
    y = jnp.asarray(np.asarray([100, 99], dtype))
    loss = jax.jit(fnbp.cross_entropy_loss)(t, y)
    assert np.isnan(loss[0]) and loss[1] == np.float32(np.log(100.0))
    with pytest.raises(
        ValueError,
        match=r"cross_entropy_loss: y holds a label outside "
        r"\[0, 100\)",
    ):
        fnbp.checked(fnbp.cross_entropy_loss)(t, y)


def test_cross_entropy_gradient_with_uint8_labels_and_256_classes():
    """jax.grad of the mean loss through the rule: (softmax(t) - e_y) / n."""
    rng = np.random.default_rng(2)
    t = jnp.asarray(rng.standard_normal((6, 256)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 256, 6).astype(np.uint8))
    y = y.at[0].set(255)
    g = jax.jit(jax.grad(lambda t: jnp.mean(fnbp.cross_entropy_loss(t, y))))(t)
    np.testing.assert_allclose(g, _softmax_minus_one_hot(t, y) / 6, rtol=0, atol=1e-8)


# --- Python lists ----------------------------------------------------------------------


def test_losses_take_lists_as_arrays():
    t, y = [[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], [2, 1]
    np.testing.assert_array_equal(
        fnbp.cross_entropy_loss(t, y), fnbp.cross_entropy_loss(jnp.asarray(t), jnp.asarray(y))
    )
    np.testing.assert_array_equal(fnbp.mse_loss(t, t), [0.0, 0.0])
    np.testing.assert_array_equal(
        fnbp.logistic_loss((1.0, -1.0), np.array([1.0, 0.0])),
        fnbp.logistic_loss(jnp.asarray([1.0, -1.0]), jnp.asarray([1.0, 0.0])),
    )


def test_cross_entropy_refuses_ragged_and_non_numeric_labels():
    t = jnp.ones((2, 3))
    with pytest.raises(
        ValueError,
        match=r"^cross_entropy_loss: y must be an array \(.*\), got "
        r"a ragged list \(its entries have different lengths "
        r"or shapes\); give every row the same length$",
    ):
        fnbp.cross_entropy_loss(t, [[0], [1, 2]])
    with pytest.raises(
        TypeError,
        match=r"^cross_entropy_loss: y must be an array \(.*\), got "
        r"a list holding non-numbers \(NumPy reads it as dtype "
        r"<U\d+\); pass its numbers as an array$",
    ):
        fnbp.cross_entropy_loss(t, ["cat", "dog"])
