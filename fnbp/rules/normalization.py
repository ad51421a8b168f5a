"""Layer normalization LN-S, LN (CS229 notes, eqs. 7.40-7.42) and RMSNorm, with their rules.

Forward, per example, over the last axis z in R^m::

    mu = (1/m) sum_i z_i,    sigma = sqrt((1/m) sum_i (z_i - mu)^2 + eps)
    LN-S(z) = (z - mu) / sigma                                          (7.40)
    LN(z)   = beta + gamma * LN-S(z)                                    (7.41)
    RMSNorm(z) = gamma * z / r,   r = sqrt((1/m) sum_i z_i^2 + eps)

The variance is the biased one of the notes (divide by m). The notes have no
epsilon; ``eps = 0.0`` gives their LN-S exactly, ``eps > 0`` (the default, as
common practice) keeps sigma away from 0 for a constant example.

Backward function of LN-S. Write y = LN-S(z) and s = sigma. Since
d mu / d z_j = 1/m and d s / d z_j = (z_j - mu) / (m s) = y_j / m (eps
included, because d(s^2)/d z_j = (2/m)(z_j - mu): the sum of z - mu is 0),

    d y_i / d z_j = (1/s) (delta_ij - 1/m - y_i y_j / m),

a symmetric matrix, so for an incoming cotangent g::

    B[LN-S, z](g) = (1/s) (g - mean(g) - y mean(g (.) y))

For LN the cotangent reaching LN-S is g = gamma (.) v, and

    B[LN, gamma](v) = sum of v (.) y,   B[LN, beta](v) = sum of v,

summed over the example axes (and over the features too when gamma, beta are
scalars, as in the notes). The eps cotangent is d y / d eps = -y / (2 s^2),
so B[LN-S, eps](g) = -sum over every entry of g (.) y / (2 s^2).

RMSNorm the same way, with y = z / r and d r / d z_j = y_j / m::

    B[RMS, z](v) = (1/r) (g - y mean(g (.) y)),   g = gamma (.) v.

With eps = 0 and an example whose entries are all equal (LN-S) or all zero
(RMSNorm), sigma (or r) is 0 and the output is NaN: the function is not
defined there. Under :func:`fnbp.checked` this raises instead.

Scale invariance (7.42): LN-S(a z) = LN-S(z) for a > 0 exactly when eps = 0
(with eps > 0 up to a relative O(eps / var(z))), so LN(MM_{aW, ab}(z)) =
LN(MM_{W, b}(z)).

Per-example hooks (``sq_norms``, ``sq_grads``) of LN and RMSNorm: example
i's gradients are its own sums ``sum_t v_t (.) y_t`` (gamma) and
``sum_t v_t`` (beta) over its positions t, m numbers each, so they are
always materialized and squared (see :func:`layer_norm_sq_norms`).

All arithmetic runs in at least float32 (float16 and bfloat16 inputs are
promoted, the results cast back): dtype in = dtype out. The ``_fwd`` and
``_bwd`` functions are jitted (one compiled call each when used eagerly,
inlined under an outer ``jax.jit``); the primal is the forward's output (as
for every rule declared with :func:`fnbp.rules.declare`), the unused
residuals are dropped by the compiler.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from fnbp.checking import check, check_finite, is_checking
from fnbp.rules import _per_example as _pe
from fnbp.rules import _validate
from fnbp.rules._dtypes import accumulation_dtype
from fnbp.rules._examples import normal, rng
from fnbp.rules._rule import declare, jit_static

# --- shared argument handling ----------------------------------------------------


def _float_input(fn: str, z) -> Array:
    z = _validate.float_array(fn, "z", z)
    _validate.require_min_ndim(fn, "z", z, 1, "(..., m): the last axis is normalized")
    if z.shape[-1] < 1:
        raise ValueError(
            f"{fn}: z's last axis is empty (z.shape={z.shape}); there is nothing to normalize"
        )
    check_finite(fn, "z", z)
    return z


def _eps_argument(fn: str, eps, z: Array) -> Array:
    """``eps`` as a scalar array; a Python number takes z's accumulation dtype."""
    if isinstance(eps, (int, float)) and not isinstance(eps, bool):
        if eps < 0:
            raise ValueError(
                f"{fn}: eps must be >= 0, got eps={eps}; pass eps=0.0 "
                f"for the notes' exact form or a small positive number"
            )
        return jnp.asarray(eps, dtype=accumulation_dtype(z))
    eps = _validate.float_array(fn, "eps", eps)
    _validate.require_scalar(fn, "eps", eps)
    value = _validate.concrete_float(eps)
    if value is not None and value < 0:
        raise ValueError(
            f"{fn}: eps must be >= 0, got eps={value}; pass eps=0.0 "
            f"for the notes' exact form or a small positive number"
        )
    check(eps >= 0, f"{fn}: eps must be >= 0")
    return eps


