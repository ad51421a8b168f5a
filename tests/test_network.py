"""Layers, combinators and builders: fnbp.serial, residual, remat, Flatten, make_layer, mlp.

Gradients are checked against ``jax.grad`` of plain-jnp references written
below, independently of fnbp, reading the same parameter pytrees; float64,
relative error <= 1e-10 (``max|got - want| / max|want|`` per array). Remat is
checked against the same network without it, and the memory it saves is
measured on the residuals ``model.forward`` stores.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import rel_err

import fnbp
from fnbp.nn.layer import MissingRuleError

F64_RTOL = 1e-10
D_IN, WIDTH, K, N = 5, 7, 4, 4
LOSS = fnbp.cross_entropy_loss


# --- plain-jnp references ----------------------------------------------------------


def ref_mm(p, z):
    return jnp.einsum("...m,nm->...n", z, p["W"]) + p["b"]


def ref_tanh(z):
    return (jnp.exp(2 * z) - 1.0) / (jnp.exp(2 * z) + 1.0)


def ref_relu(z):
    return jnp.where(z > 0, z, 0.0)


def ref_cross_entropy(t, y):
    top = jnp.max(t, axis=-1, keepdims=True)
    log_z = top[..., 0] + jnp.log(jnp.sum(jnp.exp(t - top), axis=-1))
    return log_z - jnp.take_along_axis(t, y[..., None], axis=-1)[..., 0]


def ref_objective(ref, params, x, y):
    return jnp.mean(ref_cross_entropy(ref(params, x), y))


def apply_objective(model, params, x, y):
    return jnp.mean(LOSS(model.apply(params, x), y))


def init(model, input_shape=(D_IN,), seed=1):
    """Params shaped as ``model.init`` makes them, drawn with NumPy (nothing to compile).

    W ~ N(0, 1/m) as fan-in initializers draw it; b ~ N(0, 0.2^2), so biases are
    not zero; other leaves ~ N(1, 0.2^2).
    """
    shapes = jax.eval_shape(
        lambda key: model.init(key, input_shape, jnp.float64)[1], jax.random.key(0)
    )
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) == 2:
            return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[1]))
        if len(leaf.shape) == 1:
            return jnp.asarray(0.2 * rng.standard_normal(leaf.shape))
        return jnp.asarray(1.0 + 0.2 * rng.standard_normal(leaf.shape))

    return jax.tree.map(draw, shapes)


def data(example_shape=(D_IN,), seed=2):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((N,) + example_shape))
    y = jnp.asarray(rng.integers(0, K, N), jnp.int32)
    return x, y


def normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


@functools.partial(jax.jit, static_argnums=(0, 1))
def gradients_and_oracle(model, ref, params, x, y):
    """fnbp's (J, grads) both ways, the oracle's, and per-example norms both ways.

    Each network here is new, so this is compiled whole, once per network.
    """
    _, norms = fnbp.per_example_grad_norms(model, LOSS, params, x, y)
    _, pe_grads = fnbp.per_example_grads(model, LOSS, params, x, y)
    leaves = jax.tree.leaves(pe_grads)
    return {
        "backprop": fnbp.backprop(model, LOSS, params, x, y),
        "apply": jax.value_and_grad(apply_objective, argnums=1)(model, params, x, y),
        "oracle": jax.value_and_grad(ref_objective, argnums=1)(ref, params, x, y),
        "norms": norms,
        "norms of per_example_grads": jnp.sqrt(
            sum(jnp.sum(g * g, axis=tuple(range(1, g.ndim))) for g in leaves)
        ),
    }


def assert_gradients_equal_oracle(model, ref, params, x, y):
    """fnbp.backprop and jax.grad through model.apply against jax.grad of ref; and
    per_example_grad_norms against the norms of per_example_grads."""
    out = gradients_and_oracle(model, ref, params, x, y)
    assert rel_err(out["backprop"], out["oracle"]) <= F64_RTOL
    assert rel_err(out["apply"], out["oracle"]) <= F64_RTOL
    assert rel_err(out["norms"], out["norms of per_example_grads"]) <= F64_RTOL
    return out


# --- builders -----------------------------------------------------------------------


def shapes_of_init(model, input_shape=(D_IN,), *dtype):
    """What model.init returns, as shapes and dtypes (traced, not run)."""
    return jax.eval_shape(lambda key: model.init(key, input_shape, *dtype)[1], jax.random.key(0))


def test_mlp_init_shapes_and_params():
    model = fnbp.mlp([WIDTH, WIDTH, K], "relu")
    out_shape, _ = jax.eval_shape(lambda key: model.init(key, (D_IN,)), jax.random.key(0))
    assert len(out_shape) == 1  # the output shape (K,)
    params = shapes_of_init(model, (D_IN,), jnp.float64)
    assert len(params) == 5 and params[1] == () and params[3] == ()
    assert [p["W"].shape for p in params[0::2]] == [(WIDTH, D_IN), (WIDTH, WIDTH), (K, WIDTH)]
    assert [p["b"].shape for p in params[0::2]] == [(WIDTH,), (WIDTH,), (K,)]
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(params))
    default = shapes_of_init(model)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(default))  # the default
    # leading axes of the input are example axes
    out = jax.eval_shape(model.apply, default, jax.ShapeDtypeStruct((2, 3, D_IN), jnp.float32))
    assert out.shape == (2, 3, K) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "activation, variance",
    [
        ("relu", lambda m, n: 2.0 / m),  # He: ReLU-like activations
        ("gelu", lambda m, n: 2.0 / m),
        ("tanh", lambda m, n: 2.0 / (m + n)),  # Glorot: saturating activations
        ("sigmoid", lambda m, n: 2.0 / (m + n)),
    ],
)
def test_mlp_initializers(activation, variance):
    m, n = 300, 200
    out_shape, params = fnbp.mlp([n, 10], activation).init(jax.random.key(0), (m,))
    assert out_shape == (10,)
    W = np.asarray(params[0]["W"])
    assert W.shape == (n, m)
    assert abs(W.var() / variance(m, n) - 1.0) < 0.05
    assert abs(W.mean()) < 0.01 * np.sqrt(variance(m, n))
    assert not np.any(params[0]["b"]) and not np.any(params[2]["b"])  # biases start at 0


def test_resnet_s_init_shapes_and_params():
    model = fnbp.resnet_s(WIDTH, 2, K, "tanh")
    params = shapes_of_init(model)
    assert len(params) == 4  # MM_in, Res, Res, MM_out
    assert params[0]["W"].shape == (WIDTH, D_IN) and params[-1]["W"].shape == (K, WIDTH)
    for block in params[1:3]:
        first, act1, second, act2 = block
        assert first["W"].shape == second["W"].shape == (WIDTH, WIDTH)
        assert act1 == act2 == ()


def test_activation_given_by_name_function_or_layer_builds_the_same_network():
    x, y = data()
    by_name = fnbp.mlp([WIDTH, K], "gelu")
    params = init(by_name)
    for other in (fnbp.mlp([WIDTH, K], fnbp.gelu), fnbp.mlp([WIDTH, K], fnbp.Gelu())):
        assert rel_err(other.apply(params, x), by_name.apply(params, x)) == 0.0
    assert fnbp.activation_layer("tanh") is fnbp.Tanh()


# --- make_layer: a user's own module -----------------------------------------------


def scale_layer() -> fnbp.Layer:
    """u = a (.) z, a learned per-feature scale: B[., z](v) = a (.) v, B[., a](v) = sum v z."""

    def init(key, input_shape, dtype=jnp.float32):
        return tuple(input_shape), {"a": jnp.full(input_shape[-1:], 1.5, dtype)}

    def forward(params, z):
        return params["a"] * z, z

    def backward(params, z, v):
        da = jnp.sum(v * z, axis=tuple(range(v.ndim - 1)))
        return {"a": da}, params["a"] * v

    return fnbp.make_layer("scale", init, forward, backward)


def straight_through_round() -> fnbp.Layer:
    """u = round(z) with the straight-through rule B(v) = v (not autodiff's 0)."""

    def forward(params, z):
        return jnp.round(z), None

    def backward(params, residuals, v):
        return (), v

    return fnbp.make_layer(
        "round", lambda key, shape, dtype=None: (tuple(shape), ()), forward, backward
    )


@pytest.mark.filterwarnings("ignore::fnbp.PerExampleFallbackWarning")
def test_make_layer_composes_in_serial_and_backprop():
    model = fnbp.serial(fnbp.Linear(WIDTH), scale_layer(), fnbp.Tanh(), fnbp.Linear(K))
    params = init(model)
    assert params[1]["a"].shape == (WIDTH,)
    x, y = data()

    def ref(params, x):
        first, scale, _, last = params
        return ref_mm(last, ref_tanh(scale["a"] * ref_mm(first, x)))

    # with no sq_norms of its own, the norms come from per-example gradients
    u, residuals = model.forward(params, x)
    with pytest.raises(
        MissingRuleError,
        match=r"scale: this layer has parameters but no "
        r"sq_norms rule; give it one with fnbp.make_layer",
    ):
        model.sq_norms(params, residuals, u)
    assert_gradients_equal_oracle(model, ref, params, x, y)


def test_make_layer_rule_is_the_one_used_by_jax_grad_and_backprop():
    # autodiff of round() gives 0; the layer's own rule passes v through
    model = fnbp.serial(fnbp.Linear(WIDTH), straight_through_round(), fnbp.Linear(K))
    params = init(model)
    x, y = data()
    x = 3.0 * x

    def ref(params, x):
        first, _, last = params
        z = ref_mm(first, x)
        return ref_mm(last, z + jax.lax.stop_gradient(jnp.round(z) - z))

    _, grads = assert_gradients_equal_oracle(model, ref, params, x, y)["backprop"]
    assert np.any(grads[0]["W"])


# --- residual -----------------------------------------------------------------------


RES_BLOCK = fnbp.serial(fnbp.Linear(WIDTH), fnbp.Tanh(), fnbp.Linear(D_IN), name="block")
RES = fnbp.residual(RES_BLOCK)


def ref_res(params, z):
    """Res(z) = z + block(z) (eq. 7.38)."""
    first, _, second = params
    return z + ref_mm(second, ref_tanh(ref_mm(first, z)))


@jax.jit
def residual_cotangents(params, z, v):
    u, residuals = RES.forward(params, z)
    u_block, block_residuals = RES_BLOCK.forward(params, z)
    _, ref_vjp = jax.vjp(ref_res, params, z)
    _, apply_vjp = jax.vjp(RES.apply, params, z)
    return {
        "u": u,
        "z + block(z)": z + u_block,
        "backward": RES.backward(params, residuals, v),
        "block backward": RES_BLOCK.backward(params, block_residuals, v),
        "oracle": ref_vjp(v),
        "apply": apply_vjp(v),
        "sq_norms dz": RES.sq_norms(params, residuals, v)[1],
    }


def test_residual_backward_is_v_plus_the_blocks_dz():
    params = init(RES)
    z, _ = data()
    v = normal(z.shape, 4)
    out = residual_cotangents(params, z, v)
    assert rel_err(out["u"], out["z + block(z)"]) <= F64_RTOL
    grads, dz = out["backward"]
    block_grads, block_dz = out["block backward"]
    assert rel_err(grads, block_grads) == 0.0
    assert rel_err(dz, v + block_dz) <= 1e-15
    want_grads, want_dz = out["oracle"]
    assert rel_err(grads, want_grads) <= F64_RTOL and rel_err(dz, want_dz) <= F64_RTOL
    # the same through jax.vjp of apply, and through the sq_norms path
    assert rel_err(out["apply"], (want_grads, want_dz)) <= F64_RTOL
    assert rel_err(out["sq_norms dz"], want_dz) <= F64_RTOL


# --- Flatten ----------------------------------------------------------------------


def test_flatten_round_trips_shapes():
    flat = fnbp.Flatten(2)
    assert flat.init(jax.random.key(0), (3, 4, 5)) == ((3, 20), ())
    z = normal((2, 3, 4, 5), 4)
    u, residuals = flat.forward((), z)
    assert u.shape == (2, 3, 20) and np.array_equal(u, z.reshape(2, 3, 20))
    v = normal(u.shape, 5)
    grads, dz = flat.backward((), residuals, v)
    assert grads == () and dz.shape == z.shape and np.array_equal(dz, v.reshape(z.shape))
    _, vjp = jax.vjp(flat.apply, (), z)
    assert np.array_equal(vjp(v)[1], v.reshape(z.shape))
    assert jax.jit(flat.apply)((), z).shape == (2, 3, 20)


def test_flatten_in_a_network_equals_the_oracle():
    model = fnbp.serial(fnbp.Flatten(2), fnbp.Linear(WIDTH), fnbp.Relu(), fnbp.Linear(K))
    params = init(model, (3, 2))
    x, y = data((3, 2))
    assert jax.eval_shape(model.apply, params, x).shape == (N, K)

    def ref(params, x):
        _, first, _, last = params
        return ref_mm(last, ref_relu(ref_mm(first, x.reshape(x.shape[0], 6))))

    u, residuals = model.forward(params, x)
    sq, _ = model.sq_norms(params, residuals, u)  # Flatten needs no rule of its own
    assert jax.tree.structure(sq) == jax.tree.structure(params)
    assert [q.shape for q in jax.tree.leaves(sq)] == [(N,)] * 4
    assert_gradients_equal_oracle(model, ref, params, x, y)


def test_flatten_rejects_bad_ndim_and_inputs_with_too_few_axes():
    with pytest.raises(ValueError, match=r"Flatten: ndim must be a positive int, got 0"):
        fnbp.Flatten(0)
    with pytest.raises(ValueError, match=r"flatten\(3\): input shape \(4, 5\) has fewer than 3"):
        fnbp.Flatten(3).init(jax.random.key(0), (4, 5))


# --- remat ------------------------------------------------------------------------


def residual_size(model, params, x) -> int:
    """Number of array entries in the residuals model.forward stores."""
    _, residuals = jax.eval_shape(model.forward, params, x)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(residuals))


