"""Layers as pure functions over parameter pytrees, and the networks built from them.

A network is a composition of modules, J = M_k(M_{k-1}(... M_1(x))) (eq. 7.60).
Each module is a :class:`Layer`: an immutable record of pure functions

- ``init(key, input_shape, dtype) -> (output_shape, params)``: parameters for
  one example of shape ``input_shape`` (no batch axis);
- ``forward(params, z) -> (u, residuals)``: the forward pass that stores what
  the backward function needs (Algorithm 3, forward pass);
- ``backward(params, residuals, v) -> (dparams, dz)``: the backward function
  B[M, z] for the parameters and the input, built from the hand-written rules;
- ``apply(params, z) -> u``: the forward alone, itself a ``jax.custom_vjp``
  whose rule is ``forward``/``backward``, so ``jax.grad`` in user code gets
  the same hand-written gradients;
- ``sq_norms(params, residuals, v) -> (per_example_sq_norm, dz)``, or ``None``:
  the squared norm of each example's parameter gradient without building the
  per-example gradients (see :func:`fnbp.per_example_grad_norms`).

Leading axes of ``z`` beyond the example shape are example axes (eq. 7.84).
:func:`serial` composes layers and its backward is Algorithm 3 over its
children; :func:`residual` is Res(z) = z + block(z) (eq. 7.38).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import Array

from fnbp.rules import conv, linear, normalization, pooling, registry

Shape = tuple[int, ...]
Params = Any
Residuals = Any


class Layer(NamedTuple):
    """A module M of the notes as a record of pure functions (see the module doc)."""

    name: str
    init: Callable[..., tuple[Shape, Params]]
    forward: Callable[[Params, Array], tuple[Array, Residuals]]
    backward: Callable[[Params, Residuals, Array], tuple[Params, Array]]
    apply: Callable[[Params, Array], Array]
    sq_norms: Callable[[Params, Residuals, Array], tuple[Array, Array]] | None

    def __repr__(self) -> str:
        return f"Layer({self.name})"


def _make_apply(forward, backward):
    """``apply`` as a custom_vjp whose rule is the layer's own forward/backward."""

    @jax.custom_vjp
    def apply(params, z):
        return forward(params, z)[0]

    def apply_fwd(params, z):
        u, residuals = forward(params, z)
        return u, (params, residuals)

    def apply_bwd(saved, v):
        params, residuals = saved
        return backward(params, residuals, v)

    apply.defvjp(apply_fwd, apply_bwd)
    return apply


def make_layer(
    name: str,
    init: Callable[..., tuple[Shape, Params]],
    forward: Callable[[Params, Array], tuple[Array, Residuals]],
    backward: Callable[[Params, Residuals, Array], tuple[Params, Array]],
    sq_norms: Callable[[Params, Residuals, Array], tuple[Array, Array]] | None = None,
) -> Layer:
    """Build a :class:`Layer` from its init, forward and backward functions.

    Use this for your own modules: write ``forward`` (returning the output and
    the residuals) and ``backward`` (the backward function B), and the layer
    composes with fnbp's in :func:`serial`, :func:`residual` and
    :func:`fnbp.backprop`.
    """
    return Layer(name, init, forward, backward, _make_apply(forward, backward), sq_norms)


def _example_count(z: Array, example_ndim: int) -> int:
    shape = z.shape[: z.ndim - example_ndim]
    count = 1
    for size in shape:
        count *= size
    return count


# --- parameter-free layers: the activations -------------------------------------


def _no_params(key, input_shape, dtype=jnp.float32):
    del key, dtype
    return tuple(input_shape), ()


def _elementwise_layer(name: str, fwd: Callable, bwd: Callable) -> Layer:
    """A layer for an element-wise rule u = sigma(z): B[sigma, z](v) = sigma'(z) (.) v."""

    def forward(params, z):
        return fwd(z)

    def backward(params, residuals, v):
        return (), bwd(residuals, v)[0]

    def sq_norms(params, residuals, v):
        dz = bwd(residuals, v)[0]
        return jnp.zeros((), v.dtype), dz

    return make_layer(name, _no_params, forward, backward, sq_norms)


_RULE_LAYERS: dict[tuple, Layer] = {}


