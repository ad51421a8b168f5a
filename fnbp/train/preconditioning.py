"""K-FAC: the gradient preconditioned by Kronecker factors from the training step's backward pass.

For a Linear or Conv layer, :func:`fnbp.kfac_factors` approximates the GGN
block of its weight ``[W | b]`` (row-major vec) by B (x) A. K-FAC (Martens &
Grosse 2015) preconditions the layer's gradient G = [dW | db] (out, in + 1)
with the damped inverse of that block, which for a Kronecker product is two
small solves::

    (B (x) A)^{-1} vec(G) = vec(B^{-1} G A^{-1})

with factored Tikhonov damping (Martens & Grosse, section 6.3):
A + pi sqrt(lambda) I and B + (1/pi) sqrt(lambda) I,
pi = sqrt((tr A / dim A) / (tr B / dim B)). The factors are running averages
over the steps (``decay``); their inverses are refreshed every
``inverse_every`` steps (and at the first), in between the last ones are
reused. A layer without factors (LayerNorm, RMSNorm, a layer of yours
without a ``kfac`` rule) passes its gradient through unchanged.

:func:`kfac_preconditioner` is the optax transformation; its ``update``
takes the step's factors as the extra argument ``factors``:
``updates, state = tx.update(grads, state, params, factors=factors)``.
:func:`kfac` chains it with momentum and the learning rate, the optimizer
``fnbp train --optimizer kfac`` uses. :func:`fnbp.make_train_step` and
:func:`fnbp.fit` recognize it and take the factors from the step's own
backward pass (``fnbp.kfac_factors(..., kind="mc")`` with a key from the
state), so it is used like any optax optimizer::

    optimizer = fnbp.train.kfac(0.05)
    step = fnbp.make_train_step(model, fnbp.cross_entropy_loss, optimizer)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import Array

from fnbp.nn import _args
from fnbp.nn.layer import KroneckerFactors, Params

__all__ = ["KfacState", "find_kfac_state", "kfac", "kfac_preconditioner"]


class KfacState(NamedTuple):
    """The preconditioner's state: steps, the key of the MC columns, the averaged factors.

    Attributes:
      step: the updates taken so far (int32).
      key: the raw data (``jax.random.key_data``, uint32) of the PRNG key the
        training step draws its Monte-Carlo columns from
        (``jax.random.fold_in(wrap_key_data(key), step)`` at each step); raw
        so that checkpoints store it as any other array.
      factors: the running averages, a pytree like params down to the layers:
        a :class:`fnbp.KroneckerFactors` for each Linear and Conv layer, ``None``
        elsewhere (zeros before the first update).
      inverses: the damped inverses ``(A^-1, B^-1)`` in the same structure, as
        :class:`fnbp.KroneckerFactors`.
    """

    step: Array
    key: Array
    factors: Any
    inverses: Any


def _is_layer(node: Any) -> bool:
    """A Linear layer's params ``{"W"[, "b"]}`` or a convolution's ``{"w"[, "b"]}``."""
    return (
        isinstance(node, dict)
        and set(node) - {"b"} in ({"W"}, {"w"})
        and jnp.ndim(node["W"] if "W" in node else node["w"]) >= 2
    )


def _as_matrix(params: dict) -> Array:
    """[W | b] of a layer: W (out, in), a convolution's filters as (C2, k... C)."""
    if "W" in params:
        W = params["W"]
    else:
        w = params["w"]
        W = w.reshape(-1, w.shape[-1]).T
    if "b" in params:
        W = jnp.concatenate([W, params["b"][:, None].astype(W.dtype)], axis=1)
    return W


def _from_matrix(G: Array, like: dict) -> dict:
    """The inverse of :func:`_as_matrix`: a dict shaped like ``like``."""
    out = {}
    if "b" in like:
        out["b"] = G[:, -1].astype(like["b"].dtype)
        G = G[:, :-1]
    if "W" in like:
        out["W"] = G.astype(like["W"].dtype)
    else:
        out["w"] = G.T.reshape(like["w"].shape).astype(like["w"].dtype)
    return out


def _zero_factors(params: dict) -> KroneckerFactors:
    W = _as_matrix(params)
    out, inp = W.shape
    dtype = jnp.promote_types(W.dtype, jnp.float32)
    return KroneckerFactors(jnp.zeros((inp, inp), dtype), jnp.zeros((out, out), dtype))


def _layers(params: Params) -> Any:
    """The zero factors of every Linear and Conv layer in params, ``None`` for any other layer.

    A dict is one layer's params (fnbp's layers keep theirs in one); tuples and
    lists are combinators' (one entry per child). The structure is the state's.
    """
    if isinstance(params, dict):
        return _zero_factors(params) if _is_layer(params) else None
    if isinstance(params, (tuple, list)):
        return (
            type(params)(_layers(p) for p in params)
            if isinstance(params, list)
            else tuple(_layers(p) for p in params)
        )
    return None


def _walk(fn, state: Any, other: Any) -> Any:
    """``fn(state_leaf, other_node)`` for each layer of the state's structure (see _layers).

    ``other`` follows params' containers; where it does not (a step's factors
    ``None`` or ``()`` for a whole combinator), its nodes count as ``None``.
    """
    if isinstance(state, KroneckerFactors) or state is None:
        return fn(state, other)
    children = other if isinstance(other, (tuple, list)) and len(other) == len(state) else None
    out = [_walk(fn, s, None if children is None else c) for s, c in zip(state, children or state)]
    return out if isinstance(state, list) else tuple(out)


