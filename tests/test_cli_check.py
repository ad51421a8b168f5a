"""`fnbp check`: a PASS row per built-in rule and dtype and exit status 0; 1 on a failure.

The full default matrix (every rule, four dtypes, every transform in float64)
takes a minute or more on a 2-core CPU, too long to run twice in the suite:
the in-process run covers every rule of the catalog at float32 (each checked
against the float64 reference and finite differences), the console script
runs one rule at every dtype.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

import fnbp
from fnbp import cli
from fnbp.catalog import CASES, RuleCase


def _row(name: str, dtype: str, result: str) -> re.Pattern:
    """A table row: rule, dtype, passed/total checks, worst err/tol, seconds, result."""
    checks = r"(\d+)/\1" if result == "PASS" else r"\d+/\d+"
    return re.compile(
        rf"^{re.escape(name)}\s+{dtype}\s+{checks}\s+\S+\s+\S+\s+{result}$", re.MULTILINE
    )


def test_fnbp_check_passes_every_rule_in_the_catalog(capsys):
    assert cli.main(["check", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fnbp check on {jax.default_backend()}")
    for case in CASES:
        row = _row(case.name, "float32", "PASS").search(out)
        assert row, case.name
        # "worst err/tol" is the number the decision compares with 1: at most 1 on a PASS row.
        assert float(row.group(0).split()[-3]) <= 1, row.group(0)
    assert "FAIL" not in out
    assert out.rstrip().endswith("all rules PASS")


@jax.custom_vjp
def _doubled_relu(z):
    return fnbp.relu(z)


_doubled_relu.defvjp(fnbp.rules.relu_fwd, lambda res, v: (2 * fnbp.rules.relu_bwd(res, v)[0],))


def test_fnbp_check_fails_with_status_1_on_a_wrong_rule(capsys, monkeypatch):
    wrong = RuleCase(
        "doubled_relu",
        _doubled_relu,
        lambda z: jnp.where(z > 0, z, 0.0),
        lambda key, dtype: (jnp.array([-1.0, 0.5, 2.0], dtype),),
    )
    monkeypatch.setattr("fnbp.catalog.CASES", (wrong,))
    assert cli.main(["check", "--dtype", "float64", "--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    assert _row("doubled_relu", "float64", "FAIL").search(out)
    assert _row("doubled_relu", "float32", "FAIL").search(out)
    assert out.rstrip().endswith("2 of 2 FAIL")


def test_fnbp_console_script_exits_0():
    script = Path(sys.executable).with_name("fnbp")
    if script.exists():
        command = [str(script)]
    elif shutil.which("fnbp"):
        command = [shutil.which("fnbp")]
    else:
        command = [sys.executable, "-m", "fnbp.cli"]
    done = subprocess.run(command + ["check", "relu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for dtype in ("float64", "float32", "bfloat16", "float16"):
        assert _row("relu", dtype, "PASS").search(done.stdout), dtype
    assert "all rules PASS" in done.stdout
