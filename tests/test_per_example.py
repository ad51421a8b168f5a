"""Per-example norms, clipped gradients and moments (fnbp/per_example.py) against vmap(grad).

The oracle is ``jax.vmap(jax.grad(...))`` of plain-jnp reference networks
written below, independently of fnbp, reading the parameter pytrees that
``model.init`` makes: g_i = dJ^(i)/dparams for every example i, in float64.
From the g_i, NumPy computes what each fnbp function must return:

- norms ||g_i|| and per-leaf norms ||g_i(P)||;
- clipped means (1/n) sum_i min(1, C/||g_i||) g_i, flat and per parameter,
  with C the median norm so that some examples are clipped and some not;
- with a mask k: sum_i k_i s_i g_i ("sum") and its mean over the kept examples;
- grad_moments: (1/n) sum_i g_i and (1/n) sum_i g_i (.) g_i.

fnbp runs all of them in one jitted program per network (model and loss
static), to a relative error of 1e-10 per array.
"""

from __future__ import annotations

import functools
import math
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _networks import (
    CASES,
    COMPILE,
    K,
    N,
    problem,
    random_params,
    ref_cross_entropy,
    ref_scaled,
    scale_layer,
)
from _oracle import iter_eqns, rel_err

import fnbp

F64_RTOL = 1e-10
MASK = np.array([1, 0, 1, 1, 0, 1], bool)


# --- the oracle: vmap(grad) of the reference, then NumPy --------------------------------


@functools.partial(jax.jit, static_argnums=(0, 4), compiler_options=COMPILE)
def per_example_oracle(ref, params, x, y, ref_loss=ref_cross_entropy):
    """(J^(i), g_i) for every example: vmap of grad of example i's mean loss."""

    def one(params, x_i, y_i):
        return jnp.mean(ref_loss(ref(params, x_i[None]), y_i[None]))

    return jax.vmap(jax.value_and_grad(one), in_axes=(None, 0, 0))(params, x, y)


def sq(g):
    return np.sum(np.square(g), axis=tuple(range(1, g.ndim)))


def clip_scale(norm, C):
    """min(1, C/||g_i||), 1 for a zero gradient."""
    return np.where(norm > C, C / np.where(norm > 0, norm, 1.0), 1.0)


def contract(s, g):
    return np.tensordot(s, g, 1)


def expected(ref, params, x, y):
    """Every quantity from the oracle's g_i, with C the median norm (flat and per leaf)."""
    losses, g = per_example_oracle(ref, params, x, y)
    losses = np.asarray(losses)
    g = jax.tree.map(np.asarray, g)
    leaf_norms = jax.tree.map(lambda a: np.sqrt(sq(a)), g)
    norms = np.sqrt(sum(sq(a) for a in jax.tree.leaves(g)))
    C = float(np.median(norms))
    C_leaf = jax.tree.map(lambda r: float(np.median(r)), leaf_norms)
    s = clip_scale(norms, C)
    s_leaf = jax.tree.map(clip_scale, leaf_norms, C_leaf)
    k = MASK.astype(np.float64)
    return {
        "C": C,
        "C_leaf": C_leaf,
        "s": s,
        "s_leaf": s_leaf,
        "losses": losses,
        "norms": norms,
        "leaf_norms": leaf_norms,
        "J": losses.mean(),
        "J_mask": (k * losses).sum() / k.sum(),
        "flat": jax.tree.map(lambda a: contract(s, a) / N, g),
        "leaf": jax.tree.map(lambda a, t: contract(t, a) / N, g, s_leaf),
        "mask_sum": jax.tree.map(lambda a: contract(k * s, a), g),
        "mask_mean": jax.tree.map(lambda a: contract(k * s, a) / k.sum(), g),
        "mean": jax.tree.map(lambda a: a.mean(axis=0), g),
        "second_moment": jax.tree.map(lambda a: np.mean(a * a, axis=0), g),
    }


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=COMPILE)
def fnbp_all(model, loss, params, x, y, C, C_leaf, mask):
    """Every per-example quantity from fnbp, in one program."""
    return {
        "norms": fnbp.per_example_grad_norms(model, loss, params, x, y),
        "flat": fnbp.clipped_grads(model, loss, params, x, y, C),
        "leaf": fnbp.clipped_grads(model, loss, params, x, y, C_leaf),
        "mask_sum": fnbp.clipped_grads(model, loss, params, x, y, C, mask=mask, reduction="sum"),
        "mask_mean": fnbp.clipped_grads(model, loss, params, x, y, C, mask=mask),
        "moments": fnbp.grad_moments(model, loss, params, x, y),
        "backprop": fnbp.backprop(model, loss, params, x, y),
    }


