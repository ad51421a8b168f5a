"""Oracles and the rule contract shared by the rule tests.

Also the relative error used by the network tests and one independent
plain-jnp MLP reference (``ref_mlp``, ``ref_loss``) for the training tests.

A rule is checked against ``jax.vjp`` of an independent plain-jnp reference
that each test file writes for itself. Each file lists its rules as
:class:`Case` objects, provides a ``case`` fixture over them and subclasses
:class:`RuleContract`, whose tests then run for every case.

Errors are measured per array as the relative error
``max|got - want| / max|want|`` (see :func:`rel_err`). Tolerances:

- float64: ``F64_RTOL = 1e-10`` against the float64 oracle.
- float32: ``F32_RTOL = 2e-5`` against the float64 oracle evaluated at the
  same (float32-rounded) inputs: about 150 float32 ulps (eps = 1.2e-7), room
  for the rounding of a few chained operations and of short sums.
- float16, bfloat16: 1e-2 and 6e-2, about 10 ulps (eps = 9.8e-4 and 7.8e-3).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core

import fnbp
from fnbp._compile import fast_compile_options

F64_RTOL = 1e-10
F32_RTOL = 2e-5
TOLERANCE = {"float16": 1e-2, "bfloat16": 6e-2, "float32": F32_RTOL, "float64": F64_RTOL}
DTYPES = tuple(TOLERANCE)


# --- measuring -------------------------------------------------------------------


def rel_err(got: Any, want: Any) -> float:
    """``max|got - want| / max|want|`` over the leaves of two equal pytrees."""
    got_leaves, got_tree = jax.tree_util.tree_flatten(got)
    want_leaves, want_tree = jax.tree_util.tree_flatten(want)
    assert got_tree == want_tree, f"structures differ: {got_tree} vs {want_tree}"
    worst = 0.0
    for a, b in zip(got_leaves, want_leaves):
        assert np.shape(a) == np.shape(b), f"shapes differ: {np.shape(a)} vs {np.shape(b)}"
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        scale = max(float(np.max(np.abs(b), initial=0.0)), np.finfo(np.float64).tiny)
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)) / scale)
    return worst


def assert_close(got: Any, want: Any, rtol: float) -> None:
    """Assert ``rel_err(got, want) <= rtol`` and that ``got`` is finite."""
    for leaf in jax.tree_util.tree_leaves(got):
        assert np.all(np.isfinite(np.asarray(leaf, dtype=np.float64))), "non-finite value"
    error = rel_err(got, want)
    assert error <= rtol, f"relative error {error:.3e} > {rtol:.0e}"


def iter_eqns(jaxpr: core.Jaxpr) -> Iterator[core.JaxprEqn]:
    """Every equation of ``jaxpr``, including those of its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in core.jaxprs_in_params(eqn.params):
            yield from iter_eqns(sub)


def primitive_names(f: Callable[..., Any], *args: Any) -> list[str]:
    """The primitive of every equation in ``make_jaxpr(f)(*args)``, nested ones too."""
    return [e.primitive.name for e in iter_eqns(jax.make_jaxpr(f)(*args).jaxpr)]


# --- cases -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A rule, its independent plain-jnp reference and how to draw arguments.

    Attributes:
      name: test id.
      rule: the fnbp function, positional arguments only.
      reference: plain jnp function with the same arguments (its autodiff is
        the oracle).
      make_args: ``(rng, dtype, batch) -> args`` with ``rng`` a
        ``numpy.random.Generator``; ``batch`` is the tuple of leading example
        axes, ``()`` for a single example.
      diff: positions of the arguments that have a cotangent.
      shared: positions of the parameters (W, b, gamma, beta): not batched,
        their cotangent is summed over the examples.
    """

    name: str
    rule: Callable[..., jax.Array]
    reference: Callable[..., jax.Array]
    make_args: Callable[[np.random.Generator, Any, tuple[int, ...]], tuple]
    diff: tuple[int, ...] = (0,)
    shared: tuple[int, ...] = ()


def normal(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: Any, scale: float = 1.0
) -> jax.Array:
    """Standard normal draws (times ``scale``) rounded to ``dtype``.

    Drawn with numpy: no compilation per shape, so drawing is free.
    """
    return jnp.asarray(scale * rng.standard_normal(shape), dtype=dtype)


def draw(case: Case, dtype: Any, batch: tuple[int, ...] = (), seed: int = 0):
    """Arguments of ``case`` and a random cotangent ``v`` shaped like its output."""
    rng = np.random.default_rng(seed)
    args = case.make_args(rng, jnp.dtype(dtype), batch)
    out = jax.eval_shape(case.rule, *args)
    return args, normal(rng, out.shape, out.dtype)


def upcast(tree: Any) -> Any:
    """Floating leaves to float64, integer leaves unchanged (works under jit)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _replace(args: tuple, positions: tuple[int, ...], values: tuple) -> tuple:
    full = list(args)
    for i, x in zip(positions, values):
        full[i] = x
    return tuple(full)


