"""The layers: activations derived from the rule registry, MM, convolution, pooling,
normalization and Flatten (see :mod:`fnbp.nn.layer` for the Layer record)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import Array

from fnbp.nn import _args
from fnbp.nn.layer import Layer, Params, _no_params, _StaticShape, make_layer
from fnbp.rules import conv, linear, normalization, pooling, registry

# --- parameter-free layers: the activations -------------------------------------


def _elementwise_layer(name: str, fwd: Callable, bwd: Callable, jvp: Callable) -> Layer:
    """A layer for an element-wise rule u = sigma(z): B[sigma, z](v) = sigma'(z) (.) v,
    F[sigma, z](t) = sigma'(z) (.) t."""

    def forward(params, z):
        _args.float_input(name, "z", z)  # as the rule's public function refuses it
        return fwd(z)

    def backward(params, residuals, v):
        return (), bwd(residuals, v)[0]

    def tangent(params, residuals, dparams, dz):
        return jvp(residuals, dz)

    return make_layer(name, _no_params, forward, backward, tangent=tangent)


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
    if not isinstance(name, str):
        raise ValueError(
            f"activation must be one of {sorted(_layer_rules())}, the matching "
            f"fnbp function (e.g. fnbp.relu) or a Layer; got {name!r}"
        )
    rule = _layer_rules().get(name)
    if rule is not None:  # the same layer with or without its default settings spelled out
        settings = {**rule.layer.settings, **settings}
    key = (name, tuple(sorted(settings.items())))
    if key not in _RULE_LAYERS:
        _RULE_LAYERS[key] = _make_rule_layer(name, **settings)
    return _RULE_LAYERS[key]


def _make_rule_layer(name: str, **settings: Any) -> Layer:
    rules = _layer_rules()
    if name not in rules:
        raise ValueError(
            f"activation must be one of {sorted(rules)}, the matching fnbp "
            f"function (e.g. fnbp.relu) or a Layer; got {name!r}"
        )
    rule = rules[name]
    spec = rule.layer
    factory = spec.factory or name
    unknown = sorted(set(settings) - set(spec.settings))
    if unknown:
        raise ValueError(
            f"{factory}: unknown settings {unknown}; it takes {sorted(spec.settings) or 'none'}"
        )
    values = {**spec.settings, **settings}
    static = {k: v for k, v in values.items() if k not in spec.arrays}

    def arrays(z):
        return [jnp.asarray(values[k], z.dtype) for k in spec.arrays]

    try:  # the rule's own validation of the settings, once, at construction
        concrete = [jnp.asarray(values[k], jnp.float32) for k in spec.arrays]
        jax.eval_shape(
            lambda z: rule.function(z, *concrete, **static), jax.ShapeDtypeStruct((1,), jnp.float32)
        )
    except (TypeError, ValueError) as err:
        raise type(err)(f"{factory}: {err}") from None
    label = name + (f"({', '.join(f'{k}={v}' for k, v in values.items())})" if values else "")
    return _elementwise_layer(
        label,
        lambda z: rule.fwd(z, *arrays(z), **static),
        lambda res, v: rule.bwd(res, v, **static),
        lambda res, t: rule.jvp(res, (t,) + (None,) * len(spec.arrays), **static),
    )


def _layer_rules() -> dict:
    """The rules that have a parameter-free layer, by name (from the registry)."""
    return {name: rule for name, rule in registry().items() if rule.layer is not None}


def Relu() -> Layer:
    """ReLU layer (eq. 7.11); no params."""
    return rule_layer("relu")


def Sigmoid() -> Layer:
    """Sigmoid layer (eq. 7.24); no params."""
    return rule_layer("sigmoid")


def Tanh() -> Layer:
    """Tanh layer (eq. 7.25); no params."""
    return rule_layer("tanh")


def Silu() -> Layer:
    """SiLU layer u = z sigmoid(z); no params."""
    return rule_layer("silu")


def Elu(alpha: float = 1.0) -> Layer:
    """ELU layer with a fixed ``alpha`` > 0; no params."""
    return rule_layer("elu", alpha=alpha)


def Softmax() -> Layer:
    """Softmax over the last axis as a layer, B(v) = s (.) (v - <s, v>); no params."""
    return rule_layer("softmax")


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


_INITS = ("glorot", "he", "lecun")