def _damped_inverses(f: KroneckerFactors, damping: Array) -> KroneckerFactors:
    """(A + pi sqrt(lambda) I)^-1 and (B + sqrt(lambda)/pi I)^-1, factored Tikhonov damping."""
    A, B = f
    trace_a = jnp.trace(A) / A.shape[0]
    trace_b = jnp.trace(B) / B.shape[0]
    pi = jnp.sqrt(jnp.maximum(trace_a, 1e-30) / jnp.maximum(trace_b, 1e-30))
    root = jnp.sqrt(damping)

    def inverse(M, shift):
        M = M + shift * jnp.eye(M.shape[0], dtype=M.dtype)
        return jax.scipy.linalg.cho_solve(
            jax.scipy.linalg.cho_factor(M), jnp.eye(M.shape[0], dtype=M.dtype)
        )

    return KroneckerFactors(inverse(A, pi * root), inverse(B, root / pi))


def kfac_preconditioner(
    *,
    damping: float = 0.1,
    decay: float = 0.95,
    inverse_every: int = 10,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """The K-FAC preconditioner as an optax transformation (see the module doc).

    Args:
      damping: lambda > 0, the Tikhonov damping of the GGN blocks.
      decay: in [0, 1): the running average's weight of the past factors
        (``F <- decay F + (1 - decay) F_step``; the first step's are taken as
        they are).
      inverse_every: refresh the damped inverses every this many steps (>= 1).
      seed: the seed of the key in the state (the training step's MC columns).

    Returns:
      ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params, *, factors)`` needs the step's :func:`fnbp.kfac_factors`.

    Raises:
      ValueError: a damping not > 0, a decay outside [0, 1), inverse_every < 1.
    """
    fn = "kfac_preconditioner"
    damping = _args.non_negative_float(fn, "damping", damping, "the Tikhonov damping")
    if not damping > 0:
        raise ValueError(f"{fn}: damping must be > 0 (it keeps the inverses finite), got 0.0")
    decay = _args.non_negative_float(fn, "decay", decay, "the running average's weight")
    if not decay < 1:
        raise ValueError(f"{fn}: decay must be in [0, 1), got {decay}; 0 uses each step's factors")
    inverse_every = _args.positive_int(fn, "inverse_every", inverse_every, "steps between inverses")
    seed = _args.non_negative_int(fn, "seed", seed)

    def init(params):
        zeros = _layers(params)
        return KfacState(
            jnp.zeros((), jnp.int32), jax.random.key_data(jax.random.key(seed)), zeros, zeros
        )

    def update(updates, state, params=None, *, factors=None, **extra):
        del params, extra
        if factors is None:
            raise ValueError(
                f"{fn}: update needs the step's Kronecker factors, "
                f"update(grads, state, params, factors=fnbp.kfac_factors(...)[2]); "
                f"fnbp.make_train_step and fnbp.fit pass them for you"
            )
        first = state.step == 0

        def average(old, new):
            if old is None or not isinstance(new, KroneckerFactors):
                return old
            return KroneckerFactors(
                *(
                    jnp.where(first, n.astype(o.dtype), decay * o + (1 - decay) * n.astype(o.dtype))
                    for o, n in zip(old, new)
                )
            )

        averaged = _walk(average, state.factors, factors)

        def refresh(_):
            return _walk(
                lambda f, _: (
                    None if f is None else _damped_inverses(f, jnp.asarray(damping, f.A.dtype))
                ),
                averaged,
                None,
            )

        inverses = jax.lax.cond(
            state.step % inverse_every == 0, refresh, lambda _: state.inverses, None
        )

        def precondition(inv, grads):
            if inv is None or not _is_layer(grads):
                return grads
            G = _as_matrix(grads).astype(inv.A.dtype)
            return _from_matrix(inv.B @ G @ inv.A, grads)

        updates = _walk(precondition, inverses, updates)
        return updates, KfacState(state.step + 1, state.key, averaged, inverses)

    return optax.GradientTransformationExtraArgs(init, update)


def kfac(
    learning_rate: float,
    *,
    momentum: float = 0.9,
    damping: float = 0.1,
    decay: float = 0.95,
    inverse_every: int = 10,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC with momentum: the preconditioned gradient, a trace, the learning rate.

    ``optax.chain(kfac_preconditioner(...), optax.trace(momentum), optax.scale(-lr))``;
    see :func:`kfac_preconditioner` for the other arguments.

    Args:
      learning_rate: the step size (> 0).
      momentum: the trace's decay in [0, 1) (0 for none).
    """
    lr = _args.non_negative_float("kfac", "learning_rate", learning_rate, "the step size")
    if not lr > 0:
        raise ValueError("kfac: learning_rate must be > 0, got 0.0")
    return optax.chain(
        kfac_preconditioner(damping=damping, decay=decay, inverse_every=inverse_every, seed=seed),
        optax.trace(decay=momentum),
        optax.scale(-lr),
    )


def find_kfac_state(opt_state: Any) -> KfacState | None:
    """The :class:`KfacState` inside an optimizer state (a chain's included), or None."""
    for node in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda node: isinstance(node, KfacState)
    ):
        if isinstance(node, KfacState):
            return node
    return None