def rule_layer(name: str, **settings: Any) -> Layer:
    """The parameter-free layer of a declared rule (an activation), by its name.

    The rule's record says how (:class:`fnbp.rules.LayerSpec`): its settings
    and their defaults, and which of them are array arguments. The layer's
    name shows the settings, e.g. ``leaky_relu(gamma=0.01)``.

    Args:
      name: a rule with a layer spec, e.g. ``"relu"``, ``"gelu"``.
      **settings: overrides of the spec's defaults, e.g. ``gamma=0.2``.

    Raises:
      ValueError: an unknown name or setting, or a setting the rule refuses
        (the rule's own message, prefixed by the layer's constructor name).
    """
    key = (name, tuple(sorted(settings.items())))
    if key not in _RULE_LAYERS:
        _RULE_LAYERS[key] = _make_rule_layer(name, **settings)
    return _RULE_LAYERS[key]


def _make_rule_layer(name: str, **settings: Any) -> Layer:
    rules = _layer_rules()
    if name not in rules:
        raise ValueError(f"activation must be one of {sorted(rules)}, the matching fnbp "
                         f"function (e.g. fnbp.relu) or a Layer; got {name!r}")
    rule = rules[name]
    spec = rule.layer
    factory = spec.factory or name
    unknown = sorted(set(settings) - set(spec.settings))
    if unknown:
        raise ValueError(f"{factory}: unknown settings {unknown}; it takes "
                         f"{sorted(spec.settings) or 'none'}")
    values = {**spec.settings, **settings}
    static = {k: v for k, v in values.items() if k not in spec.arrays}

    def arrays(z):
        return [jnp.asarray(values[k], z.dtype) for k in spec.arrays]

    try:  # the rule's own validation of the settings, once, at construction
        concrete = [jnp.asarray(values[k], jnp.float32) for k in spec.arrays]
        jax.eval_shape(lambda z: rule.function(z, *concrete, **static),
                       jax.ShapeDtypeStruct((1,), jnp.float32))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{factory}: {err}") from None
    label = name + (f"({', '.join(f'{k}={v}' for k, v in values.items())})" if values else "")
    return _elementwise_layer(label, lambda z: rule.fwd(z, *arrays(z), **static),
                              lambda res, v: rule.bwd(res, v, **static))


def _layer_rules() -> dict:
    """The rules that have a parameter-free layer, by name (from the registry)."""
    return {name: rule for name, rule in registry().items() if rule.layer is not None}


Relu = rule_layer("relu")
Sigmoid = rule_layer("sigmoid")
Tanh = rule_layer("tanh")
Silu = rule_layer("silu")


def Gelu(approximate: bool = False) -> Layer:
    """GELU layer (eq. 7.27); ``approximate`` selects the tanh form."""
    return rule_layer("gelu", approximate=approximate)


def LeakyRelu(gamma: float = 0.01) -> Layer:
    """Leaky ReLU layer (eq. 7.26) with a fixed slope ``gamma`` in (0, 1)."""
    return rule_layer("leaky_relu", gamma=gamma)


def Softplus(beta: float = 1.0) -> Layer:
    """Softplus layer (eq. 7.28) with a fixed ``beta`` > 0."""
    return rule_layer("softplus", beta=beta)


def activation_layer(activation: str | Callable | Layer, **settings: Any) -> Layer:
    """The layer for an activation given by name, by fnbp function or as a Layer.

    Every rule declared with a layer spec is an activation here, by its name
    (``"relu"``) or its function (``fnbp.relu``); ``settings`` override its
    defaults (``activation_layer("leaky_relu", gamma=0.2)``).
    """
    if isinstance(activation, Layer):
        return activation
    by_function = {rule.function: name for name, rule in _layer_rules().items()}
    name = by_function.get(activation, activation)
    if not isinstance(name, str):
        name = repr(name)
    return rule_layer(name, **settings)


def _init_family(layer: Layer) -> str:
    """The MM initialization before ``layer``: the rule's ``init`` ("he"/"glorot").

    A Layer that is not a declared rule's gets Glorot.
    """
    rule = _layer_rules().get(_activation_name(layer))
    return rule.init if rule is not None and rule.init is not None else "glorot"


def _activation_name(layer: Layer) -> str:
    return layer.name.split("(")[0]


# --- MM (linear) ------------------------------------------------------------------