def cotangents(f: Callable[..., Any], args: tuple, v: jax.Array, diff: tuple[int, ...]):
    """``(f(*args), cotangents of the arguments in diff)`` from ``jax.vjp``."""
    out, pull = jax.vjp(lambda *d: f(*_replace(args, diff, d)), *(args[i] for i in diff))
    return out, pull(v)


def hvp(
    f: Callable[..., Any], args: tuple, v: jax.Array, tangents: tuple, diff: tuple[int, ...]
) -> tuple:
    """Hessian-vector product of ``sum(v * f(args))`` with ``tangents``.

    Reverse over reverse: the gradient of ``<grad(phi)(x), t>``. (Forward mode
    does not go through ``jax.custom_vjp``.)
    """

    def phi(*d):
        return jnp.sum(v * f(*_replace(args, diff, d)))

    def directional(*d):
        grads = jax.grad(phi, argnums=tuple(range(len(d))))(*d)
        return sum(jnp.sum(g * t) for g, t in zip(grads, tangents))

    return jax.grad(directional, argnums=tuple(range(len(diff))))(*(args[i] for i in diff))


def example(args: tuple, index: tuple[int, ...], shared: tuple[int, ...]) -> tuple:
    """The arguments of one example: batched arguments indexed, parameters kept.

    Indexed in numpy (eagerly, a jnp index would compile a program per shape).
    """
    return tuple(
        a if i in shared else jnp.asarray(np.asarray(a)[index]) for i, a in enumerate(args)
    )


def loop_over_examples(f, args, v, diff, shared, batch, sum_shared):
    """``f``'s output and cotangents example by example, a Python loop of calls.

    Each call is one jitted program (compiled once, for the example's shapes);
    the results are stacked to ``batch`` in numpy. With ``sum_shared`` the
    parameters' cotangents are summed over the examples (what one batched call
    must give); otherwise they are per example.
    """
    v = np.asarray(v)
    rows = [
        jax.device_get(jit_cotangents(f, example(args, i, shared), v[i], diff))
        for i in np.ndindex(*batch)
    ]

    def stacked(xs):
        return np.stack(xs).reshape(batch + np.shape(xs[0]))

    cts = tuple(
        np.sum([r[1][k] for r in rows], axis=0)
        if sum_shared and p in shared
        else stacked([r[1][k] for r in rows])
        for k, p in enumerate(diff)
    )
    return stacked([r[0] for r in rows]), cts


def per_example_cotangents(f, args, v, diff, shared):
    """Per-example cotangents with ``jax.vmap`` over the leading axis."""
    in_axes = tuple(None if i in shared else 0 for i in range(len(args)))
    return jax.vmap(lambda a, u: cotangents(f, a, u, diff), in_axes=(in_axes, 0))(args, v)


# Compiling is what costs time on a CPU: run eagerly, every small operation
# would be compiled on its own. So every computation below is one jitted
# program, shared between tests where the shapes agree, and on a CPU the
# programs skip LLVM's optimization passes, which do not change IEEE results
# and take longer than these tiny programs run. In ``rule_and_oracle`` the
# oracle sees float64: the rule's (possibly rounded) inputs upcast.


