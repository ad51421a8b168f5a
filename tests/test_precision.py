"""Tests of mixed precision (fnbp.train.precision): the policy, its gradients, loss scaling, training.

Tolerances. bfloat16 keeps 8 significant bits: machine epsilon 2^-7, unit
roundoff u = 2^-8 (every rounding has relative error <= u). In a bfloat16
pass of the 3-layer MLP below, the first layer's weight gradient
dW1 = dz1^T x is built from about 8 rounded quantities in a chain (x, W2, W3,
the loss cotangent dt, the hidden activations, and the product of each of the
three backward matmuls), so its relative error is at most about 8u = 2^-5
when the roundings add up, and smaller when their signs cancel; the last
layer's, dW3 = dt^T a2, passes through 3 roundings (dt, a2, the product):
3u. Both are checked on the relative Frobenius error of each gradient array,
over a batch of 512 (the sum over examples averages the per-example errors;
measured over 6 seeds: at most 3.7u for the first layer and 1.3u for the
last; with 128 examples up to 7.1u).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _checkpoint_files import edit_metadata
from _oracle import iter_eqns, mlp_problem
from test_train_command import SMALL, metadata_of, params_of
from test_train_command import train as train_command

import fnbp
from fnbp import train
from fnbp.cli import train as train_command_module
from fnbp.train import precision as P

BF16_U = 2.0**-8  # unit roundoff of bfloat16
BF16_GRAD_RTOL = 8 * BF16_U  # first layer; the last layer gets 3u (module doc)
F32, BF16, F16 = (jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


def norm_err(got, want):
    """Relative Frobenius error ||got - want|| / ||want|| of one array, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def dtypes_of(tree):
    return {jnp.result_type(leaf) for leaf in jax.tree_util.tree_leaves(tree)}


# --- the policy ----------------------------------------------------------------------


@pytest.mark.parametrize("name, compute", [("float32", F32), ("bfloat16", BF16), ("float16", F16)])
def test_precision_names_set_the_compute_dtype_with_float32_params_and_output(name, compute):
    policy = fnbp.Precision.from_name(name)
    assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == (F32, compute, F32)
    assert policy.name == name
    assert policy.needs_loss_scale == (compute == F16)


def test_precision_full_spec_in_jmp_spelling_and_its_name():
    long = fnbp.Precision.from_name("params=float32,compute=bfloat16,output=float32")
    assert (
        long
        == fnbp.Precision.from_name("p=f32,c=bf16,o=f32")
        == fnbp.Precision(compute_dtype=jnp.bfloat16)
    )
    odd = fnbp.Precision.from_name("p=f64,c=f16,o=f32")
    assert (odd.param_dtype, odd.compute_dtype, odd.output_dtype) == (
        jnp.dtype(jnp.float64),
        F16,
        F32,
    )
    assert odd.name == "params=float64,compute=float16,output=float32"
    assert fnbp.Precision.from_name(odd.name) == odd
    assert hash(long) == hash(fnbp.Precision(F32, BF16, F32))  # a static jit argument


@pytest.mark.parametrize(
    "name",
    ["bf8", "float", "params=float32,compute=int8", "compute=bf16,c=f32", "", "p=f32;c=bf16"],
)
def test_precision_unknown_name_lists_the_valid_ones(name):
    with pytest.raises(
        ValueError,
        match=r"unknown precision .*one of float32, bfloat16, "
        r"float16 or a full policy such as 'params=float32,",
    ):
        fnbp.Precision.from_name(name)
    with pytest.raises(ValueError, match=r"^make_train_step: unknown precision"):
        train.make_train_step(
            fnbp.mlp([3]), fnbp.cross_entropy_loss, optax.sgd(0.1), precision=name
        )


def test_precision_rejects_non_floating_dtypes_and_non_names():
    with pytest.raises(TypeError, match="Precision: compute_dtype must be a floating dtype"):
        fnbp.Precision(compute_dtype=jnp.int32)
    with pytest.raises(TypeError, match="precision must be a fnbp.Precision or a name"):
        fnbp.with_precision(fnbp.mlp([3]), 16)


def test_cast_helpers_cast_floating_leaves_only():
    policy = fnbp.Precision.from_name("bfloat16")
    tree = {"x": jnp.ones(2, jnp.float32), "i": jnp.arange(2)}
    assert policy.cast_to_compute(tree)["x"].dtype == BF16
    assert policy.cast_to_compute(tree)["i"].dtype == tree["i"].dtype
    assert policy.cast_to_param(policy.cast_to_compute(tree))["x"].dtype == F32