def _affine_argument(fn: str, name: str, p, z: Array) -> Array:
    """gamma or beta: a scalar (the notes) or a vector of z's last-axis length."""
    if isinstance(p, (int, float)) and not isinstance(p, bool):
        return jnp.asarray(p, dtype=z.dtype)
    p = _validate.float_array(fn, name, p)
    m = z.shape[-1]
    if p.shape not in ((), (m,)):
        raise ValueError(
            f"{fn}: {name} must be a scalar (shape ()) or a vector of length m={m}, "
            f"z's last axis (z.shape={z.shape}), got {name}.shape={p.shape}; pass "
            f"{name} with shape () or ({m},)"
        )
    check_finite(fn, name, p)
    return p


def _check_spread(fn: str, what: str, spread: Array) -> None:
    check(
        jnp.all(spread > 0),
        f"{fn}: an example has {what} = 0 with eps = 0, so the output is 0/0 = NaN; "
        f"pass eps > 0 or drop constant examples",
    )


def _sum_to(x: Array, shape: tuple[int, ...], dtype) -> Array:
    """Sum ``x`` (..., m) over its example axes, and over m too when ``shape == ()``."""
    axes = tuple(range(x.ndim)) if shape == () else tuple(range(x.ndim - 1))
    return jnp.sum(x, axis=axes).astype(dtype)


def _mean_last(x: Array) -> Array:
    return jnp.mean(x, axis=-1, keepdims=True)


def _affine_squares(
    hook: str, y: Array, v: Array, which: int, gamma: Array, beta: Array | None = None
) -> tuple[Array, ...]:
    """The squared per-example gradients of gamma (and beta); the hooks add ``None`` for eps.

    Example i's gradients are its own sums over its positions (every axis
    between the example axis and the features) of ``v (.) y`` and of ``v``,
    and over the features too for a scalar parameter. ``which`` = 0: each
    example's squared norm (n,); ``which`` = 1: the sum over examples of the
    squared gradients, shaped like the parameter. In at least float32.
    """
    _pe.require_examples(hook, v, 1, "(m,)")
    acc = accumulation_dtype(y, v)
    va = v.astype(acc)
    pairs = [(va * y.astype(acc), gamma)] + ([] if beta is None else [(va, beta)])
    result = []
    for x, p in pairs:
        axes = tuple(range(1, x.ndim - (p.ndim == 1)))  # keep the features of a vector
        result.append(_pe.squares(jnp.sum(x, axis=axes))[which])
    return tuple(result)


# --- LN-S (7.40) -------------------------------------------------------------------


class LayerNormSResiduals(NamedTuple):
    """What B[LN-S, .] needs: y = LN-S(z) and 1/sigma per example (accumulation dtype).

    ``z_like`` and ``eps`` are kept for the dtypes of the cotangents; ``eps`` is
    a scalar, ``z_like`` an empty array (no memory) with z's dtype.
    """

    y: Array
    inv_sigma: Array
    eps: Array
    z_like: Array


