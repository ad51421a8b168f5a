"""Tests of DP-SGD (fnbp.train.dp): the noisy gradient, Poisson sampling, the accountant,
fit(..., dp=...) and fnbp train --dp-clip/--dp-noise, down to digits' accuracy at an epsilon."""

from __future__ import annotations

import json
import math
import os
import sys
from fractions import Fraction

import _small_run
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _checkpoint_files import edit_metadata

import fnbp
from fnbp import cli, train
from fnbp.cli import _train_config as train_config
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
    den = sum(float(jnp.sum(q**2)) for q in b)
    return (num / den) ** 0.5


# --- the noisy gradient -------------------------------------------------------------------


def test_noisy_grad_without_noise_is_the_clipped_sum_over_the_expected_batch():
    params, x, y = problem()
    mask = jnp.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
    C, B = 0.3, 5.0
    J, grads, norms = jax.jit(
        lambda p, m: dp.noisy_grad(
            MODEL,
            fnbp.cross_entropy_loss,
            p,
            x,
            y,
            jax.random.key(1),
            clip_norm=C,
            noise_multiplier=0.0,
            expected_batch_size=B,
            mask=m,
        )
    )(params, mask)
    # fnbp.clipped_grads' sum, divided by the expected batch size
    J2, summed, norms2 = jax.jit(
        lambda p, m: fnbp.clipped_grads(
            MODEL, fnbp.cross_entropy_loss, p, x, y, C, mask=m, reduction="sum"
        )
    )(params, mask)
    assert rel_err(grads, jax.tree_util.tree_map(lambda g: g / B, summed)) <= 1e-14
    assert float(J) == pytest.approx(float(J2), rel=1e-14)
    assert np.allclose(norms, norms2, rtol=1e-14)
    # and the float64 oracle: vmap of jax.grad of the plain-jnp network, clipped by hand
    per_example = jax.jit(
        jax.vmap(
            jax.grad(lambda p, xi, yi: ref_cross_entropy(ref_mlp(p, xi[None]), yi[None])[0]),
            in_axes=(None, 0, 0),
        )
    )(params, x, y)
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
        return dp.noisy_grad(
            model,
            fnbp.cross_entropy_loss,
            params,
            x,
            y,
            key,
            clip_norm=C,
            noise_multiplier=noise,
            expected_batch_size=B,
        )[1]

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
    assert dp.pad_multiple(128, 128 / 1438) == 32  # 2 sqrt(128 * 0.911) = 21.6
    assert dp.pad_multiple(32, 32 / 1438) == 16  # 11.2
    assert dp.pad_multiple(4, 0.5) == 8  # at least 8
    assert [dp.bucket(b, 16) for b in (0, 1, 16, 17, 40)] == [16, 16, 16, 32, 48]


def test_poisson_batch_keeps_the_examples_whose_bits_are_below_the_threshold():
    n, q, m = 500, dp.sampling_rate(25, 500), 8
    t = (25 << 32) // 500
    for step in range(5):
        sample_key, _ = dp.step_keys(jax.random.key(3), step)
        indices, mask = dp.poisson_batch(sample_key, n, q, m)
        bits = np.asarray(jax.random.bits(sample_key, (n,), jnp.uint32)).astype(np.uint64)
        chosen = np.flatnonzero(bits < t)  # P(bits < t) = t / 2^32 for uniform 32-bit bits
        k = len(chosen)
        assert indices.dtype == np.int32 and mask.dtype == np.bool_
        assert len(indices) == len(mask) == dp.bucket(k, m) and len(indices) % m == 0
        assert np.array_equal(indices[:k], chosen) and mask[:k].all()
        assert not mask[k:].any() and not indices[k:].any()