# --- the policy applied: dtypes and gradients ---------------------------------------------

MODEL = fnbp.mlp([6, 5, 3])
backprop_jit = jax.jit(fnbp.backprop, static_argnums=(0, 1))


def small_problem(dtype=jnp.float32):
    return jax.tree.map(jnp.asarray, mlp_problem((4, 6, 5, 3), 16, dtype))


def test_bf16_policy_computes_in_bf16_and_returns_float32_loss_and_grads():
    params, x, y = small_problem()
    mixed = fnbp.with_precision(MODEL, "bfloat16")
    assert mixed is fnbp.with_precision(MODEL, fnbp.Precision(compute_dtype=jnp.bfloat16))
    J, grads = backprop_jit(mixed, fnbp.cross_entropy_loss, params, x, y)
    assert J.dtype == F32 and dtypes_of(grads) == {F32}
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert mixed.apply(params, x).dtype == F32
    # every matmul of the forward and backward passes takes bfloat16 operands
    jaxpr = jax.make_jaxpr(lambda p: fnbp.backprop(mixed, fnbp.cross_entropy_loss, p, x, y))
    dots = [e for e in iter_eqns(jaxpr(params).jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 3 + 2 * 3  # forward: 3 MMs; backward: W^T v and v z^T for each
    assert all(v.aval.dtype == BF16 for e in dots for v in e.invars)


def test_with_precision_keeps_input_dtype_of_the_cotangent_and_sq_norms():
    params, x, y = small_problem()
    mixed = fnbp.with_precision(MODEL, "bfloat16")
    _, vjp = jax.vjp(mixed.apply, params, x)
    dparams, dx = vjp(jnp.ones((16, 3), jnp.float32))
    assert dx.dtype == F32 and dtypes_of(dparams) == {F32}
    norms_jit = jax.jit(fnbp.per_example_grad_norms, static_argnums=(0, 1))
    losses, norms = norms_jit(mixed, fnbp.cross_entropy_loss, params, x, y)
    _, want = norms_jit(MODEL, fnbp.cross_entropy_loss, params, x, y)
    assert losses.dtype == F32 and norms.dtype == F32
    assert norm_err(norms, want) <= BF16_GRAD_RTOL


def test_clipping_under_a_policy_is_the_models_own_book_keeping():
    """Under a float32 policy clipped_grads and grad_moments are the bare model's, bit for
    bit, and per-parameter clipping compiles to the bare model's dots (one per weight
    gradient, no second backward pass per parameter array)."""
    params, x, y = small_problem()
    wrapped = fnbp.with_precision(MODEL, "float32")
    per_array = jax.tree_util.tree_map(lambda _: 0.3, params)
    clipped = jax.jit(fnbp.clipped_grads, static_argnums=(0, 1))
    moments = jax.jit(fnbp.grad_moments, static_argnums=(0, 1))
    for clip in (0.5, per_array):
        got = clipped(wrapped, fnbp.cross_entropy_loss, params, x, y, clip)
        want = clipped(MODEL, fnbp.cross_entropy_loss, params, x, y, clip)
        assert all(
            np.array_equal(g, w)
            for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))
        )

        def dots(model):
            jaxpr = jax.make_jaxpr(
                lambda p: fnbp.clipped_grads(model, fnbp.cross_entropy_loss, p, x, y, clip)
            )(params)
            return sum(e.primitive.name == "dot_general" for e in iter_eqns(jaxpr.jaxpr))

        assert dots(wrapped) == dots(MODEL)
    got = moments(wrapped, fnbp.cross_entropy_loss, params, x, y)
    want = moments(MODEL, fnbp.cross_entropy_loss, params, x, y)
    assert all(
        np.array_equal(g, w)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))
    )


@pytest.fixture(scope="module")
def digits():
    data = fnbp.load_dataset("digits")
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731 - as fnbp train feeds the mlp
    return flat(data.x_train), data.y_train, flat(data.x_test), data.y_test


DIGITS_MODEL = fnbp.mlp([512, 512, 10])