def _init_family(caller: str, layer: Layer, init: str | None = None) -> str:
    """The MM initialization before the activation ``layer``.

    ``init`` when given; else the declared rule's family (``"he"`` for
    ReLU-like rules, ``"glorot"`` for tanh/sigmoid). A Layer of the user's own
    has no declared family, so ``init`` must be given for it.
    """
    if init is not None:
        if init not in _INITS:
            raise ValueError(f"{caller}: init must be one of {list(_INITS)}, got {init!r}")
        return init
    if any(layer is known for known in _RULE_LAYERS.values()):
        rule = _layer_rules()[_activation_name(layer)]
        if rule.init is not None:
            return rule.init
    raise ValueError(
        f"{caller}: the activation {layer.name!r} is not a declared rule's layer, so its "
        f"initialization family is unknown; pass init='he' (ReLU-like: variance 2/fan_in), "
        f"init='glorot' (tanh/sigmoid-like: 2/(fan_in + fan_out)) or init='lecun' "
        f"(1/fan_in)"
    )


def _activation_name(layer: Layer) -> str:
    return layer.name.split("(")[0]


# --- per-example hooks of the rules, per parameter leaf ------------------------------


def _per_example_hooks(
    rule: str, names: tuple, backward: Callable, **settings: Any
) -> dict[str, Callable | None]:
    """A layer's per-example and curvature hooks from its rule's, as make_layer's keywords.

    A rule M(z, p_1, ..., p_k) declares ``hooks["sq_norms"](res, v, **settings)``
    and ``hooks["sq_grads"](...)``, each returning one entry per argument after
    z (``None`` for an absent bias or a fixed setting such as eps), and
    optionally ``hooks["grads"]`` and ``hooks["moments"]`` (the per-example
    gradients its ``sq_norms`` materializes, and ``(sum_i g_i, sum_i g_i (.)
    g_i)`` where its ``sq_grads`` does; ``None`` elsewhere),
    ``hooks["diag_ggn"](res, columns, ...)`` (per argument, as ``sq_grads``)
    and ``hooks["kfac"](res, columns, ...) -> (A, B)``. ``names`` gives the
    layer's params key of each argument (``None`` for a setting). The
    layer's dz is its ``backward``'s (under ``jax.jit`` the unused parameter
    cotangents of that call are dead code). A rule without a hook gives
    ``None``: for ``sq_norms``/``sq_grads`` the per-example engine then
    materializes the gradients; without ``grads``/``moments`` it contracts
    with the backward as usual; without ``diag_ggn`` the curvature pass
    calls ``sq_grads`` per column; without ``kfac`` the layer has no factors.
    """
    hooks = registry()[rule].hooks

    def as_params(params, values):
        return {
            name: value for name, value in zip(names, values) if name is not None and name in params
        }

    def per_leaf(hook):
        if hook not in hooks:
            return None
        return lambda params, residuals, v: as_params(params, hooks[hook](residuals, v, **settings))

    sq_norms = None
    if "sq_norms" in hooks:

        def sq_norms(params, residuals, v):
            sq = hooks["sq_norms"](residuals, v, **settings)
            return as_params(params, sq), backward(params, residuals, v)[1]

    kfac = None
    if "kfac" in hooks:

        def kfac(params, residuals, columns):
            return hooks["kfac"](residuals, columns, **settings)

    return {
        "sq_norms": sq_norms,
        "sq_grads": per_leaf("sq_grads"),
        "grads": per_leaf("grads"),
        "moments": per_leaf("moments"),
        "diag_ggn": per_leaf("diag_ggn"),
        "kfac": kfac,
    }


# --- MM (linear) ------------------------------------------------------------------


