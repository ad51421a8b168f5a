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

from fnbp.curvature import (
    as_matrix,
    from_matrix,
    is_kronecker_layer,
    layer_structure,
    map_layers,
)
from fnbp.nn import _args
from fnbp.nn.layer import KroneckerFactors

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


def _zero_factors(params: dict) -> KroneckerFactors:
    W = as_matrix(params)
    out, inp = W.shape
    dtype = jnp.promote_types(W.dtype, jnp.float32)
    return KroneckerFactors(jnp.zeros((inp, inp), dtype), jnp.zeros((out, out), dtype))


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
        zeros = layer_structure(params, _zero_factors)
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

        averaged = map_layers(average, state.factors, factors)

        def refresh(_):
            return map_layers(
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
            if inv is None or not is_kronecker_layer(grads):
                return grads
            G = as_matrix(grads).astype(inv.A.dtype)
            return from_matrix(inv.B @ G @ inv.A, grads)

        updates = map_layers(precondition, inverses, updates)
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
