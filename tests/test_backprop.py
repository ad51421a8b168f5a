"""Algorithm 3 (fnbp.backprop) and the per-example engine against autodiff.

The oracle is a plain-jnp network written below, independently of fnbp: its
own forward pass reads the same parameter pytree that ``model.init`` makes
(eq. 7.36 for the MLP, eq. 7.39 for ResNet-S), and ``jax.grad`` of its mean
loss (eq. 7.2) gives the reference gradient. In float64 every gradient, every
per-example gradient and norm, and every Hessian-vector product must agree
with it to a relative error of 1e-10.

Relative error is ``max|got - want| / max|want|`` per array, the worst over a
pytree's leaves.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import rel_err
from jax.scipy.special import erf

import fnbp
from fnbp.nn.layer import MissingRuleError

F64_RTOL = 1e-10
F32_RTOL = 1e-4  # float32 network against the float64 oracle at the same values
BF16_RTOL = 3e-2  # bfloat16 parameters (eps = 7.8e-3) against float32


def tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --- the independent reference network ---------------------------------------------

REF_SIGMA = {
    "relu": lambda z: jnp.where(z > 0, z, 0.0),
    "gelu": lambda z: 0.5 * z * (1.0 + erf(z / math.sqrt(2.0))),
    "tanh": lambda z: (jnp.exp(2 * z) - 1.0) / (jnp.exp(2 * z) + 1.0),
    "sigmoid": lambda z: 1.0 / (1.0 + jnp.exp(-z)),
    "silu": lambda z: z / (1.0 + jnp.exp(-z)),
    "leaky_relu": lambda z: jnp.where(z > 0, z, 0.01 * z),
    "softplus": lambda z: jnp.log1p(jnp.exp(z)),
}


def ref_mm(p, z):
    """W z + b per example, written for a batch as z W^T + b."""
    return jnp.einsum("...m,nm->...n", z, p["W"]) + p["b"]


def ref_mlp(params, x, sigma):
    """MM(sigma(MM(... sigma(MM(x))))) (eq. 7.36); params = (mm, (), mm, (), ..., mm)."""
    linears = params[0::2]
    assert all(p == () for p in params[1::2])
    h = x
    for i, p in enumerate(linears):
        h = ref_mm(p, h)
        if i < len(linears) - 1:
            h = sigma(h)
    return h


def ref_resnet_s(params, x, sigma):
    """MM(Res(... Res(MM_in(x)))) (eq. 7.39), Res(z) = z + sigma(MM(sigma(MM(z)))) (7.38)."""
    h = ref_mm(params[0], x)
    for block in params[1:-1]:
        first, _, second, _ = block
        h = h + sigma(ref_mm(second, sigma(ref_mm(first, h))))
    return ref_mm(params[-1], h)


def ref_cross_entropy(t, y):
    top = jnp.max(t, axis=-1, keepdims=True)
    log_z = top[..., 0] + jnp.log(jnp.sum(jnp.exp(t - top), axis=-1))
    return log_z - jnp.take_along_axis(t, y[..., None], axis=-1)[..., 0]


def ref_mse(t, y):
    return 0.5 * jnp.sum((t - y) ** 2, axis=-1)


def ref_logistic(t, y):
    return y * jnp.log1p(jnp.exp(-t)) + (1.0 - y) * jnp.log1p(jnp.exp(t))


def ref_objective(ref_apply, ref_loss, params, x, y):
    """J = (1/n) sum_i loss(f(x_i), y_i) (eq. 7.2)."""
    return jnp.mean(ref_loss(ref_apply(params, x), y))


# --- cases ---------------------------------------------------------------------------

D_IN, WIDTH, K, N = 5, 7, 4, 4

MODEL_IDS = (
    [f"mlp-{depth}-{a}" for a in ("relu", "gelu", "tanh") for depth in range(2, 7)]
    + [f"mlp-3-{a}" for a in ("sigmoid", "silu", "leaky_relu", "softplus")]
    + ["resnet_s-1-relu", "resnet_s-2-tanh", "resnet_s-3-gelu"]
)
# Second derivatives: each of the main activations once, at several depths, and
# ResNet-S (the other activations' second derivatives are their rules' tests).
HVP_IDS = ["mlp-2-relu", "mlp-4-gelu", "mlp-6-tanh", "resnet_s-2-tanh"]


def random_params(model, input_shape=(D_IN,), dtype="float64", seed=1):
    """Params shaped as ``model.init`` makes them, drawn with NumPy (nothing to compile).

    W ~ N(0, 1/m) as fan-in initializers draw it; b ~ N(0, 0.2^2), so biases are
    not zero; other leaves ~ N(1, 0.2^2).
    """
    shapes = jax.eval_shape(
        lambda key: model.init(key, input_shape, jnp.dtype(dtype))[1], jax.random.key(0)
    )
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) == 2:
            value = rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[1])
        elif len(leaf.shape) == 1:
            value = 0.2 * rng.standard_normal(leaf.shape)
        else:
            value = 1.0 + 0.2 * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree.map(draw, shapes)


def random_like(tree, seed):
    """A random pytree shaped like ``tree`` (a direction for Hessian-vector products)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), tree)


