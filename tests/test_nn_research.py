"""Layers for research code: layer_from_rule, the errors serial names, explicit init families,
the layer factories, and fnbp.cnn on 1-D signals (eqs. 7.48-7.50).

Oracles are jax.grad of plain-jnp functions written here, in float64.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import rel_err

import fnbp

F64_RTOL = 1e-10
LOSS = fnbp.cross_entropy_loss


def normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def ref_mm(p, z):
    return jnp.einsum("...m,nm->...n", z, p["W"]) + p["b"]


def ref_cross_entropy(t, y):
    top = jnp.max(t, axis=-1, keepdims=True)
    log_z = top[..., 0] + jnp.log(jnp.sum(jnp.exp(t - top), axis=-1))
    return jnp.mean(log_z - jnp.take_along_axis(t, y[..., None], axis=-1)[..., 0])


def assert_backprop_equals_oracle(model, ref, params, x, y):
    """fnbp.backprop and jax.grad through model.apply against jax.grad of ref (float64)."""
    loss, grads = fnbp.backprop(model, LOSS, params, x, y)
    via_apply = jax.grad(lambda p: jnp.mean(LOSS(model.apply(p, x), y)))(params)
    ref_loss, ref_grads = jax.value_and_grad(lambda p: ref_cross_entropy(ref(p, x), y))(params)
    assert rel_err(loss, ref_loss) <= F64_RTOL
    for got in (grads, via_apply):
        assert jax.tree.structure(got) == jax.tree.structure(ref_grads)
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref_grads)):
            assert g.dtype == jnp.float64
            assert rel_err(g, r) <= F64_RTOL, (g, r)


# --- layer_from_rule: a user's jax.custom_vjp rule as a Layer ----------------------


@jax.custom_vjp
def softsign(z):
    return z / (1 + jnp.abs(z))


def softsign_fwd(z):
    d = 1 + jnp.abs(z)
    return z / d, d


def softsign_bwd(d, v):
    return (v / d**2,)


softsign.defvjp(softsign_fwd, softsign_bwd)


@jax.custom_vjp
def scale(z, a):
    return a * z


def scale_fwd(z, a):
    return a * z, (z, a)


def scale_bwd(res, v):
    z, a = res
    return a * v, jnp.sum(v * z, axis=tuple(range(v.ndim - 1)))


scale.defvjp(scale_fwd, scale_bwd)


def scale_init(key, input_shape, dtype=jnp.float32):
    return tuple(input_shape), (jnp.full(input_shape[-1:], 1.5, dtype),)


def test_layer_from_rule_gradients_equal_the_oracle():
    act = fnbp.layer_from_rule(softsign, softsign_fwd, softsign_bwd)
    sc = fnbp.layer_from_rule(scale, scale_fwd, scale_bwd, init=scale_init)
    assert act.name == "softsign" and sc.name == "scale"
    model = fnbp.serial(fnbp.Linear(6), sc, act, fnbp.Linear(3))
    _, params = model.init(jax.random.key(0), (5,), jnp.float64)
    params = (params[0], (normal((6,), 3),), (), {"W": normal((3, 6), 4), "b": normal((3,), 5)})
    x, y = normal((4, 5), 1), jnp.array([0, 2, 1, 2])

    def ref(p, x):
        first, (a,), _, last = p
        z = a * ref_mm(first, x)
        return ref_mm(last, z / (1 + jnp.abs(z)))

    assert_backprop_equals_oracle(model, ref, params, x, y)


def test_layer_from_rule_with_a_forward_function_runs_under_fnbp_jvp():
    """f_jvp gives the layer its forward mode: fnbp.jvp equals jax.jvp of the reference."""

    def softsign_jvp(d, t):
        (t_z,) = t
        return t_z / d**2

    def scale_jvp(res, t):
        z, a = res
        t_z, t_a = t
        out = 0 if t_z is None else a * t_z
        return out if t_a is None else out + t_a * z

    act = fnbp.layer_from_rule(softsign, softsign_fwd, softsign_bwd, f_jvp=softsign_jvp)
    sc = fnbp.layer_from_rule(scale, scale_fwd, scale_bwd, init=scale_init, f_jvp=scale_jvp)
    model = fnbp.serial(fnbp.Linear(6), sc, act, fnbp.Linear(3))
    _, params = model.init(jax.random.key(0), (5,), jnp.float64)
    x = normal((4, 5), 1)
    dparams = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.3, params)

    def ref(p, x):
        first, (a,), _, last = p
        z = a * ref_mm(first, x)
        return ref_mm(last, z / (1 + jnp.abs(z)))

    _, got = fnbp.jvp(lambda p: model.apply(p, x), (params,), (dparams,))
    _, want = jax.jvp(lambda p: ref(p, x), (params,), (dparams,))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match="f_jvp must be the rule's forward function"):
        fnbp.layer_from_rule(softsign, softsign_fwd, softsign_bwd, f_jvp="no")


def test_layer_from_rule_backward_is_the_users_rule_not_autodiff():
    # straight-through rounding: autodiff of round() gives 0, the rule passes v on
    def round_fwd(z):
        return jnp.round(z), None

    def round_bwd(res, v):
        return (v,)

    layer = fnbp.layer_from_rule(jnp.round, round_fwd, round_bwd, name="ste_round")
    z = 3 * normal((2, 4), 7)
    grad = jax.grad(lambda z: jnp.sum(layer.apply((), z) * z))(z)
    np.testing.assert_array_equal(grad, jnp.round(z) + z)


def test_layer_from_rule_names_the_layer_when_bwd_returns_the_wrong_count():
    def bad_bwd(res, v):
        z, a = res
        return (a * v,)  # dz only: the cotangent of a is missing

    layer = fnbp.layer_from_rule(scale, scale_fwd, bad_bwd, init=scale_init)
    model = fnbp.serial(fnbp.Linear(4), layer, name="net")
    _, params = model.init(jax.random.key(0), (3,))
    with pytest.raises(
        TypeError,
        match=r"net\[1\] scale: f_bwd must return a tuple of 2 "
        r"cotangents, one per argument of f \(z and 1 params\), "
        r"got 1 values",
    ):
        fnbp.backprop(model, fnbp.mse_loss, params, jnp.ones((2, 3)), jnp.ones((2, 4)))
    with pytest.raises(
        TypeError,
        match=r"layer_from_rule: f_bwd must be the rule's bwd "
        r"function",
    ):
        fnbp.layer_from_rule(scale, scale_fwd, None)


# --- serial names the layer whose init or backward is wrong -----------------------


def _no_params(key, shape, dtype=None):
    return tuple(shape), ()


def test_serial_backward_names_a_layer_that_returns_a_rules_tuple():
    # a rule's bwd returns (dz,); a Layer's backward must return (dparams, dz)
    wrong = fnbp.make_layer(
        "my_relu",
        _no_params,
        lambda p, z: fnbp.rules.relu_fwd(z),
        lambda p, res, v: fnbp.rules.relu_bwd(res, v),
    )
    model = fnbp.serial(fnbp.Linear(4), wrong, fnbp.Linear(2), name="net")
    _, params = model.init(jax.random.key(0), (3,))
    x, y = jnp.ones((2, 3)), jnp.array([0, 1])
    pattern = (
        r"net\[1\] my_relu: backward must return the pair \(dparams, dz\), got a tuple "
        r"of 1 values\. A rule's bwd returns one cotangent per argument"
    )
    with pytest.raises(TypeError, match=pattern):
        fnbp.backprop(model, LOSS, params, x, y)
    with pytest.raises(TypeError, match=pattern):
        jax.grad(lambda p: jnp.sum(model.apply(p, x)))(params)


def test_serial_backward_names_a_layer_whose_dparams_do_not_match_its_params():
    def backward(params, z, v):
        return params["a"] * v, jnp.sum(v * z)  # (dz, da): the pair the wrong way round

    wrong = fnbp.make_layer(
        "swapped",
        lambda key, shape, dtype=jnp.float32: (tuple(shape), {"a": jnp.ones(())}),
        lambda p, z: (p["a"] * z, z),
        backward,
    )
    model = fnbp.serial(fnbp.Linear(4), wrong, name="net")
    _, params = model.init(jax.random.key(0), (3,))
    with pytest.raises(
        TypeError,
        match=r"net\[1\] swapped: backward returned dparams with "
        r"structure .* but the params have structure",
    ):
        fnbp.backprop(model, fnbp.mse_loss, params, jnp.ones((2, 3)), jnp.ones((2, 4)))


def test_serial_init_names_the_layer_whose_init_is_wrong():
    # (params, shape) the wrong way round used to fail in the *next* layer's init
    swapped = fnbp.make_layer(
        "swapped_init",
        lambda key, shape, dtype=None: ({"a": jnp.ones(())}, tuple(shape)),
        lambda p, z: (z, None),
        lambda p, r, v: ((), v),
    )
    model = fnbp.serial(fnbp.Linear(4), swapped, fnbp.Linear(2), name="net")
    with pytest.raises(
        TypeError,
        match=r"net\[1\] swapped_init: init\(key, \(4,\), dtype\) "
        r"must return \(output_shape, params\)",
    ):
        model.init(jax.random.key(0), (3,))

    def failing(key, shape, dtype=None):
        raise ValueError(f"needs 2 axes, got {tuple(shape)}")

    two_d = fnbp.make_layer("two_d", failing, lambda p, z: (z, None), lambda p, r, v: ((), v))
    model = fnbp.serial(fnbp.Linear(4), two_d, name="net")
    with pytest.raises(
        ValueError,
        match=r"^net\[1\] two_d: needs 2 axes, got \(4,\) "
        r"\(in its init\)$",
    ):
        model.init(jax.random.key(0), (3,))


# --- the initialization family of a custom activation is explicit -------------------


def test_custom_activation_needs_an_explicit_init_family():
    act = fnbp.layer_from_rule(softsign, softsign_fwd, softsign_bwd)
    for build in (
        lambda **kw: fnbp.mlp([4, 2], act, **kw),
        lambda **kw: fnbp.resnet_s(4, 1, 2, act, **kw),
    ):
        with pytest.raises(
            ValueError,
            match=r"the activation 'softsign' is not a declared "
            r"rule's layer, so its initialization family is "
            r"unknown; pass init='he'",
        ):
            build()
    model = fnbp.mlp([64, 2], act, init="glorot")
    _, params = model.init(jax.random.key(0), (64,))
    # Glorot: variance 2 / (fan_in + fan_out) = 1/64; He would be 2/64
    assert 0.7 / 64 < float(jnp.var(params[0]["W"])) < 1.3 / 64
    with pytest.raises(ValueError, match=r"mlp: init must be one of \['glorot', 'he', 'lecun'\]"):
        fnbp.mlp([4, 2], "relu", init="xavier")
    # a declared rule keeps its family: tanh's is Glorot, relu's He
    _, params = fnbp.mlp([64, 2], "relu").init(jax.random.key(0), (64,))
    assert 1.4 / 64 < float(jnp.var(params[0]["W"])) < 2.6 / 64


def test_every_layer_is_a_factory():
    factories = [n for n in fnbp.nn.__all__ if n[0].isupper() and n != "Layer"]
    assert {"Relu", "Gelu", "Tanh", "Linear", "Conv1D", "MaxPool"} <= set(factories)
    for n in factories:
        assert callable(getattr(fnbp.nn, n)) and not isinstance(getattr(fnbp.nn, n), fnbp.Layer)
        assert getattr(fnbp, n) is getattr(fnbp.nn, n)
    assert isinstance(fnbp.nn.Relu(), fnbp.Layer) and fnbp.nn.Relu() is fnbp.nn.Relu()
    # every rule declared with a layer has its factory in fnbp.nn, giving that rule's layer
    for name, rule in fnbp.rules.registry().items():
        if rule.layer is not None:
            factory = rule.layer.factory or name.capitalize()
            assert getattr(fnbp.nn, factory)() is fnbp.nn.rule_layer(name), name
    assert fnbp.nn.Gelu().name == "gelu(approximate=False)"
    with pytest.raises(
        TypeError,
        match=r"serial: argument 1 is function \(a layer factory: "
        r"call it, fnbp.Relu\(...\)\), not a Layer",
    ):
        fnbp.serial(fnbp.Linear(3), fnbp.Relu)


# --- fnbp.cnn on 1-D signals (Conv1D, eqs. 7.48-7.50, and 1-D max pooling) -----------


def ref_conv1d_same(z, w, b):
    """Plain-jnp conv1d, 'same' padding, odd k: u[i, c2] = sum_j,c z[i + j - k//2, c] w[j, c, c2]."""
    k, length = w.shape[0], z.shape[-2]
    pad = jnp.pad(z, [(0, 0)] * (z.ndim - 2) + [(k // 2, k // 2), (0, 0)])
    return (
        sum(jnp.einsum("...lc,cd->...ld", pad[..., j : j + length, :], w[j]) for j in range(k)) + b
    )


def ref_max_pool1d(z, p):
    n = z.shape[-2] // p
    return jnp.max(z[..., : n * p, :].reshape(z.shape[:-2] + (n, p, z.shape[-1])), axis=-2)


@pytest.mark.parametrize("example_shape", [(12,), (12, 2)])
def test_cnn_on_1d_signals_gradients_equal_the_oracle(example_shape):
    model = fnbp.cnn(3, (4, 5), input_ndim=len(example_shape))
    out_shape, params = model.init(jax.random.key(0), example_shape, jnp.float64)
    assert out_shape == (3,)
    # draw non-zero biases so every term of the oracle is exercised
    params = jax.tree.map(lambda p: p + 0.1 * normal(p.shape, p.size), params)
    x, y = normal((4,) + example_shape, 11), jnp.array([0, 1, 2, 1])

    def ref(p, x):
        z = x[..., None] if len(example_shape) == 1 else x
        convs = [q for q in p if isinstance(q, dict) and "w" in q]
        for c in convs:
            z = ref_max_pool1d(jnp.maximum(ref_conv1d_same(z, c["w"], c["b"]), 0), 2)
        return ref_mm(p[-1], z.reshape(z.shape[:-2] + (-1,)))

    assert_backprop_equals_oracle(model, ref, params, x, y)
    with pytest.raises(
        ValueError,
        match=r"cnn: input_ndim must be 3 \(images \(H, W, C\)\), "
        r"2 \(signals \(L, C\)\) or 1 \(signals \(L,\)\), got 4",
    ):
        fnbp.cnn(3, input_ndim=4)


def signal_task(n, length=32, seed=0):
    """Two classes of noisy 1-D signals: a slow and a fast sine, random phases."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    freq = np.where(y == 0, 1.0, 4.0)[:, None]
    t = np.arange(length)[None, :] / length
    x = np.sin(2 * np.pi * (freq * t + rng.random((n, 1)))) + 0.3 * rng.standard_normal((n, length))
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def test_cnn_trains_on_a_1d_signal_task():
    model = fnbp.cnn(2, (4,), input_ndim=1)
    x, y = signal_task(128)
    _, params = model.init(jax.random.key(0), x.shape[1:])

    @jax.jit
    def step(params):
        _, grads = fnbp.backprop(model, LOSS, params, x, y)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    def accuracy(params):
        return float(jnp.mean(jnp.argmax(model.apply(params, x), -1) == y))

    before = accuracy(params)
    for _ in range(60):
        params = step(params)
    after = accuracy(params)
    assert after >= 0.9 and after > before + 0.2, (before, after)


# --- the documentation's "Your own layers" section runs as written ----------------------


def test_docs_your_own_layers_examples_run():
    page = (pathlib.Path(__file__).parent.parent / "docs" / "networks.md").read_text()
    section = page.split("## Your own layers", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/networks.md", "exec"), namespace)
    model, act = namespace["model"], namespace["act"]
    assert act.name == "softsign" and model.name == "mlp"
    out_shape, params = model.init(jax.random.key(0), (5,))
    assert out_shape == (10,) and params[1] == ()
