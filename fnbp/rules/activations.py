"""Element-wise activations sigma and their backward functions (notes, 7.3-7.4).

For an element-wise module u = sigma(z) the backward function is

    B[sigma, z](v) = sigma'(z) (.) v                                    (7.69)

Every rule below is written for one example and works on any shape. Each is
declared the same way (:func:`fnbp.rules.declare`): ``f_fwd`` returning the
output and a small NamedTuple of residuals, ``f_bwd`` returning one cotangent
per array argument, the public ``f`` that validates and calls the rule, and
one record with its plain reference, example arguments, kink convention,
layer settings and initialization family. Kink conventions: the derivative of
``relu`` at 0 is 0 (as ``jax.nn.relu``), the derivative of ``leaky_relu`` at 0
is ``gamma`` (the slope of the z <= 0 side; ``jax.nn.leaky_relu`` takes 1
there), the derivative of ``elu`` at 0 is ``alpha`` (as ``jax.nn.elu``).

Numerics: the smooth rules are evaluated in forms that neither cancel nor
overflow (GELU through erfc and the logistic function, softplus as
max(z, 0) + log1p(e^{-beta |z|}) / beta), in at least float32 for float16
and bfloat16 inputs with the result rounded once, and at z = +-inf they give
their limits (gelu(-inf) = 0, gelu'(inf) = 1, ...); NaN in is NaN out.

``softmax`` is the one module here that is not element-wise: it maps each
example's last axis z in R^k to s = softmax(z), and its backward function is
the product with the (symmetric) Jacobian diag(s) - s s^T:

    B[softmax, z](v) = s (.) (v - <s, v>)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.scipy.special import erf

from fnbp.checking import check, check_finite
from fnbp.rules import _validate
from fnbp.rules._dtypes import accumulation_dtype, at_least_float32
from fnbp.rules._examples import elementwise, normal, rng, with_scalar
from fnbp.rules._rule import LayerSpec, declare


def _float_input(fn: str, z) -> Array:
    """z as a floating array (lists and NumPy arrays converted), checked finite
    under :func:`fnbp.checked`."""
    z = _validate.float_array(fn, "z", z)
    check_finite(fn, "z", z)
    return z


def _scalar_setting(fn: str, name: str, value, z: Array) -> Array:
    """A scalar setting as an array; a Python number takes z's dtype."""
    if isinstance(value, (int, float)):
        return jnp.asarray(value, dtype=z.dtype)
    value = _validate.float_array(fn, name, value)
    _validate.require_scalar(fn, name, value)
    return value


def _positive_setting(fn: str, name: str, value, z: Array) -> Array:
    """A scalar setting that must be > 0: refused at trace time when concrete,
    checked at run time under :func:`fnbp.checked` when traced."""
    value = _scalar_setting(fn, name, value, z)
    _validate.require_positive(fn, name, value)
    check(value > 0, f"{fn}: {name} must be > 0")
    return value


def _tangent_sum(terms, shape, dtype) -> Array:
    """sum_j J_j t_j from its terms, ``None`` for an argument without a tangent,
    cast once to the output's ``dtype``; zeros of ``shape`` when every term is
    ``None``."""
    present = [term for term in terms if term is not None]
    if not present:
        return jnp.zeros(shape, dtype)
    total = present[0]
    for term in present[1:]:
        total = total + term
    return total.astype(dtype)


# --- ReLU (7.11) -------------------------------------------------------------


class ReluResiduals(NamedTuple):
    """``mask = 1[z > 0]``: a boolean, all B[relu, z] needs."""

    mask: Array


def relu_fwd(z: Array) -> tuple[Array, ReluResiduals]:
    """Forward pass of :func:`relu` with its residuals."""
    return jnp.maximum(z, jnp.zeros((), z.dtype)), ReluResiduals(z > 0)


def relu_bwd(res: ReluResiduals, v: Array) -> tuple[Array]:
    """B[relu, z](v) = 1[z > 0] (.) v; the derivative at z = 0 is 0."""
    return (jnp.where(res.mask, v, jnp.zeros((), v.dtype)),)