def test_poisson_batch_at_the_ends_of_the_threshold_range():
    n, key = 4096, dp.step_keys(jax.random.key(5), 0)[0]
    bits = np.asarray(jax.random.bits(key, (n,), jnp.uint32)).astype(np.uint64)
    for t in (0, 1, 2**31 + 12345, 2**32 - 1, 2**32):  # q = 0, 2^-32, ~1/2, 1 - 2^-32, 1
        indices, mask = dp.poisson_batch(key, n, t / 2**32, 8)
        assert np.array_equal(indices[mask], np.flatnonzero(bits < t)), t
    assert dp.poisson_batch(key, n, 1.0, 8)[1].sum() == n  # q = 1: every example


# (batch size, number of examples): tiny q, the documented run's q, q near 1 and q = 1
RATES = [
    (1, 10**9),
    (1, 2**32),
    (3, 2**32 - 1),
    (1, 3),
    (128, 1438),
    (32, 1437),
    (59_999, 60_000),
    (2**32 - 1, 2**32),
    (60_000, 60_000),
]


@pytest.mark.parametrize("batch_size, n", RATES)
def test_sampling_rate_is_the_integer_threshold_over_2_to_the_32(batch_size, n):
    q = dp.sampling_rate(batch_size, n)
    t = Fraction(q) * 2**32
    # q is t / 2^32 exactly, with t the integer floor(B 2^32 / N): t N <= B 2^32 < (t + 1) N
    assert t.denominator == 1
    t = int(t)
    assert t * n <= batch_size * 2**32 < (t + 1) * n
    assert 0 <= Fraction(batch_size, n) - Fraction(q) < Fraction(1, 2**32)
    assert dp.sampling_threshold(q) == t  # the sampler's threshold is the accountant's q
    assert type(q) is float


def test_sampling_threshold_floors_any_rate_and_refuses_a_non_probability():
    for rate in (0.0, 0.05, 1 / 3, 0.999999, 1.0, np.float32(0.05)):
        assert dp.sampling_threshold(rate) == math.floor(Fraction(float(rate)) * 2**32)
    assert dp.sampling_threshold(1.0) == 2**32
    for bad in (-0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(
            ValueError,
            match=r"^poisson_batch: `rate` must be a probability "
            r"in \[0, 1\], got ",
        ):
            dp.sampling_threshold(bad)


@pytest.mark.parametrize("batch_size, n", [(1, 1000), (128, 1438), (59_999, 60_000)])
def test_poisson_batch_frequency_is_q_within_the_binomial_spread(batch_size, n):
    draws = 2**20
    q = dp.sampling_rate(batch_size, n)
    _, mask = dp.poisson_batch(jax.random.key(17), draws, q, 8)
    kept = int(mask.sum())
    # Binomial(draws, q): within 5 standard deviations (a 1-in-1.7-million miss for a fixed key)
    assert abs(kept - draws * q) <= 5 * math.sqrt(draws * q * (1 - q)), (kept, draws * q)


def test_poisson_sampling_rate_is_q_over_many_steps():
    n, q, steps = 1000, dp.sampling_rate(50, 1000), 200
    key = jax.random.key(11)
    sizes = np.array(
        [int(dp.poisson_batch(dp.step_keys(key, t)[0], n, q, 8)[1].sum()) for t in range(steps)]
    )
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
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.5)), steps
    )
    assert dp.epsilon(1.5, q, steps, delta) == accountant.get_epsilon(delta)
    sigmas = [0.8, 1.0, 1.5, 2.0, 4.0]
    epsilons = [dp.epsilon(s, q, steps, delta) for s in sigmas]
    assert all(a > b for a, b in zip(epsilons, epsilons[1:])), epsilons
    assert dp.epsilon(1.5, q, 2 * steps, delta) > epsilons[2]
    assert dp.epsilon(1.5, q, steps, 1e-6) > epsilons[2]
    assert dp.epsilon(1.5, q, 0, delta) == 0.0


def pld_oracle(sigma, q, steps, delta):
    """epsilon from dp-accounting's own PLDAccountant, on fnbp's discretization."""
    accountant = dp_accounting.pld.PLDAccountant(
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=dp.PLD_DISCRETIZATION,
    )
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    return accountant.get_epsilon(delta)


