"""Per-example quantities from one forward and one backward pass: norms, clipping, moments.

With n examples along the first axis of x, J^(i) is example i's loss (the
mean of its losses when it has several positions) and g_i = dJ^(i)/dparams its
gradient; the training objective is J = (1/n) sum_i J^(i) (eq. 7.2) and its
gradient (1/n) sum_i g_i (Algorithm 3, :func:`fnbp.backprop`).

- :func:`per_example_grad_norms`: ||g_i||, for each i;
- :func:`clipped_grads`: (1/n) sum_i min(1, C/||g_i||) g_i, DP-SGD's clipped
  mean (Abadi et al. 2016), flat or per parameter, with a mask of kept examples;
- :func:`grad_moments`: (1/n) sum_i g_i and (1/n) sum_i g_i (.) g_i
  (BackPACK's SumGradSquared, divided by n).

Book-Keeping (Bu et al., ICML 2023). fnbp owns every backward function, so
one batched backward pass gives what :func:`per_example_grads` (``jax.vmap``
of the per-example backprop, memory n times the gradient's) would otherwise
have to build. In the backward pass each layer returns, per parameter leaf,
the per-example squared norms ||g_i(P)||^2 (for MM: ||v_i||^2 ||z_i||^2,
eq. 7.65, never the outer products), its input cotangent, and a *tape*: its
residuals (already stored by the forward pass) and its incoming cotangent v.
After the pass, with the scales s_i known, each layer's clipped gradient is one
contraction with the scales folded into v: sum_i s_i g_i(W) = V^T diag(s) Z
for MM, one dot per weight (:func:`fnbp.nn.layer.scaled_backward`). The
extra cost over :func:`fnbp.backprop` is the norms (O(n (d_in + d_out)) per
MM on vectors) and the memory of the tape's cotangents until the contraction;
the weight gradients are computed once. Mixed ghost clipping (Bu et al.):
where a layer's cost rule materializes its g_i anyway (a convolution with
2 T^2 > D), they travel in the tape and its clipped gradient is
sum_i s_i g_i, one contraction over the examples, with no second
weight-gradient convolution; :func:`grad_moments` likewise takes such a
layer's mean gradient from the g_i its ``sq_grads`` builds. See
:mod:`fnbp.nn.layer` for the layer-level contract and :func:`fnbp.make_layer`
for adding it to a layer.

A layer with parameters but without a rule (``sq_norms`` for the norms and
clipping, ``sq_grads`` for the moments) makes the whole model fall back to
materializing the per-example gradients, said once per layer with a
:class:`PerExampleFallbackWarning`.

All three functions trace under ``jax.jit(f, static_argnums=(0, 1))`` (the
model and the loss static); pass ``reduction`` by ``functools.partial`` or
``static_argnames="reduction"``.

Arguments. All four functions take x of shape (n, *example_shape) and y of
shape (n, ...) (nested lists of numbers are converted) and refuse, with a
``ValueError`` naming the function, an x without an example axis (0-d) and a
y whose first axis is not n. Under :func:`fnbp.checked` the model checks its
input, its params and every layer's output for NaN and infinity, naming the
first place a non-finite value appears (see :func:`fnbp.make_layer`), the
loss checks the labels, and :func:`clipped_grads` checks a traced clip norm
and mask.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from fnbp.backprop import (
    Loss,
    _backprop,
    _check,
    _inputs,
    _loss_and_cotangent,
    require_per_example_losses,
)
from fnbp.checking import check
from fnbp.nn.layer import Layer, MissingRuleError, Params, check_input
from fnbp.rules._per_example import example_sum as _example_sum
from fnbp.rules._per_example import squares as _squares

__all__ = [
    "PerExampleFallbackWarning",
    "clipped_grads",
    "grad_moments",
    "per_example_grad_norms",
    "per_example_grads",
]

REDUCTIONS = ("mean", "sum")


class PerExampleFallbackWarning(UserWarning):
    """A layer has no rule for a per-example quantity: the gradients are materialized.

    Said once per layer and quantity. Give the layer a rule with
    ``fnbp.make_layer(name, init, forward, backward, sq_norms=..., sq_grads=...)``
    (see :func:`fnbp.make_layer`), or silence it with
    ``warnings.simplefilter("ignore", fnbp.PerExampleFallbackWarning)``.
    """


_WARNED: set[tuple[str, str]] = set()


def _fallback(fn: str, missing: MissingRuleError) -> None:
    """Warn once per (layer, hook) that fn materializes the per-example gradients."""
    key = (missing.layer, missing.hook)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        PerExampleFallbackWarning(
            f"{fn}: layer {missing.layer!r} has parameters but no {missing.hook} rule, so the "
            f"per-example gradients of the whole model are materialized (jax.vmap of the "
            f"per-example backprop: n times the memory of the gradient). Give the layer one: "
            f"fnbp.make_layer(name, init, forward, backward, {missing.hook}=...); see "
            f"fnbp.make_layer for the contract"
        ),
        stacklevel=3,
    )


# --- per-example gradients, materialized -------------------------------------------


def per_example_grads(
    model: Layer, loss: Loss, params: Params, x: Array, y: Array
) -> tuple[Array, Params]:
    """Each example's loss J^(i) and its gradient dJ^(i)/dparams.

    ``jax.vmap`` of Algorithm 3 on one example: memory n times the gradient's.

    Args:
      model, loss, params: as :func:`fnbp.backprop`.
      x: inputs of shape (n, *example_shape): exactly one leading example axis.
      y: targets of shape (n, ...).

    Returns:
      ``(losses, grads)``: losses of shape (n,) and a pytree like ``params``
      whose leaves have a leading axis of length n.
    """
    fn = "per_example_grads"
    x, y = _per_example_inputs(fn, model, loss, x, y)
    # Checked mode: x is checked here, before jax.vmap, so that the first
    # non-finite entry is named by its index in the batch.
    check_input(model.name, x)
    return _materialized(model, loss, params, x, y)


def _per_example_inputs(fn: str, model, loss, x, y):
    """The arguments' checks of every per-example function: x and y as (n, ...) arrays."""
    x, y = _inputs(fn, x, y)
    _check(fn, model, loss, x, y)
    n = _examples(fn, x)
    if jnp.ndim(y) >= 1 and jnp.shape(y)[0] != n:
        raise ValueError(
            f"{fn}: x has {n} examples (x.shape={jnp.shape(x)}) but y has "
            f"{jnp.shape(y)[0]} (y.shape={jnp.shape(y)}); pass one target per "
            f"example"
        )
    return x, y