def _normal_init(scale: float, mode: Literal["fan_in", "fan_out", "fan_avg"], in_axis, out_axis):
    """Variance-scaling initializer with a plain (untruncated) normal.

    He: variance 2 / fan_in; Glorot: 2 / (fan_in + fan_out); LeCun: 1 / fan_in.
    A plain normal compiles much faster than the truncated one and keeps the
    stated variance exactly.
    """
    return jax.nn.initializers.variance_scaling(
        scale, mode, "normal", in_axis=in_axis, out_axis=out_axis
    )


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

    Raises:
      ValueError: ``n`` not a positive int, an unknown ``init``.
      TypeError: ``bias`` not a bool; in the forward pass, a non-floating
        input (as :func:`fnbp.mm` refuses it).
    """
    n = _args.positive_int("Linear", "n", n, "the output width")
    bias = _args.flag("Linear", "bias", bias)
    initializers = {
        "he": _normal_init(2.0, "fan_in", in_axis=-1, out_axis=-2),
        "glorot": _normal_init(1.0, "fan_avg", in_axis=-1, out_axis=-2),
        "lecun": _normal_init(1.0, "fan_in", in_axis=-1, out_axis=-2),
    }
    if not isinstance(init, str) or init not in initializers:
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

    def tangent(params, residuals, dparams, dz):
        return linear.mm_jvp(residuals, (dz, dparams["W"], dparams.get("b")))

    return make_layer(
        name,
        init_fn,
        forward,
        backward,
        **_per_example_hooks("mm", ("W", "b"), backward),
        tangent=tangent,
    )


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
            + f"; expected W of shape ({n}, m)"
            + (f" and b of shape ({n},)" if bias else "")
        )
    _args.float_input(name, "z", z)  # as fnbp.mm refuses it
    if jnp.ndim(z) < 1 or z.shape[-1] != W.shape[1]:
        raise ValueError(
            f"{name}: input has shape {jnp.shape(z)} but W.shape={W.shape} expects "
            f"{W.shape[1]} features in the last axis; pass inputs of shape (..., {W.shape[1]})"
        )


def Flatten(ndim: int) -> Layer:
    """Flatten the last ``ndim`` (per-example) axes into one: (..., H, W, C) -> (..., H W C)."""
    ndim = _args.positive_int("Flatten", "ndim", ndim, "the number of trailing axes to flatten")
    name = f"flatten({ndim})"

    def init(key, input_shape, dtype=jnp.float32):
        if len(input_shape) < ndim:
            raise ValueError(f"{name}: input shape {tuple(input_shape)} has fewer than {ndim} axes")
        size = 1
        for s in input_shape[len(input_shape) - ndim :]:
            size *= s
        return tuple(input_shape[: len(input_shape) - ndim]) + (size,), ()

    def forward(params, z):
        if z.ndim < ndim:
            raise ValueError(f"{name}: input of shape {z.shape} has fewer than {ndim} axes")
        example_shape = _StaticShape(z.shape[z.ndim - ndim :])
        return z.reshape(z.shape[: z.ndim - ndim] + (-1,)), example_shape

    def backward(params, example_shape, v):
        return (), v.reshape(v.shape[:-1] + example_shape.shape)

    def tangent(params, example_shape, dparams, dz):
        return dz.reshape(dz.shape[: dz.ndim - ndim] + (-1,))

    return make_layer(name, init, forward, backward, tangent=tangent)


# --- structured layers: convolution, pooling, normalization -------------------------


def _conv_layer(n: int, channels: int, kernel_size, stride, padding, dilation, bias: bool) -> Layer:
    fwd, bwd, jvp = (
        (conv.conv1d_fwd, conv.conv1d_bwd, conv.conv1d_jvp)
        if n == 1
        else (conv.conv2d_fwd, conv.conv2d_bwd, conv.conv2d_jvp)
    )
    check = conv.conv1d if n == 1 else conv.conv2d
    factory = f"Conv{n}D"
    channels = _args.positive_int(factory, "channels", channels, "the number of output channels")
    kernel = _args.positive_ints(
        factory, "kernel_size", kernel_size, n, "the filter's size along each spatial axis"
    )
    _args.positive_ints(factory, "stride", stride, n)
    dilated = _args.positive_ints(factory, "dilation", dilation, n)
    bias = _args.flag(factory, "bias", bias)
    spatial = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilated))
    try:  # the rule's own checks of the settings (padding, ...), once, on an input that fits
        jax.eval_shape(
            lambda z, w: check(z, w, stride=stride, padding=padding, dilation=dilation),
            jax.ShapeDtypeStruct(spatial + (1,), jnp.float32),
            jax.ShapeDtypeStruct(kernel + (1, channels), jnp.float32),
        )
    except (TypeError, ValueError) as err:
        raise type(err)(f"{factory}: {err}") from None
    name = f"conv{n}d({channels}, {kernel_size})"
    # He initialization with fan-in k * C (kh * kw * C for 2-D).
    initializer = _normal_init(2.0, "fan_in", in_axis=tuple(range(n + 1)), out_axis=n + 1)

    def init(key, input_shape, dtype=jnp.float32):
        if len(input_shape) < n + 1:
            raise ValueError(
                f"{name}: needs per-example inputs of shape "
                f"({'m, ' if n == 1 else 'H, W, '}C), got {tuple(input_shape)}"
            )
        w = initializer(key, kernel + (input_shape[-1], channels), dtype)
        params = {"w": w, "b": jnp.zeros((channels,), dtype)} if bias else {"w": w}
        output_shape = jax.eval_shape(
            lambda z: check(
                z, w, params.get("b"), stride=stride, padding=padding, dilation=dilation
            ),
            jax.ShapeDtypeStruct(tuple(input_shape), dtype),
        ).shape
        return output_shape, params

    def forward(params, z):
        # The public rule validates shapes and settings at trace time (its
        # messages name the argument); the stored forward follows.
        jax.eval_shape(
            lambda z, p: check(
                z, p["w"], p.get("b"), stride=stride, padding=padding, dilation=dilation
            ),
            z,
            params,
        )
        return fwd(
            z, params["w"], params.get("b"), stride=stride, padding=padding, dilation=dilation
        )

    def backward(params, residuals, v):
        dz, dw, db = bwd(residuals, v, stride=stride, padding=padding, dilation=dilation)
        return ({"w": dw, "b": db} if bias else {"w": dw}), dz

    def tangent(params, residuals, dparams, dz):
        t = (dz, dparams["w"], dparams.get("b"))
        return jvp(residuals, t, stride=stride, padding=padding, dilation=dilation)

    return make_layer(
        name,
        init,
        forward,
        backward,
        **_per_example_hooks(
            f"conv{n}d", ("w", "b"), backward, stride=stride, padding=padding, dilation=dilation
        ),
        tangent=tangent,
    )


def Conv1D(
    channels: int, kernel_size: int, *, stride=1, padding="same", dilation=1, bias: bool = True
) -> Layer:
    """Conv1D as a layer (eqs. 7.48-7.50): params ``{"w": (k, C, C2), "b": (C2,)}``.

    Inputs are (..., m, C), channels last; settings as :func:`fnbp.conv1d`.
    Filters use He initialization (fan-in k C), the bias starts at 0.

    Raises:
      ValueError: ``channels``, ``kernel_size``, ``stride`` or ``dilation``
        not a positive int (or tuple of them), or a setting :func:`fnbp.conv1d`
        refuses (its message, after ``Conv1D:``); checked at construction.
      TypeError: ``bias`` not a bool.
    """
    return _conv_layer(1, channels, kernel_size, stride, padding, dilation, bias)


def Conv2D(
    channels: int, kernel_size, *, stride=1, padding="same", dilation=1, bias: bool = True
) -> Layer:
    """Conv2D as a layer (eq. 7.51): params ``{"w": (kh, kw, C, C2), "b": (C2,)}``.

    Inputs are (..., H, W, C), channels last; settings as :func:`fnbp.conv2d`.
    Filters use He initialization (fan-in kh kw C), the bias starts at 0.

    Raises:
      ValueError: ``channels`` not a positive int, ``kernel_size``,
        ``stride`` or ``dilation`` not a positive int or a pair of them, or a
        setting :func:`fnbp.conv2d` refuses (its message, after ``Conv2D:``);
        checked at construction.
      TypeError: ``bias`` not a bool.
    """
    return _conv_layer(2, channels, kernel_size, stride, padding, dilation, bias)


def _pool_layer(kind: str, window, stride) -> Layer:
    fwd, bwd, check = {
        "max": (pooling.max_pool_fwd, pooling.max_pool_bwd, pooling.max_pool),
        "avg": (pooling.avg_pool_fwd, pooling.avg_pool_bwd, pooling.avg_pool),
    }[kind]
    jvp = {"max": pooling.max_pool_jvp, "avg": pooling.avg_pool_jvp}[kind]
    factory = {"max": "MaxPool", "avg": "AvgPool"}[kind]
    if not (_args.is_int(window) or isinstance(window, (tuple, list)) and len(window) in (1, 2)):
        raise ValueError(
            f"{factory}: window must be a positive int (1-D pooling) or a tuple of "
            f"1 or 2 positive ints (1-D or 2-D pooling), got {window!r}"
        )
    axes = 1 if _args.is_int(window) else len(window)
    _args.positive_ints(factory, "window", window, axes)
    if stride is not None:
        _args.positive_ints(
            factory,
            "stride",
            stride,
            axes,
            "the step between windows: None for non-overlapping ones",
        )
    name = f"{kind}_pool({window})"

    def init(key, input_shape, dtype=jnp.float32):
        shape = jax.eval_shape(
            lambda z: check(z, window, stride), jax.ShapeDtypeStruct(tuple(input_shape), dtype)
        ).shape
        return shape, ()

    def forward(params, z):
        jax.eval_shape(lambda z: check(z, window, stride), z)
        return fwd(z, window=window, stride=stride)

    def backward(params, residuals, v):
        return (), bwd(residuals, v, window=window, stride=stride)[0]

    def tangent(params, residuals, dparams, dz):
        return jvp(residuals, (dz,), window=window, stride=stride)

    return make_layer(name, init, forward, backward, tangent=tangent)


def MaxPool(window, stride=None) -> Layer:
    """Max pooling over the spatial axes (see :func:`fnbp.max_pool`); no params.

    ``window`` a positive int (1-D) or a tuple of 1 or 2 (1-D or 2-D),
    ``stride`` None (= window) or the same form; refused otherwise
    (``ValueError``) at construction.
    """
    return _pool_layer("max", window, stride)


def AvgPool(window, stride=None) -> Layer:
    """Average pooling over the spatial axes (see :func:`fnbp.avg_pool`); no params.

    ``window`` and ``stride`` as :func:`MaxPool`'s.
    """
    return _pool_layer("avg", window, stride)


def LayerNorm(eps: float = 1e-5, *, per_feature: bool = True) -> Layer:
    """LN(z) = beta + gamma * LN-S(z) over the last axis (eq. 7.41) as a layer.

    Params ``{"gamma", "beta"}``: vectors of the last axis' length
    (``per_feature=True``, common practice) or scalars (the notes), starting at
    gamma = 1, beta = 0. ``eps`` is a fixed setting (not trained).

    Raises:
      ValueError: ``eps`` not a finite number >= 0.
      TypeError: ``eps`` not a number, ``per_feature`` not a bool.
    """
    eps = _args.non_negative_float(
        "LayerNorm", "eps", eps, "added to the variance: 0 for the notes' exact form"
    )
    per_feature = _args.flag("LayerNorm", "per_feature", per_feature)
    name = f"layer_norm(eps={eps})"

    def init(key, input_shape, dtype=jnp.float32):
        _normalized_axis(name, input_shape)
        shape = (input_shape[-1],) if per_feature else ()
        return tuple(input_shape), {
            "gamma": jnp.ones(shape, dtype),
            "beta": jnp.zeros(shape, dtype),
        }

    def forward(params, z):
        gamma, beta = params["gamma"], params["beta"]
        eps_z = jnp.asarray(eps, z.dtype)
        jax.eval_shape(normalization.layer_norm, z, gamma, beta, eps_z)
        return normalization.layer_norm_fwd(z, gamma, beta, eps_z)

    def backward(params, residuals, v):
        dz, dgamma, dbeta, _ = normalization.layer_norm_bwd(residuals, v)
        return {"gamma": dgamma, "beta": dbeta}, dz

    def tangent(params, residuals, dparams, dz):
        t = (dz, dparams["gamma"], dparams["beta"], None)  # eps is a fixed setting
        return normalization.layer_norm_jvp(residuals, t)

    return make_layer(
        name,
        init,
        forward,
        backward,
        **_per_example_hooks("layer_norm", ("gamma", "beta", None), backward),
        tangent=tangent,
    )


def RMSNorm(eps: float = 1e-6) -> Layer:
    """RMSNorm(z) = gamma * z / sqrt(mean(z^2) + eps) over the last axis, as a layer.

    Params ``{"gamma": (m,)}`` starting at 1; ``eps`` is a fixed setting.

    Raises:
      ValueError: ``eps`` not a finite number >= 0.
      TypeError: ``eps`` not a number.
    """
    eps = _args.non_negative_float(
        "RMSNorm", "eps", eps, "added to the mean square: 0 for the exact form"
    )
    name = f"rms_norm(eps={eps})"

    def init(key, input_shape, dtype=jnp.float32):
        _normalized_axis(name, input_shape)
        return tuple(input_shape), {"gamma": jnp.ones((input_shape[-1],), dtype)}

    def forward(params, z):
        eps_z = jnp.asarray(eps, z.dtype)
        jax.eval_shape(normalization.rms_norm, z, params["gamma"], eps_z)
        return normalization.rms_norm_fwd(z, params["gamma"], eps_z)

    def backward(params, residuals, v):
        dz, dgamma, _ = normalization.rms_norm_bwd(residuals, v)
        return {"gamma": dgamma}, dz

    def tangent(params, residuals, dparams, dz):
        return normalization.rms_norm_jvp(residuals, (dz, dparams["gamma"], None))

    return make_layer(
        name,
        init,
        forward,
        backward,
        **_per_example_hooks("rms_norm", ("gamma", None), backward),
        tangent=tangent,
    )


def _normalized_axis(name: str, input_shape: tuple) -> None:
    if len(input_shape) < 1:
        raise ValueError(
            f"{name}: needs per-example inputs of shape (..., m), the last axis "
            f"normalized, got {tuple(input_shape)}"
        )
