"""The rules' per-example hooks ``sq_norms`` and ``sq_grads`` against a float64 oracle.

For a rule M(z, p_1, ..., p_k) and a cotangent v of a batch, example i's
gradient is ``g_i = d/dp <v_i, M(z_i, p)>``, taken here by ``jax.vmap`` of
``jax.grad`` of a plain reference written in this file. The hooks must give
``sum(g_i ** 2)`` per example (``sq_norms``) and ``sum_i g_i ** 2``
(``sq_grads``), with ``None`` for an absent bias and for eps, to 1e-10
relative in float64 under jit. Each case's shapes force one of the two
forms (Gram or materialized) by the stated cost rule ``2 T^2 <= D``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import F64_RTOL, jit, rel_err

from fnbp.rules import registry
from fnbp.rules._per_example import use_gram

# --- plain references, per example (any leading position axes) -----------------------


def _mm(z, W, b=None):
    u = z @ W.T
    return u if b is None else u + b


def _conv(z, w, b=None, *, stride, pads, dilation):
    n = w.ndim - 2
    lead = z.shape[: z.ndim - n - 1]
    dn = ("NWC", "WIO", "NWC") if n == 1 else ("NHWC", "HWIO", "NHWC")
    u = jax.lax.conv_general_dilated(
        z.reshape((-1,) + z.shape[len(lead) :]),
        w,
        stride,
        pads,
        rhs_dilation=dilation,
        dimension_numbers=dn,
    )
    u = u.reshape(lead + u.shape[1:])
    return u if b is None else u + b


def _layer_norm(z, gamma, beta, eps):
    mu = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean((z - mu) ** 2, axis=-1, keepdims=True)
    return beta + gamma * (z - mu) / jnp.sqrt(var + eps)


def _rms_norm(z, gamma, eps):
    return gamma * z / jnp.sqrt(jnp.mean(z * z, axis=-1, keepdims=True) + eps)


# --- cases ---------------------------------------------------------------------------

EPS = "eps"  # a non-trainable scalar argument


@dataclass(frozen=True)
class Case:
    """One rule call: z's shape, the arguments after z (shapes, None, or EPS).

    ``settings`` go to the rule (as its users write them), ``oracle`` to the
    reference; ``path`` is the form the cost rule must choose ("gram",
    "materialize") or "" where the rule has no choice.
    """

    name: str
    rule: str
    z: tuple[int, ...]
    args: tuple[Any, ...]
    ref: Callable[..., Any]
    path: str = ""
    settings: tuple = ()
    oracle: tuple = ()
    trainable: tuple[bool, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "trainable", tuple(a is not None and a != EPS for a in self.args))


def _conv_case(name, z, w, bias, path, settings=(), stride=None, pads=None, dilation=None):
    n = len(w) - 2
    oracle = (
        ("stride", stride or (1,) * n),
        ("pads", pads or ((1, 1),) * n),
        ("dilation", dilation or (1,) * n),
    )
    rule = "conv1d" if n == 1 else "conv2d"
    return Case(
        name, rule, z, (w, (w[-1],) if bias else None), _conv, path, tuple(settings), oracle
    )


CASES = (
    Case("mm", "mm", (4, 5), ((3, 5), (3,)), _mm, "gram"),
    Case("mm(no bias)", "mm", (4, 5), ((3, 5), None), _mm, "gram"),
    Case("mm(seq, gram)", "mm", (3, 2, 4), ((3, 4), (3,)), _mm, "gram"),
    Case("mm(seq 2x3, materialize)", "mm", (3, 2, 3, 4), ((3, 4), (3,)), _mm, "materialize"),
    Case("mm(seq, materialize, no bias)", "mm", (2, 5, 2), ((2, 2), None), _mm, "materialize"),
    _conv_case("conv1d(gram)", (3, 5, 4), (3, 4, 5), True, "gram"),
    _conv_case("conv1d(materialize)", (3, 9, 4), (3, 4, 5), True, "materialize"),
    _conv_case(
        "conv1d(s2, p(1,2), d2, gram)",
        (3, 9, 4),
        (3, 4, 5),
        True,
        "gram",
        {"stride": 2, "padding": (1, 2), "dilation": 2}.items(),
        (2,),
        ((1, 2),),
        (2,),
    ),
    _conv_case(
        "conv1d(s2, p(1,2), d2, materialize, no bias)",
        (3, 20, 2),
        (3, 2, 3),
        False,
        "materialize",
        {"stride": 2, "padding": (1, 2), "dilation": 2}.items(),
        (2,),
        ((1, 2),),
        (2,),
    ),
    _conv_case(
        "conv1d(positions, s2, valid, gram)",
        (2, 2, 4, 3),
        (3, 3, 4),
        True,
        "gram",
        {"stride": 2, "padding": "valid"}.items(),
        (2,),
        ((0, 0),),
    ),
    _conv_case(
        "conv1d(positions, valid, materialize)",
        (2, 2, 6, 2),
        (3, 2, 2),
        True,
        "materialize",
        {"padding": "valid"}.items(),
        pads=((0, 0),),
    ),
    _conv_case(
        "conv2d(s2, valid, gram)",
        (3, 5, 5, 2),
        (3, 3, 2, 3),
        True,
        "gram",
        {"stride": 2, "padding": "valid"}.items(),
        (2, 2),
        ((0, 0), (0, 0)),
    ),
    _conv_case(
        "conv2d(s2, same, d(1,2), gram)",
        (3, 4, 3, 2),
        (3, 3, 2, 4),
        True,
        "gram",
        {"stride": 2, "padding": "same", "dilation": (1, 2)}.items(),
        (2, 2),
        ((1, 1), (2, 2)),
        (1, 2),
    ),
    _conv_case(
        "conv2d(s(1,2), p((1,1),(0,1)), d(2,1), materialize)",
        (3, 6, 5, 2),
        (3, 2, 2, 3),
        True,
        "materialize",
        {"stride": (1, 2), "padding": ((1, 1), (0, 1)), "dilation": (2, 1)}.items(),
        (1, 2),
        ((1, 1), (0, 1)),
        (2, 1),
    ),
    _conv_case(
        "conv2d(valid, one output position)",
        (3, 3, 3, 2),
        (3, 3, 2, 3),
        True,
        "gram",
        {"padding": "valid"}.items(),
        pads=((0, 0), (0, 0)),
    ),
    _conv_case(
        "conv2d(same, materialize, no bias)", (2, 5, 5, 2), (3, 3, 2, 2), False, "materialize"
    ),
    Case("layer_norm(per feature)", "layer_norm", (4, 6), ((6,), (6,), EPS), _layer_norm),
    Case("layer_norm(scalar)", "layer_norm", (4, 6), ((), (), EPS), _layer_norm),
    Case(
        "layer_norm(positions, gamma (m,), beta ())",
        "layer_norm",
        (3, 2, 6),
        ((6,), (), EPS),
        _layer_norm,
    ),
    Case("rms_norm(per feature)", "rms_norm", (4, 6), ((6,), EPS), _rms_norm),
    Case("rms_norm(positions, scalar)", "rms_norm", (3, 2, 6), ((), EPS), _rms_norm),
)


def _draw(case: Case, dtype, seed: int = 0):
    """z, the arguments after z, and a cotangent v of the output's shape."""
    gen = np.random.default_rng(seed)

    def draw(shape, shift=0.0):
        return jnp.asarray(gen.normal(size=shape) + shift, dtype)

    z = draw(case.z, 1.0)
    args = tuple(
        None if a is None else jnp.asarray(0.1, dtype) if a == EPS else draw(a, 0.5)
        for a in case.args
    )
    out = jax.eval_shape(functools.partial(case.ref, **dict(case.oracle)), z, *args)
    return z, args, draw(out.shape)


