"""The GGN's diagonal and K-FAC's factors (fnbp/curvature.py) against an explicit GGN.

The oracle is the generalized Gauss-Newton matrix built in float64 from the
independent plain-jnp reference networks of tests/_networks.py::

    G = (1/N) J^T H J,   J = jax.jacrev(reference network)(params),
                         H = jax.hessian(sum of the reference loss)(t)

(N the number of loss values, H block-diagonal over them). fnbp's exact
diagonal, its per-example diagonal and, with one example, its KFLR blocks
must equal the matching entries of G to 1e-10; the Monte-Carlo estimates'
means over many keys must be within five standard errors of the exact ones.
The losses' Hessian factors are checked against ``jax.hessian`` of their
references, their samplers' outer products against the Hessian.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _networks import CASES, COMPILE, K, N, problem, random_params, ref_cross_entropy
from _oracle import iter_eqns, rel_err
from jax.flatten_util import ravel_pytree

import fnbp
from fnbp.rules import registry

F64_RTOL = 1e-10


def ref_mse(t, y):
    return 0.5 * jnp.sum((t - y) ** 2, axis=-1)


def ref_logistic(t, y):
    return y * jnp.log1p(jnp.exp(-t)) + (1 - y) * jnp.log1p(jnp.exp(t))


# --- 1. the losses carry their curvature ------------------------------------------------

LOSSES = {
    "mse_loss": (fnbp.mse_loss, ref_mse, lambda rng, s: rng.standard_normal(s + (4,))),
    "logistic_loss": (fnbp.logistic_loss, ref_logistic, lambda rng, s: rng.random(s)),
    "cross_entropy_loss": (
        fnbp.cross_entropy_loss,
        ref_cross_entropy,
        lambda rng, s: rng.integers(0, 4, s).astype(np.int32),
    ),
}


def loss_problem(name: str, batch: tuple[int, ...], scale: float = 2.0):
    _, _, labels = LOSSES[name]
    rng = np.random.default_rng(3)
    t_shape = batch if name == "logistic_loss" else batch + (4,)
    return jnp.asarray(scale * rng.standard_normal(t_shape)), jnp.asarray(labels(rng, batch))


def hessian_per_value(ref, t, y, r):
    """H_l = d^2 loss_l / dt_l^2 of every loss value l, shape (L, r, r): the diagonal
    blocks of jax.hessian of the summed loss (r = 1 for one logit per value)."""
    H = jax.hessian(lambda t: jnp.sum(ref(t, y)))(t)
    L = t.size // r
    H = np.asarray(H).reshape(L, r, L, r)
    return np.stack([H[i, :, i, :] for i in range(L)])


@pytest.mark.parametrize("batch", [(5,), (3, 2)], ids=["examples", "positions"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_hessian_factor_equals_jax_hessian_of_the_reference(name, batch):
    rule = registry()[name]
    _, ref, _ = LOSSES[name]
    t, y = loss_problem(name, batch)
    S = rule.hooks["hessian_factor"](t, y)
    assert S.shape[:-1] == t.shape and S.dtype == jnp.float64
    r = 1 if name == "logistic_loss" else t.shape[-1]
    got = jnp.einsum("lac,lbc->lab", S.reshape(-1, r, S.shape[-1]), S.reshape(-1, r, S.shape[-1]))
    assert rel_err(got, hessian_per_value(ref, t, y, r)) <= F64_RTOL


@pytest.mark.parametrize("name", ["logistic_loss", "cross_entropy_loss"])
def test_loss_hessian_factor_is_finite_for_large_logits(name):
    t, y = loss_problem(name, (4,), scale=1e4)
    for dtype in (jnp.float32, jnp.float64, jnp.bfloat16):
        S = registry()[name].hooks["hessian_factor"](t.astype(dtype), y)
        assert S.dtype == jnp.promote_types(dtype, jnp.float32)
        assert np.all(np.isfinite(np.asarray(S, np.float64)))


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_sample_grad_outer_products_average_to_the_hessian(name):
    """E[g g^T] = H: the mean of 40,000 draws within five standard errors."""
    rule = registry()[name]
    _, ref, _ = LOSSES[name]
    t, y = loss_problem(name, (3,))
    draws = 40_000
    keys = jax.random.split(jax.random.key(0), draws)
    g = jax.vmap(lambda k: rule.hooks["sample_grad"](t, y, k))(keys)
    assert g.shape == (draws,) + t.shape
    g = np.asarray(g).reshape(draws, 3, -1)
    outer = np.einsum("sla,slb->slab", g, g)
    mean, se = outer.mean(0), outer.std(0) / np.sqrt(draws)
    H = hessian_per_value(ref, t, y, g.shape[-1])
    assert np.all(np.abs(mean - H) <= 5 * se + 1e-12), np.max(np.abs(mean - H) / (se + 1e-12))
    # E[g] = 0: the sampled gradient is a score, so cross terms vanish in expectation.
    assert np.all(np.abs(g.mean(0)) <= 5 * g.std(0) / np.sqrt(draws) + 1e-12)


# --- the explicit GGN of a reference network ------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=COMPILE)
def explicit_ggn(ref, ref_loss, params, x, y):
    """(1/N) J^T H J in float64, N the loss values; rows/columns in ravel_pytree's order."""
    flat, unravel = ravel_pytree(params)
    t = ref(params, x)
    jac = jax.jacrev(lambda f: ref(unravel(f), x))(flat).reshape(t.size, -1)
    count = ref_loss(t, y).size
    H = jax.hessian(lambda t: jnp.sum(ref_loss(t, y)))(t).reshape(t.size, t.size)
    return jac.T @ H @ jac / count


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6), compiler_options=COMPILE)
def fnbp_diag(model, loss, params, x, y, mc_samples=0, per_example=False, key=None):
    return fnbp.diag_ggn(
        model, loss, params, x, y, mc_samples=mc_samples, key=key, per_example=per_example
    )


