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

Numerics: logistic and cross-entropy are computed from differences that are
exact or nearly so (|t| and t - max(t)) before any exponential or logarithm
is rounded, so a loss is as accurate for logits near 1e4 as near 0, and in
at least float32 for float16 and bfloat16 logits (rounded once to t's dtype).
Class labels may have any integer dtype: their range is checked exactly
(uint8 labels with 256 classes are valid).

Curvature. Each loss also declares, in its record's hooks, its Hessian with
respect to the output t as a symmetric factor S, H = d^2 J / dt^2 = S S^T
(``hessian_factor``), and a sampler of the Monte-Carlo gradient
(``sample_grad``): the gradient dJ(t, y_hat)/dt at a label y_hat drawn from
the model's own predictive distribution p(y | t), whose outer product has
expectation H. Both hold for every label y: for these losses the Hessian
does not depend on it (the GGN is the Fisher). :mod:`fnbp.curvature` pulls
the columns of S (or the sampled gradients) back through the network::

    MSE          H = I                    S = I (k columns)          y_hat ~ N(t, I)
    logistic     H = p (1 - p)            S = sqrt(p (1 - p))        y_hat ~ Bernoulli(p)
    cross-entr.  H = diag(p) - p p^T      S = diag(sqrt p) - p sqrt(p)^T   y_hat ~ Cat(p)

with p = sigmoid(t) or softmax(t). The factor's shape is ``t.shape + (C,)``:
column c of the loss value at index l is ``S[l, ..., c]`` over the entries
of t that value depends on (the last axis for MSE and cross-entropy, one
logit for the logistic loss).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from fnbp.checking import check, check_finite
from fnbp.rules import _validate
from fnbp.rules._dtypes import accumulation_dtype, at_least_float32
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


def mse_loss_jvp(res: MseResiduals, t: tuple) -> Array:
    """F[MSE](t_t, t_y) = <t - y, t_t - t_y> per example, the sum over the last axis."""
    t_t, t_y = t
    d = jnp.zeros_like(res.r)
    d = d if t_t is None else d + t_t.astype(res.r.dtype)
    d = d if t_y is None else d - t_y.astype(res.r.dtype)
    return jnp.sum(res.r * d, axis=-1)


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
    t = _validate.float_array("mse_loss", "t", t)
    y = _validate.float_array("mse_loss", "y", y)
    _validate.require_min_ndim("mse_loss", "t", t, 1, "(..., k); for one output use (..., 1)")
    _same_shape("mse_loss", t, y, "(..., k)")
    t, y = _common_dtype(t, y)
    check_finite("mse_loss", "t", t)
    check_finite("mse_loss", "y", y)
    return MSE_LOSS.apply(t, y)


def _mse_args(key, dtype):
    gen = rng(key)
    return (normal(gen, (5, 3), dtype), normal(gen, (5, 3), dtype))


def mse_loss_hessian_factor(t: Array, y: Array) -> Array:
    """S with S S^T = d^2 J/dt^2 = I for J = 1/2 ||t - y||^2: the identity, shape t.shape + (k,).

    The Gaussian likelihood with unit variance; y does not enter.
    """
    del y
    k = t.shape[-1]
    eye = jnp.eye(k, dtype=accumulation_dtype(t))
    return jnp.broadcast_to(eye, t.shape + (k,))


def mse_loss_sample_grad(t: Array, y: Array, key: Array) -> Array:
    """dJ(t, y_hat)/dt = t - y_hat at y_hat ~ N(t, I): a standard normal draw, shape t.shape.

    E[g g^T] = I = H. y does not enter.
    """
    del y
    y_hat = t.astype(accumulation_dtype(t)) + jax.random.normal(key, t.shape, accumulation_dtype(t))
    return t - y_hat


MSE_LOSS = declare(
    mse_loss,
    mse_loss_fwd,
    mse_loss_bwd,
    jvp=mse_loss_jvp,
    reference=lambda t, y: 0.5 * jnp.sum((t - y) ** 2, axis=-1),
    examples=_mse_args,
    equations=("7.1",),
    kink="none: smooth.",
    family="loss",
    hooks={"hessian_factor": mse_loss_hessian_factor, "sample_grad": mse_loss_sample_grad},
)


# --- logistic loss (2.3) -------------------------------------------------------


class LogisticResiduals(NamedTuple):
    """The logit ``t`` and ``p_minus_y = sigmoid(t) - y``."""

    t: Array
    p_minus_y: Array


def logistic_loss_fwd(t: Array, y: Array) -> tuple[Array, LogisticResiduals]:
    """Forward pass of :func:`logistic_loss` with its residuals.

    y log(1 + e^-t) + (1 - y) log(1 + e^t) = softplus(t) - y t
    = [(1 - y) t if t > 0 else -y t] + log1p(e^{-|t|}): the linear part is
    formed before anything is rounded (a hard label y = 1 with t = 20 gives
    2.06e-9, not 0), and e = e^{-|t|} <= 1 never overflows. The same e gives
    sigmoid(t) - y as (1 - y) - e / (1 + e) for t > 0 and e / (1 + e) - y
    otherwise, without the cancellation of sigmoid(t) - 1.
    """
    tw, yw = at_least_float32(t), at_least_float32(y)
    e = jnp.exp(-jnp.abs(tw))
    sig_minus = e / (1 + e)  # sigmoid(-|t|)
    positive = tw > 0
    loss = jnp.where(positive, (1 - yw) * tw, -yw * tw) + jnp.log1p(e)
    p_minus_y = jnp.where(positive, (1 - yw) - sig_minus, sig_minus - yw)
    return loss.astype(t.dtype), LogisticResiduals(t, p_minus_y)


def logistic_loss_bwd(res: LogisticResiduals, v: Array) -> tuple[Array, Array]:
    """B[J, t](v) = (sigmoid(t) - y) v (eq. 7.70); B[J, y](v) = -t v."""
    t, p_minus_y = res
    va = v.astype(p_minus_y.dtype)
    return (p_minus_y * va).astype(t.dtype), (-t.astype(va.dtype) * va).astype(t.dtype)


def logistic_loss_jvp(res: LogisticResiduals, t: tuple) -> Array:
    """F[J](t_t, t_y) = (sigmoid(t) - y) t_t - t t_y, the mirror of B (eq. 7.70)."""
    logit, p_minus_y = res
    out = jnp.zeros_like(p_minus_y)
    t_t, t_y = t
    if t_t is not None:
        out = out + p_minus_y * t_t.astype(p_minus_y.dtype)
    if t_y is not None:
        out = out - logit.astype(p_minus_y.dtype) * t_y.astype(p_minus_y.dtype)
    return out.astype(logit.dtype)


def logistic_loss(t: Array, y: Array) -> Array:
    """Logistic loss J = y log(1 + e^{-t}) + (1 - y) log(1 + e^{t}) (eq. 2.3).

    Computed as ``max(t, 0) - y t + log1p(exp(-|t|))`` with the linear part
    formed first, finite for any finite t (|t| up to 1e4 and far beyond:
    J(1e4, 0) = 1e4, J(1e4, 1) = 0 exactly, J(20, 1) = 2.06e-9 to the last
    digit); float16 and bfloat16 are evaluated in float32.

    Args:
      t: logits, any shape (one per example), floating.
      y: targets in [0, 1] (hard labels 0/1 or soft targets), the same shape,
        floating. Values outside [0, 1] are not a probability; they raise under
        :func:`fnbp.checked` and are used as given otherwise.

    Returns:
      One loss per entry, t's shape.
    """
    t = _validate.float_array("logistic_loss", "t", t)
    y = _validate.float_array("logistic_loss", "y", y)
    _same_shape("logistic_loss", t, y, "(one logit and one target per example)")
    t, y = _common_dtype(t, y)
    check_finite("logistic_loss", "t", t)
    check_finite("logistic_loss", "y", y)
    check(
        jnp.all((y >= 0) & (y <= 1)),
        "logistic_loss: y holds a target outside [0, 1]; targets are probabilities",
    )
    return LOGISTIC_LOSS.apply(t, y)


def _logistic_args(key, dtype):
    gen = rng(key)
    return (normal(gen, (6,), dtype, scale=3.0), jnp.asarray(gen.random(6), dtype))


def _sigmoid_parts(t: Array) -> tuple[Array, Array]:
    """(sigmoid(t), sigmoid(t) (1 - sigmoid(t))) in at least float32, without overflow."""
    tw = at_least_float32(t)
    e = jnp.exp(-jnp.abs(tw))  # <= 1
    p = jnp.where(tw > 0, 1 / (1 + e), e / (1 + e))
    return p, e / jnp.square(1 + e)


def logistic_loss_hessian_factor(t: Array, y: Array) -> Array:
    """S = sqrt(p (1 - p)) with p = sigmoid(t): S S^T = d^2 J/dt^2, shape t.shape + (1,).

    p (1 - p) = e / (1 + e)^2 with e = exp(-|t|), finite for every t; y does
    not enter (the Bernoulli likelihood's Fisher). In at least float32.
    """
    del y
    return jnp.sqrt(_sigmoid_parts(t)[1])[..., None]


def logistic_loss_sample_grad(t: Array, y: Array, key: Array) -> Array:
    """dJ(t, y_hat)/dt = sigmoid(t) - y_hat at y_hat ~ Bernoulli(sigmoid(t)), shape t.shape.

    E[g^2] = p (1 - p) = H. In at least float32; y does not enter.
    """
    del y
    p = _sigmoid_parts(t)[0]
    y_hat = jax.random.bernoulli(key, p).astype(p.dtype)
    return p - y_hat


LOGISTIC_LOSS = declare(
    logistic_loss,
    logistic_loss_fwd,
    logistic_loss_bwd,
    jvp=logistic_loss_jvp,
    reference=lambda t, y: y * jnp.log1p(jnp.exp(-t)) + (1 - y) * jnp.log1p(jnp.exp(t)),
    examples=_logistic_args,
    equations=("2.3", "7.70"),
    kink="none: smooth.",
    family="loss",
    hooks={
        "hessian_factor": logistic_loss_hessian_factor,
        "sample_grad": logistic_loss_sample_grad,
    },
)


# --- cross-entropy (2.14) ------------------------------------------------------


class CrossEntropyResiduals(NamedTuple):
    """``p = softmax(t)`` (in at least float32), the labels ``y`` and ``valid``,
    1 where y is in range."""

    p: Array
    y: Array
    valid: Array


def cross_entropy_loss_fwd(t: Array, y: Array) -> tuple[Array, CrossEntropyResiduals]:
    """Forward pass of :func:`cross_entropy_loss` with its residuals.

    Per-example losses, label validity and softmax(t), from one pass of exp.

    With m = max(t), J = log(sum_j e^{t_j - m}) - (t_y - m): the offset m
    never enters a rounded sum (m + log(...) - t_y would round at the size of
    m: 1.31348 for 1.31326 at logits near 1e4 in float32). t_y - m is exact
    where t_y is within a factor 2 of m, else rounded once; the sum is at
    least 1, so its logarithm is accurate to an ulp of 1. Half precision is
    evaluated in float32 and the loss rounded once.
    """
    k = t.shape[-1]
    valid = _validate.labels_in_range(y, k)
    index = jnp.where(valid, y, 0).astype(jnp.int32)
    w = at_least_float32(t)
    # No overflow (every e_j <= 1); the same exponentials give softmax(t) for
    # the backward function. t_y - m, not a gather of t - m: the same number,
    # without materializing t - m (a gather from it measured 1.7x slower on
    # XLA:CPU at 1024 x 1000 logits).
    m = jax.lax.stop_gradient(jnp.max(w, axis=-1, keepdims=True))
    e = jnp.exp(w - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    d_y = jnp.take_along_axis(w, index[..., None], axis=-1)[..., 0] - m[..., 0]
    loss = jnp.log(total)[..., 0] - d_y
    loss = jnp.where(valid, loss, jnp.asarray(jnp.nan, w.dtype)).astype(t.dtype)
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
    Computed in p's dtype (at least float32), cast to v's (t's) at the end.
    """
    p, y, valid = res
    k = p.shape[-1]
    scale = jnp.where(valid, v.astype(p.dtype), jnp.asarray(jnp.nan, p.dtype))
    dt = (p * scale[..., None]).reshape(-1, k)
    rows = jnp.arange(dt.shape[0])
    labels = jnp.where(valid, y, 0).astype(jnp.int32).reshape(-1)
    dt = dt.at[rows, labels].add(-scale.reshape(-1), mode="promise_in_bounds")
    return dt.reshape(p.shape).astype(v.dtype), None


def cross_entropy_loss_jvp(res: CrossEntropyResiduals, t: tuple) -> Array:
    """F[J, t](t_t) = <softmax(t) - e_y, t_t> = sum_c p_c t_c - t_y (eq. 7.71's mirror).

    The one-hot e_y is a gather of the label's entry, not a dense matrix; an
    out-of-range label gives NaN, like its loss. Labels have no tangent.
    """
    p, y, valid = res
    (t_t, _) = t
    if t_t is None:
        return jnp.zeros(p.shape[:-1], p.dtype)
    tw = t_t.astype(p.dtype)
    index = jnp.where(valid, y, 0).astype(jnp.int32)
    at_label = jnp.take_along_axis(tw, index[..., None], axis=-1)[..., 0]
    out = jnp.sum(p * tw, axis=-1) - at_label
    return jnp.where(valid, out, jnp.asarray(jnp.nan, p.dtype)).astype(t_t.dtype)


def cross_entropy_loss(t: Array, y: Array) -> Array:
    """Cross-entropy J = -log softmax(t)_y = logsumexp(t) - t_y (eq. 2.14).

    Stable: computed as logsumexp(t - max t) - (t_y - max t), never exp(t)
    alone, so the loss keeps its digits for logits far from 0 (see
    :func:`cross_entropy_loss_fwd`); float16 and bfloat16 logits are
    evaluated in float32.

    Args:
      t: logits, shape (..., k), floating.
      y: integer labels in [0, k), shape (...), of any integer dtype (signed
        or unsigned; the range check never overflows it, so uint8 labels
        with k = 256 are valid).

    Returns:
      One loss per example, shape (...). A label outside [0, k) cannot be seen
      at trace time: unchecked, its loss (and its cotangent row) is NaN, never a
      plausible number; under :func:`fnbp.checked` it raises ``ValueError``.

    Raises:
      TypeError: float labels (pass integer class indices, not one-hot).
      ValueError: y's shape not t's shape without the last axis.
    """
    t = _validate.float_array("cross_entropy_loss", "t", t)
    y = _validate.int_array(
        "cross_entropy_loss", "y", y, "class indices in [0, k), not one-hot or probabilities"
    )
    _validate.require_min_ndim("cross_entropy_loss", "t", t, 1, "(..., k classes)")
    if y.shape != t.shape[:-1]:
        raise ValueError(
            f"cross_entropy_loss: y must have shape t.shape[:-1]={t.shape[:-1]} "
            f"(one label per example), got y.shape={y.shape} and t.shape={t.shape}"
        )
    k = t.shape[-1]
    check_finite("cross_entropy_loss", "t", t)
    check(
        jnp.all(_validate.labels_in_range(y, k)),
        f"cross_entropy_loss: y holds a label outside [0, {k}); labels are "
        f"class indices for t's last axis of length {k}",
    )
    return CROSS_ENTROPY_LOSS.apply(t, y)


def _cross_entropy_reference(t, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(t, axis=-1), y[..., None], axis=-1)[..., 0]


def _cross_entropy_args(key, dtype):
    gen = rng(key)
    return (normal(gen, (5, 4), dtype, scale=2.0), jnp.asarray(gen.integers(0, 4, 5), jnp.int32))


def _softmax(t: Array) -> Array:
    """softmax(t) over the last axis in at least float32, from t - max(t) (no overflow)."""
    w = at_least_float32(t)
    e = jnp.exp(w - jnp.max(w, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def cross_entropy_loss_hessian_factor(t: Array, y: Array) -> Array:
    """S = diag(sqrt p) - p sqrt(p)^T with p = softmax(t), shape t.shape + (k,).

    S S^T = diag(p) - p p^T = d^2 J/dt^2 (the categorical likelihood's Fisher;
    the labels do not enter): with s = sqrt(p), S S^T = diag(p) - 2 p p^T +
    p (s^T s) p^T and s^T s = sum p = 1. In at least float32.
    """
    del y
    p = _softmax(t)
    s = jnp.sqrt(p)
    k = t.shape[-1]
    return jnp.eye(k, dtype=p.dtype) * s[..., None] - p[..., :, None] * s[..., None, :]


def cross_entropy_loss_sample_grad(t: Array, y: Array, key: Array) -> Array:
    """dJ(t, y_hat)/dt = p - e_{y_hat} at y_hat ~ Categorical(softmax(t)), shape t.shape.

    E[g g^T] = diag(p) - p p^T = H. In at least float32; y does not enter.
    """
    del y
    w = at_least_float32(t)
    p = _softmax(w)
    y_hat = jax.random.categorical(key, w, axis=-1)  # logits: no log of a rounded p
    return p - jax.nn.one_hot(y_hat, t.shape[-1], dtype=p.dtype)


CROSS_ENTROPY_LOSS = declare(
    cross_entropy_loss,
    cross_entropy_loss_fwd,
    cross_entropy_loss_bwd,
    jvp=cross_entropy_loss_jvp,
    reference=_cross_entropy_reference,
    examples=_cross_entropy_args,
    equations=("2.14", "7.71"),
    kink="none: smooth in t; labels get no cotangent.",
    family="loss",
    hooks={
        "hessian_factor": cross_entropy_loss_hessian_factor,
        "sample_grad": cross_entropy_loss_sample_grad,
    },
)
