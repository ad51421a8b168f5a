"""Tests of the fnbp command line itself (fnbp.cli), apart from its subcommands."""

from __future__ import annotations

from fnbp import cli
from fnbp.cli import train as train_command


def test_a_closed_stdout_is_one_line_not_a_traceback(capsys, monkeypatch):
    def run(args):
        print("first line")
        raise BrokenPipeError(32, "Broken pipe")  # as print() into `| head -1` does

    monkeypatch.setattr(train_command, "run", run)
    assert cli.main(["train"]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("fnbp train: error: standard output was closed before all "
                            "output was written (piped into head?); the rest is not printed\n")