def _scale(z: Array, eps: Array, center: bool) -> tuple[Array, Array, Array]:
    """(y, 1/sigma, sigma^2) in the accumulation dtype; RMSNorm's (y, 1/r, r^2) uncentered."""
    acc = accumulation_dtype(z, eps)
    za = z.astype(acc)
    d = za - _mean_last(za) if center else za
    spread = _mean_last(d * d) + eps.astype(acc)
    inv = jax.lax.rsqrt(spread)
    return d * inv, inv, spread


def _empty_like(z: Array) -> Array:
    return jnp.zeros((0,), z.dtype)


def _ln_s_dz(y: Array, inv_sigma: Array, g: Array) -> Array:
    """B[LN-S, z](g) = (1/sigma)(g - mean(g) - y mean(g y))."""
    return inv_sigma * (g - _mean_last(g) - y * _mean_last(g * y))


def _rms_dz(y: Array, inv_r: Array, g: Array) -> Array:
    """B[RMSNorm-S, z](g) = (1/r)(g - y mean(g y)), y = z / r."""
    return inv_r * (g - y * _mean_last(g * y))


def _d_eps(y: Array, inv_sigma: Array, g: Array, eps: Array) -> Array:
    """B[., eps](g) = -sum of g (.) y / (2 sigma^2), over every entry."""
    per_example = jnp.sum(g * y, axis=-1, keepdims=True) * (inv_sigma * inv_sigma)
    return (-0.5 * jnp.sum(per_example)).astype(eps.dtype)


def _dy(y: Array, inv: Array, t_z: Array | None, t_eps: Array | None, center: bool) -> Array:
    """The change of y = LN-S(z) (``center``) or z / r along (t_z, t_eps), accumulation dtype.

    dy/dz t = (1/sigma)(t - mean(t) - y mean(t y)): the Jacobian is symmetric, the
    same map as B's dz; dy/deps = -y / (2 sigma^2) for a scalar eps.
    """
    dy = jnp.zeros_like(y)
    if t_z is not None:
        tz = t_z.astype(y.dtype)
        dy = dy + (_ln_s_dz if center else _rms_dz)(y, inv, tz)
    if t_eps is not None:
        dy = dy - 0.5 * y * (inv * inv) * t_eps.astype(y.dtype)
    return dy


@jit_static()
def layer_norm_s_fwd(z: Array, eps: Array) -> tuple[Array, LayerNormSResiduals]:
    """Forward pass of :func:`layer_norm_s` with its residuals."""
    y, inv_sigma, _ = _scale(z, eps, center=True)
    return y.astype(z.dtype), LayerNormSResiduals(y, inv_sigma, eps, _empty_like(z))


@jit_static()
def layer_norm_s_bwd(res: LayerNormSResiduals, v: Array) -> tuple[Array, Array]:
    """B[LN-S, .]: map the cotangent ``v`` (..., m) to (dz, deps).

    ``dz = (1/sigma)(v - mean(v) - y mean(v (.) y))`` per example (see the
    module docstring for the derivation); ``deps = -sum v (.) y / (2 sigma^2)``
    over every entry.
    """
    y, inv_sigma, eps, z_like = res
    g = v.astype(y.dtype)
    dz = _ln_s_dz(y, inv_sigma, g).astype(z_like.dtype)
    return dz, _d_eps(y, inv_sigma, g, eps)


@jit_static()
def layer_norm_s_jvp(res: LayerNormSResiduals, t: tuple) -> Array:
    """F[LN-S, .](t_z, t_eps) = (1/sigma)(t_z - mean(t_z) - y mean(t_z (.) y)) - y t_eps / (2 sigma^2).

    The z-part is B's own map: LN-S's Jacobian (1/sigma)(I - 11^T/m - y y^T/m)
    is symmetric.
    """
    y, inv_sigma, _, z_like = res
    t_z, t_eps = t
    return _dy(y, inv_sigma, t_z, t_eps, center=True).astype(z_like.dtype)


