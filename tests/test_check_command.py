"""`fnbp check` as the verifier's command line: built-in rules, --json, your own function."""

from __future__ import annotations

import json
import re
import sys
import textwrap

import pytest

from fnbp import cli
from fnbp.cli.check import FLOAT64_TRANSFORMS, OTHER_TRANSFORMS
from fnbp.verify import TRANSFORMS

CUBE = """
import jax
import jax.numpy as jnp


@jax.custom_vjp
def cube(z):
    return z * z * z


def cube_fwd(z):
    return z * z * z, z


def cube_bwd(z, v):
    return ({factor} * z * z * v,)


cube.defvjp(cube_fwd, cube_bwd)


def reference(z):
    return z ** 3


def example_args(key, dtype):
    return (jax.random.normal(key, (4, 3)).astype(dtype),)
"""

SCALED = """
import jax
import jax.numpy as jnp
import numpy as np


def _primal(z, scale, squared):
    return (scale * z) ** 2 if squared else scale * z


scaled = jax.custom_vjp(_primal, nondiff_argnums=(2,))


def _fwd(z, scale, squared):
    return _primal(z, scale, squared), (z, scale)


def _bwd(squared, res, v):
    z, scale = res
    if squared:
        return 2 * scale * scale * z * v, jnp.sum(2 * scale * z * z * v)
    return scale * v, jnp.sum(z * v)


scaled.defvjp(_fwd, _bwd)


def plain(z, scale, squared):
    u = scale * z
    return u * u if squared else u


def point():
    return np.linspace(-1.0, 1.0, 6), np.array(1.5)
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a module into a temporary current directory; forget it afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_json_has_one_passing_report_per_rule_and_dtype(capsys):
    assert cli.main(["check", "relu", "sigmoid", "--json"]) == 0
    data = _json(capsys)
    assert data["passed"] is True
    cells = {(r["rule"], r["dtype"]) for r in data["results"]}
    assert cells == {
        (rule, dtype)
        for rule in ("relu", "sigmoid")
        for dtype in ("float64", "float32", "bfloat16", "float16")
    }
    for result in data["results"]:
        assert result["passed"] and result["report"]["passed"]
        want = FLOAT64_TRANSFORMS if result["dtype"] == "float64" else OTHER_TRANSFORMS
        assert result["transforms"] == list(want)
        assert {row["transform"] for row in result["report"]["rows"]} == set(want)
        assert all(row["passed"] for row in result["report"]["rows"])


def test_verbose_table_prints_every_check(capsys):
    assert cli.main(["check", "relu", "--dtype", "float32", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^relu\s+float32\s+(\d+)/\1\s+\S+\s+\S+\s+PASS$", out, re.MULTILINE)
    assert "check_vjp(relu) dtype=float32" in out
    assert re.search(r"^z\s+jit\s+reference\s.*PASS", out, re.MULTILINE)
    assert out.rstrip().endswith("all rules PASS")


def test_unknown_rule_exits_2(capsys):
    assert cli.main(["check", "no_such_rule"]) == 2
    err = capsys.readouterr().err
    assert "unknown rule 'no_such_rule'" in err and "MODULE:FUNCTION" in err


def test_your_function_with_module_defaults_passes(user_module, capsys):
    name = user_module("fnbp_user_cube_ok", CUBE.format(factor=3))
    assert cli.main(["check", f"{name}:cube", "--json"]) == 0
    data = _json(capsys)
    assert [r["dtype"] for r in data["results"]] == ["float64", "float32"]
    for result in data["results"]:
        assert result["passed"] and result["transforms"] == list(TRANSFORMS)
        oracles = {row["oracle"] for row in result["report"]["rows"]}
        assert {"reference", "finite diff", "loop"} <= oracles


def test_your_wrong_function_fails_with_status_1_and_says_where(user_module, capsys):
    name = user_module("fnbp_user_cube_wrong", CUBE.format(factor=2))
    assert cli.main(["check", f"{name}:cube", "--dtype", "float64"]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^{name}:cube\s+float64\s+\d+/\d+\s+\S+\s+\S+\s+FAIL$", out, re.MULTILINE)
    assert f"{name}:cube (float64) failing checks:" in out
    assert re.search(r"^z\s+jit\s+reference\s.*FAIL", out, re.MULTILINE)
    assert re.search(r"^z\s+eager\s+finite diff\s.*FAIL", out, re.MULTILINE)
    assert out.rstrip().endswith("1 of 1 FAIL")


def test_your_wrong_function_in_json(user_module, capsys):
    name = user_module("fnbp_user_cube_wrong_json", CUBE.format(factor=2))
    assert cli.main(["check", f"{name}:cube", "--dtype", "float32", "--json"]) == 1
    data = _json(capsys)
    assert data["passed"] is False
    failing = {
        (row["argument"], row["transform"], row["oracle"])
        for row in data["results"][0]["report"]["rows"]
        if not row["passed"]
    }
    assert ("z", "jit", "reference") in failing


def test_flags_give_reference_factory_and_static_settings(user_module, capsys):
    name = user_module("fnbp_user_scaled", SCALED)
    for squared in ("false", "true"):
        assert (
            cli.main(
                [
                    "check",
                    f"{name}:scaled",
                    "--reference",
                    f"{name}:plain",
                    "--args",
                    f"{name}:point",
                    "--kwargs",
                    f'{{"squared": {squared}}}',
                    "--json",
                ]
            )
            == 0
        )
        data = _json(capsys)
        (result,) = data["results"]  # a factory without (key, dtype): one report
        assert result["dtype"] == "float64" and result["passed"]
        arguments = {row["argument"] for row in result["report"]["rows"]}
        assert {"z", "scale"} <= arguments


def test_missing_example_args_and_bad_modules_exit_2(user_module, capsys):
    name = user_module("fnbp_user_no_args", "def f(z):\n    return z\n")
    assert cli.main(["check", f"{name}:f"]) == 2
    assert "define f_args(key, dtype) or example_args(key, dtype)" in capsys.readouterr().err
    assert cli.main(["check", "fnbp_user_does_not_exist:f"]) == 2
    assert "cannot import 'fnbp_user_does_not_exist'" in capsys.readouterr().err
    assert cli.main(["check", f"{name}:g"]) == 2
    assert f"{name!r} has no attribute 'g'" in capsys.readouterr().err
    assert cli.main(["check", f"{name}:f", "--args", f"{name}:f", "--kwargs", "[1"]) == 2
    assert "--kwargs is not JSON" in capsys.readouterr().err


def test_bad_input_to_the_verifier_is_a_failed_row(user_module, capsys):
    source = CUBE.format(factor=3) + "\n\ndef wrong_shape(z):\n    return jnp.sum(z)\n"
    name = user_module("fnbp_user_cube_bad_reference", source)
    assert (
        cli.main(
            ["check", f"{name}:cube", "--reference", f"{name}:wrong_shape", "--dtype", "float64"]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "the reference returns shape () but cube returns shape (4, 3)" in out
    assert out.rstrip().endswith("1 of 1 FAIL")


TWO_RULES = """
import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_vjp
def cube(z):
    return z * z * z