def relu_jvp(res: ReluResiduals, t: tuple) -> Array:
    """F[relu, z](t) = 1[z > 0] (.) t: relu's Jacobian is diagonal (so symmetric), so F is
    B's own map, relu'(0) = 0. A ``None`` tangent gives zeros (in the default float
    dtype: the mask does not record z's)."""
    (t_z,) = t
    if t_z is None:
        return jnp.zeros(res.mask.shape)
    return relu_bwd(res, t_z)[0]


def relu(z: Array) -> Array:
    """ReLU(z) = max(z, 0) (eq. 7.11), element-wise.

    Kink convention: relu'(0) = 0, as ``jax.nn.relu``.

    Args:
      z: floating array of any shape.

    Returns:
      Array of z's shape and dtype.
    """
    return RELU.apply(_float_input("relu", z))


RELU = declare(
    relu,
    relu_fwd,
    relu_bwd,
    jvp=relu_jvp,
    reference=lambda z: jnp.where(z > 0, z, 0.0),
    examples=elementwise,
    equations=("7.11", "7.69"),
    kink="relu'(0) = 0, as jax.nn.relu.",
    family="activation",
    layer=LayerSpec(),
    init="he",
)


# --- sigmoid (7.24) ------------------------------------------------------------


class SigmoidResiduals(NamedTuple):
    """The output ``s = sigmoid(z)``: sigma'(z) = s (1 - s) needs nothing else."""

    s: Array


def sigmoid_fwd(z: Array) -> tuple[Array, SigmoidResiduals]:
    """Forward pass of :func:`sigmoid` with its residuals."""
    s = jax.lax.logistic(z)
    return s, SigmoidResiduals(s)


def sigmoid_bwd(res: SigmoidResiduals, v: Array) -> tuple[Array]:
    """B[sigmoid, z](v) = s (1 - s) (.) v with s = sigmoid(z)."""
    s = res.s
    return (s * (1 - s) * v,)


def sigmoid_jvp(res: SigmoidResiduals, t: tuple) -> Array:
    """F[sigmoid, z](t) = s (1 - s) (.) t with s = sigmoid(z): the Jacobian is diagonal
    (symmetric), so F is B's own map."""
    (t_z,) = t
    return jnp.zeros(res.s.shape, res.s.dtype) if t_z is None else sigmoid_bwd(res, t_z)[0]


def sigmoid(z: Array) -> Array:
    """sigmoid(z) = 1 / (1 + exp(-z)) (eq. 7.24), element-wise, stable for all z.

    Computed as ``jax.lax.logistic``; the rule keeps the output s alone, since
    sigmoid'(z) = s (1 - s).

    Args:
      z: floating array of any shape.

    Returns:
      s = sigmoid(z) in (0, 1), with z's shape and dtype.
    """
    return SIGMOID.apply(_float_input("sigmoid", z))


SIGMOID = declare(
    sigmoid,
    sigmoid_fwd,
    sigmoid_bwd,
    jvp=sigmoid_jvp,
    reference=lambda z: 1.0 / (1.0 + jnp.exp(-z)),
    examples=elementwise,
    equations=("7.24", "7.69"),
    kink="none: smooth.",
    family="activation",
    layer=LayerSpec(),
    init="glorot",
)


# --- tanh (7.25) ---------------------------------------------------------------


class TanhResiduals(NamedTuple):
    """The output ``y = tanh(z)``: tanh'(z) = 1 - y^2."""

    y: Array


def tanh_fwd(z: Array) -> tuple[Array, TanhResiduals]:
    """Forward pass of :func:`tanh` with its residuals."""
    y = jnp.tanh(z)
    return y, TanhResiduals(y)


def tanh_bwd(res: TanhResiduals, v: Array) -> tuple[Array]:
    """B[tanh, z](v) = (1 - tanh(z)^2) (.) v."""
    return ((1 - res.y * res.y) * v,)


def tanh_jvp(res: TanhResiduals, t: tuple) -> Array:
    """F[tanh, z](t) = (1 - y^2) (.) t with y = tanh(z): the Jacobian is diagonal
    (symmetric), so F is B's own map."""
    (t_z,) = t
    return jnp.zeros(res.y.shape, res.y.dtype) if t_z is None else tanh_bwd(res, t_z)[0]