def test_epsilon_pld_is_dp_accountings_pld_accountant_and_below_rdp():
    q, steps, delta = dp.sampling_rate(128, 1438), 110, 1e-5  # the run of docs/per-example.md
    pld = dp.epsilon(1.5, q, steps, delta, "pld")
    # the same computation as the accountant's, up to the rounding of its identity composition
    assert pld == pytest.approx(pld_oracle(1.5, q, steps, delta), rel=1e-8)
    assert pld == pytest.approx(3.2678, abs=1e-4)  # and the documented figure
    assert pld < dp.epsilon(1.5, q, steps, delta, "rdp") == pytest.approx(3.6274, abs=1e-4)
    for sigma, rate, count in ((1.0, 0.1, 50), (4.0, 0.01, 1000)):
        assert dp.epsilon(sigma, rate, count, delta, "pld") < dp.epsilon(sigma, rate, count, delta)
    assert dp.epsilon(1.5, q, 0, delta, "pld") == 0.0


def gaussian_epsilon(sigma, steps, delta):
    """The exact epsilon of T Gaussian mechanisms without sampling (Balle and Wang 2018).

    Their composition is the Gaussian mechanism with mu = sqrt(T) / sigma, whose privacy
    profile is delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu); bisection in
    float64 for the eps where it equals delta.
    """
    mu = math.sqrt(steps) / sigma

    def phi(z):
        return 0.5 * math.erfc(-z / math.sqrt(2.0))

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if phi(mu / 2 - mid / mu) - math.exp(mid) * phi(-mu / 2 - mid / mu) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def test_epsilon_pld_without_sampling_is_the_exact_gaussian_epsilon():
    exact = gaussian_epsilon(10.0, 100, 1e-5)  # 4.37718
    pld = dp.epsilon(10.0, 1.0, 100, 1e-5, "pld")
    assert exact <= pld <= exact * (1 + 1e-6)  # pessimistic: an upper bound, and tight
    assert dp.epsilon(10.0, 1.0, 100, 1e-5, "rdp") > 1.05 * exact


def test_epsilon_and_dp_config_refuse_an_unknown_accountant():
    with pytest.raises(
        ValueError,
        match=r"^epsilon: `accountant` must be 'rdp' or 'pld', "
        r"got 'PLD'$",
    ):
        dp.epsilon(1.0, 0.1, 10, 1e-5, "PLD")
    with pytest.raises(
        ValueError,
        match=r"^DPConfig: `accountant` must be 'rdp' or 'pld', "
        r"got 'moments'$",
    ):
        dp.DPConfig(1.0, 1.0, accountant="moments")
    assert dp.DPConfig(1.0, 1.0).accountant == "rdp"
    assert dp.ACCOUNTANTS == ("rdp", "pld") == train_config.DP_ACCOUNTANTS  # the CLI's copy


def test_default_delta_is_below_one_over_n_and_at_most_1e_5():
    assert [dp.default_delta(n) for n in (100, 1438, 60000, 10**5, 10**6, 2 * 10**6, 999_999)] == [
        1e-5,
        1e-5,
        1e-5,
        1e-6,
        1e-7,
        1e-7,
        1e-6,
    ]


def test_a_missing_accountant_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r'^epsilon: .* pip install "fnbp\[dp\]"$'):
        dp.epsilon(1.0, 0.1, 10, 1e-5)


# --- the configuration and fit's refusals -------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clip_norm=0.0, noise_multiplier=1.0), "`clip_norm` must be a positive finite"),
        (dict(clip_norm=1.0, noise_multiplier=-1.0), "`noise_multiplier` must be a positive"),
        (dict(clip_norm=float("inf"), noise_multiplier=1.0), "`clip_norm` must be a positive"),
        (dict(clip_norm=1.0, noise_multiplier=1.0, delta=1.0), "`delta` must lie strictly"),
        (dict(clip_norm=1.0, noise_multiplier=1.0, delta=0.0), "`delta` must lie strictly"),
    ],
)
def test_dp_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=f"^DPConfig: {match}"):
        dp.DPConfig(**kwargs)


