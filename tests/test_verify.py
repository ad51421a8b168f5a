"""fnbp.check_vjp: no false alarms on the catalog, the report, the oracles, bad input.

The rules checked here are written in this file with plain-jnp references
(the catalog's rules are checked against the catalog's references, which is
what ``fnbp check`` does); the mutation suite is in test_verify_mutations.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp.catalog import CASES
from fnbp.cli.check import FLOAT64_TRANSFORMS
from fnbp.verify import DEFAULT_TOLERANCES, TRANSFORMS, VJPCheck, VJPReport, check_vjp
from fnbp.verify.draws import example_args

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def drawn():
    """float64 draws of the catalog's factories, shared across dtypes."""
    return {}


# --- no false alarms on the built-in rules ------------------------------------------


def _assert_ratio_decides(report):
    """err/tol is the pass/fail number: <= 1 on every passing row, > 1 on a failing one."""
    for row in report.rows:
        assert row.passed == (row.ratio <= 1), row.describe()
    assert (report.worst_ratio <= 1) == report.ok


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_builtin_rule_passes_every_compiled_transform_in_float64(case, drawn):
    args = example_args(case.make_args, "float64", drawn=drawn)
    report = check_vjp(
        case.rule,
        *args,
        reference=case.reference,
        static_kwargs=case.kwargs,
        transforms=FLOAT64_TRANSFORMS,
    )
    report.assert_ok()
    _assert_ratio_decides(report)
    assert report.dtype == "float64"
    covered = {(row.transform, row.oracle) for row in report.rows}
    assert {
        ("jit", "reference"),
        ("jit", "finite diff"),
        ("jit(vmap)", "loop"),
        ("jit(vmap(inputs))", "loop"),
        ("2nd order", "reference"),
        ("2nd order", "finite diff"),
        ("jit", "linearity"),
        ("jit", "zero v"),
        ("jit", "rerun"),
        ("jit", "primal"),
    } <= covered


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_builtin_rule_passes_at_lower_precision(case, dtype, drawn):
    args = example_args(case.make_args, dtype, drawn=drawn)
    report = check_vjp(
        case.rule, *args, reference=case.reference, static_kwargs=case.kwargs, transforms=("jit",)
    )
    report.assert_ok()
    _assert_ratio_decides(report)
    assert report.dtype == dtype
    assert all(row.passed for row in report.rows if row.oracle == "shape/dtype")


@pytest.mark.parametrize("name", ["mm", "relu"])
def test_builtin_rule_passes_the_op_by_op_transforms(name, drawn):
    case = next((c for c in CASES if c.name == name), None)
    if case is None:
        pytest.skip(f"{name} is not in the catalog")
    args = example_args(case.make_args, "float64", drawn=drawn)
    report = check_vjp(
        case.rule,
        *args,
        reference=case.reference,
        static_kwargs=case.kwargs,
        transforms=("eager", "vmap", "vmap(inputs)"),
    )
    report.assert_ok()
    assert {"eager", "vmap", "vmap(inputs)"} <= {row.transform for row in report.rows}


# --- rules written here, with their references ----------------------------------------


@jax.custom_vjp
def cube(z):
    return z * z * z


cube.defvjp(lambda z: (z * z * z, z), lambda z, v: (3 * z * z * v,))


def cube_reference(z):
    return z**3


@jax.custom_vjp
def dense(params, z):
    """u = z W^T + b with params = {"W": (n, m), "b": (n,)}: a pytree argument."""
    return z @ params["W"].T + params["b"]


def dense_fwd(params, z):
    return dense(params, z), (params, z)


def dense_bwd(res, v):
    params, z = res
    return {"W": v.T @ z, "b": v.sum(0)}, v @ params["W"]


dense.defvjp(dense_fwd, dense_bwd)


def dense_reference(params, z):
    return jnp.einsum("em,nm->en", z, params["W"]) + params["b"]