def build_model(model_id: str):
    kind, depth, activation = model_id.split("-", 2)
    depth = int(depth)
    sigma = REF_SIGMA[activation]
    if kind == "mlp":
        model = fnbp.mlp([WIDTH] * (depth - 1) + [K], activation)
        ref = functools.partial(ref_mlp, sigma=sigma)
    else:
        model = fnbp.resnet_s(WIDTH, depth, K, activation)
        ref = functools.partial(ref_resnet_s, sigma=sigma)
    return model, ref


@functools.cache
def setup(model_id: str, dtype: str = "float64"):
    """(model, ref, params, x, y) with classification labels, cached per id."""
    model, ref = build_model(model_id)
    params = random_params(model, dtype=dtype)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((N, D_IN)), dtype)
    y = jnp.asarray(rng.integers(0, K, N), jnp.int32)
    return model, ref, params, x, y


def apply_objective(model, loss, params, x, y):
    """The user's way: plain code around model.apply, differentiated by jax.grad."""
    return jnp.mean(loss(model.apply(params, x), y))


def oracle_loop(ref, ref_loss, params, x, y):
    """One jax.grad of the oracle per example, in a Python loop."""
    grad_one = jax.value_and_grad(ref_objective, argnums=2)
    results = [grad_one(ref, ref_loss, params, x[i : i + 1], y[i : i + 1]) for i in range(len(x))]
    losses = jnp.stack([J for J, _ in results])
    grads = jax.tree.map(lambda *g: jnp.stack(g), *[g for _, g in results])
    return losses, grads


def grad_norms(grads):
    """The norm of each example's whole gradient (leaves have a leading example axis)."""
    leaves = jax.tree.leaves(grads)
    return jnp.sqrt(sum(jnp.sum(g * g, axis=tuple(range(1, g.ndim))) for g in leaves))


def oracle_grads(ref, ref_loss, params, x, y):
    """What the oracle says about one network and batch."""
    J, (grads, dx) = jax.value_and_grad(ref_objective, argnums=(2, 3))(ref, ref_loss, params, x, y)
    losses, pe_grads = oracle_loop(ref, ref_loss, params, x, y)
    return {
        "J": J,
        "grads": grads,
        "dx": dx,
        "losses": losses,
        "per_example_grads": pe_grads,
        "norms": grad_norms(pe_grads),
    }


def fnbp_grads(model, loss, params, x, y):
    """The same quantities from fnbp: the engine, and jax.grad through model.apply."""
    J, grads = fnbp.backprop(model, loss, params, x, y)
    J_apply, (grads_apply, dx_apply) = jax.value_and_grad(apply_objective, argnums=(2, 3))(
        model, loss, params, x, y
    )
    pe_losses, pe_grads = fnbp.per_example_grads(model, loss, params, x, y)
    norm_losses, norms = fnbp.per_example_grad_norms(model, loss, params, x, y)
    return {
        "J": J,
        "grads": grads,
        "J_apply": J_apply,
        "grads_apply": grads_apply,
        "dx_apply": dx_apply,
        "pe_losses": pe_losses,
        "per_example_grads": pe_grads,
        "norm_losses": norm_losses,
        "norms": norms,
    }