def _materialized(model, loss, params, x, y):
    def one(x_i, y_i):
        return _backprop(model, loss, params, x_i, y_i)

    return jax.vmap(one)(x, y)


# --- the one forward pass and the backward pass that keeps the books ------------------


def _forward(fn: str, model: Layer, loss: Loss, params, x, y):
    """Forward pass, per-example losses J^(i) (n,) and cotangents dJ^(i)/dt."""
    n = jnp.shape(x)[0]
    t, residuals = model.forward(params, x)
    losses, dt = _loss_and_cotangent(loss, t, y, examples=n, fn=fn)
    losses = jnp.mean(
        losses.reshape(n, -1), axis=1, dtype=jnp.promote_types(losses.dtype, jnp.float32)
    )
    return residuals, losses, dt


def _norms_pass(fn: str, model: Layer, loss: Loss, params, x, y):
    """(losses, per-leaf sq norms, tape or None, per-example grads or None).

    The Book-Keeping backward pass; when a layer has no ``sq_norms`` rule, the
    materialized per-example gradients instead (the tape is then None).
    """
    residuals, losses, dt = _forward(fn, model, loss, params, x, y)
    try:
        sq, _, tape = model.book.norms(params, residuals, dt)
        return losses, sq, tape, None
    except MissingRuleError as missing:
        _fallback(fn, missing)
    losses, grads = _materialized(model, loss, params, x, y)
    return losses, jax.tree_util.tree_map(lambda g: _squares(g)[0], grads), None, grads