def jit(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """``jax.jit`` with the verifier's fast compilation on a CPU (fnbp._compile)."""
    return jax.jit(fn, compiler_options=fast_compile_options(), **kwargs)


@functools.partial(jit, static_argnums=(0, 1, 4))
def rule_and_oracle(rule, reference, args, v, diff):
    """``(cotangents(rule, ...), cotangents(reference, ... in float64))``."""
    return cotangents(rule, args, v, diff), cotangents(reference, upcast(args), upcast(v), diff)


@functools.partial(jit, static_argnums=(0, 1, 5))
def hvp_rule_and_oracle(rule, reference, args, v, tangents, diff):
    return hvp(rule, args, v, tangents, diff), hvp(reference, args, v, tangents, diff)


jit_cotangents = jit(cotangents, static_argnums=(0, 3))


# --- the contract every rule meets ------------------------------------------------------


def assert_batch_vjp_equals_reference_float64(case, batch=(2, 3), seed=7) -> None:
    """The rule's cotangents equal its reference's on a float64 batch, under jit."""
    args, v = draw(case, jnp.float64, batch, seed=seed)
    got = jit_cotangents(case.rule, args, v, case.diff)
    want = jit_cotangents(case.reference, args, v, case.diff)
    assert_close(got, want, F64_RTOL)


class RuleContract:
    """Tests run for every ``case`` (a fixture defined by the subclass' module).

    Everything runs under ``jax.jit`` except the plain ``jax.vmap`` test: a
    rule traces the same Python either way, and compiling each small
    operation on its own is what makes a suite slow.
    """

    def test_custom_rule_is_used_and_backward_equals_vjp(self, case):
        args, v = draw(case, jnp.float64, (2,))
        assert "custom_vjp_call" in primitive_names(case.rule, *args)
        got = fnbp.backward(case.rule, *args)(v)
        want = jax.vjp(case.rule, *args)[1](v)
        for g, w in zip(got, want, strict=True):
            if g is None:  # no cotangent: an integer argument (float0) or None
                assert all(leaf.dtype == jax.dtypes.float0 for leaf in jax.tree.leaves(w))
            else:
                assert_close(g, w, 0.0)

    def test_vjp_of_one_example_under_jit_equals_oracle_float64(self, case):
        args, v = draw(case, jnp.float64, (), seed=1)
        got = jit_cotangents(case.rule, args, v, case.diff)
        want = jit_cotangents(case.reference, args, v, case.diff)
        assert_close(got, want, F64_RTOL)

    def test_vjp_of_a_batch_under_jit_equals_oracle_float64(self, case):
        args, v = draw(case, jnp.float64, (4,), seed=1)
        got, want = rule_and_oracle(case.rule, case.reference, args, v, case.diff)
        assert_close(got, want, F64_RTOL)

    @pytest.mark.parametrize("transform", ["vmap", "jit(vmap)"])
    def test_per_example_cotangents_equal_loop(self, case, transform):
        args, v = draw(case, jnp.float64, (4,), seed=2)
        per_example = lambda a, u: per_example_cotangents(  # noqa: E731
            case.rule, a, u, case.diff, case.shared
        )
        if transform == "jit(vmap)":
            per_example = jit(per_example)
        want = loop_over_examples(
            case.reference, args, v, case.diff, case.shared, (4,), sum_shared=False
        )
        assert_close(per_example(args, v), want, F64_RTOL)

    def test_hessian_vector_product_equals_oracle(self, case):
        args, v = draw(case, jnp.float64, (3,), seed=3)
        rng = np.random.default_rng(4)
        tangents = tuple(normal(rng, args[i].shape, args[i].dtype) for i in case.diff)
        got, want = hvp_rule_and_oracle(case.rule, case.reference, args, v, tangents, case.diff)
        assert_close(got, want, F64_RTOL)

    def test_batch_equals_stacked_examples(self, case):
        """Two leading example axes; parameter cotangents are the per-example sums."""
        batch = (2, 3)
        args, v = draw(case, jnp.float64, batch, seed=5)
        got = jit_cotangents(case.rule, args, v, case.diff)
        want = loop_over_examples(
            case.rule, args, v, case.diff, case.shared, batch, sum_shared=True
        )
        assert_close(got, want, F64_RTOL)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_dtype_in_equals_dtype_out_under_jit(self, case, dtype):
        """Output and cotangents keep the input dtype; values match the float64
        oracle at the rounded inputs within the dtype's tolerance."""
        args, v = draw(case, dtype, (4,), seed=1)
        (out, cts), want = rule_and_oracle(case.rule, case.reference, args, v, case.diff)
        assert out.dtype == jnp.dtype(dtype)
        assert [c.dtype for c in cts] == [args[i].dtype for i in case.diff]
        assert_close((out, cts), want, TOLERANCE[dtype])


# --- an independent reference network: fnbp.mlp's params, eqs. 7.36 and 2.14 --------------


def ref_mlp(params, x):
    """MM, ReLU, ..., MM for fnbp.mlp's params (dicts for MM, () for the activation)."""
    h = x
    for p in params:
        if p == ():
            h = jnp.where(h > 0, h, 0.0)
        else:
            h = h @ p["W"].T + p["b"]
    return h


def ref_loss(params, x, y):
    t = ref_mlp(params, x)
    t_y = jnp.take_along_axis(t, y[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(t, axis=1) - t_y)


def mlp_problem(widths, n, dtype, seed=0):
    """fnbp.mlp-shaped parameters, inputs and labels as NumPy arrays (nothing touches JAX).

    ``widths`` = (input, hidden..., classes): one MM per consecutive pair with a
    () between them for the ReLU, W He-scaled normal and b ~ N(0, 0.1^2); x is
    standard normal of shape (n, input) and y int32 labels in [0, classes).
    """
    rng = np.random.default_rng(seed)

    def linear(out, m):
        return {
            "W": np.asarray(rng.normal(size=(out, m)) * np.sqrt(2 / m), dtype),
            "b": np.asarray(rng.normal(size=out) * 0.1, dtype),
        }

    layers = [linear(out, m) for m, out in zip(widths[:-1], widths[1:])]
    params = tuple(p for layer in layers for p in (layer, ()))[:-1]
    x = np.asarray(rng.normal(size=(n, widths[0])), dtype)
    y = rng.integers(0, widths[-1], size=n).astype(np.int32)
    return params, x, y
