"""The contract of a rule (docs/design.md#the-rule-contract), checked for every declared rule.

Parametrized over fnbp.rules.registry(): a rule declared in fnbp/rules/ is
covered here without adding anything. What is checked: the record is filled
in and consistent (names, top-level and fnbp.rules exports, layer spec and
initialization family), every example runs, dtype in = dtype out for
float16, bfloat16, float32 and float64 (output and cotangents), jit and vmap
agree with the eager call, and the record's plain reference agrees with the
rule's forward in float64. The independent float64 oracles of each rule's
backward function are in the per-family test files (test_activations.py,
...): they do not use the registry's references.
"""

from __future__ import annotations

import functools
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import jit, rel_err

import fnbp
from fnbp.rules import Rule, declare, registry

RULES = tuple(registry().values())
EXAMPLES = tuple((rule, name, example) for rule in RULES for name, example in rule.examples.items())
DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _float(x) -> bool:
    return x is not None and jnp.issubdtype(jnp.result_type(x), jnp.floating)


@pytest.fixture(params=RULES, ids=lambda r: r.name)
def rule(request) -> Rule:
    return request.param


@pytest.fixture(params=EXAMPLES, ids=lambda e: e[1])
def example(request):
    rule, name, example = request.param
    return rule, functools.partial(rule.function, **example.kwargs), example


# --- the record ---------------------------------------------------------------------------


def test_record_is_filled_in(rule):
    name = rule.name
    assert rule.function.__name__ == name
    assert rule.fwd.__name__ == f"{name}_fwd" and rule.bwd.__name__ == f"{name}_bwd"
    assert rule.kink.strip() and callable(rule.reference) and callable(rule.apply)
    assert next(iter(rule.examples)) == name
    assert rule.family in ("linear", "activation", "loss", "normalization", "conv", "pooling")
    assert (
        rule.function.__module__ == f"fnbp.rules.{rule.family}"
        or rule.function.__module__.startswith("fnbp.rules.")
    )
    assert all(re.fullmatch(r"\d+\.\d+", e) for e in rule.equations)
    for eq in rule.equations:  # the docstrings cite what the record says
        assert eq in inspect.getmodule(rule.function).__doc__ + (rule.function.__doc__ or "") + (
            rule.bwd.__doc__ or ""
        ), f"{name}: equation {eq} is cited nowhere in its docs"
    assert rule.function.__doc__ and rule.fwd.__doc__ and rule.bwd.__doc__
    assert all(callable(hook) for hook in rule.hooks.values())


def test_rule_is_exported_at_the_top_and_its_fwd_bwd_in_fnbp_rules(rule):
    assert getattr(fnbp, rule.name) is rule.function and rule.name in fnbp.__all__
    assert getattr(fnbp.rules, f"{rule.name}_fwd") is rule.fwd
    assert getattr(fnbp.rules, f"{rule.name}_bwd") is rule.bwd