@pytest.mark.parametrize("case", list(CASES))
def test_diag_ggn_equals_the_explicit_ggn_diagonal(case):
    model, ref, params, x, y = problem(case)
    G = np.asarray(explicit_ggn(ref, ref_cross_entropy, params, x, y))
    J, grads, diag = fnbp_diag(model, fnbp.cross_entropy_loss, params, x, y)
    J_bp, grads_bp = jax.jit(fnbp.backprop, static_argnums=(0, 1))(
        model, fnbp.cross_entropy_loss, params, x, y
    )
    assert jax.tree_util.tree_structure(diag) == jax.tree_util.tree_structure(params)
    assert rel_err(flat(diag), np.diag(G)) <= F64_RTOL
    assert rel_err(grads, grads_bp) <= 1e-14 and abs(float(J) - float(J_bp)) <= 1e-14


@pytest.mark.parametrize("case", list(CASES))
def test_per_example_diag_ggn_equals_each_examples_explicit_diagonal(case):
    model, ref, params, x, y = problem(case)
    J, grads, diag = fnbp_diag(model, fnbp.cross_entropy_loss, params, x, y, 0, True)
    leaves = jax.tree_util.tree_leaves(diag)
    assert all(leaf.shape[0] == N for leaf in leaves)
    want = np.stack(
        [
            np.diag(explicit_ggn(ref, ref_cross_entropy, params, x[i : i + 1], y[i : i + 1])) / N
            for i in range(N)
        ]
    )
    got = np.stack([flat(jax.tree_util.tree_map(lambda d: d[i], diag)) for i in range(N)])
    assert rel_err(got, want) <= F64_RTOL
    _, grads_bp = fnbp.backprop(model, fnbp.cross_entropy_loss, params, x, y)
    assert rel_err(grads, grads_bp) <= 1e-13


@pytest.mark.parametrize("loss", ["mse_loss", "logistic_loss"])
def test_diag_ggn_of_the_other_losses_equals_the_explicit_ggn_diagonal(loss):
    model, ref, params, x, _ = problem("mlp")
    rng = np.random.default_rng(4)
    if loss == "mse_loss":
        y, ref_loss = jnp.asarray(rng.standard_normal((N, K))), ref_mse
    else:  # one logit per example, t and y of shape (n, 1)
        model = fnbp.mlp([5, 4, 1])
        params = random_params(model, (4,))
        y, ref_loss = jnp.asarray(rng.random((N, 1))), ref_logistic
    G = np.asarray(explicit_ggn(ref, ref_loss, params, x, y))
    _, _, diag = fnbp_diag(model, getattr(fnbp, loss), params, x, y)
    assert rel_err(flat(diag), np.diag(G)) <= F64_RTOL