def relayout(params, like):
    """params' leaves (in order) in the pytree structure of ``like``."""
    return jax.tree.structure(like).unflatten(jax.tree.leaves(params))


@functools.partial(jax.jit, static_argnums=0)
def all_gradients(model, params, x, y):
    """backprop's gradients, jax.grad's through apply, and the per-example norms."""
    J, grads = fnbp.backprop(model, LOSS, params, x, y)
    _, grads_apply = jax.value_and_grad(apply_objective, argnums=1)(model, params, x, y)
    _, norms = fnbp.per_example_grad_norms(model, LOSS, params, x, y)
    return J, jax.tree.leaves(grads), jax.tree.leaves(grads_apply), norms


REMAT_WIDTHS = [WIDTH] * 4 + [K]
NO_REMAT = fnbp.mlp(REMAT_WIDTHS, "tanh")


@pytest.mark.parametrize("remat_every", [1, 2, 3])
def test_mlp_remat_gives_the_same_gradients_and_stores_less(remat_every):
    rematted = fnbp.mlp(REMAT_WIDTHS, "tanh", remat_every=remat_every)
    params = init(NO_REMAT)
    params_r = relayout(params, init(rematted))
    x, y = data()
    J, grads, grads_apply, norms = all_gradients(NO_REMAT, params, x, y)
    J_r, grads_r, grads_apply_r, norms_r = all_gradients(rematted, params_r, x, y)
    assert rel_err(J_r, J) <= 1e-14
    assert rel_err(grads_r, grads) <= 1e-14
    assert rel_err(grads_apply_r, grads) <= 1e-14
    assert rel_err(norms_r, norms) <= 1e-14
    assert residual_size(rematted, params_r, x) < residual_size(NO_REMAT, params, x)


