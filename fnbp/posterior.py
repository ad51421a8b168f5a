"""The Laplace approximation: a Gaussian posterior around the trained parameters, from the GGN.

With the MAP parameters theta (the trained network), the loss summed over the
N training examples and an isotropic Gaussian prior of precision delta, the
posterior is approximated by N(theta, Sigma) with (MacKay 1992; Daxberger et
al. 2021, laplace-torch) ::

    Sigma^{-1} = G_sum + delta I,     G_sum = sum_i J_i^T H_i J_i

G_sum the GGN of the whole training set, from fnbp's own backward pass
(:func:`fnbp.diag_ggn`, :func:`fnbp.kfac_factors`, exact):

- ``structure="diag"``: its diagonal;
- ``structure="kfac"``: per Linear and Conv layer the Kronecker product
  N (B (x) A) of the dataset's averaged factors (KFLR), whose damped
  eigendecomposition gives the determinant, the variances and samples; the
  other parameters (LayerNorm, RMSNorm) keep the diagonal.

The log marginal likelihood (the evidence) ::

    log p(D) ~ log p(D | theta) - (delta/2) ||theta||^2
               + (1/2) (P log delta - log det Sigma^{-1})

(P parameters; the Gaussian constants cancel) chooses the prior precision:
:meth:`Laplace.optimize_prior_precision` maximizes it over a grid, without
another pass over the data. The predictive (classification losses) is the
linearized one with the probit approximation (MacKay; laplace-torch's
default): the logits' variances v_c = J_c Sigma J_c^T per test example, then
softmax(f / sqrt(1 + pi v / 8)) (cross-entropy) or sigmoid of the same
(logistic), or Monte Carlo over parameter samples (``method="mc"``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from fnbp.backprop import Loss
from fnbp.curvature import (
    KroneckerFactors,
    as_matrix,
    diag_ggn,
    from_matrix,
    kfac_factors,
    layer_structure,
    loss_curvature,
    map_layers,
)
from fnbp.nn import _args
from fnbp.nn.layer import Layer, Params

__all__ = ["Laplace", "laplace"]

STRUCTURES = ("diag", "kfac")
SUBSETS = ("all", "last_layer")
METHODS = ("probit", "mc")
# The classification losses' links from the network's output to class probabilities.
_LINKS = {"cross_entropy_loss": jax.nn.softmax, "logistic_loss": jax.nn.sigmoid}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KroneckerEigen:
    """A layer's averaged factors by their eigendecomposition: A = Qa diag(la) Qa^T, B likewise."""

    qa: Array
    la: Array
    qb: Array
    lb: Array

    def precision(self, n: int, delta: float) -> Array:
        """The eigenvalues of the layer's posterior precision N B (x) A + delta I, (out, in)."""
        return n * jnp.outer(self.lb, self.la) + delta