def layer_norm_s(z: Array, eps: float | Array = 1e-5) -> Array:
    """LN-S(z) = (z - mu) / sigma over the last axis (eq. 7.40).

    mu is the mean and sigma^2 = mean((z - mu)^2) + eps the biased variance
    of each example, as in the notes; ``eps = 0.0`` is the notes' exact LN-S.
    Leading axes are example axes. The gradient comes from the hand-written
    rule :func:`layer_norm_s_bwd`.

    Args:
      z: input, shape (..., m), floating.
      eps: scalar >= 0 added to the variance (default 1e-5). A Python number
        takes z's accumulation dtype (float32 for half inputs); an array gets a
        cotangent.

    Returns:
      Array of z's shape and dtype: each example has mean 0 and mean square
      var / (var + eps) (exactly 1 for eps = 0).

    Raises:
      ValueError: z a scalar or with an empty last axis; eps negative or not a
        scalar.
      TypeError: a non-floating z or eps.
    """
    z = _float_input("layer_norm_s", z)
    eps = _eps_argument("layer_norm_s", eps, z)
    if is_checking():
        _check_spread("layer_norm_s", "variance", _scale(z, eps, center=True)[2])
    return LAYER_NORM_S.apply(z, eps)


def _layer_norm_s_reference(z, eps=1e-5):
    mu = jnp.mean(z, axis=-1, keepdims=True)
    return (z - mu) / jnp.sqrt(jnp.mean((z - mu) ** 2, axis=-1, keepdims=True) + eps)


def _layer_norm_s_args(key, dtype):
    return (normal(rng(key), (5, 8), dtype, scale=2.0, shift=1.0), jnp.asarray(0.1, dtype))


LAYER_NORM_S = declare(
    layer_norm_s,
    layer_norm_s_fwd,
    layer_norm_s_bwd,
    jvp=layer_norm_s_jvp,
    reference=_layer_norm_s_reference,
    examples=_layer_norm_s_args,
    equations=("7.40", "7.42"),
    kink="none: smooth for eps > 0; with eps = 0 a constant example is 0/0 = NaN.",
    family="normalization",
)


# --- LN (7.41) -----------------------------------------------------------------------


class LayerNormResiduals(NamedTuple):
    """y = LN-S(z), 1/sigma (accumulation dtype), gamma, beta, eps and z's dtype."""

    y: Array
    inv_sigma: Array
    gamma: Array
    beta: Array
    eps: Array
    z_like: Array


def _affine(y: Array, gamma: Array, beta: Array, z: Array) -> Array:
    out = jnp.result_type(z, gamma, beta)
    acc = y.dtype
    return (beta.astype(acc) + gamma.astype(acc) * y).astype(out)


@jit_static()
def layer_norm_fwd(
    z: Array, gamma: Array, beta: Array, eps: Array
) -> tuple[Array, LayerNormResiduals]:
    """Forward pass of :func:`layer_norm` with its residuals."""
    y, inv_sigma, _ = _scale(z, eps, center=True)
    u = _affine(y, gamma, beta, z)
    return u, LayerNormResiduals(y, inv_sigma, gamma, beta, eps, _empty_like(z))


@jit_static()
def layer_norm_bwd(res: LayerNormResiduals, v: Array) -> tuple[Array, Array, Array, Array]:
    """B[LN, .]: map the cotangent ``v`` (..., m) to (dz, dgamma, dbeta, deps).

    With g = gamma (.) v: ``dz = (1/sigma)(g - mean(g) - y mean(g (.) y))``;
    ``dgamma = sum of v (.) y`` and ``dbeta = sum of v`` over the example axes
    (and the feature axis too for scalar gamma, beta); ``deps = -sum of
    g (.) y / (2 sigma^2)``.
    """
    y, inv_sigma, gamma, beta, eps, z_like = res
    va = v.astype(y.dtype)
    g = gamma.astype(y.dtype) * va
    dz = _ln_s_dz(y, inv_sigma, g).astype(z_like.dtype)
    dgamma = _sum_to(va * y, gamma.shape, gamma.dtype)
    dbeta = _sum_to(va, beta.shape, beta.dtype)
    return dz, dgamma, dbeta, _d_eps(y, inv_sigma, g, eps)