def test_more_remat_stores_less():
    widths = [16] * 6 + [K]
    x = jnp.zeros((32, D_IN))
    sizes = []
    for k in (0, 1, 2, 3):
        model = fnbp.mlp(widths, "relu", remat_every=k)
        sizes.append(residual_size(model, shapes_of_init(model), x))
    # remat_every=1 stores each (MM, relu) pair's input; 2 and 3 store fewer inputs
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3]


def test_remat_of_any_layer_gives_the_same_gradients():
    model = fnbp.resnet_s(WIDTH, 2, K, "relu")
    params = init(model)
    x, y = data()
    whole = fnbp.remat(model)
    assert whole.name == f"remat({model.name})"
    J, grads, _, norms = all_gradients(model, params, x, y)
    J_r, grads_r, grads_apply_r, norms_r = all_gradients(whole, params, x, y)
    assert rel_err(J_r, J) <= 1e-14 and rel_err(grads_r, grads) <= 1e-14
    assert rel_err(grads_apply_r, grads) <= 1e-14 and rel_err(norms_r, norms) <= 1e-14
    # what it stores is the input alone
    _, residuals = jax.eval_shape(whole.forward, params, x)
    assert [leaf.shape for leaf in jax.tree.leaves(residuals)] == [x.shape]
    assert residual_size(whole, params, x) < residual_size(model, params, x)