@dataclasses.dataclass(frozen=True)
class Laplace:
    """A Laplace approximation (see the module doc); made by :func:`laplace`.

    Attributes:
      model, loss: as given to :func:`laplace`.
      mean: the MAP parameters theta.
      structure: ``"diag"`` or ``"kfac"``.
      prior_precision: delta.
      n: the number of training examples N.
      outputs: the network's outputs per example (k of MSE's Gaussian).
      loss_sum: sum_i loss_i at theta over the training set.
      diagonal: the GGN's diagonal summed over the training set, like params
        (for ``"kfac"``, used for the parameters of layers without factors).
      eigen: for ``"kfac"``, a :class:`KroneckerEigen` per Linear and Conv
        layer (``None`` elsewhere), of the factors averaged over the data.
    """

    model: Layer
    loss: Loss
    mean: Params
    structure: str
    prior_precision: float
    n: int
    outputs: int
    loss_sum: float
    diagonal: Params
    eigen: Any

    # --- the posterior --------------------------------------------------------------

    def _precision_eigenvalues(self, delta: float) -> list[Array]:
        """Every eigenvalue of Sigma^{-1}: per layer N lb (x) la + delta, else diag + delta."""
        values: list[Array] = []

        def layer(e, params):
            if e is None:
                values.extend(d + delta for d in jax.tree_util.tree_leaves(params))
            else:
                values.append(e.precision(self.n, delta))
            return None

        if self.structure == "diag":
            return [d + delta for d in jax.tree_util.tree_leaves(self.diagonal)]
        map_layers(layer, self.eigen, self.diagonal)
        return values

    def log_marginal_likelihood(self, prior_precision: float | None = None) -> float:
        """log p(D) of the Laplace approximation at prior precision delta (default: its own).

        ``-loss_sum - (delta/2) ||theta||^2 + (1/2) (P log delta - log det Sigma^{-1})``
        for the cross-entropy and logistic losses (their log-likelihood is
        ``-loss_sum``); for MSE, the unit-variance Gaussian's ``-(N k / 2) log 2 pi``
        is added to the log-likelihood.
        """
        delta = self.prior_precision if prior_precision is None else prior_precision
        delta = _args.positive_float("log_marginal_likelihood", "prior_precision", delta)
        free = [
            (np.asarray(t, np.float64), np.isfinite(np.asarray(d)))
            for t, d in zip(
                jax.tree_util.tree_leaves(self.mean), jax.tree_util.tree_leaves(self.diagonal)
            )
        ]
        count = sum(int(np.sum(m)) for _, m in free)  # fixed parameters: infinite precision
        square = sum(float(np.sum(np.where(m, t * t, 0))) for t, m in free)
        log_det = 0.0
        for eigenvalues in self._precision_eigenvalues(delta):
            v = np.asarray(eigenvalues, np.float64)
            log_det += float(np.sum(np.log(v[np.isfinite(v)])))
        log_lik = -self.loss_sum
        if loss_curvature("log_marginal_likelihood", self.loss).name == "mse_loss":
            log_lik -= 0.5 * self.n * self.outputs * math.log(2 * math.pi)
        return log_lik - 0.5 * delta * square + 0.5 * (count * math.log(delta) - log_det)

    def with_prior_precision(self, prior_precision: float) -> Laplace:
        """The same approximation with another prior precision (no pass over the data)."""
        delta = _args.positive_float("with_prior_precision", "prior_precision", prior_precision)
        return dataclasses.replace(self, prior_precision=delta)

    def optimize_prior_precision(
        self, grid: Any = None, *, validation: tuple[Array, Array] | None = None
    ) -> Laplace:
        """The approximation at the prior precision of the grid that fits best.

        Without ``validation``: the largest evidence (:meth:`log_marginal_likelihood`,
        MacKay's type-II maximum likelihood), no pass over any data. The evidence
        assumes that the MAP was trained under this prior, with the penalty
        (delta/2) ||theta||^2; a network trained without one has a large
        ||theta||, for which the evidence picks a small delta, a wide posterior
        and an underconfident predictive.

        With ``validation=(x, y)``, held-out examples of a classification loss:
        the smallest negative log-likelihood of the probit predictive on them
        (laplace-torch's ``method="gridsearch"``); the logits' variances at every grid
        value come from one pass over the validation examples.

        Args:
          grid: candidate precisions, all > 0; default ``10 ** linspace(-4, 4, 33)``.
          validation: optional held-out ``(x, y)``, labels as for the loss.

        Raises:
          ValueError: a bad grid; validation that is not a pair of arrays with
            one label per example, or given for the MSE loss (no predictive).
        """
        fn = "optimize_prior_precision"
        grid = np.logspace(-4, 4, 33) if grid is None else np.asarray(grid, np.float64)
        if grid.ndim != 1 or grid.size == 0 or not np.all(grid > 0):
            raise ValueError(
                f"{fn}: grid must be a non-empty 1-D list of prior precisions > 0, got {grid!r:.80}"
            )
        if validation is None:
            evidence = [self.log_marginal_likelihood(float(d)) for d in grid]
            return self.with_prior_precision(float(grid[int(np.argmax(evidence))]))
        name = loss_curvature(fn, self.loss).name
        if name not in _LINKS:
            raise ValueError(
                f"{fn}: validation needs a classification loss (cross_entropy_loss or "
                f"logistic_loss), got {name}; choose the prior precision by the evidence"
            )
        x, y = _pair(fn, "validation", validation)
        link = _LINKS[name]
        f = self.model.apply(self.mean, x)
        v = self._variances(x, jnp.asarray(grid, self._dtype()))  # all the grid in one pass
        nll = [_nll(name, _probit(link, f, v[..., g]), y) for g in range(grid.size)]
        return self.with_prior_precision(float(grid[int(np.argmin(nll))]))

    # --- samples and the predictive -----------------------------------------------

    def sample(self, key: Array, samples: int) -> Params:
        """``samples`` draws of the parameters from N(theta, Sigma): leaves (samples, *shape)."""
        samples = _args.positive_int("sample", "samples", samples)
        key = _args.prng_key("sample", key)
        return _draw(self.structure, self.n, samples, *self._arrays(), key)

    def _arrays(self) -> tuple:
        """The posterior's arrays, as the compiled functions below take them."""
        return self.mean, self.diagonal, self.eigen, self.prior_precision

    def logit_variances(self, x: Array) -> Array:
        """v_c = J_c Sigma J_c^T for every example and output: shape (n, *output shape).

        The Jacobians come from ``jax.jacrev`` through ``model.apply``, i.e. from
        the model's hand-written backward functions, one example at a time.
        """
        deltas = jnp.asarray([self.prior_precision], self._dtype())
        return self._variances(jnp.asarray(x), deltas)[..., 0]

    def _dtype(self):
        return jnp.result_type(*jax.tree_util.tree_leaves(self.diagonal))

    def _variances(self, x: Array, deltas: Array) -> Array:
        """The logits' variances at each prior precision of ``deltas``: (n, *outputs, G)."""
        return _logit_variances(
            self.model, self.structure, self.n, self.mean, self.diagonal, self.eigen, x, deltas
        )

    def predictive(
        self, x: Array, *, method: str = "probit", samples: int = 100, key: Array | None = None
    ) -> Array:
        """Predictive class probabilities p(y | x, D) for the classification losses.

        Args:
          x: inputs (n, *example_shape).
          method: ``"probit"`` (linearized, probit approximation) or ``"mc"``
            (the mean of the network's probabilities over ``samples`` draws of
            the parameters; needs ``key``).

        Returns:
          (n, C) probabilities for the cross-entropy loss; (n, ...) the
          probability of label 1 for the logistic loss.

        Raises:
          ValueError: an unknown method; ``"mc"`` without a key.
          NotImplementedError: the MSE loss (its predictive is the Gaussian
            N(f, v + 1): use :meth:`logit_variances`).
        """
        if method not in METHODS:
            raise ValueError(f"predictive: method must be 'probit' or 'mc', got {method!r}")
        name = loss_curvature("predictive", self.loss).name
        if name not in _LINKS:
            raise NotImplementedError(
                f"predictive: the predictive of {name} is the Gaussian N(f(x), v + 1); take "
                f"f from model.apply and v from logit_variances(x)"
            )
        link = _LINKS[name]
        if method == "mc":
            if key is None:
                raise ValueError("predictive: method='mc' draws parameters and needs a key")
            samples = _args.positive_int("predictive", "samples", samples)
            key = _args.prng_key("predictive", key)

            return _mc_predictive(
                self.model, link, self.structure, self.n, samples, *self._arrays(), key, x
            )
        return _probit(link, self.model.apply(self.mean, x), self.logit_variances(x))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _draw(structure, n, samples, mean, diagonal, eigen, delta, key):
    """``samples`` draws from N(mean, Sigma(delta)): one compiled program per structure,
    shapes and number of draws, cached across calls and approximations."""
    leaves, _ = jax.tree_util.tree_flatten(mean)
    keys = iter(jax.random.split(key, len(leaves) + 1))

    def diagonal_draw(mean, d):
        eps = jax.random.normal(next(keys), (samples,) + mean.shape, d.dtype)
        return mean + (eps / jnp.sqrt(d + delta)).astype(mean.dtype)

    def layer(e, pair):
        mean, d = pair
        if e is None:
            return jax.tree_util.tree_map(diagonal_draw, mean, d)
        W = as_matrix(mean)
        eps = jax.random.normal(next(keys), (samples,) + W.shape, e.la.dtype)
        eps = eps / jnp.sqrt(e.precision(n, delta))
        draws = W + jnp.einsum("ab,sbc,dc->sad", e.qb, eps, e.qa).astype(W.dtype)
        return jax.vmap(lambda G: from_matrix(G, mean))(draws)

    if structure == "diag":
        return jax.tree_util.tree_map(diagonal_draw, mean, diagonal)
    return map_layers(layer, eigen, _zip_params(mean, diagonal))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _mc_predictive(model, link, structure, n, samples, mean, diagonal, eigen, delta, key, x):
    """The mean of link(model(theta_s, x)) over :func:`_draw`'s draws, in one program."""
    draws = _draw(structure, n, samples, mean, diagonal, eigen, delta, key)
    return jnp.mean(jax.lax.map(lambda p: link(model.apply(p, x)), draws), axis=0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _logit_variances(model, structure, n, mean, diagonal, eigen, x, deltas):
    """v_c = J_c Sigma(delta) J_c^T per example, output and delta of ``deltas`` (last axis).

    One program for all the deltas: each example's Jacobian (in a Kronecker layer's
    eigenbasis) is squared once and contracted with 1 / (eigenvalue + delta).
    """

    def diagonal_part(j, d):
        axes = tuple(range(j.ndim - d.ndim, j.ndim))
        j2 = (j.astype(d.dtype) ** 2)[..., None]
        return jnp.sum(j2 / (d[..., None] + deltas), axis=axes)

    def layer(e, pair):
        j, d = pair
        if e is None:
            return sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(diagonal_part, j, d)))
        flat = jax.tree_util.tree_map(lambda a, d: a.reshape((-1,) + d.shape), j, d)
        G = jax.vmap(as_matrix)(flat).astype(e.la.dtype)
        rotated = jnp.einsum("ba,sbc,cd->sad", e.qb, G, e.qa)
        precision = e.precision(n, 0.0)[..., None] + deltas  # (out, in, G)
        return jnp.einsum("sad,adg->sg", rotated**2, 1 / precision)

    leaf = jax.tree_util.tree_leaves(mean)[0]

    def one(x_i):
        jac = jax.jacrev(lambda p: model.apply(p, x_i[None])[0])(mean)
        j0 = jax.tree_util.tree_leaves(jac)[0]
        out_shape = j0.shape[: j0.ndim - leaf.ndim] + deltas.shape
        if structure == "diag":
            parts = jax.tree_util.tree_leaves(jax.tree_util.tree_map(diagonal_part, jac, diagonal))
        else:
            parts = jax.tree_util.tree_leaves(map_layers(layer, eigen, _zip_params(jac, diagonal)))
        return sum(jnp.reshape(p, out_shape) for p in parts)

    return jax.lax.map(one, x)