def test_mc_diag_ggn_is_an_unbiased_estimate_of_the_exact_diagonal():
    """The mean over 2,000 keys is within five standard errors of the exact diagonal."""
    model, _, params, x, y = problem("mlp")
    _, _, exact = fnbp_diag(model, fnbp.cross_entropy_loss, params, x, y)
    keys = jax.random.split(jax.random.key(1), 2000)
    draws = jax.jit(
        jax.vmap(
            lambda k: fnbp.diag_ggn(
                model, fnbp.cross_entropy_loss, params, x, y, mc_samples=2, key=k
            )
        ),
        compiler_options=COMPILE,
    )(keys)
    J, grads, est = draws
    est = np.asarray(jax.vmap(lambda d: ravel_pytree(d)[0])(est))  # (keys, P)
    mean, se = est.mean(0), est.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(mean - flat(exact)) <= 5 * se + 1e-15)
    assert np.all(est >= 0)
    # Every draw's gradient is backprop's.
    _, grads_bp = fnbp.backprop(model, fnbp.cross_entropy_loss, params, x, y)
    assert rel_err(jax.tree_util.tree_map(lambda g: g[0], grads), grads_bp) <= 1e-14


def test_the_columns_travel_as_one_batched_backward_pass():
    """The program of the exact diagonal has as many equations for 10 classes as for 3."""

    def size(classes):
        model = fnbp.mlp([5, classes])
        params = model.init(jax.random.key(0), (4,), jnp.float64)[1]
        x, y = jnp.ones((6, 4)), jnp.zeros((6,), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda p: fnbp.diag_ggn(model, fnbp.cross_entropy_loss, p, x, y))(
            params
        )
        return sum(1 for _ in iter_eqns(jaxpr.jaxpr))

    assert size(3) == size(10)


# --- 3. Kronecker factors -------------------------------------------------------------------


def layer_blocks(params):
    """For each Linear layer in params: (its path, the flat indices of [W | b], row-major)."""
    flat_params, unravel = ravel_pytree(params)
    index = unravel(jnp.arange(flat_params.size, dtype=jnp.float64))
    blocks = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        index, is_leaf=lambda a: isinstance(a, dict) and "W" in a
    ):
        if not (isinstance(leaf, dict) and "W" in leaf):
            continue
        W = np.asarray(leaf["W"], int)
        cols = [W] + ([np.asarray(leaf["b"], int)[:, None]] if "b" in leaf else [])
        blocks.append((path, np.concatenate(cols, axis=1).reshape(-1)))
    return blocks


def factors_at(factors, path):
    node = factors
    for key in path:
        node = node[key.idx] if hasattr(key, "idx") else node[key.key]
    return node


KFLR_CASES = ["mlp", "resnet_s", "layer_norm-rms_norm", "remat"]


@functools.partial(jax.jit, static_argnums=(0, 1, 5), compiler_options=COMPILE)
def fnbp_kfac(model, loss, params, x, y, kind="exact", key=None):
    return fnbp.kfac_factors(model, loss, params, x, y, kind=kind, key=key)


@pytest.mark.parametrize("case", KFLR_CASES)
def test_kflr_with_one_example_is_each_layers_exact_ggn_block(case):
    model, ref, params, x, y = problem(case)
    x, y = x[:1], y[:1]
    G = np.asarray(explicit_ggn(ref, ref_cross_entropy, params, x, y))
    J, grads, factors = fnbp_kfac(model, fnbp.cross_entropy_loss, params, x, y)
    blocks = layer_blocks(params)
    assert blocks
    for path, idx in blocks:
        A, B = factors_at(factors, path)
        assert rel_err(np.kron(B, A), G[np.ix_(idx, idx)]) <= F64_RTOL, path


def deep_linear(widths, *, bias=True):
    return fnbp.serial(*[fnbp.Linear(w, bias=bias) for w in widths], name="deep_linear")


