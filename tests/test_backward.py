"""fnbp.backward: B[f, args] is f's own hand-written rule, for every declared
rule (every example of fnbp.catalog.CASES) and for a user's jax.custom_vjp function."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import iter_eqns, jit, rel_err

import fnbp
from fnbp.catalog import CASES

_BY_NAME = {c.name: c for c in CASES}


def _fill(rng, spec):
    """Values for an argument of the catalog's shape and dtype: floats uniform in
    (-1, 1) (scalar settings 0.5, inside every setting's domain), labels 0."""
    if not jnp.issubdtype(spec.dtype, jnp.floating):
        return jnp.zeros(spec.shape, spec.dtype)
    if spec.shape == ():
        return jnp.asarray(0.5, spec.dtype)
    return jnp.asarray(rng.uniform(-1.0, 1.0, spec.shape), spec.dtype)


@functools.cache
def _at(name):
    """A case's rule with its settings, float64 arguments and a random cotangent.

    Shapes and dtypes come from the catalog's ``make_args``; values from numpy.
    """
    case = _BY_NAME[name]
    specs = case.make_args(jax.random.PRNGKey(0), jnp.dtype(jnp.float64))
    rng = np.random.default_rng(0)
    args = tuple(_fill(rng, spec) for spec in specs)
    rule = functools.partial(case.rule, **case.kwargs)
    out = jax.eval_shape(rule, *args)
    return rule, args, jnp.asarray(rng.standard_normal(out.shape), out.dtype)


def _is_integer(x):
    return x is None or not jnp.issubdtype(jnp.result_type(x), jnp.floating)


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param


def test_catalog_lists_every_declared_rule():
    assert {c.rule.__name__ for c in CASES} == set(fnbp.rules.registry())


def test_rule_jaxpr_holds_its_custom_vjp(case):
    """The forward of every rule is one custom_vjp_call wired to its public ``_bwd``."""
    rule, args, _ = _at(case.name)
    jaxpr = jax.make_jaxpr(rule)(*args)
    calls = [e for e in iter_eqns(jaxpr.jaxpr) if e.primitive.name == "custom_vjp_call"]
    assert calls, f"{case.name}: no custom_vjp_call in\n{jaxpr}"
    assert f"bwd={case.rule.__name__}_bwd" in str(jaxpr)


def test_backward_equals_jax_vjp(case):
    rule, args, v = _at(case.name)
    got, want = jit(lambda a, v: (fnbp.backward(rule, *a)(v), jax.vjp(rule, *a)[1](v)))(args, v)
    assert len(got) == len(args)
    for g, w, x in zip(got, want, args):
        if _is_integer(x):
            assert g is None
        else:
            assert g.shape == x.shape and g.dtype == x.dtype
            assert rel_err(g, w) <= 1e-15


def test_jax_vjp_is_the_public_fwd_and_bwd(case):
    """jax.vjp through a rule gives exactly ``f_bwd(f_fwd(args).residuals, v)``.

    Static settings are keyword arguments of both (``gelu_bwd(res, v, approximate=True)``).
    """
    rule, args, v = _at(case.name)
    name = case.rule.__name__
    fwd, bwd = getattr(fnbp.rules, f"{name}_fwd"), getattr(fnbp.rules, f"{name}_bwd")

    def both(args, v):
        out, residuals = fwd(*args, **case.kwargs)
        vjp_out, pull = jax.vjp(rule, *args)
        return (out, bwd(residuals, v, **case.kwargs)), (vjp_out, pull(v))

    (out, by_hand), (vjp_out, by_vjp) = jit(both)(args, v)
    assert len(by_hand) == len(args)
    assert rel_err(vjp_out, out) <= 1e-15
    for mine, theirs, x in zip(by_hand, by_vjp, args):
        if _is_integer(x):
            assert mine is None
        else:
            assert rel_err(theirs, mine) <= 1e-15


# --- any custom_vjp function, a user's too --------------------------------------------


@jax.custom_vjp
def clip_gradient(x):
    """The identity, whose backward clips the cotangent to [-1, 1]."""
    return x


def clip_gradient_fwd(x):
    return x, None


def clip_gradient_bwd(_, v):
    return (jnp.clip(v, -1.0, 1.0),)


clip_gradient.defvjp(clip_gradient_fwd, clip_gradient_bwd)


def test_backward_of_a_user_custom_vjp_uses_its_rule():
    x = jnp.arange(4.0)
    v = jnp.array([-3.0, 0.5, 2.0, -0.25])
    (dx,) = fnbp.backward(clip_gradient, x)(v)
    np.testing.assert_array_equal(dx, [-1.0, 0.5, 1.0, -0.25])  # autodiff would give v


def test_backward_of_a_composite_chains_the_rules_under_jit():
    rng = np.random.default_rng(3)
    x, W, b = (jnp.asarray(rng.standard_normal(s)) for s in ((5, 4), (3, 4), (3,)))
    y = jnp.array([0, 2, 1, 1, 0])

    def loss(x, W, b, y):
        return fnbp.cross_entropy_loss(fnbp.relu(fnbp.mm(clip_gradient(x), W, b)), y)

    v = jnp.asarray(rng.standard_normal(5))

    def both(x, W, b, y, v):
        B = fnbp.backward(loss, x, W, b, y)
        return B(v), jax.vjp(lambda x, W, b: loss(x, W, b, y), x, W, b)[1](v)

    (dx, dW, db, dy), want = jit(both)(x, W, b, y, v)
    assert dy is None
    assert rel_err((dx, dW, db), want) <= 1e-15


def test_backward_returns_none_for_integer_labels_and_missing_bias():
    _, (t, y), v = _at("cross_entropy_loss")
    dt, dy = fnbp.backward(fnbp.cross_entropy_loss, t, y)(v)
    assert dy is None and dt.shape == t.shape
    _, (z, W, _), v = _at("mm")
    dz, dW, db = fnbp.backward(fnbp.mm, z, W, None)(v)
    assert db is None and dz.shape == z.shape and dW.shape == W.shape


def test_backward_rejects_a_function_without_custom_vjp():
    def plain(z):
        return jnp.sin(z) * 2.0

    with pytest.raises(
        ValueError,
        match=r"^backward: plain has no jax\.custom_vjp rule, so "
        r"B\[plain, z\] would come from autodiff; define it "
        r"with jax\.custom_vjp and defvjp\(fwd, bwd\)$",
    ):
        fnbp.backward(plain, jnp.ones(3))


def test_backward_rejects_a_non_callable():
    with pytest.raises(TypeError, match=r"^backward: f must be callable, got ndarray$"):
        fnbp.backward(np.ones(3), jnp.ones(3))