def test_bf16_gradients_agree_with_float32_on_digits(digits):
    """The bf16 policy's J and gradients are the float32 ones to BF16_GRAD_RTOL (module doc)."""
    x_train, y_train, _, _ = digits
    _, params = DIGITS_MODEL.init(jax.random.key(0), x_train.shape[1:], jnp.float32)
    x, y = jnp.asarray(x_train[:512]), jnp.asarray(y_train[:512])
    J32, g32 = backprop_jit(DIGITS_MODEL, fnbp.cross_entropy_loss, params, x, y)
    J16, g16 = backprop_jit(
        fnbp.with_precision(DIGITS_MODEL, "bfloat16"), fnbp.cross_entropy_loss, params, x, y
    )
    assert J16.dtype == F32 and abs(float(J16) - float(J32)) <= 2 * BF16_U * float(J32)
    errors = [norm_err(a, b) for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32))]
    assert dtypes_of(g16) == {F32}
    assert max(errors) <= BF16_GRAD_RTOL, errors
    assert max(errors[-2:]) <= 3 * BF16_U, errors  # W3 and b3 of the last MM
    assert min(errors) > 0  # the bf16 pass really rounded


def test_bf16_mixed_precision_trains_digits_to_97_percent(digits):
    x_train, y_train, x_test, y_test = digits
    _, params = DIGITS_MODEL.init(jax.random.key(0), x_train.shape[1:], jnp.float32)
    adam = optax.adam(1e-3)
    result = train.fit(
        DIGITS_MODEL,
        fnbp.cross_entropy_loss,
        adam,
        params,
        x_train,
        y_train,
        key=jax.random.key(1),
        epochs=10,
        batch_size=32,
        x_test=x_test,
        y_test=y_test,
        precision="bfloat16",
    )
    final = result.history[-1]
    assert final["test_accuracy"] >= 0.97, final
    # the master weights and Adam's moments stayed float32
    assert dtypes_of(result.params) == {F32}
    assert dtypes_of(result.state.opt_state) == {F32, jnp.dtype(jnp.int32)}


def test_float32_policy_is_the_step_without_policy_bit_for_bit():
    params, x, y = small_problem()
    sgd = optax.sgd(0.1)
    state = sgd.init(params)
    plain = train.make_train_step(MODEL, fnbp.cross_entropy_loss, sgd)(params, state, x, y)
    f32 = train.make_train_step(MODEL, fnbp.cross_entropy_loss, sgd, precision="float32")(
        params, state, x, y
    )
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(f32), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_step_computes_in_the_policy_and_reports_float32():
    params, x, y = small_problem()
    want = train.make_eval_step(MODEL, fnbp.cross_entropy_loss)(params, x, y)
    got = train.make_eval_step(MODEL, fnbp.cross_entropy_loss, precision="bfloat16")(params, x, y)
    assert got["loss"].dtype == F32 and got["accuracy"].dtype == F32
    assert abs(float(got["loss"]) - float(want["loss"])) <= 4 * BF16_U * float(want["loss"])


# --- dynamic loss scaling ----------------------------------------------------------------


def test_dynamic_loss_scale_halves_on_overflow_and_doubles_after_period_good_steps():
    scale = fnbp.dynamic_loss_scale(initial_scale=8.0, period=3, factor=2.0, min_scale=2.0)
    update = jax.jit(scale.update)
    state = scale.init()
    assert (float(state.scale), int(state.good_steps)) == (8.0, 0)
    seen = []
    for finite in (True, True, False, True, True, True, True, False, False, False):
        state = update(state, jnp.asarray(finite))
        seen.append((float(state.scale), int(state.good_steps)))
    assert seen == [
        (8, 1),
        (8, 2),
        (4, 0),
        (4, 1),
        (4, 2),
        (8, 0),
        (8, 1),
        (4, 0),
        (2, 0),
        (2, 0),
    ]  # the last two: floored at min_scale
    big = fnbp.dynamic_loss_scale(initial_scale=2.0**127, period=1)
    assert float(big.update(big.init(), jnp.asarray(True)).scale) == 2.0**127  # no inf


def test_dynamic_loss_scale_rejects_bad_settings():
    with pytest.raises(ValueError, match="period must be an int >= 1"):
        fnbp.dynamic_loss_scale(period=0)
    with pytest.raises(ValueError, match="need factor > 1"):
        fnbp.dynamic_loss_scale(factor=1.0)