def test_type_checkers_see_every_rule_at_the_top():
    """fnbp/__init__.py names each rule for type checkers (the registry is not run by
    them): the block imports exactly the registry's rules, from the modules that define
    them, so that a rule declared in fnbp/rules/ and left out there fails here."""
    import ast

    tree = ast.parse(inspect.getsource(fnbp))
    blocks = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "_TYPE_CHECKING"
    ]
    assert len(blocks) == 1
    imported = {
        alias.asname or alias.name: node.module
        for node in blocks[0].body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert imported == {r.name: r.function.__module__ for r in RULES}


def test_activation_has_a_layer_and_an_initialization_family(rule):
    if rule.family != "activation":
        assert rule.init is None
        return
    assert rule.layer is not None and rule.init in ("he", "glorot")
    layer = fnbp.activation_layer(rule.name)
    assert fnbp.activation_layer(rule.function) is layer
    assert layer.name.split("(")[0] == rule.name
    assert set(rule.layer.arrays) <= set(rule.layer.settings)
    # mlp initializes the MM before the activation with the record's family.
    m, n = 300, 200
    _, params = fnbp.mlp([n, 10], rule.name).init(jax.random.key(0), (m,))
    variance = 2.0 / m if rule.init == "he" else 2.0 / (m + n)
    assert abs(np.var(np.asarray(params[0]["W"])) / variance - 1.0) < 0.05


def test_registry_is_read_only_and_names_are_unique():
    assert len({r.name for r in RULES}) == len(RULES)
    assert len({name for _, name, _ in EXAMPLES}) == len(EXAMPLES)
    with pytest.raises(TypeError):
        registry()["relu"] = RULES[0]  # type: ignore[index]
    relu = registry()["relu"]
    with pytest.raises(
        ValueError,
        match=r"^declare: a rule named 'relu' is already declared "
        r"\(in fnbp.rules.activations\); pick another name$",
    ):
        declare(
            relu.function,
            relu.fwd,
            relu.bwd,
            reference=relu.reference,
            examples=relu.examples,
            kink=relu.kink,
            family="activation",
        )
    assert registry()["relu"] is relu


def test_declare_refuses_a_misnamed_bwd_and_a_missing_kink():
    def my_rule(z):
        return z

    def my_rule_fwd(z):
        return z, None

    def backward(res, v):
        return (v,)

    with pytest.raises(
        ValueError,
        match=r"^declare: my_rule's bwd must be named my_rule_bwd, "
        r"got 'backward'$",
    ):
        declare(
            my_rule,
            my_rule_fwd,
            backward,
            reference=my_rule,
            examples=lambda k, d: (),
            kink="none: linear.",
            family="activation",
        )
    backward.__name__ = "my_rule_bwd"
    with pytest.raises(ValueError, match=r"^declare: my_rule needs a kink convention"):
        declare(
            my_rule,
            my_rule_fwd,
            backward,
            reference=my_rule,
            examples=lambda k, d: (),
            kink="",
            family="activation",
        )
    assert "my_rule" not in registry()


# --- every example ----------------------------------------------------------------------------


@functools.partial(jit, static_argnums=(0,))
def _out_and_cotangents(f, args, v):
    out, pull = jax.vjp(f, *args)
    return out, pull(v)


def _cotangent_for(f, args, seed=0):
    out = jax.eval_shape(f, *args)
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(out.shape), out.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_dtype_in_is_dtype_out(example, dtype):
    """Output and every floating cotangent keep the arguments' dtype."""
    rule, f, ex = example
    args = ex.make_args(jax.random.key(0), jnp.dtype(dtype))
    v = _cotangent_for(f, args)
    out, grads = _out_and_cotangents(f, args, v)
    assert out.dtype == jnp.dtype(dtype), rule.name
    assert len(grads) == len(args)
    for g, x in zip(grads, args):
        if _float(x):
            assert g.dtype == x.dtype and g.shape == x.shape
            assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


def test_reference_agrees_with_the_forward_in_float64(example):
    rule, f, ex = example
    args = ex.make_args(jax.random.key(1), jnp.dtype(jnp.float64))
    reference = functools.partial(rule.reference, **ex.kwargs)
    got, want = jit(lambda a: (f(*a), reference(*a)))(args)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-12, rule.name


def test_jit_and_vmap_agree_with_the_eager_call(example):
    """vmap over a new leading axis of the first argument (the others shared)."""
    rule, f, ex = example
    args = ex.make_args(jax.random.key(2), jnp.dtype(jnp.float64))
    eager = f(*args)
    assert rel_err(jax.jit(f)(*args), eager) <= 1e-14  # fusion may round differently
    first = jnp.stack([args[0], args[0]])
    batched = jax.jit(jax.vmap(f, in_axes=(0,) + (None,) * (len(args) - 1)))(first, *args[1:])
    assert batched.shape == (2,) + eager.shape
    assert rel_err(batched[1], eager) <= 1e-14


def test_backward_is_the_rule_of_the_example(example):
    """``fnbp.backward(f, *args)`` is callable and gives one cotangent per argument."""
    rule, f, ex = example
    args = ex.make_args(jax.random.key(3), jnp.dtype(jnp.float64))
    v = _cotangent_for(f, args, seed=3)
    by_backward = jit(lambda a, v: fnbp.backward(f, *a)(v))(args, v)
    _, by_vjp = _out_and_cotangents(f, args, v)
    assert len(by_backward) == len(args)
    for mine, theirs, x in zip(by_backward, by_vjp, args):
        if _float(x):
            assert rel_err(mine, theirs) <= 1e-15
        else:
            assert mine is None


# --- arrays given as nested lists ------------------------------------------------------------


def _as_lists(args):
    """Every array argument as the nested Python list (or number) of its values."""
    return tuple(None if a is None else np.asarray(a).tolist() for a in args)


def test_nested_lists_give_the_same_result_as_arrays(example):
    """Every argument of every example as nested lists: converted with jnp.asarray
    (float64 data, int labels), the same output bit for bit."""
    rule, f, ex = example
    args = ex.make_args(jax.random.key(4), jnp.dtype(jnp.float64))
    want = f(*args)
    got = f(*_as_lists(args))
    assert got.dtype == want.dtype and got.shape == want.shape, rule.name
    np.testing.assert_array_equal(got, want, err_msg=rule.name)


RAGGED = [[1.0, 2.0], [3.0]]


def test_a_ragged_list_is_refused_naming_the_rule_and_the_argument(rule):
    """Each array argument in turn replaced by a ragged list: fnbp's message,
    naming the rule and the argument, never one of jnp's."""
    example = next(iter(rule.examples.values()))
    args = example.make_args(jax.random.key(5), jnp.dtype(jnp.float32))
    names = list(inspect.signature(rule.function).parameters)
    for i, arg in enumerate(args):
        if arg is None:
            continue
        bad = list(args)
        bad[i] = RAGGED
        with pytest.raises(
            ValueError,
            match=rf"^{rule.name}: {names[i]} must be an array "
            r"\(a JAX or NumPy array, a Python number, or a "
            r"nested list or tuple of numbers of one "
            r"rectangular shape\), got a ragged list \(its "
            r"entries have different lengths or shapes\); "
            r"give every row the same length$",
        ):
            rule.function(*bad, **example.kwargs)
