"""The walkthrough notebooks run top to bottom on the real model, and are committed clean.

Each notebook is executed in a fresh Jupyter kernel with nbclient, from the notebooks/
folder (as a student opening it in Jupyter would). The kernel is the interpreter running
these tests: a kernel spec named "python3" pointing at sys.executable is written to a
temporary folder that JUPYTER_PATH puts first, so a user's or system's own "python3"
spec (possibly another Python without torch) is never picked up.
"""

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("01_transformer.ipynb", "02_sampling.ipynb", "03_logprobs.ipynb", "04_sso_objective.ipynb",
             "05_sso_loop.ipynb", "06_the_effect.ipynb", "07_exercises.ipynb")
CELL_TIMEOUT_S = 600


def test_all_notebooks_present():
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    """Outputs and execution counts make noisy diffs and go stale; the tests produce them."""
    nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{name}: code cells {dirty} have outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_has_a_plot(name):
    nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    assert any("plt." in cell.source for cell in nb.cells if cell.cell_type == "code"), f"{name}: no matplotlib plot"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, monkeypatch_module):
    spec_dir = tmp_path_factory.mktemp("jupyter") / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (sso-mini tests)",
        "language": "python",
        "env": {"HF_HUB_OFFLINE": "1"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch_module.setenv("JUPYTER_PATH", str(spec_dir.parent.parent) + os.pathsep + os.environ.get("JUPYTER_PATH", ""))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_env):
    """Every cell runs without error and at least one figure is drawn."""
    nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    print(f"{name}: {time.perf_counter() - t0:.1f} s")
    images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if "image/png" in out.get("data", {})]
    assert images, f"{name}: ran, but drew no figure"
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_rendered_copy_is_current(name):
    """docs/notebooks/ holds each notebook executed (python notebooks/render.py), for readers who do not run
    it: same cells, same code, and the outputs a run produced, figures included."""
    source = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    rendered = nbformat.read(NOTEBOOKS_DIR.parent / "docs" / "notebooks" / name, as_version=4)
    assert [(c.cell_type, c.source) for c in rendered.cells] == [(c.cell_type, c.source) for c in source.cells], (
        f"{name} changed since it was rendered: run python notebooks/render.py {name}")
    code = [c for c in rendered.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"docs/notebooks/{name}: not every cell ran"
    assert any("image/png" in out.get("data", {}) for c in code for out in c.outputs), f"{name}: no figure"
    assert not any(out.output_type == "error" for c in code for out in c.outputs)