# Which oracle entry each of fnbp's results must equal.
ORACLE_KEY = {
    "J": "J",
    "grads": "grads",
    "J_apply": "J",
    "grads_apply": "grads",
    "dx_apply": "dx",
    "pe_losses": "losses",
    "per_example_grads": "per_example_grads",
    "norm_losses": "losses",
    "norms": "norms",
}


def assert_matches(got, want, rtol):
    """Every fnbp result against the oracle's."""
    for name, value in got.items():
        err = rel_err(value, want[ORACLE_KEY[name]])
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:.3g}"


# Eager evaluation compiles each primitive once and reuses it for every network
# of the same widths, which makes the sweep below cheap; a one-off dtype is
# cheaper compiled whole.
fnbp_grads_jit = jax.jit(fnbp_grads, static_argnums=(0, 1))


@functools.cache
def results(model_id: str):
    """(fnbp's, the oracle's) results for one network, computed once."""
    model, ref, params, x, y = setup(model_id)
    return (
        fnbp_grads(model, fnbp.cross_entropy_loss, params, x, y),
        oracle_grads(ref, ref_cross_entropy, params, x, y),
    )


# --- Algorithm 3 against the oracle --------------------------------------------------


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_backprop_equals_oracle(model_id):
    got, want = results(model_id)
    assert got["J"].shape == () and got["J"].dtype == jnp.float64
    assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(got["grads"]))
    assert rel_err(got["J"], want["J"]) <= F64_RTOL
    assert rel_err(got["grads"], want["grads"]) <= F64_RTOL


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_jax_grad_through_apply_equals_backprop(model_id):
    got, want = results(model_id)
    assert rel_err(got["J_apply"], got["J"]) <= F64_RTOL
    assert rel_err(got["grads_apply"], got["grads"]) <= F64_RTOL
    assert rel_err(got["dx_apply"], want["dx"]) <= F64_RTOL


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_per_example_grads_equal_oracle_loop(model_id):
    got, want = results(model_id)
    assert got["pe_losses"].shape == (N,)
    assert rel_err(got["pe_losses"], want["losses"]) <= F64_RTOL
    assert rel_err(got["per_example_grads"], want["per_example_grads"]) <= F64_RTOL


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_per_example_grad_norms_equal_norms_of_oracle_loop(model_id):
    model, _, params, x, _ = setup(model_id)
    assert keeps_books(model, params, x)  # the path with no per-example gradients
    got, want = results(model_id)
    assert got["norms"].shape == (N,)
    assert rel_err(got["norm_losses"], want["losses"]) <= F64_RTOL
    assert rel_err(got["norms"], want["norms"]) <= F64_RTOL


def direction(params):
    """A random direction t shaped like params, for Hessian-vector products."""
    return random_like(params, seed=7)


def hvp(grad_fn, params, t):
    """H t = d/dparams <grad J(params), t>: reverse mode over reverse mode."""
    return jax.grad(lambda p: tree_vdot(grad_fn(p), t))(params)


@pytest.mark.parametrize("model_id", HVP_IDS)
def test_hessian_vector_products_equal_oracle(model_id):
    model, ref, params, x, y = setup(model_id)
    loss, t = fnbp.cross_entropy_loss, direction(params)
    want = hvp(
        lambda p: jax.grad(ref_objective, argnums=2)(ref, ref_cross_entropy, p, x, y), params, t
    )
    by_backprop = hvp(lambda p: fnbp.backprop(model, loss, p, x, y)[1], params, t)
    by_apply = hvp(lambda p: jax.grad(apply_objective, argnums=2)(model, loss, p, x, y), params, t)
    assert rel_err(by_backprop, want) <= F64_RTOL
    assert rel_err(by_apply, want) <= F64_RTOL