@jax.custom_vjp
def nll(logits, labels):
    """-log softmax(logits)[label] per example: integer labels get no cotangent."""
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]


def nll_fwd(logits, labels):
    return nll(logits, labels), (jax.nn.softmax(logits), labels)


def nll_bwd(res, v):
    p, labels = res
    return (p - jax.nn.one_hot(labels, p.shape[-1], dtype=p.dtype)) * v[:, None], None


nll.defvjp(nll_fwd, nll_bwd)


def nll_reference(logits, labels):
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - jnp.log(jnp.exp(shifted).sum(-1, keepdims=True))
    return -log_p[jnp.arange(labels.shape[0]), labels]


def softsign(z, scale):
    return z / (scale + jnp.abs(z))


def _softsign_primal(z, scale, squared):
    return softsign(z, scale) ** 2 if squared else softsign(z, scale)


softsign_rule = jax.custom_vjp(_softsign_primal, nondiff_argnums=(2,))


def _softsign_fwd(z, scale, squared):
    return _softsign_primal(z, scale, squared), (z, scale)


def _softsign_bwd(squared, res, v):
    z, scale = res
    d = scale + jnp.abs(z)
    dz, dscale = scale / (d * d), -z / (d * d)
    if squared:
        outer = 2 * z / d
        dz, dscale = outer * dz, outer * dscale
    return dz * v, jnp.sum(dscale * v)


softsign_rule.defvjp(_softsign_fwd, _softsign_bwd)


def softsign_reference(z, scale, squared):
    s = z / (scale + jnp.sqrt(z * z))
    return s * s if squared else s


# --- the report -----------------------------------------------------------------------


def test_report_rows_cover_every_argument_transform_and_oracle():
    z = RNG.standard_normal((3, 4))
    report = check_vjp(cube, z, reference=cube_reference)
    report.assert_ok()
    transforms = {row.transform for row in report.rows}
    assert set(TRANSFORMS) <= transforms
    oracles = {row.oracle for row in report.rows}
    assert {
        "reference",
        "finite diff",
        "loop",
        "linearity",
        "zero v",
        "shape/dtype",
        "primal",
        "rerun",
    } <= oracles
    assert {row.argument for row in report.rows} == {"z", "(output)"}
    for row in report.rows:
        assert isinstance(row, VJPCheck)
        assert row.passed