def _total(sq: Params, like: Array) -> Array:
    """sum over the leaves of the per-leaf squared norms, shape (n,), in like's dtype."""
    total = jnp.zeros(like.shape, like.dtype)
    for leaf in jax.tree_util.tree_leaves(sq):
        total = total + leaf.astype(like.dtype)
    return total


def per_example_grad_norms(
    model: Layer, loss: Loss, params: Params, x: Array, y: Array
) -> tuple[Array, Array]:
    """Each example's loss J^(i) and the Euclidean norm ||g_i|| of its whole gradient.

    ||g_i||^2 = sum over parameter leaves P of ||g_i(P)||_F^2, each from the
    layer's ``sq_norms`` rule in one batched backward pass (MM:
    ||v_i z_i^T||_F = ||v_i|| ||z_i||; a sequence: the Gram form or the
    materialized gradient, whichever is cheaper; see the rules' hooks), or,
    for a model with a layer without one, from :func:`per_example_grads`
    (with a :class:`PerExampleFallbackWarning`).

    Args:
      model, loss, params: as :func:`fnbp.backprop`.
      x: inputs of shape (n, *example_shape): exactly one leading example
        axis (further leading axes are positions inside an example).
      y: targets of shape (n, ...).

    Returns:
      ``(losses, norms)``, both of shape (n,) and at least float32. When the
      loss returns several values per example (one per position of a
      sequence), J^(i) is their mean, as in :func:`per_example_grads`.
    """
    x, y = _per_example_inputs("per_example_grad_norms", model, loss, x, y)
    losses, sq, _, _ = _norms_pass("per_example_grad_norms", model, loss, params, x, y)
    return losses, jnp.sqrt(_total(sq, losses))


# --- clipping -------------------------------------------------------------------------


