"""fnbp train's configuration: the flags' defaults, resolving --resume, validating.

Only what the library cannot know is checked here (a flag against another
flag, a run folder); what the library validates, it validates once (the
dataset's arguments: :func:`fnbp.train.data.check_dataset_arguments`; the
devices and the batch size: :func:`fnbp.train.sharding.make_mesh`,
:func:`fnbp.train.sharding.check_batch`, :func:`fnbp.train.loop.check_batch_size`),
and :func:`library_error` turns its message into a :class:`UsageError`, which
``fnbp train``'s ``run`` prints as one line in these flags (:func:`as_flags`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any

from fnbp.cli import with_flags, without_function

MODELS = ("mlp", "cnn", "cnn1d", "resnet-s")  # cnn1d: 1-D signals (L,) or (L, C)
OPTIMIZERS = ("sgd", "momentum", "adam", "kfac")  # kfac: fnbp.train.kfac
PRECISIONS = ("float32", "bfloat16", "float16")  # fnbp.train.precision.PRECISIONS, without JAX
DP_ACCOUNTANTS = ("rdp", "pld")  # fnbp.train.dp.ACCOUNTANTS, without JAX
CHECKPOINT = "checkpoint.npz"

# Defaults chosen per dataset (measured: see the README's training section).
_DATASET_DEFAULTS = {
    "digits": {"width": 1024, "epochs": 10, "lr_scale": 1.0},
    "spirals": {"width": 256, "epochs": 30, "lr_scale": 10.0},
}
_OTHER_DEFAULTS = {"width": 256, "epochs": 10, "lr_scale": 1.0}
_MODEL_DEFAULTS = {"cnn": {"width": 32, "depth": 2}, "resnet-s": {"width": 256, "depth": 2}}
_LR = {"adam": 1e-3, "sgd": 0.05, "momentum": 0.01, "kfac": 0.01}
_MOMENTUM = 0.9
_BATCH_SIZE = 32
_TEST_FRACTION = 0.2
_COORDINATOR_TIMEOUT = 60.0  # fnbp.train.sharding.DEFAULT_TIMEOUT, without importing JAX

# Flags that define a run; on --resume they come from the checkpoint.
_RUN_FLAGS = (
    "dataset",
    "data_path",
    "model",
    "width",
    "depth",
    "optimizer",
    "lr",
    "batch_size",
    "seed",
    "test_fraction",
    "num_examples",
    "precision",
    "dp_clip",
    "dp_noise",
    "dp_delta",
    "dp_accountant",
)
# what a run saved before a flag existed was made with (--dp-accountant: None, the default,
# RDP, the only accountant before the flag)
_BEFORE = {
    "precision": "float32",
    "dp_clip": None,
    "dp_noise": None,
    "dp_delta": None,
    "dp_accountant": None,
}


class _AllDevices:
    """The value of --fsdp given alone: all of --devices (not a string, which argparse
    would convert with type=int)."""

    def __repr__(self) -> str:
        return "all"


_ALL = _AllDevices()


class UsageError(Exception):
    """A problem with the command line; printed as one line, exit status 2."""


# --- resolving and validating the configuration -------------------------------------


def _infer_dataset(data_path: str) -> str:
    if os.path.isdir(data_path):
        return "idx"
    extension = os.path.splitext(data_path)[1].lower()
    if extension in (".npz", ".csv"):
        return extension[1:]
    raise UsageError(
        f"cannot tell the format of --data-path {data_path}; pass --dataset npz, csv or idx"
    )


def restart_command(folder: str) -> str:
    """The ``fnbp train`` command that starts the run of ``folder/config.json`` again:
    every flag that defines a run (``_RUN_FLAGS``, the DP flags included) and --epochs,
    as the config states them."""
    from fnbp.cli import _run_folder

    try:
        with open(os.path.join(folder, _run_folder.CONFIG), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return f"fnbp train ... --out {folder}"
    words = ["fnbp train"]
    for name in (*_RUN_FLAGS, "epochs"):
        value = config.get(name) if isinstance(config, dict) else None
        if value is not None:
            words.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(words + [f"--out {folder}"])


def _checkpoint_path(resume: str) -> str:
    from fnbp.cli import _run_folder

    if os.path.isdir(resume):
        if _run_folder.unstarted_run(resume):
            raise UsageError(
                f"--resume {resume}: the run stopped before its first "
                f"checkpoint, so there is nothing to resume; start it again: "
                f"{restart_command(resume)}"
            )
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
        if isinstance(stored, dict):  # runs saved before --precision and --dp-* existed
            stored = {**_BEFORE, **stored}
        if not isinstance(stored, dict) or any(name not in stored for name in _RUN_FLAGS):
            raise UsageError(
                f"--resume: {checkpoint} holds no fnbp train config; it was "
                f"not written by fnbp train"
            )
        for name, value in given.items():
            if value is not None and value != stored[name]:
                flag = "--" + name.replace("_", "-")
                raise UsageError(
                    f"--resume: the run was made with {flag} "
                    f"{stored[name]} but {flag} {value} was given; drop "
                    f"{flag} to continue it, or start a new run"
                )
        config = {name: stored[name] for name in _RUN_FLAGS}
        config["epochs"] = args.epochs if args.epochs is not None else stored["epochs"]
        from_checkpoint = set(_RUN_FLAGS) | ({"epochs"} if args.epochs is None else set())
    else:
        from_checkpoint = set()
        config = dict(given)
        if config["dataset"] is None:
            config["dataset"] = (
                "digits" if config["data_path"] is None else _infer_dataset(config["data_path"])
            )
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
        for name, value in (
            ("batch_size", _BATCH_SIZE),
            ("seed", 0),
            ("test_fraction", _TEST_FRACTION),
        ):
            if config[name] is None:
                config[name] = value
        config["epochs"] = args.epochs if args.epochs is not None else dataset_defaults["epochs"]
    config["checkpoint_every"] = args.checkpoint_every
    config["track_sharpness"] = bool(getattr(args, "track_sharpness", False))
    _validate(config, checkpoint, from_checkpoint)
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
            raise UsageError(
                f"--process-id {args.process_id} needs --num-processes "
                f"greater than {args.process_id}"
            )
        _check_distributed(args)
        return
    if args.coordinator is None:
        raise UsageError(
            f"--num-processes {processes} needs --coordinator HOST:PORT, the "
            f"address of process 0, on every process"
        )
    if args.process_id is None or not 0 <= args.process_id < processes:
        raise UsageError(
            f"--num-processes {processes} needs --process-id, this process' "
            f"number in 0 .. {processes - 1}, got {args.process_id}"
        )
    _check_distributed(args)


def _check_distributed(args: argparse.Namespace) -> None:
    """The library's check of --coordinator and --coordinator-timeout, before any work."""
    from fnbp.train.sharding import check_distributed_arguments

    try:
        check_distributed_arguments(
            args.coordinator, args.num_processes, args.process_id, args.coordinator_timeout
        )
    except (TypeError, ValueError) as error:
        raise library_error(error) from error