def test_fit_refuses_dp_on_a_mesh_in_low_precision_or_not_a_config():
    params, x, y = problem(n=12)
    arguments = dict(key=jax.random.key(0), epochs=1, batch_size=4)
    config = dp.DPConfig(1.0, 1.0)
    sgd = optax.sgd(0.1)
    with pytest.raises(ValueError, match=r"^fit: DP-SGD runs on one device; .*\(`devices` 1\)"):
        train.fit(
            MODEL,
            fnbp.cross_entropy_loss,
            sgd,
            params,
            x,
            y,
            **arguments,
            dp=config,
            mesh=fnbp.make_mesh(1),
        )
    for precision in ("bfloat16", "float16"):
        with pytest.raises(
            ValueError,
            match=f"^fit: DP-SGD runs in float32; `precision` {precision} is not supported",
        ):
            train.fit(
                MODEL,
                fnbp.cross_entropy_loss,
                sgd,
                params,
                x,
                y,
                **arguments,
                dp=config,
                precision=precision,
            )
    with pytest.raises(TypeError, match="`dp` must be a fnbp.train.DPConfig"):
        train.fit(MODEL, fnbp.cross_entropy_loss, sgd, params, x, y, **arguments, dp=(1.0, 1.0))


def test_check_options_reads_precision_like_the_rest_of_fnbp():
    config = dp.DPConfig(1.0, 1.0)
    for plain in (
        None,
        "float32",
        "p=f32,c=f32",
        "params=float32,compute=float32,output=f32",
        fnbp.Precision(),
    ):
        dp.check_options("fit", config, precision=plain)  # the float32 policy, any spelling
    for policy, shown in (
        (fnbp.Precision(param_dtype="bfloat16"), "params=bfloat16,compute=float32,output=float32"),
        ("p=f32,c=bf16", "bfloat16"),
    ):
        with pytest.raises(
            ValueError, match=f"^fit: DP-SGD runs in float32; `precision` {shown} is not supported"
        ):
            dp.check_options("fit", config, precision=policy)
    with pytest.raises(ValueError, match="^fit: unknown precision 'f8'"):
        dp.check_options("fit", config, precision="f8")


