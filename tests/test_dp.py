"""Tests of DP-SGD (fnbp.train.dp): the noisy gradient, Poisson sampling, the accountant,
fit(..., dp=...) and fnbp train --dp-clip/--dp-noise, down to digits' accuracy at an epsilon."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnbp
from fnbp import cli, train
from fnbp.train import dp

dp_accounting = pytest.importorskip("dp_accounting")

MODEL = fnbp.mlp([6, 3])


def relu(z):
    return jnp.where(z > 0, z, 0.0)


def ref_mlp(params, x):
    """MM, ReLU, MM (eq. 7.36) in plain jnp; params (mm, (), mm)."""
    first, _, last = params
    h = relu(x @ first["W"].T + first["b"])
    return h @ last["W"].T + last["b"]


def ref_cross_entropy(t, y):
    top = jnp.max(t, axis=-1, keepdims=True)
    log_z = top[..., 0] + jnp.log(jnp.sum(jnp.exp(t - top), axis=-1))
    return log_z - jnp.take_along_axis(t, y[..., None], axis=-1)[..., 0]


def problem(n=8, d=4, seed=0):
    kx, kp = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, d), jnp.float64)
    y = jnp.arange(n) % 3
    _, params = MODEL.init(kp, (d,), jnp.float64)
    return params, x, y


def rel_err(a, b):
    a, b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = sum(float(jnp.sum((p - q) ** 2)) for p, q in zip(a, b, strict=True))
    den = sum(float(jnp.sum(q ** 2)) for q in b)
    return (num / den) ** 0.5


# --- the noisy gradient -------------------------------------------------------------------


def test_noisy_grad_without_noise_is_the_clipped_sum_over_the_expected_batch():
    params, x, y = problem()
    mask = jnp.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
    C, B = 0.3, 5.0
    J, grads, norms = jax.jit(lambda p, m: dp.noisy_grad(
        MODEL, fnbp.cross_entropy_loss, p, x, y, jax.random.key(1), clip_norm=C,
        noise_multiplier=0.0, expected_batch_size=B, mask=m))(params, mask)
    # fnbp.clipped_grads' sum, divided by the expected batch size
    J2, summed, norms2 = jax.jit(lambda p, m: fnbp.clipped_grads(
        MODEL, fnbp.cross_entropy_loss, p, x, y, C, mask=m, reduction="sum"))(params, mask)
    assert rel_err(grads, jax.tree_util.tree_map(lambda g: g / B, summed)) <= 1e-14
    assert float(J) == pytest.approx(float(J2), rel=1e-14)
    assert np.allclose(norms, norms2, rtol=1e-14)
    # and the float64 oracle: vmap of jax.grad of the plain-jnp network, clipped by hand
    per_example = jax.jit(jax.vmap(jax.grad(
        lambda p, xi, yi: ref_cross_entropy(ref_mlp(p, xi[None]), yi[None])[0]),
        in_axes=(None, 0, 0)))(params, x, y)
    leaves = jax.tree_util.tree_leaves(per_example)
    norm = jnp.sqrt(sum(jnp.sum(g.reshape(len(x), -1) ** 2, axis=1) for g in leaves))
    scale = jnp.minimum(1.0, C / norm) * mask
    want = jax.tree_util.tree_map(lambda g: jnp.tensordot(scale, g, 1) / B, per_example)
    assert rel_err(grads, want) <= 1e-10
    assert np.allclose(norms, norm, rtol=1e-10)
    losses = ref_cross_entropy(ref_mlp(params, x), y)
    assert float(J) == pytest.approx(float(jnp.sum(losses * mask) / jnp.sum(mask)), rel=1e-12)
    assert float(jnp.max(norm * mask)) > C  # some example was clipped


def test_noise_has_std_sigma_C_over_B_on_every_leaf():
    model = fnbp.mlp([64, 10])
    _, params = model.init(jax.random.key(0), (32,), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (4, 32), jnp.float64)
    y = jnp.arange(4) % 10
    sigma, C, B = 2.0, 0.5, 4.0

    @jax.jit
    def grads(key, noise):
        return dp.noisy_grad(model, fnbp.cross_entropy_loss, params, x, y, key, clip_norm=C,
                             noise_multiplier=noise, expected_batch_size=B)[1]

    key = jax.random.key(7)
    noise = jax.tree_util.tree_map(lambda a, b: a - b, grads(key, sigma), grads(key, 0.0))
    leaves = jax.tree_util.tree_leaves(noise)
    flat = np.concatenate([np.ravel(leaf) for leaf in leaves])  # 2,762 draws
    std = sigma * C / B
    assert flat.size == 32 * 64 + 64 + 64 * 10 + 10
    assert abs(flat.mean()) <= 4 * std / np.sqrt(flat.size)
    assert np.std(flat) == pytest.approx(std, rel=0.06)
    # independent across leaves (no two leaves share draws) and across keys
    assert not np.allclose(np.ravel(leaves[1])[:10], np.ravel(leaves[3])[:10])
    other = jax.tree_util.tree_leaves(grads(jax.random.key(8), sigma))
    assert not np.allclose(other[0], jax.tree_util.tree_leaves(grads(key, sigma))[0])


# --- Poisson sampling ---------------------------------------------------------------------


def test_bucket_widths_and_lengths():
    assert dp.pad_multiple(128, 128 / 1438) == 32   # 2 sqrt(128 * 0.911) = 21.6
    assert dp.pad_multiple(32, 32 / 1438) == 16     # 11.2
    assert dp.pad_multiple(4, 0.5) == 8             # at least 8
    assert [dp.bucket(b, 16) for b in (0, 1, 16, 17, 40)] == [16, 16, 16, 32, 48]


def test_poisson_batch_is_the_bernoulli_draw_padded_with_mask_zero():
    n, q, m = 500, 0.05, 8
    for step in range(5):
        sample_key, _ = dp.step_keys(jax.random.key(3), step)
        indices, mask = dp.poisson_batch(sample_key, n, q, m)
        chosen = np.flatnonzero(np.asarray(jax.random.bernoulli(sample_key, jnp.float32(q),
                                                                (n,))))
        k = len(chosen)
        assert indices.dtype == np.int32 and mask.dtype == np.bool_
        assert len(indices) == len(mask) == dp.bucket(k, m) and len(indices) % m == 0
        assert np.array_equal(indices[:k], chosen) and mask[:k].all()
        assert not mask[k:].any() and not indices[k:].any()


def test_poisson_sampling_rate_is_q_over_many_steps():
    n, q, steps = 1000, 0.05, 200
    key = jax.random.key(11)
    sizes = np.array([int(dp.poisson_batch(dp.step_keys(key, t)[0], n, q, 8)[1].sum())
                      for t in range(steps)])
    # the kept count is Binomial(n, q) at each step: its mean and spread
    assert abs(sizes.sum() - steps * n * q) <= 4 * np.sqrt(steps * n * q * (1 - q))
    assert np.std(sizes) == pytest.approx(np.sqrt(n * q * (1 - q)), rel=0.25)
    assert len(set(sizes.tolist())) > 5  # the batch size varies, as Poisson sampling does


def test_step_keys_are_a_pure_function_of_key_and_step():
    a = dp.step_keys(jax.random.key(0), 5)
    b = dp.step_keys(jax.random.key(0), 5)
    c = dp.step_keys(jax.random.key(0), 6)
    data = [np.asarray(jax.random.key_data(k)) for k in (*a, *b, *c)]
    assert np.array_equal(data[0], data[2]) and np.array_equal(data[1], data[3])
    assert not np.array_equal(data[0], data[4]) and not np.array_equal(data[0], data[1])


# --- accounting ---------------------------------------------------------------------------


def test_epsilon_is_dp_accountings_rdp_and_decreases_with_sigma():
    q, steps, delta = 128 / 1438, 110, 1e-5
    accountant = dp_accounting.rdp.RdpAccountant(list(dp.RDP_ORDERS))
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(1.5)), steps)
    assert dp.epsilon(1.5, q, steps, delta) == accountant.get_epsilon(delta)
    sigmas = [0.8, 1.0, 1.5, 2.0, 4.0]
    epsilons = [dp.epsilon(s, q, steps, delta) for s in sigmas]
    assert all(a > b for a, b in zip(epsilons, epsilons[1:])), epsilons
    assert dp.epsilon(1.5, q, 2 * steps, delta) > epsilons[2]
    assert dp.epsilon(1.5, q, steps, 1e-6) > epsilons[2]
    assert dp.epsilon(1.5, q, 0, delta) == 0.0


def test_default_delta_is_below_one_over_n_and_at_most_1e_5():
    assert [dp.default_delta(n) for n in (100, 1438, 60000, 10**5, 10**6, 2 * 10**6,
                                          999_999)] == [1e-5, 1e-5, 1e-5, 1e-6, 1e-7, 1e-7,
                                                        1e-6]


def test_a_missing_accountant_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r'^epsilon: .* pip install "fnbp\[dp\]"$'):
        dp.epsilon(1.0, 0.1, 10, 1e-5)


# --- the configuration and fit's refusals -------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(clip_norm=0.0, noise_multiplier=1.0), "`clip_norm` must be a positive finite"),
    (dict(clip_norm=1.0, noise_multiplier=-1.0), "`noise_multiplier` must be a positive"),
    (dict(clip_norm=float("inf"), noise_multiplier=1.0), "`clip_norm` must be a positive"),
    (dict(clip_norm=1.0, noise_multiplier=1.0, delta=1.0), "`delta` must lie strictly"),
    (dict(clip_norm=1.0, noise_multiplier=1.0, delta=0.0), "`delta` must lie strictly"),
])
def test_dp_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=f"^DPConfig: {match}"):
        dp.DPConfig(**kwargs)


def test_fit_refuses_dp_on_a_mesh_in_low_precision_or_not_a_config():
    params, x, y = problem(n=12)
    arguments = dict(key=jax.random.key(0), epochs=1, batch_size=4)
    config = dp.DPConfig(1.0, 1.0)
    sgd = optax.sgd(0.1)
    with pytest.raises(ValueError, match=r"^fit: DP-SGD runs on one device; .*\(`devices` 1\)"):
        train.fit(MODEL, fnbp.cross_entropy_loss, sgd, params, x, y, **arguments, dp=config,
                  mesh=fnbp.make_mesh(1))
    for precision in ("bfloat16", "float16"):
        with pytest.raises(ValueError, match=f"^fit: DP-SGD runs in float32; `precision` "
                                             f"{precision} is not supported"):
            train.fit(MODEL, fnbp.cross_entropy_loss, sgd, params, x, y, **arguments,
                      dp=config, precision=precision)
    with pytest.raises(TypeError, match="`dp` must be a fnbp.train.DPConfig"):
        train.fit(MODEL, fnbp.cross_entropy_loss, sgd, params, x, y, **arguments,
                  dp=(1.0, 1.0))


def test_check_options_reads_precision_like_the_rest_of_fnbp():
    config = dp.DPConfig(1.0, 1.0)
    for plain in (None, "float32", "p=f32,c=f32", "params=float32,compute=float32,output=f32",
                  fnbp.Precision()):
        dp.check_options("fit", config, precision=plain)  # the float32 policy, any spelling
    for policy, shown in ((fnbp.Precision(param_dtype="bfloat16"),
                           "params=bfloat16,compute=float32,output=float32"),
                          ("p=f32,c=bf16", "bfloat16")):
        with pytest.raises(ValueError, match=f"^fit: DP-SGD runs in float32; `precision` "
                                             f"{shown} is not supported"):
            dp.check_options("fit", config, precision=policy)
    with pytest.raises(ValueError, match="^fit: unknown precision 'f8'"):
        dp.check_options("fit", config, precision="f8")


def test_fit_with_dp_records_epsilon_per_epoch():
    # (a resumed run continuing exactly: test_cli_resume_keeps_the_dp_flags_...)
    params, x, y = problem(n=40)
    config = dp.DPConfig(1.0, 1.0, delta=1e-4)
    result = train.fit(MODEL, fnbp.cross_entropy_loss, optax.sgd(0.1), params, x, y,
                       key=jax.random.key(0), epochs=2, batch_size=8, dp=config)
    history = result.history
    assert [h["step"] for h in history] == [5, 10]
    assert [h["delta"] for h in history] == [1e-4, 1e-4]
    assert [h["epsilon"] for h in history] == [dp.epsilon(1.0, 0.2, s, 1e-4) for s in (5, 10)]
    assert rel_err(result.params, params) > 0


# --- fnbp train ---------------------------------------------------------------------------


def run_train(*args):
    return cli.main(["train", *map(str, args), "--no-progress"])


SPIRALS = ["--dataset", "spirals", "--num-examples", "200", "--width", "16", "--depth", "1",
           "--batch-size", "20"]


@pytest.mark.parametrize("extra, match", [
    (["--dp-clip", "1"], "--dp-clip needs --dp-noise SIGMA too"),
    (["--dp-noise", "1"], "--dp-noise needs --dp-clip C too"),
    (["--dp-delta", "1e-5"], "--dp-delta needs --dp-clip C and --dp-noise SIGMA"),
    (["--dp-clip", "0", "--dp-noise", "1"],
     "--dp-clip must be a positive finite number, got 0.0"),
    (["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "2"],
     "--dp-delta must lie strictly between 0 and 1"),
    (["--dp-clip", "1", "--dp-noise", "1", "--precision", "float16"],
     "DP-SGD runs in float32; --precision float16 is not supported with it"),
])
def test_cli_dp_errors_are_one_line_and_write_nothing(tmp_path, capsys, extra, match):
    assert run_train(*SPIRALS, *extra, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("fnbp train: error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert not (tmp_path / "run").exists()


def test_cli_without_the_accountant_says_which_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    assert run_train(*SPIRALS, "--dp-clip", 1, "--dp-noise", 1, "--out", tmp_path / "r") == 2
    assert capsys.readouterr().err == (
        'fnbp train: error: differentially private training needs the privacy accountant of '
        'the dp-accounting package: pip install "fnbp[dp]"\n')
    assert not (tmp_path / "r").exists()


def read(folder, name):
    return json.loads((folder / name).read_text())


def test_cli_resume_keeps_the_dp_flags_and_continues_exactly(tmp_path, capsys):
    flags = [*SPIRALS, "--dp-clip", 0.5, "--dp-noise", 0.8]
    assert run_train(*flags, "--epochs", 2, "--out", tmp_path / "whole") == 0
    assert run_train(*flags, "--epochs", 1, "--out", tmp_path / "part") == 0
    assert run_train("--resume", tmp_path / "part", "--epochs", 2) == 0
    whole, part = read(tmp_path / "whole", "metrics.json"), read(tmp_path / "part",
                                                                  "metrics.json")
    assert part["history"] == whole["history"]  # the same batches, noise and updates
    assert part["epsilon"] == whole["epsilon"] > 0
    assert read(tmp_path / "part", "config.json")["dp"]["noise_multiplier"] == 0.8
    capsys.readouterr()
    assert run_train("--resume", tmp_path / "part", "--epochs", 3, "--dp-noise", 1.0) == 2
    assert ("the run was made with --dp-noise 0.8 but --dp-noise 1.0 was given"
            in capsys.readouterr().err)


def test_cli_digits_default_with_dp_writes_epsilon(tmp_path, capsys):
    out = tmp_path / "run"
    # the default run (mlp 64-1024-1024-10 on digits, adam, batch 32), one epoch
    assert run_train("--dp-clip", 1, "--dp-noise", 1.1, "--epochs", 1, "--out", out) == 0
    printed = capsys.readouterr().out
    config, metrics = read(out, "config.json"), read(out, "metrics.json")
    n = config["num_train"]
    steps = n // 32
    assert config["dp"] == {"clip_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5,
                            "sampling": "poisson", "sampling_rate": 32 / n,
                            "expected_batch_size": 32,
                            "accountant": config["dp"]["accountant"]}
    assert config["dp"]["accountant"].startswith("RDP, dp-accounting ")
    assert metrics["steps"] == steps and metrics["delta"] == 1e-5
    assert metrics["epsilon"] == dp.epsilon(1.1, 32 / n, steps, 1e-5)
    assert metrics["history"][-1]["epsilon"] == metrics["epsilon"]
    assert metrics["dp"] == config["dp"]
    assert (f"privacy: epsilon {metrics['epsilon']:.3g} at delta 1e-05 (DP-SGD, clip 1, "
            f"noise 1.1, Poisson sampling q {32 / n:.4g}, {steps} steps; ") in printed
    assert "DP-SGD (clip 1, noise 1.1, Poisson sampling q" in printed


# The README's figures: 92.2% test accuracy at epsilon 3.63, delta 1e-5, in about 11 s.
DIGITS_DP = ["--width", "256", "--depth", "1", "--batch-size", "128", "--lr", "0.01",
             "--dp-clip", "1", "--dp-noise", "1.5"]


def test_digits_reaches_90_percent_at_epsilon_below_4(tmp_path):
    out = tmp_path / "run"
    assert run_train(*DIGITS_DP, "--out", out) == 0
    metrics = read(out, "metrics.json")
    assert metrics["epochs"] == 10 and metrics["delta"] == 1e-5
    assert metrics["epsilon"] <= 4.0
    assert metrics["test_accuracy"] >= 0.90
    assert os.path.exists(out / "plot.png")