def clipped_grads(
    model: Layer,
    loss: Loss,
    params: Params,
    x: Array,
    y: Array,
    clip_norm: Any,
    *,
    mask: Array | None = None,
    reduction: str = "mean",
) -> tuple[Array, Params, Any]:
    """J, the mean of the per-example gradients clipped to norm C, and the norms.

    Flat clipping (``clip_norm`` a positive float C), DP-SGD's clipped mean::

        s_i = min(1, C / ||g_i||)        (s_i = 1 when ||g_i|| = 0: no NaN)
        grads = (1/m) sum_i k_i s_i g_i  (reduction="mean"), or sum_i k_i s_i g_i ("sum")

    with k_i the mask (1 keeps example i, 0 drops it; all ones when mask is
    None) and m = sum_i k_i the number of kept examples. Per-parameter
    clipping (``clip_norm`` a pytree with params' structure, one positive
    float C_P per parameter array P): each array is clipped on its own,
    s_i(P) = min(1, C_P / ||g_i(P)||). ``C = inf`` clips nothing.

    Book-Keeping: one forward pass and one backward pass that returns every
    layer's per-leaf ||g_i(P)||^2 and keeps its residuals and cotangent v;
    then each layer's clipped gradient is one contraction with the scales
    folded into v (MM: V^T diag(k s / m) Z, one dot per weight). No
    per-example gradient is built for layers with a ``sq_norms`` rule;
    a model with a layer without one materializes them (with a
    :class:`PerExampleFallbackWarning`). Cost for an MLP: about one
    :func:`fnbp.backprop` plus the norms (O(n (d_in + d_out)) per MM).

    Args:
      model, loss, params: as :func:`fnbp.backprop`.
      x: inputs of shape (n, *example_shape), one leading example axis.
      y: targets of shape (n, ...).
      clip_norm: C > 0, a float (flat clipping) or a pytree with params'
        structure of floats (per-parameter clipping), e.g.
        ``jax.tree_util.tree_map(lambda _: 1.0, params)``; ``inf`` clips
        nothing. A concrete C (a Python float, a concrete array, any leaf of
        the pytree) that is NaN, 0 or negative is refused at call time. A
        traced C (under ``jax.jit``) is checked at run time under
        :func:`fnbp.checked`; unchecked, a traced C that is not > 0 makes the
        gradient NaN (that leaf's, per parameter), never the unclipped
        gradient a NaN C would otherwise give (for DP-SGD a silent privacy
        failure) or a sign-flipped one (C < 0).
      mask: optional (n,) bool or 0/1 array (a list is converted); examples
        with mask 0 contribute nothing to J or grads (their norms are still
        returned; their inputs must still be finite, e.g. zeros as padding).
        A concrete mask with another value (0.5, NaN) is refused: to weight
        examples, scale their losses. A traced non-bool mask is checked at
        run time under :func:`fnbp.checked`; unchecked, another value makes
        J and the gradients NaN.
      reduction: ``"mean"`` divides the clipped sum by the number of kept
        examples, ``"sum"`` does not (DP-SGD adds its noise to the sum).
        Static: under ``jax.jit`` pass it by ``functools.partial`` or
        ``static_argnames="reduction"``.

    Returns:
      ``(J, grads, norms)``: J the mean loss of the kept examples (0 when
      none is kept; at least float32), grads a pytree like params in the
      parameters' dtypes (zeros when none is kept), norms the ||g_i|| of
      every example, shape (n,) (flat clipping), or a pytree like params of
      the ||g_i(P)||, each (n,) (per-parameter clipping); at least float32.

    Raises:
      TypeError: model not a Layer, loss not callable, clip_norm neither a
        number nor a pytree like params, a mask neither bool nor real, x or
        y not arrays of numbers.
      ValueError: a concrete clip_norm not > 0 (NaN included), a mask not of
        shape (n,) or not 0/1, a reduction other than "mean" or "sum", x
        without an example axis, labels not one per example.
    """
    fn = "clipped_grads"
    x, y = _per_example_inputs(fn, model, loss, x, y)
    n = _examples(fn, x)
    per_leaf, traced = _clip_norms(fn, clip_norm, params)
    keep = _mask(fn, mask, n)
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{fn}: reduction must be 'mean' (the clipped mean over the kept "
            f"examples) or 'sum' (their clipped sum, for DP-SGD's noise), got "
            f"{reduction!r}"
        )
    losses, sq, tape, grads_i = _norms_pass(fn, model, loss, params, x, y)
    acc = losses.dtype
    weight = jnp.ones((n,), acc) if keep is None else keep.astype(acc)
    kept = jnp.sum(weight)
    weight = weight / jnp.maximum(kept, 1) if reduction == "mean" else weight

    def scale(norm, c):
        given = c
        c = jnp.asarray(c, acc)
        over = norm > c
        s = jnp.where(over, c / jnp.where(over, norm, 1), 1) * weight
        if any(given is t for t in traced):
            # A traced C that is NaN, 0 or negative (refused under fnbp.checked) gives a
            # NaN gradient: loud, never the unclipped (NaN) or sign-flipped (C < 0) one.
            s = jnp.where(c > 0, s, jnp.nan)
        return s

    if per_leaf is None:
        norms = jnp.sqrt(_total(sq, losses))
        s = scale(norms, clip_norm)
        scales = jax.tree_util.tree_map(lambda _: s, params)  # one array: one contraction
    else:
        norms = jax.tree_util.tree_map(lambda q: jnp.sqrt(q.astype(acc)), sq)
        scales = jax.tree_util.tree_map(scale, norms, per_leaf)
    if grads_i is None:
        grads = model.book.clipped(params, tape, scales)
    else:
        grads = jax.tree_util.tree_map(
            lambda g, s, p: _example_sum(g, s).astype(jnp.result_type(p)), grads_i, scales, params
        )
    J = jnp.sum(jnp.where(weight > 0, losses, 0)) / jnp.maximum(kept, 1)
    return J, grads, norms