def _eigen(layers: Any, factors: Any) -> Any:
    """The eigendecomposition of each layer's averaged factors (eigenvalues clipped at 0)."""

    def one(layer, f):
        if layer is None or not isinstance(f, KroneckerFactors):
            return None
        la, qa = jnp.linalg.eigh(f.A)
        lb, qb = jnp.linalg.eigh(f.B)
        return KroneckerEigen(qa, jnp.maximum(la, 0), qb, jnp.maximum(lb, 0))

    return map_layers(one, layers, factors)


def _last_layer(fn: str, params, layers, diagonal, eigen):
    """Fix every parameter but the last Linear or Conv layer's: infinite precision."""
    found = [
        leaf for leaf in jax.tree_util.tree_leaves(layers, is_leaf=lambda n: isinstance(n, dict))
    ]
    if not found:
        raise ValueError(f"{fn}: subset='last_layer' needs a Linear or Conv layer in the model")
    last = found[-1]
    free = {id(a) for a in jax.tree_util.tree_leaves(last)}
    diagonal = jax.tree_util.tree_map(
        lambda p, d: d if id(p) in free else jnp.full_like(d, jnp.inf), params, diagonal
    )
    if eigen is not None:
        eigen = map_layers(lambda e, layer: e if layer is last else None, eigen, layers)
    return diagonal, eigen