def _normal_init(scale: float, mode: str, in_axis, out_axis):
    """Variance-scaling initializer with a plain (untruncated) normal.

    He: variance 2 / fan_in; Glorot: 2 / (fan_in + fan_out); LeCun: 1 / fan_in.
    A plain normal compiles much faster than the truncated one and keeps the
    stated variance exactly.
    """
    return jax.nn.initializers.variance_scaling(scale, mode, "normal",
                                                in_axis=in_axis, out_axis=out_axis)


def Linear(n: int, *, bias: bool = True, init: str = "he") -> Layer:
    """The MM module as a layer: u = W z + b (eq. 7.35), W of shape (n, m).

    Args:
      n: output width.
      bias: whether there is a bias b (initialized to zero).
      init: ``"he"`` (plain normal, variance 2/m; for ReLU-like activations),
        ``"glorot"`` (normal, variance 2/(m + n); for tanh/sigmoid) or
        ``"lecun"`` (normal, variance 1/m), the fan-in m being z's width.

    Returns:
      A :class:`Layer` with params ``{"W": (n, m), "b": (n,)}`` (no ``"b"``
      when ``bias=False``).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"Linear: n must be a positive int, got {n!r}")
    initializers = {
        "he": _normal_init(2.0, "fan_in", in_axis=-1, out_axis=-2),
        "glorot": _normal_init(1.0, "fan_avg", in_axis=-1, out_axis=-2),
        "lecun": _normal_init(1.0, "fan_in", in_axis=-1, out_axis=-2),
    }
    if init not in initializers:
        raise ValueError(f"Linear: init must be one of {sorted(initializers)}, got {init!r}")
    name = f"linear({n})"

    def init_fn(key, input_shape, dtype=jnp.float32):
        if len(input_shape) < 1:
            raise ValueError(f"{name}: needs inputs of shape (..., m), got {input_shape}")
        m = input_shape[-1]
        params = {"W": initializers[init](key, (n, m), dtype)}
        if bias:
            params["b"] = jnp.zeros((n,), dtype)
        return tuple(input_shape[:-1]) + (n,), params

    def forward(params, z):
        _check_linear_params(name, params, z, bias, n)
        return linear.mm_fwd(z, params["W"], params.get("b"))

    def backward(params, residuals, v):
        dz, dW, db = linear.mm_bwd(residuals, v)
        return ({"W": dW, "b": db} if bias else {"W": dW}), dz

    def sq_norms(params, residuals, v):
        return registry()["mm"].hooks["sq_norms"](residuals, v, bias)

    return make_layer(name, init_fn, forward, backward, sq_norms)


def _check_linear_params(name: str, params: Params, z: Array, bias: bool, n: int) -> None:
    expected = {"W", "b"} if bias else {"W"}
    if not isinstance(params, dict) or set(params) != expected:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(
            f"{name}: params must be a dict with keys {sorted(expected)}, got {got}; "
            f"pass the params made by this model's init"
        )
    W = params["W"]
    if jnp.ndim(W) != 2 or W.shape[0] != n or (bias and jnp.shape(params["b"]) != (n,)):
        raise ValueError(
            f"{name}: params have W.shape={jnp.shape(W)}"
            + (f", b.shape={jnp.shape(params['b'])}" if bias else "")
            + f"; expected W of shape ({n}, m)" + (f" and b of shape ({n},)" if bias else "")
        )
    if jnp.ndim(z) < 1 or z.shape[-1] != W.shape[1]:
        raise ValueError(
            f"{name}: input has shape {jnp.shape(z)} but W.shape={W.shape} expects "
            f"{W.shape[1]} features in the last axis; pass inputs of shape (..., {W.shape[1]})"
        )


# --- combinators ------------------------------------------------------------------


def serial(*layers: Layer, name: str | None = None) -> Layer:
    """Compose layers: serial(M_1, ..., M_k)(z) = M_k(... M_1(z)) (eq. 7.60).

    Its ``backward`` is Algorithm 3: given the residuals stored by the forward
    pass, it chains the children's backward functions from the last to the
    first, taking each child's parameter gradient as soon as the cotangent of
    its output is known. Params are a tuple, one entry per child.
    """
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(
                f"serial: argument {i} is {type(layer).__name__}, not a Layer; "
                f"use fnbp.Linear(n), fnbp.Relu, ... or fnbp.make_layer"
            )
    name = name or "serial(" + ", ".join(layer.name for layer in layers) + ")"

    def where(i: int) -> str:
        return f"{name.split('(')[0]}[{i}]"

    def init(key, input_shape, dtype=jnp.float32):
        params = []
        shape = tuple(input_shape)
        for layer, layer_key in zip(layers, jax.random.split(key, max(len(layers), 1))):
            shape, layer_params = layer.init(layer_key, shape, dtype)
            params.append(layer_params)
        return shape, tuple(params)

    def _check_params(params):
        if not isinstance(params, (tuple, list)) or len(params) != len(layers):
            got = len(params) if isinstance(params, (tuple, list)) else type(params).__name__
            raise ValueError(
                f"{name}: params must be a tuple of {len(layers)} entries (one per layer), "
                f"got {got}; pass the params made by this model's init"
            )

    def forward(params, z):
        _check_params(params)
        residuals = []
        for i, (layer, layer_params) in enumerate(zip(layers, params)):
            try:
                z, layer_residuals = layer.forward(layer_params, z)
            except (ValueError, TypeError) as error:
                message = str(error)
                if not message.startswith(layers[i].name):
                    message = f"{layers[i].name}: {message}"
                raise type(error)(f"{where(i)} {message}") from None
            residuals.append(layer_residuals)
        return z, tuple(residuals)

    def backward(params, residuals, v):
        grads = [None] * len(layers)
        for i in reversed(range(len(layers))):
            grads[i], v = layers[i].backward(params[i], residuals[i], v)
        # the same container as params (a list stays a list: custom_vjp needs it)
        return (grads if isinstance(params, list) else tuple(grads)), v

    sq_norms = None
    if all(layer.sq_norms is not None for layer in layers):

        def sq_norms(params, residuals, v):
            total = jnp.zeros((), jnp.promote_types(v.dtype, jnp.float32))
            for i in reversed(range(len(layers))):
                sq, v = layers[i].sq_norms(params[i], residuals[i], v)
                total = total + sq
            return total, v

    return make_layer(name, init, forward, backward, sq_norms)


def residual(block: Layer) -> Layer:
    """The residual module Res(z) = z + block(z) (eq. 7.38).

    B[Res, z](v) = v + B[block, z](v): the identity path adds the incoming
    cotangent to the block's input cotangent.
    """
    name = f"residual({block.name})"

    def init(key, input_shape, dtype=jnp.float32):
        output_shape, params = block.init(key, input_shape, dtype)
        if tuple(output_shape) != tuple(input_shape):
            raise ValueError(
                f"{name}: the block maps shape {tuple(input_shape)} to "
                f"{tuple(output_shape)}; Res(z) = z + block(z) needs them equal"
            )
        return output_shape, params

    def forward(params, z):
        u, residuals = block.forward(params, z)
        return z + u, residuals

    def backward(params, residuals, v):
        grads, dz = block.backward(params, residuals, v)
        return grads, v + dz

    sq_norms = None
    if block.sq_norms is not None:

        def sq_norms(params, residuals, v):
            sq, dz = block.sq_norms(params, residuals, v)
            return sq, v + dz

    return make_layer(name, init, forward, backward, sq_norms)


def remat(layer: Layer) -> Layer:
    """Store only the layer's input; recompute its residuals in the backward pass.

    The memory of the residuals inside ``layer`` (pre-activations, masks, the
    inputs of inner MMs) is traded for one more forward pass of ``layer``
    during the backward pass. The recomputation is fenced with
    ``jax.lax.optimization_barrier`` so the compiler cannot merge it with the
    first forward pass (which would store everything again).
    """
    name = f"remat({layer.name})"

    def forward(params, z):
        u, _ = layer.forward(params, z)
        return u, z

    def backward(params, z, v):
        params, z, v = jax.lax.optimization_barrier((params, z, v))
        _, residuals = layer.forward(params, z)
        return layer.backward(params, residuals, v)

    sq_norms = None
    if layer.sq_norms is not None:

        def sq_norms(params, z, v):
            params, z, v = jax.lax.optimization_barrier((params, z, v))
            _, residuals = layer.forward(params, z)
            return layer.sq_norms(params, residuals, v)

    return make_layer(name, layer.init, forward, backward, sq_norms)


def Flatten(ndim: int) -> Layer:
    """Flatten the last ``ndim`` (per-example) axes into one: (..., H, W, C) -> (..., H W C)."""
    if not isinstance(ndim, int) or ndim < 1:
        raise ValueError(f"Flatten: ndim must be a positive int, got {ndim!r}")
    name = f"flatten({ndim})"

    def init(key, input_shape, dtype=jnp.float32):
        if len(input_shape) < ndim:
            raise ValueError(f"{name}: input shape {tuple(input_shape)} has fewer than {ndim} axes")
        size = 1
        for s in input_shape[len(input_shape) - ndim:]:
            size *= s
        return tuple(input_shape[: len(input_shape) - ndim]) + (size,), ()

    def forward(params, z):
        if z.ndim < ndim:
            raise ValueError(f"{name}: input of shape {z.shape} has fewer than {ndim} axes")
        example_shape = _StaticShape(z.shape[z.ndim - ndim:])
        return z.reshape(z.shape[: z.ndim - ndim] + (-1,)), example_shape

    def backward(params, example_shape, v):
        return (), v.reshape(v.shape[:-1] + example_shape.shape)

    def sq_norms(params, example_shape, v):
        return jnp.zeros((), v.dtype), backward(params, example_shape, v)[1]

    return make_layer(name, init, forward, backward, sq_norms)


@jax.tree_util.register_static
class _StaticShape:
    """A per-example shape kept in residuals as static data (a pytree with no leaves)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __hash__(self):
        return hash(self.shape)

    def __eq__(self, other):
        return isinstance(other, _StaticShape) and other.shape == self.shape


