"""Every rule's forward function F[M] against jax.jvp of its reference, and against its own B.

For a rule M(a_1, ..., a_k) the forward function is F[M](t) = sum_j J_j t_j
(``rule.jvp(residuals, tangents, **settings)``, declared beside ``fwd`` and
``bwd``). On every example of every rule in the registry, in float64:

- F(t) equals ``jax.jvp`` of the rule's plain-jnp reference along the same
  tangents (one random tangent per float argument; integer labels get none),
  and central finite differences of the rule's own forward pass (h = 1e-6);
- F and B are adjoint: <F(t), v> = sum_j <t_j, B(v)_j> for random t and v
  (a forward function that disagrees with its own backward function is the
  bug this finds, whichever of the two is wrong);
- ``rule.forward_apply``, the ``jax.custom_jvp`` built from fwd and F, gives
  F's tangent under ``jax.jvp`` inside ``jax.jit``, and under ``jax.vmap``
  over a batch of tangents.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import rel_err

from fnbp.rules import registry

F64_RTOL = 1e-10

CASES = [(rule.name, variant) for rule in registry().values() for variant in rule.examples]


def is_float(a) -> bool:
    return a is not None and jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)


def problem(name: str, variant: str):
    """The rule, its float64 arguments, settings, tangents (None for the integer ones)."""
    rule = registry()[name]
    example = rule.examples[variant]
    args = tuple(example.make_args(jax.random.key(0), jnp.float64))
    rng = np.random.default_rng(1)
    tangents = tuple(
        jnp.asarray(rng.standard_normal(jnp.shape(a))) if is_float(a) else None for a in args
    )
    return rule, args, dict(example.kwargs), tangents


def of_floats(fn, args, kwargs, tangents):
    """(f, primals, tangents): fn as a function of the float arguments, the others fixed."""
    where = [i for i, a in enumerate(args) if is_float(a)]

    def f(*floats):
        full = list(args)
        for i, a in zip(where, floats):
            full[i] = a
        return fn(*full, **kwargs)

    return f, tuple(args[i] for i in where), tuple(tangents[i] for i in where)


def reference_jvp(rule, args, kwargs, tangents):
    """jax.jvp of the reference in its float arguments, the others held fixed."""
    return jax.jvp(*of_floats(rule.reference, args, kwargs, tangents))


def inner(a, b) -> float:
    return float(jnp.vdot(jnp.ravel(jnp.asarray(a, jnp.float64)), jnp.ravel(b)))


def test_every_rule_has_a_forward_function_named_after_it():
    for rule in registry().values():
        assert rule.jvp is not None, rule.name
        assert rule.jvp.__name__ == f"{rule.name}_jvp"
        assert rule.forward_apply is not None, rule.name


@pytest.mark.parametrize("name, variant", CASES, ids=[v for _, v in CASES])
def test_forward_function_equals_jax_jvp_of_the_reference(name, variant):
    rule, args, kwargs, tangents = problem(name, variant)
    out, res = rule.fwd(*args, **kwargs)
    got = rule.jvp(res, tangents, **kwargs)
    want_out, want = reference_jvp(rule, args, kwargs, tangents)
    assert got.shape == want.shape and got.dtype == out.dtype
    assert rel_err(got, want) <= F64_RTOL
    assert rel_err(out, want_out) <= F64_RTOL


@pytest.mark.parametrize("name, variant", CASES, ids=[v for _, v in CASES])
def test_forward_function_equals_central_finite_differences_of_the_rule(name, variant):
    """F(t) against (M(a + h t) - M(a - h t)) / 2h of the rule's own forward pass, float64."""
    rule, args, kwargs, tangents = problem(name, variant)
    _, res = rule.fwd(*args, **kwargs)
    got = rule.jvp(res, tangents, **kwargs)
    h = 1e-6

    def shifted(sign):
        moved = [a if t is None else a + sign * h * t for a, t in zip(args, tangents)]
        return rule.fwd(*moved, **kwargs)[0]

    want = (shifted(1.0) - shifted(-1.0)) / (2 * h)
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("name, variant", CASES, ids=[v for _, v in CASES])
def test_forward_function_is_the_adjoint_of_the_backward_function(name, variant):
    rule, args, kwargs, tangents = problem(name, variant)
    out, res = rule.fwd(*args, **kwargs)
    v = jnp.asarray(np.random.default_rng(2).standard_normal(out.shape))
    cotangents = rule.bwd(res, v, **kwargs)
    lhs = inner(rule.jvp(res, tangents, **kwargs), v)
    rhs = sum(inner(t, c) for t, c in zip(tangents, cotangents) if t is not None)
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(rhs)), (lhs, rhs)


@pytest.mark.parametrize("name, variant", CASES, ids=[v for _, v in CASES])
def test_forward_apply_runs_f_under_jit_and_vmap(name, variant):
    rule, args, kwargs, tangents = problem(name, variant)
    _, res = rule.fwd(*args, **kwargs)
    want = rule.jvp(res, tangents, **kwargs)
    f, primals, floats = of_floats(rule.forward_apply, args, kwargs, tangents)
    _, got = jax.jit(functools.partial(jax.jvp, f))(primals, floats)
    assert rel_err(got, want) <= 1e-13
    # jvp is linear in the tangents: a batch of 3 scaled copies, under vmap
    scales = jnp.asarray([1.0, -2.0, 0.5])
    batched = jax.vmap(lambda s: jax.jvp(f, primals, tuple(s * t for t in floats))[1])(scales)
    assert rel_err(batched, scales.reshape((3,) + (1,) * want.ndim) * want) <= 1e-13
