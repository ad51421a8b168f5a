"""Stopping a training run cleanly, at a step boundary, on request or on a signal.

:func:`fnbp.fit` takes ``stop``, a callable checked at every step boundary
(before each step, and after each epoch's history entry and ``on_epoch``):
once it returns true, ``fit`` raises :class:`TrainingStopped` carrying the
state it reached, which continues exactly when passed back as ``fit(...,
state=stopped.state, history=stopped.history)`` or saved as a checkpoint.

:func:`stop_on_signals` turns SIGINT (Ctrl-C) and SIGTERM into such a
request: while inside, their handler only records the signal (it never
raises, so a signal that arrives while JAX runs a callback of its own, a
garbage-collection hook say, is not lost), and the loop acts on it at the next
step boundary. A second signal while the first is pending ends the process at
once, by that signal's default action (the way out of a call that never
returns). Outside the context, and when ``fit`` is called without ``stop``,
Ctrl-C raises ``KeyboardInterrupt`` as Python always does.

Example::

    with fnbp.train.stop_on_signals() as stop:
        try:
            result = fnbp.fit(..., stop=stop)
        except fnbp.train.TrainingStopped as stopped:
            fnbp.save_checkpoint("ckpt.npz", stopped.state.params,
                                 stopped.state.opt_state, step=stopped.state.step)
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any


class TrainingStopped(Exception):
    """:func:`fnbp.fit` stopped at a step boundary because its ``stop`` asked it to.

    Attributes:
      state: the :class:`fnbp.train.TrainState` reached (its step, and the
        running sums of the epoch in progress): ``fit(..., state=state,
        history=history)`` continues exactly as if it had not stopped.
      history: the history entries of the epochs finished so far.
      signum: the signal that asked for the stop (``signal.SIGINT``,
        ``signal.SIGTERM``), or None for another request.
      where: where it stopped, in words ("at step 37 of 400, in epoch 5 of 50").
    """

    def __init__(
        self,
        message: str,
        state: Any = None,
        history: list | None = None,
        signum: int | None = None,
        where: str = "",
    ):
        super().__init__(message)
        self.where = where
        self.state = state
        self.history = list(history or [])
        self.signum = signum


class StopRequest:
    """A stop request that :func:`stop_on_signals` sets; ``fit(..., stop=request)``.

    Calling it says whether a stop was requested; :attr:`signum` is the
    signal that requested it (None: none yet, or :meth:`request` without one).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def request(self, signum: int | None = None) -> None:
        """Ask for the stop (what the signal handler does)."""
        self.signum = signum
        self.requested = True

    def name(self) -> str:
        """The signal's name (``"SIGINT"``), or ``"a stop request"``."""
        if self.signum is None:
            return "a stop request"
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


@contextlib.contextmanager
def stop_on_signals(
    signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[StopRequest]:
    """While inside, ``signals`` request a stop instead of interrupting; yields the request.

    The handler only records the signal (``request.signum``) and returns;
    pass the request as ``fit(..., stop=request)`` and ``fit`` raises
    :class:`TrainingStopped` at the next step boundary. A second signal
    while a stop is pending restores that signal's default action and
    delivers it, which ends the process at once. A signal that is ignored
    (``SIG_IGN``, as under ``nohup``) stays ignored. The previous handlers
    are restored on leaving.

    Outside the main thread, where Python cannot install signal handlers,
    nothing is installed and the request is never set by a signal.

    Args:
      signals: the signals to catch (default SIGINT and SIGTERM).

    Yields:
      The :class:`StopRequest`.
    """
    request = StopRequest()

    def handler(signum: int, frame: Any) -> None:
        if request.requested:  # asked twice: stop now, by the signal's own default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        request.request(signum)

    previous: dict[int, Any] = {}
    try:
        for signum in signals:
            if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored (nohup) stays so
                previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: leave every handler as it was
        _restore(previous)
        previous = {}
    try:
        yield request
    finally:
        _restore(previous)


def _restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        # None: a handler installed from C, which Python cannot reinstall
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def default_signals(signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """While inside, ``signals`` have their default action (SIGINT and SIGTERM end the
    process at once); for a call that blocks where no Python handler can run."""
    previous: dict[int, Any] = {}
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, signal.SIG_DFL)
    except ValueError:  # not the main thread
        _restore(previous)
        previous = {}
    try:
        yield
    finally:
        _restore(previous)


def check(stop: Any, where: str, state: Any = None, history: list | None = None) -> None:
    """Raise :class:`TrainingStopped` if ``stop`` (a callable or None) asks for a stop."""
    if stop is not None and stop():
        signum = getattr(stop, "signum", None)
        by = stop.name() if isinstance(stop, StopRequest) else "a stop request"
        raise TrainingStopped(f"stopped by {by} {where}", state, history, signum, where)
