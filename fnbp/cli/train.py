"""fnbp train: train a network with fnbp's hand-written backprop on real data.

With no flags it trains an MLP (64-1024-1024-10, Adam) on the handwritten
digits that ship with scikit-learn and writes, into a new run folder under
runs/: config.json, metrics.json (per-epoch history and the test metrics),
plot.png (loss and accuracy per epoch) and checkpoint.npz (parameters,
optimizer state, step and PRNG key; saved after every epoch, and every N
steps with --checkpoint-every). --resume RUN_FOLDER continues a run exactly
where its last checkpoint left it.

A run folder belongs to one run at a time: while a run holds it (a lock
file, .fnbp-train.lock, that a killed run never leaves stuck), a second
fnbp train with the same --out, or a --resume of it, is refused. Ctrl-C
(SIGINT) or SIGTERM stops the run at the next step boundary: the last
checkpoint is kept (one is written at the stop if the run stepped since), one
line says where it stopped and how to continue, and the exit status is 130
(SIGINT) or 143 (SIGTERM); a second signal ends it at once.

On several devices the run is data parallel: every batch is split over
--devices N (default: all of them, or as many as the batch splits evenly
over) and the parameters are replicated; --fsdp
also splits the large parameters and their optimizer state over the devices.
Several hosts run the same command, each with --coordinator HOST:PORT (of
process 0), --num-processes and its own --process-id; process 0 writes the
run folder. A process that cannot reach the coordinator, or whose peers do
not all join, stops with an error after --coordinator-timeout seconds (60).

Examples:
  fnbp train
  fnbp train --dataset spirals
  fnbp train --model cnn --epochs 5
  fnbp train --data-path mydata.npz --out runs/mine
  fnbp train --resume runs/digits-mlp-seed0 --epochs 20
  fnbp train --devices 8 --batch-size 256
  fnbp train --devices 8 --fsdp 4 --batch-size 256
  fnbp train --precision bfloat16
  fnbp train --width 256 --depth 1 --batch-size 128 --lr 0.01 --dp-clip 1 --dp-noise 1.5

--precision bfloat16 (or float16) trains in mixed precision: the forward and
backward passes run in that dtype, while the parameters, the optimizer state
and the loss stay float32; float16 adds dynamic loss scaling (fnbp.train.precision).

--dp-clip C --dp-noise SIGMA trains with DP-SGD (fnbp.train.dp): every step
keeps each example with probability --batch-size / N (Poisson sampling), clips
each kept example's gradient to norm C, adds Gaussian noise of std SIGMA * C
and divides by --batch-size; the privacy spent, epsilon at --dp-delta (default
1e-5, or below 1/N for larger N), comes from the RDP accountant of
dp-accounting (pip install "fnbp[dp]"), or its tighter PLD accountant with
--dp-accountant pld, and is printed and written into metrics.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import math
import os
import signal
import sys
import time
from typing import Any, NoReturn

from fnbp.cli import without_function
from fnbp.cli._train_config import (
    _ALL,
    _BATCH_SIZE,
    _COORDINATOR_TIMEOUT,
    _MOMENTUM,
    _TEST_FRACTION,
    CHECKPOINT,
    DP_ACCOUNTANTS,
    MODELS,
    OPTIMIZERS,
    PRECISIONS,
    UsageError,
    _mesh,
    _resolve,
    as_flags,
    dp_config,
    library_error,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--dataset",
        choices=("digits", "spirals", "moons", "npz", "csv", "idx"),
        help="data to train on (default digits; npz, csv and idx read "
        "--data-path, and are inferred from it when it is given alone)",
    )
    parser.add_argument(
        "--data-path", help="your .npz or .csv file, or a folder of MNIST-format IDX files"
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        help="network (default mlp); cnn takes images (H, W) or (H, W, C), "
        "or signals (L,); cnn1d takes signals (L,) or (L, C)",
    )
    parser.add_argument(
        "--width",
        type=int,
        help="mlp/resnet-s hidden width, cnn channels of the first stage "
        "(default 1024 for mlp on digits, 256 for mlp elsewhere and "
        "resnet-s, 32 for cnn)",
    )
    parser.add_argument(
        "--depth",
        type=int,
        help="hidden layers (mlp), residual blocks (resnet-s) or "
        "convolution stages (cnn); default 2",
    )
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="optax optimizer (default adam; momentum is 0.9; kfac: K-FAC, the gradient "
        "preconditioned by the Kronecker factors of each Linear and Conv layer)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        help="learning rate (default 1e-3 for adam, "
        "0.05 for sgd, 0.01 for momentum and kfac; 10x on "
        "spirals)",
    )
    parser.add_argument("--batch-size", type=int, help=f"examples per step (default {_BATCH_SIZE})")
    parser.add_argument("--epochs", type=int, help="total epochs (default 10; 30 on spirals)")
    parser.add_argument(
        "--seed", type=int, help="seed of the initialization and the shuffling (default 0)"
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        help=f"fraction held out for testing when the data have no split "
        f"(default {_TEST_FRACTION})",
    )
    parser.add_argument(
        "--num-examples", type=int, help="number of points for spirals and moons (default 2000)"
    )
    parser.add_argument(
        "--out",
        help="run folder to create (default runs/<dataset>-<model>-seed<seed>, numbered if taken)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN",
        help="continue the run in this folder (or from this checkpoint file)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="also save a checkpoint every N steps (default: every epoch only)",
    )
    parser.add_argument(
        "--track-sharpness",
        action="store_true",
        help="after every epoch, record the largest eigenvalue of the GGN of the loss on a fixed "
        "batch (the first 256 training examples; fnbp.top_eigenvalues of fnbp.ggn_vp) as "
        "'sharpness' in metrics.json, and plot it with 2/lr",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="compute dtype; bfloat16 and float16 are mixed precision with "
        "float32 parameters, optimizer state and loss, float16 with "
        "dynamic loss scaling (default float32)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    private = parser.add_argument_group("differentially private training (DP-SGD)")
    private.add_argument(
        "--dp-clip",
        type=float,
        metavar="C",
        help="clip every example's gradient to L2 norm C (with --dp-noise)",
    )
    private.add_argument(
        "--dp-noise",
        type=float,
        metavar="SIGMA",
        help="noise multiplier: Gaussian noise of std SIGMA * C on the "
        "clipped sum (with --dp-clip)",
    )
    private.add_argument(
        "--dp-delta",
        type=float,
        metavar="D",
        help="the delta epsilon is stated at (default: 1e-5, or the largest "
        "power of ten below 1/N for more than 10^5 examples)",
    )
    private.add_argument(
        "--dp-accountant",
        choices=DP_ACCOUNTANTS,
        help="privacy accountant of epsilon: rdp (Renyi DP, the default) or "
        "pld (privacy loss distributions: tighter, a few tenths of a "
        "second per epoch)",
    )
    parallel = parser.add_argument_group("several devices and hosts")
    parallel.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="train data parallel on N devices: each batch is split over "
        "them, so --batch-size must be a multiple of N (default: all "
        "devices, of every process; on one host, as many as the batch "
        "splits evenly over; 1 is one device)",
    )
    parallel.add_argument(
        "--fsdp",
        type=int,
        nargs="?",
        const=_ALL,
        metavar="K",
        help="also split the large parameters and their optimizer state "
        "over K of the devices, FSDP-style (--fsdp alone: over all "
        "--devices; default: replicated on every device)",
    )
    parallel.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="several hosts: the address of process 0, the same on every process",
    )
    parallel.add_argument(
        "--num-processes",
        type=int,
        metavar="P",
        help="several hosts: the number of processes (default 1)",
    )
    parallel.add_argument(
        "--process-id", type=int, metavar="I", help="several hosts: this process' number, 0 .. P-1"
    )
    parallel.add_argument(
        "--coordinator-timeout",
        type=float,
        default=_COORDINATOR_TIMEOUT,
        metavar="SECONDS",
        help=f"several hosts: how long to wait for the coordinator and the "
        f"other processes before giving up with an error (default "
        f"{_COORDINATOR_TIMEOUT:g})",
    )

    def one_line_error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    # argparse's errors as one line too (the subparser is argparse's own, so its
    # method is replaced on the instance rather than by a subclass)
    parser.error = one_line_error  # type: ignore[method-assign]


# --- data and model ----------------------------------------------------------------


def _prepare_inputs(config: dict[str, Any], dataset: Any) -> tuple[Any, Any]:
    """Reshape the inputs for the model: vectors for mlp/resnet-s; for cnn, images
    (H, W, C) (a channel added to (H, W)) or 1-D signals (L, 1) from (L,); for cnn1d,
    1-D signals (L, C) as they are, (L, 1) from (L,)."""
    x_train, x_test = dataset.x_train, dataset.x_test
    if config["model"] == "cnn1d":
        shape = dataset.input_shape
        if len(shape) == 1:
            return x_train[..., None], x_test[..., None]
        if len(shape) != 2:
            raise UsageError(
                f"--model cnn1d needs 1-D signals, examples of shape (L,) or "
                f"(L, C), but {config['dataset']} examples have shape {shape}; "
                f"use --model cnn for images or --model mlp"
            )
        return x_train, x_test
    if config["model"] == "cnn":
        shape = dataset.input_shape
        if len(shape) in (1, 2):
            return x_train[..., None], x_test[..., None]
        if len(shape) != 3:
            raise UsageError(
                f"--model cnn needs images, examples of shape (H, W) or "
                f"(H, W, C), or 1-D signals of shape (L,), but "
                f"{config['dataset']} examples have shape {shape}; "
                f"use --model mlp"
            )
        return x_train, x_test
    return x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)


# Models and optimizers are records of functions; the training step is compiled
# once per (model, optimizer) object. Building them through a cache lets
# repeated runs in one process (a notebook, the tests) reuse the compiled code.
@functools.lru_cache(maxsize=16)
def _build_model(model: str, width: int, depth: int, num_classes: int, input_ndim: int = 3) -> Any:
    import fnbp

    if model == "mlp":
        return fnbp.mlp([width] * depth + [num_classes])
    if model == "resnet-s":
        return fnbp.resnet_s(width, depth, num_classes)
    # cnn1d: examples (L, C), Conv1D and 1-D pooling (notes 7.48-7.50); cnn decides
    # from the prepared inputs' rank (3: images, 2: signals).
    return fnbp.cnn(
        num_classes,
        tuple(width * 2**i for i in range(depth)),
        input_ndim=2 if model == "cnn1d" else input_ndim,
    )


@functools.lru_cache(maxsize=16)
def _optimizer(name: str, lr: float, precision: str = "float32") -> Any:
    import optax

    from fnbp.train.precision import loss_scaled

    if name == "kfac":  # K-FAC: damping 0.1, momentum 0.9, factors averaged, inverses every 10
        from fnbp.train.preconditioning import kfac

        return kfac(lr, momentum=_MOMENTUM)
    if name == "adam":
        optimizer = optax.adam(lr)
    elif name == "momentum":
        optimizer = optax.sgd(lr, momentum=_MOMENTUM)
    else:
        optimizer = optax.sgd(lr)
    # float16 gradients underflow without loss scaling; its state is in the optimizer's
    return loss_scaled(optimizer) if precision == "float16" else optimizer


def _fingerprint(*arrays: Any) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str((array.shape, array.dtype.str)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


# --- the command -------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run ``fnbp train``; user errors print one line and return 2.

    SIGINT (Ctrl-C) and SIGTERM stop the run at the next step boundary (or
    the next stage of its start-up): the last checkpoint is kept, one is
    written at the stop if the run has stepped since, one line says where it
    stopped and how to continue, and the exit status is 130 or 143. A
    second signal ends the process at once.
    """
    from fnbp.cli import _run_folder
    from fnbp.train.checkpoint import CheckpointError
    from fnbp.train.data import DataError
    from fnbp.train.stopping import TrainingStopped, stop_on_signals

    # The signals the console script noted while jax imported (_fnbp_launch): its handlers
    # write into this list until stop_on_signals replaces them.
    noted = getattr(args, "noted_signals", None)
    progress = _run_folder.Progress()
    try:
        with stop_on_signals() as stop:  # the handler only sets a flag, checked at boundaries
            if noted:
                stop.request(noted[0])
            status = _train(args, progress, stop)
    except (UsageError, DataError, CheckpointError, _run_folder.RunFolderError) as error:
        message = as_flags(" ".join(str(error).split()))
        print(f"fnbp train: error: {message}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        print(
            f"fnbp train: interrupted by {stop.name()} {stopped.where}; {progress.interrupted()}",
            file=sys.stderr,
        )
        return 128 + (stopped.signum or signal.SIGINT)
    if progress.output.closed:
        print(
            f"fnbp train: error: standard output was closed before the run ended (piped "
            f"into head?), so its last lines were not printed; the run finished, its "
            f"results are in {progress.out}",
            file=sys.stderr,
        )
        return 2
    return status