def tanh(z: Array) -> Array:
    """tanh(z) = (e^z - e^-z) / (e^z + e^-z) (eq. 7.25), element-wise.

    Args:
      z: floating array of any shape.

    Returns:
      y = tanh(z) in (-1, 1), with z's shape and dtype; the rule keeps y, since
      tanh'(z) = 1 - y^2.
    """
    return TANH.apply(_float_input("tanh", z))


TANH = declare(
    tanh,
    tanh_fwd,
    tanh_bwd,
    jvp=tanh_jvp,
    reference=jnp.tanh,
    examples=elementwise,
    equations=("7.25", "7.69"),
    kink="none: smooth.",
    family="activation",
    layer=LayerSpec(),
    init="glorot",
)


# --- leaky ReLU (7.26) ---------------------------------------------------------


class LeakyReluResiduals(NamedTuple):
    """The input ``z`` (its sign and, for d gamma, its value) and ``gamma``."""

    z: Array
    gamma: Array


def leaky_relu_fwd(z: Array, gamma: Array) -> tuple[Array, LeakyReluResiduals]:
    """Forward pass of :func:`leaky_relu` with its residuals."""
    u = jnp.where(z > 0, z, gamma.astype(z.dtype) * z)
    return u, LeakyReluResiduals(z, gamma)


def leaky_relu_bwd(res: LeakyReluResiduals, v: Array) -> tuple[Array, Array]:
    """B[leaky_relu, z](v) = where(z > 0, 1, gamma) (.) v; at z = 0 the slope is gamma.

    The scalar ``gamma`` gets its cotangent too,
    d gamma = sum over all entries of where(z > 0, 0, z) (.) v,
    so a learnable slope (PReLU) trains with the same rule.
    """
    z, gamma = res
    positive = z > 0
    dz = jnp.where(positive, v, gamma.astype(v.dtype) * v)
    dgamma = jnp.sum(
        jnp.where(positive, jnp.zeros((), v.dtype), z * v),
        dtype=jnp.promote_types(gamma.dtype, jnp.float32),
    )
    return dz, dgamma.astype(gamma.dtype)


def leaky_relu_jvp(res: LeakyReluResiduals, t: tuple) -> Array:
    """F[leaky_relu](t_z, t_gamma) = where(z > 0, t_z, gamma t_z) + where(z > 0, 0, z) t_gamma.

    The z-part is diagonal (symmetric), the same slope as B (gamma at z = 0);
    the scalar gamma's tangent moves every z <= 0 entry by z t_gamma, the
    mirror of B's sum for d gamma. ``None`` tangents add nothing.
    """
    z, gamma = res
    t_z, t_gamma = t
    positive = z > 0
    dz = None if t_z is None else jnp.where(positive, t_z, gamma.astype(t_z.dtype) * t_z)
    dgamma = (
        None
        if t_gamma is None
        else jnp.where(positive, jnp.zeros((), z.dtype), z * t_gamma.astype(z.dtype))
    )
    return _tangent_sum((dz, dgamma), z.shape, z.dtype)


def leaky_relu(z: Array, gamma: float | Array = 0.01) -> Array:
    """Leaky ReLU max(z, gamma z) (eq. 7.26) for gamma in (0, 1), element-wise.

    Kink convention: the derivative at z = 0 is ``gamma`` (``where(z > 0, 1,
    gamma)``); note that ``jax.nn.leaky_relu`` takes 1 there.

    Args:
      z: floating array of any shape.
      gamma: scalar slope for z <= 0, in the open interval (0, 1); a Python
        number takes z's dtype. It is differentiable.

    Returns:
      Array of z's shape and dtype.

    Raises:
      ValueError: a concrete ``gamma`` outside (0, 1) or not a scalar. A
        traced ``gamma`` is checked at run time under :func:`fnbp.checked`.
    """
    z = _float_input("leaky_relu", z)
    gamma = _scalar_setting("leaky_relu", "gamma", gamma, z)
    _validate.require_open_interval("leaky_relu", "gamma", gamma, 0.0, 1.0)
    check((gamma > 0) & (gamma < 1), "leaky_relu: gamma must lie in the open interval (0, 1)")
    return LEAKY_RELU.apply(z, gamma)


