"""check_vjp at kinks: a convention that differs from the reference's, and kinks="any_subgradient".

The references are written here with their convention spelled out (|z| as
``where(z >= 0, z, -z)``: slope 1 at 0 on every JAX version), and the
one-sided derivatives of each at its kink are known by hand: -1 and 1 for
|z| at 0, 0 and the cotangent for a max at a tie.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp.verify import check_layer, check_vjp

JIT = ("jit",)
Z = np.array([[-1.5, 0.3, 0.7, -0.4], [2.0, -0.9, 1.1, 0.5], [-0.6, 1.3, -2.2, 0.8]])


def rule(primal, fwd, bwd):
    f = jax.custom_vjp(primal)
    f.defvjp(fwd, bwd)
    return f


def ref_abs(z):
    return jnp.where(z >= 0, z, -z)  # d|z|/dz at 0 is 1: the z >= 0 side


def abs_rule(slope):
    """|z| whose B is slope(z) v."""
    return rule(ref_abs, lambda z: (ref_abs(z), z), lambda z, v: (slope(z) * v,))


SIGN_AT_0 = abs_rule(jnp.sign)  # 0 at 0: inside [-1, 1]
THREE_AT_0 = abs_rule(lambda z: jnp.where(z == 0, 3.0, jnp.sign(z)))  # outside [-1, 1]
WRONG_BELOW_MINUS_1 = abs_rule(lambda z: jnp.where(z < -1, -2.0, jnp.where(z >= 0, 1.0, -1.0)))

DIAGNOSIS = (
    "differs from the reference's convention at the kink z=0 (yours 0, reference 1; "
    "one-sided derivatives -1 and 1)"
)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_check_vjp_diagnoses_a_kink_convention(dtype):
    report = check_vjp(SIGN_AT_0, Z.astype(dtype), reference=ref_abs, transforms=JIT)
    assert not report.ok
    assert {(r.argument, r.oracle, r.probe) for r in report.failures} == {
        ("z", "reference", "zeros")
    }
    assert report.diagnosis.startswith(DIAGNOSIS + ", at ")
    assert report.diagnosis.split(" such as ")[-1].startswith("z[")
    row = report.failures[0]
    assert "kinks='any_subgradient' accepts it" in row.note


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_check_vjp_accepts_any_subgradient_with_the_option(dtype):
    report = check_vjp(
        SIGN_AT_0, Z.astype(dtype), reference=ref_abs, transforms=JIT, kinks="any_subgradient"
    )
    report.assert_ok()
    zeros = next(r for r in report.rows if r.probe == "zeros" and r.oracle == "reference")
    assert zeros.note.startswith("accepted (kinks='any_subgradient'): " + DIAGNOSIS)
    assert zeros.ratio <= 1


def test_a_value_outside_the_one_sided_derivatives_fails_with_the_option():
    for kinks in ("reference", "any_subgradient"):
        report = check_vjp(THREE_AT_0, Z, reference=ref_abs, transforms=JIT, kinks=kinks)
        assert {r.probe for r in report.failures} == {"zeros"}, kinks
        assert "convention" not in report.diagnosis
        assert not any("accepted" in r.note for r in report.rows)


def test_a_wrong_derivative_away_from_kinks_is_not_called_a_convention():
    for kinks in ("reference", "any_subgradient"):
        report = check_vjp(WRONG_BELOW_MINUS_1, Z, reference=ref_abs, transforms=JIT, kinks=kinks)
        assert ("z", "reference", "") in {
            (r.argument, r.oracle, r.probe) for r in report.failures
        }, kinks
        assert not any("convention" in r.diagnosis or "accepted" in r.note for r in report.rows)
    doubled = abs_rule(lambda z: 2 * jnp.where(z >= 0, 1.0, -1.0))
    report = check_vjp(doubled, Z, reference=ref_abs, transforms=JIT, kinks="any_subgradient")
    assert report.diagnosis == "off by a constant factor 2"


def ref_max(z):
    return jnp.max(z, axis=-1)


def test_a_max_giving_every_tied_entry_the_cotangent_is_no_subgradient():
    # Each tied entry alone is inside [0, v]; together they hand out the cotangent twice.
    def everyone(z, v):
        return ((z == z.max(-1, keepdims=True)) * v[..., None],)

    def first_only(z, v):
        hit = z == z.max(-1, keepdims=True)
        first = jnp.cumsum(hit, axis=-1) == 1
        return ((hit & first) * v[..., None],)

    for bwd, ok in ((everyone, False), (first_only, True)):
        f = rule(ref_max, lambda z: (ref_max(z), z), bwd)
        report = check_vjp(f, Z, reference=ref_max, transforms=JIT, kinks="any_subgradient")
        assert report.ok == ok, str(report)
        if not ok:
            assert {r.probe for r in report.failures} == {"ties"}
            assert "convention" not in report.diagnosis
    f = rule(ref_max, lambda z: (ref_max(z), z), first_only)  # jnp.max splits ties evenly
    report = check_vjp(f, Z, reference=ref_max, transforms=JIT)
    assert {r.probe for r in report.failures} == {"ties"}
    assert report.diagnosis.startswith("differs from the reference's convention at the kink z=")


def test_check_layer_takes_the_kinks_option():
    layer = fnbp.Relu()
    _, params = layer.init(jax.random.PRNGKey(0), (4,))
    x = np.where(np.arange(12).reshape(3, 4) % 3 == 0, 0.0, Z)
    default = check_layer(layer, params, x, transforms=JIT, probes=("zeros",))
    report = check_layer(
        layer, params, x, transforms=JIT, probes=("zeros",), kinks="any_subgradient"
    )
    report.assert_ok()
    if not default.ok:  # autodiff of forward takes its own convention at 0
        assert default.diagnosis.startswith("differs from the reference's convention")


def test_kinks_must_be_a_known_policy():
    with pytest.raises(
        ValueError,
        match=r"^check_vjp: kinks must be one of 'reference', "
        r"'any_subgradient', got 'subgradient'$",
    ):
        check_vjp(SIGN_AT_0, Z, reference=ref_abs, kinks="subgradient")