def test_report_is_a_table_a_dict_and_frozen():
    report = check_vjp(cube, RNG.standard_normal(5), reference=cube_reference, transforms=("jit",))
    text = str(report)
    first, header = text.splitlines()[:2]
    assert first.startswith("check_vjp(cube) dtype=float64 backend=")
    assert first.endswith(f"{len(report.rows)}/{len(report.rows)} checks pass")
    for column in (
        "argument",
        "transform",
        "oracle",
        "max abs err",
        "max rel err",
        "worst index",
        "rtol",
        "result",
        "note",
    ):
        assert column in header
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is True and data["function"] == "cube"
    assert len(data["rows"]) == len(report.rows)
    assert set(data["rows"][0]) == {f.name for f in dataclasses.fields(VJPCheck)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.rows = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.rows[0].passed = False


def test_report_of_a_failure_raises_naming_argument_transform_and_oracle():
    row = VJPCheck("W", "jit(vmap)", "loop", 0.5, 0.25, "[1, 2] v3", 1e-10, 1e-12, False)
    report = VJPReport("mm", "float64", "cpu", (row,))
    assert not report.ok and report.failures == (row,)
    with pytest.raises(
        AssertionError,
        match=r"argument 'W', transform 'jit\(vmap\)', oracle 'loop': "
        r"max rel err 2.50e-01 \(max abs err 5.00e-01 at \[1, 2\] v3\)",
    ):
        report.assert_ok()
    assert "FAIL" in str(report)
    data = VJPReport(
        "mm",
        "float64",
        "cpu",
        (dataclasses.replace(row, max_rel_err=float("inf"), max_abs_err=float("nan")),),
    ).to_dict()
    assert json.loads(json.dumps(data, allow_nan=False))["rows"][0]["max_rel_err"] == "inf"


def test_err_over_tol_is_what_the_decision_compares_with_1():
    from fnbp.verify.report import Tolerance, _row

    tol = Tolerance(rtol=1e-4, atol=1e-6)
    # Entries near 0 (a sigmoid far out in float32): a large relative error, a pass on atol.
    tiny = _row(
        "z", "jit", "reference", [("{idx}", np.array([2.5e-45, 0.0]), np.array([1e-45, 0.0]))], tol
    )
    assert tiny.passed and tiny.max_rel_err > 1 and tiny.ratio == pytest.approx(1.5e-39)
    off = _row(
        "z", "jit", "reference", [("{idx}", np.array([3.0, 1e-3]), np.array([3.0, 0.0]))], tol
    )
    assert not off.passed and off.ratio == pytest.approx(1e-3 / (1e-6 + 1e-4 * 3.0))
    for err in (1.9e-4, 2.1e-4):  # either side of atol + rtol * 2 = 2.01e-4
        edge = _row(
            "z", "jit", "reference", [("{idx}", np.array([2.0 + err]), np.array([2.0]))], tol
        )
        assert edge.ratio == pytest.approx(err / 2.01e-4, rel=1e-9)
        assert edge.passed == (err < 2.01e-4)
    shape = _row("z", "jit", "reference", [("{idx}", np.zeros(2), np.zeros(3))], tol)
    assert not shape.passed and shape.ratio == float("inf")
    # A row built by hand gets its err/tol from its numbers.
    row = VJPCheck("W", "jit", "loop", 0.5, 0.25, "[1]", 1e-10, 1e-12, False)
    assert row.err_over_tol == pytest.approx(0.5 / (1e-12 + 2e-10))


def test_check_vjp_and_the_report_are_exported():
    assert fnbp.check_vjp is check_vjp
    assert fnbp.VJPReport is VJPReport


# --- arguments: pytrees, integers, static settings -------------------------------------


def test_pytree_argument_is_one_row_group_named_by_leaf():
    params = {"W": RNG.standard_normal((3, 4)), "b": RNG.standard_normal(3)}
    z = RNG.standard_normal((5, 4))
    report = check_vjp(
        dense,
        params,
        z,
        reference=dense_reference,
        transforms=("eager", "jit", "jit(vmap(inputs))", "2nd order"),
    )
    report.assert_ok()
    assert {row.argument for row in report.rows} == {"params", "z", "(output)"}
    worst = {
        row.worst_index
        for row in report.rows
        if row.argument == "params" and row.oracle == "reference"
    }
    assert all(w.startswith(("['W']", "['b']")) for w in worst)


def test_integer_argument_gets_no_rows_and_float0_cotangent():
    logits = RNG.standard_normal((4, 5))
    labels = np.array([0, 4, 2, 2])
    report = check_vjp(
        nll,
        logits,
        labels,
        reference=nll_reference,
        transforms=("jit", "jit(vmap(inputs))", "2nd order"),
    )
    report.assert_ok()
    assert {row.argument for row in report.rows} == {"logits", "(output)"}


def test_static_kwargs_and_partial_are_the_same_check():
    z = RNG.standard_normal((3, 4))
    scale = np.array(1.5)
    for squared in (False, True):
        report = check_vjp(
            softsign_rule,
            z,
            scale,
            reference=softsign_reference,
            static_kwargs={"squared": squared},
            transforms=("jit", "2nd order"),
        )
        report.assert_ok()
        assert {row.argument for row in report.rows} == {"z", "scale", "(output)"}
        bound = check_vjp(
            functools.partial(softsign_rule, squared=squared),
            z,
            scale,
            reference=functools.partial(softsign_reference, squared=squared),
            transforms=("jit",),
        )
        bound.assert_ok()


# --- dtypes and tolerances ------------------------------------------------------------


def test_default_tolerances_cover_the_four_dtypes():
    assert set(DEFAULT_TOLERANCES) == {"float64", "float32", "bfloat16", "float16"}
    rtols = [DEFAULT_TOLERANCES[d].rtol for d in ("float64", "float32", "float16", "bfloat16")]
    assert rtols == sorted(rtols)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_low_precision_uses_its_tolerance_and_passes(dtype):
    z = jnp.asarray(RNG.uniform(0.5, 1.5, (3, 4)), dtype)
    report = check_vjp(cube, z, reference=cube_reference, transforms=("jit", "2nd order"))
    report.assert_ok()
    assert report.dtype == dtype
    row = next(r for r in report.rows if r.oracle == "reference")
    assert row.rtol == DEFAULT_TOLERANCES[dtype].rtol
    assert 0 < row.max_rel_err < row.rtol  # compared with a float64 reference


def test_tolerance_is_overridable():
    z = jnp.asarray(RNG.uniform(0.5, 1.5, (3, 4)), jnp.float32)
    strict = check_vjp(
        cube, z, reference=cube_reference, transforms=("jit",), rtol=1e-12, atol=1e-30
    )
    assert ("z", "reference") in {(r.argument, r.oracle) for r in strict.failures}
    assert all(r.rtol >= 1e-12 for r in strict.rows if r.oracle == "reference")


def test_float64_oracles_without_global_x64():
    with jax.enable_x64(False):
        z = jnp.asarray(RNG.uniform(0.5, 1.5, (3, 4)), jnp.float32)
        report = check_vjp(cube, z, reference=cube_reference, transforms=("jit",))
        assert not jax.config.jax_enable_x64
    report.assert_ok()
    fd = next(r for r in report.rows if r.oracle == "finite diff")
    assert fd.max_rel_err < 1e-5  # float64 differences, not float32 noise


# --- finite differences and kinks -----------------------------------------------------


def test_finite_differences_alone_catch_a_wrong_rule_without_reference():
    report = check_vjp(cube, RNG.standard_normal(6), transforms=("jit",))
    report.assert_ok()
    assert "reference" not in {row.oracle for row in report.rows}
    half = jax.custom_vjp(lambda z: z * z * z)
    half.defvjp(lambda z: (z * z * z, z), lambda z, v: (1.5 * z * z * v,))
    bad = check_vjp(half, RNG.standard_normal(6), transforms=("jit",))
    assert {(r.argument, r.oracle) for r in bad.failures} == {("z", "finite diff")}
    assert "" in {r.probe for r in bad.failures}  # at the caller's own point too
    assert bad.diagnosis == "off by a constant factor 0.5"


def test_point_at_a_kink_is_reported_not_failed():
    z = np.array([-1.0, 0.0, 0.5, 0.0, 2.0])
    report = check_vjp(fnbp.relu, z, reference=lambda z: jnp.where(z > 0, z, 0.0))
    report.assert_ok()
    fd = [row for row in report.rows if row.oracle == "finite diff" and row.transform == "jit"]
    assert fd and "kink" in fd[0].note
    assert any("kink" in note for note in report.notes)


def test_point_near_a_kink_shrinks_the_step():
    z = np.array([-1.0, 3e-7, 0.5, 2.0])  # 3e-7 is inside the default step (~6e-6)
    report = check_vjp(
        fnbp.relu, z, reference=lambda z: jnp.where(z > 0, z, 0.0), transforms=("jit",)
    )
    report.assert_ok()
    fd = next(row for row in report.rows if row.oracle == "finite diff")
    assert fd.note.startswith("near a kink") and "left out" not in fd.note
    assert fd.max_rel_err < 1e-4


def test_function_without_custom_vjp_is_checked_and_noted():
    report = check_vjp(jnp.sin, RNG.standard_normal(4), reference=jnp.sin, transforms=("jit",))
    report.assert_ok()
    assert any("no jax.custom_vjp" in note for note in report.notes)


def test_same_seed_same_report():
    z = RNG.standard_normal((2, 3))
    a = check_vjp(cube, z, reference=cube_reference, transforms=("jit",), seed=5)
    b = check_vjp(cube, z, reference=cube_reference, transforms=("jit",), seed=5)
    assert a.to_dict() == b.to_dict()


# --- bad input to the verifier --------------------------------------------------------


def test_f_not_callable():
    with pytest.raises(TypeError, match="check_vjp: f must be callable, got int"):
        check_vjp(3, np.ones(3))


def test_reference_not_callable():
    with pytest.raises(TypeError, match="reference must be callable or None, got str"):
        check_vjp(cube, np.ones(3), reference="cube")


def test_args_that_f_rejects():
    z, W = np.ones((5, 4)), np.ones((3, 6))
    with pytest.raises(
        ValueError,
        match=r"f\(\*args\) raised ValueError: mm: z has 4 "
        r"features but W expects 6",
    ):
        check_vjp(fnbp.mm, z, W)


def test_reference_with_another_output_shape():
    with pytest.raises(
        ValueError,
        match=r"the reference returns shape \(\) but cube returns "
        r"shape \(3,\)",
    ):
        check_vjp(cube, np.ones(3), reference=lambda z: jnp.sum(z**3))


def test_reference_that_rejects_the_arguments():
    with pytest.raises(ValueError, match=r"reference\(\*args\) raised TypeError"):
        check_vjp(cube, np.ones(3), reference=lambda z, w: z * w)


def test_non_array_argument_points_to_static_kwargs():
    with pytest.raises(TypeError, match=r"argument 'squared' holds a bool leaf.*static_kwargs"):
        check_vjp(softsign_rule, np.ones(3), np.array(1.0), True)


def test_integer_output_and_no_floating_argument():
    with pytest.raises(TypeError, match="returns a int.* output; check_vjp needs floating"):
        check_vjp(lambda z: jnp.argmax(z), np.ones(3))
    with pytest.raises(ValueError, match="no argument of .* has a floating leaf"):
        check_vjp(lambda n: n * 2.0, np.arange(3))


def test_unknown_transform_and_too_few_directions():
    with pytest.raises(ValueError, match=r"unknown transform\(s\) \['pmap'\]"):
        check_vjp(cube, np.ones(3), transforms=("jit", "pmap"))
    with pytest.raises(ValueError, match="n_directions must be an int >= 2, got 1"):
        check_vjp(cube, np.ones(3), n_directions=1)
    with pytest.raises(TypeError, match="static_kwargs must be a dict"):
        check_vjp(cube, np.ones(3), static_kwargs=[("a", 1)])


@pytest.mark.parametrize("name", ["rtol", "atol", "fd_rtol", "fd_step"])
@pytest.mark.parametrize("value", [-1e-4, 0.0, float("nan"), float("inf"), -float("inf")])
def test_a_tolerance_that_is_not_positive_and_finite_is_refused(name, value):
    # Before: a negative or NaN rtol reported a correct rule as "not linear in v".
    hint = {
        "rtol": "a row passes when max abs err <= atol + rtol * max |want|: pass a "
        "positive value (or None for the dtype's default)",
        "atol": "a row passes when max abs err <= atol + rtol * max |want|: pass a "
        "positive value (or None for the dtype's default)",
        "fd_rtol": "the relative tolerance of the float64 finite differences (default "
        "1e-06): pass a positive value",
        "fd_step": "the central-difference step relative to max(1, max |x|) (default "
        "6.1e-06): pass a positive value",
    }[name]
    message = f"check_vjp: {name} must be a positive finite number, got {value!r}; {hint}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_vjp(cube, np.ones(3), reference=cube_reference, **{name: value})
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_vjp(cube, args=lambda key, dtype: (np.ones(3, dtype),), **{name: value})


def test_a_tolerance_that_is_not_a_number_is_refused():
    with pytest.raises(
        TypeError,
        match=r"^check_vjp: rtol must be a positive number, got "
        r"str '1e-4'$",
    ):
        check_vjp(cube, np.ones(3), rtol="1e-4")
    with pytest.raises(
        TypeError,
        match=r"^check_vjp: atol must be a positive number, got "
        r"bool True$",
    ):
        check_vjp(cube, np.ones(3), atol=True)
    report = check_vjp(
        cube,
        np.ones(3),
        reference=cube_reference,
        transforms=("jit",),
        probes=False,
        rtol=np.float32(1e-8),
        atol=1,
    )
    assert report.ok and {row.atol for row in report.rows if row.oracle == "reference"} == {1.0}


# --- speed-only compile options ------------------------------------------------------


def test_verifier_runs_when_a_compile_option_is_unknown(monkeypatch):
    """An XLA option this jaxlib does not know is skipped, never an error."""
    import fnbp.verify.programs
    from fnbp._compile import supported_options

    unknown = "xla_fnbp_option_that_no_jaxlib_has"
    options = {**fnbp.verify.FAST_COMPILE, unknown: True}
    assert unknown not in supported_options(options)
    monkeypatch.setattr(fnbp.verify.programs, "FAST_COMPILE", options)
    z = jnp.asarray(RNG.normal(size=(3, 4)), jnp.float32)
    report = check_vjp(fnbp.tanh, z, reference=jnp.tanh, transforms=("jit",))
    report.assert_ok()
    assert any(row.transform == "jit" for row in report.rows)


def test_supported_options_keeps_options_that_compile():
    from fnbp._compile import fast_compile_options, supported_options

    assert supported_options({}) == {}
    if jax.default_backend() == "cpu":
        kept = fast_compile_options()
        # At least one of the speed options is known to every supported jaxlib.
        assert kept and set(kept) <= set(fnbp.verify.FAST_COMPILE)
    else:
        assert fast_compile_options() is None


def test_fast_compile_options_do_not_change_what_a_program_computes():
    """vmap(grad) of a 1-D conv/max-pool net, compiled with the verifier's options, equals
    eager execution (XLA:CPU's optimization level 0 once gave errors near 0.5 here)."""
    from fnbp._compile import fast_compile_options

    def conv(w, b, z):  # 'same' cross-correlation, channels last, z (n, L, C)
        zp = jnp.pad(z, ((0, 0), (1, 1), (0, 0)))
        return sum(jnp.einsum("nlc,cd->nld", zp[:, j : j + z.shape[1]], w[j]) for j in range(3)) + b

    def pool(z):  # max over windows of 2
        return jnp.max(z.reshape(z.shape[0], z.shape[1] // 2, 2, z.shape[2]), axis=2)

    def loss(p, x, y):
        a = conv(p["w1"], p["b1"], x[None, :, None])
        h = pool(jnp.where(a > 0, a, 0.0))
        a = conv(p["w2"], p["b2"], h)
        t = pool(jnp.where(a > 0, a, 0.0)).reshape(1, -1) @ p["W"].T
        return (jax.nn.logsumexp(t, axis=-1) - t[:, y])[0]

    rng = np.random.default_rng(0)
    p = {
        "w1": rng.standard_normal((3, 1, 3)),
        "b1": 0.2 * rng.standard_normal(3),
        "w2": rng.standard_normal((3, 3, 4)) / 3,
        "b2": 0.2 * rng.standard_normal(4),
        "W": rng.standard_normal((3, 8)) / 3,
    }
    p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)
    x = jnp.asarray(rng.standard_normal((6, 8)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 6))

    def grads(p, x, y):
        return jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(p, x, y)

    compiled = jax.jit(grads, compiler_options=fast_compile_options())(p, x, y)
    with jax.disable_jit():
        eager = grads(p, x, y)
    for name in p:
        err = float(jnp.max(jnp.abs(compiled[name] - eager[name])))
        scale = float(jnp.max(jnp.abs(eager[name])))
        assert err <= 1e-5 * scale, (name, err, scale)
