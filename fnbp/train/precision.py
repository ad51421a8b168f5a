"""Mixed precision: float32 master weights, bfloat16/float16 compute, float32 loss.

A :class:`Precision` policy names three dtypes, as jmp's ``Policy`` and flax's
``param_dtype``/``dtype`` do:

- ``param_dtype``: the parameters as stored and updated (the master weights),
  and so the gradients and the optimizer state (Adam's moments);
- ``compute_dtype``: the forward and backward passes (every MM, convolution,
  activation and backward function B[M, z]);
- ``output_dtype``: the network's output t, so that the loss J = loss(t, y),
  its mean over examples (eq. 7.2) and dJ/dt are computed in it.

Mixed precision is ``params=float32,compute=bfloat16,output=float32``. Why
float32 master weights: an update alpha * dJ/dtheta is often smaller than the
spacing of bfloat16 numbers around theta (8 significant bits: the spacing at 1
is 2^-7), so theta + update would round back to theta and training would
stall; in float32 (24 bits) the update lands. Why a float32 loss: the mean
over n examples and the logsumexp of the cross-entropy are reductions whose
rounding error grows with their length, and the loss cotangent 1/n is the
seed of the whole backward pass.

:func:`with_precision` applies a policy to a network: the result is a layer
whose forward pass casts the parameters and the (floating) input to the
compute dtype, runs the network, and casts its output to the output dtype;
its backward function is the cast's own, B[cast, z](v) = cast back v, so the
incoming float32 cotangent dJ/dt is cast to the compute dtype, the network's
hand-written backward runs there, and the parameter gradients are cast back
to the parameters' dtype. Gradients therefore still come from Algorithm 3
(:func:`fnbp.backprop`), never from autodiff.

float16 has 5 exponent bits: numbers below 2^-24 flush to zero, and small
gradients (a cotangent 1/n times a softmax difference, times weights) do.
Loss scaling multiplies the loss by S before the backward pass; B is linear in
its cotangent, so every backward quantity is multiplied by S, lifted out of
the underflow range, and the float32 gradient is S dJ/dtheta; dividing by S
gives dJ/dtheta again. S is a power of two, so scaling and unscaling are exact.
Dynamic loss scaling (:func:`dynamic_loss_scale`) keeps S as large as the
gradients allow: a step whose scaled gradients hold an inf or a NaN is skipped
and S is halved; after ``period`` finite steps in a row S is doubled.
:func:`loss_scaled` wraps an optax optimizer so that S lives in the optimizer
state: checkpoints save it, and a resumed run continues with it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import Array

from fnbp.backprop import Loss, backprop
from fnbp.nn.layer import BookKeeping, Layer, Params, _layer, tangent_pass

# The names fnbp train's --precision takes: the compute dtype of a policy whose
# parameters and output are float32.
PRECISIONS = ("float32", "bfloat16", "float16")
_DTYPES = {
    "float16": jnp.float16,
    "f16": jnp.float16,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float32": jnp.float32,
    "f32": jnp.float32,
    "float64": jnp.float64,
    "f64": jnp.float64,
}
_ROLES = {
    "params": "param_dtype",
    "p": "param_dtype",
    "compute": "compute_dtype",
    "c": "compute_dtype",
    "output": "output_dtype",
    "o": "output_dtype",
}


def _valid_names() -> str:
    return (
        f"one of {', '.join(PRECISIONS)} or a full policy such as "
        f"'params=float32,compute=bfloat16,output=float32' (short: 'p=f32,c=bf16,o=f32')"
    )


@dataclasses.dataclass(frozen=True)
class Precision:
    """The dtypes of parameters, computation and output (see the module doc).

    Hashable, so it can be a static argument of a jitted function.

    Attributes:
      param_dtype: the parameters, their gradients and the optimizer state.
      compute_dtype: the forward and backward passes.
      output_dtype: the network output, and so the loss and its mean.
    """

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            value = getattr(self, field)
            try:
                dtype = jnp.dtype(value)
            except TypeError:
                dtype = None
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(
                    f"Precision: {field} must be a floating dtype (float16, "
                    f"bfloat16, float32, float64), got {value!r}"
                )
            object.__setattr__(self, field, dtype)

    @classmethod
    def from_name(cls, name: str) -> Precision:
        """The policy a name stands for.

        ``"float32"``, ``"bfloat16"`` and ``"float16"`` name the compute dtype,
        with float32 parameters and output (Keras' "mixed_bfloat16"; unlike
        jmp, where a single dtype name sets all three). A full policy is
        ``"params=float32,compute=bfloat16,output=float32"``, with the short
        forms ``p``/``c``/``o`` and ``f16``/``bf16``/``f32``/``f64``
        (jmp's spelling); roles not given are float32.

        Raises:
          ValueError: an unknown name, naming the valid ones.
        """
        if not isinstance(name, str):
            raise TypeError(
                f"Precision.from_name: name must be a str, got "
                f"{type(name).__name__}; pass {_valid_names()}"
            )
        text = name.strip().lower()
        if text in PRECISIONS:
            return cls(compute_dtype=_DTYPES[text])
        dtypes: dict[str, Any] = {}
        for part in text.split(","):
            role, _, dtype = (s.strip() for s in part.partition("="))
            if role not in _ROLES or dtype not in _DTYPES or _ROLES[role] in dtypes:
                raise ValueError(
                    f"Precision.from_name: unknown precision {name!r}; pass {_valid_names()}"
                )
            dtypes[_ROLES[role]] = _DTYPES[dtype]
        return cls(**dtypes)

    @property
    def name(self) -> str:
        """The shortest name :meth:`from_name` reads back to this policy."""
        f32 = jnp.dtype(jnp.float32)
        if (
            self.param_dtype == f32
            and self.output_dtype == f32
            and self.compute_dtype.name in PRECISIONS
        ):
            return self.compute_dtype.name
        return (
            f"params={self.param_dtype.name},compute={self.compute_dtype.name},"
            f"output={self.output_dtype.name}"
        )

    @property
    def needs_loss_scale(self) -> bool:
        """True for float16 compute, whose small gradients underflow without loss scaling."""
        return self.compute_dtype == jnp.dtype(jnp.float16)

    def cast_to_param(self, tree: Any) -> Any:
        """Every floating leaf of ``tree`` cast to ``param_dtype`` (others unchanged)."""
        return _cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree: Any) -> Any:
        """Every floating leaf of ``tree`` cast to ``compute_dtype`` (others unchanged)."""
        return _cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        """Every floating leaf of ``tree`` cast to ``output_dtype`` (others unchanged)."""
        return _cast_floating(tree, self.output_dtype)


def _cast_floating(tree: Any, dtype: Any) -> Any:
    def cast(leaf):
        leaf = jnp.asarray(leaf)
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree_util.tree_map(cast, tree)


def as_precision(precision: Precision | str, fn: str = "precision") -> Precision:
    """A :class:`Precision` from itself or a name (:meth:`Precision.from_name`)."""
    if isinstance(precision, Precision):
        return precision
    if isinstance(precision, str):
        try:
            return Precision.from_name(precision)
        except ValueError:
            raise ValueError(
                f"{fn}: unknown precision {precision!r}; pass {_valid_names()}"
            ) from None
    raise TypeError(
        f"{fn}: precision must be a fnbp.Precision or a name ({_valid_names()}), "
        f"got {type(precision).__name__}"
    )


# --- the policy applied to a network ---------------------------------------------------


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Dtypes:
    """The dtypes of a layer's input and of the inner network's output (static residual)."""

    z: Any
    u: Any


_POLICIES: dict[Layer, Precision] = {}


def with_precision(model: Layer, precision: Precision | str) -> Layer:
    """``model`` under a precision policy: cast in, compute, cast out.

    forward(params, z) = cast_o(model.forward(cast_c(params), cast_c(z))) and
    backward(params, residuals, v) = (cast_p(dparams), cast_z(dz)) with
    (dparams, dz) = model.backward(cast_c(params), residuals, cast_c(v)):
    the backward function of a cast is the cast back (B[cast, z](v) = v in
    z's dtype), so the gradients are the network's hand-written ones,
    computed in the compute dtype and returned in each parameter's own dtype.
    Integer inputs (class or token indices) are not cast.

    The layer's ``init`` makes parameters in ``param_dtype`` unless given a
    dtype. The result is cached: the same model and policy give the same
    layer object, so jitted steps made from it are compiled once.

    Args:
      model: a :class:`fnbp.Layer`.
      precision: a :class:`Precision` or its name (``"bfloat16"``, ...).

    Returns:
      A :class:`fnbp.Layer` with the same parameters as ``model``.
    """
    if not isinstance(model, Layer):
        raise TypeError(
            f"with_precision: model must be a fnbp Layer (fnbp.mlp(...), "
            f"fnbp.serial(...)), got {type(model).__name__}"
        )
    return _with_precision(model, as_precision(precision, "with_precision"))


@functools.lru_cache(maxsize=64)
def _with_precision(model: Layer, policy: Precision) -> Layer:
    def init(key, input_shape, dtype=None):
        return model.init(key, input_shape, policy.param_dtype if dtype is None else dtype)

    def forward(params, z):
        z = jnp.asarray(z)
        u, residuals = model.forward(policy.cast_to_compute(params), policy.cast_to_compute(z))
        return policy.cast_to_output(u), (residuals, _Dtypes(z.dtype, u.dtype))

    def input_cotangent(dz, dtypes):
        return dz.astype(dtypes.z) if jnp.issubdtype(dtypes.z, jnp.floating) else dz

    def in_param_dtypes(grads, params):
        return jax.tree_util.tree_map(lambda g, p: g.astype(jnp.result_type(p)), grads, params)

    def backward(params, saved, v):
        residuals, dtypes = saved
        grads, dz = model.backward(policy.cast_to_compute(params), residuals, v.astype(dtypes.u))
        return in_param_dtypes(grads, params), input_cotangent(dz, dtypes)

    def at_least_f32(tree):
        return jax.tree_util.tree_map(
            lambda a: a.astype(jnp.promote_types(a.dtype, jnp.float32)), tree
        )

    # The per-example passes are the model's own, cast like backward: the model's
    # tape travels through, so its one-contraction clipping (and mixed ghost
    # clipping) holds under a policy too.
    def norms(params, saved, v):
        residuals, dtypes = saved
        sq, dz, tape = model.book.norms(
            policy.cast_to_compute(params), residuals, v.astype(dtypes.u)
        )
        return at_least_f32(sq), input_cotangent(dz, dtypes), tape

    def clipped(params, tape, scales):
        return in_param_dtypes(
            model.book.clipped(policy.cast_to_compute(params), tape, scales), params
        )

    def moments(params, saved, v):
        residuals, dtypes = saved
        grads, sq, dz = model.book.moments(
            policy.cast_to_compute(params), residuals, v.astype(dtypes.u)
        )
        return in_param_dtypes(grads, params), at_least_f32(sq), input_cotangent(dz, dtypes)

    def curvature(params, saved, columns, kind):
        residuals, dtypes = saved
        out, dz = model.book.curvature(
            policy.cast_to_compute(params), residuals, columns.astype(dtypes.u), kind
        )
        return at_least_f32(out), input_cotangent(dz, dtypes)

    def tangent(params, saved, dparams, dz):
        """F of the cast network: the tangents cast to the compute dtype, F, cast out."""
        residuals, _ = saved
        dparams = policy.cast_to_compute(dparams)  # None (zero) leaves stay None
        dz = None if dz is None else policy.cast_to_compute(dz)
        du = tangent_pass(
            model.tangent, repr(model.name), policy.cast_to_compute(params), residuals, dparams, dz
        )
        return None if du is None else policy.cast_to_output(du)

    layer = _layer(
        f"{model.name} @ {policy.name}",
        init,
        forward,
        backward,
        BookKeeping(norms, clipped, moments, curvature),
        tangent=tangent,
    )
    _POLICIES[layer] = policy
    return layer


def policy_of(model: Layer) -> Precision | None:
    """The policy :func:`with_precision` applied to ``model``, or None."""
    return _POLICIES.get(model)


# --- dynamic loss scaling ---------------------------------------------------------------


class LossScaleState(NamedTuple):
    """The loss scale S (float32 scalar) and the finite steps since S last changed."""

    scale: Array
    good_steps: Array


class DynamicLossScale(NamedTuple):
    """A pure ``(init, update)`` pair, optax style (see :func:`dynamic_loss_scale`)."""

    init: Callable[[], LossScaleState]
    update: Callable[[LossScaleState, Array], LossScaleState]


def dynamic_loss_scale(
    initial_scale: float = 2.0**15, period: int = 2000, factor: float = 2.0, min_scale: float = 1.0
) -> DynamicLossScale:
    """Dynamic loss scaling as a pure ``(init, update)`` pair.

    ``init()`` is S = ``initial_scale`` with no good steps. ``update(state,
    finite)``: when the scaled gradients were not all finite, S <- max(S /
    factor, min_scale) and the count restarts; otherwise the count grows, and
    when it reaches ``period`` S <- S * factor (kept if that overflows) and the
    count restarts. These are jmp's ``DynamicLossScale`` rules (and PyTorch's
    GradScaler's, whose growth_interval is ``period``).

    Args:
      initial_scale: the first S; a power of two keeps the scaling exact.
      period: finite steps in a row before S grows, >= 1.
      factor: the growth and shrink factor, > 1 (2 keeps S a power of two).
      min_scale: the floor of S, > 0.

    Returns:
      A :class:`DynamicLossScale`.
    """
    if not isinstance(period, int) or period < 1:
        raise ValueError(f"dynamic_loss_scale: period must be an int >= 1, got {period!r}")
    if not factor > 1 or not 0 < min_scale <= initial_scale:
        raise ValueError(
            f"dynamic_loss_scale: need factor > 1 and 0 < min_scale <= "
            f"initial_scale, got factor={factor}, min_scale={min_scale}, "
            f"initial_scale={initial_scale}"
        )

    def init() -> LossScaleState:
        return LossScaleState(jnp.asarray(initial_scale, jnp.float32), jnp.zeros((), jnp.int32))

    def update(state: LossScaleState, finite: Array) -> LossScaleState:
        good = state.good_steps + 1
        grown = state.scale * factor
        grow = good >= period
        scale = jnp.where(
            finite,
            jnp.where(grow & jnp.isfinite(grown), grown, state.scale),
            jnp.maximum(state.scale / factor, min_scale),
        )
        return LossScaleState(
            scale.astype(jnp.float32), jnp.where(finite & ~grow, good, 0).astype(jnp.int32)
        )

    return DynamicLossScale(init, update)


class LossScaledState(NamedTuple):
    """The state of a :func:`loss_scaled` optimizer: the loss scale and the inner state."""

    loss_scale: LossScaleState
    inner_state: Any


def all_finite(tree: Any) -> Array:
    """True when every element of every leaf of ``tree`` is finite (no inf, no NaN)."""
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def loss_scaled(
    optimizer: optax.GradientTransformation, loss_scale: DynamicLossScale | None = None
) -> optax.GradientTransformation:
    """An optax optimizer that takes loss-scaled gradients S dJ/dtheta.

    ``update(scaled_grads, state, params)``: if every scaled gradient is finite,
    the gradients are unscaled (divided by S, exact for a power of two) and
    passed to ``optimizer``; otherwise the step is skipped: the updates are
    zero and the inner state (Adam's moments and count) is kept. Either way S
    is adjusted by ``loss_scale`` (default :func:`dynamic_loss_scale`). The
    state is a :class:`LossScaledState`, so checkpoints hold S.

    :func:`fnbp.make_train_step` sees the loss scale in the optimizer state and
    multiplies the loss by S before the backward pass. Wrap the whole
    optimizer, ``loss_scaled(optax.chain(clip, adam))``, so that every
    transformation inside it sees unscaled gradients; a loss-scaled
    optimizer nested inside a chain is refused by the training step.

    Args:
      optimizer: any optax ``GradientTransformation``.
      loss_scale: a :class:`DynamicLossScale`.

    Returns:
      An optax ``GradientTransformation``.
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"loss_scaled: optimizer must be an optax GradientTransformation "
            f"(e.g. optax.adam(1e-3)), got {type(optimizer).__name__}"
        )
    loss_scale = loss_scale or dynamic_loss_scale()

    def init(params: Params) -> LossScaledState:
        return LossScaledState(loss_scale.init(), optimizer.init(params))

    def update(
        scaled_grads: Any, state: LossScaledState, params: Params | None = None
    ) -> tuple[Any, LossScaledState]:
        finite = all_finite(scaled_grads)
        scale = state.loss_scale.scale
        grads = jax.tree_util.tree_map(
            lambda g: jnp.where(finite, g / scale.astype(g.dtype), jnp.zeros_like(g)), scaled_grads
        )
        updates, inner = optimizer.update(grads, state.inner_state, params)
        updates = jax.tree_util.tree_map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        inner = jax.tree_util.tree_map(
            lambda new, old: jnp.where(finite, new, old), inner, state.inner_state
        )
        return updates, LossScaledState(loss_scale.update(state.loss_scale, finite), inner)

    return optax.GradientTransformation(init, update)


def loss_scale_of(opt_state: Any) -> Array | None:
    """The loss scale S held by a :func:`loss_scaled` optimizer's state, or None.

    Raises:
      ValueError: a :class:`LossScaledState` nested inside the state (a
        ``loss_scaled`` optimizer inside a chain), whose S the loss would miss.
    """
    if isinstance(opt_state, LossScaledState):
        return opt_state.loss_scale.scale
    nodes = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda node: isinstance(node, LossScaledState)
    )
    if any(isinstance(node, LossScaledState) for node in nodes):
        raise ValueError(
            "train_step: the optimizer state holds a fnbp.loss_scaled state "
            "inside another optimizer's; make fnbp.loss_scaled the outermost "
            "wrapper, e.g. fnbp.loss_scaled(optax.chain(...)), so that the "
            "loss is scaled by its S"
        )
    return None


def _scaled(loss: Loss, scale: Array) -> Loss:
    def scaled_loss(t: Array, y: Array) -> Array:
        return loss(t, y) * scale  # promotes a float16 loss to float32: S J cannot overflow

    return scaled_loss


def scaled_backprop(
    model: Layer, loss: Loss, params: Params, x: Array, y: Array, opt_state: Any
) -> tuple[Array, Params]:
    """:func:`fnbp.backprop`, with the loss scaled by the S of a loss-scaled optimizer.

    Without a :class:`LossScaledState` it is ``backprop(model, loss, params, x,
    y)`` itself. With one, it is ``backprop`` of the loss S J: the same
    Algorithm 3 with every cotangent multiplied by S; J is returned unscaled,
    the gradients scaled (the optimizer unscales them).

    Raises:
      ValueError: a float16 policy (:func:`with_precision`) without loss
        scaling.
    """
    scale = loss_scale_of(opt_state)
    if scale is None:
        policy = policy_of(model)
        if policy is not None and policy.needs_loss_scale:
            raise ValueError(
                f"train_step: precision {policy.name!r} computes in float16, "
                f"whose small gradients underflow to zero; wrap the optimizer "
                f"in fnbp.loss_scaled(optimizer) and make its state with that "
                f"wrapped optimizer's init"
            )
        return backprop(model, loss, params, x, y)
    J, grads = backprop(model, _scaled(loss, scale), params, x, y)
    return J / scale, grads


def applied(fn: str, model: Layer, precision: Precision | str | None) -> Layer:
    """``model`` itself for ``precision=None``, else :func:`with_precision` of it."""
    if precision is None:
        return model
    return _with_precision(model, as_precision(precision, fn))