# --- structured layers: convolution, pooling, normalization -------------------------


def _conv_layer(n: int, channels: int, kernel_size, stride, padding, dilation, bias: bool
                ) -> Layer:
    fwd, bwd = (conv.conv1d_fwd, conv.conv1d_bwd) if n == 1 else (conv.conv2d_fwd, conv.conv2d_bwd)
    check = conv.conv1d if n == 1 else conv.conv2d
    kernel = (kernel_size,) * n if isinstance(kernel_size, int) else tuple(kernel_size)
    name = f"conv{n}d({channels}, {kernel_size})"
    # He initialization with fan-in k * C (kh * kw * C for 2-D).
    initializer = _normal_init(2.0, "fan_in", in_axis=tuple(range(n + 1)), out_axis=n + 1)

    def init(key, input_shape, dtype=jnp.float32):
        if len(input_shape) < n + 1:
            raise ValueError(f"{name}: needs per-example inputs of shape "
                             f"({'m, ' if n == 1 else 'H, W, '}C), got {tuple(input_shape)}")
        w = initializer(key, kernel + (input_shape[-1], channels), dtype)
        params = {"w": w, "b": jnp.zeros((channels,), dtype)} if bias else {"w": w}
        output_shape = jax.eval_shape(
            lambda z: check(z, w, params.get("b"), stride=stride, padding=padding,
                            dilation=dilation),
            jax.ShapeDtypeStruct(tuple(input_shape), dtype)).shape
        return output_shape, params

    def forward(params, z):
        # The public rule validates shapes and settings at trace time (its
        # messages name the argument); the stored forward follows.
        jax.eval_shape(lambda z, p: check(z, p["w"], p.get("b"), stride=stride,
                                          padding=padding, dilation=dilation), z, params)
        return fwd(z, params["w"], params.get("b"), stride=stride, padding=padding,
                   dilation=dilation)

    def backward(params, residuals, v):
        dz, dw, db = bwd(residuals, v, stride=stride, padding=padding, dilation=dilation)
        return ({"w": dw, "b": db} if bias else {"w": dw}), dz

    return make_layer(name, init, forward, backward)