cube.defvjp(lambda z: (z * z * z, z), lambda z, v: (3 * z * z * v,))


@jax.custom_vjp
def halved(z):
    return z * z


halved.defvjp(lambda z: (z * z, z), lambda z, v: (z * v,))   # the bug: 2 z v


def cube_reference(z):
    return z ** 3


def cube_args():
    return (np.linspace(-1.0, 1.0, 5),)


def halved_reference(z):
    return z ** 2


def halved_args():
    return (np.linspace(-1.0, 1.0, 5),)


def plain(z):
    return jnp.sin(z)


def plain_args():
    return (np.linspace(-1.0, 1.0, 5),)
"""


def test_per_function_reference_and_args_and_the_diagnosis(user_module, capsys):
    name = user_module("fnbp_user_two_rules", TWO_RULES)
    assert cli.main(["check", f"{name}:cube", "--transforms", "jit"]) == 0
    capsys.readouterr()
    assert cli.main(["check", f"{name}:halved", "--transforms", "jit"]) == 1
    out = capsys.readouterr().out
    assert "likely bug: off by a constant factor 0.5" in out
    assert re.search(
        rf"^{name}:halved\s+float64\s+\d+/\d+\s+(\S+)\s+\S+\s+FAIL$", out, re.MULTILINE
    ).group(1) not in ("0", "0.0")


def test_rtol_atol_and_transforms_flags(user_module, capsys):
    name = user_module("fnbp_user_two_rules_flags", TWO_RULES)
    assert cli.main(["check", f"{name}:halved", "--transforms", "jit,zero", "--json"]) == 2
    assert "unknown transform(s) ['zero'] in --transforms" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "check",
                f"{name}:halved",
                "--transforms",
                "jit",
                "--rtol",
                "1",
                "--atol",
                "10",
                "--json",
            ]
        )
        == 0
    )
    data = _json(capsys)
    rows = data["results"][0]["report"]["rows"]
    assert {row["transform"] for row in rows} == {"jit"}
    assert all(row["atol"] == 10 for row in rows if row["oracle"] == "reference")


def test_a_function_without_custom_vjp_warns_and_exits_1(user_module, capsys):
    name = user_module("fnbp_user_two_rules_plain", TWO_RULES)
    assert cli.main(["check", f"{name}:plain", "--transforms", "jit"]) == 1
    out = capsys.readouterr().out
    assert f"WARNING: {name}:plain has no jax.custom_vjp rule" in out
    assert "--allow-plain" in out
    assert cli.main(["check", f"{name}:plain", "--transforms", "jit", "--allow-plain"]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_a_module_that_exits_on_import_is_one_line_and_status_2(user_module, capsys):
    name = user_module("fnbp_user_exits", "import sys\nsys.exit(3)\n")
    assert cli.main(["check", f"{name}:f"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert f"importing {name!r}" in captured.err and "sys.exit(3)" in captured.err


@pytest.mark.parametrize("flag", ["--rtol", "--atol"])
@pytest.mark.parametrize("value", ["-1e-4", "-1", "0", "nan", "inf", "tiny"])
def test_a_tolerance_flag_that_is_not_positive_and_finite_exits_2(flag, value, capsys):
    # Before: a negative or NaN --rtol reported every correct rule as "not linear in v".
    with pytest.raises(SystemExit) as done:
        cli.main(["check", "relu", f"{flag}={value}"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"fnbp check: error: argument {flag}: must be a positive finite number, "
        f"got {value!r}" in err
    )


SIGN_AT_ZERO = """
import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_vjp
def absolute(z):
    return jnp.abs(z)


absolute.defvjp(lambda z: (jnp.abs(z), z), lambda z, v: (jnp.sign(z) * v,))


def reference(z):
    return jnp.where(z >= 0, z, -z)     # slope 1 at 0; the rule's sign(0) is 0


def point():
    return (np.array([-1.5, 0.0, 0.7, 0.0, 2.0, -0.4]),)
"""


def test_kinks_flag_accepts_a_subgradient_at_a_kink(user_module, capsys):
    name = user_module("fnbp_user_sign_at_zero", SIGN_AT_ZERO)
    command = ["check", f"{name}:absolute", "--args", f"{name}:point", "--transforms", "jit"]
    assert cli.main(command) == 1
    out = capsys.readouterr().out
    assert (
        "likely bug: differs from the reference's convention at the kink z=0 (yours 0, "
        "reference 1; one-sided derivatives -1 and 1), at 2 entries such as z["
    ) in out
    assert cli.main(command + ["--kinks", "any_subgradient"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("all rules PASS")
