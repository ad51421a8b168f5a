"""The run folder of ``fnbp train``: checks, clean-up, and file-system faults as one line.

- ``--out`` is checked before any work: a path under a file, or a run folder
  that holds something else, is refused; a folder left by a run that stopped
  before its first checkpoint (only ``config.json`` and temporary files) is
  taken again, with a note.
- Temporary files left by a write that was killed (``.checkpoint.npz.*.tmp``,
  several MB each) are removed when a run starts or resumes in the folder.
- A write that fails (disk full, the folder deleted mid-run, a read-only
  file system) becomes :class:`RunFolderError`, whose one-line message says
  what is kept and how to go on.
- SIGTERM is handled as SIGINT (:func:`sigterm_as_interrupt`), and a closed
  standard output (``fnbp train | head -1``) does not stop the run
  (:class:`Output`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import sys
import warnings
from typing import Any, Iterator

CHECKPOINT = "checkpoint.npz"
CONFIG = "config.json"
OUTPUTS = (CHECKPOINT, CONFIG, "metrics.json", "plot.png")
# fnbp.train.checkpoint.atomic_write's temporary files: .<name>.<pid>.<8 hex digits>.tmp
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


class RunFolderError(Exception):
    """A run folder that cannot be used or written; printed as one line, exit status 2."""


def out_folder(out_arg: str | None, config: dict[str, Any], checkpoint: str | None) -> str:
    """The run folder; checked here, created only once everything else is valid.

    ``--out`` as given, or the folder of the resumed checkpoint, or a new
    ``runs/<dataset>-<model>-seed<seed>`` (numbered if taken).
    """
    if out_arg is None and checkpoint is not None:
        return os.path.dirname(os.path.abspath(checkpoint))
    if out_arg is not None:
        out = check_out(out_arg)
        resuming_here = (checkpoint is not None and
                         os.path.dirname(os.path.abspath(checkpoint)) == out)
        if os.path.exists(out) and not resuming_here:
            if not os.path.isdir(out):
                raise RunFolderError(f"--out {out_arg} is a file; pass a folder")
            if unstarted_run(out):  # stopped before its first checkpoint
                print(f"fnbp train: --out {out_arg} holds a run that stopped before its "
                      f"first checkpoint; starting a run there again", file=sys.stderr)
            elif os.listdir(out):
                raise RunFolderError(f"--out {out_arg} already holds files; choose a new "
                                     f"folder, or pass --resume {out_arg} to continue that run")
        return out
    base = os.path.abspath(os.path.join(
        "runs", f"{config['dataset']}-{config['model']}-seed{config['seed']}"))
    out, number = base, 1
    while os.path.exists(out):
        number += 1
        out = f"{base}-{number}"
    return out


def check_out(out_arg: str) -> str:
    """The absolute ``--out`` path, refused at once when it lies under a file."""
    out = os.path.abspath(out_arg)
    parent = os.path.dirname(out)
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunFolderError(f"--out {out_arg}: {parent} is a file, not a folder, so no run "
                             f"folder can be made under it; pass another --out")
    return out


def is_temporary(name: str) -> bool:
    """A temporary file of an interrupted write of one of the run's outputs."""
    match = _TEMPORARY.match(name)
    return bool(match) and match["name"] in OUTPUTS


def unstarted_run(folder: str) -> bool:
    """The folder of a run stopped before its first checkpoint: config.json and temporaries."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return CONFIG in names and all(name == CONFIG or is_temporary(name) for name in names)


def restart_command(folder: str) -> str:
    """The ``fnbp train`` command that starts the run of ``folder/config.json`` again."""
    try:
        with open(os.path.join(folder, CONFIG), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return f"fnbp train ... --out {folder}"
    flags = ("dataset", "data_path", "model", "width", "depth", "optimizer", "lr",
             "batch_size", "epochs", "seed", "test_fraction", "num_examples", "precision")
    words = ["fnbp train"]
    for name in flags:
        value = config.get(name) if isinstance(config, dict) else None
        if value is not None:
            words.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(words + [f"--out {folder}"])


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes nothing yet: a leftover from a reused pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours
        return True
    return True


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporary files that killed writes left in ``folder``.

    Files of a process that is still running (another run writing into the
    same folder) are left alone. Returns the names removed.
    """
    removed = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.match(name)
        if match and match["name"] in OUTPUTS and not _alive(int(match["pid"])):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def checkpoint_step(folder: str) -> int | None:
    """The step of the checkpoint in ``folder``, or None (none, or unreadable)."""
    from fnbp.train.checkpoint import CheckpointError, read_checkpoint_metadata

    path = os.path.join(folder, CHECKPOINT)
    if not os.path.isfile(path):
        return None
    try:
        step = read_checkpoint_metadata(path)["step"]
    except (CheckpointError, OSError):
        return None
    return step if isinstance(step, int) else None