def ref_deep_linear(params, x):
    for p in params:
        x = jnp.einsum("...m,nm->...n", x, p["W"]) + (p["b"] if "b" in p else 0)
    return x


@pytest.mark.parametrize("shape", [(4,), (5, 4)], ids=["vectors", "sequences"])
def test_kflr_of_a_deep_linear_network_with_mse_is_exact_for_every_batch(shape):
    """For MSE on a deep linear network the pulled-back columns do not depend on the
    example (or the position), so B (x) A is the exact GGN block for any n: KFLR with
    KFAC-expand is exact on sequences too (the tutorial's test case)."""
    model = deep_linear([5, 4, 3])
    params = random_params(model, shape)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((N,) + shape))
    y = jnp.asarray(rng.standard_normal((N,) + shape[:-1] + (3,)))
    G = np.asarray(explicit_ggn(ref_deep_linear, ref_mse, params, x, y))
    _, _, factors = fnbp_kfac(model, fnbp.mse_loss, params, x, y)
    for path, idx in layer_blocks(params):
        A, B = factors_at(factors, path)
        assert rel_err(np.kron(B, A), G[np.ix_(idx, idx)]) <= F64_RTOL, path


def test_kfac_mc_factors_average_to_kflr():
    """A is the same; the sampled B's mean over keys is within five standard errors of KFLR's."""
    model, _, params, x, y = problem("mlp")
    _, _, exact = fnbp_kfac(model, fnbp.cross_entropy_loss, params, x, y)
    keys = jax.random.split(jax.random.key(2), 2000)
    _, _, mc = jax.jit(
        jax.vmap(lambda k: fnbp.kfac_factors(model, fnbp.cross_entropy_loss, params, x, y, key=k)),
        compiler_options=COMPILE,
    )(keys)
    for e, m in zip(exact[0::2], mc[0::2]):
        assert rel_err(m.A[0], e.A) <= 1e-14
        B = np.asarray(m.B)
        mean, se = B.mean(0), B.std(0) / np.sqrt(len(keys))
        assert np.all(np.abs(mean - np.asarray(e.B)) <= 5 * se + 1e-15)


