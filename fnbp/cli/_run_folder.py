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
- A run folder is owned by one run at a time (:class:`RunLock`): a second
  run on a folder that a live run holds is refused in one line, whether it
  would start a new run there or resume it. The lock is ``fcntl.flock`` on
  the file ``.fnbp-train.lock`` in the folder, which the kernel releases when
  the process ends however it ends (a SIGKILL included), so a killed run never
  leaves it stuck; a run that ends removes the file.
- A closed standard output (``fnbp train | head -1``) does not stop the run
  (:class:`Output`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

CHECKPOINT = "checkpoint.npz"
CONFIG = "config.json"
LOCK = ".fnbp-train.lock"
OUTPUTS = (CHECKPOINT, CONFIG, "metrics.json", "plot.png")
# fnbp.train.checkpoint.atomic_write's temporary files: .<name>.<pid>.<8 hex digits>.tmp
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


class RunFolderError(Exception):
    """A run folder that cannot be used or written; printed as one line, exit status 2."""


def out_folder(
    out_arg: str | None,
    config: dict[str, Any],
    checkpoint: str | None,
    words: str = "",
    probe: bool = True,
) -> str:
    """The run folder; checked here, created only once everything else is valid.

    ``--out`` as given, or the folder of the resumed checkpoint, or a new
    ``runs/<dataset>-<model>-seed<seed>`` (numbered if taken, when it is made:
    :func:`claim_numbered`). With ``probe``, a folder that a live run holds
    is refused first (:func:`check_not_in_use`; ``words`` names it).
    """
    if out_arg is None and checkpoint is not None:
        out = os.path.dirname(os.path.abspath(checkpoint))
        if probe:
            check_not_in_use(out, words)
        return out
    if out_arg is not None:
        out = check_out(out_arg)
        if probe:
            check_not_in_use(out, words)
        resuming_here = (
            checkpoint is not None and os.path.dirname(os.path.abspath(checkpoint)) == out
        )
        if os.path.exists(out) and not resuming_here:
            if not os.path.isdir(out):
                raise RunFolderError(f"--out {out_arg} is a file; pass a folder")
            if unstarted_run(out):  # stopped before its first checkpoint
                print(
                    f"fnbp train: --out {out_arg} holds a run that stopped before its "
                    f"first checkpoint; starting a run there again",
                    file=sys.stderr,
                )
            elif contents(out):
                raise RunFolderError(
                    f"--out {out_arg} already holds files; choose a new "
                    f"folder, or pass --resume {out_arg} to continue that run"
                )
        return out
    # numbered when taken, by claim_numbered, once the run is valid
    return os.path.abspath(
        os.path.join("runs", f"{config['dataset']}-{config['model']}-seed{config['seed']}")
    )


def check_out(out_arg: str) -> str:
    """The absolute ``--out`` path, refused at once when it lies under a file."""
    out = os.path.abspath(out_arg)
    parent = os.path.dirname(out)
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunFolderError(
            f"--out {out_arg}: {parent} is a file, not a folder, so no run "
            f"folder can be made under it; pass another --out"
        )
    return out


def contents(folder: str) -> list[str]:
    """The names in ``folder`` that belong to a run (all but the lock file)."""
    try:
        return sorted(name for name in os.listdir(folder) if name != LOCK)
    except OSError:
        return []


def folder_state(folder: str) -> Any:
    """What a run folder holds, to tell whether another run changed it meanwhile.

    The names of the run's files (not the lock, not temporaries) and the
    identity of its checkpoint (inode, size, modification time).
    """
    names = frozenset(name for name in contents(folder) if not is_temporary(name))
    try:
        info = os.stat(os.path.join(folder, CHECKPOINT))
        checkpoint = (info.st_ino, info.st_size, info.st_mtime_ns)
    except OSError:
        checkpoint = None
    return names, checkpoint


def is_temporary(name: str) -> bool:
    """A temporary file of an interrupted write of one of the run's outputs."""
    match = _TEMPORARY.match(name)
    return match is not None and match["name"] in OUTPUTS


def unstarted_run(folder: str) -> bool:
    """The folder of a run stopped before its first checkpoint: config.json and temporaries."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return CONFIG in names and all(name in (CONFIG, LOCK) or is_temporary(name) for name in names)


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
    removed: list[str] = []
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


def write_error(error: OSError, folder: str, path: str, saved_step: int | None) -> RunFolderError:
    """The one-line error for a write into the run folder that failed."""
    if not os.path.isdir(folder):
        return RunFolderError(
            f"the run folder {folder} was deleted or moved while the run "
            f"was writing {os.path.basename(path)}; nothing more can be "
            f"saved, start the run again"
        )
    reason = error.strerror or str(error)
    go_on = (
        f"free some space and continue with: fnbp train --resume {folder}"
        if saved_step is not None
        else f"free some space and start the run again with --out {folder}"
    )
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

    @property
    def folder(self) -> str:
        """``out``, for what writes into the run folder (chosen before anything is written)."""
        if self.out is None:
            raise RuntimeError("fnbp train: the run folder is used before it is chosen")
        return self.out

    def write_config(self, run_config: dict[str, Any]) -> None:
        """Write config.json into the run folder."""
        path = os.path.join(self.folder, CONFIG)
        with writing(self.folder, path, self.saved_step):
            write_json(path, run_config)
        self.config_written = True

    def interrupted(self) -> str:
        """What an interrupted run leaves, and how to go on."""
        # what is on disk: the interrupt may come between a save and its bookkeeping
        saved = None if self.out is None else checkpoint_step(self.out)
        if saved is not None:
            return f"{kept(saved)} (continue with: fnbp train --resume {self.out})"
        if self.out is not None and os.path.isdir(self.out):
            return (
                f"it stopped before its first checkpoint, so start it again with the "
                f"same command (its --out {self.out} may be reused)"
            )
        return "nothing was written"

    def diverged(self) -> str:
        """What a diverged run leaves."""
        if self.saved_step is not None:
            return f"{kept(self.saved_step)}, from before the divergence"
        return (
            f"no checkpoint was written, so start again with a lower --lr (the same "
            f"--out {self.out} may be reused)"
        )


def prepare(
    progress: Progress, run_config: dict[str, Any], words: str, before: Any, numbered: bool = False
) -> RunLock:
    """Make the run folder, take its lock, clear it of stale temporary files, and write
    config.json; returns the lock, for the caller to release when the run ends.

    The lock is taken before anything is written into the folder, and the
    folder is then checked to be as it was when the run checked it
    (``before``, a :func:`folder_state`): a run that started or ended there
    meanwhile is never mixed with this one. A ``numbered`` folder (the
    default ``runs/<dataset>-<model>-seed<seed>``) is created exclusively,
    with the next free number (``-2``, ``-3``, ...) when taken;
    ``progress.out`` and ``run_config["out"]`` then say which.

    A run resumed in its own folder keeps the old config.json until its first
    new checkpoint is saved (:meth:`Progress.write_config` then), so that a
    run that fails before (disk full) leaves config and checkpoint matching.
    """
    if numbered:
        progress.out = run_config["out"] = claim_numbered(progress.folder)
    else:
        make_folder(progress.folder)
    lock = RunLock(progress.folder)
    lock.acquire(words)
    try:
        if not numbered and folder_state(progress.folder) != before:
            raise RunFolderError(
                f"{words}: the run folder changed while this run was "
                f"starting (another fnbp train run wrote into it); run the "
                f"command again"
            )
        _clean_and_configure(progress, run_config)
    except BaseException:
        lock.release()
        raise
    return lock


def _clean_and_configure(progress: Progress, run_config: dict[str, Any]) -> None:
    removed = remove_stale_temporaries(progress.folder)
    if removed:
        print(
            f"fnbp train: removed {len(removed)} temporary file(s) left in {progress.out} "
            f"by an interrupted write",
            file=sys.stderr,
        )
    if progress.saved_step is None:
        progress.write_config(run_config)


@contextlib.contextmanager
def writing(folder: str, path: str, saved_step: int | None) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` into a one-line :class:`RunFolderError`."""
    try:
        yield
    except OSError as error:
        raise write_error(error, folder, path, saved_step) from None


def claim_numbered(base: str) -> str:
    """Create ``base``, or ``base-2``, ``base-3``, ... if taken; return the one made.

    ``os.mkdir`` is exclusive, so two runs started together get two folders.
    """
    make_folder(os.path.dirname(base))
    out, number = base, 1
    while True:
        try:
            os.mkdir(out)
            return out
        except FileExistsError:
            number += 1
            out = f"{base}-{number}"
        except OSError as error:
            raise RunFolderError(
                f"cannot create the run folder {out} "
                f"({error.strerror or error}); pass an --out in a folder you "
                f"can write"
            ) from None


def make_folder(folder: str) -> None:
    """Create the run folder (and its parents), or a one-line error saying why not."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise RunFolderError(
            f"cannot create the run folder {folder} "
            f"({error.strerror or error}); pass an --out in a folder you can "
            f"write"
        ) from None


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
            warnings.showwarning(
                warning.message, warning.category, warning.filename, warning.lineno
            )


class RunLock:
    """The lock of a run folder, so that one ``fnbp train`` run at a time writes it.

    :meth:`acquire` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``folder/.fnbp-train.lock``
    (created if needed) and writes the holder's process id and host into it;
    :meth:`release` removes the file and lets the lock go. A process that
    dies, even by SIGKILL, releases it with its last file descriptor, so a
    file left by a killed run is taken over by the next one. Where the file
    system has no ``flock`` (some network file systems), POSIX record locks
    (``fcntl.lockf``) are used; where it has neither, the run goes on without
    the lock, with a warning.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK)
        self._descriptor: int | None = None

    def acquire(self, words: str) -> None:
        """Take the lock, or raise :class:`RunFolderError` naming the run that holds it.

        ``words`` names the folder as the user gave it ("--out runs/a").
        """
        for attempt in range(20):
            try:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as error:
                raise write_error(error, self.folder, self.path, None) from None
            locked = _lock(descriptor, exclusive=True)
            if locked is None:
                print(
                    f"fnbp train: warning: the file system of {self.folder} supports no "
                    f"file locks, so nothing keeps a second run from writing into it "
                    f"meanwhile",
                    file=sys.stderr,
                )
                self._descriptor = descriptor
                return
            if not locked:
                holder = _holder(descriptor)
                os.close(descriptor)
                if attempt < 4:  # a short-lived probe, or a run that is just ending
                    time.sleep(0.02)
                    continue
                raise RunFolderError(in_use(words, holder))
            if _same_file(descriptor, self.path):
                break
            os.close(descriptor)  # removed by a run that ended meanwhile: take a new one
        else:  # pragma: no cover - the file replaced twenty times over
            raise RunFolderError(in_use(words, None))
        self._descriptor = descriptor
        record = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        )
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, record.encode("utf-8") + b"\n", 0)
        except OSError:  # the lock holds without its note
            pass

    def release(self) -> None:
        """Remove the lock file (while still holding it) and let the lock go."""
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is None:
            return
        try:
            if _same_file(descriptor, self.path):
                os.unlink(self.path)
        except OSError:  # the folder is gone: nothing to clean
            pass
        os.close(descriptor)


