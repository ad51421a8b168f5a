"""K-FAC (fnbp/train/preconditioning.py): the preconditioned step against its dense formula,
the running averages and the inverse refresh, training through make_train_step and the CLI."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest
from _networks import N, problem
from _oracle import rel_err
from _small_run import SMALL

import fnbp
from fnbp import cli

KEY = jax.random.key(0)


def damped_dense_inverse(f: fnbp.KroneckerFactors, damping: float) -> np.ndarray:
    """(A + pi sqrt(lambda) I)^-1 (x) ... as one dense matrix: the inverse of the damped
    Kronecker product, written from the factored Tikhonov formula with NumPy."""
    A, B = np.asarray(f.A), np.asarray(f.B)
    pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(B) / len(B)))
    root = np.sqrt(damping)
    A_d = A + pi * root * np.eye(len(A))
    B_d = B + root / pi * np.eye(len(B))
    return np.linalg.inv(np.kron(B_d, A_d))


def test_the_preconditioned_gradient_is_the_damped_kronecker_inverse_times_the_gradient():
    model, _, params, x, y = problem("mlp")
    _, grads, factors = fnbp.kfac_factors(
        model, fnbp.cross_entropy_loss, params, x, y, kind="exact"
    )
    tx = fnbp.train.kfac_preconditioner(damping=0.01)
    updates, state = tx.update(grads, tx.init(params), params, factors=factors)
    for i in (0, 2, 4):  # the Linear layers of mlp([5, 4, K])
        g = np.concatenate([grads[i]["W"], grads[i]["b"][:, None]], axis=1).reshape(-1)
        want = (damped_dense_inverse(factors[i], 0.01) @ g).reshape(grads[i]["W"].shape[0], -1)
        got = np.concatenate([updates[i]["W"], updates[i]["b"][:, None]], axis=1)
        assert rel_err(got, want) <= 1e-10
    assert int(state.step) == 1 and rel_err(state.factors[0], factors[0]) == 0


def test_factors_are_averaged_and_inverses_refreshed_every_k_steps():
    model, _, params, x, y = problem("mlp")
    tx = fnbp.train.kfac_preconditioner(decay=0.5, inverse_every=3)
    state = tx.init(params)
    seen = []
    for step in range(4):
        _, grads, factors = fnbp.kfac_factors(
            model, fnbp.cross_entropy_loss, params, x[step:], y[step:], kind="exact"
        )
        seen.append(factors[0])
        _, state = tx.update(grads, state, params, factors=factors)
        if step == 0:
            first_inverse = state.inverses[0]
        if step in (1, 2):  # steps 1 and 2 reuse the inverses of step 0
            assert rel_err(state.inverses[0], first_inverse) == 0
    want = seen[0]
    for f in seen[1:]:
        want = jax.tree_util.tree_map(lambda o, n: 0.5 * o + 0.5 * n, want, f)
    assert rel_err(state.factors[0], want) <= 1e-14
    assert rel_err(state.inverses[0], first_inverse) > 1e-3  # refreshed at step 3


def test_a_layer_without_factors_passes_its_gradient_through():
    model, _, params, x, y = problem("layer_norm-rms_norm")
    _, grads, factors = fnbp.kfac_factors(
        model, fnbp.cross_entropy_loss, params, x, y, kind="exact"
    )
    tx = fnbp.train.kfac_preconditioner()
    updates, _ = tx.update(grads, tx.init(params), params, factors=factors)
    assert rel_err(updates[1], grads[1]) == 0 and rel_err(updates[4], grads[4]) == 0
    assert rel_err(updates[0], grads[0]) > 1e-3


def test_make_train_step_takes_the_factors_from_its_own_backward_pass():
    model, _, params, x, y = problem("cnn-2d")
    optimizer = fnbp.train.kfac(0.01)
    state = optimizer.init(params)
    step = fnbp.make_train_step(model, fnbp.cross_entropy_loss, optimizer)
    losses = []
    for _ in range(15):
        params, state, metrics = step(params, state, x, y)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(fnbp.train.preconditioning.find_kfac_state(state).step) == 15
    # The same step, run again from the same state, is deterministic (its key is in the state).
    again = step(params, state, x, y)[2]["loss"]
    assert float(again) == float(step(params, state, x, y)[2]["loss"])


def test_kfac_trains_a_model_through_fit():
    model, _, params, x, y = problem("mlp")
    result = fnbp.fit(
        model,
        fnbp.cross_entropy_loss,
        fnbp.train.kfac(0.01),
        params,
        x,
        y,
        epochs=5,
        batch_size=N,
        key=KEY,
    )
    history = [h["train_loss"] for h in result.history]
    assert history[-1] < history[0]


def test_update_without_factors_and_bad_settings_are_refused():
    model, _, params, x, y = problem("mlp")
    tx = fnbp.train.kfac_preconditioner()
    with pytest.raises(ValueError, match=r"kfac_preconditioner: update needs the step's Kronecker"):
        tx.update(params, tx.init(params), params)
    for kwargs, message in [
        ({"damping": 0.0}, "damping must be > 0"),
        ({"decay": 1.0}, r"decay must be in \[0, 1\)"),
        ({"inverse_every": 0}, "inverse_every must be a positive int"),
    ]:
        with pytest.raises(ValueError, match="kfac_preconditioner: " + message):
            fnbp.train.kfac_preconditioner(**kwargs)
    with pytest.raises(ValueError, match="kfac: learning_rate must be > 0"):
        fnbp.train.kfac(0.0)


def test_the_command_line_trains_with_kfac_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *SMALL, "--optimizer", "kfac", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "kfac lr 0.1" in out  # 0.01, 10x on spirals
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)
    assert cli.main(["train", "--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    assert len(json.loads((run / "metrics.json").read_text())["history"]) == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--precision", "float16"], "kfac does not take float16's loss scaling"),
        (["--dp-clip", "1", "--dp-noise", "1"], "kfac preconditions the plain gradient"),
    ],
)
def test_the_command_line_refuses_kfac_where_it_does_not_apply(tmp_path, capsys, extra, message):
    args = ["train", *SMALL, "--optimizer", "kfac", *extra, "--out", str(tmp_path / "run")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_optax_chains_the_preconditioner_with_other_transformations():
    model, _, params, x, y = problem("mlp")
    _, grads, factors = fnbp.kfac_factors(
        model, fnbp.cross_entropy_loss, params, x, y, kind="exact"
    )
    tx = optax.chain(
        fnbp.train.kfac_preconditioner(), optax.clip_by_global_norm(1.0), optax.sgd(0.1)
    )
    updates, _ = tx.update(grads, tx.init(params), params, factors=factors)
    norm = np.sqrt(sum(np.sum(np.square(u)) for u in jax.tree_util.tree_leaves(updates)))
    assert norm <= 0.1 + 1e-12
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)