LEAKY_RELU = declare(
    leaky_relu,
    leaky_relu_fwd,
    leaky_relu_bwd,
    jvp=leaky_relu_jvp,
    reference=lambda z, gamma: jnp.where(z > 0, z, gamma * z),
    examples=with_scalar(0.1),
    equations=("7.26", "7.69"),
    kink="the derivative at z = 0 is gamma (jax.nn.leaky_relu takes 1 there).",
    family="activation",
    layer=LayerSpec("LeakyRelu", {"gamma": 0.01}, arrays=("gamma",)),
    init="he",
)


# --- GELU (7.27) ---------------------------------------------------------------

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_K = math.sqrt(2.0 / math.pi)
_TANH_C = 0.044715


def _times(z: Array, factor: Array) -> Array:
    """``z * factor`` where the factor tends to 0 as z -> +-inf: the limit 0 at
    z = +-inf (inf * 0 is NaN), NaN where z or the factor is NaN."""
    return jnp.where(jnp.isinf(z), jnp.zeros((), z.dtype), z * factor)


def _sigmoids(x: Array) -> tuple[Array, Array]:
    """``(sigmoid(x), sigmoid(-x))`` from one exponential e = e^{-|x|} <= 1.

    Neither is computed as 1 minus the other, so neither cancels; both take
    their limits 0 and 1 at x = +-inf.
    """
    e = jnp.exp(-jnp.abs(x))
    r = 1 / (1 + e)
    positive = x >= 0
    return jnp.where(positive, r, e * r), jnp.where(positive, e * r, r)


def _normal_cdf(z: Array) -> Array:
    """Phi(z) = erfc(-z / sqrt 2) / 2: no cancellation for z << 0 (1 + erf does)."""
    return 0.5 * jax.lax.erfc(-_SQRT_HALF * z)


def _tanh_gate(z: Array) -> tuple[Array, Array, Array]:
    """``(s, 1 - s, a)`` of the tanh form: s = (1 + tanh(a)) / 2 = sigmoid(2a),
    a = sqrt(2/pi) (z + 0.044715 z^3).

    As a logistic function, s does not cancel for z << 0, and 1 - s =
    sigmoid(-2a) is not computed as a difference. z^3 may overflow to +-inf
    at huge |z|; a, s and 1 - s then take their limits.
    """
    a = _TANH_K * (z + _TANH_C * z * z * z)
    return (*_sigmoids(2 * a), a)


class GeluResiduals(NamedTuple):
    """The input ``z``: GELU'(z) = Phi(z) + z phi(z) needs it."""

    z: Array


def gelu_fwd(z: Array, *, approximate: bool = False) -> tuple[Array, GeluResiduals]:
    """Forward pass of :func:`gelu` with its residuals."""
    w = at_least_float32(z)
    gate = _tanh_gate(w)[0] if approximate else _normal_cdf(w)
    u = jnp.where(w == -jnp.inf, jnp.zeros((), w.dtype), w * gate)
    return u.astype(z.dtype), GeluResiduals(z)


def gelu_bwd(res: GeluResiduals, v: Array, *, approximate: bool = False) -> tuple[Array]:
    """B[GELU, z](v) = (Phi(z) + z phi(z)) (.) v for the exact form.

    Phi is the standard normal CDF, computed as erfc(-z / sqrt 2) / 2, phi its
    density. For ``approximate=True`` the derivative of the tanh form
    z s(z), s = sigmoid(2a), a = sqrt(2/pi) (z + 0.044715 z^3):
    s + 2 z s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 z^2), which is
    0.5 (1 + t) + 0.5 z (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 z^2) with
    t = tanh(a), written without the cancelling 1 + t and 1 - t^2. The
    limits at z = -inf and inf are 0 and 1; float16/bfloat16 in float32.
    """
    w = at_least_float32(res.z)
    if approximate:
        s, s_minus, _ = _tanh_gate(w)
        bump = s * s_minus  # s (1 - s), 0 where z^2 may be inf
        tail = jnp.where(
            bump == 0, jnp.zeros((), w.dtype), (2 * _TANH_K) * w * (1 + 3 * _TANH_C * w * w) * bump
        )
        slope = s + tail
    else:
        pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * w * w)
        slope = _normal_cdf(w) + _times(w, pdf)
    return ((slope * v.astype(w.dtype)).astype(v.dtype),)


