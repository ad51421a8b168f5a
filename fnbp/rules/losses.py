"""The losses of the notes and their backward functions B[loss, t].

Each loss is written for one example, as in the notes; leading axes are
example axes and the loss has one value per example. The training objective is
the mean over examples, J = (1/n) sum_i J^(i) (eq. 7.2); take ``jnp.mean`` of
the returned array (or use ``fnbp.backprop``, which does it for you).

    MSE          J = 1/2 ||t - y||^2                         (7.1)
                 B[J, t](v) = (t - y) v
    logistic     J = y log(1 + e^{-t}) + (1 - y) log(1 + e^{t})   (2.3)
                 B[J, t](v) = (sigmoid(t) - y) v                  (7.70)
    cross-entr.  J = -log softmax(t)_y                         (2.14)
                 B[J, t](v) = (softmax(t) - e_y) v                (7.71)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from fnbp.checking import check, check_finite
from fnbp.rules import _validate
from fnbp.rules._examples import normal, rng
from fnbp.rules._rule import declare


def _common_dtype(t: Array, y: Array) -> tuple[Array, Array]:
    """t and y cast to one floating dtype before the rule.

    The rule then sees one dtype, and the casts, outside it, hand each argument
    its cotangent in its own dtype (t float32 with y float64 gets a float32 dt).
    """
    dtype = jnp.result_type(t, y)
    return jnp.asarray(t, dtype), jnp.asarray(y, dtype)


def _same_shape(fn: str, t: Array, y: Array, what: str) -> None:
    if jnp.shape(t) != jnp.shape(y):
        raise ValueError(
            f"{fn}: t and y must have the same shape {what}, got t.shape="
            f"{jnp.shape(t)} and y.shape={jnp.shape(y)}; reshape y to {jnp.shape(t)}"
        )


# --- mean squared error (7.1) -------------------------------------------------


class MseResiduals(NamedTuple):
    """The residual ``r = t - y``."""

    r: Array


def mse_loss_fwd(t: Array, y: Array) -> tuple[Array, MseResiduals]:
    """Forward pass of :func:`mse_loss` with its residuals."""
    r = t - y
    return 0.5 * jnp.sum(r * r, axis=-1), MseResiduals(r)


def mse_loss_bwd(res: MseResiduals, v: Array) -> tuple[Array, Array]:
    """B[MSE, t](v) = (t - y) v per example; B[MSE, y](v) = -(t - y) v."""
    dt = res.r * v[..., None].astype(res.r.dtype)
    return dt, -dt


def mse_loss(t: Array, y: Array) -> Array:
    """Squared error J = 1/2 sum_k (t_k - y_k)^2 over the last axis (eq. 7.1).

    Args:
      t: predictions, shape (..., k), floating.
      y: targets, the same shape and a floating dtype.

    Returns:
      One loss per example, shape (...).

    Raises:
      ValueError: t and y of different shapes, or t a scalar (use shape (1,)
        for a single output).
      TypeError: a non-floating t or y.
    """
    _validate.require_float("mse_loss", "t", t)
    _validate.require_float("mse_loss", "y", y)
    _validate.require_min_ndim("mse_loss", "t", t, 1, "(..., k); for one output use (..., 1)")
    _same_shape("mse_loss", t, y, "(..., k)")
    t, y = _common_dtype(t, y)
    check_finite("mse_loss", "t", t)
    check_finite("mse_loss", "y", y)
    return MSE_LOSS.apply(t, y)


def _mse_args(key, dtype):
    gen = rng(key)
    return (normal(gen, (5, 3), dtype), normal(gen, (5, 3), dtype))


MSE_LOSS = declare(
    mse_loss, mse_loss_fwd, mse_loss_bwd,
    reference=lambda t, y: 0.5 * jnp.sum((t - y) ** 2, axis=-1),
    examples=_mse_args, equations=("7.1",), kink="none: smooth.", family="loss",
)


# --- logistic loss (2.3) -------------------------------------------------------


class LogisticResiduals(NamedTuple):
    """The logit ``t`` and ``p_minus_y = sigmoid(t) - y``."""

    t: Array
    p_minus_y: Array


def logistic_loss_fwd(t: Array, y: Array) -> tuple[Array, LogisticResiduals]:
    """Forward pass of :func:`logistic_loss` with its residuals."""
    # y log(1 + e^-t) + (1 - y) log(1 + e^t) = softplus(t) - y t, with
    # softplus(t) = logaddexp(0, t): exact and finite for |t| up to the dtype's max.
    loss = jnp.logaddexp(jnp.zeros((), t.dtype), t) - y * t
    return loss, LogisticResiduals(t, jax.lax.logistic(t) - y)


def logistic_loss_bwd(res: LogisticResiduals, v: Array) -> tuple[Array, Array]:
    """B[J, t](v) = (sigmoid(t) - y) v (eq. 7.70); B[J, y](v) = -t v."""
    t, p_minus_y = res
    return p_minus_y * v, (-t * v).astype(p_minus_y.dtype)


def logistic_loss(t: Array, y: Array) -> Array:
    """Logistic loss J = y log(1 + e^{-t}) + (1 - y) log(1 + e^{t}) (eq. 2.3).

    Computed as ``logaddexp(0, t) - y t``, finite for any finite t (|t| up to
    1e4 and far beyond: J(1e4, 0) = 1e4, J(1e4, 1) = 0 exactly).

    Args:
      t: logits, any shape (one per example), floating.
      y: targets in [0, 1] (hard labels 0/1 or soft targets), the same shape,
        floating. Values outside [0, 1] are not a probability; they raise under
        :func:`fnbp.checked` and are used as given otherwise.

    Returns:
      One loss per entry, t's shape.
    """
    _validate.require_float("logistic_loss", "t", t)
    _validate.require_float("logistic_loss", "y", y)
    _same_shape("logistic_loss", t, y, "(one logit and one target per example)")
    t, y = _common_dtype(t, y)
    check_finite("logistic_loss", "t", t)
    check_finite("logistic_loss", "y", y)
    check(jnp.all((y >= 0) & (y <= 1)),
          "logistic_loss: y holds a target outside [0, 1]; targets are probabilities")
    return LOGISTIC_LOSS.apply(t, y)


def _logistic_args(key, dtype):
    gen = rng(key)
    return (normal(gen, (6,), dtype, scale=3.0), jnp.asarray(gen.random(6), dtype))


LOGISTIC_LOSS = declare(
    logistic_loss, logistic_loss_fwd, logistic_loss_bwd,
    reference=lambda t, y: y * jnp.log1p(jnp.exp(-t)) + (1 - y) * jnp.log1p(jnp.exp(t)),
    examples=_logistic_args, equations=("2.3", "7.70"), kink="none: smooth.",
    family="loss",
)


# --- cross-entropy (2.14) ------------------------------------------------------


class CrossEntropyResiduals(NamedTuple):
    """``p = softmax(t)``, the labels ``y`` and ``valid``, 1 where y is in range."""

    p: Array
    y: Array
    valid: Array


def cross_entropy_loss_fwd(t: Array, y: Array) -> tuple[Array, CrossEntropyResiduals]:
    """Forward pass of :func:`cross_entropy_loss` with its residuals.

    Per-example losses, label validity and softmax(t), from one pass of exp.
    """
    k = t.shape[-1]
    valid = (y >= 0) & (y < k)
    safe_y = jnp.where(valid, y, 0)
    t_y = jnp.take_along_axis(t, safe_y[..., None], axis=-1)[..., 0]
    # logsumexp(t) = m + log(sum exp(t - m)) with m = max(t): no overflow; the
    # same exponentials give softmax(t) for the backward function.
    m = jax.lax.stop_gradient(jnp.max(t, axis=-1, keepdims=True))
    e = jnp.exp(t - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    lse = (m + jnp.log(total))[..., 0]
    loss = jnp.where(valid, lse - t_y, jnp.asarray(jnp.nan, t.dtype))
    return loss, CrossEntropyResiduals(e / total, y, valid)


def cross_entropy_loss_bwd(res: CrossEntropyResiduals, v: Array) -> tuple[Array, None]:
    """B[J, t](v) = (softmax(t) - e_y) v (eq. 7.71); labels get no cotangent.

    e_y is one-hot, so the rule scales softmax(t) by v and then subtracts v at
    each example's label entry (a scatter-add of one value per example)
    instead of building the dense one-hot matrix. The scatter's indices
    depend on the labels alone, so XLA computes them apart from the forward
    pass: on XLA:CPU a step that starts with two independent operations is run
    on the runtime's worker pool from its first matmul on, which measured
    5-15% faster at batch 32-256 on two cores (``benchmarks/bench_mlp.py``).

    An out-of-range label gives a NaN cotangent row, like its NaN loss.
    """
    p, y, valid = res
    k = p.shape[-1]
    scale = jnp.where(valid, v.astype(p.dtype), jnp.asarray(jnp.nan, p.dtype))
    dt = (p * scale[..., None]).reshape(-1, k)
    rows = jnp.arange(dt.shape[0])
    labels = jnp.where(valid, y, 0).reshape(-1)
    dt = dt.at[rows, labels].add(-scale.reshape(-1), mode="promise_in_bounds")
    return dt.reshape(p.shape), None


def cross_entropy_loss(t: Array, y: Array) -> Array:
    """Cross-entropy J = -log softmax(t)_y = logsumexp(t) - t_y (eq. 2.14).

    Stable: computed with logsumexp, never exp(t) alone.

    Args:
      t: logits, shape (..., k), floating.
      y: integer labels in [0, k), shape (...).

    Returns:
      One loss per example, shape (...). A label outside [0, k) cannot be seen
      at trace time: unchecked, its loss (and its cotangent row) is NaN, never a
      plausible number; under :func:`fnbp.checked` it raises ``ValueError``.

    Raises:
      TypeError: float labels (pass integer class indices, not one-hot).
      ValueError: y's shape not t's shape without the last axis.
    """
    _validate.require_float("cross_entropy_loss", "t", t)
    _validate.require_int("cross_entropy_loss", "y", y,
                          "class indices in [0, k), not one-hot or probabilities")
    _validate.require_min_ndim("cross_entropy_loss", "t", t, 1, "(..., k classes)")
    t, y = jnp.asarray(t), jnp.asarray(y)
    if y.shape != t.shape[:-1]:
        raise ValueError(
            f"cross_entropy_loss: y must have shape t.shape[:-1]={t.shape[:-1]} "
            f"(one label per example), got y.shape={y.shape} and t.shape={t.shape}"
        )
    k = t.shape[-1]
    check_finite("cross_entropy_loss", "t", t)
    check(jnp.all((y >= 0) & (y < k)),
          f"cross_entropy_loss: y holds a label outside [0, {k}); labels are "
          f"class indices for t's last axis of length {k}")
    return CROSS_ENTROPY_LOSS.apply(t, y)


def _cross_entropy_reference(t, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(t, axis=-1), y[..., None], axis=-1)[..., 0]


def _cross_entropy_args(key, dtype):
    gen = rng(key)
    return (normal(gen, (5, 4), dtype, scale=2.0), jnp.asarray(gen.integers(0, 4, 5), jnp.int32))


CROSS_ENTROPY_LOSS = declare(
    cross_entropy_loss, cross_entropy_loss_fwd, cross_entropy_loss_bwd,
    reference=_cross_entropy_reference, examples=_cross_entropy_args,
    equations=("2.14", "7.71"), kink="none: smooth in t; labels get no cotangent.",
    family="loss",
)
