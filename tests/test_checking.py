"""Checked mode: run-time errors for labels out of range, non-finite input and
traced settings outside their domain; models, whose layers check the model's input,
their params and their outputs at one place and name the first non-finite value where
it enters; the unchecked default and its cost (nothing added to the program)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import iter_eqns, jit_cotangents, primitive_names, rel_err

import fnbp

K = 4
RNG = np.random.default_rng(0)
Z = jnp.asarray(RNG.standard_normal((3, 5)))
T = jnp.asarray(RNG.standard_normal((3, K)))
LOGITS = jnp.asarray(RNG.standard_normal(3))
LABELS = jnp.array([0, 3, 1])

# Every declared activation and its examples: z, then the example's scalar settings.
ACTIVATIONS = {
    name: (
        functools.partial(rule.function, **example.kwargs),
        (Z,) + example.make_args(jax.random.key(0), Z.dtype)[1:],
    )
    for rule in fnbp.rules.registry().values()
    if rule.family == "activation"
    for name, example in rule.examples.items()
}

# rule -> valid positional arguments
VALID = {
    "mm": (fnbp.mm, (Z, jnp.asarray(RNG.standard_normal((2, 5))), jnp.ones(2))),
    **ACTIVATIONS,
    "mse_loss": (fnbp.mse_loss, (T, jnp.zeros((3, K)))),
    "logistic_loss": (fnbp.logistic_loss, (LOGITS, jnp.array([0.0, 1.0, 0.3]))),
    "cross_entropy_loss": (fnbp.cross_entropy_loss, (T, LABELS)),
}


# One checked function per rule, shared by the tests below: fnbp.checked
# compiles once per wrapper and shapes, so reusing it saves compilations.
CHECKED = {name: fnbp.checked(f) for name, (f, _) in VALID.items()}


def _with(args: tuple, position: int, value: float) -> tuple:
    """``args`` with the first entry of argument ``position`` set to ``value``."""
    bad = np.array(args[position])
    bad.reshape(-1)[0] = value
    return args[:position] + (jnp.asarray(bad),) + args[position + 1 :]


# --- labels ------------------------------------------------------------------------


@pytest.mark.parametrize("label", [-1, K, 100])
def test_checked_cross_entropy_raises_for_label_out_of_range(label):
    y = jnp.array([0, label, 1])
    with pytest.raises(
        ValueError,
        match=r"cross_entropy_loss: y holds a label outside "
        r"\[0, 4\); labels are class indices for t's last "
        r"axis of length 4",
    ):
        CHECKED["cross_entropy_loss"](T, y)


def test_checked_gradient_raises_for_label_out_of_range():
    grad = fnbp.checked(jax.grad(lambda t, y: jnp.mean(fnbp.cross_entropy_loss(t, y))))
    unchecked = jax.jit(jax.grad(lambda t, y: jnp.mean(fnbp.cross_entropy_loss(t, y))))
    np.testing.assert_allclose(grad(T, LABELS), unchecked(T, LABELS), rtol=1e-14)
    with pytest.raises(ValueError, match=r"y holds a label outside \[0, 4\)"):
        grad(T, jnp.array([-2, 3, 1]))


def test_unchecked_label_out_of_range_gives_nan_loss_and_nan_cotangent_row():
    y = jnp.array([0, K, 1])
    loss, (dt,) = jit_cotangents(fnbp.cross_entropy_loss, (T, y), jnp.ones(3), (0,))
    loss, dt = np.asarray(loss), np.asarray(dt)
    assert np.isnan(loss[1]) and np.all(np.isfinite(loss[[0, 2]]))
    assert np.all(np.isnan(dt[1])) and np.all(np.isfinite(dt[[0, 2]]))


# --- non-finite input --------------------------------------------------------------------

NON_FINITE = [  # (rule, argument position, argument name)
    ("mm", 0, "z"),
    ("mm", 1, "W"),
    ("mm", 2, "b"),
    *[(name, 0, "z") for name in fnbp.rules.registry() if name in ACTIVATIONS],
    ("mse_loss", 0, "t"),
    ("mse_loss", 1, "y"),
    ("logistic_loss", 0, "t"),
    ("logistic_loss", 1, "y"),
    ("cross_entropy_loss", 0, "t"),
]


@pytest.mark.parametrize(
    "rule,position,name", NON_FINITE, ids=[f"{r}-{n}" for r, _, n in NON_FINITE]
)
def test_checked_raises_for_non_finite_input(rule, position, name):
    _, args = VALID[rule]
    for value in (np.nan, np.inf):
        with pytest.raises(
            ValueError,
            match=rf"{rule}: {name} contains NaN or infinity; "
            r"clean the input",
        ):
            CHECKED[rule](*_with(args, position, value))


# --- traced settings ---------------------------------------------------------------------


def test_checked_raises_for_traced_gamma_outside_open_unit_interval():
    for gamma in (0.0, 1.0, -0.5, 1.5):  # gamma is traced: invisible at trace time
        with pytest.raises(
            ValueError,
            match=r"leaky_relu: gamma must lie in the open "
            r"interval \(0, 1\)",
        ):
            CHECKED["leaky_relu"](Z, jnp.asarray(gamma))


def test_checked_raises_for_traced_beta_not_positive():
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"softplus: beta must be > 0"):
            CHECKED["softplus"](Z, jnp.asarray(beta))


def test_checked_raises_for_logistic_target_outside_unit_interval():
    with pytest.raises(ValueError, match=r"logistic_loss: y holds a target outside \[0, 1\]"):
        CHECKED["logistic_loss"](LOGITS, jnp.array([0.0, 1.5, 0.2]))


def test_traced_gamma_outside_unit_interval_is_used_as_given_when_unchecked():
    out = jax.jit(fnbp.leaky_relu)(jnp.array([-2.0, 3.0]), jnp.asarray(1.5))
    np.testing.assert_array_equal(out, [-3.0, 3.0])


# --- valid input: the same values, and no cost when unchecked -------------------------------


@pytest.mark.parametrize("rule", sorted(VALID))
def test_checked_returns_the_unchecked_values_for_valid_input(rule):
    f, args = VALID[rule]
    assert rel_err(CHECKED[rule](*args), jax.jit(f)(*args)) <= 1e-15


def test_checked_passes_keyword_settings_as_static():
    np.testing.assert_allclose(
        CHECKED["gelu"](Z, approximate=True), CHECKED["gelu(approximate)"](Z), rtol=1e-15
    )


@pytest.mark.parametrize("rule", sorted(VALID))
def test_unchecked_rules_add_no_run_time_checks(rule):
    f, args = VALID[rule]
    names = primitive_names(f, *args)
    assert "custom_vjp_call" in names
    assert not [n for n in names if "check" in n], names


def test_checked_rejects_a_non_callable():
    with pytest.raises(TypeError, match=r"^checked: f must be callable, got int$"):
        fnbp.checked(3)


# --- models: every layer checks its input, its params and its output at one place -----------

NET = fnbp.mlp([6, 3])
NET_PARAMS = NET.init(jax.random.key(0), (5,))[1]
X = jnp.asarray(RNG.standard_normal((3, 5)))
Y = jnp.array([0, 2, 1])
CHECKED_APPLY = fnbp.checked(NET.apply)
CHECKED_BACKPROP = fnbp.checked(
    lambda p, x, y: fnbp.backprop(NET, fnbp.cross_entropy_loss, p, x, y)
)

INPUT_FIX = (
    "clean the input or find where the non-finite values come from "
    "(jax.config.update('jax_debug_nans', True))"
)
PARAMS_FIX = (
    "the parameters were not finite before this call: a training step that "
    "diverged (lower the learning rate, clip the gradients), an init or a "
    "checkpoint that holds them; find the step that made them"
)


def _message(where: str, value: str, fix: str) -> str:
    """The exact message of a failing finite check, with checkify's suffix."""
    return (
        "^" + re.escape(f"{where} contains NaN or infinity ({value}); {fix} (`check` failed)") + "$"
    )


