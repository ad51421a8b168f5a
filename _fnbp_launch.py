"""The ``fnbp`` console script's first lines: SIGINT and SIGTERM are noted while jax imports.

``import fnbp`` imports jax, which takes seconds. A signal that arrives then, with Python's
default handlers, is a ``KeyboardInterrupt`` raised somewhere inside jax's import (a traceback,
once a crash) or the end of the process. This module, which imports nothing but the standard
library, installs handlers that only note the signal, then imports the command line and hands
it the signals noted: ``fnbp train`` turns the first into its stop request (one line, exit
status 128 + the signal, nothing written), every other command acts on it as Python would,
once the import is done. ``python -m fnbp.cli`` does the same without the import's window.
"""

from __future__ import annotations

import signal
import sys


def main() -> int:
    """Entry point of the ``fnbp`` console script; returns the exit status."""
    noted: list[int] = []
    previous: dict[int, object] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN:  # an ignored signal (nohup) stays ignored
            previous[signum] = handler
            signal.signal(signum, lambda number, frame: noted.append(number))
    from fnbp.cli import main as fnbp_main  # imports jax

    return fnbp_main(noted_signals=noted, restore_handlers=previous)


if __name__ == "__main__":
    sys.exit(main())