def _mesh(args: argparse.Namespace, batch_size: int, dp: bool = False) -> Any:
    """The device mesh of the run (None: one device), checked by the library.

    ``make_mesh`` checks --devices against the devices present and --fsdp
    against --devices, ``check_batch`` --batch-size against the mesh; their
    messages come back in the flags' words.
    """
    import jax

    from fnbp.train import sharding

    present = jax.device_count()
    devices = args.devices if args.devices is not None else present
    if args.devices is None and dp:
        devices = 1  # DP-SGD runs on one device (fnbp.train.dp.check_options)
    elif args.devices is None and jax.process_count() == 1 and batch_size % devices:
        # By default, as many devices as the batch splits evenly over (3 GPUs and
        # --batch-size 32: 2 of them); an explicit --devices is taken as given.
        group = args.fsdp if isinstance(args.fsdp, int) and args.fsdp > 0 else 1
        devices = max(
            (d for d in range(group, present + 1, group) if batch_size % d == 0), default=devices
        )
        print(
            f"fnbp train: --batch-size {batch_size} does not split evenly over the "
            f"{present} devices present; training on {devices} (pass --devices to choose)",
            file=sys.stderr,
        )
    fsdp = devices if args.fsdp is _ALL else (args.fsdp or 1)
    try:
        mesh = sharding.make_mesh(devices, fsdp=fsdp)
        sharding.check_batch("fit", mesh, batch_size, "batch_size")
    except ValueError as error:
        raise library_error(error) from error
    return None if devices == 1 and jax.process_count() == 1 else mesh