def test_fit_with_dp_records_epsilon_per_epoch_at_the_rate_sampled(monkeypatch):
    # (a resumed run continuing exactly: test_cli_resume_keeps_the_dp_flags_...; the RDP
    # default: test_cli_digits_default_with_dp_writes_epsilon)
    params, x, y = problem(n=40)
    accountant = "pld"
    config = dp.DPConfig(1.0, 1.0, delta=1e-4, accountant=accountant)
    asked = []
    epsilon = dp.epsilon

    def recorded(*args):
        asked.append(args)
        return epsilon(*args)

    monkeypatch.setattr(dp, "epsilon", recorded)
    result = train.fit(
        MODEL,
        fnbp.cross_entropy_loss,
        optax.sgd(0.1),
        params,
        x,
        y,
        key=jax.random.key(0),
        epochs=2,
        batch_size=8,
        dp=config,
    )
    history = result.history
    q = Fraction((8 << 32) // 40, 2**32)  # floor(B 2^32 / N) / 2^32, the sampler's q
    assert q != Fraction(8, 40)
    # the accountant is given exactly the sampler's q (and the config's accountant)
    assert sorted(asked) == [(1.0, float(q), s, 1e-4, accountant) for s in (5, 10)]
    assert all(Fraction(args[1]) == q for args in asked)
    assert [h["step"] for h in history] == [5, 10]
    assert [h["delta"] for h in history] == [1e-4, 1e-4]
    assert [h["epsilon"] for h in history] == [
        epsilon(1.0, float(q), s, 1e-4, accountant) for s in (5, 10)
    ]
    assert rel_err(result.params, params) > 0


# --- fnbp train ---------------------------------------------------------------------------


def run_train(*args):
    return cli.main(["train", *map(str, args), "--no-progress"])


SPIRALS = [*_small_run.SPIRALS, "--batch-size", "20"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--dp-clip", "1"], "--dp-clip needs --dp-noise SIGMA too"),
        (["--dp-noise", "1"], "--dp-noise needs --dp-clip C too"),
        (["--dp-delta", "1e-5"], "--dp-delta needs --dp-clip C and --dp-noise SIGMA"),
        (
            ["--dp-clip", "0", "--dp-noise", "1"],
            "--dp-clip must be a positive finite number, got 0.0",
        ),
        (
            ["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "2"],
            "--dp-delta must lie strictly between 0 and 1",
        ),
        (
            ["--dp-clip", "1", "--dp-noise", "1", "--precision", "float16"],
            "DP-SGD runs in float32; --precision float16 is not supported with it",
        ),
        (["--dp-accountant", "pld"], "--dp-accountant needs --dp-clip C and --dp-noise SIGMA"),
    ],
)
def test_cli_dp_errors_are_one_line_and_write_nothing(tmp_path, capsys, extra, match):
    assert run_train(*SPIRALS, *extra, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("fnbp train: error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert not (tmp_path / "run").exists()


def test_cli_unknown_dp_accountant_is_a_one_line_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_train(*SPIRALS, "--dp-clip", 1, "--dp-noise", 1, "--dp-accountant", "moments")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--dp-accountant" in err and "'moments'" in err
    assert all(name in err for name in dp.ACCOUNTANTS)


def test_cli_dp_accountant_pld_reaches_the_accountant_and_is_kept_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*SPIRALS, "--epochs", 1, "--dp-clip", 0.5, "--dp-noise", 1.0]
    assert run_train(*flags, "--dp-accountant", "pld", "--out", out) == 0
    printed = capsys.readouterr().out
    config, metrics = read(out, "config.json"), read(out, "metrics.json")
    n, steps = config["num_train"], metrics["steps"]
    q = Fraction((20 << 32) // n, 2**32)
    assert config["dp_accountant"] == "pld" and Fraction(config["dp"]["sampling_rate"]) == q
    assert config["dp"]["accountant"].startswith("PLD, dp-accounting ")
    assert metrics["epsilon"] == dp.epsilon(1.0, float(q), steps, 1e-5, "pld")
    assert metrics["epsilon"] == pytest.approx(pld_oracle(1.0, float(q), steps, 1e-5), rel=1e-8)
    assert metrics["epsilon"] < dp.epsilon(1.0, float(q), steps, 1e-5, "rdp")
    assert "; PLD, dp-accounting " in printed
    assert run_train("--resume", out, "--epochs", 3, "--dp-accountant", "rdp") == 2
    assert (
        "the run was made with --dp-accountant pld but --dp-accountant rdp was given"
        in capsys.readouterr().err
    )


def test_cli_without_the_accountant_says_which_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    assert run_train(*SPIRALS, "--dp-clip", 1, "--dp-noise", 1, "--out", tmp_path / "r") == 2
    assert capsys.readouterr().err == (
        "fnbp train: error: differentially private training needs the privacy accountant of "
        'the dp-accounting package: pip install "fnbp[dp]"\n'
    )
    assert not (tmp_path / "r").exists()


def read(folder, name):
    return json.loads((folder / name).read_text())


def test_cli_resume_keeps_the_dp_flags_and_continues_exactly(tmp_path, capsys):
    flags = [*SPIRALS, "--dp-clip", 0.5, "--dp-noise", 0.8]
    assert run_train(*flags, "--epochs", 2, "--out", tmp_path / "whole") == 0
    assert run_train(*flags, "--epochs", 1, "--out", tmp_path / "part") == 0
    assert run_train("--resume", tmp_path / "part", "--epochs", 2) == 0
    whole, part = read(tmp_path / "whole", "metrics.json"), read(tmp_path / "part", "metrics.json")
    assert part["history"] == whole["history"]  # the same batches, noise and updates
    assert part["epsilon"] == whole["epsilon"] > 0
    assert read(tmp_path / "part", "config.json")["dp"]["noise_multiplier"] == 0.8
    capsys.readouterr()
    assert run_train("--resume", tmp_path / "part", "--epochs", 3, "--dp-noise", 1.0) == 2
    assert (
        "the run was made with --dp-noise 0.8 but --dp-noise 1.0 was given"
        in capsys.readouterr().err
    )
    # a run saved before --dp-accountant existed was accounted by RDP, and goes on so
    checkpoint = tmp_path / "part" / "checkpoint.npz"
    edit_metadata(
        checkpoint, checkpoint, lambda meta: meta["metadata"]["config"].pop("dp_accountant")
    )
    assert run_train("--resume", tmp_path / "part", "--epochs", 3) == 0
    metrics = read(tmp_path / "part", "metrics.json")
    q = dp.sampling_rate(20, read(tmp_path / "part", "config.json")["num_train"])
    assert metrics["epsilon"] == dp.epsilon(0.8, q, metrics["steps"], 1e-5, "rdp")


def test_cli_digits_default_with_dp_writes_epsilon(tmp_path, capsys):
    out = tmp_path / "run"
    # the default run (mlp 64-1024-1024-10 on digits, adam, batch 32), one epoch
    assert run_train("--dp-clip", 1, "--dp-noise", 1.1, "--epochs", 1, "--out", out) == 0
    printed = capsys.readouterr().out
    config, metrics = read(out, "config.json"), read(out, "metrics.json")
    n = config["num_train"]
    steps = n // 32
    q = Fraction((32 << 32) // n, 2**32)  # the sampler's q, not 32 / n
    assert config["dp"] == {
        "clip_norm": 1.0,
        "noise_multiplier": 1.1,
        "delta": 1e-5,
        "sampling": "poisson",
        "sampling_rate": float(q),
        "expected_batch_size": 32,
        "accountant": config["dp"]["accountant"],
    }
    assert Fraction(config["dp"]["sampling_rate"]) == q != Fraction(32, n)
    assert config["dp"]["accountant"].startswith("RDP, dp-accounting ")  # the default
    assert config["dp_accountant"] is None
    assert metrics["steps"] == steps and metrics["delta"] == 1e-5
    assert metrics["epsilon"] == dp.epsilon(1.1, float(q), steps, 1e-5, "rdp")
    assert metrics["history"][-1]["epsilon"] == metrics["epsilon"]
    assert metrics["dp"] == config["dp"]
    assert (
        f"privacy: epsilon {metrics['epsilon']:.3g} at delta 1e-05 (DP-SGD, clip 1, "
        f"noise 1.1, Poisson sampling q {float(q):.4g}, {steps} steps; "
    ) in printed
    assert "DP-SGD (clip 1, noise 1.1, Poisson sampling q" in printed


# The figures of docs/per-example.md: 92.2% test accuracy at epsilon 3.63, delta 1e-5, ~11 s.
DIGITS_DP = [
    "--width",
    "256",
    "--depth",
    "1",
    "--batch-size",
    "128",
    "--lr",
    "0.01",
    "--dp-clip",
    "1",
    "--dp-noise",
    "1.5",
]


def test_digits_reaches_90_percent_at_epsilon_below_4(tmp_path):
    out = tmp_path / "run"
    assert run_train(*DIGITS_DP, "--out", out) == 0
    metrics = read(out, "metrics.json")
    assert metrics["epochs"] == 10 and metrics["delta"] == 1e-5
    assert metrics["epsilon"] <= 4.0
    assert metrics["test_accuracy"] >= 0.90
    assert os.path.exists(out / "plot.png")