def _zip_params(a, b):
    """The pytree of pairs (a_leaf_subtree, b_leaf_subtree) at each layer dict."""
    if isinstance(a, dict):
        return (a, b)
    if isinstance(a, (tuple, list)):
        out = [_zip_params(x, y) for x, y in zip(a, b)]
        return out if isinstance(a, list) else tuple(out)
    return (a, b)


def _pair(fn: str, name: str, data: Any, what: str = "") -> tuple[Array, Array]:
    """``data`` as the arrays (x, y), one label per example and at least one example."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(
            f"{fn}: {name} must be the pair (x, y){' ' + what if what else ''}, "
            f"got {type(data).__name__}"
        )
    x, y = (jnp.asarray(a) for a in data)
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"{fn}: {name} must hold one label per example and at least one example, got "
            f"x.shape={x.shape} and y.shape={y.shape}"
        )
    return x, y


def _probit(link, f: Array, v: Array) -> Array:
    """The probit approximation of E[link(f + sqrt(v) eps)]: link(f / sqrt(1 + pi v / 8))."""
    return link(f / jnp.sqrt(1 + math.pi / 8 * v))


def _nll(name: str, probs: Array, y: Array) -> float:
    """The mean negative log-likelihood of labels y under predictive probabilities."""
    tiny = jnp.finfo(probs.dtype).tiny
    if name == "cross_entropy_loss":
        p = jnp.take_along_axis(probs, y[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return float(-jnp.mean(jnp.log(jnp.maximum(p, tiny))))
    y = y.astype(probs.dtype)
    log_p, log_q = jnp.log(jnp.maximum(probs, tiny)), jnp.log(jnp.maximum(1 - probs, tiny))
    return float(-jnp.mean(y * log_p + (1 - y) * log_q))


def laplace(
    model: Layer,
    loss: Loss,
    params: Params,
    data: tuple[Array, Array],
    *,
    structure: str = "kfac",
    subset: str = "all",
    prior_precision: float = 1.0,
    batch_size: int = 256,
) -> Laplace:
    """The Laplace approximation around ``params`` with the GGN of the whole training set.

    One pass over ``data`` in batches of ``batch_size``: each batch's exact
    GGN diagonal (and, for ``"kfac"``, its KFLR factors) from fnbp's backward
    pass, summed (the factors averaged) over the batches.

    Args:
      model, loss: as :func:`fnbp.backprop`; ``loss`` one of fnbp's losses.
      params: the trained (MAP) parameters.
      data: ``(x, y)``, the training set.
      structure: ``"diag"`` or ``"kfac"``.
      subset: ``"all"`` parameters, or ``"last_layer"``: only the last Linear
        (or Conv) layer's are random, the others fixed at the MAP (infinite
        precision: their diagonal is ``inf``, they add nothing to the
        variances, the samples or the evidence); laplace-torch's default.
      prior_precision: delta > 0 (see :meth:`Laplace.optimize_prior_precision`).
      batch_size: examples per pass (memory), >= 1.

    Returns:
      A :class:`Laplace`.

    Raises:
      TypeError, ValueError: a bad structure, prior precision, batch size,
        data not a pair of arrays with one label per example; the loss and
        model as :func:`fnbp.diag_ggn`.
    """
    fn = "laplace"
    if structure not in STRUCTURES:
        raise ValueError(f"{fn}: structure must be 'diag' or 'kfac', got {structure!r}")
    if subset not in SUBSETS:
        raise ValueError(f"{fn}: subset must be 'all' or 'last_layer', got {subset!r}")
    delta = _args.positive_float(fn, "prior_precision", prior_precision)
    batch_size = _args.positive_int(fn, "batch_size", batch_size, "examples per pass")
    x, y = _pair(fn, "data", data, "of the training set")
    loss_curvature(fn, loss)
    n = x.shape[0]

    @jax.jit
    def batch_pass(params, xb, yb):
        J, _, diag = diag_ggn(model, loss, params, xb, yb)
        factors = None
        if structure == "kfac":
            _, _, factors = kfac_factors(model, loss, params, xb, yb, kind="exact")
        return J, diag, factors

    loss_sum, diagonal, factors = 0.0, None, None
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        m = xb.shape[0]
        J, diag, f = batch_pass(params, xb, yb)
        loss_sum += float(J) * m
        diag = jax.tree_util.tree_map(lambda d, m=m: d * m, diag)  # the batch's sum over examples
        diagonal = diag if diagonal is None else jax.tree_util.tree_map(jnp.add, diagonal, diag)
        if f is not None:  # the factors' average over the data: weights m / n
            f = jax.tree_util.tree_map(lambda a, w=m / n: a * w, f)
            factors = f if factors is None else jax.tree_util.tree_map(jnp.add, factors, f)
    layers = layer_structure(params, lambda p: p)
    eigen = _eigen(layers, factors) if structure == "kfac" else None
    if subset == "last_layer":
        diagonal, eigen = _last_layer(fn, params, layers, diagonal, eigen)
    outputs = math.prod(jax.eval_shape(model.apply, params, x[:1]).shape[1:])
    return Laplace(model, loss, params, structure, delta, n, outputs, loss_sum, diagonal, eigen)