def test_loss_scaled_optimizer_unscales_or_skips_and_keeps_its_scale_in_the_state():
    params = {"w": jnp.asarray([1.0, -2.0], jnp.float32)}
    adam = optax.adam(0.1)
    scaled = fnbp.loss_scaled(adam, fnbp.dynamic_loss_scale(initial_scale=4.0, period=10))
    state = scaled.init(params)
    grads = {"w": jnp.asarray([0.5, 0.25], jnp.float32)}
    updates, new_state = scaled.update(jax.tree.map(lambda g: 4.0 * g, grads), state, params)
    want, want_inner = adam.update(grads, adam.init(params), params)
    np.testing.assert_array_equal(updates["w"], want["w"])  # S = 4: unscaling is exact
    assert jax.tree.leaves(new_state.inner_state)[0] == jax.tree.leaves(want_inner)[0]
    assert (float(new_state.loss_scale.scale), int(new_state.loss_scale.good_steps)) == (4, 1)
    bad = {"w": jnp.asarray([jnp.inf, 1.0], jnp.float32)}
    updates, skipped = scaled.update(bad, new_state, params)
    np.testing.assert_array_equal(updates["w"], [0.0, 0.0])
    for a, b in zip(jax.tree.leaves(skipped.inner_state), jax.tree.leaves(new_state.inner_state)):
        np.testing.assert_array_equal(a, b)  # Adam's count and moments untouched
    assert (float(skipped.loss_scale.scale), int(skipped.loss_scale.good_steps)) == (2, 0)
    with pytest.raises(TypeError, match="loss_scaled: optimizer must be an optax"):
        fnbp.loss_scaled(lambda g: g)


SGD = optax.sgd(0.5)


def test_float16_step_scales_the_loss_and_matches_float32_gradients():
    params, x, y = small_problem()
    scaled = fnbp.loss_scaled(SGD, fnbp.dynamic_loss_scale(initial_scale=2.0**10))
    step = train.make_train_step(MODEL, fnbp.cross_entropy_loss, scaled, precision="float16")
    new_params, state, metrics = step(params, scaled.init(params), x, y)
    J, grads = backprop_jit(MODEL, fnbp.cross_entropy_loss, params, x, y)
    got = jax.tree.map(lambda p, q: (p - q) / 0.5, params, new_params)
    assert dtypes_of(new_params) == {F32} and metrics["loss"].dtype == F32
    assert abs(float(metrics["loss"]) - float(J)) <= 2.0**-9 * float(J)  # J unscaled
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(grads)):
        assert norm_err(a, b) <= 2.0**-6  # float16: u = 2^-11, 8 roundings, a lr rounding
    assert (float(state.loss_scale.scale), int(state.loss_scale.good_steps)) == (2.0**10, 1)


def test_float16_step_with_overflowing_scale_is_skipped_and_the_scale_halves():
    params, x, y = small_problem()
    # dJ/dt is at most 1/n; times S = 2^40 it is far past float16's largest number (65504)
    scaled = fnbp.loss_scaled(SGD, fnbp.dynamic_loss_scale(initial_scale=2.0**40))
    step = train.make_train_step(MODEL, fnbp.cross_entropy_loss, scaled, precision="float16")
    state = scaled.init(params)
    new_params, state, metrics = step(params, state, x, y)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(state.loss_scale.scale) == 2.0**39 and np.isfinite(float(metrics["loss"]))


def test_loss_scaled_inside_a_chain_is_refused():
    params, x, y = small_problem()
    chained = optax.chain(optax.clip(1.0), fnbp.loss_scaled(SGD))
    step = train.make_train_step(MODEL, fnbp.cross_entropy_loss, chained)
    with pytest.raises(ValueError, match=r"make fnbp.loss_scaled the outermost wrapper"):
        step(params, chained.init(params), x, y)


def test_float16_without_loss_scaling_is_refused():
    params, x, y = small_problem()
    step = train.make_train_step(MODEL, fnbp.cross_entropy_loss, SGD, precision="float16")
    with pytest.raises(
        ValueError,
        match=r"precision 'float16' computes in float16.*"
        r"fnbp\.loss_scaled\(optimizer\)",
    ):
        step(params, SGD.init(params), x, y)