def _hooks(case: Case, z, args, v):
    rule = registry()[case.rule]
    settings = dict(case.settings)
    res = rule.fwd(z, *args, **settings)[1]
    return (rule.hooks["sq_norms"](res, v, **settings), rule.hooks["sq_grads"](res, v, **settings))


def _oracle(case: Case, z, args, v):
    """Per example g_i = d/dp <v_i, M(z_i, p)> by vmap of grad: (norms, sums of squares)."""
    ref = functools.partial(case.ref, **dict(case.oracle))
    params = tuple(a for a, t in zip(args, case.trainable) if t)

    def inner(ps, zi, vi):
        it = iter(ps)
        full = [next(it) if t else a for a, t in zip(args, case.trainable)]
        return jnp.sum(vi * ref(zi, *full))

    grads = iter(jax.vmap(jax.grad(inner), in_axes=(None, 0, 0))(params, z, v))
    per_arg = [next(grads) if t else None for t in case.trainable]
    norms = tuple(
        None if g is None else jnp.sum(g * g, axis=tuple(range(1, g.ndim))) for g in per_arg
    )
    sums = tuple(None if g is None else jnp.sum(g * g, axis=0) for g in per_arg)
    return norms, sums


@functools.partial(jit, static_argnums=(0,))
def _hooks_and_oracle(case, z, args, v):
    return _hooks(case, z, args, v), _oracle(case, z, args, v)


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request) -> Case:
    return request.param