@pytest.mark.parametrize("model_id", HVP_IDS)
def test_forward_mode_over_the_backward_pass_works_and_pure_forward_mode_is_refused(model_id):
    """What docs/limitations.md says: jax.jvp of a function through fnbp's rules is refused
    (JAX's rule for custom_vjp), forward over reverse works (jax.hessian's way: the backward
    pass is B's own code), and J t comes from transposing the vjp."""
    model, ref, params, x, y = setup(model_id)
    loss, t = fnbp.cross_entropy_loss, direction(params)
    with pytest.raises(TypeError):
        jax.jvp(lambda p: model.apply(p, x), (params,), (t,))
    want_hvp = hvp(
        lambda p: jax.grad(ref_objective, argnums=2)(ref, ref_cross_entropy, p, x, y), params, t
    )
    grad_fn = functools.partial(jax.grad(apply_objective, argnums=2), model, loss)
    _, forward_over_reverse = jax.jvp(lambda p: grad_fn(p, x, y), (params,), (t,))
    assert rel_err(forward_over_reverse, want_hvp) <= F64_RTOL
    out, vjp_fn = jax.vjp(lambda p: model.apply(p, x), params)
    (jt,) = jax.linear_transpose(vjp_fn, out)((t,))
    _, want_jt = jax.jvp(lambda p: ref(p, x), (params,), (t,))
    assert rel_err(jt, want_jt) <= F64_RTOL


@pytest.mark.parametrize("model_id", ["mlp-4-gelu", "resnet_s-2-tanh"])
def test_under_jit(model_id):
    model, _, params, x, y = setup(model_id)
    _, want = results(model_id)
    loss = fnbp.cross_entropy_loss
    if model_id.startswith("mlp"):
        # all of it in one compiled program, the model and the loss static
        assert_matches(fnbp_grads_jit(model, loss, params, x, y), want, F64_RTOL)
    # the engine's functions jitted on their own, as their docstrings say
    J, grads = jax.jit(fnbp.backprop, static_argnums=(0, 1))(model, loss, params, x, y)
    assert rel_err(J, want["J"]) <= F64_RTOL and rel_err(grads, want["grads"]) <= F64_RTOL


@pytest.mark.parametrize("model_id", ["mlp-3-relu", "resnet_s-2-tanh"])
def test_apply_is_a_custom_vjp(model_id):
    # jax.grad of user code around model.apply meets one custom_vjp for the
    # whole model (and one for the loss), so it runs the model's own rule
    # (Algorithm 3); test_network shows with a rule that is not autodiff's
    # derivative that this rule is the one used.
    model, _, params, x, y = setup(model_id)
    objective = functools.partial(apply_objective, model, fnbp.cross_entropy_loss)
    jaxpr = jax.make_jaxpr(objective)(params, x, y)
    calls = [eqn for eqn in jaxpr.jaxpr.eqns if "custom_vjp_call" in str(eqn.primitive)]
    assert len(calls) == 2
    # the model's call takes every parameter and x
    assert len(calls[0].invars) == len(jax.tree.leaves(params)) + 1


# --- per-example gradients and their norms -----------------------------------------