@jit_static()
def layer_norm_jvp(res: LayerNormResiduals, t: tuple) -> Array:
    """F[LN, .](t_z, t_gamma, t_beta, t_eps) = gamma (.) dy + t_gamma (.) y + t_beta.

    dy is LN-S's change along (t_z, t_eps) (see :func:`layer_norm_s_jvp`).
    """
    y, inv_sigma, gamma, beta, _, z_like = res
    t_z, t_gamma, t_beta, t_eps = t
    out = gamma.astype(y.dtype) * _dy(y, inv_sigma, t_z, t_eps, center=True)
    if t_gamma is not None:
        out = out + t_gamma.astype(y.dtype) * y
    if t_beta is not None:
        out = out + t_beta.astype(y.dtype)
    return out.astype(jnp.result_type(z_like, gamma, beta))


def layer_norm(
    z: Array, gamma: float | Array, beta: float | Array, eps: float | Array = 1e-5
) -> Array:
    """LN(z) = beta + gamma * LN-S(z) over the last axis (eq. 7.41).

    ``gamma`` and ``beta`` are scalars, as in the notes, or vectors of the last
    axis' length (per-feature scale and shift, common practice); each may be
    either. Leading axes of z are example axes and the parameter cotangents are
    summed over them. Gradient from :func:`layer_norm_bwd`.

    Args:
      z: input, shape (..., m), floating.
      gamma: scale, shape () or (m,); a Python number takes z's dtype.
      beta: shift, shape () or (m,); a Python number takes z's dtype.
      eps: scalar >= 0 added to the variance (default 1e-5); 0.0 is the notes'.

    Returns:
      Array of z's shape and dtype ``result_type(z, gamma, beta)``.

    Raises:
      ValueError: gamma or beta neither a scalar nor of length m; eps negative.
      TypeError: a non-floating argument.
    """
    z = _float_input("layer_norm", z)
    gamma = _affine_argument("layer_norm", "gamma", gamma, z)
    beta = _affine_argument("layer_norm", "beta", beta, z)
    eps = _eps_argument("layer_norm", eps, z)
    if is_checking():
        _check_spread("layer_norm", "variance", _scale(z, eps, center=True)[2])
    return LAYER_NORM.apply(z, gamma, beta, eps)


@jit_static()
def layer_norm_sq_norms(res: LayerNormResiduals, v: Array) -> tuple[Array, Array, None]:
    """Per-example squared norms of LN's parameter gradients (the ``sq_norms`` hook).

    From eq. 7.41, example i's gradients are ``g_gamma = sum_t v_t (.) y_t``
    and ``g_beta = sum_t v_t`` with y = LN-S(z) (eq. 7.40), summed over its
    positions t (and over the features for a scalar gamma or beta).

    Cost rule: always materialized. Each g_i has m numbers (1 for a scalar),
    n m in all, no more than one position of v: cheaper than any Gram form.

    Args:
      res: the residuals of :func:`layer_norm_fwd`.
      v: the cotangent, shape (n, ..., m): n examples, any position axes.

    Returns:
      ``(sq_gamma, sq_beta, None)``: two arrays of shape (n,) in at least
      float32, and ``None`` for eps (an argument, not a trainable parameter).

    Raises:
      ValueError: v without an example axis (v.ndim < 2).
    """
    sq_gamma, sq_beta = _affine_squares("layer_norm_sq_norms", res.y, v, 0, res.gamma, res.beta)
    return sq_gamma, sq_beta, None


