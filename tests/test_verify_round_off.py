"""The reference's round-off model (Monte Carlo arithmetic on its program, in float64).

The oracles here are written in the test: the size of the rounding error a
float32 evaluation of a formula has, worked out by hand.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fnbp.verify.programs import _B, _Bound, jit_fast
from fnbp.verify.round_off import SAMPLES, count, sampled

EPS32 = float(np.finfo(np.float32).eps)


def _program(fk, sel, z):
    return fk(z)


def _run(f, z, dtype=np.float32):
    out = sampled(_program, _Bound(f, {}), None, (jnp.asarray(z, jnp.float64),), dtype, 0, jit_fast)
    return np.asarray(out)


def test_round_off_model_sees_the_cancellation_of_large_terms():
    # (z + 1e4) - 1e4 is z exactly in real arithmetic; in float32 each of the two roundings
    # is up to eps * 1e4 (about 1.2e-3), whatever a compiler folds.
    z = np.linspace(-1.0, 1.0, 16)
    out = _run(lambda z: (z + 1e4) - 1e4, z)
    assert out.shape == (SAMPLES, 16)
    deviation = np.abs(out - z).max()
    assert 0.2 * EPS32 * 1e4 < deviation <= 2.01 * EPS32 * 1e4


def test_round_off_model_scales_with_the_dtype():
    z = np.linspace(-1.0, 1.0, 16)
    f32 = np.abs(_run(lambda z: (z + 1e4) - 1e4, z) - z).max()
    f16 = np.abs(_run(lambda z: (z + 1e4) - 1e4, z, np.float16) - z).max()
    ratio = float(np.finfo(np.float16).eps) / EPS32
    assert 0.1 * ratio < f16 / f32 < 10 * ratio


def test_round_off_model_leaves_exact_operations_alone():
    z = np.linspace(-2.0, 2.0, 12)
    out = _run(lambda z: jnp.maximum(-jnp.abs(z), -1.0).reshape(3, 4).T, z)
    np.testing.assert_array_equal(
        out, np.broadcast_to(np.maximum(-np.abs(z), -1.0).reshape(3, 4).T, (SAMPLES, 4, 3))
    )


def test_round_off_model_counts_the_operations_inside_nested_programs():
    import jax

    inner = jax.jit(lambda z: z * 3.0 + 1.0)  # two roundings of 4 entries each
    closed = jax.make_jaxpr(lambda z: jnp.sin(inner(z)))(jnp.zeros(4))
    assert count(closed.jaxpr) == 12


def test_round_off_model_of_a_backward_pass_sees_its_terms():
    # B of z / |z| is (1/|z| - z^2/|z|^3) v, 0 exactly; its terms are of size |v| / |z|.
    z = np.array([0.25, -0.5, 2.0, -4.0])
    v = np.ones(4)
    sel = ((0, (0,)),)
    out = sampled(
        _B,
        _Bound(lambda z: z / jnp.abs(z), {}),
        sel,
        ((jnp.asarray(z),), jnp.asarray(v)),
        np.float32,
        0,
        jit_fast,
    )
    dz = np.asarray(out[0][0])
    assert dz.shape == (SAMPLES, 4)
    per_entry = np.abs(dz).max(axis=0)
    assert np.all(per_entry <= 8 * EPS32 / np.abs(z))
    assert per_entry[0] > per_entry[3]  # larger terms, larger round-off