def test_hooks_equal_the_per_example_oracle_in_float64(case):
    z, args, v = _draw(case, jnp.float64)
    got, want = _hooks_and_oracle(case, z, args, v)
    for hook, g, w in zip(("sq_norms", "sq_grads"), got, want):
        assert len(g) == len(case.args), f"{hook} returns one entry per argument after z"
        for i, (gi, wi) in enumerate(zip(g, w)):
            if wi is None:
                assert gi is None, f"{hook}[{i}] must be None (absent or not trainable)"
                continue
            assert gi.dtype == jnp.float64 and gi.shape == wi.shape, (hook, i, gi.shape)
            assert rel_err(gi, wi) <= F64_RTOL, (hook, i, rel_err(gi, wi))


@pytest.mark.parametrize("case", [c for c in CASES if c.path], ids=lambda c: c.name)
def test_shapes_force_the_stated_form(case):
    """The case exercises the form its name says: Gram iff 2 T^2 <= D."""
    z, args, v = _draw(case, jnp.float64)
    positions = math.prod(v.shape[1:-1])
    per_example = math.prod(case.args[0])  # W (d_out, d_in) or w (k..., C, C2)
    assert use_gram(positions, per_example) == (case.path == "gram")
    assert use_gram(positions, per_example) == (2 * positions**2 <= per_example)


def test_bfloat16_inputs_give_float32_outputs_of_the_argument_shapes(case):
    z, args, v = _draw(case, jnp.bfloat16)
    norms, sums = jax.eval_shape(functools.partial(_hooks, case), z, args, v)
    for i, a in enumerate(args):
        if not case.trainable[i]:
            assert norms[i] is None and sums[i] is None
            continue
        assert (norms[i].dtype, norms[i].shape) == (jnp.float32, (z.shape[0],))
        assert (sums[i].dtype, sums[i].shape) == (jnp.float32, a.shape)


@pytest.mark.parametrize("rule", ["mm", "conv1d", "layer_norm"])
def test_a_cotangent_without_an_example_axis_is_refused(rule):
    case = next(c for c in CASES if c.rule == rule)
    z, args, v = _draw(case, jnp.float64)
    rule_ = registry()[rule]
    res = rule_.fwd(z[0], *args, **dict(case.settings))[1]
    with pytest.raises(ValueError, match=rf"{rule}_sq_norms: v must have a leading example axis"):
        rule_.hooks["sq_norms"](res, v[0], **dict(case.settings))


# --- grads and moments: the per-example gradients a hook materializes, handed over -----


def _grads_and_moments(case: Case, z, args, v):
    rule = registry()[case.rule]
    settings = dict(case.settings)
    res = rule.fwd(z, *args, **settings)[1]
    return rule.hooks["grads"](res, v, **settings), rule.hooks["moments"](res, v, **settings)


def _per_example_oracle(case: Case, z, args, v):
    """Every trainable argument's g_i, stacked (n, *shape), by vmap of grad; None elsewhere."""
    ref = functools.partial(case.ref, **dict(case.oracle))
    params = tuple(a for a, t in zip(args, case.trainable) if t)

    def inner(ps, zi, vi):
        it = iter(ps)
        return jnp.sum(vi * ref(zi, *[next(it) if t else a for a, t in zip(args, case.trainable)]))

    grads = iter(jax.vmap(jax.grad(inner), in_axes=(None, 0, 0))(params, z, v))
    return tuple(next(grads) if t else None for t in case.trainable)


@functools.partial(jit, static_argnums=(0,))
def _materialized_and_oracle(case, z, args, v):
    return _grads_and_moments(case, z, args, v), _per_example_oracle(case, z, args, v)