def _all_shapes(jaxpr):
    """Shapes of every value a jaxpr computes, sub-jaxprs included."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(var.aval.shape)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_shapes(inner)


def test_per_example_grad_norms_builds_no_per_example_weight_gradient():
    model, _, params, x, y = setup("mlp-4-relu")
    per_example_W = {(N,) + tuple(p["W"].shape) for p in params[0::2]}
    norms_jaxpr = jax.make_jaxpr(
        functools.partial(fnbp.per_example_grad_norms, model, fnbp.cross_entropy_loss)
    )(params, x, y)
    assert not per_example_W & set(_all_shapes(norms_jaxpr.jaxpr))
    # whereas per_example_grads has to build them
    grads_jaxpr = jax.make_jaxpr(
        functools.partial(fnbp.per_example_grads, model, fnbp.cross_entropy_loss)
    )(params, x, y)
    assert per_example_W <= set(_all_shapes(grads_jaxpr.jaxpr))


def keeps_books(model, params, x) -> bool:
    """Whether every layer with params has an sq_norms rule (no per-example gradients)."""

    def norms(params, x):
        u, residuals = model.forward(params, x)
        return model.sq_norms(params, residuals, u)

    try:
        jax.eval_shape(norms, params, x)
    except MissingRuleError:
        return False
    return True


def _scale_layer() -> fnbp.Layer:
    """u = a z with a learned scalar a; written by hand, with no sq_norms rule."""

    def init(key, input_shape, dtype=jnp.float32):
        return tuple(input_shape), {"a": jnp.asarray(1.5, dtype)}

    def forward(params, z):
        return params["a"] * z, z

    def backward(params, z, v):
        return {"a": jnp.sum(v * z)}, params["a"] * v

    return fnbp.make_layer("scale", init, forward, backward)


def scale_ref(params, x):
    first, _, scale, last = params
    return ref_mm(last, scale["a"] * REF_SIGMA["tanh"](ref_mm(first, x)))


@pytest.mark.filterwarnings("ignore::fnbp.PerExampleFallbackWarning")
def test_a_layer_without_sq_norms_uses_the_per_example_fallback():
    model = fnbp.serial(fnbp.Linear(WIDTH), fnbp.Tanh(), _scale_layer(), fnbp.Linear(K))
    params = random_params(model)
    _, _, _, x, y = setup("mlp-2-relu")
    assert not keeps_books(model, params, x)
    got = fnbp_grads(model, fnbp.cross_entropy_loss, params, x, y)
    assert_matches(got, oracle_grads(scale_ref, ref_cross_entropy, params, x, y), F64_RTOL)


def summed_cross_entropy(t, y):
    return jnp.sum(fnbp.cross_entropy_loss(t, y), axis=-1)


def summed_ref_cross_entropy(t, y):
    return jnp.sum(ref_cross_entropy(t, y), axis=-1)


@pytest.mark.parametrize("summed", [False, True], ids=["loss-per-position", "loss-per-sequence"])
def test_per_example_engine_with_a_sequence_axis_per_example(summed):
    # Each example is a (T, d) sequence: the MM norms take the Gram form. With
    # one loss per position, J^(i) is the mean over the example's positions
    # (as J is the mean over all of them); a loss may also sum them itself.
    model, ref, params, x, y = setup("mlp-3-tanh")
    x, y = x.reshape(2, 2, D_IN), y.reshape(2, 2)
    loss, ref_loss = (
        (summed_cross_entropy, summed_ref_cross_entropy)
        if summed
        else (fnbp.cross_entropy_loss, ref_cross_entropy)
    )

    @jax.jit  # new shapes: compiled whole rather than primitive by primitive
    def run(params, x, y):
        return (
            oracle_loop(ref, ref_loss, params, x, y),
            fnbp.per_example_grads(model, loss, params, x, y),
            fnbp.per_example_grad_norms(model, loss, params, x, y),
        )

    (losses_ref, grads_ref), (losses, grads), (norm_losses, norms) = run(params, x, y)
    assert rel_err(losses, losses_ref) <= F64_RTOL and rel_err(grads, grads_ref) <= F64_RTOL
    assert norm_losses.shape == norms.shape == (2,)
    assert rel_err(norm_losses, losses_ref) <= F64_RTOL
    assert rel_err(norms, grad_norms(grads_ref)) <= F64_RTOL


# --- other losses ---------------------------------------------------------------------


@pytest.mark.parametrize("loss_name", ["mse", "logistic"])
@pytest.mark.parametrize("model_id", ["mlp-3-tanh", "resnet_s-1-relu"])
def test_mse_and_logistic_losses(loss_name, model_id):
    model, ref, params, x, _ = setup(model_id)
    if loss_name == "mse":
        loss, ref_loss = fnbp.mse_loss, ref_mse
        y = jnp.asarray(np.random.default_rng(3).standard_normal((N, K)))
    else:  # K independent logits per example, soft targets in [0, 1]
        loss, ref_loss = fnbp.logistic_loss, ref_logistic
        y = jnp.asarray(np.random.default_rng(3).uniform(size=(N, K)))
    got = fnbp_grads(model, loss, params, x, y)
    assert_matches(got, oracle_grads(ref, ref_loss, params, x, y), F64_RTOL)


# --- transformations: vmap, leading axes -------------------------------------------


@pytest.mark.parametrize("model_id", ["mlp-3-relu", "resnet_s-1-relu"])
def test_vmap_of_grad_through_apply_gives_per_example_losses_and_grads(model_id):
    model, _, params, x, y = setup(model_id)
    _, want = results(model_id)

    def one(params, x_i, y_i):  # one example: x_i of shape (d,), y_i a scalar label
        return fnbp.cross_entropy_loss(model.apply(params, x_i), y_i)

    per_example = jax.vmap(jax.value_and_grad(one), in_axes=(None, 0, 0))
    losses, grads = per_example(params, x, y)
    assert losses.shape == (N,)
    assert rel_err(losses, want["losses"]) <= F64_RTOL
    assert rel_err(grads, want["per_example_grads"]) <= F64_RTOL
    # the mean of vmapped per-example losses gives the batch gradient
    J, grads = jax.value_and_grad(lambda p: jnp.mean(jax.vmap(one, (None, 0, 0))(p, x, y)))(params)
    assert rel_err(J, want["J"]) <= F64_RTOL and rel_err(grads, want["grads"]) <= F64_RTOL
    if model_id.startswith("mlp"):  # and jitted
        losses, grads = jax.jit(per_example)(params, x, y)
        assert rel_err(losses, want["losses"]) <= F64_RTOL
        assert rel_err(grads, want["per_example_grads"]) <= F64_RTOL


@pytest.mark.parametrize("model_id", ["mlp-3-relu", "resnet_s-2-tanh"])
def test_any_leading_batch_axes_equal_the_flattened_batch(model_id):
    model, _, params, x, y = setup(model_id)
    _, want = results(model_id)  # for x of shape (4, d), y of shape (4,)
    x, y = x.reshape(2, 2, D_IN), y.reshape(2, 2)
    loss = fnbp.cross_entropy_loss

    @jax.jit  # new shapes: compiled whole rather than primitive by primitive
    def run(params, x, y):
        return (
            model.apply(params, x),
            fnbp.backprop(model, loss, params, x, y),
            jax.value_and_grad(apply_objective, argnums=(2, 3))(model, loss, params, x, y),
        )

    t, (J, grads), (J_apply, (grads_apply, dx)) = run(params, x, y)
    assert t.shape == (2, 2, K)
    assert rel_err(t.reshape(N, K), model.apply(params, x.reshape(N, D_IN))) <= F64_RTOL
    assert rel_err(J, want["J"]) <= F64_RTOL and rel_err(grads, want["grads"]) <= F64_RTOL
    assert rel_err(J_apply, want["J"]) <= F64_RTOL
    assert rel_err(grads_apply, want["grads"]) <= F64_RTOL
    assert rel_err(dx.reshape(N, D_IN), want["dx"]) <= F64_RTOL


# --- dtypes ---------------------------------------------------------------------------


def _as(tree, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def test_float32_against_the_float64_oracle():
    model, ref, params, x, y = setup("mlp-4-gelu", "float32")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves((params, x)))
    got = fnbp_grads_jit(model, fnbp.cross_entropy_loss, params, x, y)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got))
    want = oracle_grads(ref, ref_cross_entropy, _as(params, jnp.float64), _as(x, jnp.float64), y)
    assert_matches(got, want, F32_RTOL)


def test_bfloat16_params_with_float32_inputs():
    model, _, params32, x, y = setup("mlp-4-gelu", "float32")
    params = _as(params32, jnp.bfloat16)
    got = fnbp_grads_jit(model, fnbp.cross_entropy_loss, params, x, y)
    for name in ("grads", "grads_apply", "per_example_grads"):
        assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(got[name])), name
    for name in ("J", "J_apply", "dx_apply", "pe_losses", "norm_losses", "norms"):
        assert got[name].dtype == jnp.float32, name
    # against the float32 network at the same (bfloat16-rounded) values
    want = fnbp_grads_jit(model, fnbp.cross_entropy_loss, _as(params, jnp.float32), x, y)
    for name, value in got.items():
        err = rel_err(value, want[name])
        assert err <= BF16_RTOL, f"{name}: relative error {err:.3g}"


@pytest.mark.filterwarnings("ignore::fnbp.PerExampleFallbackWarning")
@pytest.mark.parametrize("with_sq_norms", [True, False], ids=["sq_norms", "per-example-fallback"])
def test_grad_norms_dtypes_agree_on_both_paths_for_bfloat16(with_sq_norms):
    layers = [fnbp.Linear(WIDTH), fnbp.Tanh()] + ([] if with_sq_norms else [_scale_layer()])
    model = fnbp.serial(*layers, fnbp.Linear(K))
    params = random_params(model, dtype="bfloat16")
    _, _, _, x, y = setup("mlp-2-relu", "float32")
    x = x.astype(jnp.bfloat16)
    assert keeps_books(model, params, x) == with_sq_norms
    losses, norms = fnbp.per_example_grad_norms(model, fnbp.cross_entropy_loss, params, x, y)
    pe_losses, pe_grads = fnbp.per_example_grads(model, fnbp.cross_entropy_loss, params, x, y)
    assert losses.dtype == norms.dtype == pe_losses.dtype == jnp.float32
    assert losses.shape == norms.shape == (N,)
    want = jnp.sqrt(
        sum(
            jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
            for g in jax.tree.leaves(pe_grads)
        )
    )
    assert rel_err(losses, pe_losses) <= BF16_RTOL
    assert rel_err(norms, want) <= BF16_RTOL


# --- bad input ------------------------------------------------------------------------

ENGINE = [fnbp.backprop, fnbp.per_example_grads, fnbp.per_example_grad_norms]


@pytest.mark.parametrize("fn", ENGINE, ids=lambda f: f.__name__)
def test_labels_with_another_number_of_examples_are_rejected(fn):
    model, _, params, x, y = setup("mlp-2-relu")
    with pytest.raises(
        ValueError,
        match=rf"{fn.__name__}: x has 4 examples \(x.shape=\(4, 5\)\)"
        r" but y has 3 \(y.shape=\(3,\)\)",
    ):
        fn(model, fnbp.cross_entropy_loss, params, x, y[:3])


def test_labels_whose_inner_leading_axes_differ_are_rejected():
    model, _, params, x, _ = setup("mlp-2-relu")
    x = x.reshape(2, 2, D_IN)
    y = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"cross_entropy_loss: y must have shape"):
        fnbp.backprop(model, fnbp.cross_entropy_loss, params, x, y)


@pytest.mark.parametrize("fn", ENGINE, ids=lambda f: f.__name__)
def test_input_that_does_not_fit_the_first_layer_names_the_layer(fn):
    model, _, params, _, y = setup("mlp-3-relu")
    x = jnp.zeros((N, D_IN + 2))
    with pytest.raises(
        ValueError,
        match=r"mlp\[0\] linear\(7\): input has shape \(.*7,?\) but "
        r"W.shape=\(7, 5\) expects 5 features",
    ):
        fn(model, fnbp.cross_entropy_loss, params, x, y)
    with pytest.raises(ValueError, match=r"mlp\[0\] linear\(7\)"):
        jax.jit(fn, static_argnums=(0, 1))(model, fnbp.cross_entropy_loss, params, x, y)


def test_input_that_does_not_fit_apply_names_the_layer():
    model, _, params, _, y = setup("resnet_s-1-relu")
    with pytest.raises(ValueError, match=r"resnet_s\[0\] linear\(7\): input has shape \(4, 6\)"):
        jax.grad(apply_objective, argnums=2)(
            model, fnbp.cross_entropy_loss, params, jnp.zeros((N, D_IN + 1)), y
        )


def test_engine_rejects_a_model_that_is_not_a_layer_and_a_loss_that_is_not_callable():
    model, _, params, x, y = setup("mlp-2-relu")
    with pytest.raises(TypeError, match=r"backprop: model must be a fnbp Layer.*got function"):
        fnbp.backprop(lambda p, x: x, fnbp.cross_entropy_loss, params, x, y)
    with pytest.raises(TypeError, match=r"backprop: loss must be callable.*got str"):
        fnbp.backprop(model, "cross_entropy", params, x, y)


def test_backprop_takes_nested_lists_and_refuses_what_is_not_numbers():
    model, _, params, x, y = setup("mlp-2-relu")
    loss = fnbp.cross_entropy_loss
    got = fnbp.backprop(model, loss, params, np.asarray(x).tolist(), np.asarray(y).tolist())
    assert rel_err(got, fnbp.backprop(model, loss, params, x, y)) <= 1e-15
    with pytest.raises(
        TypeError,
        match=r"^backprop: x must be an array of numbers \(a jax or "
        r"NumPy array, or a nested list of numbers\), got str "
        r"'abc'$",
    ):
        fnbp.backprop(model, loss, params, "abc", y)
    with pytest.raises(
        TypeError,
        match=r"^backprop: y must be an array of targets \(class "
        r"labels or values\), got list \[\[0\], 1\]$",
    ):
        fnbp.backprop(model, loss, params, x, [[0], 1])


def test_per_example_grad_norms_rejects_a_loss_without_one_value_per_example():
    model, _, params, x, y = setup("mlp-2-relu")

    def mean_loss(t, y):
        return jnp.mean(fnbp.cross_entropy_loss(t, y))

    with pytest.raises(
        ValueError,
        match=r"per_example_grad_norms: the loss returned shape \(\) "
        r"for 4 examples; it must return one loss per example",
    ):
        fnbp.per_example_grad_norms(model, mean_loss, params, x, y)


def test_mismatched_params_are_rejected_by_the_engine():
    model, _, params, x, y = setup("mlp-3-relu")
    with pytest.raises(ValueError, match=r"mlp: params must be a tuple of 5 entries .*got 4"):
        fnbp.backprop(model, fnbp.cross_entropy_loss, params[:4], x, y)
    other = setup("resnet_s-1-relu")[2]
    with pytest.raises(ValueError, match=r"mlp: params must be a tuple of 5 entries"):
        fnbp.per_example_grads(model, fnbp.cross_entropy_loss, other, x, y)


def test_jax_grad_of_backprops_J_is_autodiff_of_the_forward_pass():
    """What backprop's docstring says: J is computed by the forward pass (the rules' fwd, plain
    code), so jax.grad of the J it returns is JAX's autodiff of that code, not B. A layer
    whose B is deliberately doubled shows it: backprop's grads and jax.grad through
    model.apply are doubled; jax.grad of backprop's J is not."""

    def init(key, input_shape, dtype=jnp.float32):
        return tuple(input_shape), {"a": jnp.full(input_shape[-1:], 1.5, dtype)}

    def forward(params, z):
        return params["a"] * z, z

    def doubled(params, z, v):
        return {"a": 2 * jnp.sum(v * z, axis=0)}, 2 * params["a"] * v

    model = fnbp.serial(fnbp.Linear(3), fnbp.make_layer("scale2", init, forward, doubled))
    _, params = model.init(jax.random.key(0), (4,), jnp.float64)
    x, y = jnp.ones((5, 4)), jnp.arange(5) % 3
    loss = fnbp.cross_entropy_loss

    def plain(p):  # the same network, autodiff only
        return jnp.mean(ref_cross_entropy(p[1]["a"] * fnbp.rules.mm_fwd(x, **p[0])[0], y))

    true = jax.grad(plain)(params)
    _, by_backprop = fnbp.backprop(model, loss, params, x, y)
    by_apply = jax.grad(lambda p: jnp.mean(loss(model.apply(p, x), y)))(params)
    of_J = jax.grad(lambda p: fnbp.backprop(model, loss, p, x, y)[0])(params)
    assert rel_err(by_backprop[1]["a"], 2 * true[1]["a"]) <= 1e-12
    assert rel_err(by_apply[1]["a"], 2 * true[1]["a"]) <= 1e-12
    assert rel_err(of_J, true) <= 1e-12
