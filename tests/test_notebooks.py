"""The tutorial notebooks run top to bottom and draw their figures.

Every notebook in ``notebooks/`` is executed in a fresh kernel with nbclient,
from the notebooks folder (so relative paths work as in Jupyter). The kernel
runs this interpreter: a kernel spec pointing at ``sys.executable`` is written
to a temporary ``JUPYTER_PATH``, so an unrelated ``python3`` kernel installed
elsewhere is never picked up.

Each notebook asserts facts in its own cells (hand-written gradients against
``jax.grad``/``jax.vjp`` of plain jnp code in float64, accuracy bounds after
training, the verifier catching a bug), so a notebook whose results go wrong
fails here. Each saves its figures as PNG files into ``$FNBP_FIGURES`` (by
default a folder under the system temp dir, never the repository); the test
points it at a temporary folder and checks that every expected figure is
there and is a non-trivial PNG. The committed notebooks carry no outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

FIGURES = {
    "01_backward_functions": ["activations.png", "conv1d_Q.png"],
    "02_algorithm3_by_hand": ["algorithm3.png"],
    "03_verify_your_own_vjp": ["log_cosh_bug.png"],
    "04_training": [
        "spirals_curves.png",
        "spirals_boundary.png",
        "digits_curves.png",
        "digits_confusion.png",
    ],
    "05_per_example_gradients": ["per_example_norms.png"],
    "06_performance": ["ratios.png", "depth.png"],
    "07_curvature": ["kfac_vs_adam.png", "reliability.png"],
    "08_sharpness": ["sharpness.png"],
}
"""The figures each notebook must write, by notebook."""

KERNEL = "fnbp-test-python"
CELL_TIMEOUT_S = 300
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


@pytest.fixture
def kernel_for_this_interpreter(tmp_path, monkeypatch) -> str:
    """A kernel spec named KERNEL that starts ipykernel with sys.executable."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "fnbp tests",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def test_notebooks_all_listed():
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_committed_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    for cell in _code_cells(nb):
        assert cell.outputs == [], f"{name}: a code cell has outputs; strip them"
        assert cell.execution_count is None, f"{name}: a code cell has an execution count"


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_asserts_facts_and_saves_figures(name):
    sources = "\n".join(cell.source for cell in _code_cells(_read(name)))
    assert "\nassert " in sources or sources.startswith("assert "), f"{name} asserts nothing"
    assert 'matplotlib.use("Agg")' in sources
    assert 'os.environ.get("FNBP_FIGURES", os.path.join(tempfile.gettempdir()' in sources, (
        f"{name}: figures must default to a folder under the temp dir, never the repository"
    )
    for figure in FIGURES[name]:
        assert f'"{figure}"' in sources, f"{name} never saves {figure}"


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs(name, tmp_path, monkeypatch, kernel_for_this_interpreter):
    figures = tmp_path / "figures"
    monkeypatch.setenv("FNBP_FIGURES", str(figures))
    nb = _read(name)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=kernel_for_this_interpreter,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    outputs = [out for cell in _code_cells(nb) for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    for figure in FIGURES[name]:
        path = figures / figure
        assert path.is_file(), f"{name} did not write {figure}"
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE, f"{figure} is not a PNG"
        assert len(data) > 2000, f"{figure} is nearly empty ({len(data)} bytes)"
    shown = [
        out for out in outputs if out.output_type == "display_data" and "image/png" in out.data
    ]
    assert len(shown) >= len(FIGURES[name]), f"{name} displayed fewer figures than it saved"