def kept(saved_step: int | None) -> str:
    """What a failed or stopped run leaves to continue from, in words."""
    if saved_step is None:
        return "no checkpoint was written yet"
    return f"the checkpoint of step {saved_step} is kept"


def write_error(error: OSError, folder: str, path: str, saved_step: int | None
                ) -> RunFolderError:
    """The one-line error for a write into the run folder that failed."""
    if not os.path.isdir(folder):
        return RunFolderError(f"the run folder {folder} was deleted or moved while the run "
                              f"was writing {os.path.basename(path)}; nothing more can be "
                              f"saved, start the run again")
    reason = error.strerror or str(error)
    go_on = (f"free some space and continue with: fnbp train --resume {folder}"
             if saved_step is not None else f"free some space and start the run again "
                                                f"with --out {folder}")
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return RunFolderError(f"cannot write {path}: {reason}; {kept(saved_step)}; {go_on}")
    return RunFolderError(f"cannot write {path} ({reason}); {kept(saved_step)}")


class Progress:
    """What a run has done so far, for the messages of a run that stops early."""

    def __init__(self) -> None:
        self.out: str | None = None
        self.saved_step: int | None = None  # the step of the checkpoint in the run folder
        self.config_written = False
        self.output = Output()

    def write_config(self, run_config: dict[str, Any]) -> None:
        """Write config.json into the run folder."""
        path = os.path.join(self.out, CONFIG)
        with writing(self.out, path, self.saved_step):
            write_json(path, run_config)
        self.config_written = True

    def interrupted(self) -> str:
        """What an interrupted run leaves, and how to go on."""
        # what is on disk: the interrupt may come between a save and its bookkeeping
        saved = None if self.out is None else checkpoint_step(self.out)
        if saved is not None:
            return f"{kept(saved)} (continue with: fnbp train --resume {self.out})"
        if self.out is not None and os.path.isdir(self.out):
            return (f"it stopped before its first checkpoint, so start it again with the "
                    f"same command (its --out {self.out} may be reused)")
        return "nothing was written"

    def diverged(self) -> str:
        """What a diverged run leaves."""
        if self.saved_step is not None:
            return f"{kept(self.saved_step)}, from before the divergence"
        return (f"no checkpoint was written, so start again with a lower --lr (the same "
                f"--out {self.out} may be reused)")


def prepare(progress: Progress, run_config: dict[str, Any]) -> None:
    """Make the run folder, clear it of stale temporary files, and write config.json.

    A run resumed in its own folder keeps the old config.json until its first
    new checkpoint is saved (:meth:`Progress.write_config` then), so that a
    run that fails before (disk full) leaves config and checkpoint matching.
    """
    make_folder(progress.out)
    removed = remove_stale_temporaries(progress.out)
    if removed:
        print(f"fnbp train: removed {len(removed)} temporary file(s) left in {progress.out} "
              f"by an interrupted write", file=sys.stderr)
    if progress.saved_step is None:
        progress.write_config(run_config)


