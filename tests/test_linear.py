"""MM (eq. 7.35): the rule against autodiff of a plain reference, its batched
weight cotangent as one contraction, and its trace-time errors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import Case, RuleContract, iter_eqns

import fnbp

M, N = 6, 3  # z in R^m, W in R^{n x m}


def mm_ref(z, W, b):
    """W z + b per example, as a broadcast product and a sum (no dot_general)."""
    return jnp.sum(z[..., None, :] * W, axis=-1) + b


def mm_no_bias_ref(z, W):
    return jnp.sum(z[..., None, :] * W, axis=-1)


def _mm_args(rng, dtype, batch):
    z, W, b = (rng.standard_normal(s) for s in (batch + (M,), (N, M), (N,)))
    return tuple(jnp.asarray(x, dtype) for x in (z, W, b))


def _mm_no_bias_args(rng, dtype, batch):
    return _mm_args(rng, dtype, batch)[:2]


CASES = [
    Case("mm", fnbp.mm, mm_ref, _mm_args, diff=(0, 1, 2), shared=(1, 2)),
    Case("mm(b=None)", fnbp.mm, mm_no_bias_ref, _mm_no_bias_args, diff=(0, 1), shared=(1,)),
]


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param


class TestMMContract(RuleContract):
    pass


def test_mm_backward_is_the_notes_formulas():
    """B[MM, z](v) = W^T v (7.63), B[MM, W](v) = v z^T (7.65), B[MM, b](v) = v (7.66)."""
    rng = np.random.default_rng(0)
    z, W, b, v = (jnp.asarray(rng.standard_normal(s)) for s in ((M,), (N, M), (N,), (N,)))
    dz, dW, db = fnbp.rules.mm_bwd(fnbp.rules.mm_fwd(z, W, b)[1], v)
    np.testing.assert_allclose(dz, W.T @ v, rtol=1e-14)
    np.testing.assert_allclose(dW, np.outer(v, z), rtol=1e-14)
    np.testing.assert_array_equal(db, v)
    assert fnbp.rules.mm_bwd(fnbp.rules.mm_fwd(z, W)[1], v)[2] is None


# --- the batched weight cotangent is one matmul ------------------------------------------


@pytest.mark.parametrize("batch", [(20,), (4, 5)], ids=str)
@pytest.mark.parametrize("jit", [False, True], ids=["plain", "jit"])
def test_mm_batched_weight_cotangent_is_one_contraction(batch, jit):
    n, m = 3, 7
    rng = np.random.default_rng(1)
    Z = jnp.asarray(rng.standard_normal(batch + (m,)))
    V = jnp.asarray(rng.standard_normal(batch + (n,)))
    W = jnp.asarray(rng.standard_normal((n, m)))
    b = jnp.asarray(rng.standard_normal((n,)))
    grad_W = jax.grad(lambda W: jnp.sum(V * fnbp.mm(Z, W, b)))
    if jit:
        grad_W = jax.jit(grad_W)
    jaxpr = jax.make_jaxpr(grad_W)(W)
    eqns = list(iter_eqns(jaxpr.jaxpr))

    examples = tuple(range(len(batch)))
    weight_dots = [
        e for e in eqns if e.primitive.name == "dot_general" and e.outvars[0].aval.shape == (n, m)
    ]
    assert len(weight_dots) == 1, weight_dots
    (contract, batch_dims) = weight_dots[0].params["dimension_numbers"]
    assert contract == (examples, examples) and batch_dims == ((), ())

    per_example_size = int(np.prod(batch)) * n * m
    for e in eqns:
        for var in list(e.invars) + list(e.outvars):
            shape = getattr(getattr(var, "aval", None), "shape", ())
            assert not (len(shape) > 2 and shape[-2:] == (n, m)), (e, shape)
            assert int(np.prod(shape)) < per_example_size, (e, shape)
    want = np.asarray(V).reshape(-1, n).T @ np.asarray(Z).reshape(-1, m)  # V^T Z
    np.testing.assert_allclose(grad_W(W), want, rtol=1e-12)


# --- bad input ---------------------------------------------------------------------------


def _bad_mm(z=(5, M), W=(N, M), b=(N,)):
    """Arguments of mm with the given shapes (valid by default)."""
    return jnp.ones(z), jnp.ones(W), jnp.ones(b)


@pytest.mark.parametrize("W_shape", [(M,), (2, N, M)], ids=str)
def test_mm_rejects_W_not_2d(W_shape):
    message = f"mm: W must be 2-D (n outputs, m inputs), got W.shape={W_shape}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fnbp.mm(*_bad_mm(W=W_shape))


def test_mm_rejects_feature_mismatch():
    with pytest.raises(
        ValueError,
        match=r"^mm: z has 5 features but W expects 6 "
        r"\(W\.shape=\(3, 6\), z\.shape=\(4, 5\)\); pass z "
        r"with shape \(\.\.\., 6\) or W with shape \(3, 5\)$",
    ):
        fnbp.mm(*_bad_mm(z=(4, 5)))


@pytest.mark.parametrize("b_shape", [(4,), (1, N), ()], ids=str)
def test_mm_rejects_b_of_wrong_shape(b_shape):
    with pytest.raises(
        ValueError,
        match=r"^mm: b must have shape \(3,\) to match "
        r"W\.shape=\(3, 6\), got b\.shape=",
    ):
        fnbp.mm(*_bad_mm(b=b_shape))


def test_mm_rejects_scalar_z():
    with pytest.raises(ValueError, match=r"^mm: z must have at least 1 axes \(\.\.\., m\)"):
        fnbp.mm(jnp.float32(1.0), jnp.ones((N, 1)))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64], ids=["int", "complex"])
@pytest.mark.parametrize("name", ["z", "W", "b"])
def test_mm_rejects_non_float_arguments(name, dtype):
    z, W, b = _bad_mm()
    args = {"z": z, "W": W, "b": b}
    args[name] = jnp.ones(args[name].shape, dtype)
    with pytest.raises(
        TypeError,
        match=rf"^mm: {name} has dtype {jnp.dtype(dtype)}, but a "
        r"real floating dtype is needed",
    ):
        fnbp.mm(**args)