def _set(tree, path: tuple, value: float):
    """``tree`` with the first entry of the leaf at ``path`` set to ``value``."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    treedef = jax.tree_util.tree_structure(tree)
    return treedef.unflatten(
        [leaf.at[(0,) * leaf.ndim].set(value) if tuple(p) == path else leaf for p, leaf in leaves]
    )


def test_checked_apply_names_the_models_input_and_the_first_bad_entry():
    with pytest.raises(
        ValueError,
        match=_message(
            "mlp: x (the model's input)", "the first is at index (1, 3): nan", INPUT_FIX
        ),
    ):
        CHECKED_APPLY(NET_PARAMS, X.at[1, 3].set(jnp.nan).at[2, 0].set(jnp.inf))


def test_checked_apply_names_the_parameter_leaf_by_its_path():
    path = (jax.tree_util.SequenceKey(2), jax.tree_util.DictKey("b"))
    with pytest.raises(
        ValueError,
        match=_message(
            "mlp[2] linear(3): params[2]['b']", "the first is at index (0,): inf", PARAMS_FIX
        ),
    ):
        CHECKED_APPLY(_set(NET_PARAMS, path, jnp.inf), X)


def test_checked_backprop_blames_the_input_where_it_enters_not_the_logits():
    loss = fnbp.cross_entropy_loss
    J, grads = CHECKED_BACKPROP(NET_PARAMS, X, Y)
    want = jax.jit(lambda p, x, y: fnbp.backprop(NET, loss, p, x, y))(NET_PARAMS, X, Y)
    assert rel_err((J, grads), want) <= 1e-15
    with pytest.raises(ValueError, match=r"^mlp: x \(the model's input\) contains NaN"):
        CHECKED_BACKPROP(NET_PARAMS, X.at[0, 0].set(jnp.nan), Y)
    path = (jax.tree_util.SequenceKey(0), jax.tree_util.DictKey("W"))
    with pytest.raises(
        ValueError,
        match=r"^mlp\[0\] linear\(6\): params\[0\]\['W'\] contains "
        r"NaN or infinity \(the first is at index \(0, 0\): "
        r"nan\)",
    ):
        CHECKED_BACKPROP(_set(NET_PARAMS, path, jnp.nan), X, Y)
    with pytest.raises(
        ValueError,
        match=r"^cross_entropy_loss: y holds a label outside "
        r"\[0, 3\)",
    ):
        CHECKED_BACKPROP(NET_PARAMS, X, jnp.array([0, 3, 1]))


def test_checked_apply_names_the_layer_whose_output_overflows():
    net = fnbp.serial(fnbp.Linear(4), fnbp.Relu(), fnbp.Linear(2), name="net")
    params = net.init(jax.random.key(0), (3,), jnp.float16)[1]
    params = ({"W": jnp.full((4, 3), 300, jnp.float16), "b": params[0]["b"]},) + params[1:]
    fix = (
        "its input and parameters are finite, so the layer itself made it (an overflow of "
        "its dtype, a 0/0); compute in a wider dtype (fnbp.Precision) or scale the input, "
        "and find the operation with jax.config.update('jax_debug_nans', True)"
    )
    with pytest.raises(
        ValueError,
        match=_message("net[0] linear(4): its output", "the first is at index (0, 0): inf", fix),
    ):
        fnbp.checked(net.apply)(params, jnp.full((2, 3), 100, jnp.float16))


def _scale_layer(name: str):
    """A user's layer u = a (.) z, made with make_layer."""

    def init(key, shape, dtype=jnp.float32):
        return shape, {"a": jnp.ones(shape[-1:], dtype)}

    def backward(p, z, v):
        return {"a": jnp.sum(v * z, axis=tuple(range(v.ndim - 1)))}, p["a"] * v

    return fnbp.make_layer(name, init, lambda p, z: (p["a"] * z, z), backward)


