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
    assert captured.err == (
        "fnbp train: error: standard output was closed before all "
        "output was written (piped into head?); the rest is not printed\n"
    )


def test_with_flags_names_the_flag_of_each_backticked_argument():
    message = "`batch_size` must be a positive integer; `seed` and `other` as given"
    flags = {"batch_size": "--batch-size", "seed": "--seed"}
    assert cli.with_flags(message, flags) == (
        "--batch-size must be a positive integer; --seed and `other` as given"
    )


def test_without_function_drops_the_library_function_name():
    assert cli.without_function("make_mesh: `devices` 3: only 1 device is present") == (
        "`devices` 3: only 1 device is present"
    )
    assert cli.without_function("dataset 'npz' is read from a file: x") == (
        "dataset 'npz' is read from a file: x"
    )


def test_library_data_errors_reach_the_user_in_flags(capsys):
    assert cli.main(["train", "--dataset", "npz", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        "fnbp train: error: dataset 'npz' is read from a file; pass its --data-path\n"
    )