@contextlib.contextmanager
def writing(folder: str, path: str, saved_step: int | None) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` into a one-line :class:`RunFolderError`."""
    try:
        yield
    except OSError as error:
        raise write_error(error, folder, path, saved_step) from None


def make_folder(folder: str) -> None:
    """Create the run folder (and its parents), or a one-line error saying why not."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise RunFolderError(f"cannot create the run folder {folder} "
                             f"({error.strerror or error}); pass an --out in a folder you can "
                             f"write") from None


@contextlib.contextmanager
def warnings_as_lines(prefix: str, category: type[Warning]) -> Iterator[None]:
    """Print each warning of ``category`` raised inside as one line: prefix + message."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", category)
        yield
    for warning in caught:
        if issubclass(warning.category, category):
            print(prefix + " ".join(str(warning.message).split()), file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as an interrupt (the same clean stop as Ctrl-C)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``)."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM as it is
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Output:
    """Standard output that a closed pipe does not break.

    ``fnbp train | head -1`` closes the pipe after the first line; the run
    goes on (its results are in the run folder), the lines after are
    dropped, and :attr:`closed` tells the caller to say so at the end.
    """

    def __init__(self) -> None:
        self.closed = False

    def say(self, text: str) -> None:
        if self.closed:
            return
        try:
            print(text, flush=True)
        except BrokenPipeError:
            self.closed = True
            silence_stdout()


def silence_stdout() -> None:
    """Point standard output at the null device, so that exiting flushes nothing to a
    closed pipe (which Python would report as an ignored BrokenPipeError)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):  # stdout replaced (tests) or closed
        pass


def write_results(progress: Progress, config: dict[str, Any], result: Any, seconds: float,
                  num_test: int, dp: dict[str, Any] | None = None) -> None:
    """metrics.json and plot.png of a finished run, and its summary on standard output.

    With DP-SGD (``dp``: the mechanism as config.json records it), metrics.json
    also holds ``epsilon`` and ``delta`` (the privacy spent by all the run's
    steps) and ``dp``, and a line states them.
    """
    out, final = progress.out, result.history[-1]
    metrics = {"test_loss": final["test_loss"], "test_accuracy": final["test_accuracy"],
               "train_loss": final["train_loss"], "train_accuracy": final["train_accuracy"],
               "epochs": len(result.history), "steps": result.state.step,
               "seconds": seconds}
    if dp is not None:
        metrics.update(epsilon=final["epsilon"], delta=final["delta"], dp=dp)
    metrics["history"] = result.history
    with writing(out, os.path.join(out, "metrics.json"), progress.saved_step):
        write_json(os.path.join(out, "metrics.json"), metrics)
        plot(os.path.join(out, "plot.png"), result.history,
             f"fnbp: {config['model']} on {config['dataset']}, {config['optimizer']} "
             f"lr {config['lr']:g}")
    progress.output.say(f"test accuracy {100 * final['test_accuracy']:.2f}%  test loss "
                        f"{final['test_loss']:.4f}  ({num_test} test examples, "
                        f"{result.state.step} steps, {seconds:.1f} s)")
    if dp is not None:
        progress.output.say(
            f"privacy: epsilon {final['epsilon']:.3g} at delta {final['delta']:g} (DP-SGD, "
            f"{dp_summary(dp)}, {result.state.step} steps; {dp['accountant']})")
    progress.output.say(f"wrote {out}/: config.json metrics.json plot.png {CHECKPOINT}")


def dp_summary(dp: dict[str, Any]) -> str:
    """The DP-SGD settings in words: ``clip C, noise sigma, Poisson sampling q Q``.

    ``dp`` is a run's DP-SGD record (config.json's ``dp``); fnbp train's start
    line and its privacy line both say it.
    """
    return (f"clip {dp['clip_norm']:g}, noise {dp['noise_multiplier']:g}, "
            f"Poisson sampling q {dp['sampling_rate']:.4g}")


def write_json(path: str, document: Any) -> None:
    """Write ``document`` as indented JSON, atomically."""
    from fnbp.train.checkpoint import atomic_write

    text = json.dumps(document, indent=2) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def plot(path: str, history: list[dict[str, Any]], title: str) -> None:
    """plot.png: the loss (log scale) and the accuracy per epoch, train and test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [entry["epoch"] for entry in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-o"), ("test", "-s")):
        if f"{split}_loss" in history[0]:
            loss_axes.plot(epochs, [e[f"{split}_loss"] for e in history], style, label=split)
        if f"{split}_accuracy" in history[0]:
            accuracy_axes.plot(epochs, [100 * e[f"{split}_accuracy"] for e in history], style,
                               label=split)
    loss_axes.set(xlabel="epoch", ylabel="mean cross-entropy loss", title="loss")
    loss_axes.set_yscale("log")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    from fnbp.train.checkpoint import atomic_write

    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100))
    plt.close(figure)
