"""fnbp.jvp, fnbp.linearize and fnbp.jacfwd against jax.jvp of plain-jnp reference networks.

Forward mode chains each layer's hand-written forward function F (the mirror of
Algorithm 3). The oracle is ``jax.jvp`` of the independent reference networks
of tests/_networks.py in float64, along random tangents of the parameters and
of the input, for every case (mlp, cnn, resnet_s, layer norm and RMSNorm,
sequences, remat); a layer whose F is deliberately wrong shows up in fnbp.jvp,
so it is F that runs, not autodiff of the forward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _networks import CASES, COMPILE, problem, random_params, ref_cross_entropy, scale_layer
from _oracle import rel_err
from jax.flatten_util import ravel_pytree
from test_curvature import explicit_ggn, ref_logistic, ref_mse

import fnbp

F64_RTOL = 1e-10


def directions(params, x, seed=3):
    rng = np.random.default_rng(seed)
    dparams = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)
    return dparams, jnp.asarray(rng.standard_normal(x.shape))


@functools.partial(jax.jit, static_argnums=(0,), compiler_options=COMPILE)
def fnbp_jvp(model, params, x, dparams, dx):
    return fnbp.jvp(model.apply, (params, x), (dparams, dx))


@pytest.mark.parametrize("case", list(CASES))
def test_jvp_of_the_model_equals_jax_jvp_of_the_reference(case):
    model, ref, params, x, _ = problem(case)
    dparams, dx = directions(params, x)
    out, tangent = fnbp_jvp(model, params, x, dparams, dx)
    want_out, want = jax.jvp(ref, (params, x), (dparams, dx))
    assert tangent.shape == want.shape and tangent.dtype == jnp.float64
    assert rel_err(out, want_out) <= F64_RTOL
    assert rel_err(tangent, want) <= F64_RTOL


@pytest.mark.parametrize("case", ["mlp", "resnet_s"])
def test_jvp_of_a_loss_linearize_and_vmap(case):
    model, ref, params, x, y = problem(case)
    dparams, _ = directions(params, x)

    def loss(p):
        return jnp.mean(fnbp.cross_entropy_loss(model.apply(p, x), y))

    def ref_loss(p):
        return jnp.mean(ref_cross_entropy(ref(p, x), y))

    J, dJ = jax.jit(lambda p, t: fnbp.jvp(loss, (p,), (t,)))(params, dparams)
    want_J, want = jax.jvp(ref_loss, (params,), (dparams,))
    assert rel_err(J, want_J) <= F64_RTOL and rel_err(dJ, want) <= F64_RTOL
    # linearize: the forward pass once, then F on any tangent (here under vmap)
    _, f_jvp = fnbp.linearize(loss, params)
    scales = jnp.asarray([1.0, -0.5, 2.0])
    batched = jax.vmap(lambda s: f_jvp(jax.tree_util.tree_map(lambda t: s * t, dparams)))(scales)
    assert rel_err(batched, scales * want) <= F64_RTOL


def test_jacfwd_equals_jax_jacfwd_of_the_reference():
    model, ref, params, x, _ = problem("mlp")
    jac = fnbp.jacfwd(model.apply, argnums=1)(params, x[:2])
    assert rel_err(jac, jax.jacfwd(ref, argnums=1)(params, x[:2])) <= F64_RTOL


def test_jvp_runs_each_layers_own_forward_function():
    """A layer whose F is twice its derivative gives twice the tangent through fnbp.jvp."""

    def init(key, input_shape, dtype=jnp.float32):
        return tuple(input_shape), ()

    def forward(params, z):
        return jnp.sin(z), z

    def backward(params, z, v):
        return (), jnp.cos(z) * v

    def doubled(params, z, dparams, dz):
        return 2 * jnp.cos(z) * dz

    sine = fnbp.make_layer("sine", init, forward, backward, tangent=doubled)
    z = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    _, tangent = fnbp.jvp(lambda z: sine.apply((), z), (z,), (jnp.ones_like(z),))
    assert rel_err(tangent, 2 * jnp.cos(z)) <= 1e-15
    model = fnbp.serial(fnbp.Linear(3), sine)
    _, params = model.init(jax.random.key(0), (3,), jnp.float64)
    dparams = jax.tree_util.tree_map(jnp.zeros_like, params)
    _, tangent = fnbp.jvp(model.apply, (params, z), (dparams, jnp.ones_like(z)))
    u = fnbp.mm(z, params[0]["W"], params[0]["b"])
    want = 2 * jnp.cos(u) * fnbp.mm(jnp.ones_like(z), params[0]["W"])
    assert rel_err(tangent, want) <= 1e-14


def test_jvp_names_a_layer_without_a_forward_function():
    model = fnbp.serial(fnbp.Linear(3), scale_layer("scaled"), name="net")
    _, params = model.init(jax.random.key(0), (4,), jnp.float64)
    x = jnp.ones((2, 4))
    dparams = jax.tree_util.tree_map(jnp.zeros_like, params)
    with pytest.raises(NotImplementedError, match=r"layer net\[1\] \(scaled\) has no forward"):
        fnbp.jvp(model.apply, (params, x), (dparams, x))


def test_jvp_refuses_bad_arguments_and_explains_a_foreign_custom_vjp():
    with pytest.raises(TypeError, match="jvp: primals and tangents must be tuples"):
        fnbp.jvp(jnp.sin, jnp.ones(2), jnp.ones(2))
    with pytest.raises(ValueError, match="one entry per argument of f each, got 1 and 2"):
        fnbp.jvp(jnp.sin, (jnp.ones(2),), (jnp.ones(2), jnp.ones(2)))

    @jax.custom_vjp
    def foreign(z):
        return z

    def foreign_fwd(z):
        return z, None

    def foreign_bwd(_, v):
        return (v,)

    foreign.defvjp(foreign_fwd, foreign_bwd)
    with pytest.raises(TypeError, match="custom_vjp whose backward rule is foreign_bwd"):
        fnbp.jvp(lambda z: fnbp.relu(foreign(z)), (jnp.ones(2),), (jnp.ones(2),))
    # a model jitted on its own and traced before in reverse mode: its cached custom_vjp
    model, _, params, x, _ = problem("mlp")
    apply = jax.jit(model.apply)
    jax.grad(lambda p: jnp.sum(apply(p, x)))(params)
    with pytest.raises(TypeError, match="jit the whole fnbp.jvp call"):
        fnbp.jvp(lambda p: apply(p, x), (params,), (params,))


def test_reverse_mode_is_unchanged_after_forward_mode():
    """The mode is a tracing-time switch: grad after jvp still runs B (a custom_vjp)."""
    model, ref, params, x, y = problem("mlp")
    dparams, dx = directions(params, x)
    fnbp.jvp(model.apply, (params, x), (dparams, dx))
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, x))(params)
    assert any("custom_vjp" in str(e.primitive) for e in jaxpr.jaxpr.eqns)
    jaxpr = jax.make_jaxpr(lambda p, t: fnbp.jvp(lambda p: model.apply(p, x), (p,), (t,)))(
        params, dparams
    )
    assert not any("custom_vjp" in str(e.primitive) for e in jaxpr.jaxpr.eqns)


# --- curvature-vector products ---------------------------------------------------------------


@pytest.mark.parametrize("case", ["mlp", "cnn-2d", "resnet_s", "layer_norm-rms_norm", "remat"])
def test_ggn_vp_is_the_explicit_ggn_times_v(case):
    model, ref, params, x, y = problem(case)
    G = np.asarray(explicit_ggn(ref, ref_cross_entropy, params, x, y))
    v, _ = directions(params, x)
    Gv = jax.jit(lambda p, v: fnbp.ggn_vp(model, fnbp.cross_entropy_loss, p, x, y)(v))(params, v)
    assert jax.tree_util.tree_structure(Gv) == jax.tree_util.tree_structure(params)
    assert rel_err(ravel_pytree(Gv)[0], G @ np.asarray(ravel_pytree(v)[0])) <= F64_RTOL


@pytest.mark.parametrize("loss", ["mse_loss", "logistic_loss"])
def test_ggn_vp_of_the_other_losses(loss):
    model, ref, params, x, _ = problem("mlp")
    rng = np.random.default_rng(4)
    if loss == "mse_loss":
        y, ref_loss = jnp.asarray(rng.standard_normal((x.shape[0], 3))), ref_mse
    else:
        model = fnbp.mlp([5, 4, 1])
        params = random_params(model, (4,))
        y, ref_loss = jnp.asarray(rng.random((x.shape[0], 1))), ref_logistic
    G = np.asarray(explicit_ggn(ref, ref_loss, params, x, y))
    v, _ = directions(params, x)
    Gv = fnbp.ggn_vp(model, getattr(fnbp, loss), params, x, y)(v)
    assert rel_err(ravel_pytree(Gv)[0], G @ np.asarray(ravel_pytree(v)[0])) <= F64_RTOL


@pytest.mark.parametrize("case", ["mlp", "resnet_s", "layer_norm-rms_norm"])
def test_hvp_is_the_hessian_of_the_reference_objective_times_v(case):
    model, ref, params, x, y = problem(case)
    flat, unravel = ravel_pytree(params)

    def objective(f):
        return jnp.mean(ref_cross_entropy(ref(unravel(f), x), y))

    H = np.asarray(jax.hessian(objective)(flat))
    v, _ = directions(params, x)
    Hv = jax.jit(lambda p, v: fnbp.hvp(model, fnbp.cross_entropy_loss, p, x, y)(v))(params, v)
    assert rel_err(ravel_pytree(Hv)[0], H @ np.asarray(ravel_pytree(v)[0])) <= F64_RTOL


def test_ggn_vp_refuses_a_loss_without_a_hessian_factor():
    model, _, params, x, y = problem("mlp")
    with pytest.raises(TypeError, match="ggn_vp: the loss must declare its Hessian"):
        fnbp.ggn_vp(model, lambda t, y: fnbp.cross_entropy_loss(t, y), params, x, y)


def test_jvp_of_a_model_under_a_precision_policy():
    """The cast network's F: tangents in the compute dtype, the output tangent cast out."""
    model = fnbp.mlp([8, 3])
    _, params = model.init(jax.random.key(0), (4,), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (5, 4))
    dparams = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.1), params)
    mixed = fnbp.with_precision(model, "bfloat16")
    out, tangent = fnbp.jvp(lambda p: mixed.apply(p, x), (params,), (dparams,))
    _, want = fnbp.jvp(lambda p: model.apply(p, x), (params,), (dparams,))
    assert out.dtype == tangent.dtype == mixed.apply(params, x).dtype
    np.testing.assert_allclose(np.asarray(tangent, np.float32), want, rtol=0.05, atol=0.05)