# --- params as a list --------------------------------------------------------------


def test_params_as_a_list_give_grads_as_a_list():
    model = fnbp.mlp([WIDTH, K], "tanh")
    params = init(model)
    x, y = data()
    _, want = fnbp.backprop(model, LOSS, params, x, y)
    grads = jax.grad(apply_objective, argnums=1)(model, list(params), x, y)
    assert isinstance(grads, list)
    assert rel_err(tuple(grads), want) <= F64_RTOL


# --- bad input ------------------------------------------------------------------------


def test_serial_rejects_a_non_layer():
    with pytest.raises(
        TypeError,
        match=r"serial: argument 1 is function, not a Layer; use "
        r"fnbp.Linear\(n\)",
    ):
        fnbp.serial(fnbp.Linear(3), fnbp.relu)


@pytest.mark.parametrize("widths", [[], [0], [7, -1], [3.5], ["16"]])
def test_mlp_rejects_bad_widths(widths):
    with pytest.raises(ValueError, match=r"mlp: widths must be a non-empty list of positive ints"):
        fnbp.mlp(widths)


@pytest.mark.parametrize("activation", ["relux", jnp.tanh, 3])
def test_mlp_rejects_an_unknown_activation(activation):
    names = sorted(name for name, rule in fnbp.rules.registry().items() if rule.layer)
    with pytest.raises(ValueError, match=re.escape(f"activation must be one of {names}")):
        fnbp.mlp([WIDTH, K], activation)


