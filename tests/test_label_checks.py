"""Labels are checked once on the host before training; backprop on no examples."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnbp
from fnbp import train

MODEL = fnbp.mlp([8, 3])
SGD = optax.sgd(0.1)


@pytest.fixture(scope="module")
def params():
    return MODEL.init(jax.random.key(0), (2,), jnp.float32)[1]


def problem(n=12):
    x = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    return x, np.arange(n, dtype=np.int32) % 3


def test_fit_refuses_a_label_outside_the_model_outputs_before_training(params):
    x, y = problem()
    y[7] = 3
    seen = []
    with pytest.raises(
        ValueError,
        match=r"fit: y holds the label 3 \(at 7\), outside \[0, 3\): "
        r"the model has 3 outputs",
    ):
        train.fit(
            MODEL,
            fnbp.cross_entropy_loss,
            SGD,
            params,
            x,
            y,
            key=jax.random.key(1),
            epochs=1,
            batch_size=4,
            on_step=lambda *a: seen.append(1),
        )
    assert seen == []  # nothing trained
    x, y = problem()
    y_test = np.array([0, -1])
    with pytest.raises(ValueError, match=r"fit: y_test holds the label -1 \(at 1\)"):
        train.fit(
            MODEL,
            fnbp.cross_entropy_loss,
            SGD,
            params,
            x,
            y,
            key=jax.random.key(1),
            epochs=1,
            batch_size=4,
            x_test=x[:2],
            y_test=y_test,
        )


def test_make_train_step_checks_host_labels_and_device_labels_once(params):
    x, y = problem(4)
    step = train.make_train_step(MODEL, fnbp.cross_entropy_loss, SGD)
    opt_state = SGD.init(params)
    with pytest.raises(
        ValueError,
        match=r"train_step: y holds the label 5 \(at 2\), outside "
        r"\[0, 3\)",
    ):
        step(params, opt_state, x, np.array([0, 1, 5, 2], np.int32))
    new_params, _, metrics = step(params, opt_state, x, y)  # good labels train
    assert np.isfinite(float(metrics["loss"]))
    bad = jnp.asarray([0, 1, 9, 2], jnp.int32)
    step = train.make_train_step(MODEL, fnbp.cross_entropy_loss, SGD)
    with pytest.raises(ValueError, match="train_step: y holds the label 9"):
        step(params, opt_state, x, bad)


def test_regression_targets_are_not_taken_for_labels():
    model = fnbp.mlp([4, 1])
    p = model.init(jax.random.key(0), (2,), jnp.float32)[1]
    step = train.make_train_step(model, fnbp.mse_loss, SGD)
    x = np.ones((4, 2), np.float32)
    _, _, metrics = step(p, SGD.init(p), x, np.full((4, 1), 7.0, np.float32))
    assert np.isfinite(float(metrics["loss"]))


def test_backprop_on_no_examples_is_a_clear_error(params):
    x, y = np.zeros((0, 2), np.float32), np.zeros((0,), np.int32)
    with pytest.raises(
        ValueError,
        match=r"backprop: no examples \(the model's output has shape "
        r"\(0, 3\).*pass at least one",
    ):
        fnbp.backprop(MODEL, fnbp.cross_entropy_loss, params, x, y)
    with pytest.raises(ValueError, match="per_example_grad_norms: no examples"):
        fnbp.per_example_grad_norms(MODEL, fnbp.cross_entropy_loss, params, x, y)