@jit_static()
def layer_norm_sq_grads(res: LayerNormResiduals, v: Array) -> tuple[Array, Array, None]:
    """``sum_i g_i (.) g_i`` for LN's gamma and beta (the ``sq_grads`` hook).

    With ``g_gamma``, ``g_beta`` of :func:`layer_norm_sq_norms` (eq. 7.41),
    materialized per example (n m numbers). Args and Raises as there.

    Returns:
      ``(sq_gamma, sq_beta, None)`` shaped like gamma and beta, in at least
      float32; ``None`` for eps.
    """
    sq_gamma, sq_beta = _affine_squares("layer_norm_sq_grads", res.y, v, 1, res.gamma, res.beta)
    return sq_gamma, sq_beta, None


def _layer_norm_args(key, dtype):
    gen = rng(key)
    return (
        normal(gen, (5, 8), dtype, scale=2.0, shift=1.0),
        normal(gen, (8,), dtype, shift=1.0),
        normal(gen, (8,), dtype),
        jnp.asarray(0.1, dtype),
    )


LAYER_NORM = declare(
    layer_norm,
    layer_norm_fwd,
    layer_norm_bwd,
    jvp=layer_norm_jvp,
    reference=lambda z, gamma, beta, eps=1e-5: beta + gamma * _layer_norm_s_reference(z, eps),
    examples=_layer_norm_args,
    equations=("7.41",),
    kink="none: smooth for eps > 0; with eps = 0 a constant example is 0/0 = NaN.",
    family="normalization",
    hooks={"sq_norms": layer_norm_sq_norms, "sq_grads": layer_norm_sq_grads},
)


# --- RMSNorm ---------------------------------------------------------------------------


class RmsNormResiduals(NamedTuple):
    """y = z / r, 1/r (accumulation dtype), gamma, eps and z's dtype."""

    y: Array
    inv_r: Array
    gamma: Array
    eps: Array
    z_like: Array


def _rms_output(y: Array, gamma: Array, z: Array) -> Array:
    return (gamma.astype(y.dtype) * y).astype(jnp.result_type(z, gamma))


@jit_static()
def rms_norm_fwd(z: Array, gamma: Array, eps: Array) -> tuple[Array, RmsNormResiduals]:
    """Forward pass of :func:`rms_norm` with its residuals."""
    y, inv_r, _ = _scale(z, eps, center=False)
    return _rms_output(y, gamma, z), RmsNormResiduals(y, inv_r, gamma, eps, _empty_like(z))


@jit_static()
def rms_norm_bwd(res: RmsNormResiduals, v: Array) -> tuple[Array, Array, Array]:
    """B[RMSNorm, .]: map ``v`` (..., m) to (dz, dgamma, deps).

    With g = gamma (.) v and y = z / r: ``dz = (1/r)(g - y mean(g (.) y))``;
    ``dgamma = sum of v (.) y`` over the example axes (and the feature axis for
    a scalar gamma); ``deps = -sum of g (.) y / (2 r^2)``.
    """
    y, inv_r, gamma, eps, z_like = res
    va = v.astype(y.dtype)
    g = gamma.astype(y.dtype) * va
    dz = _rms_dz(y, inv_r, g).astype(z_like.dtype)
    dgamma = _sum_to(va * y, gamma.shape, gamma.dtype)
    return dz, dgamma, _d_eps(y, inv_r, g, eps)