def test_builders_and_layers_reject_bad_settings():
    with pytest.raises(ValueError, match=r"mlp: remat_every must be an int >= 0, got 1.5"):
        fnbp.mlp([4, 2], remat_every=1.5)
    with pytest.raises(ValueError, match=r"mlp: remat_every must be an int >= 0, got -1"):
        fnbp.mlp([WIDTH, K], remat_every=-1)
    with pytest.raises(ValueError, match=r"resnet_s: depth must be a positive int, got 0"):
        fnbp.resnet_s(WIDTH, 0, K)
    with pytest.raises(ValueError, match=r"Linear: n must be a positive int, got 0"):
        fnbp.Linear(0)
    with pytest.raises(
        ValueError,
        match=r"Linear: init must be one of \['glorot', 'he', "
        r"'lecun'\], got 'xavier'",
    ):
        fnbp.Linear(3, init="xavier")
    with pytest.raises(
        ValueError,
        match=r"^LeakyRelu: leaky_relu: gamma must lie in the open "
        r"interval \(0.0, 1.0\), got 1.5$",
    ):
        fnbp.LeakyRelu(1.5)
    with pytest.raises(ValueError, match=r"^Softplus: softplus: beta must be > 0, got 0.0$"):
        fnbp.Softplus(0.0)
    with pytest.raises(
        ValueError,
        match=r"^LeakyRelu: unknown settings \['beta'\]; it takes "
        r"\['gamma'\]$",
    ):
        fnbp.activation_layer("leaky_relu", beta=2.0)


