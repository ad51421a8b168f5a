"""fnbp train: train a network with fnbp's hand-written backprop on real data.

With no flags it trains an MLP (64-1024-1024-10, Adam) on the handwritten
digits that ship with scikit-learn and writes, into a new run folder under
runs/: config.json, metrics.json (per-epoch history and the test metrics),
plot.png (loss and accuracy per epoch) and checkpoint.npz (parameters,
optimizer state, step and PRNG key; saved after every epoch, and every N
steps with --checkpoint-every). --resume RUN_FOLDER continues a run exactly
where its last checkpoint left it.

On several devices the run is data parallel: every batch is split over
--devices N (default: all of them, or as many as the batch splits evenly
over) and the parameters are replicated; --fsdp
also splits the large parameters and their optimizer state over the devices.
Several hosts run the same command, each with --coordinator HOST:PORT (of
process 0), --num-processes and its own --process-id; process 0 writes the
run folder.

Examples:
  fnbp train
  fnbp train --dataset spirals
  fnbp train --model cnn --epochs 5
  fnbp train --data-path mydata.npz --out runs/mine
  fnbp train --resume runs/digits-mlp-seed0 --epochs 20
  fnbp train --devices 8 --batch-size 256
  fnbp train --devices 8 --fsdp 4 --batch-size 256
  fnbp train --precision bfloat16

--precision bfloat16 (or float16) trains in mixed precision: the forward and
backward passes run in that dtype, while the parameters, the optimizer state
and the loss stay float32; float16 adds dynamic loss scaling (fnbp.train.precision).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import math
import os
import re
import signal
import sys
import time
from typing import Any

MODELS = ("mlp", "cnn", "resnet-s")
OPTIMIZERS = ("sgd", "momentum", "adam")
PRECISIONS = ("float32", "bfloat16", "float16")  # fnbp.train.precision.PRECISIONS, without JAX
CHECKPOINT = "checkpoint.npz"

# Defaults chosen per dataset (measured: see the README's training section).
_DATASET_DEFAULTS = {
    "digits": {"width": 1024, "epochs": 10, "lr_scale": 1.0},
    "spirals": {"width": 256, "epochs": 30, "lr_scale": 10.0},
}
_OTHER_DEFAULTS = {"width": 256, "epochs": 10, "lr_scale": 1.0}
_MODEL_DEFAULTS = {"cnn": {"width": 32, "depth": 2}, "resnet-s": {"width": 256, "depth": 2}}
_LR = {"adam": 1e-3, "sgd": 0.05, "momentum": 0.01}
_MOMENTUM = 0.9
_BATCH_SIZE = 32
_TEST_FRACTION = 0.2

# Flags that define a run; on --resume they come from the checkpoint.
_RUN_FLAGS = ("dataset", "data_path", "model", "width", "depth", "optimizer", "lr",
              "batch_size", "seed", "test_fraction", "num_examples", "precision")


class _AllDevices:
    """The value of --fsdp given alone: all of --devices (not a string, which argparse
    would convert with type=int)."""

    def __repr__(self) -> str:
        return "all"


_ALL = _AllDevices()


class UsageError(Exception):
    """A problem with the command line; printed as one line, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--dataset", choices=("digits", "spirals", "moons", "npz", "csv", "idx"),
                        help="data to train on (default digits; npz, csv and idx read "
                             "--data-path, and are inferred from it when it is given alone)")
    parser.add_argument("--data-path", help="your .npz or .csv file, or a folder of "
                                            "MNIST-format IDX files")
    parser.add_argument("--model", choices=MODELS, help="network (default mlp)")
    parser.add_argument("--width", type=int,
                        help="mlp/resnet-s hidden width, cnn channels of the first stage "
                             "(default 1024 for mlp on digits, 256 for mlp elsewhere and "
                             "resnet-s, 32 for cnn)")
    parser.add_argument("--depth", type=int,
                        help="hidden layers (mlp), residual blocks (resnet-s) or "
                             "convolution stages (cnn); default 2")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help="optax optimizer (default "
                                                                 "adam; momentum is 0.9)")
    parser.add_argument("--lr", type=float, help="learning rate (default 1e-3 for adam, "
                                                 "0.05 for sgd, 0.01 for momentum; 10x on "
                                                 "spirals)")
    parser.add_argument("--batch-size", type=int, help=f"examples per step (default "
                                                       f"{_BATCH_SIZE})")
    parser.add_argument("--epochs", type=int, help="total epochs (default 10; 30 on spirals)")
    parser.add_argument("--seed", type=int, help="seed of the initialization and the "
                                                 "shuffling (default 0)")
    parser.add_argument("--test-fraction", type=float,
                        help=f"fraction held out for testing when the data have no split "
                             f"(default {_TEST_FRACTION})")
    parser.add_argument("--num-examples", type=int,
                        help="number of points for spirals and moons (default 2000)")
    parser.add_argument("--out", help="run folder to create (default runs/<dataset>-<model>-"
                                      "seed<seed>, numbered if taken)")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue the run in this folder (or from this checkpoint file)")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                        help="also save a checkpoint every N steps (default: every epoch only)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="compute dtype; bfloat16 and float16 are mixed precision with "
                             "float32 parameters, optimizer state and loss, float16 with "
                             "dynamic loss scaling (default float32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parallel = parser.add_argument_group("several devices and hosts")
    parallel.add_argument("--devices", type=int, metavar="N",
                          help="train data parallel on N devices: each batch is split over "
                               "them, so --batch-size must be a multiple of N (default: all "
                               "devices, of every process; on one host, as many as the batch "
                               "splits evenly over; 1 is one device)")
    parallel.add_argument("--fsdp", type=int, nargs="?", const=_ALL, metavar="K",
                          help="also split the large parameters and their optimizer state "
                               "over K of the devices, FSDP-style (--fsdp alone: over all "
                               "--devices; default: replicated on every device)")
    parallel.add_argument("--coordinator", metavar="HOST:PORT",
                          help="several hosts: the address of process 0, the same on "
                               "every process")
    parallel.add_argument("--num-processes", type=int, metavar="P",
                          help="several hosts: the number of processes (default 1)")
    parallel.add_argument("--process-id", type=int, metavar="I",
                          help="several hosts: this process' number, 0 .. P-1")

    def one_line_error(message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = one_line_error  # argparse's errors as one line too


# --- resolving and validating the configuration -------------------------------------


def _infer_dataset(data_path: str) -> str:
    if os.path.isdir(data_path):
        return "idx"
    extension = os.path.splitext(data_path)[1].lower()
    if extension in (".npz", ".csv"):
        return extension[1:]
    raise UsageError(f"cannot tell the format of --data-path {data_path}; pass --dataset "
                     f"npz, csv or idx")


def _checkpoint_path(resume: str) -> str:
    from fnbp.cli import _run_folder

    if os.path.isdir(resume):
        if _run_folder.unstarted_run(resume):
            raise UsageError(f"--resume {resume}: the run stopped before its first "
                             f"checkpoint, so there is nothing to resume; start it again: "
                             f"{_run_folder.restart_command(resume)}")
        return os.path.join(resume, CHECKPOINT)
    if not os.path.exists(resume):
        raise UsageError(f"--resume {resume}: no such run folder or checkpoint file")
    return resume


def _resolve(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """The run's config (flags, defaults, or the resumed run's) and its checkpoint path."""
    from fnbp.train.checkpoint import read_checkpoint_metadata

    given = {name: getattr(args, name) for name in _RUN_FLAGS}
    if given["data_path"] is not None:
        given["data_path"] = os.path.abspath(given["data_path"])
    checkpoint = None
    if args.resume is not None:
        checkpoint = _checkpoint_path(args.resume)
        stored = read_checkpoint_metadata(checkpoint).get("config")
        if isinstance(stored, dict):  # runs saved before --precision existed were float32
            stored = {"precision": "float32", **stored}
        if not isinstance(stored, dict) or any(name not in stored for name in _RUN_FLAGS):
            raise UsageError(f"--resume: {checkpoint} holds no fnbp train config; it was "
                             f"not written by fnbp train")
        for name, value in given.items():
            if value is not None and value != stored[name]:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"--resume: the run was made with {flag} "
                                 f"{stored[name]} but {flag} {value} was given; drop "
                                 f"{flag} to continue it, or start a new run")
        config = {name: stored[name] for name in _RUN_FLAGS}
        config["epochs"] = args.epochs if args.epochs is not None else stored["epochs"]
    else:
        config = dict(given)
        if config["dataset"] is None:
            config["dataset"] = ("digits" if config["data_path"] is None
                                 else _infer_dataset(config["data_path"]))
        config["model"] = config["model"] or "mlp"
        config["optimizer"] = config["optimizer"] or "adam"
        config["precision"] = config["precision"] or "float32"
        dataset_defaults = _DATASET_DEFAULTS.get(config["dataset"], _OTHER_DEFAULTS)
        model_defaults = _MODEL_DEFAULTS.get(config["model"], {})
        if config["width"] is None:
            config["width"] = model_defaults.get("width", dataset_defaults["width"])
        if config["depth"] is None:
            config["depth"] = model_defaults.get("depth", 2)
        if config["lr"] is None:
            config["lr"] = _LR[config["optimizer"]] * dataset_defaults["lr_scale"]
        for name, value in (("batch_size", _BATCH_SIZE), ("seed", 0),
                            ("test_fraction", _TEST_FRACTION)):
            if config[name] is None:
                config[name] = value
        config["epochs"] = (args.epochs if args.epochs is not None
                            else dataset_defaults["epochs"])
    config["checkpoint_every"] = args.checkpoint_every
    _validate(config)
    _validate_parallel(args)
    return config, checkpoint


def _validate_parallel(args: argparse.Namespace) -> None:
    """The flags of several devices and hosts, as far as they can be checked without JAX."""
    if args.devices is not None and args.devices < 1:
        raise UsageError(f"--devices must be a positive integer, got {args.devices}")
    if args.fsdp is not None and args.fsdp is not _ALL and args.fsdp < 1:
        raise UsageError(f"--fsdp must be a positive integer, got {args.fsdp}")
    processes = args.num_processes
    if processes is not None and processes < 1:
        raise UsageError(f"--num-processes must be a positive integer, got {processes}")
    if processes is None or processes == 1:
        if args.process_id not in (None, 0):
            raise UsageError(f"--process-id {args.process_id} needs --num-processes "
                             f"greater than {args.process_id}")
        return
    if args.coordinator is None:
        raise UsageError(f"--num-processes {processes} needs --coordinator HOST:PORT, the "
                         f"address of process 0, on every process")
    if args.process_id is None or not 0 <= args.process_id < processes:
        raise UsageError(f"--num-processes {processes} needs --process-id, this process' "
                         f"number in 0 .. {processes - 1}, got {args.process_id}")


def _mesh(args: argparse.Namespace, batch_size: int) -> Any:
    """The device mesh of the run (None: one device), after the device checks."""
    import jax

    from fnbp.train import sharding

    present = jax.device_count()
    devices = args.devices if args.devices is not None else present
    if args.devices is None and jax.process_count() == 1 and batch_size % devices:
        # By default, as many devices as the batch splits evenly over (3 GPUs and
        # --batch-size 32: 2 of them); an explicit --devices is taken as given.
        group = args.fsdp if isinstance(args.fsdp, int) and args.fsdp > 0 else 1
        devices = max((d for d in range(group, present + 1, group) if batch_size % d == 0),
                      default=devices)
        print(f"fnbp train: --batch-size {batch_size} does not split evenly over the "
              f"{present} devices present; training on {devices} (pass --devices to choose)",
              file=sys.stderr)
    if devices > present:
        are = "device is" if present == 1 else "devices are"
        raise UsageError(f"--devices {devices}: only {present} {are} present "
                         f"({jax.default_backend()}); pass --devices {present} or fewer")
    fsdp = devices if args.fsdp is _ALL else (args.fsdp or 1)
    if devices % fsdp:
        raise UsageError(f"--fsdp {fsdp} does not divide --devices {devices}; the devices "
                         f"form a ({devices} // fsdp) x fsdp mesh, so pass an --fsdp that "
                         f"divides {devices}")
    if batch_size % devices:
        lower = batch_size - batch_size % devices
        example = f"{lower} or {lower + devices}" if lower else f"{devices}"
        raise UsageError(f"--batch-size {batch_size} does not split evenly over --devices "
                         f"{devices} (every device takes an equal part of each batch); pass "
                         f"a --batch-size that is a multiple of {devices} ({example}) or "
                         f"fewer --devices")
    if devices == 1 and jax.process_count() == 1:
        return None
    try:
        return sharding.make_mesh(devices, fsdp=fsdp)
    except ValueError as error:
        raise UsageError(f"--devices {devices}: {error}") from error


def _validate(config: dict[str, Any]) -> None:
    def positive_int(name: str) -> None:
        if not isinstance(config[name], int) or config[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, "
                             f"got {config[name]}")

    for name in ("batch_size", "epochs", "width", "depth"):
        positive_int(name)
    lr = config["lr"]
    if not (isinstance(lr, float) and math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr must be a positive finite number, got {lr}")
    if not 0 <= config["seed"] < 2**32:
        raise UsageError(f"--seed must lie in [0, 2**32), got {config['seed']}")
    if config["checkpoint_every"] < 0:
        raise UsageError(f"--checkpoint-every must be >= 0 (0: every epoch only), got "
                         f"{config['checkpoint_every']}")
    from fnbp.train.data import DataError, check_dataset_arguments

    try:  # the library's own check, before any work, in the flags' words
        check_dataset_arguments(config["dataset"], config["data_path"], config["num_examples"],
                                config["test_fraction"])
    except DataError as error:
        raise UsageError(as_flags(str(error))) from error


# The library names an argument at fault in backticks (`path`); the command line
# says which flag sets it.
FLAGS = {"name": "--dataset", "path": "--data-path", "num_examples": "--num-examples",
         "batch_size": "--batch-size", "epochs": "--epochs", "test_fraction": "--test-fraction"}


def as_flags(message: str) -> str:
    """A library message with its backticked argument names replaced by their flags."""
    return re.sub(r"`(\w+)`", lambda m: FLAGS.get(m.group(1), m.group(0)), message)


# --- data and model ----------------------------------------------------------------


def _prepare_inputs(config: dict[str, Any], dataset: Any) -> tuple[Any, Any]:
    """Reshape the inputs for the model: vectors for mlp/resnet-s; for cnn, images
    (H, W, C) (a channel added to (H, W)) or 1-D signals (L, 1) from (L,)."""
    x_train, x_test = dataset.x_train, dataset.x_test
    if config["model"] == "cnn":
        shape = dataset.input_shape
        if len(shape) in (1, 2):
            return x_train[..., None], x_test[..., None]
        if len(shape) != 3:
            raise UsageError(f"--model cnn needs images, examples of shape (H, W) or "
                             f"(H, W, C), or 1-D signals of shape (L,), but "
                             f"{config['dataset']} examples have shape {shape}; "
                             f"use --model mlp")
        return x_train, x_test
    return x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)


# Models and optimizers are records of functions; the training step is compiled
# once per (model, optimizer) object. Building them through a cache lets
# repeated runs in one process (a notebook, the tests) reuse the compiled code.
@functools.lru_cache(maxsize=16)
def _build_model(model: str, width: int, depth: int, num_classes: int,
                 input_ndim: int = 3) -> Any:
    import fnbp

    if model == "mlp":
        return fnbp.mlp([width] * depth + [num_classes])
    if model == "resnet-s":
        return fnbp.resnet_s(width, depth, num_classes)
    return fnbp.cnn(num_classes, tuple(width * 2**i for i in range(depth)),
                    input_ndim=input_ndim)


@functools.lru_cache(maxsize=16)
def _optimizer(name: str, lr: float, precision: str = "float32") -> Any:
    import optax

    from fnbp.train.precision import loss_scaled

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
    """Run ``fnbp train``; user errors print one line and return 2."""
    from fnbp.cli import _run_folder
    from fnbp.train.checkpoint import CheckpointError
    from fnbp.train.data import DataError

    progress = _run_folder.Progress()
    try:
        with _run_folder.sigterm_as_interrupt():  # SIGTERM stops as cleanly as Ctrl-C
            status = _train(args, progress)
    except (UsageError, DataError, CheckpointError, _run_folder.RunFolderError) as error:
        message = as_flags(" ".join(str(error).split()))
        print(f"fnbp train: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"fnbp train: interrupted; {progress.interrupted()}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(interrupt, _run_folder.Terminated)
                      else signal.SIGINT)
    if progress.output.closed:
        print(f"fnbp train: error: standard output was closed before the run ended (piped "
              f"into head?), so its last lines were not printed; the run finished, its "
              f"results are in {progress.out}", file=sys.stderr)
        return 2
    return status


def _require_train_extra() -> None:
    missing = [name for name in ("tqdm", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"fnbp train needs {' and '.join(missing)}, from the train extra: "
                         f"python -m pip install \"fnbp[train]\"")


def _resumed(config: dict[str, Any], resume_from: str, state: Any, data_sha256: str,
             root: Any, per_epoch: int) -> tuple[Any, list[dict[str, Any]]]:
    """The state and history of the checkpoint, checked against this run's data and seed."""
    import jax
    import numpy as np

    from fnbp.train import checkpoint as ckpt
    from fnbp import train

    loaded = ckpt.load_checkpoint(resume_from, state.params, state.opt_state)
    meta = loaded.metadata
    if meta.get("data_sha256") != data_sha256:
        raise UsageError(f"--resume: the data of {config['dataset']} differ from those "
                         f"the run was trained on; restore them or start a new run")
    if loaded.key is None or not np.array_equal(jax.random.key_data(loaded.key),
                                                jax.random.key_data(root)):
        raise ckpt.CheckpointError(f"checkpoint {resume_from}: its PRNG key does not belong "
                                   f"to seed {config['seed']}; the file is corrupted")
    if loaded.step > config["epochs"] * per_epoch:
        raise UsageError(f"--resume: the run is at step {loaded.step} (epoch "
                         f"{loaded.step / per_epoch:g}), past --epochs "
                         f"{config['epochs']}; pass more epochs")
    state = train.TrainState(loaded.params, loaded.opt_state, loaded.step,
                             float(meta.get("loss_sum", 0.0)),
                             float(meta.get("correct_sum", 0.0)))
    return state, list(meta.get("history", []))


def _train(args: argparse.Namespace, progress: Any) -> int:
    from fnbp.cli import _run_folder

    _require_train_extra()
    config, resume_from = _resolve(args)
    out = _run_folder.out_folder(args.out, config, resume_from)

    import jax
    import jax.numpy as jnp

    import fnbp
    from fnbp.train import checkpoint as ckpt
    from fnbp import train
    from fnbp.train import sharding
    from fnbp.train.data import DataWarning, load_dataset

    # before anything asks JAX for its devices
    try:
        processes = sharding.initialize_distributed(args.coordinator, args.num_processes,
                                                    args.process_id)
    except ValueError as error:
        raise UsageError(f"--coordinator {args.coordinator}: {error}") from error
    leader = jax.process_index() == 0  # process 0 writes the run folder and prints

    started = time.perf_counter()
    with _run_folder.warnings_as_lines("fnbp train: warning: ", DataWarning):
        dataset = load_dataset(config["dataset"], path=config["data_path"],
                               test_fraction=config["test_fraction"],
                               num_examples=config["num_examples"])
    x_train, x_test = _prepare_inputs(config, dataset)
    y_train, y_test = dataset.y_train, dataset.y_test
    n = len(x_train)
    if config["batch_size"] > n:
        raise UsageError(f"--batch-size {config['batch_size']} is larger than the {n} "
                         f"training examples; pass --batch-size {min(n, _BATCH_SIZE)} or less")
    mesh = _mesh(args, config["batch_size"])
    data_sha256 = _fingerprint(x_train, y_train, x_test, y_test)
    per_epoch = train.steps_per_epoch(n, config["batch_size"])

    model = _build_model(config["model"], config["width"], config["depth"],
                         dataset.num_classes, x_train.ndim - 1)
    optimizer = _optimizer(config["optimizer"], config["lr"], config["precision"])
    root = jax.random.key(config["seed"])
    init_key, shuffle_key = jax.random.split(root)
    try:
        state = train.init_state(model, optimizer, init_key, x_train.shape[1:], jnp.float32,
                                 mesh=mesh)
    except ValueError as error:
        raise UsageError(f"--model {config['model']} does not fit {config['dataset']} "
                         f"examples of shape {x_train.shape[1:]}: {error}") from error
    history: list[dict[str, Any]] = []
    if resume_from is not None:
        state, history = _resumed(config, resume_from, state, data_sha256, root, per_epoch)

    # Everything is valid: from here on the run folder is written.
    devices = 1 if mesh is None else mesh.size
    run_config = {**config, "out": out, "num_classes": dataset.num_classes,
                  "input_shape": list(x_train.shape[1:]), "num_train": n,
                  "num_test": len(x_test), "steps_per_epoch": per_epoch,
                  "fnbp_version": fnbp.__version__,
                  "jax_version": jax.__version__, "backend": jax.default_backend(),
                  "devices": devices,
                  "fsdp": 1 if mesh is None else dict(mesh.shape).get(sharding.FSDP_AXIS, 1),
                  "processes": processes}
    checkpoint_file = os.path.join(out, CHECKPOINT)
    progress.out = out
    if resume_from is not None and os.path.dirname(os.path.abspath(resume_from)) == out:
        progress.saved_step = state.step

    if leader:
        _run_folder.prepare(progress, run_config)

    def save(current: Any, epochs_done: list[dict[str, Any]]) -> None:
        params, opt_state = current.params, current.opt_state
        if processes > 1:  # every process takes part in gathering the sharded arrays
            params, opt_state = sharding.to_host((params, opt_state))
        if leader:
            with _run_folder.writing(out, checkpoint_file, progress.saved_step):
                ckpt.save_checkpoint(checkpoint_file, params, opt_state,
                                     step=current.step, key=root,
                                     metadata={"config": config, "history": epochs_done,
                                               "loss_sum": current.loss_sum,
                                               "correct_sum": current.correct_sum,
                                               "data_sha256": data_sha256})
        progress.saved_step = current.step
        if leader and not progress.config_written:
            progress.write_config(run_config)

    from tqdm import tqdm

    total = config["epochs"] * per_epoch
    where = "" if mesh is None else f", data parallel on {sharding.describe(mesh)}"
    # float32 is the step without casts, exactly as before --precision existed
    precision = None if config["precision"] == "float32" else config["precision"]
    if precision is not None:
        where += f", {precision} mixed precision"
    if leader:
        progress.output.say(
            f"fnbp train: {config['model']} on {config['dataset']} ({n} train, "
            f"{len(x_test)} test, {dataset.num_classes} classes), {config['optimizer']} lr "
            f"{config['lr']:g}, batch {config['batch_size']}, {config['epochs']} epochs"
            f"{where}; run folder {out}")
    bar = tqdm(total=total, initial=state.step, unit="step", dynamic_ncols=True,
               disable=args.no_progress or not leader, file=sys.stderr)

    history_so_far = list(history)

    def on_step(current: Any, running: dict[str, float]) -> None:
        if not math.isfinite(running["loss"]):
            raise _Diverged(current.step)
        epoch = (current.step - 1) // per_epoch + 1
        bar.set_description(f"epoch {epoch}/{config['epochs']}", refresh=False)
        postfix = {"loss": f"{running['loss']:.4f}"}
        if "accuracy" in running:
            postfix["acc"] = f"{100 * running['accuracy']:.2f}%"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        every = config["checkpoint_every"]
        if every and current.step % every == 0 and current.step % per_epoch:
            save(current, history_so_far)

    def on_epoch(current: Any, epochs_done: list[dict[str, Any]]) -> None:
        history_so_far[:] = epochs_done
        save(current, epochs_done)

    try:
        result = train.fit(model, fnbp.cross_entropy_loss, optimizer, state.params,
                           x_train, y_train, key=shuffle_key, epochs=config["epochs"],
                           batch_size=config["batch_size"], x_test=x_test, y_test=y_test,
                           state=state, history=history, on_step=on_step, on_epoch=on_epoch,
                           mesh=mesh, precision=precision)
    except _Diverged as diverged:
        bar.close()
        print(f"fnbp train: error: the loss became NaN or infinite at step {diverged.step}; "
              f"lower --lr (now {config['lr']:g}); {progress.diverged()}", file=sys.stderr)
        return 1
    bar.close()
    seconds = time.perf_counter() - started
    if progress.saved_step != result.state.step:  # e.g. a finished run resumed elsewhere
        save(result.state, result.history)
    if leader:
        _run_folder.write_results(progress, config, result, seconds, len(x_test))
    return 0


class _Diverged(Exception):
    def __init__(self, step: int):
        super().__init__(step)
        self.step = step