def Conv1D(channels: int, kernel_size: int, *, stride=1, padding="same", dilation=1,
           bias: bool = True) -> Layer:
    """Conv1D as a layer (eqs. 7.48-7.50): params ``{"w": (k, C, C2), "b": (C2,)}``.

    Inputs are (..., m, C), channels last; settings as :func:`fnbp.conv1d`.
    Filters use He initialization (fan-in k C), the bias starts at 0.
    """
    return _conv_layer(1, channels, kernel_size, stride, padding, dilation, bias)


def Conv2D(channels: int, kernel_size, *, stride=1, padding="same", dilation=1,
           bias: bool = True) -> Layer:
    """Conv2D as a layer (eq. 7.51): params ``{"w": (kh, kw, C, C2), "b": (C2,)}``.

    Inputs are (..., H, W, C), channels last; settings as :func:`fnbp.conv2d`.
    Filters use He initialization (fan-in kh kw C), the bias starts at 0.
    """
    return _conv_layer(2, channels, kernel_size, stride, padding, dilation, bias)


def _pool_layer(kind: str, window, stride) -> Layer:
    fwd, bwd, check = {
        "max": (pooling.max_pool_fwd, pooling.max_pool_bwd, pooling.max_pool),
        "avg": (pooling.avg_pool_fwd, pooling.avg_pool_bwd, pooling.avg_pool),
    }[kind]
    name = f"{kind}_pool({window})"

    def init(key, input_shape, dtype=jnp.float32):
        shape = jax.eval_shape(lambda z: check(z, window, stride),
                               jax.ShapeDtypeStruct(tuple(input_shape), dtype)).shape
        return shape, ()

    def forward(params, z):
        jax.eval_shape(lambda z: check(z, window, stride), z)
        return fwd(z, window=window, stride=stride)

    def backward(params, residuals, v):
        return (), bwd(residuals, v, window=window, stride=stride)[0]

    def sq_norms(params, residuals, v):
        return jnp.zeros((), v.dtype), backward(params, residuals, v)[1]

    return make_layer(name, init, forward, backward, sq_norms)