def test_float16_mixed_precision_trains_digits_and_grows_the_scale(digits):
    x_train, y_train, x_test, y_test = digits
    model = fnbp.mlp([64, 10])
    _, params = model.init(jax.random.key(0), x_train.shape[1:], jnp.float32)
    scaled = fnbp.loss_scaled(
        optax.adam(3e-3), fnbp.dynamic_loss_scale(initial_scale=2.0**4, period=20)
    )
    result = train.fit(
        model,
        fnbp.cross_entropy_loss,
        scaled,
        params,
        x_train,
        y_train,
        key=jax.random.key(1),
        epochs=3,
        batch_size=64,
        x_test=x_test,
        y_test=y_test,
        precision="float16",
    )
    assert result.history[-1]["test_accuracy"] >= 0.9, result.history
    # 66 steps: the scale grew from 2^4 (no overflow at these scales) and stays a power of 2
    scale = float(result.state.opt_state.loss_scale.scale)
    assert scale > 2.0**4 and np.log2(scale) == int(np.log2(scale))
    assert dtypes_of(result.params) == {F32}


def test_float16_fit_on_a_mesh_equals_the_single_device_run():
    params, x, y = small_problem()
    scaled = fnbp.loss_scaled(optax.adam(1e-2))
    runs = [
        train.fit(
            MODEL,
            fnbp.cross_entropy_loss,
            scaled,
            params,
            x,
            y,
            key=jax.random.key(1),
            epochs=2,
            batch_size=8,
            precision="float16",
            mesh=mesh,
        )
        for mesh in (None, fnbp.make_mesh(1))
    ]
    for a, b in zip(jax.tree.leaves(runs[0].state), jax.tree.leaves(runs[1].state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(runs[1].state.opt_state.loss_scale.good_steps) == 4


def test_loss_scaled_state_round_trips_through_a_checkpoint(tmp_path):
    params, _, _ = small_problem()
    scaled = fnbp.loss_scaled(SGD)
    state = scaled.init(params)
    fnbp.save_checkpoint(tmp_path / "c.npz", params, state, step=3)
    loaded = fnbp.load_checkpoint(tmp_path / "c.npz", params, scaled.init(params))
    assert isinstance(loaded.opt_state, P.LossScaledState)
    assert float(loaded.opt_state.loss_scale.scale) == 2.0**15


# --- fnbp train --precision ------------------------------------------------------------


def good_steps_of(run_folder):
    """The loss scale's count of finite steps, as saved in a run's checkpoint."""
    (record,) = [
        leaf
        for leaf in metadata_of(run_folder)["trees"]["opt_state"]["leaves"]
        if leaf["path"].endswith(".good_steps")
    ]
    with np.load(run_folder / "checkpoint.npz", allow_pickle=False) as archive:
        return int(archive[record["name"]])


def test_cli_precision_is_in_the_config_and_resume_keeps_it(tmp_path, capsys):
    split = tmp_path / "split"
    assert train_command(*SMALL, "--precision", "float16", "--epochs", "1", "--out", split) == 0
    config = metadata_of(split)["metadata"]["config"]
    assert config["precision"] == "float16"
    assert '"precision": "float16"' in (split / "config.json").read_text()
    assert good_steps_of(split) == 8  # 160 examples in batches of 20, none overflowed
    assert train_command("--resume", split, "--epochs", "2", "--no-progress") == 0
    # the loss scale came back from the checkpoint: its count went on from 8
    assert good_steps_of(split) == 16
    assert {array.dtype for array in params_of(split).values()} == {np.dtype(np.float32)}
    assert train_command("--resume", split, "--precision", "bfloat16") == 2
    assert "made with --precision float16 but --precision bfloat16" in capsys.readouterr().err


def test_cli_resumes_a_run_saved_before_precision_existed_as_float32(tmp_path, capsys):
    run = tmp_path / "old"
    assert train_command(*SMALL, "--epochs", "1", "--out", run) == 0
    edit_metadata(
        run / "checkpoint.npz",
        run / "checkpoint.npz",
        lambda meta: meta["metadata"]["config"].pop("precision"),
    )
    parser = argparse.ArgumentParser()
    train_command_module.add_arguments(parser)
    config, _ = train_command_module._resolve(parser.parse_args(["--resume", str(run)]))
    assert config["precision"] == "float32"


def test_cli_unknown_precision_is_a_one_line_error_listing_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_command("--precision", "bf8")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--precision" in err and all(name in err for name in P.PRECISIONS)
    assert train_command_module.PRECISIONS == P.PRECISIONS  # the CLI's copy, kept JAX-free
