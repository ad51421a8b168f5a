"""The ``fnbp`` command line: thin, it parses, calls the library and maps its errors.

The top floor of the package: it imports the library, and nothing in the
library imports it. Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status), and
turns the library's exceptions into one-line messages that name the flags:

- ``fnbp check``: :mod:`fnbp.cli.check`
- ``fnbp train``: :mod:`fnbp.cli.train`

See CONTRIBUTING.md, "Add a CLI subcommand".
"""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

COMMANDS = {
    "check": ("fnbp.cli.check", "verify hand-written rules (built-in or yours) against autodiff"),
    "train": ("fnbp.cli.train", "train a network with hand-written backprop on real data"),
}


def with_flags(message: str, flags: dict[str, str]) -> str:
    """A library message with each backticked argument name (`batch_size`) as its flag.

    The library names the argument at fault in backticks and knows no flags; a
    subcommand passes its table ``{"batch_size": "--batch-size", ...}``. Names
    not in the table keep their backticks.
    """
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(0)), message)


def without_function(message: str) -> str:
    """A library message without the function name it starts with (``fit: ...``).

    The library's messages name the function that raised them, which a command
    line user never called; the flags, once mapped, say what to change.
    """
    return re.sub(r"^[A-Za-z_][\w.]*: ", "", message)


def main(
    argv: Sequence[str] | None = None,
    *,
    noted_signals: list[int] | None = None,
    restore_handlers: Mapping[int, Any] | None = None,
) -> int:
    """Entry point of the ``fnbp`` command line; returns the exit status.

    Args:
      argv: the arguments after ``fnbp`` (default ``sys.argv[1:]``).
      noted_signals: the list into which the console script's first handlers note
        SIGINT/SIGTERM while jax imports (``_fnbp_launch``); ``fnbp train`` takes the
        first as its stop request, any other command acts on it once parsed.
      restore_handlers: the handlers those first handlers replaced, put back on return.
    """
    parser = argparse.ArgumentParser(
        prog="fnbp", description="Hand-written backpropagation on JAX."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(
            subparsers.add_parser(name, help=help_text, description=module.__doc__)
        )
    noted = noted_signals if noted_signals is not None else []
    try:
        args = parser.parse_args(argv)
        if args.command == "train":
            args.noted_signals = noted  # the same list: a signal noted until train's handlers
        else:
            _restore(restore_handlers)
            if noted:  # as Python would have acted on it, now that the import is done
                signal.raise_signal(noted[0])
        return modules[args.command].run(args)
    except BrokenPipeError:
        # stdout piped into a reader that stopped (fnbp check | head -1): one line, no
        # traceback, and nothing more flushed into the closed pipe at exit
        from fnbp.cli._run_folder import silence_stdout

        silence_stdout()
        print(
            f"fnbp {args.command}: error: standard output was closed before all output "
            f"was written (piped into head?); the rest is not printed",
            file=sys.stderr,
        )
        return 2
    finally:
        _restore(restore_handlers)


def _restore(handlers: Mapping[int, Any] | None) -> None:
    for signum, handler in (handlers or {}).items():
        signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