def gelu_jvp(res: GeluResiduals, t: tuple, *, approximate: bool = False) -> Array:
    """F[GELU, z](t) = GELU'(z) (.) t: the Jacobian is diagonal (symmetric), so F is B's
    own map (:func:`gelu_bwd`: the exact or the tanh form's slope, in at least float32)."""
    (t_z,) = t
    if t_z is None:
        return jnp.zeros(res.z.shape, res.z.dtype)
    return gelu_bwd(res, t_z, approximate=approximate)[0]


def gelu(z: Array, approximate: bool = False) -> Array:
    """GELU(z) = z Phi(z) = (z / 2)(1 + erf(z / sqrt 2)) (eq. 7.27), element-wise.

    Phi(z) is computed as erfc(-z / sqrt 2) / 2, which keeps its relative
    accuracy for z << 0 where 1 + erf(z / sqrt 2) cancels; gelu(-inf) = 0,
    gelu(inf) = inf. float16 and bfloat16 are evaluated in float32.

    Args:
      z: floating array of any shape.
      approximate: a static bool; ``False`` (default) is the exact erf form of
        the notes, ``True`` the tanh approximation
        0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))), computed as
        z sigmoid(2 sqrt(2/pi) (z + 0.044715 z^3)) (the same function,
        without the cancellation of 1 + tanh).

    Returns:
      Array of z's shape and dtype.
    """
    if not isinstance(approximate, bool):
        raise TypeError(
            f"gelu: approximate must be a Python bool (a static setting), got "
            f"{type(approximate).__name__}"
        )
    return GELU.apply(_float_input("gelu", z), approximate=approximate)


def _gelu_reference(z, approximate=False):
    if approximate:
        return 0.5 * z * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (z + 0.044715 * z**3)))
    return 0.5 * z * (1 + erf(z / jnp.sqrt(2.0)))


GELU = declare(
    gelu,
    gelu_fwd,
    gelu_bwd,
    jvp=gelu_jvp,
    reference=_gelu_reference,
    examples={"gelu": elementwise, "gelu(approximate)": (elementwise, {"approximate": True})},
    equations=("7.27", "7.69"),
    kink="none: smooth.",
    family="activation",
    layer=LayerSpec("Gelu", {"approximate": False}),
    init="he",
)


# --- softplus (7.28) -----------------------------------------------------------


class SoftplusResiduals(NamedTuple):
    """``z``, ``beta``, ``s = sigmoid(beta z)`` and ``r = z s - softplus(z)``
    (beta's cotangent is r / beta), the last two in at least float32."""

    z: Array
    beta: Array
    s: Array
    r: Array


def softplus_fwd(z: Array, beta: Array) -> tuple[Array, SoftplusResiduals]:
    """Forward pass of :func:`softplus` with its residuals.

    One exponential e = exp(-beta |z|) <= 1 gives everything:
    softplus = max(z, 0) + log1p(e) / beta, sigmoid(beta z) = 1 / (1 + e) for
    z >= 0 and e / (1 + e) below, and z s - softplus = -(|z| e / (1 + e) +
    log1p(e) / beta) without the cancellation of z s - u for large z.
    """
    w = at_least_float32(z)
    b = beta.astype(w.dtype)
    e = jnp.exp(-jnp.abs(b * w))
    tail = jnp.log1p(e) / b
    u = jnp.maximum(w, jnp.zeros((), w.dtype)) + tail
    s = jnp.where(w >= 0, jnp.ones((), w.dtype), e) / (1 + e)
    r = -(_times(jnp.abs(w), e / (1 + e)) + tail)
    return u.astype(z.dtype), SoftplusResiduals(z, beta, s, r)