def check_against_oracle(got, want):
    losses, norms = got["norms"]
    checks = {"losses": (losses, want["losses"]), "norms": (norms, want["norms"])}
    J, grads, flat_norms = got["flat"]
    checks.update(
        J=(J, want["J"]), flat=(grads, want["flat"]), flat_norms=(flat_norms, want["norms"])
    )
    J, grads, leaf_norms = got["leaf"]
    checks.update(leaf=(grads, want["leaf"]), leaf_norms=(leaf_norms, want["leaf_norms"]))
    for name in ("mask_sum", "mask_mean"):
        J, grads, _ = got[name]
        checks[name] = (grads, want[name])
        checks[f"{name} J"] = (J, want["J_mask"])
    J, grads, second = got["moments"]
    checks.update(
        moments_J=(J, want["J"]),
        mean=(grads, want["mean"]),
        second_moment=(second, want["second_moment"]),
    )
    for name, (a, b) in checks.items():
        err = rel_err(a, b)
        assert err <= F64_RTOL, f"{name}: relative error {err:.3g}"
    # grad_moments' grads are backprop's
    assert rel_err(got["moments"][1], got["backprop"][1]) <= 1e-14
    assert rel_err(got["moments"][0], got["backprop"][0]) == 0.0


@pytest.mark.parametrize("case", list(CASES))
def test_every_quantity_equals_the_vmap_grad_oracle(case):
    model, ref, params, x, y = problem(case)
    want = expected(ref, params, x, y)
    # the median clips some examples and leaves others: both branches of min(1, C/||g_i||)
    assert 0 < np.sum(want["s"] < 1) < N
    assert any(0 < np.sum(s < 1) < N for s in jax.tree.leaves(want["s_leaf"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fnbp.PerExampleFallbackWarning)  # no fallback here
        got = fnbp_all(
            model,
            fnbp.cross_entropy_loss,
            params,
            x,
            y,
            want["C"],
            want["C_leaf"],
            jnp.asarray(MASK),
        )
    assert jax.tree.structure(got["leaf"][2]) == jax.tree.structure(params)
    assert got["flat"][2].shape == (N,) and got["flat"][2].dtype == jnp.float64
    check_against_oracle(got, want)


# --- what the programs build ----------------------------------------------------------


def shapes_in(jaxpr) -> set[tuple[int, ...]]:
    return {tuple(v.aval.shape) for eqn in iter_eqns(jaxpr) for v in eqn.outvars}


def mlp_program_inputs():
    model = fnbp.mlp([32, 24, K])
    params = random_params(model, (16,))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((N, 16)))
    return model, params, x, jnp.arange(N, dtype=jnp.int32) % K


def test_clipped_grads_and_moments_of_an_mlp_build_no_per_example_weight_gradient():
    model, params, x, y = mlp_program_inputs()
    per_example_W = {(N,) + tuple(p["W"].shape) for p in params[0::2]}
    loss = fnbp.cross_entropy_loss
    for fn in (
        lambda p: fnbp.clipped_grads(model, loss, p, x, y, 1.0),
        lambda p: fnbp.clipped_grads(model, loss, p, x, y, jax.tree.map(lambda _: 1.0, p)),
        lambda p: fnbp.grad_moments(model, loss, p, x, y),
    ):
        assert not per_example_W & shapes_in(jax.make_jaxpr(fn)(params).jaxpr)
    # whereas per_example_grads has to build them
    grads_jaxpr = jax.make_jaxpr(lambda p: fnbp.per_example_grads(model, loss, p, x, y))
    assert per_example_W <= shapes_in(grads_jaxpr(params).jaxpr)


def test_clipped_grads_of_an_mlp_computes_each_weight_gradient_once():
    # After dead-code elimination, clipping adds no matrix product to backprop:
    # the norms are ||v_i||^2 ||z_i||^2 and each dW is one V^T diag(s) Z.
    model, params, x, y = mlp_program_inputs()
    loss = fnbp.cross_entropy_loss

    def products(fn):
        text = jax.jit(fn).lower(params, x, y).as_text()
        return len(re.findall(r"\bdot_general\b", text))

    want = products(lambda p, x, y: fnbp.backprop(model, loss, p, x, y))
    assert products(lambda p, x, y: fnbp.clipped_grads(model, loss, p, x, y, 1.0)) == want
    assert (
        products(
            lambda p, x, y: fnbp.clipped_grads(
                model, loss, p, x, y, 1.0, mask=jnp.asarray(MASK), reduction="sum"
            )
        )
        == want
    )


def test_conv_layers_that_materialize_reuse_their_per_example_gradients():
    # fnbp.cnn(K, (3, 4)) on 4x4x2: the first conv's hooks materialize its g_i
    # (2 T^2 = 512 > D = 54), the second's sq_norms takes the Gram form (T = 4:
    # 32 <= 108). Mixed ghost clipping: clipped_grads contracts the first
    # layer's g_i with the scales, so the compiled program drops that layer's
    # weight-gradient convolution; grad_moments takes both layers' mean
    # gradients from their materialized g_i, so it has none at all.
    model, _, shape, _ = CASES["cnn-2d"]
    params = random_params(model, shape)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((N,) + shape))
    y = jnp.arange(N, dtype=jnp.int32) % K
    loss = fnbp.cross_entropy_loss

    def convolutions(fn):
        text = jax.jit(fn).lower(params, x, y).compile().as_text()
        return len(re.findall(r"\bconvolution\(", text))

    backprop = convolutions(lambda p, x, y: fnbp.backprop(model, loss, p, x, y))
    assert backprop == 5  # 2 forward, the second layer's dz, 2 weight gradients
    assert convolutions(lambda p, x, y: fnbp.clipped_grads(model, loss, p, x, y, 1.0)) == 4
    assert convolutions(lambda p, x, y: fnbp.grad_moments(model, loss, p, x, y)) == 3