# Every kind of layer in one model: a NaN in each of its parameter leaves is named by the
# layer it belongs to and its path; one compilation for all.
EVERY_LAYER = fnbp.serial(
    fnbp.Conv2D(2, 3),
    fnbp.MaxPool((2, 2)),
    fnbp.AvgPool((1, 1)),
    fnbp.Flatten(3),
    fnbp.LayerNorm(),
    fnbp.residual(fnbp.serial(fnbp.Linear(8), fnbp.Gelu(), name="block")),
    fnbp.remat(fnbp.serial(fnbp.RMSNorm(), fnbp.Linear(6), fnbp.Tanh(), name="segment")),
    _scale_layer("scale"),
    fnbp.layer_from_rule(
        fnbp.leaky_relu,
        fnbp.rules.leaky_relu_fwd,
        fnbp.rules.leaky_relu_bwd,
        init=lambda key, shape, dtype: (shape, (jnp.asarray(0.1, dtype),)),
        name="leaky",
    ),
    fnbp.Linear(3),
    name="net",
)
EVERY_LEAF = {  # path in params -> the layer's place
    "[0]['b']": "net[0] conv2d(2, 3)",
    "[0]['w']": "net[0] conv2d(2, 3)",
    "[4]['beta']": "net[4] layer_norm(eps=1e-05)",
    "[4]['gamma']": "net[4] layer_norm(eps=1e-05)",
    "[5][0]['W']": "net[5] block[0] linear(8)",
    "[5][0]['b']": "net[5] block[0] linear(8)",
    "[6][0]['gamma']": "net[6] segment[0] rms_norm(eps=1e-06)",
    "[6][1]['W']": "net[6] segment[1] linear(6)",
    "[6][1]['b']": "net[6] segment[1] linear(6)",
    "[7]['a']": "net[7] scale",
    "[8][0]": "net[8] leaky",
    "[9]['W']": "net[9] linear(3)",
    "[9]['b']": "net[9] linear(3)",
}