@pytest.mark.parametrize(
    "case", [c for c in CASES if "grads" in registry()[c.rule].hooks], ids=lambda c: c.name
)
def test_grads_and_moments_hand_over_what_the_cost_rule_materializes(case):
    """``grads``: the g_i where sq_norms materializes them; ``moments``: their sums where
    sq_grads does (more than one position); the bias alongside the weight; float64 oracle."""
    z, args, v = _draw(case, jnp.float64)
    (grads, moments), g = _materialized_and_oracle(case, z, args, v)
    assert len(grads) == len(moments) == len(case.args)
    materialized = case.path == "materialize"
    several = math.prod(v.shape[1:-1]) > 1
    for i, g_i in enumerate(g):
        if g_i is None:
            assert grads[i] is None and moments[i] is None
            continue
        if not materialized:
            assert grads[i] is None, f"grads[{i}] under the Gram form must be None"
        else:
            assert grads[i].shape == g_i.shape and grads[i].dtype == jnp.float64
            assert rel_err(grads[i], g_i) <= F64_RTOL, (i, rel_err(grads[i], g_i))
        if not several:
            assert moments[i] is None, f"moments[{i}] with one position must be None"
            continue
        total, squares = moments[i]
        assert total.shape == squares.shape == case.args[i]
        assert rel_err(total, jnp.sum(g_i, axis=0)) <= F64_RTOL
        assert rel_err(squares, jnp.sum(g_i * g_i, axis=0)) <= F64_RTOL


def test_materialized_moments_run_a_chunk_of_examples_at_a_time(monkeypatch):
    """outer_moments in chunks (a scan over full chunks and one partial) equals one batch."""
    from fnbp.rules import _per_example

    gen = np.random.default_rng(5)
    # (n, chunk asked for): 7 in chunks of 1, 2 (+1), 3 (+1) and 7; 6 in chunks of 3 (a
    # divisor of 6 instead of 5 + 1) and 6
    for n, steps in ((7, (1, 2, 3, 100)), (6, (5, 6))):
        a = jnp.asarray(gen.normal(size=(n, 3, 4)))
        b = jnp.asarray(gen.normal(size=(n, 3, 2)))
        g = jnp.einsum("itp,itq->ipq", a, b)
        want = (jnp.sum(g, axis=0), jnp.sum(g * g, axis=0))
        for step in steps:
            monkeypatch.setattr(_per_example, "CHUNK_NUMBERS", step * 4 * 2)
            got = _per_example.outer_moments(a, b)
            for x, w in zip(got, want):
                assert x.shape == w.shape and rel_err(x, w) <= F64_RTOL
    assert _per_example.outer_moments(a[:, :1], b[:, :1]) is None


CHUNKED = (
    "conv1d(s2, p(1,2), d2, materialize, no bias)",
    "conv1d(positions, valid, materialize)",
    "conv2d(s2, same, d(1,2), gram)",
    "conv2d(same, materialize, no bias)",
)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in CHUNKED], ids=lambda c: c.name)
def test_conv_grads_and_moments_in_chunks_equal_the_oracle(case, monkeypatch):
    """conv grads, and moments in chunks of 1, of 2 (+ the rest) and of all examples, each
    chunk's patches built alone."""
    from fnbp.rules import _per_example, conv_per_example

    z, args, v = _draw(case, jnp.float64)
    g = _materialized_and_oracle(case, z, args, v)[1]
    settings = dict(case.settings)
    res = registry()[case.rule].fwd(z, *args, **settings)[1]
    spatial = len(case.args[0]) - 2
    positional = (
        settings.get("stride", 1),
        settings.get("padding", "same"),
        settings.get("dilation", 1),
    )
    for per_chunk in (1, 2, 10**6):
        monkeypatch.setattr(_per_example, "CHUNK_NUMBERS", per_chunk * math.prod(case.args[0]))
        # the unjitted bodies, in a new jit: traced afresh with the chunk size just set
        grads, moments = jax.jit(
            lambda res, v: (
                conv_per_example._conv_grads(spatial, res, v, *positional),
                conv_per_example._conv_moments(spatial, res, v, *positional),
            )
        )(res, v)
        for grad, m, g_i in zip(grads, moments, g):
            if g_i is None:
                assert grad is None and m is None
                continue
            assert rel_err(m[0], jnp.sum(g_i, axis=0)) <= F64_RTOL
            assert rel_err(m[1], jnp.sum(g_i * g_i, axis=0)) <= F64_RTOL
            if case.path == "materialize":
                assert rel_err(grad, g_i) <= F64_RTOL
            else:
                assert grad is None
