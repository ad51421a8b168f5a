"""Average and max pooling against autodiff of plain tap-stacking references.

The references stack, for each window offset j in row-major order, the strided
slice z[s i + j] (no reduce_window), then take the mean, or pick the first
maximum with ``argmax`` and ``take_along_axis``: the same tie convention as
the rule (the cotangent goes to the first maximum), so ties from rounding to
float16/bfloat16 cannot make them disagree. Their autodiff is the oracle.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import (
    Case,
    RuleContract,
    assert_batch_vjp_equals_reference_float64,
    normal,
)

import fnbp

# --- independent references ---------------------------------------------------------------


def taps(z, window, stride):
    """(|K|, ..., out..., C): the entry at each window offset for every output."""
    n = len(window)
    spatial = z.shape[z.ndim - n - 1 : -1]
    out = [(m - k) // s + 1 for m, k, s in zip(spatial, window, stride)]
    return jnp.stack(
        [
            z[
                (Ellipsis,)
                + tuple(slice(j, j + s * (o - 1) + 1, s) for j, s, o in zip(offset, stride, out))
                + (slice(None),)
            ]
            for offset in itertools.product(*(range(k) for k in window))
        ]
    )


def avg_pool_ref(z, window, stride):
    return jnp.mean(taps(z, window, stride), axis=0)


def max_pool_ref(z, window, stride):
    t = taps(z, window, stride)
    first = jnp.argmax(t, axis=0)  # argmax returns the first maximum
    return jnp.take_along_axis(t, first[None], axis=0)[0]


# --- cases -----------------------------------------------------------------------------------


def _case(name, rule, ref, spatial, window, stride, C=2):
    full_window = window if isinstance(window, tuple) else (window,)
    full_stride = (
        full_window
        if stride is None
        else stride
        if isinstance(stride, tuple)
        else (stride,) * len(full_window)
    )

    def make(rng, dtype, batch):
        return (normal(rng, batch + spatial + (C,), dtype),)

    return Case(
        name,
        functools.partial(rule, window=window, stride=stride),
        functools.partial(ref, window=full_window, stride=full_stride),
        make,
    )


CASES = [
    _case("max_pool((3, 2), stride (1, 2))", fnbp.max_pool, max_pool_ref, (6, 5), (3, 2), (1, 2)),
    _case("avg_pool((2, 3), stride (2, 1))", fnbp.avg_pool, avg_pool_ref, (5, 6), (2, 3), (2, 1)),
]
# More settings against the float64 oracle (the full contract runs for CASES).
SETTINGS = [
    _case("max_pool(3, stride 2)", fnbp.max_pool, max_pool_ref, (9,), 3, 2),
    _case("max_pool((2, 2))", fnbp.max_pool, max_pool_ref, (5, 6), (2, 2), None),
    _case("avg_pool((2,))", fnbp.avg_pool, avg_pool_ref, (7,), (2,), None, C=3),
    _case("avg_pool((2, 2), stride 1)", fnbp.avg_pool, avg_pool_ref, (4, 5), (2, 2), 1),
]


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param


class TestPoolingContract(RuleContract):
    pass


@pytest.mark.parametrize("case", SETTINGS, ids=lambda c: c.name)
def test_vjp_equals_oracle_float64_for_more_settings(case):
    assert_batch_vjp_equals_reference_float64(case)


# --- tie convention, shapes, residuals --------------------------------------------------------


def test_max_pool_tie_sends_the_cotangent_to_the_first_maximum():
    z = jnp.array(
        [[1.0, 3.0, 3.0, 0.0], [3.0, 2.0, 7.0, 7.0], [5.0, 5.0, 2.0, 2.0], [5.0, 5.0, 2.0, 2.0]]
    )[..., None]
    v = jnp.array([[10.0, 20.0], [30.0, 40.0]])[..., None]
    u, res = fnbp.rules.max_pool_fwd(z, window=(2, 2))
    np.testing.assert_array_equal(u[..., 0], [[3.0, 7.0], [5.0, 2.0]])
    # Ties: the first maximum in row-major window order takes the whole cotangent.
    np.testing.assert_array_equal(res.selected[0, ..., 0], [[1, 2], [0, 0]])
    (dz,) = fnbp.rules.max_pool_bwd(res, v, window=(2, 2))
    want = np.array([[0, 10, 0, 0], [0, 0, 20, 0], [30, 0, 40, 0], [0, 0, 0, 0]], float)
    np.testing.assert_array_equal(dz[..., 0], want)
    # The convention of autodiff through XLA's reduce_window max (select-and-scatter).
    xla = jax.vjp(
        lambda z: jax.lax.reduce_window(z, -jnp.inf, jax.lax.max, (2, 2, 1), (2, 2, 1), "VALID"), z
    )[1](v)[0]
    np.testing.assert_array_equal(dz, xla)


def test_max_pool_overlapping_windows_add_their_cotangents():
    z = jnp.array([0.0, 9.0, 1.0, 2.0, 8.0])[:, None]
    (dz,) = fnbp.backward(lambda z: fnbp.max_pool(z, 3, 1), z)(jnp.array([[1.0], [2.0], [4.0]]))
    np.testing.assert_array_equal(dz[:, 0], [0.0, 3.0, 0.0, 0.0, 4.0])


def test_avg_pool_backward_spreads_v_over_the_window():
    v = jnp.array([[6.0, 12.0]])[..., None]
    (dz,) = fnbp.backward(lambda z: fnbp.avg_pool(z, (1, 3)), jnp.ones((1, 7, 1)))(v)
    np.testing.assert_array_equal(dz[..., 0], [[2.0, 2.0, 2.0, 4.0, 4.0, 4.0, 0.0]])


def test_window_length_decides_the_pooled_axes():
    z = jnp.ones((2, 8, 6, 3))
    assert fnbp.max_pool(z, (2, 2)).shape == (2, 4, 3, 3)
    assert fnbp.max_pool(z, 2).shape == (2, 8, 3, 3)  # an int pools one axis: W
    assert fnbp.avg_pool(z, (3,), 1).shape == (2, 8, 4, 3)
    assert fnbp.avg_pool(z, (3, 2), (1, 2)).shape == (2, 6, 3, 3)


def test_max_pool_residual_is_a_small_index():
    _, res = fnbp.rules.max_pool_fwd(jnp.ones((4, 6, 6, 2)), window=(3, 3))
    assert res.selected.dtype == jnp.int8 and res.selected.shape == (4, 2, 2, 2)
    assert res.z_shape.size == 0
    _, res = fnbp.rules.max_pool_fwd(jnp.ones((12, 12, 1)), window=(12, 12))
    assert res.selected.dtype == jnp.int32


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["avg_pool", "max_pool"])
def test_pool_rejects_window_larger_than_input(name):
    with pytest.raises(
        ValueError,
        match=rf"^{name}: window=\(3, 5\) is larger than the "
        rf"input's spatial size \(4, 4\) \(z\.shape=\(2, 4, 4, "
        rf"1\), channels last\); use a window of at most "
        rf"\(4, 4\)$",
    ):
        getattr(fnbp, name)(jnp.ones((2, 4, 4, 1)), (3, 5))
    with pytest.raises(ValueError, match=rf"^{name}: window=\(4,\) is larger than"):
        getattr(fnbp, name)(jnp.ones((3, 1)), 4)


@pytest.mark.parametrize(
    "window,stride,error,message",
    [
        (0, None, ValueError, r"window must be >= 1 in every spatial axis, got window=\(0,\)"),
        (
            (2, 2),
            (1, 0),
            ValueError,
            r"stride must be >= 1 in every spatial axis, got "
            r"stride=\(1, 0\)",
        ),
        (
            (1, 2, 2),
            None,
            TypeError,
            r"window must be an int \(1-D pooling\) or a tuple of 1 or "
            r"2 ints",
        ),
        ((2, 2), (1,), TypeError, r"stride must be None \(= window\), an int or a tuple of 2 ints"),
        (2.0, None, TypeError, r"window must be an int"),
    ],
)
def test_pool_rejects_bad_window_or_stride(window, stride, error, message):
    with pytest.raises(error, match=rf"^max_pool: {message}"):
        fnbp.max_pool(jnp.ones((4, 4, 1)), window, stride)


def test_pool_rejects_too_few_axes_and_integer_input():
    with pytest.raises(
        ValueError,
        match=r"^avg_pool: z must have at least 3 axes "
        r"\(\.\.\., H, W, C\) for 2-D pooling, "
        r"got z\.shape=\(4, 4\)$",
    ):
        fnbp.avg_pool(jnp.ones((4, 4)), (2, 2))
    with pytest.raises(TypeError, match=r"^max_pool: z has dtype int"):
        fnbp.max_pool(jnp.ones((4, 1), jnp.int32), 2)