def _require_train_extra() -> None:
    missing = [name for name in ("tqdm", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"fnbp train needs {' and '.join(missing)}, from the train extra: "
            f'python -m pip install ".[train]" from a clone of the repository, '
            f'or python -m pip install "fnbp[train]" from a package index'
        )


def _resumed(
    config: dict[str, Any],
    resume_from: str,
    state: Any,
    data_sha256: str,
    root: Any,
    per_epoch: int,
) -> tuple[Any, list[dict[str, Any]]]:
    """The state and history of the checkpoint, checked against this run's data and seed."""
    import jax
    import numpy as np

    from fnbp import train
    from fnbp.train import checkpoint as ckpt

    loaded = ckpt.load_checkpoint(resume_from, state.params, state.opt_state)
    meta = loaded.metadata
    if meta.get("data_sha256") != data_sha256:
        raise UsageError(
            f"--resume: the data of {config['dataset']} differ from those "
            f"the run was trained on; restore them or start a new run"
        )
    if loaded.key is None or not np.array_equal(
        jax.random.key_data(loaded.key), jax.random.key_data(root)
    ):
        raise ckpt.CheckpointError(
            f"checkpoint {resume_from}: its PRNG key does not belong "
            f"to seed {config['seed']}; the file is corrupted"
        )
    if loaded.step > config["epochs"] * per_epoch:
        raise UsageError(
            f"--resume: the run is at step {loaded.step} (epoch "
            f"{loaded.step / per_epoch:g}), past --epochs "
            f"{config['epochs']}; pass more epochs"
        )
    state = train.TrainState(
        loaded.params,
        loaded.opt_state,
        loaded.step,
        float(meta.get("loss_sum", 0.0)),
        float(meta.get("correct_sum", 0.0)),
    )
    return state, list(meta.get("history", []))


@dataclasses.dataclass
class _Run:
    """A validated run: its data, model, optimizer and starting state; nothing written yet."""

    config: dict[str, Any]
    out: str
    processes: int
    leader: bool  # process 0 writes the run folder and prints
    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any
    mesh: Any
    data_sha256: str
    per_epoch: int
    model: Any
    optimizer: Any
    root: Any  # the PRNG key of --seed, stored in every checkpoint
    shuffle_key: Any
    state: Any
    history: list[dict[str, Any]]
    run_config: dict[str, Any]
    dp: Any = None  # the fnbp.train.DPConfig of --dp-clip/--dp-noise, or None


def _prepare(
    args: argparse.Namespace,
    config: dict[str, Any],
    resume_from: str | None,
    out: str,
    stop: Any = None,
) -> _Run:
    """Load the data, build the model and its starting state: every check before writing.

    ``stop`` (the signals' request) is checked after each stage, so that a
    signal during start-up ends the run before it writes anything.
    """
    import jax
    import jax.numpy as jnp

    import fnbp
    from fnbp import train
    from fnbp.cli import _run_folder
    from fnbp.train import sharding
    from fnbp.train.data import DataWarning, load_dataset
    from fnbp.train.loop import check_batch_size
    from fnbp.train.stopping import check

    # before anything asks JAX for its devices
    processes = _join(args)
    check(stop, "while starting")
    with _run_folder.warnings_as_lines("fnbp train: warning: ", DataWarning):
        dataset = load_dataset(
            config["dataset"],
            path=config["data_path"],
            test_fraction=config["test_fraction"],
            num_examples=config["num_examples"],
        )
    check(stop, "while loading the data")
    x_train, x_test = _prepare_inputs(config, dataset)
    y_train, y_test = dataset.y_train, dataset.y_test
    n = len(x_train)
    try:
        check_batch_size("fit", config["batch_size"], n)  # fit's own check, before any write
    except ValueError as error:
        raise library_error(error) from error
    dp = dp_config(config)
    mesh = _mesh(args, config["batch_size"], dp is not None)
    if dp is not None:
        from fnbp.train import dp as dp_module

        try:  # fit's own checks, before anything is written
            dp_module.check_options("fit", dp, mesh=mesh, precision=config["precision"])
            dp_module.require_accountant("fit")
        except (ValueError, ImportError) as error:
            raise library_error(error) from error
    data_sha256 = _fingerprint(x_train, y_train, x_test, y_test)
    per_epoch = train.steps_per_epoch(n, config["batch_size"])

    model = _build_model(
        config["model"], config["width"], config["depth"], dataset.num_classes, x_train.ndim - 1
    )
    optimizer = _optimizer(config["optimizer"], config["lr"], config["precision"])
    root = jax.random.key(config["seed"])
    init_key, shuffle_key = jax.random.split(root)
    try:
        state = train.init_state(
            model, optimizer, init_key, x_train.shape[1:], jnp.float32, mesh=mesh
        )
    except ValueError as error:
        raise UsageError(
            f"--model {config['model']} does not fit {config['dataset']} "
            f"examples of shape {x_train.shape[1:]}: {error}"
        ) from error
    check(stop, "while building the model")
    history: list[dict[str, Any]] = []
    if resume_from is not None:
        state, history = _resumed(config, resume_from, state, data_sha256, root, per_epoch)
        check(stop, "while loading the checkpoint")

    run_config = {
        **config,
        "out": out,
        "num_classes": dataset.num_classes,
        "input_shape": list(x_train.shape[1:]),
        "num_train": n,
        "num_test": len(x_test),
        "steps_per_epoch": per_epoch,
        "fnbp_version": fnbp.__version__,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": 1 if mesh is None else mesh.size,
        "fsdp": 1 if mesh is None else dict(mesh.shape).get(sharding.FSDP_AXIS, 1),
        "processes": processes,
    }
    if dp is not None:
        run_config["dp"] = _dp_record(dp, config["batch_size"], n)
    return _Run(
        config,
        out,
        processes,
        jax.process_index() == 0,
        x_train,
        y_train,
        x_test,
        y_test,
        mesh,
        data_sha256,
        per_epoch,
        model,
        optimizer,
        root,
        shuffle_key,
        state,
        history,
        run_config,
        dp,
    )


def _join(args: argparse.Namespace) -> int:
    """Join the other processes (``fnbp.initialize_distributed``); their number.

    JAX waits for the processes inside its runtime, where no Python signal
    handler runs, so while it waits SIGINT and SIGTERM have their default
    action (they end the process at once; nothing is written before); the
    wait is bounded by --coordinator-timeout, after which one line says why.
    """
    from fnbp.train import sharding
    from fnbp.train.stopping import default_signals

    def on_timeout(message: str) -> None:  # called in the watchdog thread: exit from there
        line = f"fnbp train: error: {as_flags(without_function(message))}\n"
        try:
            os.write(2, line.encode("utf-8", "replace"))
        finally:
            os._exit(2)

    if args.num_processes is None or args.num_processes == 1:
        return 1
    try:
        with default_signals():
            return sharding.initialize_distributed(
                args.coordinator,
                args.num_processes,
                args.process_id,
                timeout=args.coordinator_timeout,
                on_timeout=on_timeout,
            )
    except (ValueError, TypeError, TimeoutError) as error:
        raise library_error(error) from error


def _dp_record(dp: Any, batch_size: int, n: int) -> dict[str, Any]:
    """What config.json and metrics.json say about DP-SGD's mechanism and accountant."""
    from importlib.metadata import version

    from fnbp.train import dp as dp_module

    return {
        "clip_norm": dp.clip_norm,
        "noise_multiplier": dp.noise_multiplier,
        "delta": dp.delta_for(n),
        "sampling": "poisson",
        "sampling_rate": dp_module.sampling_rate(batch_size, n),
        "expected_batch_size": batch_size,
        "accountant": f"{dp.accountant.upper()}, dp-accounting {version('dp-accounting')}",
    }


def _saver(run: _Run, progress: Any) -> Any:
    """``save(state, history)``: the checkpoint of the run folder, written atomically."""
    from fnbp.cli import _run_folder
    from fnbp.train import checkpoint as ckpt
    from fnbp.train import sharding

    checkpoint_file = os.path.join(run.out, CHECKPOINT)

    def save(current: Any, epochs_done: list[dict[str, Any]]) -> None:
        params, opt_state = current.params, current.opt_state
        if run.processes > 1:  # every process takes part in gathering the sharded arrays
            params, opt_state = sharding.to_host((params, opt_state))
        if run.leader:
            with _run_folder.writing(run.out, checkpoint_file, progress.saved_step):
                ckpt.save_checkpoint(
                    checkpoint_file,
                    params,
                    opt_state,
                    step=current.step,
                    key=run.root,
                    metadata={
                        "config": run.config,
                        "history": epochs_done,
                        "loss_sum": current.loss_sum,
                        "correct_sum": current.correct_sum,
                        "data_sha256": run.data_sha256,
                    },
                )
        progress.saved_step = current.step
        if run.leader and not progress.config_written:
            progress.write_config(run.run_config)

    return save


def _progress_bar(run: _Run, progress: Any, args: argparse.Namespace) -> Any:
    """Say what is trained, on what, where; return the tqdm bar of the steps."""
    from tqdm import tqdm

    from fnbp.cli._run_folder import dp_summary
    from fnbp.train import sharding

    config = run.config
    where = "" if run.mesh is None else f", data parallel on {sharding.describe(run.mesh)}"
    if config["precision"] != "float32":
        where += f", {config['precision']} mixed precision"
    if run.dp is not None:
        where += f", DP-SGD ({dp_summary(run.run_config['dp'])})"
    if run.state.step:
        total = config["epochs"] * run.per_epoch
        where += f"; resumed at step {run.state.step} of {total}"
    if run.leader:
        progress.output.say(
            f"fnbp train: {config['model']} on {config['dataset']} ({len(run.x_train)} "
            f"train, {len(run.x_test)} test, {run.run_config['num_classes']} classes), "
            f"{config['optimizer']} lr {config['lr']:g}, batch {config['batch_size']}, "
            f"{config['epochs']} epochs{where}; run folder {run.out}"
        )
    return tqdm(
        total=config["epochs"] * run.per_epoch,
        initial=run.state.step,
        unit="step",
        dynamic_ncols=True,
        disable=args.no_progress or not run.leader,
        file=sys.stderr,
    )


def _train(args: argparse.Namespace, progress: Any, stop: Any = None) -> int:
    from fnbp.cli import _run_folder
    from fnbp.train.stopping import check

    _require_train_extra()
    config, resume_from = _resolve(args)
    numbered = args.out is None and resume_from is None  # runs/<name>, numbered when taken
    words = f"--out {args.out}" if args.out is not None else f"--resume {args.resume}"
    leader = args.process_id in (None, 0)  # process 0 writes the run folder
    # a folder that a live run holds is refused at once, before the start-up's work
    out = _run_folder.out_folder(args.out, config, resume_from, words, probe=leader)
    before = _run_folder.folder_state(out)  # what the folder holds as it is checked
    started = time.perf_counter()
    check(stop, "while starting")
    run = _prepare(args, config, resume_from, out, stop)

    # Everything is valid: from here on the run folder is written, by one run at a time.
    progress.out = out
    if resume_from is not None and os.path.dirname(os.path.abspath(resume_from)) == out:
        progress.saved_step = run.state.step
    lock = None
    if run.leader:
        lock = _run_folder.prepare(progress, run.run_config, words, before, numbered)
        run.out = progress.out
    try:
        return _run(args, run, progress, stop, started)
    finally:
        if lock is not None:
            lock.release()


def _sharpness(run: _Run) -> Any:
    """params -> the largest eigenvalue of the GGN of the mean loss on a fixed batch, jitted."""
    import jax

    import fnbp

    x, y = run.x_train[:256], run.y_train[:256]

    @jax.jit
    def largest(params):
        matvec = fnbp.ggn_vp(run.model, fnbp.cross_entropy_loss, params, x, y)
        return fnbp.top_eigenvalues(matvec, params, k=1, iterations=20)[0][0]

    return largest


def _run(args: argparse.Namespace, run: _Run, progress: Any, stop: Any, started: float) -> int:
    """Train the prepared run; its folder is ready (and locked, on process 0)."""
    import fnbp
    from fnbp.cli import _run_folder
    from fnbp.train.stopping import TrainingStopped, check

    config = run.config
    save = _saver(run, progress)
    bar = _progress_bar(run, progress, args)
    history_so_far = list(run.history)

    def on_step(current: Any, running: dict[str, float]) -> None:
        if not math.isfinite(running["loss"]):
            raise _Diverged(current.step)
        epoch = (current.step - 1) // run.per_epoch + 1
        bar.set_description(f"epoch {epoch}/{config['epochs']}", refresh=False)
        postfix = {"loss": f"{running['loss']:.4f}"}
        if "accuracy" in running:
            postfix["acc"] = f"{100 * running['accuracy']:.2f}%"
        if history_so_far and "epsilon" in history_so_far[-1]:
            postfix["eps"] = f"{history_so_far[-1]['epsilon']:.2f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        every = config["checkpoint_every"]
        if every and current.step % every == 0 and current.step % run.per_epoch:
            save(current, history_so_far)

    sharpness = _sharpness(run) if config["track_sharpness"] else None

    def on_epoch(current: Any, epochs_done: list[dict[str, Any]]) -> None:
        if sharpness is not None:
            epochs_done[-1]["sharpness"] = float(sharpness(current.params))
        history_so_far[:] = epochs_done
        save(current, epochs_done)

    # float32 is the step without casts, exactly as before --precision existed
    precision = None if config["precision"] == "float32" else config["precision"]
    try:
        result = fnbp.fit(
            run.model,
            fnbp.cross_entropy_loss,
            run.optimizer,
            run.state.params,
            run.x_train,
            run.y_train,
            key=run.shuffle_key,
            epochs=config["epochs"],
            batch_size=config["batch_size"],
            x_test=run.x_test,
            y_test=run.y_test,
            state=run.state,
            history=run.history,
            on_step=on_step,
            on_epoch=on_epoch,
            mesh=run.mesh,
            precision=precision,
            dp=run.dp,
            stop=stop,
        )
    except TrainingStopped as stopped:  # at a step boundary: keep where it got to
        bar.close()
        if stopped.state.step > 0 and progress.saved_step != stopped.state.step:
            save(stopped.state, stopped.history)
        raise
    except _Diverged as diverged:
        bar.close()
        print(
            f"fnbp train: error: the loss became NaN or infinite at step {diverged.step}; "
            f"lower --lr (now {config['lr']:g}); {progress.diverged()}",
            file=sys.stderr,
        )
        return 1
    bar.close()
    seconds = time.perf_counter() - started
    if progress.saved_step != result.state.step:  # e.g. a finished run resumed elsewhere
        save(result.state, result.history)
    check(
        stop,
        f"at step {result.state.step}, its last, before writing its results",
        result.state,
        result.history,
    )
    if run.leader:
        _run_folder.write_results(
            progress, config, result, seconds, len(run.x_test), run.run_config.get("dp")
        )
    return 0


class _Diverged(Exception):
    def __init__(self, step: int):
        super().__init__(step)
        self.step = step