def MaxPool(window, stride=None) -> Layer:
    """Max pooling over the spatial axes (see :func:`fnbp.max_pool`); no params."""
    return _pool_layer("max", window, stride)


def AvgPool(window, stride=None) -> Layer:
    """Average pooling over the spatial axes (see :func:`fnbp.avg_pool`); no params."""
    return _pool_layer("avg", window, stride)


def LayerNorm(eps: float = 1e-5, *, per_feature: bool = True) -> Layer:
    """LN(z) = beta + gamma * LN-S(z) over the last axis (eq. 7.41) as a layer.

    Params ``{"gamma", "beta"}``: vectors of the last axis' length
    (``per_feature=True``, common practice) or scalars (the notes), starting at
    gamma = 1, beta = 0. ``eps`` is a fixed setting (not trained).
    """
    name = f"layer_norm(eps={eps})"

    def init(key, input_shape, dtype=jnp.float32):
        shape = (input_shape[-1],) if per_feature else ()
        return tuple(input_shape), {"gamma": jnp.ones(shape, dtype), "beta": jnp.zeros(shape, dtype)}

    def forward(params, z):
        gamma, beta = params["gamma"], params["beta"]
        eps_z = jnp.asarray(eps, z.dtype)
        jax.eval_shape(normalization.layer_norm, z, gamma, beta, eps_z)
        return normalization.layer_norm_fwd(z, gamma, beta, eps_z)

    def backward(params, residuals, v):
        dz, dgamma, dbeta, _ = normalization.layer_norm_bwd(residuals, v)
        return {"gamma": dgamma, "beta": dbeta}, dz

    return make_layer(name, init, forward, backward)


def RMSNorm(eps: float = 1e-6) -> Layer:
    """RMSNorm(z) = gamma * z / sqrt(mean(z^2) + eps) over the last axis, as a layer.

    Params ``{"gamma": (m,)}`` starting at 1; ``eps`` is a fixed setting.
    """
    name = f"rms_norm(eps={eps})"

    def init(key, input_shape, dtype=jnp.float32):
        return tuple(input_shape), {"gamma": jnp.ones((input_shape[-1],), dtype)}

    def forward(params, z):
        eps_z = jnp.asarray(eps, z.dtype)
        jax.eval_shape(normalization.rms_norm, z, params["gamma"], eps_z)
        return normalization.rms_norm_fwd(z, params["gamma"], eps_z)

    def backward(params, residuals, v):
        dz, dgamma, _ = normalization.rms_norm_bwd(residuals, v)
        return {"gamma": dgamma}, dz

    return make_layer(name, init, forward, backward)


