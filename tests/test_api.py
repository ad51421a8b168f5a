"""Tests of fnbp's public API: the one re-export list, the version, the floors' imports."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import fnbp

PACKAGE = Path(fnbp.__file__).resolve().parent

# What each floor may not import (docs/design.md#the-floors): a folder is a floor, and
# no import runs back up.
FORBIDDEN = {
    "rules": ("fnbp.nn", "fnbp.train", "fnbp.verify", "fnbp.cli"),
    "nn": ("fnbp.train", "fnbp.verify", "fnbp.cli"),
    "verify": ("fnbp.train", "fnbp.cli"),
    "train": ("fnbp.cli",),
}


def test_version_is_the_installed_metadata():
    assert fnbp.__version__ == importlib.metadata.version("fnbp")


def test_all_is_one_list_of_existing_names():
    assert len(fnbp.__all__) == len(set(fnbp.__all__))
    assert [name for name in fnbp.__all__ if not hasattr(fnbp, name)] == []
    for package in (fnbp.rules, fnbp.nn, fnbp.train, fnbp.verify):
        assert [name for name in package.__all__ if not hasattr(package, name)] == []


def test_top_level_has_the_notes_names_and_the_subpackages():
    for name in (
        "mm",
        "relu",
        "cross_entropy_loss",
        "backward",
        "backprop",
        "per_example_grads",
        "check_vjp",
        "check_layer",
        "checked",
        "mlp",
        "serial",
        "residual",
    ):
        assert name in fnbp.__all__
    for name in ("rules", "nn", "train", "verify", "testing"):
        assert name in fnbp.__all__
    # the types the API returns
    for name in (
        "VJPReport",
        "TrainState",
        "FitResult",
        "Precision",
        "DataError",
        "DataWarning",
        "Layer",
        "Dataset",
        "Checkpoint",
        "CheckpointError",
    ):
        assert isinstance(getattr(fnbp, name), type), name


def test_fwd_and_bwd_live_in_rules_only():
    assert not [name for name in fnbp.__all__ if name.endswith(("_fwd", "_bwd"))]
    assert callable(fnbp.rules.relu_fwd) and callable(fnbp.rules.relu_bwd)
    with pytest.raises(AttributeError):
        fnbp.relu_fwd  # noqa: B018


def test_training_names_at_the_top_are_fnbp_train_s():
    for name in fnbp.train.__all__:
        if name in fnbp.__all__:
            assert getattr(fnbp, name) is getattr(fnbp.train, name), name
    assert fnbp.train.fit is fnbp.train.loop.fit
    assert fnbp.make_train_step is fnbp.train.steps.make_train_step


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


@pytest.mark.parametrize("floor", sorted(FORBIDDEN))
def test_no_import_runs_back_up(floor):
    wrong = [
        (str(path.relative_to(PACKAGE)), name)
        for path in sorted((PACKAGE / floor).glob("*.py"))
        for name in _imports(path)
        if name == "fnbp" or name.startswith(FORBIDDEN[floor])
    ]
    assert wrong == []


def test_nothing_in_the_library_imports_the_cli():
    wrong = [
        (str(path.relative_to(PACKAGE)), name)
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.parent.name != "cli"
        for name in _imports(path)
        if name.startswith("fnbp.cli")
    ]
    assert wrong == []
    code = "import sys, fnbp; print(sorted(m for m in sys.modules if m.startswith('fnbp.cli')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent
    )
    assert out.stdout.strip() == "[]"