def check_not_in_use(folder: str, words: str) -> None:
    """Refuse at once a folder that a live run holds; writes nothing.

    The lock itself is taken later (:meth:`RunLock.acquire`), when the run
    writes its first file; this probe (a shared lock, let go at once) saves a
    second run its start-up.
    """
    path = os.path.join(folder, LOCK)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if _lock(descriptor, exclusive=False) is False:
            raise RunFolderError(in_use(words, _holder(descriptor)))
    finally:
        os.close(descriptor)  # and with it the shared lock


def in_use(words: str, holder: str | None) -> str:
    """The one-line refusal of a folder that another run holds."""
    who = f" ({holder})" if holder else ""
    return (
        f"{words} is in use by another fnbp train run{who}; wait for it to end (a run "
        f"that is stopped keeps its last checkpoint, for --resume), or pass another --out"
    )


def _lock(descriptor: int, exclusive: bool) -> bool | None:
    """Try to lock without waiting: True taken, False held by another, None unsupported."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None
    unsupported = {
        errno.ENOLCK,
        errno.EOPNOTSUPP,
        errno.ENOSYS,
        errno.EINVAL,
        getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
    }
    for lock in (fcntl.flock, fcntl.lockf):
        try:
            lock(descriptor, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            if not exclusive:  # a probe: let go at once
                lock(descriptor, fcntl.LOCK_UN)
            return True
        except (BlockingIOError, PermissionError):  # EWOULDBLOCK, EAGAIN, EACCES (lockf)
            return False
        except OSError as error:
            if error.errno not in unsupported and error.errno != errno.EBADF:
                raise
    return None


def _same_file(descriptor: int, path: str) -> bool:
    try:
        mine, named = os.fstat(descriptor), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


def _holder(descriptor: int) -> str | None:
    """The run that holds the lock, in words ("process 123 on host h, since ..."), if known."""
    try:
        record = json.loads(os.pread(descriptor, 4096, 0).decode("utf-8"))
        return f"process {int(record['pid'])} on {record['host']}, since {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


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


def write_results(
    progress: Progress,
    config: dict[str, Any],
    result: Any,
    seconds: float,
    num_test: int,
    dp: dict[str, Any] | None = None,
) -> None:
    """metrics.json and plot.png of a finished run, and its summary on standard output.

    With DP-SGD (``dp``: the mechanism as config.json records it), metrics.json
    also holds ``epsilon`` and ``delta`` (the privacy spent by all the run's
    steps) and ``dp``, and a line states them.
    """
    out, final = progress.folder, result.history[-1]
    metrics = {
        "test_loss": final["test_loss"],
        "test_accuracy": final["test_accuracy"],
        "train_loss": final["train_loss"],
        "train_accuracy": final["train_accuracy"],
        "epochs": len(result.history),
        "steps": result.state.step,
        "seconds": seconds,
    }
    if dp is not None:
        metrics.update(epsilon=final["epsilon"], delta=final["delta"], dp=dp)
    metrics["history"] = result.history
    with writing(out, os.path.join(out, "metrics.json"), progress.saved_step):
        write_json(os.path.join(out, "metrics.json"), metrics)
        plot(
            os.path.join(out, "plot.png"),
            result.history,
            f"fnbp: {config['model']} on {config['dataset']}, {config['optimizer']} "
            f"lr {config['lr']:g}",
            lr=config["lr"],
        )
    progress.output.say(
        f"test accuracy {100 * final['test_accuracy']:.2f}%  test loss "
        f"{final['test_loss']:.4f}  ({num_test} test examples, "
        f"{result.state.step} steps, {seconds:.1f} s)"
    )
    if dp is not None:
        progress.output.say(
            f"privacy: epsilon {final['epsilon']:.3g} at delta {final['delta']:g} (DP-SGD, "
            f"{dp_summary(dp)}, {result.state.step} steps; {dp['accountant']})"
        )
    progress.output.say(f"wrote {out}/: config.json metrics.json plot.png {CHECKPOINT}")


def dp_summary(dp: dict[str, Any]) -> str:
    """The DP-SGD settings in words: ``clip C, noise sigma, Poisson sampling q Q``.

    ``dp`` is a run's DP-SGD record (config.json's ``dp``); fnbp train's start
    line and its privacy line both say it.
    """
    return (
        f"clip {dp['clip_norm']:g}, noise {dp['noise_multiplier']:g}, "
        f"Poisson sampling q {dp['sampling_rate']:.4g}"
    )


def write_json(path: str, document: Any) -> None:
    """Write ``document`` as indented JSON, atomically."""
    from fnbp.train.checkpoint import atomic_write

    text = json.dumps(document, indent=2) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def plot(path: str, history: list[dict[str, Any]], title: str, lr: float | None = None) -> None:
    """plot.png: the loss (log scale) and the accuracy per epoch, train and test; with
    ``--track-sharpness``, a third panel: the sharpness per epoch and 2/lr (the value
    full-batch gradient descent's sharpness rises to, Cohen et al. 2021)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [entry["epoch"] for entry in history]
    sharp = [e for e in history if "sharpness" in e]
    figure, panels = plt.subplots(1, 3 if sharp else 2, figsize=(15 if sharp else 10, 4))
    loss_axes, accuracy_axes = panels[0], panels[1]
    if sharp:
        panels[2].plot([e["epoch"] for e in sharp], [e["sharpness"] for e in sharp], "-o")
        if lr:
            panels[2].axhline(2 / lr, color="gray", linestyle="--", label=f"2/lr = {2 / lr:g}")
            panels[2].legend()
        panels[2].set(xlabel="epoch", ylabel="largest GGN eigenvalue", title="sharpness")
        panels[2].grid(alpha=0.3)
    for split, style in (("train", "-o"), ("test", "-s")):
        if f"{split}_loss" in history[0]:
            loss_axes.plot(epochs, [e[f"{split}_loss"] for e in history], style, label=split)
        if f"{split}_accuracy" in history[0]:
            accuracy_axes.plot(
                epochs, [100 * e[f"{split}_accuracy"] for e in history], style, label=split
            )
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