@jit_static()
def rms_norm_jvp(res: RmsNormResiduals, t: tuple) -> Array:
    """F[RMSNorm, .](t_z, t_gamma, t_eps) = gamma (.) dy + t_gamma (.) y, y = z / r.

    dy = (1/r)(t_z - y mean(t_z (.) y)) - y t_eps / (2 r^2); the z-part is B's map
    (the Jacobian (1/r)(I - y y^T / m) is symmetric).
    """
    y, inv_r, gamma, _, z_like = res
    t_z, t_gamma, t_eps = t
    out = gamma.astype(y.dtype) * _dy(y, inv_r, t_z, t_eps, center=False)
    if t_gamma is not None:
        out = out + t_gamma.astype(y.dtype) * y
    return out.astype(jnp.result_type(z_like, gamma))


def rms_norm(z: Array, gamma: float | Array, eps: float | Array = 1e-6) -> Array:
    """RMSNorm(z) = gamma * z / sqrt(mean(z^2) + eps) over the last axis.

    No centering (no mean subtracted) and no shift, unlike LN (7.41).
    ``gamma`` is a scalar or a vector of the last axis' length. Leading axes of
    z are example axes. Gradient from :func:`rms_norm_bwd`.

    Args:
      z: input, shape (..., m), floating.
      gamma: scale, shape () or (m,); a Python number takes z's dtype.
      eps: scalar >= 0 added to the mean square (default 1e-6).

    Returns:
      Array of z's shape and dtype ``result_type(z, gamma)``.

    Raises:
      ValueError: gamma neither a scalar nor of length m; eps negative.
      TypeError: a non-floating argument.
    """
    z = _float_input("rms_norm", z)
    gamma = _affine_argument("rms_norm", "gamma", gamma, z)
    eps = _eps_argument("rms_norm", eps, z)
    if is_checking():
        _check_spread("rms_norm", "mean square", _scale(z, eps, center=False)[2])
    return RMS_NORM.apply(z, gamma, eps)


@jit_static()
def rms_norm_sq_norms(res: RmsNormResiduals, v: Array) -> tuple[Array, None]:
    """Per-example squared norm of RMSNorm's gamma gradient (the ``sq_norms`` hook).

    Example i's gradient is ``g_gamma = sum_t v_t (.) y_t`` with y = z / r,
    summed over its positions (and the features for a scalar gamma); always
    materialized (m numbers per example), as for :func:`layer_norm_sq_norms`.

    Args:
      res: the residuals of :func:`rms_norm_fwd`.
      v: the cotangent, shape (n, ..., m).

    Returns:
      ``(sq_gamma, None)``: shape (n,) in at least float32; ``None`` for eps.

    Raises:
      ValueError: v without an example axis (v.ndim < 2).
    """
    (sq_gamma,) = _affine_squares("rms_norm_sq_norms", res.y, v, 0, res.gamma)
    return sq_gamma, None


@jit_static()
def rms_norm_sq_grads(res: RmsNormResiduals, v: Array) -> tuple[Array, None]:
    """``sum_i g_i (.) g_i`` for RMSNorm's gamma (the ``sq_grads`` hook), shaped like gamma.

    Returns ``(sq_gamma, None)`` in at least float32; as :func:`rms_norm_sq_norms`.
    """
    (sq_gamma,) = _affine_squares("rms_norm_sq_grads", res.y, v, 1, res.gamma)
    return sq_gamma, None


def _rms_norm_args(key, dtype):
    gen = rng(key)
    return (
        normal(gen, (5, 8), dtype),
        normal(gen, (8,), dtype, shift=1.0),
        jnp.asarray(0.1, dtype),
    )


RMS_NORM = declare(
    rms_norm,
    rms_norm_fwd,
    rms_norm_bwd,
    jvp=rms_norm_jvp,
    reference=lambda z, gamma, eps=1e-6: (
        gamma * z / jnp.sqrt(jnp.mean(z * z, axis=-1, keepdims=True) + eps)
    ),
    examples=_rms_norm_args,
    kink="none: smooth for eps > 0; with eps = 0 an all-zero example is 0/0 = NaN.",
    family="normalization",
    hooks={"sq_norms": rms_norm_sq_norms, "sq_grads": rms_norm_sq_grads},
)