def softplus_bwd(res: SoftplusResiduals, v: Array) -> tuple[Array, Array]:
    """B[softplus, z](v) = sigmoid(beta z) (.) v, stable for any beta z.

    The scalar ``beta`` gets its cotangent
    d beta = sum of (z s - u) / beta (.) v, with s = sigmoid(beta z), u the output;
    z s - u is the forward's r, formed without cancelling for large beta z.
    """
    z, beta, s, r = res
    va = v.astype(s.dtype)
    dz = (s * va).astype(v.dtype)
    dbeta = jnp.sum(r * va / beta.astype(r.dtype), dtype=jnp.promote_types(beta.dtype, jnp.float32))
    return dz, dbeta.astype(beta.dtype)


def softplus_jvp(res: SoftplusResiduals, t: tuple) -> Array:
    """F[softplus](t_z, t_beta) = sigmoid(beta z) (.) t_z + (z s - u) / beta t_beta.

    The z-part is diagonal (symmetric), the slope s = sigmoid(beta z) of B;
    the scalar beta's tangent moves every entry by d u / d beta = r / beta,
    with the forward's r = z s - u (no cancellation for large beta z). In at
    least float32, cast back once.
    """
    z, beta, s, r = res
    t_z, t_beta = t
    dz = None if t_z is None else s * t_z.astype(s.dtype)
    dbeta = None if t_beta is None else r / beta.astype(r.dtype) * t_beta.astype(r.dtype)
    return _tangent_sum((dz, dbeta), z.shape, z.dtype)


def softplus(z: Array, beta: float | Array = 1.0) -> Array:
    """softplus(z) = (1 / beta) log(1 + exp(beta z)) (eq. 7.28), element-wise.

    Computed as ``max(z, 0) + log1p(exp(-beta |z|)) / beta``: no overflow for
    any beta z (softplus(1000, beta=100) is 1000 in float16 too, which is
    evaluated in float32), exact limits 0 and z for large |beta z|.

    Args:
      z: floating array of any shape.
      beta: scalar > 0; a Python number takes z's dtype. It is differentiable.

    Returns:
      Array of z's shape and dtype.

    Raises:
      ValueError: a concrete ``beta`` <= 0 or not a scalar.
    """
    z = _float_input("softplus", z)
    return SOFTPLUS.apply(z, _positive_setting("softplus", "beta", beta, z))


SOFTPLUS = declare(
    softplus,
    softplus_fwd,
    softplus_bwd,
    jvp=softplus_jvp,
    reference=lambda z, beta: jnp.log1p(jnp.exp(beta * z)) / beta,
    examples=with_scalar(1.5),
    equations=("7.28", "7.69"),
    kink="none: smooth.",
    family="activation",
    layer=LayerSpec("Softplus", {"beta": 1.0}, arrays=("beta",)),
    init="he",
)


# --- SiLU / swish ----------------------------------------------------------------


class SiluResiduals(NamedTuple):
    """The input ``z`` (the backward recomputes sigmoid(+-z) from it)."""

    z: Array


def silu_fwd(z: Array) -> tuple[Array, SiluResiduals]:
    """Forward pass of :func:`silu` with its residuals."""
    w = at_least_float32(z)
    u = jnp.where(w == -jnp.inf, jnp.zeros((), w.dtype), w * jax.lax.logistic(w))
    return u.astype(z.dtype), SiluResiduals(z)


def silu_bwd(res: SiluResiduals, v: Array) -> tuple[Array]:
    """B[silu, z](v) = s (1 + z (1 - s)) (.) v with s = sigmoid(z).

    Computed as s + z s sigmoid(-z): 1 - s is not a difference (it cancels
    for z >> 0); the limits at z = -inf and inf are 0 and 1.
    """
    w = at_least_float32(res.z)
    s, s_minus = _sigmoids(w)
    slope = s + _times(w, s * s_minus)
    return ((slope * v.astype(w.dtype)).astype(v.dtype),)