# --- builders ---------------------------------------------------------------------


def mlp(
    widths: Sequence[int],
    activation: str | Callable | Layer = "relu",
    *,
    remat_every: int = 0,
) -> Layer:
    """The multi-layer perceptron of eq. 7.36: MM, sigma, MM, sigma, ..., MM.

    There is no activation after the last MM. Weights use He initialization for
    ReLU-like activations and Glorot for tanh and sigmoid; biases start at 0.

    Args:
      widths: output width of each MM, e.g. ``[1024, 1024, 10]``; the input
        width comes from ``init``'s input shape.
      activation: name (``"relu"``, ``"gelu"``, ``"tanh"``, ...), the fnbp
        function (``fnbp.relu``) or a Layer.
      remat_every: 0 stores every activation (the notes' Algorithm 3). k > 0
        groups the hidden (MM, sigma) pairs into segments of k pairs and
        stores only each segment's input (:func:`remat`), recomputing the rest
        in the backward pass.

    Returns:
      A :class:`Layer`; ``init(key, (m,))`` gives params, a tuple with one
      entry per MM and activation layer.
    """
    widths = list(widths)
    if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"mlp: widths must be a non-empty list of positive ints, got {widths!r}")
    sigma = activation_layer(activation)
    init = _init_family(sigma)
    hidden = [serial(Linear(w, init=init), sigma, name=f"hidden({w})") for w in widths[:-1]]
    if not isinstance(remat_every, int) or isinstance(remat_every, bool) or remat_every < 0:
        raise ValueError(f"mlp: remat_every must be an int >= 0, got {remat_every!r}")
    if remat_every:
        hidden = [
            remat(serial(*hidden[i:i + remat_every], name="segment"))
            for i in range(0, len(hidden), remat_every)
        ]
        return serial(*hidden, Linear(widths[-1], init=init), name="mlp")
    layers = []
    for w in widths[:-1]:
        layers += [Linear(w, init=init), sigma]
    return serial(*layers, Linear(widths[-1], init=init), name="mlp")


def resnet_s(
    width: int,
    depth: int,
    num_outputs: int,
    activation: str | Callable | Layer = "relu",
) -> Layer:
    """ResNet-S (eq. 7.39): MM(Res(Res(... Res(MM_in(x))))).

    Each Res(z) = z + sigma(MM(sigma(MM(z)))) (eq. 7.38) keeps the width.
    An input MM maps x to ``width`` so the blocks fit inputs of any width;
    the final MM maps to ``num_outputs``.

    Args:
      width: width of the residual stream and of each block's hidden MM.
      depth: number of Res blocks (>= 1).
      num_outputs: output width.
      activation: as in :func:`mlp`.
    """
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"resnet_s: depth must be a positive int, got {depth!r}")
    sigma = activation_layer(activation)
    init = _init_family(sigma)
    blocks = [
        residual(serial(Linear(width, init=init), sigma, Linear(width, init=init), sigma,
                        name="block"))
        for _ in range(depth)
    ]
    return serial(Linear(width, init=init), *blocks, Linear(num_outputs, init=init),
                  name="resnet_s")


def cnn(
    num_classes: int,
    channels: Sequence[int] = (16, 32),
    *,
    kernel_size: int = 3,
    pool: int = 2,
    activation: str | Callable | Layer = "relu",
) -> Layer:
    """A small convolutional network for channels-last images (H, W, C).

    For each entry c of ``channels``: Conv2D(c, kernel_size, "same"), the
    activation, MaxPool(pool); then Flatten and one MM to ``num_classes``
    (Section 7.3's Conv2D, eq. 7.51, followed by eq. 7.35).

    Args:
      num_classes: output width (logits).
      channels: output channels of each convolution stage.
      kernel_size: odd kernel size of every convolution.
      pool: window and stride of every max pooling (1 for none).
      activation: as in :func:`mlp`.
    """
    if not channels:
        raise ValueError("cnn: channels must name at least one convolution stage")
    sigma = activation_layer(activation)
    layers = []
    for c in channels:
        layers += [Conv2D(c, kernel_size), sigma]
        if pool > 1:
            layers.append(MaxPool((pool, pool)))
    layers += [Flatten(3), Linear(num_classes, init="glorot")]
    return serial(*layers, name="cnn")
