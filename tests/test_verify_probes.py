"""check_vjp's second generation: probes, factory draws, diagnoses, honest precision, check_layer.

Each bug here passes a check at the caller's own (random, square, zero-mean)
arguments and is found only by a probe the verifier derives itself; the
correct twin of each rule passes the same probes. Transforms are kept to
``jit`` so every test compiles a handful of tiny programs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp.testing import assert_vjp
from fnbp.verify import check_layer, check_vjp

RNG = np.random.default_rng(11)
JIT = ("jit",)


def rule(primal, fwd, bwd):
    f = jax.custom_vjp(primal)
    f.defvjp(fwd, bwd)
    return f


def ref_relu(z):
    return jnp.where(z > 0, z, 0.0)


def away_from_zero(*shape):
    x = RNG.standard_normal(shape)
    return np.where(np.abs(x) < 0.2, 0.7, x)


# --- probes find what the caller's arguments miss -----------------------------------


def test_zeros_probe_finds_a_wrong_derivative_at_exactly_zero():
    wrong = rule(ref_relu, lambda z: (ref_relu(z), z >= 0), lambda m, v: (jnp.where(m, v, 0.0),))
    z = away_from_zero(4, 5)
    assert check_vjp(wrong, z, reference=ref_relu, transforms=JIT, probes=False).ok
    report = check_vjp(wrong, z, reference=ref_relu, transforms=JIT)
    assert {r.probe for r in report.failures} == {"zeros"}
    assert any("the reference decides" in note for note in report.notes)
    check_vjp(fnbp.relu, z, reference=ref_relu, transforms=JIT).assert_ok()


def test_large_probe_finds_an_overflowing_derivative_in_float32():
    def sig(z):
        return jax.nn.sigmoid(z)

    wrong = rule(sig, lambda z: (sig(z), z), lambda z, v: (jnp.exp(z) / (1 + jnp.exp(z)) ** 2 * v,))
    z = jnp.asarray(RNG.standard_normal((3, 4)), jnp.float32)
    report = check_vjp(wrong, z, reference=sig, transforms=JIT)
    failing = [r for r in report.failures if r.probe.startswith("large")]
    assert failing and failing[0].diagnosis.startswith("NaN at index")
    assert " where z[" in failing[0].diagnosis  # the entry of z that B fails at
    assert str(failing[0]).count("NaN") >= 1 and "inf" not in failing[0].describe()
    check_vjp(fnbp.sigmoid, z, reference=sig, transforms=JIT).assert_ok()


def _layer_norm_s(z):
    mu = z.mean(-1, keepdims=True)
    return (z - mu) / jnp.sqrt(((z - mu) ** 2).mean(-1, keepdims=True))


def _layer_norm_s_bwd(var_of, res, v):
    (z,) = res
    mu = z.mean(-1, keepdims=True)
    sigma = jnp.sqrt(var_of(z, mu))
    u = (z - mu) / sigma
    return ((v - v.mean(-1, keepdims=True) - (v * u).mean(-1, keepdims=True) * u) / sigma,)


def test_offset_probe_finds_a_cancelling_variance():
    def naive(z, mu):  # E[z^2] - E[z]^2: cancels when the mean is large
        return (z * z).mean(-1, keepdims=True) - mu * mu

    def two_pass(z, mu):
        return ((z - mu) ** 2).mean(-1, keepdims=True)

    z = RNG.standard_normal((3, 6))
    for var_of, ok in ((naive, False), (two_pass, True)):
        f = rule(
            _layer_norm_s,
            lambda z: (_layer_norm_s(z), (z,)),
            lambda res, v, var_of=var_of: _layer_norm_s_bwd(var_of, res, v),
        )
        report = check_vjp(f, z, reference=_layer_norm_s, transforms=JIT)
        assert report.ok == ok, str(report)
        if not ok:
            assert {r.probe for r in report.failures} == {
                next(r.probe for r in report.rows if r.probe.startswith("offset"))
            }


def test_ties_probe_runs_for_max_like_functions_only():
    def top(z):
        return jnp.max(z, axis=-1)

    wrong = rule(
        top,
        lambda z: (top(z), z),  # every tied entry gets the full cotangent
        lambda z, v: ((z == z.max(-1, keepdims=True)) * v[..., None],),
    )
    z = RNG.standard_normal((4, 6))
    report = check_vjp(wrong, z, reference=top, transforms=JIT)
    assert "ties" in {r.probe for r in report.failures}
    plain = check_vjp(fnbp.tanh, z, reference=jnp.tanh, transforms=JIT)
    assert "ties" not in {r.probe for r in plain.rows}


def test_kink_constants_are_found_in_the_reference():
    def clip(z):
        return jnp.where(z > 0.5, 0.5, z)

    wrong = rule(clip, lambda z: (clip(z), z), lambda z, v: (jnp.where(z >= 0.5, 0.0, v),))
    report = check_vjp(wrong, away_from_zero(3, 5), reference=clip, transforms=JIT)
    assert {r.probe for r in report.failures} == {"kink z=0.5"}


def test_factory_is_drawn_at_distinct_sizes():
    def mm_square_only(z, W):
        return z @ W.T

    # dz slices W by the wrong size: right whenever z is square, wrong shape otherwise.
    wrong = rule(
        mm_square_only,
        lambda z, W: (z @ W.T, (z, W)),
        lambda res, v: (v @ res[1][:, : res[0].shape[0]], v.T @ res[0]),
    )

    def fixed(res, v):
        return v @ res[1], v.T @ res[0]

    right = rule(mm_square_only, lambda z, W: (z @ W.T, (z, W)), fixed)

    def args(key, dtype, sizes=(3, 3, 3)):
        n, m, k = sizes
        rng = np.random.default_rng(
            np.asarray(jax.random.key_data(key)).ravel().tolist()
            if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
            else np.asarray(key).ravel().tolist()
        )
        return (
            rng.standard_normal((n, m)).astype(dtype),
            rng.standard_normal((k, m)).astype(dtype),
        )

    report = check_vjp(right, args=args, reference=mm_square_only, transforms=JIT, draws=2)
    report.assert_ok()
    assert {r.probe for r in report.rows} >= {"", "key 2", "sizes (3, 4, 5)"}
    bad = check_vjp(wrong, args=args, reference=mm_square_only, transforms=JIT, draws=1)
    assert bad.failures and all(r.probe == "sizes (3, 4, 5)" for r in bad.failures)
    assert any(r.argument == "z" and "shape" in r.diagnosis for r in bad.failures)


# --- diagnoses ---------------------------------------------------------------------


def test_diagnosis_names_a_constant_factor_and_a_sign_flip_where_negative():
    doubled = rule(jnp.sin, lambda z: (jnp.sin(z), jnp.cos(z)), lambda c, v: (2 * c * v,))
    report = check_vjp(doubled, away_from_zero(5), reference=jnp.sin, transforms=JIT)
    assert report.diagnosis == "off by a constant factor 2"
    absolute = rule(jnp.abs, lambda z: (jnp.abs(z), z), lambda z, v: (v,))  # sign(z) lost
    report = check_vjp(absolute, away_from_zero(6), reference=jnp.abs, transforms=JIT, probes=False)
    assert report.diagnosis == "sign flipped where z < 0"


def test_diagnosis_names_swapped_cotangents():
    def mse(t, y):
        return 0.5 * (t - y) ** 2

    swapped = rule(mse, lambda t, y: (mse(t, y), t - y), lambda d, v: (-d * v, d * v))
    report = check_vjp(
        swapped,
        RNG.standard_normal(5),
        RNG.standard_normal(5),
        reference=mse,
        transforms=JIT,
        probes=False,
    )
    assert report.diagnosis == "the cotangents of t and y look swapped"


def test_an_exception_is_one_row_with_the_users_file_and_line():
    def bwd(c, v):
        raise RuntimeError("this backward is unfinished")

    broken = rule(jnp.sin, lambda z: (jnp.sin(z), jnp.cos(z)), bwd)
    report = check_vjp(broken, RNG.standard_normal(4), reference=jnp.sin)
    raised = [r for r in report.rows if not r.compared]
    assert len(raised) == 1 and not raised[0].passed
    assert f"{__file__}:" in raised[0].note and "this backward is unfinished" in raised[0].note
    assert raised[0].ratio == float("inf") and report.worst_ratio == float("inf")


# --- honest precision --------------------------------------------------------------


def test_correct_z_over_abs_z_passes_second_order_in_float32():
    def sign(z):
        return z / jnp.abs(z)

    f = rule(
        sign, lambda z: (sign(z), z), lambda z, v: ((1 / jnp.abs(z) - z * z / jnp.abs(z) ** 3) * v,)
    )
    z = jnp.asarray(away_from_zero(3, 4), jnp.float32)
    report = check_vjp(f, z, reference=sign, transforms=("jit", "2nd order"), probes=False)
    report.assert_ok()
    second = next(r for r in report.rows if r.transform == "2nd order" and r.oracle == "reference")
    assert second.note.startswith("atol includes")  # the reference's float32 round-off


def test_smooth_function_far_from_the_origin_gets_no_kink_note():
    report = check_vjp(
        fnbp.tanh, 1000.0 + RNG.standard_normal(5) * 1e-3, transforms=JIT, probes=False
    )
    report.assert_ok()
    assert not any("kink" in r.note for r in report.rows)


def test_float64_numpy_arguments_are_checked_in_float64_with_x64_off():
    with jax.enable_x64(False):
        report = check_vjp(
            fnbp.tanh, RNG.standard_normal(4), reference=jnp.tanh, transforms=JIT, probes=False
        )
    assert report.dtype == "float64"
    assert any("checked in float64" in note for note in report.notes)


# --- check_layer and fnbp.testing ---------------------------------------------------


def test_check_layer_passes_a_correct_layer_and_names_a_wrong_sq_norms():
    layer = fnbp.serial(fnbp.Linear(3), fnbp.Relu(), fnbp.Linear(2))
    _, params = layer.init(jax.random.PRNGKey(0), (4,), jnp.float32)
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    report = check_layer(layer, params, x, transforms=JIT)
    report.assert_ok()
    assert report.dtype == "float64"
    assert {"sq_norms", "sq_norms per leaf", "sq_norms dz", "sq_grads", "init", "reference"} <= {
        r.oracle for r in report.rows
    }

    lin = fnbp.Linear(3)
    _, p = lin.init(jax.random.PRNGKey(0), (4,))

    def doubled(params, res, v):
        sq, dz = lin.sq_norms(params, res, v)
        return jax.tree.map(lambda q: 2 * q, sq), dz

    def swapped(params, res, v):  # right total, each leaf's norm in the other leaf
        sq, dz = lin.sq_norms(params, res, v)
        return {"W": sq["b"], "b": sq["W"]}, dz

    bad = fnbp.make_layer("bad", lin.init, lin.forward, lin.backward, doubled, lin.sq_grads)
    report = check_layer(bad, p, x, transforms=JIT)
    assert [r.oracle for r in report.failures] == ["sq_norms", "sq_norms per leaf"]
    assert report.diagnosis == "sq_norms disagrees with the per-example gradients"
    report = check_layer(
        fnbp.make_layer("swapped", lin.init, lin.forward, lin.backward, swapped),
        p,
        x,
        transforms=JIT,
    )
    assert [r.oracle for r in report.failures] == ["sq_norms per leaf"]
    assert report.diagnosis == "sq_norms puts a leaf's norm in another leaf"
    assert any("sq_grads: none" in note for note in report.notes)
    with pytest.raises(TypeError, match="check_layer: layer must be a fnbp Layer"):
        check_layer(object(), p, x)


def test_assert_vjp_message_fits_on_a_screen():
    doubled = rule(jnp.sin, lambda z: (jnp.sin(z), jnp.cos(z)), lambda c, v: (2 * c * v,))
    with pytest.raises(AssertionError) as caught:
        assert_vjp(doubled, RNG.standard_normal(5), reference=jnp.sin, transforms=JIT)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("check_vjp(<lambda>) failed") or "failed" in lines[0]
    assert lines[1] == "likely bug: off by a constant factor 2"
    assert len(lines) <= 12 and all(len(line) <= 222 for line in lines)
    assert assert_vjp(
        fnbp.sin if hasattr(fnbp, "sin") else fnbp.tanh,
        RNG.standard_normal(3),
        transforms=JIT,
        probes=False,
    ).ok


def test_hypothesis_strategy_reaches_zeros_for_a_relu():
    hypothesis = pytest.importorskip("hypothesis")
    from fnbp.testing import arrays

    seen = []

    @hypothesis.settings(max_examples=8, deadline=None, database=None)
    @hypothesis.given(arrays((6,)))
    def run(z):
        seen.append(bool((z == 0).any()))
        assert_vjp(fnbp.relu, z, reference=ref_relu, transforms=JIT, probes=False)

    run()
    assert len(seen) == 8
