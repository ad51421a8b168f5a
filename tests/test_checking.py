"""Checked mode: run-time errors for labels out of range, non-finite input and
traced settings outside their domain; the unchecked default and its cost."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import jit_cotangents, primitive_names, rel_err

import fnbp

K = 4
RNG = np.random.default_rng(0)
Z = jnp.asarray(RNG.standard_normal((3, 5)))
T = jnp.asarray(RNG.standard_normal((3, K)))
LOGITS = jnp.asarray(RNG.standard_normal(3))
LABELS = jnp.array([0, 3, 1])

# Every declared activation and its examples: z, then the example's scalar settings.
ACTIVATIONS = {
    name: (functools.partial(rule.function, **example.kwargs),
           (Z,) + example.make_args(jax.random.key(0), Z.dtype)[1:])
    for rule in fnbp.rules.registry().values() if rule.family == "activation"
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
    return args[:position] + (jnp.asarray(bad),) + args[position + 1:]


# --- labels ------------------------------------------------------------------------


@pytest.mark.parametrize("label", [-1, K, 100])
def test_checked_cross_entropy_raises_for_label_out_of_range(label):
    y = jnp.array([0, label, 1])
    with pytest.raises(ValueError, match=r"cross_entropy_loss: y holds a label outside "
                                         r"\[0, 4\); labels are class indices for t's last "
                                         r"axis of length 4"):
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
    ("mm", 0, "z"), ("mm", 1, "W"), ("mm", 2, "b"),
    *[(name, 0, "z") for name in fnbp.rules.registry() if name in ACTIVATIONS],
    ("mse_loss", 0, "t"), ("mse_loss", 1, "y"), ("logistic_loss", 0, "t"),
    ("logistic_loss", 1, "y"), ("cross_entropy_loss", 0, "t"),
]


@pytest.mark.parametrize("rule,position,name", NON_FINITE,
                         ids=[f"{r}-{n}" for r, _, n in NON_FINITE])
def test_checked_raises_for_non_finite_input(rule, position, name):
    _, args = VALID[rule]
    for value in (np.nan, np.inf):
        with pytest.raises(ValueError, match=rf"{rule}: {name} contains NaN or infinity; "
                                             r"clean the input"):
            CHECKED[rule](*_with(args, position, value))


# --- traced settings ---------------------------------------------------------------------


def test_checked_raises_for_traced_gamma_outside_open_unit_interval():
    for gamma in (0.0, 1.0, -0.5, 1.5):  # gamma is traced: invisible at trace time
        with pytest.raises(ValueError, match=r"leaky_relu: gamma must lie in the open "
                                             r"interval \(0, 1\)"):
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
    np.testing.assert_allclose(CHECKED["gelu"](Z, approximate=True),
                               CHECKED["gelu(approximate)"](Z), rtol=1e-15)


@pytest.mark.parametrize("rule", sorted(VALID))
def test_unchecked_rules_add_no_run_time_checks(rule):
    f, args = VALID[rule]
    names = primitive_names(f, *args)
    assert "custom_vjp_call" in names
    assert not [n for n in names if "check" in n], names


def test_checked_rejects_a_non_callable():
    with pytest.raises(TypeError, match=r"^checked: f must be callable, got int$"):
        fnbp.checked(3)
