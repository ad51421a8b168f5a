"""Tests of fnbp.train: the step against an autodiff oracle, fit's determinism and resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _oracle import mlp_problem, ref_loss, ref_mlp

import fnbp
from fnbp import train

# --- an independent plain-jnp reference: the MLP of eq. 7.36 and cross-entropy (2.14) ---


ref_value_and_grad = jax.jit(jax.value_and_grad(ref_loss))


def rel_err(a, b):
    a = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(a)])
    b = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(b)])
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def assert_trees_identical(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


MODEL = fnbp.mlp([6, 5, 3])
# Optimizers made once: model, loss and optimizer are static arguments of the
# compiled steps, so sharing them lets the tests share compilations.
SGD = optax.sgd(0.1)
ADAM = optax.adam(1e-2)
N = 20


def problem(dtype=jnp.float64, seed=0):
    """Parameters of MODEL for inputs of width 4 (He-scaled normals), x and labels."""
    return jax.tree.map(jnp.asarray, mlp_problem((4, 6, 5, 3), N, dtype, seed))


# --- one step ------------------------------------------------------------------------


def test_train_step_sgd_equals_oracle_update_float64():
    params, x, y = problem()
    lr = 0.1
    step = train.make_train_step(MODEL, fnbp.cross_entropy_loss, SGD)
    new_params, _, metrics = step(params, SGD.init(params), x, y)
    J, grads = ref_value_and_grad(params, x, y)
    want = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
    assert rel_err(new_params, want) <= 1e-10
    # theta - theta' = lr * dJ/dtheta: the gradient itself to 1e-10
    got_grads = jax.tree_util.tree_map(lambda p, q: (p - q) / lr, params, new_params)
    assert rel_err(got_grads, grads) <= 1e-10
    assert abs(float(metrics["loss"]) - float(J)) <= 1e-12 * abs(float(J))
    want_accuracy = np.mean(np.argmax(np.asarray(ref_mlp(params, x)), axis=1) == np.asarray(y))
    assert float(metrics["accuracy"]) == pytest.approx(want_accuracy, rel=1e-6)


def test_train_step_adam_equals_optax_on_oracle_gradients():
    params, x, y = problem()
    optimizer = ADAM
    step = train.make_train_step(MODEL, fnbp.cross_entropy_loss, optimizer)
    got_params, got_state = params, optimizer.init(params)
    want_params, want_state = params, optimizer.init(params)

    @jax.jit
    def oracle_step(params, state):
        _, grads = ref_value_and_grad(params, x, y)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(3):
        got_params, got_state, _ = step(got_params, got_state, x, y)
        want_params, want_state = oracle_step(want_params, want_state)
    assert rel_err(got_params, want_params) <= 1e-10
    assert rel_err(got_state[0].mu, want_state[0].mu) <= 1e-10
    assert int(got_state[0].count) == 3


def test_train_step_float32():
    params, x, y = problem(dtype=jnp.float32)
    step = train.make_train_step(MODEL, fnbp.cross_entropy_loss, SGD)
    new_params, _, metrics = step(params, SGD.init(params), x, y)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(new_params))
    params64 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
    _, grads = ref_value_and_grad(params64, x.astype(jnp.float64), y)
    want = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params64, grads)
    assert rel_err(new_params, want) <= 1e-5
    assert metrics["loss"].dtype == jnp.float32


def test_train_step_regression_has_no_accuracy():
    model = fnbp.mlp([5, 2])
    params = (
        {"W": jnp.ones((5, 3)), "b": jnp.zeros(5)},
        (),
        {"W": jnp.ones((2, 5)), "b": jnp.zeros(2)},
    )
    x = jnp.ones((4, 3))
    t = jnp.zeros((4, 2))
    step = train.make_train_step(model, fnbp.mse_loss, SGD)
    _, _, metrics = step(params, SGD.init(params), x, t)
    assert set(metrics) == {"loss"}


def test_eval_step_and_evaluate_batching():
    params, x, y = problem()
    eval_step = train.make_eval_step(MODEL, fnbp.cross_entropy_loss)
    metrics = eval_step(params, x, y)
    assert abs(float(metrics["loss"]) - float(ref_loss(params, x, y))) <= 1e-12
    whole = train.evaluate(eval_step, params, x, y, batch_size=100)
    halves = train.evaluate(eval_step, params, x, y, batch_size=10)
    assert halves["loss"] == pytest.approx(whole["loss"], rel=1e-12)
    assert halves["accuracy"] == pytest.approx(whole["accuracy"], rel=1e-6)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        train.evaluate(eval_step, params, x, y, batch_size=0)


def test_init_state_matches_model_and_optimizer_init():
    # a toy layer with a cheap initializer (the real ones compile slowly)
    def init(key, input_shape, dtype=jnp.float32):
        return (2,), {"W": jax.random.normal(key, (2,) + tuple(input_shape), dtype)}

    toy = fnbp.make_layer(
        "toy", init, lambda p, z: (z @ p["W"].T, z), lambda p, z, v: ({"W": v.T @ z}, v @ p["W"])
    )
    key = jax.random.key(4)
    state = train.init_state(toy, ADAM, key, (4,), jnp.float64)
    want = jax.random.normal(key, (2, 4), jnp.float64)
    np.testing.assert_array_equal(state.params["W"], want)
    assert state.step == 0 and state.params["W"].dtype == jnp.float64
    assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(
        ADAM.init(state.params)
    )
    np.testing.assert_array_equal(state.opt_state[0].mu["W"], np.zeros((2, 4)))
    with pytest.raises(ValueError, match="conv2d"):
        train.init_state(fnbp.cnn(3), ADAM, key, (4,))


# --- the epoch order -----------------------------------------------------------------


def test_epoch_order_is_a_pure_function_of_key_and_epoch():
    key = jax.random.key(0)
    a = np.asarray(train.epoch_order(key, 3, N))
    np.testing.assert_array_equal(a, train.epoch_order(key, 3, N))
    np.testing.assert_array_equal(np.sort(a), np.arange(N))
    assert not np.array_equal(a, train.epoch_order(key, 4, N))
    assert not np.array_equal(a, train.epoch_order(jax.random.key(1), 3, N))
    assert a.dtype == np.int32
    np.testing.assert_array_equal(a, train.epoch_order(jax.random.PRNGKey(0), 3, N))
    with pytest.raises(ValueError, match="epoch must be an int >= 0, got -1"):
        train.epoch_order(key, -1, N)


# --- fit -----------------------------------------------------------------------------


def test_fit_is_the_minibatch_sgd_loop_and_learns():
    params, x, y = problem()
    key = jax.random.key(9)
    result = train.fit(
        MODEL,
        fnbp.cross_entropy_loss,
        SGD,
        params,
        x,
        y,
        key=key,
        epochs=3,
        batch_size=6,
        x_test=x,
        y_test=y,
    )
    # the same thing by hand: 20 // 6 = 3 minibatches per epoch in epoch_order
    step = train.make_train_step(MODEL, fnbp.cross_entropy_loss, SGD)
    p, s = params, SGD.init(params)
    for epoch in range(3):
        order = np.asarray(train.epoch_order(key, epoch, N))
        for i in range(3):
            idx = order[i * 6 : (i + 1) * 6]
            p, s, _ = step(p, s, x[idx], y[idx])
    assert rel_err(result.params, p) <= 1e-12
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert [h["step"] for h in result.history] == [3, 6, 9]
    assert set(result.history[0]) == {
        "epoch",
        "step",
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
    }
    assert result.history[-1]["test_loss"] < result.history[0]["test_loss"]
    assert result.history[-1]["test_loss"] == pytest.approx(float(ref_loss(p, x, y)), rel=1e-10)
    assert result.state.step == 9


def test_fit_same_key_same_parameters_float32():
    params, x, y = problem(dtype=jnp.float32)

    def run(seed):
        return train.fit(
            MODEL,
            fnbp.cross_entropy_loss,
            ADAM,
            params,
            x,
            y,
            key=jax.random.key(seed),
            epochs=2,
            batch_size=5,
        )

    first, second = run(3), run(3)
    assert_trees_identical(first.params, second.params)
    assert first.history == second.history
    assert rel_err(run(4).params, first.params) > 1e-6


@pytest.mark.parametrize("stop_at", [6, 4])  # mid-epoch, and at an epoch boundary
def test_fit_resumed_from_any_step_equals_uninterrupted(stop_at):
    params, x, y = problem(dtype=jnp.float32)
    kwargs = dict(key=jax.random.key(5), epochs=3, batch_size=5, x_test=x, y_test=y)
    full = train.fit(MODEL, fnbp.cross_entropy_loss, ADAM, params, x, y, **kwargs)
    saved = {}

    class Stop(Exception):
        pass

    def on_step(state, running):
        if state.step == stop_at and stop_at % 4:
            saved["state"] = state
            raise Stop

    def on_epoch(state, history):
        saved["history"] = list(history)
        if state.step == stop_at:
            saved["state"] = state
            raise Stop

    with pytest.raises(Stop):
        train.fit(
            MODEL,
            fnbp.cross_entropy_loss,
            ADAM,
            params,
            x,
            y,
            on_step=on_step,
            on_epoch=on_epoch,
            **kwargs,
        )
    # a round trip through host memory, as through a checkpoint
    state = jax.tree_util.tree_map(np.asarray, saved["state"])
    resumed = train.fit(
        MODEL,
        fnbp.cross_entropy_loss,
        ADAM,
        None,
        x,
        y,
        state=train.TrainState(*state),
        history=saved.get("history"),
        **kwargs,
    )
    assert_trees_identical(resumed.params, full.params)
    assert_trees_identical(resumed.state.opt_state, full.state.opt_state)
    assert resumed.history == full.history


def test_fit_callbacks_see_running_means():
    params, x, y = problem()
    seen = []
    train.fit(
        MODEL,
        fnbp.cross_entropy_loss,
        SGD,
        params,
        x,
        y,
        key=jax.random.key(0),
        epochs=1,
        batch_size=6,
        on_step=lambda state, running: seen.append((state.step, running)),
    )
    assert [s for s, _ in seen] == [1, 2, 3]
    assert set(seen[0][1]) == {"loss", "accuracy"}
    losses = [
        seen[0][1]["loss"],
        2 * seen[1][1]["loss"] - seen[0][1]["loss"],
        3 * seen[2][1]["loss"] - 2 * seen[1][1]["loss"],
    ]
    assert seen[-1][1]["loss"] == pytest.approx(np.mean(losses))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), r"^fit: `batch_size` must be a positive int, got 0$"),
        (
            dict(batch_size=21),
            r"^fit: `batch_size` 21 is larger than the 20 training examples; "
            r"pass a `batch_size` of 20 or less$",
        ),
        (dict(epochs=0), "epochs must be a positive int"),
        (dict(x_test=np.ones((2, 4))), "pass both x_test and y_test"),
        (dict(state=train.TrainState((), (), step=100)), "past the 8 steps of 2 epochs"),
    ],
)
def test_fit_errors(kwargs, match):
    params, x, y = problem()
    arguments = dict(key=jax.random.key(0), epochs=2, batch_size=5)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        train.fit(MODEL, fnbp.cross_entropy_loss, SGD, params, x, y, **arguments)


def test_fit_and_step_reject_wrong_parts():
    params, x, y = problem()
    with pytest.raises(ValueError, match="x has 20 examples but y has shape"):
        train.fit(
            MODEL,
            fnbp.cross_entropy_loss,
            SGD,
            params,
            x,
            y[:5],
            key=jax.random.key(0),
            epochs=1,
            batch_size=4,
        )
    with pytest.raises(TypeError, match="optimizer must be an optax GradientTransformation"):
        train.make_train_step(MODEL, fnbp.cross_entropy_loss, lambda g: g)
    with pytest.raises(TypeError, match="model must be a fnbp Layer"):
        train.make_eval_step(lambda p, x: x, fnbp.cross_entropy_loss)


# --- fit's arguments, its inputs, and stopping it cleanly ---------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(key=None),
            TypeError,
            "fit: `key` must be a PRNG key, jax.random.key(seed), got NoneType",
        ),
        (dict(key=7), TypeError, "fit: `key` must be a PRNG key, jax.random.key(seed), got int"),
        (
            dict(key=np.zeros(3, np.float32)),
            TypeError,
            "fit: `key` must be a PRNG key, jax.random.key(seed), got an array of dtype float32 "
            "and shape (3,)",
        ),
        (
            dict(key=jax.random.split(jax.random.key(0), 2)),
            TypeError,
            "fit: `key` must be one PRNG key, got an array of keys of shape (2,); pass "
            "jax.random.key(seed)",
        ),
        (dict(epochs=True), ValueError, "fit: epochs must be a positive int, got True"),
        (dict(on_step=3), TypeError, "fit: `on_step` must be a function or None, got int"),
        (dict(on_epoch="yes"), TypeError, "fit: `on_epoch` must be a function or None, got str"),
        (dict(stop=True), TypeError, "fit: `stop` must be a function or None, got bool"),
        (
            dict(state=((), ())),
            TypeError,
            "fit: `state` must be a fnbp.train.TrainState (from init_state, or a FitResult's "
            "state), got tuple",
        ),
        (
            dict(history={"epoch": 1}),
            TypeError,
            "fit: `history` must be a list of dicts (a FitResult's history), got dict",
        ),
        (
            dict(eval_batch_size=0),
            ValueError,
            "fit: `eval_batch_size` must be a positive int, got 0",
        ),
        (dict(x=[["a"] * 4] * N), TypeError, "fit: `x` must hold numbers, got dtype <U1"),
        (
            dict(y=[[0, 1]] * (N - 1) + [[0]]),
            TypeError,
            "fit: `y` must be an array (n, ...) of numbers; np.asarray could not make one",
        ),
        (
            dict(x_test=np.ones((3, 5)), y_test=np.zeros(3, np.int32)),
            ValueError,
            "fit: `x_test` has shape (3, 5), but the examples of `x` have shape (4,); pass test "
            "examples of that shape",
        ),
        (
            dict(x_test=np.ones((3, 4)), y_test=np.zeros(2, np.int32)),
            ValueError,
            "fit: `x_test` has 3 examples but `y_test` has shape (2,); pass one target per example",
        ),
    ],
)
def test_fit_refuses_bad_arguments_with_its_own_message(kwargs, error, message):
    params, x, y = problem()
    arguments = dict(x=x, y=y, key=jax.random.key(0), epochs=2, batch_size=5)
    arguments.update(kwargs)
    x, y = arguments.pop("x"), arguments.pop("y")
    with pytest.raises(error) as info:
        train.fit(MODEL, fnbp.cross_entropy_loss, SGD, params, x, y, **arguments)
    assert str(info.value).startswith(message), str(info.value)


def test_fit_refuses_params_the_model_cannot_apply():
    # a layer of one's own that does not check its params: fit names them, not jnp's internals
    scale = fnbp.make_layer(
        "scale",
        lambda key, shape, dtype=jnp.float32: (shape, {"a": jnp.ones(shape, dtype)}),
        lambda params, z: (z * params["a"], z),
        lambda params, z, v: ({"a": jnp.sum(v * z, axis=0)}, v * params["a"]),
    )
    _, x, y = problem()
    with pytest.raises(
        TypeError,
        match=r"^fit: the model cannot be applied to `params` and "
        r"inputs of shape \(20, 4\) \(KeyError: 'a'\); pass "
        r"the params of model.init\(key, \(4,\)\)\[1\]$",
    ):
        train.fit(
            scale,
            fnbp.cross_entropy_loss,
            SGD,
            {"b": jnp.ones(4)},
            x,
            y,
            key=jax.random.key(0),
            epochs=1,
            batch_size=5,
        )


@pytest.mark.parametrize(
    "where, on_device",
    [("x", False), ("x", True), ("y", False), ("x_test", False), ("y_test", True)],
)
def test_fit_refuses_nan_and_inf_inputs_naming_the_first_example(where, on_device):
    params, x, _ = problem()
    targets = np.asarray(x[:, :3]) * 0.5  # float targets: a regression with a squared loss
    arrays = {"x": np.asarray(x), "y": targets, "x_test": np.asarray(x)[:6], "y_test": targets[:6]}
    bad = arrays[where].copy()
    bad[4, 1] = np.inf if where.startswith("y") else np.nan
    arrays[where] = jnp.asarray(bad) if on_device else bad

    def squared(t, y):
        return 0.5 * jnp.sum((t - y) ** 2, axis=-1)

    with pytest.raises(fnbp.DataError) as info:
        train.fit(
            MODEL,
            squared,
            SGD,
            params,
            arrays["x"],
            arrays["y"],
            key=jax.random.key(0),
            epochs=1,
            batch_size=5,
            x_test=arrays["x_test"],
            y_test=arrays["y_test"],
        )
    assert str(info.value) == (
        f"fit: `{where}` contains NaN or infinity (first in example "
        f"4); remove or impute those values"
    )


@pytest.mark.parametrize("stop_at", [0, 6, 8])  # before any step, mid-epoch, at an epoch's end
def test_fit_stopped_by_stop_continues_exactly(stop_at):
    params, x, y = problem(dtype=jnp.float32)
    kwargs = dict(key=jax.random.key(5), epochs=3, batch_size=5, x_test=x, y_test=y)
    full = train.fit(MODEL, fnbp.cross_entropy_loss, ADAM, params, x, y, **kwargs)
    steps = [0]
    with pytest.raises(train.TrainingStopped) as info:
        train.fit(
            MODEL,
            fnbp.cross_entropy_loss,
            ADAM,
            params,
            x,
            y,
            on_step=lambda state, running: steps.__setitem__(0, state.step),
            stop=lambda: steps[0] >= stop_at,
            **kwargs,
        )
    stopped = info.value
    where = {
        0: "at step 0 of 12, before the first step",
        6: "at step 6 of 12, in epoch 2 of 3",
        8: "at step 8 of 12, after epoch 2 of 3",
    }[stop_at]
    assert str(stopped) == f"stopped by a stop request {where}" and stopped.where == where
    assert stopped.state.step == stop_at and stopped.signum is None
    assert [h["epoch"] for h in stopped.history] == list(range(1, stop_at // 4 + 1))
    resumed = train.fit(
        MODEL,
        fnbp.cross_entropy_loss,
        ADAM,
        None,
        x,
        y,
        state=stopped.state,
        history=stopped.history,
        **kwargs,
    )
    assert_trees_identical(resumed.params, full.params)
    assert resumed.history == full.history


def test_stop_on_signals_turns_a_signal_into_a_stop_at_the_next_boundary(monkeypatch):
    import signal

    params, x, y = problem()
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    kills = []
    monkeypatch.setattr(train.stopping.os, "kill", lambda pid, signum: kills.append(signum))
    with train.stop_on_signals() as stop:
        assert not stop()
        signal.raise_signal(signal.SIGTERM)  # the handler returns: nothing is raised here
        assert stop() and stop.signum == signal.SIGTERM and stop.name() == "SIGTERM"
        with pytest.raises(
            train.TrainingStopped,
            match="^stopped by SIGTERM at step 0 of 8, before the first step$",
        ) as info:
            train.fit(
                MODEL,
                fnbp.cross_entropy_loss,
                SGD,
                params,
                x,
                y,
                key=jax.random.key(0),
                epochs=2,
                batch_size=5,
                stop=stop,
            )
        assert info.value.signum == signal.SIGTERM and info.value.state.step == 0
        signal.raise_signal(signal.SIGINT)  # a second signal: its default action, at once
        assert kills == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_stop_on_signals_leaves_an_ignored_signal_ignored():
    import signal

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as under nohup
    try:
        with train.stop_on_signals() as stop:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            signal.raise_signal(signal.SIGTERM)
            assert not stop()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_fit_without_stop_keeps_python_s_keyboard_interrupt():
    import signal

    params, x, y = problem()
    with pytest.raises(KeyboardInterrupt):
        train.fit(
            MODEL,
            fnbp.cross_entropy_loss,
            SGD,
            params,
            x,
            y,
            key=jax.random.key(0),
            epochs=2,
            batch_size=5,
            on_step=lambda state, running: signal.raise_signal(signal.SIGINT),
        )