def test_kfac_expand_of_a_convolution_counts_its_positions_as_examples():
    """Conv2D's factors by their definition: A from the input patches (taken with
    jax.lax.conv_general_dilated_patches, not fnbp's code), B from the loss factor's
    columns pulled back to the conv output by autodiff of the reference head."""
    model = fnbp.serial(fnbp.Conv2D(3, 3), fnbp.Tanh(), fnbp.Flatten(3), fnbp.Linear(K))
    params = random_params(model, (4, 4, 2))
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((N, 4, 4, 2)))
    y = jnp.asarray(rng.integers(0, K, N), jnp.int32)
    _, _, factors = fnbp_kfac(model, fnbp.cross_entropy_loss, params, x, y)
    conv, head = params[0], params[3]
    u = (
        jax.lax.conv_general_dilated(
            x, conv["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        + conv["b"]
    )

    def to_logits(u):
        h = jnp.tanh(u).reshape(N, -1)
        return h @ head["W"].T + head["b"]

    t, pull = jax.vjp(to_logits, u)
    S = registry()["cross_entropy_loss"].hooks["hessian_factor"](t, y) / np.sqrt(N)
    cols = jax.vmap(lambda c: pull(c)[0], in_axes=-1)(S)  # (C, N, 4, 4, 3)
    B = np.einsum("cnhwp,cnhwq->pq", cols, cols)
    patches = jax.lax.conv_general_dilated_patches(
        x, (3, 3), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )  # features ordered (C, kh, kw)
    patches = patches.reshape(N, 4, 4, 2, 3, 3).transpose(0, 1, 2, 4, 5, 3).reshape(-1, 18)
    rows = np.concatenate([patches, np.ones((patches.shape[0], 1))], axis=1)
    A = rows.T @ rows / rows.shape[0]
    assert rel_err(factors[0].B, B) <= F64_RTOL
    assert rel_err(factors[0].A, A) <= F64_RTOL
    assert factors[1] == () and isinstance(factors[3], fnbp.KroneckerFactors)


def test_kfac_factors_has_none_for_a_layer_with_params_and_no_kfac_rule():
    model, _, params, x, y = problem("layer_norm-rms_norm")
    _, _, factors = fnbp_kfac(model, fnbp.cross_entropy_loss, params, x, y)
    assert factors[1] is None and factors[4] is None and factors[2] == ()
    assert factors[0].A.shape == (5, 5) and factors[0].B.shape == (5, 5)


# --- errors -------------------------------------------------------------------------------


def test_a_loss_without_a_declared_hessian_is_refused_by_name():
    model, _, params, x, y = problem("mlp")
    for fn in (fnbp.diag_ggn, fnbp.kfac_factors):
        with pytest.raises(TypeError, match=r"declare its Hessian .*fnbp\.cross_entropy_loss"):
            fn(model, lambda t, y: fnbp.cross_entropy_loss(t, y), params, x, y)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mc_samples": 2}, r"mc_samples=2\) .* needs a PRNG key"),
        ({"key": jax.random.key(0)}, r"mc_samples=0 asks for the exact curvature"),
        ({"mc_samples": -1}, r"mc_samples must be an int >= 0, got -1"),
        ({"mc_samples": 1.5}, r"mc_samples must be an int >= 0, got 1.5"),
        ({"per_example": "yes"}, r"per_example"),
    ],
)
def test_diag_ggn_refuses_bad_settings(kwargs, message):
    model, _, params, x, y = problem("mlp")
    with pytest.raises((TypeError, ValueError), match="diag_ggn: .*" + message):
        fnbp.diag_ggn(model, fnbp.cross_entropy_loss, params, x, y, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "kflr"}, r"kind must be 'mc' .* or 'exact'"),
        ({"kind": "mc"}, r"needs a PRNG key"),
        ({"kind": "exact", "key": jax.random.key(0)}, r"kind='exact' asks for the exact"),
        ({"kind": "mc", "mc_samples": 0, "key": jax.random.key(0)}, r"mc_samples must be a"),
    ],
)
def test_kfac_factors_refuses_bad_settings(kwargs, message):
    model, _, params, x, y = problem("mlp")
    with pytest.raises(ValueError, match="kfac_factors: .*" + message):
        fnbp.kfac_factors(model, fnbp.cross_entropy_loss, params, x, y, **kwargs)


def test_a_layer_with_params_and_no_rule_is_named():
    def init(key, input_shape, dtype=jnp.float32):
        return tuple(input_shape), {"a": jnp.ones(input_shape[-1:], dtype)}

    def forward(params, z):
        return params["a"] * z, z

    def backward(params, z, v):
        return {"a": jnp.sum(v * z, axis=0)}, params["a"] * v

    model = fnbp.serial(fnbp.Linear(4), fnbp.make_layer("scale", init, forward, backward))
    params = model.init(jax.random.key(0), (3,))[1]
    x, y = jnp.ones((2, 3)), jnp.zeros((2,), jnp.int32)
    with pytest.raises(NotImplementedError, match=r"diag_ggn: layer 'scale' has parameters"):
        fnbp.diag_ggn(model, fnbp.cross_entropy_loss, params, x, y)
    _, _, factors = fnbp.kfac_factors(model, fnbp.cross_entropy_loss, params, x, y, kind="exact")
    assert factors[1] is None


def test_curvature_runs_under_a_precision_policy_in_float32():
    model, _, params, x, y = problem("mlp")
    policy = fnbp.with_precision(model, "bfloat16")
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    x32 = x.astype(jnp.float32)
    _, grads, diag = fnbp.diag_ggn(policy, fnbp.cross_entropy_loss, p32, x32, y)
    _, _, exact = fnbp_diag(model, fnbp.cross_entropy_loss, params, x, y)
    assert all(d.dtype == jnp.float32 for d in jax.tree_util.tree_leaves(diag))
    assert rel_err(diag, exact) <= 0.1
    _, _, factors = fnbp.kfac_factors(policy, fnbp.cross_entropy_loss, p32, x32, y, kind="exact")
    assert factors[0].A.dtype == jnp.float32