def silu_jvp(res: SiluResiduals, t: tuple) -> Array:
    """F[silu, z](t) = s (1 + z (1 - s)) (.) t with s = sigmoid(z): the Jacobian is
    diagonal (symmetric), so F is B's own map (:func:`silu_bwd`)."""
    (t_z,) = t
    return jnp.zeros(res.z.shape, res.z.dtype) if t_z is None else silu_bwd(res, t_z)[0]


def silu(z: Array) -> Array:
    """SiLU (swish with beta = 1): silu(z) = z sigmoid(z), element-wise.

    Not in the notes; smooth, and like ReLU for large |z|, so it gets He
    initialization in :func:`fnbp.mlp`. silu(-inf) = 0, silu'(-inf) = 0,
    silu'(inf) = 1; float16 and bfloat16 are evaluated in float32.

    Args:
      z: floating array of any shape.

    Returns:
      z sigmoid(z), with z's shape and dtype.
    """
    return SILU.apply(_float_input("silu", z))


SILU = declare(
    silu,
    silu_fwd,
    silu_bwd,
    jvp=silu_jvp,
    reference=lambda z: z / (1.0 + jnp.exp(-z)),
    examples=elementwise,
    kink="none: smooth.",
    family="activation",
    layer=LayerSpec(),
    init="he",
)


# --- ELU -------------------------------------------------------------------------------


class EluResiduals(NamedTuple):
    """``mask = 1[z > 0]``, ``m = e^z - 1`` where z <= 0 (0 elsewhere) and ``alpha``."""

    mask: Array
    m: Array
    alpha: Array


def elu_fwd(z: Array, alpha: Array) -> tuple[Array, EluResiduals]:
    """Forward pass of :func:`elu` with its residuals."""
    mask = z > 0
    # where, not minimum: at z = 0 the derivative of m is e^0 = 1 (minimum splits a tie).
    m = jnp.expm1(jnp.where(mask, jnp.zeros((), z.dtype), z))
    return jnp.where(mask, z, alpha.astype(z.dtype) * m), EluResiduals(mask, m, alpha)


def elu_bwd(res: EluResiduals, v: Array) -> tuple[Array, Array]:
    """B[elu, z](v) = where(z > 0, 1, alpha e^z) (.) v; at z = 0 the slope is alpha.

    alpha e^z is computed as alpha (m + 1) from the forward's m = e^z - 1. The
    scalar ``alpha`` gets its cotangent too,
    d alpha = sum over all entries of where(z > 0, 0, e^z - 1) (.) v.
    """
    mask, m, alpha = res
    a = alpha.astype(v.dtype)
    dz = jnp.where(mask, v, a * (m + 1) * v)
    dalpha = jnp.sum(
        jnp.where(mask, jnp.zeros((), v.dtype), m * v),
        dtype=jnp.promote_types(alpha.dtype, jnp.float32),
    )
    return dz, dalpha.astype(alpha.dtype)


def elu_jvp(res: EluResiduals, t: tuple) -> Array:
    """F[elu](t_z, t_alpha) = where(z > 0, t_z, alpha e^z t_z) + where(z > 0, 0, e^z - 1) t_alpha.

    The z-part is diagonal (symmetric), the same slope as B (alpha at z = 0),
    alpha e^z computed as alpha (m + 1) from the forward's m = e^z - 1; the
    scalar alpha's tangent moves every z <= 0 entry by m t_alpha, the mirror
    of B's sum for d alpha. ``None`` tangents add nothing.
    """
    mask, m, alpha = res
    t_z, t_alpha = t
    dz = None if t_z is None else jnp.where(mask, t_z, alpha.astype(t_z.dtype) * (m + 1) * t_z)
    dalpha = (
        None
        if t_alpha is None
        else jnp.where(mask, jnp.zeros((), m.dtype), m * t_alpha.astype(m.dtype))
    )
    return _tangent_sum((dz, dalpha), m.shape, m.dtype)