# --- the top eigenvalues ----------------------------------------------------------------------


def test_top_eigenvalues_of_the_ggn_and_the_hessian_equal_numpys():
    model, ref, params, x, y = problem("mlp")
    G = np.asarray(explicit_ggn(ref, ref_cross_entropy, params, x, y))
    matvec = fnbp.ggn_vp(model, fnbp.cross_entropy_loss, params, x, y)
    values, vectors = jax.jit(lambda p: fnbp.top_eigenvalues(matvec, p, k=3))(params)
    want = np.sort(np.linalg.eigvalsh(G))[::-1][:3]
    assert values.shape == (3,) and rel_err(values, want) <= 1e-8
    for i in range(3):  # unit Ritz vectors with G u = lambda u
        u = np.asarray(ravel_pytree(jax.tree_util.tree_map(lambda a: a[i], vectors))[0])
        assert abs(np.linalg.norm(u) - 1) <= 1e-10
        assert np.max(np.abs(G @ u - want[i] * u)) <= 1e-6 * want[0]
    flat, unravel = ravel_pytree(params)
    H = np.asarray(jax.hessian(lambda f: jnp.mean(ref_cross_entropy(ref(unravel(f), x), y)))(flat))
    top, _ = fnbp.top_eigenvalues(
        fnbp.hvp(model, fnbp.cross_entropy_loss, params, x, y), params, k=2, key=jax.random.key(3)
    )
    assert rel_err(top, np.sort(np.linalg.eigvalsh(H))[::-1][:2]) <= 1e-8


def test_top_eigenvalues_refuses_bad_arguments():
    params = {"a": jnp.ones(3)}
    with pytest.raises(ValueError, match="top_eigenvalues: k must be a positive int"):
        fnbp.top_eigenvalues(lambda v: v, params, k=0)
    with pytest.raises(ValueError, match="k must be at most the number of entries, 3; got 4"):
        fnbp.top_eigenvalues(lambda v: v, params, k=4)
    with pytest.raises(ValueError, match="iterations must be between k = 2 and"):
        fnbp.top_eigenvalues(lambda v: v, params, k=2, iterations=1)