def _validate(
    config: dict[str, Any],
    checkpoint: str | None = None,
    from_checkpoint: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Check the run's configuration; a bad value is one line naming where it came from.

    The values in ``from_checkpoint`` were read from the config stored in
    ``checkpoint`` (on --resume, every run flag, and --epochs unless given):
    a bad one there is the file's fault, and the message names the file and
    the stored field, never a flag the user did not pass.
    """

    def fail(name: str, requirement: str) -> None:
        value = config[name]
        if name in from_checkpoint:
            raise UsageError(
                f"--resume: the config stored in {checkpoint} has {name} "
                f"{value!r}, but {name} {requirement}; the file was edited or "
                f"is corrupted, so its run cannot be resumed"
            )
        raise UsageError(f"--{name.replace('_', '-')} {requirement}, got {value}")

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for name in ("batch_size", "epochs", "width", "depth"):
        if not is_int(config[name]) or config[name] < 1:
            fail(name, "must be a positive integer")
    lr = config["lr"]
    if not (isinstance(lr, float) and math.isfinite(lr) and lr > 0):
        fail("lr", "must be a positive finite number")
    if not is_int(config["seed"]) or not 0 <= config["seed"] < 2**32:
        fail("seed", "must lie in [0, 2**32)")
    if config["checkpoint_every"] < 0:
        raise UsageError(
            f"--checkpoint-every must be >= 0 (0: every epoch only), got "
            f"{config['checkpoint_every']}"
        )
    for name, choices in (
        ("model", MODELS),
        ("optimizer", OPTIMIZERS),
        ("precision", PRECISIONS),
    ):  # argparse checks the flags' own
        if config[name] not in choices:
            fail(name, f"must be one of {', '.join(choices)}")
    if config["optimizer"] == "kfac":
        if config["precision"] == "float16":
            fail(
                "optimizer",
                "kfac does not take float16's loss scaling; use --precision float32 or bfloat16, not kfac",
            )
        if config["dp_clip"] is not None or config["dp_noise"] is not None:
            fail(
                "optimizer",
                "kfac preconditions the plain gradient, not DP-SGD's noisy clipped one; drop --dp-clip/--dp-noise or use another optimizer, not kfac",
            )
    if config["data_path"] is not None and not isinstance(config["data_path"], str):
        fail("data_path", "must be a path")
    from fnbp.train.data import DataError, check_dataset_arguments

    try:  # the library's own checks, before any work, in the flags' words
        try:
            check_dataset_arguments(
                config["dataset"],
                config["data_path"],
                config["num_examples"],
                config["test_fraction"],
            )
        except DataError as error:
            raise UsageError(as_flags(str(error))) from error
        dp_config(config)
    except UsageError as error:
        if not from_checkpoint:
            raise
        # these arguments all come from the checkpoint: its fields, not flags, are at fault
        message = re.sub(
            r"--([a-z][a-z0-9-]*)",
            lambda m: (
                f"the stored {m[1].replace('-', '_')}"
                if m[1].replace("-", "_") in from_checkpoint
                else m[0]
            ),
            as_flags(str(error)),
        )
        raise UsageError(
            f"--resume: the config stored in {checkpoint} is not a valid run: "
            f"{message}; the file was edited or is corrupted, so its run cannot "
            f"be resumed"
        ) from error


def dp_config(config: dict[str, Any]) -> Any:
    """The run's fnbp.train.DPConfig (None without --dp-clip and --dp-noise), checked."""
    clip, noise, delta = config["dp_clip"], config["dp_noise"], config["dp_delta"]
    accountant = config["dp_accountant"]
    if clip is None and noise is None:
        for flag, value in (("--dp-delta", delta), ("--dp-accountant", accountant)):
            if value is not None:
                raise UsageError(f"{flag} needs --dp-clip C and --dp-noise SIGMA (DP-SGD)")
        return None
    if clip is None or noise is None:
        given, missing = (
            ("--dp-clip", "--dp-noise SIGMA") if noise is None else ("--dp-noise", "--dp-clip C")
        )
        raise UsageError(
            f"{given} needs {missing} too: DP-SGD clips every example's "
            f"gradient to norm C and adds noise of std SIGMA * C"
        )
    from fnbp.train.dp import DPConfig

    try:  # no --dp-accountant: DPConfig's default
        return DPConfig(
            clip, noise, delta, **({} if accountant is None else {"accountant": accountant})
        )
    except ValueError as error:
        raise library_error(error) from error


# The library names an argument at fault in backticks (`path`); the command line
# says which flag sets it.
FLAGS = {
    "name": "--dataset",
    "path": "--data-path",
    "num_examples": "--num-examples",
    "batch_size": "--batch-size",
    "epochs": "--epochs",
    "test_fraction": "--test-fraction",
    "devices": "--devices",
    "fsdp": "--fsdp",
    "precision": "--precision",
    "clip_norm": "--dp-clip",
    "noise_multiplier": "--dp-noise",
    "delta": "--dp-delta",
    "accountant": "--dp-accountant",
    "coordinator_address": "--coordinator",
    "num_processes": "--num-processes",
    "process_id": "--process-id",
    "timeout": "--coordinator-timeout",
}


def as_flags(message: str) -> str:
    """A library message in fnbp train's flags (``pass its `path``` -> ``--data-path``)."""
    return with_flags(message, FLAGS)


def library_error(error: Exception) -> UsageError:
    """A library ValueError as fnbp train's error, without the function's name.

    ``run`` puts every UsageError on one line in the flags' words (:func:`as_flags`).
    """
    return UsageError(without_function(str(error)))