def elu(z: Array, alpha: float | Array = 1.0) -> Array:
    """ELU(z) = z for z > 0, alpha (e^z - 1) for z <= 0, element-wise.

    Not in the notes (Clevert et al., 2015). Kink convention: the derivative
    at z = 0 is ``alpha``, the slope of the z <= 0 side, as ``jax.nn.elu``;
    for alpha = 1 both sides agree there.

    Args:
      z: floating array of any shape.
      alpha: scalar > 0, the value ELU approaches as z -> -inf is -alpha; a
        Python number takes z's dtype. It is differentiable.

    Returns:
      Array of z's shape and dtype.

    Raises:
      ValueError: a concrete ``alpha`` <= 0 or not a scalar. A traced
        ``alpha`` is checked at run time under :func:`fnbp.checked`.
    """
    z = _float_input("elu", z)
    return ELU.apply(z, _positive_setting("elu", "alpha", alpha, z))


ELU = declare(
    elu,
    elu_fwd,
    elu_bwd,
    jvp=elu_jvp,
    reference=lambda z, alpha: jnp.where(z > 0, z, alpha * jnp.expm1(jnp.where(z > 0, 0.0, z))),
    examples=with_scalar(0.7),
    kink="the derivative at z = 0 is alpha, the z <= 0 side, as jax.nn.elu.",
    family="activation",
    layer=LayerSpec("Elu", {"alpha": 1.0}, arrays=("alpha",)),
    init="he",
)


# --- softmax over the last axis ----------------------------------------------------------


class SoftmaxResiduals(NamedTuple):
    """The output ``s = softmax(z)``: the Jacobian diag(s) - s s^T needs nothing else."""

    s: Array


def softmax_fwd(z: Array) -> tuple[Array, SoftmaxResiduals]:
    """Forward pass of :func:`softmax` with its residuals."""
    za = z.astype(accumulation_dtype(z))
    e = jnp.exp(za - jnp.max(za, axis=-1, keepdims=True))
    s = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(z.dtype)
    return s, SoftmaxResiduals(s)


def softmax_bwd(res: SoftmaxResiduals, v: Array) -> tuple[Array]:
    """B[softmax, z](v) = s (.) (v - <s, v>), the inner product over the last axis.

    It is (diag(s) - s s^T) v: the Jacobian of softmax is symmetric, so its
    transpose is itself; no k x k matrix is built. Summed in at least float32.
    """
    acc = accumulation_dtype(res.s, v)
    s, va = res.s.astype(acc), v.astype(acc)
    dz = s * (va - jnp.sum(s * va, axis=-1, keepdims=True))
    return (dz.astype(res.s.dtype),)


def softmax_jvp(res: SoftmaxResiduals, t: tuple) -> Array:
    """F[softmax, z](t) = s (.) (t - <s, t>) = (diag(s) - s s^T) t: the Jacobian is
    symmetric, so F is B's own map (:func:`softmax_bwd`, summed in at least float32)."""
    (t_z,) = t
    return jnp.zeros(res.s.shape, res.s.dtype) if t_z is None else softmax_bwd(res, t_z)[0]


def softmax(z: Array) -> Array:
    """softmax(z)_i = e^{z_i} / sum_j e^{z_j} over the last axis, per example.

    Stable: computed as exp(z - max(z)), so no entry overflows, in at least
    float32 (float16 and bfloat16 inputs are promoted, the result cast back).
    Leading axes are example axes.

    Args:
      z: floating array of shape (..., k), k >= 1.

    Returns:
      s of z's shape and dtype; each example's entries are in [0, 1] and sum to 1.

    Raises:
      ValueError: z a scalar.
      TypeError: a non-floating z.
    """
    z = _float_input("softmax", z)
    _validate.require_min_ndim("softmax", "z", z, 1, "(..., k): the last axis is normalized")
    return SOFTMAX.apply(z)


def _softmax_args(key, dtype):
    return (normal(rng(key), (4, 7), dtype, scale=2.0),)


SOFTMAX = declare(
    softmax,
    softmax_fwd,
    softmax_bwd,
    jvp=softmax_jvp,
    reference=lambda z: jax.nn.softmax(z, axis=-1),
    examples=_softmax_args,
    kink="none: smooth.",
    family="activation",
    layer=LayerSpec(),
    init="glorot",
)