def test_checked_mode_covers_every_kind_of_layer_and_names_each_parameter():
    params = EVERY_LAYER.init(jax.random.key(1), (4, 4, 1))[1]
    x = jnp.asarray(RNG.standard_normal((2, 4, 4, 1)))
    paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert sorted(jax.tree_util.keystr(p) for p in paths) == sorted(EVERY_LEAF)
    loss = fnbp.cross_entropy_loss
    grad = fnbp.checked(
        lambda p, x: jax.grad(lambda p: jnp.mean(loss(EVERY_LAYER.apply(p, x), jnp.array([0, 2]))))(
            p
        )
    )
    want = jax.jit(
        lambda p, x: jax.grad(lambda p: jnp.mean(loss(EVERY_LAYER.apply(p, x), jnp.array([0, 2]))))(
            p
        )
    )(params, x)
    assert rel_err(grad(params, x), want) <= 1e-15
    for path in paths:
        where = f"{EVERY_LEAF[jax.tree_util.keystr(path)]}: params{jax.tree_util.keystr(path)}"
        with pytest.raises(
            ValueError, match="^" + re.escape(f"{where} contains NaN or infinity (")
        ):
            grad(_set(params, tuple(path), jnp.nan), x)
    with pytest.raises(
        ValueError,
        match=r"^net: x \(the model's input\) contains NaN or "
        r"infinity \(the first is at index \(1, 2, 3, 0\): "
        r"inf\)",
    ):
        grad(params, x.at[1, 2, 3, 0].set(jnp.inf))


def test_checked_user_layer_alone_names_its_input_and_escapes_braces_in_its_name():
    layer = _scale_layer("scale{1}")
    checked = fnbp.checked(layer.apply)
    with pytest.raises(
        ValueError,
        match=_message(
            "scale{1}: x (the model's input)", "the first is at index (0, 1): nan", INPUT_FIX
        ),
    ):
        checked({"a": jnp.ones(3)}, jnp.ones((2, 3)).at[0, 1].set(jnp.nan))
    with pytest.raises(
        ValueError,
        match=_message("scale{1}: params['a']", "the first is at index (2,): -inf", PARAMS_FIX),
    ):
        checked({"a": jnp.ones(3).at[2].set(-jnp.inf)}, jnp.ones((2, 3)))


@pytest.mark.parametrize(
    "fn",
    [fnbp.per_example_grads, fnbp.per_example_grad_norms, fnbp.grad_moments, fnbp.clipped_grads],
    ids=lambda f: f.__name__,
)
def test_checked_per_example_functions_raise_for_input_params_and_labels(fn):
    extra = (1.0,) if fn is fnbp.clipped_grads else ()
    checked = fnbp.checked(lambda p, x, y: fn(NET, fnbp.cross_entropy_loss, p, x, y, *extra))
    checked(NET_PARAMS, X, Y)
    with pytest.raises(
        ValueError,
        match=_message(
            "mlp: x (the model's input)", "the first is at index (2, 4): nan", INPUT_FIX
        ),
    ):
        checked(NET_PARAMS, X.at[2, 4].set(jnp.nan), Y)
    path = (jax.tree_util.SequenceKey(2), jax.tree_util.DictKey("W"))
    with pytest.raises(
        ValueError,
        match=_message(
            "mlp[2] linear(3): params[2]['W']", "the first is at index (0, 0): inf", PARAMS_FIX
        ),
    ):
        checked(_set(NET_PARAMS, path, jnp.inf), X, Y)
    with pytest.raises(
        ValueError,
        match=r"^cross_entropy_loss: y holds a label outside "
        r"\[0, 3\)",
    ):
        checked(NET_PARAMS, X, jnp.array([0, -1, 1]))


def _inner_eqns(jaxpr) -> int:
    """The number of equations inside the one custom_vjp call of ``model.apply``'s jaxpr."""
    (call,) = [e for e in jaxpr.eqns if "custom_vjp" in e.primitive.name]
    from jax.extend import core

    (inner,) = core.jaxprs_in_params(call.params)
    return len(list(iter_eqns(inner)))


def test_unchecked_apply_is_the_rules_forward_alone():
    """The layer machinery adds nothing to an unchecked program: model.apply's jaxpr holds
    the rules' forward functions and nothing else."""
    p = NET_PARAMS
    rules = fnbp.rules

    def composed(p, x):
        h = rules.mm_fwd(x, p[0]["W"], p[0]["b"])[0]
        h = rules.relu_fwd(h)[0]
        return rules.mm_fwd(h, p[2]["W"], p[2]["b"])[0]

    assert _inner_eqns(jax.make_jaxpr(NET.apply)(p, X).jaxpr) == len(
        list(iter_eqns(jax.make_jaxpr(composed)(p, X).jaxpr))
    )
    for f in (
        NET.apply,
        lambda p, x: fnbp.backprop(NET, fnbp.cross_entropy_loss, p, x, Y),
        lambda p, x: fnbp.clipped_grads(NET, fnbp.cross_entropy_loss, p, x, Y, 1.0),
    ):
        assert not [n for n in primitive_names(f, p, X) if "check" in n]
    every = EVERY_LAYER.init(jax.random.key(1), (4, 4, 1))[1]
    assert not [
        n for n in primitive_names(EVERY_LAYER.apply, every, jnp.ones((2, 4, 4, 1))) if "check" in n
    ]