# --- the fallback ------------------------------------------------------------------------


def test_a_layer_without_rules_falls_back_and_says_so_once():
    name = "scale_without_rules"
    model = fnbp.serial(fnbp.Linear(5), fnbp.Tanh(), scale_layer(name), fnbp.Linear(K))
    _, _, _, x, y = problem("mlp")
    params = random_params(model, (4,))
    want = expected(ref_scaled, params, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fnbp_all(
            model,
            fnbp.cross_entropy_loss,
            params,
            x,
            y,
            want["C"],
            want["C_leaf"],
            jnp.asarray(MASK),
        )
    check_against_oracle(got, want)
    said = [str(w.message) for w in caught if w.category is fnbp.PerExampleFallbackWarning]
    # five calls that need sq_norms, one that needs sq_grads: each said once
    assert len(said) == 2, said
    assert all(f"layer '{name}' has parameters but no" in m for m in said)
    assert any(
        "no sq_norms rule" in m
        and "fnbp.make_layer(name, init, forward, backward, sq_norms=...)" in m
        for m in said
    )
    assert any("no sq_grads rule" in m for m in said)
    assert issubclass(fnbp.PerExampleFallbackWarning, UserWarning)


# --- edges: zero gradients, an empty mask, jit with the functions themselves -------------


CLIP = jax.jit(
    fnbp.clipped_grads, static_argnums=(0, 1), static_argnames="reduction", compiler_options=COMPILE
)


def ref_mse(t, y):
    return 0.5 * jnp.sum((t - y) ** 2, axis=-1)


def test_a_zero_gradient_is_not_clipped_and_gives_no_nan():
    model, ref, params, x, _ = problem("mlp")
    y = model.apply(params, x)
    y = y.at[1:].add(1.0)  # mse: example 0 is fit exactly, g_0 = 0
    for C in (0.5, jax.tree.map(lambda _: 0.5, params)):
        J, grads, norms = CLIP(model, fnbp.mse_loss, params, x, y, C)
        assert all(np.isfinite(g).all() for g in jax.tree.leaves((J, grads, norms)))
        assert all(float(n[0]) == 0.0 for n in jax.tree.leaves(norms))
    _, per_example = per_example_oracle(ref, params, x, y, ref_mse)
    norms = np.sqrt(sum(sq(np.asarray(g)) for g in jax.tree.leaves(per_example)))
    s = clip_scale(norms, 0.5)
    assert s[0] == 1.0 and np.all(s[1:] < 1)
    want = jax.tree.map(lambda g: contract(s, np.asarray(g)) / N, per_example)
    assert rel_err(CLIP(model, fnbp.mse_loss, params, x, y, 0.5)[1], want) <= F64_RTOL


def test_no_kept_example_gives_zero_loss_and_zero_grads():
    model, _, params, x, y = problem("mlp")
    for reduction in ("mean", "sum"):
        J, grads, norms = CLIP(
            model,
            fnbp.cross_entropy_loss,
            params,
            x,
            y,
            1.0,
            mask=jnp.zeros(N, bool),
            reduction=reduction,
        )
        assert float(J) == 0.0 and norms.shape == (N,)
        assert all(not np.any(g) for g in jax.tree.leaves(grads))


def test_an_infinite_clip_norm_clips_nothing():
    model, ref, params, x, y = problem("mlp")
    J, grads, _ = CLIP(model, fnbp.cross_entropy_loss, params, x, y, math.inf)
    want = expected(ref, params, x, y)
    assert rel_err(J, want["J"]) <= F64_RTOL and rel_err(grads, want["mean"]) <= F64_RTOL


# --- errors ------------------------------------------------------------------------------


CLIP_NORM = (
    "clipped_grads: clip_norm must be > 0 (the L2 norm each example's gradient is clipped to), got "
)
CLIP_FIX = "; pass a positive float (float('inf') clips nothing)"


@pytest.mark.parametrize(
    "clip_norm, error, message",
    [
        (
            0.0,
            ValueError,
            "^" + re.escape(f"{CLIP_NORM}0.0; 0 would drop every gradient{CLIP_FIX}") + "$",
        ),
        (
            -1.0,
            ValueError,
            "^"
            + re.escape(f"{CLIP_NORM}-1.0; a negative one would flip the gradients{CLIP_FIX}")
            + "$",
        ),
        (
            math.nan,
            ValueError,
            "^" + re.escape(f"{CLIP_NORM}nan; a NaN clip norm would clip nothing{CLIP_FIX}") + "$",
        ),
        (np.float32("nan"), ValueError, re.escape(f"{CLIP_NORM}nan; a NaN clip norm")),
        (jnp.asarray(math.nan), ValueError, re.escape(f"{CLIP_NORM}nan; a NaN clip norm")),
        (np.int64(0), ValueError, re.escape(f"{CLIP_NORM}0.0; 0 would drop")),
        (True, TypeError, r"clipped_grads: clip_norm must be a positive float, got bool"),
        ("1", TypeError, r"clipped_grads: clip_norm must be a positive float, got str"),
        (
            np.ones(3),
            TypeError,
            r"clip_norm must be one positive float \(a scalar\), got an array "
            r"of shape \(3,\)",
        ),
        (
            (1.0, 2.0),
            TypeError,
            r"clipped_grads: clip_norm must be one positive float .* or a "
            r"pytree with params' structure.*tree_map\(lambda _: C, params\)",
        ),
    ],
)
def test_bad_clip_norms_are_named(clip_norm, error, message):
    model, _, params, x, y = problem("mlp")
    with pytest.raises(error, match=message):
        fnbp.clipped_grads(model, fnbp.cross_entropy_loss, params, x, y, clip_norm)


def test_a_bad_per_parameter_clip_norm_names_its_leaf():
    model, _, params, x, y = problem("mlp")
    C = jax.tree.map(lambda _: 1.0, params)
    C[2]["b"] = -2.0
    with pytest.raises(ValueError, match=r"clipped_grads: clip_norm\[2\]\['b'\] must be > 0"):
        fnbp.clipped_grads(model, fnbp.cross_entropy_loss, params, x, y, C)
    C[2]["b"], C[0]["W"] = 1.0, jnp.asarray(math.nan, jnp.float32)  # a concrete array leaf
    with pytest.raises(
        ValueError,
        match=r"^clipped_grads: clip_norm\[0\]\['W'\] must be > 0 "
        r".*got nan; a NaN clip norm would clip nothing",
    ):
        fnbp.clipped_grads(model, fnbp.cross_entropy_loss, params, x, y, C)


def test_a_traced_clip_norm_that_is_not_positive_gives_nan_never_the_unclipped_gradient():
    """Under jit a NaN C would compare false everywhere (no clipping, for DP a privacy
    failure) and a negative C would flip the gradients: both give NaN instead."""
    model, ref, params, x, y = problem("mlp")
    loss = fnbp.cross_entropy_loss
    for C in (math.nan, -1.0, 0.0):
        J, grads, norms = CLIP(model, loss, params, x, y, C)  # C traced
        assert all(np.all(np.isnan(g)) for g in jax.tree.leaves(grads)), C
        assert np.all(np.isfinite(norms)) and np.isfinite(J)
    want = expected(ref, params, x, y)
    C_leaf = jax.tree.map(lambda _: jnp.asarray(1e3), params)  # clips nothing: the mean
    C_leaf[2]["W"] = jnp.asarray(math.nan)
    _, grads, _ = CLIP(model, loss, params, x, y, C_leaf)
    assert np.all(np.isnan(grads[2]["W"]))
    others = [
        (g, w)
        for path, g, w in zip(
            *(
                [p for p, _ in jax.tree_util.tree_leaves_with_path(grads)],
                jax.tree.leaves(grads),
                jax.tree.leaves(want["mean"]),
            )
        )
        if jax.tree_util.keystr(path) != "[2]['W']"
    ]
    assert others and all(rel_err(g, w) <= F64_RTOL for g, w in others)


def test_checked_clipped_grads_refuses_a_traced_clip_norm_that_is_not_positive():
    model, _, params, x, y = problem("mlp")
    loss = fnbp.cross_entropy_loss
    checked = fnbp.checked(lambda p, C: fnbp.clipped_grads(model, loss, p, x, y, C))
    message = (
        "^"
        + re.escape(
            "clipped_grads: clip_norm must be > 0 (the L2 norm each "
            "example's gradient is clipped to), got a traced value that is "
            "NaN, zero or negative; pass a positive float (float('inf') "
            "clips nothing) (`check` failed)"
        )
        + "$"
    )
    for C in (math.nan, -0.5, 0.0):
        with pytest.raises(ValueError, match=message):
            checked(params, C)
    assert rel_err(checked(params, math.inf), CLIP(model, loss, params, x, y, math.inf)) == 0


# --- masks ---------------------------------------------------------------------------


MASK_VALUES = (
    "clipped_grads: mask must hold only 0 and 1 (or True and False), one per "
    "example: 1 keeps it, 0 drops it"
)


@pytest.mark.parametrize(
    "mask, error, message",
    [
        (
            np.array([1, 0.5, 1, 1, 0, 1]),
            ValueError,
            f"{MASK_VALUES}; got mask[1] = 0.5; to weight examples, scale their losses instead",
        ),
        (
            np.array([1, 0, 1, 1, 0, np.nan]),
            ValueError,
            f"{MASK_VALUES}; got mask[5] = nan; to weight examples, scale their losses instead",
        ),
        (
            np.array([1, 0, 2, 1, 0, 1]),
            ValueError,
            f"{MASK_VALUES}; got mask[2] = 2; to weight examples, scale their losses instead",
        ),
        (
            np.ones(6, np.complex64),
            TypeError,
            "clipped_grads: mask must be a bool or 0/1 array, got dtype complex64",
        ),
        (
            list("abcdef"),
            TypeError,
            "clipped_grads: mask must be a bool or 0/1 array of shape (6,), got list "
            "['a', 'b', 'c', 'd', 'e', 'f']",
        ),
        (
            np.ones((6, 1), bool),
            ValueError,
            "clipped_grads: mask must have shape (6,), one entry per example (1 or True keeps it, 0 "
            "or False drops it), got shape (6, 1)",
        ),
    ],
)
def test_bad_masks_are_refused_by_name(mask, error, message):
    model, _, params, x, y = problem("mlp")
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        fnbp.clipped_grads(model, fnbp.cross_entropy_loss, params, x, y, 1.0, mask=mask)


def test_a_traced_mask_other_than_0_or_1_gives_nan_and_is_refused_when_checked():
    model, _, params, x, y = problem("mlp")
    loss = fnbp.cross_entropy_loss
    as_list = fnbp.clipped_grads(model, loss, params, x, y, 1.0, mask=MASK.tolist())
    assert rel_err(as_list, CLIP(model, loss, params, x, y, 1.0, mask=MASK)) <= 1e-15
    J, grads, _ = CLIP(model, loss, params, x, y, 1.0, mask=MASK.astype(np.float64) * 0.5)
    assert np.isnan(J) and all(np.all(np.isnan(g)) for g in jax.tree.leaves(grads))
    checked = fnbp.checked(lambda p, m: fnbp.clipped_grads(model, loss, p, x, y, 1.0, mask=m))
    with pytest.raises(
        ValueError,
        match="^" + re.escape(f"{MASK_VALUES}; got another value (`check` failed)") + "$",
    ):
        checked(params, jnp.asarray(MASK, jnp.int32) * 2)
    assert (
        rel_err(
            checked(params, jnp.asarray(MASK, jnp.int32)),
            CLIP(model, loss, params, x, y, 1.0, mask=MASK),
        )
        <= 1e-15
    )


# --- the inputs of every per-example function ---------------------------------------------


PER_EXAMPLE = [
    fnbp.per_example_grads,
    fnbp.per_example_grad_norms,
    fnbp.grad_moments,
    fnbp.clipped_grads,
]


@pytest.mark.parametrize("fn", PER_EXAMPLE, ids=lambda f: f.__name__)
def test_per_example_functions_refuse_x_without_an_example_axis(fn):
    model, _, params, x, y = problem("mlp")
    extra = (1.0,) if fn is fnbp.clipped_grads else ()
    with pytest.raises(
        ValueError,
        match=f"^{fn.__name__}: x must have a leading example axis, "
        r"shape \(n, \.\.\.\), got a scalar; pass x\[None\] for "
        r"one example$",
    ):
        fn(model, fnbp.cross_entropy_loss, params, jnp.float32(1.0), y, *extra)
    with pytest.raises(
        ValueError,
        match=f"^{fn.__name__}: x has 6 examples \\(x.shape=\\(6,\\)\\) "
        r"but y has 5 \(y.shape=\(5,\)\); pass one target per "
        r"example$",
    ):
        fn(fnbp.Relu(), fnbp.mse_loss, (), jnp.ones(6), jnp.ones(5), *extra)
    with pytest.raises(TypeError, match=f"^{fn.__name__}: x must be an array of numbers"):
        fn(model, fnbp.cross_entropy_loss, params, {"x": x}, y, *extra)


def test_per_example_functions_take_nested_lists():
    model, _, params, x, y = problem("mlp")
    loss = fnbp.cross_entropy_loss
    x_list, y_list = np.asarray(x).tolist(), np.asarray(y).tolist()
    got = fnbp.per_example_grads(model, loss, params, x_list, y_list)
    assert rel_err(got, fnbp.per_example_grads(model, loss, params, x, y)) <= 1e-15


def test_bad_masks_reductions_models_and_losses_are_named():
    model, _, params, x, y = problem("mlp")
    loss = fnbp.cross_entropy_loss
    with pytest.raises(
        ValueError,
        match=r"clipped_grads: mask must have shape \(6,\), one "
        r"entry per example .*got shape \(5,\)",
    ):
        fnbp.clipped_grads(model, loss, params, x, y, 1.0, mask=jnp.ones(5, bool))
    with pytest.raises(
        ValueError,
        match=r"clipped_grads: reduction must be 'mean' .* or "
        r"'sum' .*got 'max'",
    ):
        fnbp.clipped_grads(model, loss, params, x, y, 1.0, reduction="max")
    for fn in (fnbp.clipped_grads, fnbp.grad_moments):
        args = (1.0,) if fn is fnbp.clipped_grads else ()
        with pytest.raises(TypeError, match=rf"{fn.__name__}: model must be a fnbp Layer"):
            fn(lambda p, x: x, loss, params, x, y, *args)
        with pytest.raises(
            ValueError,
            match=rf"{fn.__name__}: the loss returned shape \(\) for "
            r"6 examples; it must return one loss per example",
        ):
            jax.eval_shape(
                lambda p: fn(model, lambda t, y: jnp.mean(loss(t, y)), p, x, y, *args), params
            )


def test_a_hook_with_the_wrong_structure_is_named():
    lin = fnbp.Linear(K)
    total = fnbp.make_layer(
        "total",
        lin.init,
        lin.forward,
        lin.backward,
        lambda p, r, v: (sum(lin.sq_norms(p, r, v)[0].values()), lin.backward(p, r, v)[1]),
    )
    _, _, _, x, y = problem("mlp")
    params = random_params(total, (4,))
    with pytest.raises(
        TypeError,
        match=r"total: sq_norms returned PyTreeDef\(\*\), but the "
        r"params have structure .*return a pytree like params",
    ):
        jax.eval_shape(
            lambda p: fnbp.per_example_grad_norms(total, fnbp.cross_entropy_loss, p, x, y), params
        )


# --- docs/per-example.md's "Per-example quantities and clipping" section runs as written ---

PAGE = pathlib.Path(__file__).parent.parent / "docs" / "per-example.md"


def python_blocks(title: str) -> list[str]:
    """The ```python blocks of the section ``## title`` of docs/per-example.md."""
    section = PAGE.read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_docs_per_example_section_runs():
    (block,) = python_blocks("Per-example quantities and clipping")
    namespace: dict = {}
    exec(compile(block, "docs/per-example.md", "exec"), namespace)
    params, norms = namespace["params"], namespace["norms"]
    assert norms.shape == (32,) and float(jnp.min(norms)) > 0
    for name in ("grads", "array_norms", "clipped_sum", "mean", "variance"):
        assert jax.tree.structure(namespace[name]) == jax.tree.structure(params), name
    assert all(
        float(jnp.min(v)) >= -1e-6 * float(jnp.max(v))
        for v in jax.tree.leaves(namespace["variance"])
    )