def _examples(fn: str, x) -> int:
    if jnp.ndim(x) < 1:
        raise ValueError(
            f"{fn}: x must have a leading example axis, shape (n, ...), got a "
            f"scalar; pass x[None] for one example"
        )
    return jnp.shape(x)[0]


def _clip_norms(fn: str, clip_norm, params):
    """(None for flat clipping, else the per-leaf pytree; the traced leaves), checked.

    A concrete C must be > 0 (inf allowed); a traced C is checked at run time
    under :func:`fnbp.checked`, and unchecked its clipped gradient is NaN
    where C is not > 0 (see :func:`clipped_grads`).
    """
    traced: list = []
    treedef: jax.tree_util.PyTreeDef
    leaves, treedef = jax.tree_util.tree_flatten(clip_norm)
    flat = treedef == jax.tree_util.tree_structure(0.0)
    if not flat and treedef != jax.tree_util.tree_structure(params):
        raise TypeError(
            f"{fn}: clip_norm must be one positive float (flat clipping) or a pytree with "
            f"params' structure, one positive float per parameter array (per-parameter "
            f"clipping), got {treedef}; params have {jax.tree_util.tree_structure(params)}. "
            f"Make one with jax.tree_util.tree_map(lambda _: C, params)"
        )
    for path, c in jax.tree_util.tree_leaves_with_path(clip_norm):
        where = "clip_norm" + jax.tree_util.keystr(path)
        if not (isinstance(c, (int, float)) and not isinstance(c, bool)) and not (
            hasattr(c, "dtype")
            and jnp.issubdtype(c.dtype, jnp.number)
            and not jnp.issubdtype(c.dtype, jnp.complexfloating)
        ):
            raise TypeError(f"{fn}: {where} must be a positive float, got {type(c).__name__} {c!r}")
        if jnp.ndim(c) != 0:
            raise TypeError(
                f"{fn}: {where} must be one positive float (a scalar), got an "
                f"array of shape {jnp.shape(c)}; for per-parameter clipping pass "
                f"a pytree like params with one float per parameter array"
            )
        value = _concrete(c)
        if value is None:
            traced.append(c)
            check(
                jnp.asarray(c) > 0,
                f"{fn}: {where} must be > 0 (the L2 norm each example's gradient is clipped "
                f"to), got a traced value that is NaN, zero or negative; pass a positive "
                f"float (float('inf') clips nothing)",
            )
        elif not value > 0:
            why = (
                "; a NaN clip norm would clip nothing"
                if math.isnan(value)
                else "; a negative one would flip the gradients"
                if value < 0
                else "; 0 would drop every gradient"
            )
            raise ValueError(
                f"{fn}: {where} must be > 0 (the L2 norm each example's gradient "
                f"is clipped to), got {value}{why}; pass a positive float "
                f"(float('inf') clips nothing)"
            )
    return (None if flat else clip_norm), traced