# Every public factory and builder checks each argument with one helper (fnbp/nn/_args.py):
# (call, error, the exact message).
FACTORY_ERRORS = [
    (
        lambda: fnbp.Linear(True),
        ValueError,
        "Linear: n must be a positive int, got True (n is the output width)",
    ),
    (lambda: fnbp.Linear(3, bias="no"), TypeError, "Linear: bias must be True or False, got 'no'"),
    (
        lambda: fnbp.Linear(3, init=["he"]),
        ValueError,
        "Linear: init must be one of ['glorot', 'he', 'lecun'], got ['he']",
    ),
    (
        lambda: fnbp.Conv2D(0, 3),
        ValueError,
        "Conv2D: channels must be a positive int, got 0 (channels is the number of output "
        "channels)",
    ),
    (
        lambda: fnbp.Conv2D(-2, 3),
        ValueError,
        "Conv2D: channels must be a positive int, got -2 (channels is the number of output "
        "channels)",
    ),
    (
        lambda: fnbp.Conv2D(2.0, 3),
        ValueError,
        "Conv2D: channels must be a positive int, got 2.0 (channels is the number of output "
        "channels)",
    ),
    (
        lambda: fnbp.Conv2D(4, 0),
        ValueError,
        "Conv2D: kernel_size must be a positive int or a tuple of 2 positive ints, got 0 "
        "(kernel_size is the filter's size along each spatial axis)",
    ),
    (
        lambda: fnbp.Conv2D(4, (3,)),
        ValueError,
        "Conv2D: kernel_size must be a positive int or a tuple of 2 positive ints, got (3,) "
        "(kernel_size is the filter's size along each spatial axis)",
    ),
    (
        lambda: fnbp.Conv1D(4, 3.0),
        ValueError,
        "Conv1D: kernel_size must be a positive int or a tuple of 1 positive int, got 3.0 "
        "(kernel_size is the filter's size along each spatial axis)",
    ),
    (
        lambda: fnbp.Conv1D(0, 3),
        ValueError,
        "Conv1D: channels must be a positive int, got 0 (channels is the number of output "
        "channels)",
    ),
    (
        lambda: fnbp.Conv2D(4, 3, stride=0),
        ValueError,
        "Conv2D: stride must be a positive int or a tuple of 2 positive ints, got 0",
    ),
    (
        lambda: fnbp.Conv2D(4, 3, dilation=(1, -1)),
        ValueError,
        "Conv2D: dilation must be a positive int or a tuple of 2 positive ints, got (1, -1)",
    ),
    (
        lambda: fnbp.Conv2D(4, 3, padding="full"),
        ValueError,
        "Conv2D: conv2d: padding must be 'same', 'valid', an int or a (low, high) pair, got "
        "padding='full'",
    ),
    (
        lambda: fnbp.Conv2D(4, 3, bias=None),
        TypeError,
        "Conv2D: bias must be True or False, got None",
    ),
    (
        lambda: fnbp.MaxPool(0),
        ValueError,
        "MaxPool: window must be a positive int or a tuple of 1 positive int, got 0",
    ),
    (
        lambda: fnbp.AvgPool((2, 2, 2)),
        ValueError,
        "AvgPool: window must be a positive int (1-D pooling) or a tuple of 1 or 2 positive ints "
        "(1-D or 2-D pooling), got (2, 2, 2)",
    ),
    (
        lambda: fnbp.MaxPool((2, 2), stride=(0, 1)),
        ValueError,
        "MaxPool: stride must be a positive int or a tuple of 2 positive ints, got (0, 1) "
        "(stride is the step between windows: None for non-overlapping ones)",
    ),
    (
        lambda: fnbp.LayerNorm(-1.0),
        ValueError,
        "LayerNorm: eps must be a finite number >= 0, got -1.0 (eps is added to the variance: 0 "
        "for the notes' exact form)",
    ),
    (
        lambda: fnbp.LayerNorm(float("nan")),
        ValueError,
        "LayerNorm: eps must be a finite number >= 0, got nan (eps is added to the variance: 0 "
        "for the notes' exact form)",
    ),
    (
        lambda: fnbp.LayerNorm(per_feature=1),
        TypeError,
        "LayerNorm: per_feature must be True or False, got 1",
    ),
    (
        lambda: fnbp.RMSNorm("1e-6"),
        TypeError,
        "RMSNorm: eps must be a number >= 0, got str '1e-6' (eps is added to the mean square: 0 "
        "for the exact form)",
    ),
    (
        lambda: fnbp.Flatten(True),
        ValueError,
        "Flatten: ndim must be a positive int, got True (ndim is the number of trailing axes to "
        "flatten)",
    ),
    (
        lambda: fnbp.residual(3),
        TypeError,
        "residual: block is int, not a Layer; use fnbp.Linear(n), fnbp.Relu(), ... or "
        "fnbp.make_layer",
    ),
    (
        lambda: fnbp.remat(fnbp.Linear),
        TypeError,
        "remat: layer is function (a layer factory: call it, fnbp.Linear(...)), not a Layer; use "
        "fnbp.Linear(n), fnbp.Relu(), ... or fnbp.make_layer",
    ),
    (
        lambda: fnbp.serial(fnbp.Relu(), name=""),
        TypeError,
        "serial: name must be a non-empty str (shown in errors), got ''",
    ),
    (
        lambda: fnbp.mlp(784),
        ValueError,
        "mlp: widths must be a non-empty list of positive ints, the output width of each MM (e.g. "
        "[1024, 10]), got 784",
    ),
    (
        lambda: fnbp.mlp([True]),
        ValueError,
        "mlp: widths must be a non-empty list of positive ints, the output width of each MM (e.g. "
        "[1024, 10]), got [True]",
    ),
    (
        lambda: fnbp.resnet_s(0, 1, 2),
        ValueError,
        "resnet_s: width must be a positive int, got 0 (width is the residual stream's width)",
    ),
    (
        lambda: fnbp.resnet_s(4, True, 2),
        ValueError,
        "resnet_s: depth must be a positive int, got True (depth is the number of Res blocks)",
    ),
    (
        lambda: fnbp.resnet_s(4, 1, 0),
        ValueError,
        "resnet_s: num_outputs must be a positive int, got 0 (num_outputs is the output width)",
    ),
    (
        lambda: fnbp.cnn(0),
        ValueError,
        "cnn: num_classes must be a positive int, got 0 (num_classes is the output width)",
    ),
    (
        lambda: fnbp.cnn(3, (0,)),
        ValueError,
        "cnn: channels must be a non-empty list of positive ints, the output channels of each "
        "convolution stage (e.g. (16, 32)), got (0,)",
    ),
    (
        lambda: fnbp.cnn(3, kernel_size=4),
        ValueError,
        "cnn: kernel_size must be odd, got 4: the convolutions pad 'same', which needs an odd "
        "kernel; pass 5",
    ),
    (
        lambda: fnbp.cnn(3, pool=0),
        ValueError,
        "cnn: pool must be a positive int, got 0 (pool is the window and stride of every max "
        "pooling: 1 for none)",
    ),
    (
        lambda: fnbp.make_layer("x", None, None, None),
        TypeError,
        "make_layer: init must be a function (see fnbp.make_layer for its signature), got NoneType",
    ),
    (
        lambda: fnbp.make_layer(3, lambda *a: a, lambda *a: a, lambda *a: a),
        TypeError,
        "make_layer: name must be a non-empty str (shown in errors), got 3",
    ),
    (
        lambda: fnbp.nn.rule_layer(["relu"]),
        ValueError,
        f"activation must be one of {sorted(n for n, r in fnbp.rules.registry().items() if r.layer)}"
        f", the matching fnbp function (e.g. fnbp.relu) or a Layer; got ['relu']",
    ),
]


