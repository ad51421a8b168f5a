"""Curvature from the backward pass: the GGN's diagonal and K-FAC's Kronecker factors.

For the mean loss J = (1/N) sum_l loss(t_l, y_l) over the N loss values of a
batch (one per example, or one per position of each example), with J_l the
Jacobian of the network output t_l with respect to the parameters and
H_l = d^2 loss / dt_l^2 the loss Hessian at the output, the generalized
Gauss-Newton matrix is ::

    G = (1/N) sum_l J_l^T H_l J_l      (for the losses of the notes, the Fisher)

Each loss declares a symmetric factor H_l = S_l S_l^T (``hessian_factor``,
C columns: the identity for MSE, sqrt(p (1 - p)) for the logistic loss,
diag(sqrt p) - p sqrt(p)^T for cross-entropy) and a sampler of the
Monte-Carlo gradient g_l with E[g_l g_l^T] = H_l (``sample_grad``; see
:mod:`fnbp.rules.losses`). The backward function B is linear, so each column
S_l[:, c] / sqrt(N) can be carried back through the network by the same
hand-written B[M, z] as the gradient: the C columns travel as one extra
leading axis of the cotangent (one batched backward pass, ``jax.vmap`` of
each layer's backward over the columns), and each layer with parameters
takes its part from the columns that reach its output, b_ic, and the inputs
its forward pass stored, z_i:

- the diagonal of G: for MM, ``diag(G_W) = sum_i sum_c (b_ic (.) b_ic)
  (z_i (.) z_i)^T``, the second-moment contraction of
  :func:`fnbp.grad_moments` over the n C pseudo-examples (BackPACK's
  DiagGGNExact; DiagGGNMC with ``mc_samples`` sampled columns);
- K-FAC's factors: ``G_W ~ B (x) A`` with A = (1/n) sum_i z_i z_i^T and
  B = sum_{i,c} b_ic b_ic^T (KFLR with the exact columns, KFAC with the
  sampled ones).

One forward pass is shared by the gradient (Algorithm 3, the same cotangents
as :func:`fnbp.backprop`) and the columns. Sequences and convolutions: a
parameter used at T positions of an example (a sequence's tokens, an image's
pixels) has the per-example gradient sum_t b_ict z_it^T; the diagonal is
exact, and K-FAC counts the positions as extra examples (KFAC-expand,
Grosse & Martens 2016; see :class:`fnbp.nn.layer.KroneckerFactors`). A loss
with P values per example (one per position) has P C exact columns per
example (the factor of each value, at its own position): the exact quantities
cost P C columns, the Monte-Carlo ones one per sample (the samples at
different positions are independent with mean zero, so the cross terms
vanish in expectation).

The functions trace under ``jax.jit(f, static_argnums=(0, 1),
static_argnames=(...))`` with the model, the loss and the keyword settings
(``mc_samples``, ``per_example``, ``kind``) static; the key is an argument.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from fnbp.backprop import Loss, _loss_and_cotangent, require_per_example_losses
from fnbp.nn import _args
from fnbp.nn.layer import KroneckerFactors, Layer, MissingRuleError, Params
from fnbp.per_example import _examples, _per_example_inputs
from fnbp.rules._rule import Rule, registry

__all__ = [
    "KroneckerFactors",
    "as_matrix",
    "diag_ggn",
    "from_matrix",
    "is_kronecker_layer",
    "kfac_factors",
    "layer_structure",
    "loss_curvature",
    "map_layers",
]

KINDS = ("mc", "exact")


def loss_curvature(fn: str, loss: Any) -> Rule:
    """The record of a loss rule that declares its Hessian factor and MC sampler.

    Raises:
      TypeError: ``loss`` is not such a rule (a lambda around one included):
        the message lists the losses that are and how to declare one.
    """
    for rule in registry().values():
        if rule.function is loss and "hessian_factor" in rule.hooks:
            return rule
    known = [f"fnbp.{r.name}" for r in registry().values() if "hessian_factor" in r.hooks]
    raise TypeError(
        f"{fn}: the loss must declare its Hessian with respect to the output (a factor S "
        f"with H = S S^T, and a sampler of the Monte-Carlo gradient); these do: "
        f"{', '.join(known)}. Got {getattr(loss, '__name__', type(loss).__name__)!r}; pass "
        f"one of them itself (not wrapped in a lambda or partial), or declare your loss with "
        f"fnbp.rules.declare(..., family='loss', hooks={{'hessian_factor': ..., "
        f"'sample_grad': ...}})"
    )


def _settings(fn: str, mc_samples: Any, key: Any, exact: str) -> tuple[int, Any]:
    """mc_samples as an int >= 0 and the key, checked: a key exactly when sampling.

    ``exact`` names the exact setting in the messages (``"mc_samples=0"``).
    """
    mc_samples = _args.non_negative_int(
        fn, "mc_samples", mc_samples, "the number of sampled columns; 0 for the exact ones"
    )
    if mc_samples and key is None:
        raise ValueError(
            f"{fn}: the Monte-Carlo estimate (mc_samples={mc_samples}) draws labels from the "
            f"model's predictive distribution and needs a PRNG key: pass "
            f"key=jax.random.key(0)"
        )
    if not mc_samples and key is not None:
        raise ValueError(
            f"{fn}: a key was given but {exact} asks for the exact curvature, which draws "
            f"nothing; drop the key, or ask for the Monte-Carlo estimate"
        )
    if key is not None:
        key = _args.prng_key(fn, key)
    return mc_samples, key


def _columns(rule: Rule, t: Array, y: Array, losses: Array, mc_samples: int, key) -> Array:
    """The loss Hessian's columns at the output, scaled by 1/sqrt(N): (K, *t.shape).

    Exact (``mc_samples`` 0): the factor's C columns of every loss value, each
    at its own position (P C columns for P loss values per example). Monte
    Carlo: ``mc_samples`` sampled gradients per loss value, each scaled by
    1/sqrt(mc_samples) more, so that the sum over the columns of their outer
    products is an unbiased estimate of sum_l H_l / N.
    """
    count = losses.size
    if mc_samples:
        keys = jax.random.split(key, mc_samples)
        g = jax.vmap(lambda k: rule.hooks["sample_grad"](t, y, k))(keys)
        return (g / math.sqrt(mc_samples * count)).astype(t.dtype)
    S = rule.hooks["hessian_factor"](t, y)  # t.shape + (C,)
    n, c = losses.shape[0], S.shape[-1]
    positions = count // n
    S = S / math.sqrt(count)
    if positions == 1:
        return jnp.moveaxis(S, -1, 0).astype(t.dtype)
    # Block-diagonal over the positions: column (p, c) is S[:, p, ..., c] at position p only.
    flat = S.reshape(n, positions, -1, c)
    eye = jnp.eye(positions, dtype=S.dtype)
    V = jnp.einsum("iprc,pq->qcipr", flat, eye)
    return V.reshape((positions * c,) + t.shape).astype(t.dtype)


def _pass(fn: str, model: Layer, loss: Loss, rule: Rule, params, x, y, mc_samples, key, kind):
    """One forward pass; the gradient's backward pass and the columns' curvature pass."""
    n = jnp.shape(x)[0]
    t, residuals = model.forward(params, x)
    losses, dt = _loss_and_cotangent(loss, t, y, fn=fn)  # backprop's dJ/dt
    require_per_example_losses(fn, losses, n)
    J = jnp.mean(losses, dtype=jnp.promote_types(losses.dtype, jnp.float32))
    grads, _ = model.backward(params, residuals, dt)
    columns = _columns(rule, t, y, losses, mc_samples, key)
    try:
        out, _ = model.book.curvature(params, residuals, columns, kind)
    except MissingRuleError as missing:
        raise NotImplementedError(
            f"{fn}: layer {missing.layer!r} has parameters but no {missing.hook} rule, so its "
            f"part of the GGN cannot be taken from the backward pass; give it one with "
            f"fnbp.make_layer(name, init, forward, backward, {missing.hook}=...) (or a "
            f"diag_ggn= hook); see fnbp.make_layer"
        ) from None
    return J, grads, out


def diag_ggn(
    model: Layer,
    loss: Loss,
    params: Params,
    x: Array,
    y: Array,
    *,
    mc_samples: int = 0,
    key: Array | None = None,
    per_example: bool = False,
) -> tuple[Array, Params, Params]:
    """J, its gradient and the diagonal of the GGN, from one forward and one backward pass.

    ::

        diag(G) = diag((1/N) sum_l J_l^T H_l J_l)
                = sum_{i,c} g_ic (.) g_ic      (g_ic: B's parameter cotangents of column c)

    Exact (``mc_samples=0``, BackPACK's DiagGGNExact): the loss Hessian's C
    factor columns of every example travel back through the hand-written
    backward functions as one batched cotangent. Monte Carlo
    (``mc_samples=k`` with a ``key``, DiagGGNMC): k columns, each the gradient
    at a label drawn from the model's predictive distribution, scaled by
    1/sqrt(k); an unbiased estimate (its mean over keys converges to the
    exact diagonal) at the cost of k columns. Each layer with parameters
    adds its ``sq_grads`` of every column (MM on vectors: the columns'
    squares summed first, one contraction whatever C).

    Args:
      model, loss, params: as :func:`fnbp.backprop`; ``loss`` one of fnbp's
        losses (``fnbp.mse_loss``, ``fnbp.logistic_loss``,
        ``fnbp.cross_entropy_loss``) or a rule that declares its Hessian
        factor (see :func:`loss_curvature`).
      x: inputs of shape (n, *example_shape), one leading example axis.
      y: targets of shape (n, ...).
      mc_samples: 0 for the exact diagonal, k >= 1 for the Monte-Carlo one.
      key: a PRNG key, required exactly when ``mc_samples >= 1``.
      per_example: also split the diagonal by example (BackPACK's
        BatchDiagGGN): leaves of shape (n, *param.shape), example i's being
        the diagonal of (1/n) J_i^T H_i J_i (its own losses' mean over its
        positions), so that their sum over i is the diagonal of G. Computed
        as ``jax.vmap`` over the examples of the one-example pass (memory n
        times the parameters', as the result's); grads are then the mean of
        the per-example gradients of that pass (backprop's up to rounding).

    Returns:
      ``(J, grads, diag)``: J the mean loss (at least float32), grads like
      params in their dtypes (:func:`fnbp.backprop`'s), diag like params
      (with a leading (n,) axis per leaf with ``per_example=True``) in at
      least float32.

    Raises:
      TypeError: a loss without a declared Hessian; model, x, y as
        :func:`fnbp.backprop`.
      ValueError: ``mc_samples`` not an int >= 0; a key missing for
        ``mc_samples >= 1`` or given for 0; x without an example axis;
        labels not one per example.
      NotImplementedError: a layer with parameters and neither a
        ``sq_grads`` nor a ``diag_ggn`` rule (see :func:`fnbp.make_layer`).
    """
    fn = "diag_ggn"
    x, y = _per_example_inputs(fn, model, loss, x, y)
    n = _examples(fn, x)
    rule = loss_curvature(fn, loss)
    mc_samples, key = _settings(fn, mc_samples, key, "mc_samples=0")
    per_example = _args.flag(fn, "per_example", per_example)
    if not per_example:
        return _pass(fn, model, loss, rule, params, x, y, mc_samples, key, "diag")

    def one(x_i, y_i, key_i):
        return _pass(fn, model, loss, rule, params, x_i[None], y_i[None], mc_samples, key_i, "diag")

    keys = None if key is None else jax.random.split(key, n)
    J_i, grads_i, diag_i = jax.vmap(one, in_axes=(0, 0, None if keys is None else 0))(x, y, keys)
    grads = jax.tree_util.tree_map(
        lambda g, p: jnp.mean(g.astype(jnp.promote_types(g.dtype, jnp.float32)), axis=0).astype(
            jnp.result_type(p)
        ),
        grads_i,
        params,
    )
    return jnp.mean(J_i), grads, jax.tree_util.tree_map(lambda d: d / n, diag_i)


def kfac_factors(
    model: Layer,
    loss: Loss,
    params: Params,
    x: Array,
    y: Array,
    *,
    kind: str = "mc",
    key: Array | None = None,
    mc_samples: int = 1,
) -> tuple[Array, Params, Any]:
    """J, its gradient and K-FAC's Kronecker factors of every Linear and Conv layer.

    For a layer u = W z + b (a convolution: W the filters as a (C2, k... C)
    matrix, z its input patches), with the bias appended to W as its last
    column and z~ = [z; 1], the GGN block of the weight (row-major vec) is
    approximated by B (x) A (:class:`KroneckerFactors`)::

        A = (1 / (n T)) sum_{i,t} z~_it z~_it^T    from the forward pass
        B = sum_c sum_{i,t} b_ict b_ict^T          from the pulled-back columns

    ``kind="exact"`` (KFLR): the loss Hessian's C factor columns; with one
    example and one position B (x) A is the layer's exact GGN block.
    ``kind="mc"`` (KFAC): ``mc_samples`` columns of sampled gradients (one by
    default), each scaled by 1/sqrt(mc_samples), with a key. Positions (a
    sequence's tokens, a convolution's output pixels) count as examples
    (KFAC-expand). One forward pass; the gradient's backward pass and the
    columns' (one batched pass over the columns).

    Args:
      model, loss, params, x, y: as :func:`diag_ggn`.
      kind: ``"mc"`` or ``"exact"``.
      key: a PRNG key, required for ``kind="mc"``, refused for ``"exact"``.
      mc_samples: the sampled columns of ``kind="mc"``, an int >= 1.

    Returns:
      ``(J, grads, factors)``: J and grads as :func:`fnbp.backprop`'s;
      factors a pytree like params down to the layers: a
      :class:`KroneckerFactors` ``(A, B)`` (at least float32) in place of each
      Linear or Conv layer's params dict, ``None`` for a layer with
      parameters and no ``kfac`` rule (LayerNorm, RMSNorm, a layer of yours
      without one), ``()`` for a layer without parameters.

    Raises:
      TypeError, ValueError: as :func:`diag_ggn`; an unknown ``kind``;
        ``mc_samples`` not >= 1 for ``kind="mc"``.
    """
    fn = "kfac_factors"
    x, y = _per_example_inputs(fn, model, loss, x, y)
    _examples(fn, x)
    rule = loss_curvature(fn, loss)
    if kind not in KINDS:
        raise ValueError(
            f"{fn}: kind must be 'mc' (KFAC: sampled columns) or 'exact' (KFLR: the loss "
            f"Hessian's factor), got {kind!r}"
        )
    if kind == "mc":
        _args.positive_int(fn, "mc_samples", mc_samples, "the sampled columns of kind='mc'")
    else:
        mc_samples = 0
    mc_samples, key = _settings(fn, mc_samples, key, "kind='exact'")
    return _pass(fn, model, loss, rule, params, x, y, mc_samples, key, "kfac")


# --- the layers' Kronecker blocks in a params pytree (K-FAC, Laplace) -------------------------


def is_kronecker_layer(node: Any) -> bool:
    """A Linear layer's params ``{"W"[, "b"]}`` or a convolution's ``{"w"[, "b"]}``."""
    return (
        isinstance(node, dict)
        and set(node) - {"b"} in ({"W"}, {"w"})
        and jnp.ndim(node["W"] if "W" in node else node["w"]) >= 2
    )


def as_matrix(params: dict) -> Array:
    """``[W | b]`` of a layer, the matrix whose GGN block is B (x) A (row-major vec).

    W of shape (out, in); a convolution's filters w (k..., C, C2) as
    ``w.reshape(-1, C2).T``, (C2, k... C); the bias as the last column.
    """
    if "W" in params:
        W = params["W"]
    else:
        w = params["w"]
        W = w.reshape(-1, w.shape[-1]).T
    if "b" in params:
        W = jnp.concatenate([W, params["b"][:, None].astype(W.dtype)], axis=1)
    return W


def from_matrix(G: Array, like: dict) -> dict:
    """The inverse of :func:`as_matrix`: a dict shaped (and typed) like ``like``."""
    out = {}
    if "b" in like:
        out["b"] = G[:, -1].astype(like["b"].dtype)
        G = G[:, :-1]
    if "W" in like:
        out["W"] = G.astype(like["W"].dtype)
    else:
        out["w"] = G.T.reshape(like["w"].shape).astype(like["w"].dtype)
    return out


def layer_structure(params: Params, make: Any) -> Any:
    """``make(layer_params)`` for every Linear and Conv layer in params, ``None`` for the others.

    A dict is one layer's params (fnbp's layers keep theirs in one); tuples and
    lists are combinators' (one entry per child), kept as such.
    """
    if isinstance(params, dict):
        return make(params) if is_kronecker_layer(params) else None
    if isinstance(params, (tuple, list)):
        children = [layer_structure(p, make) for p in params]
        return children if isinstance(params, list) else tuple(children)
    return None


def map_layers(fn: Any, structure: Any, other: Any) -> Any:
    """``fn(leaf, other_node)`` at each leaf of a :func:`layer_structure` tree.

    Its leaves are :class:`KroneckerFactors` (or anything but a tuple or list)
    and ``None``; ``other`` follows params' containers (params themselves, the
    gradients, :func:`kfac_factors`' result): where it does not (``None`` or
    ``()`` for a whole combinator), its nodes count as ``None``.
    """
    if not isinstance(structure, (tuple, list)) or isinstance(structure, KroneckerFactors):
        return fn(structure, other)
    matches = isinstance(other, (tuple, list)) and len(other) == len(structure)
    out = [map_layers(fn, s, other[i] if matches else None) for i, s in enumerate(structure)]
    return out if isinstance(structure, list) else tuple(out)
