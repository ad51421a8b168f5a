"""The Laplace approximation (fnbp/laplace.py) against dense float64 formulas.

The GGN of the training set is the explicit one of tests/test_curvature.py
(jax.jacrev of the plain-jnp reference network, jax.hessian of the reference
loss) times N; the posterior precision, its log-determinant, the evidence and
the logits' variances J Sigma J^T are then written densely with NumPy and
compared to fnbp's to 1e-10.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _networks import N, problem, ref_cross_entropy
from _oracle import rel_err
from jax.flatten_util import ravel_pytree
from test_curvature import explicit_ggn, layer_blocks

import fnbp

CASES = ["mlp", "layer_norm-rms_norm"]


def dense_precision(la: fnbp.Laplace, params) -> np.ndarray:
    """Sigma^{-1} as a dense matrix in ravel_pytree's order, from the approximation's parts."""
    diag = np.asarray(ravel_pytree(la.diagonal)[0])
    P = np.diag(diag + la.prior_precision)
    if la.structure == "kfac":
        eigen = jax.tree_util.tree_leaves(
            la.eigen, is_leaf=lambda e: isinstance(e, fnbp.posterior.KroneckerEigen)
        )
        for (_, idx), e in zip(layer_blocks(params), eigen):
            A = e.qa @ np.diag(e.la) @ e.qa.T
            B = e.qb @ np.diag(e.lb) @ e.qb.T
            P[np.ix_(idx, idx)] = la.n * np.kron(B, A) + la.prior_precision * np.eye(len(idx))
    return P


@pytest.mark.parametrize("structure", ["diag", "kfac"])
@pytest.mark.parametrize("case", CASES)
def test_the_posterior_precision_is_the_training_sets_ggn_plus_the_prior(case, structure):
    model, ref, params, x, y = problem(case)
    la = fnbp.laplace(
        model,
        fnbp.cross_entropy_loss,
        params,
        (x, y),
        structure=structure,
        prior_precision=0.5,
        batch_size=4,  # two batches of unequal size: sums and averages across batches
    )
    G = N * np.asarray(explicit_ggn(ref, ref_cross_entropy, params, x, y))
    assert rel_err(ravel_pytree(la.diagonal)[0], np.diag(G)) <= 1e-10
    if structure == "kfac":
        # KFLR of the whole set: N B (x) A, with A and B averaged over the examples
        _, _, f = fnbp.kfac_factors(model, fnbp.cross_entropy_loss, params, x, y, kind="exact")
        P = dense_precision(la, params)
        for (path, idx), factors in zip(
            layer_blocks(params), [f[0], f[3], f[6]] if case != "mlp" else [f[0], f[2], f[4]]
        ):
            want = N * np.kron(factors.B, factors.A) + 0.5 * np.eye(len(idx))
            assert rel_err(P[np.ix_(idx, idx)], want) <= 1e-10, path
    losses = ref_cross_entropy(ref(params, x), y)
    assert abs(la.loss_sum - float(jnp.sum(losses))) <= 1e-10 * abs(la.loss_sum)


@pytest.mark.parametrize("structure", ["diag", "kfac"])
def test_the_log_marginal_likelihood_is_the_dense_formula(structure):
    model, ref, params, x, y = problem("mlp")
    la = fnbp.laplace(model, fnbp.cross_entropy_loss, params, (x, y), structure=structure)
    theta = np.asarray(ravel_pytree(params)[0])
    for delta in (0.1, 1.0, 30.0):
        P = dense_precision(la.with_prior_precision(delta), params)
        want = (
            -la.loss_sum
            - 0.5 * delta * theta @ theta
            + 0.5 * (theta.size * np.log(delta) - np.linalg.slogdet(P)[1])
        )
        assert abs(la.log_marginal_likelihood(delta) - want) <= 1e-10 * abs(want)
    grid = [0.01, 0.1, 1.0, 10.0, 100.0]
    best = la.optimize_prior_precision(grid)
    assert (
        best.prior_precision == grid[int(np.argmax([la.log_marginal_likelihood(d) for d in grid]))]
    )


@pytest.mark.parametrize("structure", ["diag", "kfac"])
def test_the_validation_grid_search_picks_the_smallest_held_out_nll(structure):
    """optimize_prior_precision(validation=...) is the argmin of -mean log p(y | x, D)
    over the grid, with p the probit predictive written out here (a dense J Sigma J^T)."""
    model, ref, params, x, y = problem("mlp")
    la = fnbp.laplace(model, fnbp.cross_entropy_loss, params, (x, y), structure=structure)
    rng = np.random.default_rng(7)
    x_val = jnp.asarray(rng.standard_normal(x.shape))
    y_val = jnp.asarray(rng.integers(0, 3, N), jnp.int32)
    flat, unravel = ravel_pytree(params)
    jac = np.asarray(jax.jacrev(lambda f: ref(unravel(f), x_val))(flat))
    f = np.asarray(ref(params, x_val))
    grid = [0.01, 0.3, 3.0, 30.0, 1000.0]
    nll = []
    for delta in grid:
        Sigma = np.linalg.inv(dense_precision(la.with_prior_precision(delta), params))
        v = np.einsum("nkp,pq,nkq->nk", jac, Sigma, jac)
        probs = np.asarray(jax.nn.softmax(f / np.sqrt(1 + np.pi / 8 * v)))
        nll.append(-np.mean(np.log(probs[np.arange(N), np.asarray(y_val)])))
    best = la.optimize_prior_precision(grid, validation=(x_val, y_val))
    assert best.prior_precision == grid[int(np.argmin(nll))]
    assert len(set(np.round(nll, 12))) == len(grid)  # the grid values are told apart
    assert best.diagonal is la.diagonal  # no other pass over the data


def test_the_validation_grid_search_refuses_what_it_cannot_score():
    model, _, params, x, y = problem("mlp")
    la = fnbp.laplace(model, fnbp.cross_entropy_loss, params, (x, y))
    with pytest.raises(TypeError, match=r"optimize_prior_precision: validation must be the pair"):
        la.optimize_prior_precision(validation=x)
    with pytest.raises(ValueError, match="optimize_prior_precision: validation must hold one"):
        la.optimize_prior_precision(validation=(x, y[:2]))
    targets = jnp.asarray(np.random.default_rng(8).standard_normal((N, 3)))
    mse = fnbp.laplace(model, fnbp.mse_loss, params, (x, targets))
    with pytest.raises(ValueError, match="validation needs a classification loss"):
        mse.optimize_prior_precision(validation=(x, targets))


@pytest.mark.parametrize("structure", ["diag", "kfac"])
def test_logit_variances_are_j_sigma_j_transposed(structure):
    model, ref, params, x, y = problem("mlp")
    la = fnbp.laplace(model, fnbp.cross_entropy_loss, params, (x, y), structure=structure)
    Sigma = np.linalg.inv(dense_precision(la, params))
    flat, unravel = ravel_pytree(params)
    jac = np.asarray(jax.jacrev(lambda f: ref(unravel(f), x))(flat))  # (N, K, P)
    want = np.einsum("nkp,pq,nkq->nk", jac, Sigma, jac)
    assert rel_err(la.logit_variances(x), want) <= 1e-10
    probs = la.predictive(x)
    f = ref(params, x)
    assert rel_err(probs, jax.nn.softmax(f / np.sqrt(1 + np.pi / 8 * want))) <= 1e-10


@pytest.mark.parametrize("structure", ["diag", "kfac"])
def test_samples_have_the_posterior_covariance(structure):
    model, ref, params, x, y = problem("mlp")
    la = fnbp.laplace(
        model, fnbp.cross_entropy_loss, params, (x, y), structure=structure, prior_precision=5.0
    )
    Sigma = np.linalg.inv(dense_precision(la, params))
    draws = la.sample(jax.random.key(0), 20_000)
    flat = np.asarray(jax.vmap(lambda p: ravel_pytree(p)[0])(draws))
    mean = np.asarray(ravel_pytree(params)[0])
    cov = np.cov(flat, rowvar=False)
    assert np.max(np.abs(flat.mean(0) - mean)) <= 5 * np.sqrt(np.max(np.diag(Sigma)) / 20_000)
    assert np.max(np.abs(cov - Sigma)) <= 0.05 * np.max(np.abs(Sigma))
    mc = la.predictive(x, method="mc", samples=200, key=jax.random.key(1))
    assert mc.shape == (N, 3) and np.allclose(np.sum(mc, axis=1), 1)


def test_laplace_refuses_bad_arguments():
    model, _, params, x, y = problem("mlp")
    for kwargs, error, message in [
        ({"structure": "full"}, ValueError, "structure must be 'diag' or 'kfac'"),
        ({"prior_precision": 0.0}, ValueError, "prior_precision must be a positive finite"),
        ({"prior_precision": "1"}, TypeError, "prior_precision must be a positive float"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
    ]:
        with pytest.raises(error, match="laplace: " + message):
            fnbp.laplace(model, fnbp.cross_entropy_loss, params, (x, y), **kwargs)
    with pytest.raises(TypeError, match=r"laplace: data must be the pair \(x, y\)"):
        fnbp.laplace(model, fnbp.cross_entropy_loss, params, x)
    with pytest.raises(ValueError, match="laplace: data must hold one label per example"):
        fnbp.laplace(model, fnbp.cross_entropy_loss, params, (x, y[:2]))
    la = fnbp.laplace(model, fnbp.cross_entropy_loss, params, (x, y))
    with pytest.raises(
        ValueError, match="predictive: method='mc' draws parameters and needs a key"
    ):
        la.predictive(x, method="mc")
    with pytest.raises(ValueError, match="optimize_prior_precision: grid must be"):
        la.optimize_prior_precision([1.0, -1.0])


@pytest.mark.parametrize("structure", ["diag", "kfac"])
def test_the_last_layer_subset_is_the_last_layers_posterior_alone(structure):
    model, ref, params, x, y = problem("mlp")
    full = fnbp.laplace(model, fnbp.cross_entropy_loss, params, (x, y), structure=structure)
    last = fnbp.laplace(
        model, fnbp.cross_entropy_loss, params, (x, y), structure=structure, subset="last_layer"
    )
    _, idx = layer_blocks(params)[-1]
    P = dense_precision(full, params)[np.ix_(idx, idx)]  # the last layer's block
    theta = np.asarray(ravel_pytree(params)[0])[idx]
    want = (
        -last.loss_sum
        - 0.5 * theta @ theta
        + 0.5 * (theta.size * np.log(1.0) - np.linalg.slogdet(P)[1])
    )
    assert abs(last.log_marginal_likelihood() - want) <= 1e-10 * abs(want)
    flat, unravel = ravel_pytree(params)
    jac = np.asarray(jax.jacrev(lambda f: ref(unravel(f), x))(flat))[:, :, idx]
    v = np.einsum("nkp,pq,nkq->nk", jac, np.linalg.inv(P), jac)
    assert rel_err(last.logit_variances(x), v) <= 1e-10
    draws = last.sample(jax.random.key(0), 3)
    assert rel_err(jax.tree_util.tree_map(lambda d: d[1], draws[0]), params[0]) == 0