@pytest.mark.parametrize(
    "call, error, message", FACTORY_ERRORS, ids=[str(i) for i in range(len(FACTORY_ERRORS))]
)
def test_factories_refuse_each_bad_argument_by_name(call, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        call()


INIT_ERRORS = [  # (model, key, input_shape, dtype, error, message)
    (
        fnbp.mlp([4, 2]),
        jax.random.key(0),
        (0,),
        None,
        ValueError,
        "mlp: input_shape (0,) has a zero or negative dimension; every axis of an example needs "
        "at least one entry (the batch axis is not part of it)",
    ),
    (
        fnbp.Conv2D(2, 3),
        jax.random.key(0),
        (8, -1, 1),
        None,
        ValueError,
        "conv2d(2, 3): input_shape (8, -1, 1) has a zero or negative dimension; every axis of an "
        "example needs at least one entry (the batch axis is not part of it)",
    ),
    (
        fnbp.mlp([4, 2]),
        jax.random.key(0),
        (3.0,),
        None,
        TypeError,
        "mlp: input_shape must be one example's shape, a tuple of ints without the batch axis "
        "(e.g. (784,) or (28, 28, 1)), got tuple (3.0,)",
    ),
    (
        fnbp.mlp([4, 2]),
        jax.random.key(0),
        None,
        None,
        TypeError,
        "mlp: input_shape must be one example's shape, a tuple of ints without the batch axis "
        "(e.g. (784,) or (28, 28, 1)), got NoneType None",
    ),
    (
        fnbp.mlp([4, 2]),
        0,
        (3,),
        None,
        TypeError,
        "mlp: key must be one PRNG key, got int 0; pass e.g. jax.random.key(0)",
    ),
    (
        fnbp.mlp([4, 2]),
        None,
        (3,),
        None,
        TypeError,
        "mlp: key must be one PRNG key, got NoneType None; pass e.g. jax.random.key(0)",
    ),
    (
        fnbp.mlp([4, 2]),
        jax.random.key(0),
        (3,),
        jnp.int32,
        TypeError,
        "mlp: dtype must be a real floating dtype for the parameters (jnp.float32, jnp.bfloat16, "
        "jnp.float16 or jnp.float64), got int32",
    ),
    (
        fnbp.LayerNorm(),
        jax.random.key(0),
        (),
        None,
        ValueError,
        "layer_norm(eps=1e-05): needs per-example inputs of shape (..., m), the last axis "
        "normalized, got ()",
    ),
    (
        fnbp.RMSNorm(),
        jax.random.key(0),
        (),
        None,
        ValueError,
        "rms_norm(eps=1e-06): needs per-example inputs of shape (..., m), the last axis "
        "normalized, got ()",
    ),
]


@pytest.mark.parametrize(
    "model, key, shape, dtype, error, message",
    INIT_ERRORS,
    ids=[str(i) for i in range(len(INIT_ERRORS))],
)
def test_init_refuses_a_bad_key_shape_or_dtype_by_name(model, key, shape, dtype, error, message):
    args = (key, shape) if dtype is None else (key, shape, dtype)
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        model.init(*args)


def test_init_takes_an_int_input_shape_as_one_axis():
    model = fnbp.mlp([4, 2])
    shape, params = model.init(jax.random.key(0), 5)
    want_shape, want = model.init(jax.random.key(0), (5,))
    assert shape == want_shape == (2,)
    assert rel_err(params, want) == 0
    assert model.init(jax.random.PRNGKey(0), np.int64(5))[0] == (2,)  # a raw key, a NumPy int


def test_layers_take_a_list_input_and_refuse_what_is_not_numbers():
    model = fnbp.serial(fnbp.Linear(2), fnbp.Relu(), name="net")
    params = init(model, (3,))
    x = [[0.5, -1.0, 2.0]]
    np.testing.assert_array_equal(model.apply(params, x), model.apply(params, jnp.asarray(x)))
    with pytest.raises(
        TypeError,
        match=r"^net: x must be an array of numbers \(a jax or NumPy "
        r"array, or a nested list of numbers\), got str 'abc'$",
    ):
        model.apply(params, "abc")
    with pytest.raises(
        TypeError,
        match=r"^net: x has dtype complex64; a layer computes on real "
        r"numbers",
    ):
        model.forward(params, jnp.ones((1, 3), jnp.complex64))
    with pytest.raises(
        TypeError,
        match=r"^net\[0\] linear\(2\): z has dtype int32, but a real "
        r"floating dtype is needed \(one of float16, bfloat16, float32, "
        r"float64\); convert it, e.g. z.astype\(jnp.float32\)",
    ):
        model.apply(params, jnp.ones((1, 3), jnp.int32))
    with pytest.raises(TypeError, match=r"^relu: z has dtype bool"):
        fnbp.Relu().apply((), jnp.ones(3, bool))


def test_residual_block_that_changes_the_shape_is_rejected():
    with pytest.raises(
        ValueError,
        match=r"residual\(linear\(7\)\): the block maps shape \(5,\) "
        r"to \(7,\); Res\(z\) = z \+ block\(z\) needs them equal",
    ):
        init(fnbp.residual(fnbp.Linear(WIDTH)))
    model = fnbp.serial(fnbp.Linear(WIDTH), fnbp.residual(fnbp.Linear(K)))
    with pytest.raises(ValueError, match=r"the block maps shape \(7,\) to \(4,\)"):
        init(model)


@pytest.fixture(scope="module")
def mlp_and_params():
    model = fnbp.mlp([16, 16, K], "relu")
    params = init(model, (8,))
    x = jnp.ones((3, 8))
    y = jnp.zeros((3,), jnp.int32)
    return model, params, x, y


def _every_entry_point(model, params, x, y):
    """Each way a user runs the model; each must raise the same clear error."""
    return [
        lambda: model.apply(params, x),
        lambda: model.forward(params, x),
        lambda: jax.grad(apply_objective, argnums=1)(model, params, x, y),
        lambda: fnbp.backprop(model, LOSS, params, x, y),
        lambda: jax.jit(fnbp.backprop, static_argnums=(0, 1))(model, LOSS, params, x, y),
        lambda: fnbp.per_example_grad_norms(model, LOSS, params, x, y),
    ]


def test_params_with_the_wrong_number_of_entries_are_rejected(mlp_and_params):
    model, params, x, y = mlp_and_params
    for run in _every_entry_point(model, params[:4], x, y):
        with pytest.raises(
            ValueError,
            match=r"mlp: params must be a tuple of 5 entries \(one per "
            r"layer\), got 4; pass the params made by this "
            r"model's init",
        ):
            run()
    with pytest.raises(ValueError, match=r"mlp: params must be a tuple of 5 entries .*got dict"):
        model.apply({"W": params[0]["W"]}, x)


def test_params_dict_with_a_missing_key_is_rejected(mlp_and_params):
    model, params, x, y = mlp_and_params
    bad = ({"W": params[0]["W"]},) + params[1:]
    for run in _every_entry_point(model, bad, x, y):
        with pytest.raises(
            ValueError,
            match=r"mlp\[0\] linear\(16\): params must be a dict with "
            r"keys \['W', 'b'\], got \['W'\]",
        ):
            run()


def test_params_with_a_W_of_the_wrong_shape_are_rejected(mlp_and_params):
    model, params, x, y = mlp_and_params
    short = params[:2] + ({"W": params[2]["W"][:8], "b": params[2]["b"]},) + params[3:]
    for run in _every_entry_point(model, short, x, y):
        with pytest.raises(
            ValueError,
            match=r"mlp\[2\] linear\(16\): params have "
            r"W.shape=\(8, 16\), b.shape=\(16,\); expected W "
            r"of shape \(16, m\) and b of shape \(16,\)",
        ):
            run()
    outputs = params[:4] + ({"W": params[4]["W"][:3], "b": params[4]["b"][:3]},)
    with pytest.raises(
        ValueError,
        match=r"mlp\[4\] linear\(4\): params have W.shape=\(3, 16\), "
        r"b.shape=\(3,\); expected W of shape \(4, m\) and b of "
        r"shape \(4,\)",
    ):
        model.apply(outputs, x)
    narrow = params[:2] + ({"W": params[2]["W"][:, :15], "b": params[2]["b"]},) + params[3:]
    with pytest.raises(
        ValueError,
        match=r"mlp\[2\] linear\(16\): input has shape \(3, 16\) but "
        r"W.shape=\(16, 15\) expects 15 features",
    ):
        fnbp.backprop(model, LOSS, narrow, x, y)


def test_params_of_another_model_are_rejected(mlp_and_params):
    model, _, x, y = mlp_and_params
    other = init(fnbp.mlp([16, K]), (8,))
    with pytest.raises(ValueError, match=r"mlp: params must be a tuple of 5 entries"):
        fnbp.backprop(model, LOSS, other, x, y)


def test_input_that_does_not_fit_the_first_layer_names_the_layer(mlp_and_params):
    model, params, _, y = mlp_and_params
    x = jnp.ones((3, 7))
    for run in _every_entry_point(model, params, x, y):
        with pytest.raises(
            ValueError,
            match=r"mlp\[0\] linear\(16\): input has shape \(3, 7\) "
            r"but W.shape=\(16, 8\) expects 8 features in the "
            r"last axis; pass inputs of shape \(\.\.\., 8\)",
        ):
            run()


def test_errors_inside_nested_layers_name_the_path():
    model = fnbp.resnet_s(WIDTH, 2, K)
    params = init(model)
    block = params[2]
    bad = params[:2] + ((block[0], block[1], {"W": block[2]["W"]}, block[3]),) + params[3:]
    with pytest.raises(
        ValueError,
        match=r"resnet_s\[2\] residual\(block\): block\[2\] "
        r"linear\(7\): params must be a dict",
    ):
        model.apply(bad, jnp.ones((2, D_IN)))
