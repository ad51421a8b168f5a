"""The accelerator benchmark runs end to end at tiny sizes on whatever backend is here.

No timed asserts: only that every figure exists, is finite and positive, for
both dtypes, and that the accelerator check's summary reads what the
benchmark writes.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    """A benchmark script as a module (the folder is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench_gpu_mlp.json"
    figures = load("bench_gpu_mlp").main(
        [
            "--smoke",
            "--hidden",
            "1",
            "--batches",
            "32",
            "--rounds",
            "2",
            "--no-torch",
            "--json",
            str(out),
        ]
    )
    return figures, out


def test_smoke_run_gives_finite_positive_ratios_for_both_dtypes(smoke, capsys):
    figures, _ = smoke
    assert figures["errors"] == [] and figures["skipped"] == []
    assert [(r["batch"], r["dtype"]) for r in figures["rows"]] == [
        (32, "float32"),
        (32, "bfloat16"),
    ]
    for row in figures["rows"]:
        for key in (
            "ratio",
            "aa_ratio",
            "autodiff_ms",
            "fnbp_ms",
            "autodiff_tflops",
            "fnbp_tflops",
            "compile_fnbp_s",
            "compile_autodiff_s",
        ):
            assert math.isfinite(row[key]) and row[key] > 0, (row["dtype"], key, row[key])
        assert row["torch_ms"] is None  # --no-torch
    assert figures["network"] == {
        "input": 64,
        "widths": [64, 10],
        "parameters": 64 * 64 + 64 + 64 * 10 + 10,
    }


def test_smoke_run_writes_the_json_the_summary_reads(smoke):
    figures, out = smoke
    written = json.loads(out.read_text())
    assert written["rows"] == json.loads(json.dumps(figures["rows"]))
    lines = load("accelerator_check").mlp_lines(written)
    assert len(lines) == 1 + len(figures["rows"])
    assert "float32" in lines[1] and "bfloat16" in lines[2] and "A/A" in lines[1]


def test_back_to_back_feeds_the_carry_and_keeps_the_batch():
    timing = load("timing")
    calls = []

    def step(a, b, x):
        calls.append((a, b, x))
        return a + x, b * 2, "loss"

    assert timing.back_to_back(step, 3)(0, 1, 5) == (15, 8, "loss")
    assert calls == [(0, 1, 5), (5, 2, 5), (10, 4, 5)]
    with pytest.raises(ValueError, match="back_to_back: k must be an int >= 1"):
        timing.back_to_back(step, 0)


def test_full_sizes_refuse_a_cpu_with_a_hint(capsys, monkeypatch):
    bench = load("bench_gpu_mlp")
    monkeypatch.setattr(bench.jax, "default_backend", lambda: "cpu")
    with pytest.raises(SystemExit) as exit_info:
        bench.parse([])
    assert exit_info.value.code == 3
    assert "Pass --smoke" in capsys.readouterr().err
    assert bench.parse(["--smoke"]).width == 64


def test_dp_benchmark_smoke_run_measures_every_program_it_has(tmp_path):
    """bench_dp --smoke on the tiny cnn (conv and Linear layers): every program fnbp has
    compiles, runs, agrees and gets a ratio."""
    out = tmp_path / "bench_dp.json"
    figures = load("bench_dp").main(
        ["--smoke", "--nets", "cnn", "--no-torch", "--no-jax-privacy", "--json", str(out)]
    )
    assert [(r["net"], r["batch"]) for r in figures["rows"]] == [("cnn", 4)]
    for row in figures["rows"]:
        assert row["missing"] == {"jax_privacy": "not run (--no-jax-privacy)"}, row["missing"]
        assert set(row["ratios"]) | set(row["missing"]) == {
            "aa",
            "clipped_grads",
            "grad_moments",
            "grad_norms",
            "vmap_clip",
            "vmap_dot",
            "jax_privacy",
        }
        for name, ratio in row["ratios"].items():
            assert math.isfinite(ratio) and ratio > 0, (row["net"], name, ratio)
            assert row["ms"][name] > 0 and row["compile_s"][name] > 0
        # Same quantities, computed two ways (float32, tiny nets).
        for name, err in row["agreement"].items():
            assert err < 1e-4, (row["net"], name, err)
        assert "grad_norms_vs_vmap_norms" in row["agreement"]
    assert figures["rows"][0]["hlo"]["clipped_grads"]["convolutions"] > 0
    assert figures["opacus"] == "not run"
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(figures["rows"]))


def test_curvature_benchmark_smoke_run_gives_every_ratio(tmp_path):
    """bench_curvature --smoke on the tiny MLP and cnn: every program compiles and runs, with
    finite positive ratios, XLA's flop ratios and the K-FAC step against Adam's."""
    out = tmp_path / "bench_curvature.json"
    figures = load("bench_curvature").main(["--smoke", "--no-torch", "--json", str(out)])
    assert [row["net"] for row in figures["rows"]] == ["mlp", "cnn"]
    for row in figures["rows"]:
        assert set(row["ratios"]) == {
            "aa",
            "grad_moments",
            "diag_mc",
            "kfac_mc",
            "diag_exact",
            "kflr",
        }
        for name, ratio in row["ratios"].items():
            assert math.isfinite(ratio) and ratio > 0, (row["net"], name)
        assert math.isfinite(row["kfac_step_over_adam"]) and row["kfac_step_over_adam"] > 0
        assert row["ms_per_step"]["kfac"] > 0 and row["ms_per_step"]["adam"] > 0
    assert figures["backpack"] == "not run (--no-torch)"
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(figures["rows"]))


def test_forward_benchmark_smoke_run_gives_every_ratio(tmp_path):
    """bench_forward --smoke: fnbp.jvp, ggn_vp and hvp against autodiff, finite positive ratios."""
    out = tmp_path / "bench_forward.json"
    figures = load("bench_forward").main(["--smoke", "--json", str(out)])
    assert set(figures["ratios"]) == {"aa", "jvp", "ggn_vp", "hvp"}
    for name, ratio in figures["ratios"].items():
        assert math.isfinite(ratio) and ratio > 0, name
    assert json.loads(out.read_text())["ratios"] == figures["ratios"]
