"""Independent plain-jnp reference networks, and the fnbp models they mirror.

Shared by the per-example tests (tests/test_per_example.py) and the
curvature tests (tests/test_curvature.py). Each reference reads the
parameter pytree that ``model.init`` makes and is written with jnp alone,
independently of fnbp; its autodiff (vmap of grad, jacrev, hessian) is the
oracle. :data:`CASES` names each model with its reference, its example
shape and its labels' shape per example; :func:`problem` draws one batch
and float64 parameters for a case.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import fnbp
from fnbp._compile import fast_compile_options

# The verifier's fast CPU compile options without xla_backend_optimization_level=0,
# which gives wrong gradients for the 1-D cnn oracle below on XLA:CPU (jax 0.10 and
# 0.12); the other two only skip work.
COMPILE = fast_compile_options(
    options={"xla_llvm_disable_expensive_passes": True, "xla_cpu_use_fusion_emitters": False}
)

N, K = 6, 3


# --- the independent reference networks -------------------------------------------------


def relu(z):
    return jnp.where(z > 0, z, 0.0)


def tanh(z):
    return (jnp.exp(2 * z) - 1.0) / (jnp.exp(2 * z) + 1.0)


def ref_mm(p, z):
    """W z + b per example (eq. 7.35), for any leading axes."""
    return jnp.einsum("...m,nm->...n", z, p["W"]) + p["b"]


def ref_mlp(params, x, sigma=relu):
    """MM, sigma, ..., MM (eq. 7.36); params (mm, (), mm, ..., mm)."""
    linears = params[0::2]
    for i, p in enumerate(linears):
        x = ref_mm(p, x)
        x = sigma(x) if i < len(linears) - 1 else x
    return x


def ref_remat_mlp(params, x):
    """fnbp.mlp(..., remat_every=1): ((mm, relu),), ..., mm."""
    for ((p, _),) in params[:-1]:
        x = relu(ref_mm(p, x))
    return ref_mm(params[-1], x)


def ref_resnet_s(params, x):
    """MM(Res(... Res(MM_in(x)))) with Res(z) = z + relu(MM(relu(MM(z)))) (7.38, 7.39)."""
    h = ref_mm(params[0], x)
    for first, _, second, _ in params[1:-1]:
        h = h + relu(ref_mm(second, relu(ref_mm(first, h))))
    return ref_mm(params[-1], h)


def ref_conv(p, z):
    """Cross-correlation with 'same' zero padding, channels last (eqs. 7.48-7.51)."""
    w = p["w"]
    k = w.shape[:-2]
    out = jnp.zeros(z.shape[:-1] + (w.shape[-1],), z.dtype)
    pad = [(0, 0)] + [(s // 2, s // 2) for s in k] + [(0, 0)]
    zp = jnp.pad(z, pad)
    for offset in np.ndindex(*k):
        window = zp[(slice(None),) + tuple(slice(o, o + n) for o, n in zip(offset, z.shape[1:-1]))]
        out = out + jnp.einsum("...c,cd->...d", window, w[offset])
    return out + p["b"]


def ref_max_pool(z):
    """Max over 2-wide windows of stride 2 along each spatial axis."""
    spatial = z.ndim - 2
    shape = [z.shape[0]]
    for s in z.shape[1:-1]:
        shape += [s // 2, 2]
    z = z.reshape(shape + [z.shape[-1]])
    return jnp.max(z, axis=tuple(2 + 2 * i for i in range(spatial)))


def ref_cnn(params, x):
    """fnbp.cnn(K, (3, 4)): [conv, relu, max pool] x 2, flatten, MM; a 1-D signal gets a channel."""
    if x.ndim == 2:  # a signal (n, L): channel_axis, no params
        x, params = x[..., None], params[1:]
    conv1, _, _, conv2, _, _, _, last = params
    h = ref_max_pool(relu(ref_conv(conv1, x)))
    h = ref_max_pool(relu(ref_conv(conv2, h)))
    return ref_mm(last, h.reshape(h.shape[0], -1))


def ref_norms_net(params, x, eps_ln=1e-5, eps_rms=1e-6):
    """MM, LayerNorm (7.41, per feature), tanh, MM, RMSNorm, relu, MM."""
    first, ln, _, second, rms, _, last = params
    h = ref_mm(first, x)
    mu = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean((h - mu) ** 2, axis=-1, keepdims=True)
    h = tanh(ln["beta"] + ln["gamma"] * (h - mu) / jnp.sqrt(var + eps_ln))
    h = ref_mm(second, h)
    h = relu(rms["gamma"] * h / jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps_rms))
    return ref_mm(last, h)


def ref_scaled(params, x):
    """MM, tanh, u = a (.) z (a layer with no rules), MM."""
    first, _, scale, last = params
    return ref_mm(last, scale["a"] * tanh(ref_mm(first, x)))


def ref_cross_entropy(t, y):
    top = jnp.max(t, axis=-1, keepdims=True)
    log_z = top[..., 0] + jnp.log(jnp.sum(jnp.exp(t - top), axis=-1))
    return log_z - jnp.take_along_axis(t, y[..., None], axis=-1)[..., 0]


# --- fnbp's side: a layer without rules, the cases -----------------------------------------


def scale_layer(name: str) -> fnbp.Layer:
    """u = a (.) z with a learned per-feature a, written with no sq_norms/sq_grads."""

    def init(key, input_shape, dtype=jnp.float32):
        return tuple(input_shape), {"a": jnp.full(input_shape[-1:], 1.5, dtype)}

    def forward(params, z):
        return params["a"] * z, z

    def backward(params, z, v):
        return {"a": jnp.sum(v * z, axis=tuple(range(v.ndim - 1)))}, params["a"] * v

    return fnbp.make_layer(name, init, forward, backward)


def seq_mlp(hidden: int) -> fnbp.Layer:
    return fnbp.serial(fnbp.Linear(hidden), fnbp.Tanh(), fnbp.Linear(K), name="seq")


# name: (model, reference, example shape, labels per example)
CASES = {
    "mlp": (fnbp.mlp([5, 4, K]), ref_mlp, (4,), ()),
    "cnn-2d": (fnbp.cnn(K, (3, 4)), ref_cnn, (4, 4, 2), ()),
    "cnn-1d": (fnbp.cnn(K, (3, 4), input_ndim=1), ref_cnn, (8,), ()),
    "resnet_s": (fnbp.resnet_s(5, 2, K), ref_resnet_s, (4,), ()),
    "layer_norm-rms_norm": (
        fnbp.serial(
            fnbp.Linear(5),
            fnbp.LayerNorm(),
            fnbp.Tanh(),
            fnbp.Linear(5),
            fnbp.RMSNorm(),
            fnbp.Relu(),
            fnbp.Linear(K),
        ),
        ref_norms_net,
        (4,),
        (),
    ),
    # Sequences (n, T, d): MM's rule takes the Gram form when 2 T^2 <= d_in d_out
    # (T = 2: 8 <= 4*6 and 8 <= 6*3), else materializes (T = 5: 50 > 3*4, 50 > 4*3).
    "seq-gram": (seq_mlp(6), functools.partial(ref_mlp, sigma=tanh), (2, 4), (2,)),
    "seq-materialize": (seq_mlp(4), functools.partial(ref_mlp, sigma=tanh), (5, 3), (5,)),
    "remat": (fnbp.mlp([5, 5, K], remat_every=1), ref_remat_mlp, (4,), ()),
}


def random_params(model, example_shape, seed=1):
    """Params shaped as ``model.init`` makes them: W, w ~ N(0, 1/fan_in), b, beta ~ N(0, 0.04),
    gamma ~ N(1, 0.04), drawn with NumPy in float64."""
    shapes = jax.eval_shape(
        lambda key: model.init(key, example_shape, jnp.float64)[1], jax.random.key(0)
    )
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        noise = rng.standard_normal(leaf.shape)
        if name == "['W']":
            return jnp.asarray(noise / np.sqrt(leaf.shape[1]))
        if name == "['w']":
            return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray((1.0 if name in ("['gamma']", "['a']") else 0.0) + 0.2 * noise)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def problem(case: str):
    model, ref, shape, label_shape = CASES[case]
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((N,) + shape))
    y = jnp.asarray(rng.integers(0, K, (N,) + label_shape), jnp.int32)
    return model, ref, random_params(model, shape), x, y
