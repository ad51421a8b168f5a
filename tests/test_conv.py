"""Conv1D and Conv2D (eqs. 7.48-7.51) against autodiff of a plain tap-by-tap reference.

The reference pads z with ``jnp.pad`` and sums, over the kernel taps j, the
strided slice zpad[s i + d j] times w[j]: the notes' cross-correlation written
out, with no convolution primitive. Its autodiff is the oracle. The notes'
banded-matrix form Q z (eq. 7.49) is built explicitly too, and the forward is
compared with ``jax.lax.conv_general_dilated``.
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
    assert_close,
    normal,
    primitive_names,
    rel_err,
)

import fnbp

# --- independent reference -------------------------------------------------------------


def conv_ref(z, w, b, stride, padding, dilation):
    """u[i] = b + sum_j zpad[s i + d j] @ w[j], over n = w.ndim - 2 spatial axes."""
    n = w.ndim - 2
    lead = z.ndim - n - 1
    zp = jnp.pad(z, [(0, 0)] * lead + list(padding) + [(0, 0)])
    out = [
        (zp.shape[lead + i] - dilation[i] * (w.shape[i] - 1) - 1) // stride[i] + 1 for i in range(n)
    ]
    u = 0.0
    for taps in itertools.product(*(range(k) for k in w.shape[:n])):
        window = tuple(
            slice(d * j, d * j + s * (o - 1) + 1, s)
            for j, d, s, o in zip(taps, dilation, stride, out)
        )
        u = u + zp[(Ellipsis,) + window + (slice(None),)] @ w[taps]
    return u if b is None else u + b


# --- cases -------------------------------------------------------------------------------


def _args(spatial, kernel, C, C2, bias):
    def make(rng, dtype, batch):
        z = normal(rng, batch + spatial + (C,), dtype)
        w = normal(rng, kernel + (C, C2), dtype, scale=0.5)
        return (z, w, normal(rng, (C2,), dtype)) if bias else (z, w)

    return make


def _case(name, rule, n, spatial, kernel, C, C2, bias, stride, padding, dilation, ref_padding):
    settings = dict(stride=stride, padding=padding, dilation=dilation)
    ref_settings = dict(
        stride=(stride,) * n if isinstance(stride, int) else stride,
        padding=ref_padding,
        dilation=(dilation,) * n if isinstance(dilation, int) else dilation,
    )
    if bias:
        f = functools.partial(rule, **settings)
        ref = functools.partial(conv_ref, **ref_settings)
        return Case(
            name, f, ref, _args(spatial, kernel, C, C2, True), diff=(0, 1, 2), shared=(1, 2)
        )
    f = functools.wraps(rule)(lambda z, w: rule(z, w, **settings))
    ref = lambda z, w: conv_ref(z, w, None, **ref_settings)  # noqa: E731
    return Case(name, f, ref, _args(spatial, kernel, C, C2, False), diff=(0, 1), shared=(1,))


CASES = [
    _case(
        "conv1d(stride 2, dilation 2, padding (1, 3))",
        fnbp.conv1d,
        1,
        (9,),
        (3,),
        2,
        3,
        True,
        2,
        (1, 3),
        2,
        [(1, 3)],
    ),
    _case(
        "conv2d(same, no bias)",
        fnbp.conv2d,
        2,
        (5, 4),
        (3, 3),
        2,
        3,
        False,
        1,
        "same",
        1,
        [(1, 1), (1, 1)],
    ),
]
# More settings, each against the float64 oracle (the full contract above runs for
# the two cases; these vary stride, padding, dilation, kernel parity and bias).
SETTINGS = [
    _case(
        "conv1d(valid, even k, stride 3, no bias)",
        fnbp.conv1d,
        1,
        (10,),
        (2,),
        1,
        2,
        False,
        3,
        "valid",
        1,
        [(0, 0)],
    ),
    _case(
        "conv1d(padding 4, dilation 3)", fnbp.conv1d, 1, (5,), (3,), 2, 1, True, 1, 4, 3, [(4, 4)]
    ),
    _case(
        "conv2d(stride (2, 1), dilation (1, 2), padding ((0, 1), 2))",
        fnbp.conv2d,
        2,
        (7, 6),
        (3, 2),
        2,
        3,
        True,
        (2, 1),
        ((0, 1), 2),
        (1, 2),
        [(0, 1), (2, 2)],
    ),
]


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param


class TestConvContract(RuleContract):
    pass


@pytest.mark.parametrize("case", SETTINGS, ids=lambda c: c.name)
def test_vjp_equals_oracle_float64_for_more_settings(case):
    assert_batch_vjp_equals_reference_float64(case)


# --- the notes' forms ------------------------------------------------------------------------


def banded_matrix(w: np.ndarray, m: int) -> np.ndarray:
    """Q of eq. 7.49, channels included: Q[i, c2, t, c] = w[t - i + l, c, c2]."""
    k, C, C2 = w.shape
    l = (k - 1) // 2  # noqa: E741 (the notes' l: a filter of 2l + 1 taps)
    Q = np.zeros((m, C2, m, C))
    for i in range(m):
        for j in range(k):
            t = i - l + j  # 0-based: Conv1D-S(z)_i = sum_j w_j z_{i - l + (j - 1)}
            if 0 <= t < m:
                Q[i, :, t, :] = w[j].T
    return Q


@pytest.mark.parametrize("m,k,C,C2", [(6, 3, 1, 1), (7, 5, 2, 3)])
def test_conv1d_same_is_the_banded_matrix_Qz_of_eq_7_49(m, k, C, C2):
    rng = np.random.default_rng(0)
    z, w, v = (
        rng.standard_normal((m, C)),
        rng.standard_normal((k, C, C2)),
        rng.standard_normal((m, C2)),
    )
    Q = banded_matrix(w, m).reshape(m * C2, m * C)
    if C == C2 == 1:  # the notes' picture: w_1..w_k on the band around the diagonal
        l = (k - 1) // 2  # noqa: E741
        assert np.all(np.triu(Q, l + 1) == 0) and np.all(np.tril(Q, -l - 1) == 0)
        np.testing.assert_array_equal(np.diag(Q, 0), w[l, 0, 0])
    u, res = fnbp.rules.conv1d_fwd(
        jnp.asarray(z), jnp.asarray(w), None, stride=1, padding="same", dilation=1
    )
    assert rel_err(u, (Q @ z.reshape(-1)).reshape(m, C2)) <= 1e-14
    # B[Conv1D, z](v) = Q^T v: the transpose of the same matrix.
    dz, dw, db = fnbp.rules.conv1d_bwd(res, jnp.asarray(v), stride=1, padding="same", dilation=1)
    assert rel_err(dz, (Q.T @ v.reshape(-1)).reshape(m, C)) <= 1e-14
    assert db is None and dw.shape == w.shape


@pytest.mark.parametrize(
    "stride,padding,dilation,lax_padding",
    [
        (1, "same", 1, [(1, 1), (2, 2)]),
        ((2, 3), "valid", (2, 1), "VALID"),
        (2, "same", 1, [(1, 1), (2, 2)]),  # fnbp's "same": l zeros on both sides, any stride
        (1, ((0, 2), 1), (1, 2), [(0, 2), (1, 1)]),
    ],
)
def test_conv2d_forward_equals_lax_conv_general_dilated(stride, padding, dilation, lax_padding):
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.standard_normal((2, 3, 9, 8, 2)))
    w = jnp.asarray(rng.standard_normal((3, 5, 2, 4)))
    b = jnp.asarray(rng.standard_normal(4))
    s = (stride,) * 2 if isinstance(stride, int) else stride
    d = (dilation,) * 2 if isinstance(dilation, int) else dilation
    want = (
        jax.lax.conv_general_dilated(
            z.reshape(6, 9, 8, 2),
            w,
            s,
            lax_padding,
            rhs_dilation=d,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        + b
    )
    got = fnbp.conv2d(z, w, b, stride=stride, padding=padding, dilation=dilation)
    assert got.shape == (2, 3) + want.shape[1:]
    assert rel_err(got.reshape(want.shape), want) <= 1e-14


def test_even_kernel_with_explicit_padding_matches_xla_same():
    rng = np.random.default_rng(2)
    z, w = (
        jnp.asarray(rng.standard_normal((2, 6, 5, 3))),
        jnp.asarray(rng.standard_normal((4, 2, 3, 2))),
    )
    want = jax.lax.conv_general_dilated(
        z, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    got = fnbp.conv2d(z, w, padding=((1, 2), (0, 1)))
    assert rel_err(got, want) <= 1e-14


@pytest.mark.parametrize(
    "m,k,stride,dilation,length",
    [
        (10, 3, 1, 1, 10),
        (10, 3, 2, 1, 5),
        (11, 3, 2, 1, 6),
        (10, 3, 1, 3, 10),
        (9, 5, 3, 1, 3),
    ],
)
def test_conv1d_same_output_length_is_ceil_m_over_stride(m, k, stride, dilation, length):
    u = jax.eval_shape(
        functools.partial(fnbp.conv1d, stride=stride, dilation=dilation),
        jnp.ones((4, m, 2)),
        jnp.ones((k, 2, 3)),
    )
    assert u.shape == (4, length, 3)


def test_conv2d_padding_forms_agree():
    rng = np.random.default_rng(3)
    z, w = (
        jnp.asarray(rng.standard_normal((5, 6, 2))),
        jnp.asarray(rng.standard_normal((3, 3, 2, 2))),
    )
    pairs = fnbp.conv2d(z, w, padding=((1, 1), (2, 2)))
    np.testing.assert_array_equal(fnbp.conv2d(z, w, padding=(1, 2)), pairs)
    np.testing.assert_array_equal(fnbp.conv2d(z, w, padding=["same", (2, 2)]), pairs)
    np.testing.assert_array_equal(fnbp.conv2d(z, w, padding=1), fnbp.conv2d(z, w))
    np.testing.assert_array_equal(fnbp.conv2d(z, w, padding="VALID"), fnbp.conv2d(z, w, padding=0))


# --- the backward is convolutions ------------------------------------------------------------


def test_conv_backward_is_two_convolutions_and_no_dense_matrix():
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.standard_normal((2, 3, 8, 7, 2)))
    w, b = jnp.asarray(rng.standard_normal((3, 3, 2, 4))), jnp.asarray(rng.standard_normal(4))
    u, res = fnbp.rules.conv2d_fwd(z, w, b, stride=2, padding="same", dilation=1)
    v = jnp.ones_like(u)
    names = primitive_names(
        lambda r, v: fnbp.rules.conv2d_bwd(r, v, stride=2, padding="same"), res, v
    )
    assert names.count("conv_general_dilated") == 2  # dz and dw, for all examples at once
    assert "dot_general" not in names
    # The public backward with raw settings equals the rule used by jax.vjp.
    got = fnbp.rules.conv2d_bwd(res, v, stride=2, padding="same")
    want = jax.vjp(lambda z, w, b: fnbp.conv2d(z, w, b, stride=2), z, w, b)[1](v)
    assert_close(got, want, 0.0)


# --- bad input ----------------------------------------------------------------------------------


def test_conv_rejects_channel_mismatch():
    with pytest.raises(
        ValueError,
        match=r"^conv2d: z has 3 channels \(last axis, "
        r"z\.shape=\(2, 5, 5, 3\)\) but w expects C=2 "
        r"\(w\.shape=\(3, 3, 2, 4\) is \(kh, kw, C, C2\)\); "
        r"pass z with shape \(\.\.\., H, W, 2\) or w with C=3$",
    ):
        fnbp.conv2d(jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 2, 4)))


@pytest.mark.parametrize("padding", ["valid", (0, 1)])
def test_conv_rejects_kernel_longer_than_padded_input(padding):
    with pytest.raises(
        ValueError,
        match=r"^conv1d: the kernel \(size 5, dilated size 5\) is "
        r"longer than the padded input \(size 3 \+ padding "
        r"\(0, [01]\) = [34]\), z\.shape=\(2, 3, 1\), "
        r"w\.shape=\(5, 1, 1\)",
    ):
        fnbp.conv1d(jnp.ones((2, 3, 1)), jnp.ones((5, 1, 1)), padding=padding)
    with pytest.raises(
        ValueError,
        match=r"^conv2d: the kernel along W \(size 3, dilated size "
        r"5\) is longer than the padded input",
    ):
        fnbp.conv2d(jnp.ones((6, 4, 1)), jnp.ones((1, 3, 1, 1)), padding="valid", dilation=2)


@pytest.mark.parametrize(
    "fn,kernel,dilation,k_eff,pair",
    [
        ("conv1d", (4,), 1, 4, r"\(1, 2\)"),
        ("conv2d", (3, 2), 1, 2, r"\(0, 1\)"),
    ],
)
def test_conv_refuses_even_kernel_with_same_padding(fn, kernel, dilation, k_eff, pair):
    z = jnp.ones((2,) + (6,) * len(kernel) + (1,))
    w = jnp.ones(kernel + (1, 1))
    with pytest.raises(
        ValueError,
        match=rf"^{fn}: padding='same' needs an odd dilated kernel "
        rf"size along .* got k_eff = dilation \* \(k - 1\) \+ 1 "
        rf"= {k_eff}; fnbp refuses to pad asymmetrically on "
        rf"its own: pass padding={pair} for XLA's 'SAME'",
    ):
        getattr(fnbp, fn)(z, w, dilation=dilation)


def test_even_kernel_with_even_dilation_is_odd_and_allowed():
    u = fnbp.conv1d(jnp.ones((7, 1)), jnp.ones((2, 1, 1)), dilation=2)  # k_eff = 3
    np.testing.assert_array_equal(u[:, 0], [1, 2, 2, 2, 2, 2, 1])


@pytest.mark.parametrize("name", ["stride", "dilation"])
@pytest.mark.parametrize("value", [0, -1, (1, 0)])
def test_conv_rejects_stride_or_dilation_below_one(name, value):
    with pytest.raises(
        ValueError,
        match=rf"^conv2d: {name} must be >= 1 in every spatial "
        rf"axis, got {name}=",
    ):
        fnbp.conv2d(jnp.ones((5, 5, 1)), jnp.ones((3, 3, 1, 1)), **{name: value})


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"stride": 1.5}, TypeError, r"^conv1d: stride must be an int, got stride=1\.5$"),
        ({"padding": "full"}, ValueError, r"^conv1d: padding must be 'same', 'valid', an int or"),
        (
            {"padding": -1},
            ValueError,
            r"^conv1d: padding must be >= 0 \(zeros added\), got "
            r"\(-1, -1\)",
        ),
        (
            {"padding": (1, 2, 3)},
            TypeError,
            r"^conv1d: padding must be 'same', 'valid', an int or "
            r"a \(low, high\) pair of ints, got padding=\(1, 2, 3\)$",
        ),
        ({"padding": ((1, 2, 3),)}, TypeError, r"^conv1d: padding along the length axis must be"),
    ],
)
def test_conv1d_rejects_bad_settings(kwargs, error, message):
    with pytest.raises(error, match=message):
        fnbp.conv1d(jnp.ones((5, 1)), jnp.ones((3, 1, 1)), **kwargs)


def test_conv_rejects_bad_shapes_and_dtypes():
    with pytest.raises(
        ValueError,
        match=r"^conv1d: w must be 3-D \(k, C, C2\), "
        r"got w\.shape=\(3, 1\)$",
    ):
        fnbp.conv1d(jnp.ones((5, 1)), jnp.ones((3, 1)))
    with pytest.raises(
        ValueError,
        match=r"^conv1d: b must have shape \(2,\) to match "
        r"w\.shape=\(3, 1, 2\) \(C2=2 output channels\), "
        r"got b\.shape=\(3,\)$",
    ):
        fnbp.conv1d(jnp.ones((5, 1)), jnp.ones((3, 1, 2)), jnp.ones(3))
    with pytest.raises(
        ValueError,
        match=r"^conv2d: z must have at least 3 axes "
        r"\(\.\.\., H, W, C\), got z\.shape=\(5, 1\)$",
    ):
        fnbp.conv2d(jnp.ones((5, 1)), jnp.ones((3, 3, 1, 1)))
    with pytest.raises(TypeError, match=r"^conv2d: z has dtype int"):
        fnbp.conv2d(jnp.ones((5, 5, 1), jnp.int32), jnp.ones((3, 3, 1, 1)))