def _concrete(c) -> float | None:
    """``float(c)`` for a concrete number, None for a traced one."""
    try:
        return float(c)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _mask(fn: str, mask, n: int):
    """The kept examples as an (n,) bool array, or None for all."""
    if mask is None:
        return None
    if not hasattr(mask, "shape"):
        try:
            mask = jnp.asarray(mask)
        except (TypeError, ValueError):
            raise TypeError(
                f"{fn}: mask must be a bool or 0/1 array of shape ({n},), got "
                f"{type(mask).__name__} {mask!r:.80}"
            ) from None
    if jnp.shape(mask) != (n,):
        raise ValueError(
            f"{fn}: mask must have shape ({n},), one entry per example (1 or "
            f"True keeps it, 0 or False drops it), got shape {jnp.shape(mask)}"
        )
    if not (
        jnp.issubdtype(mask.dtype, jnp.bool_)
        or jnp.issubdtype(mask.dtype, jnp.integer)
        or jnp.issubdtype(mask.dtype, jnp.floating)
    ):
        raise TypeError(f"{fn}: mask must be a bool or 0/1 array, got dtype {mask.dtype}")
    if jnp.issubdtype(mask.dtype, jnp.bool_):
        return jnp.asarray(mask)
    message = (
        f"{fn}: mask must hold only 0 and 1 (or True and False), one per example: 1 "
        f"keeps it, 0 drops it"
    )
    if not isinstance(mask, jax.core.Tracer):
        values = np.asarray(mask)
        bad = np.flatnonzero((values != 0) & (values != 1))
        if bad.size:
            raise ValueError(
                f"{message}; got mask[{bad[0]}] = {values[bad[0]]}; to weight "
                f"examples, scale their losses instead"
            )
        return jnp.asarray(mask) != 0
    mask = jnp.asarray(mask)
    binary = (mask == 0) | (mask == 1)
    check(jnp.all(binary), f"{message}; got another value")
    # Unchecked, an entry other than 0 or 1 makes that example's weight NaN (loud).
    return jnp.where(binary, mask, jnp.nan)


# --- moments --------------------------------------------------------------------------


def grad_moments(
    model: Layer, loss: Loss, params: Params, x: Array, y: Array
) -> tuple[Array, Params, Params]:
    """J, the mean gradient and the mean squared per-example gradient, per leaf.

    ::

        grads         = (1/n) sum_i g_i           (= fnbp.backprop's)
        second_moment = (1/n) sum_i g_i (.) g_i   (BackPACK's SumGradSquared / n)

    The gradient variance over the n examples follows: the population
    variance is ``second_moment - grads**2``, and the unbiased estimate
    ``n/(n-1) * (second_moment - grads**2)``.

    One forward pass and one backward pass: Algorithm 3 with backprop's own
    cotangents (so ``grads`` is backprop's), each layer adding its
    ``sq_grads`` rule, e.g. (V (.) V)^T (Z (.) Z) for MM on vectors, a single
    contraction over the examples, no g_i built. The chain carries
    v_i / n, so ``second_moment = n * sum_i (g_i/n) (.) (g_i/n)``. A model
    with a layer without an ``sq_grads`` rule materializes the per-example
    gradients (with a :class:`PerExampleFallbackWarning`).

    Args:
      model, loss, params: as :func:`fnbp.backprop`.
      x: inputs of shape (n, *example_shape), one leading example axis.
      y: targets of shape (n, ...); the loss returns one value (or one per
        position) per example.

    Returns:
      ``(J, grads, second_moment)``: J the mean loss (at least float32),
      grads like params in the parameters' dtypes, second_moment like params
      in at least float32.
    """
    fn = "grad_moments"
    x, y = _per_example_inputs(fn, model, loss, x, y)
    n = _examples(fn, x)
    t, residuals = model.forward(params, x)
    losses, dt = _loss_and_cotangent(loss, t, y, fn=fn)  # backprop's dJ/dt
    require_per_example_losses(fn, losses, n)
    J = jnp.mean(losses, dtype=jnp.promote_types(losses.dtype, jnp.float32))
    try:
        grads, sq, _ = model.book.moments(params, residuals, dt)
        return J, grads, jax.tree_util.tree_map(lambda q: q * n, sq)
    except MissingRuleError as missing:
        _fallback(fn, missing)
    _, grads_i = _materialized(model, loss, params, x, y)
    grads = jax.tree_util.tree_map(
        lambda g, p: jnp.mean(g, axis=0).astype(jnp.result_type(p)), grads_i, params
    )
    second = jax.tree_util.tree_map(
        lambda g: jnp.mean(jnp.square(g.astype(jnp.promote_types(g.dtype, jnp.float32))), axis=0),
        grads_i,
    )
    return J, grads, second
