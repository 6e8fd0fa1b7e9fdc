"""Execute every walkthrough notebook and write the executed copy, outputs and figures included, to
docs/notebooks/, so that a reader sees them without running anything. The notebooks in this folder stay
without outputs (small diffs); tests/test_notebooks.py fails when a copy's code differs from its notebook's.

    python notebooks/render.py [NAME.ipynb ...]      (from the repository root; all notebooks by default)
"""

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
RENDERED = HERE.parent / "docs" / "notebooks"


def render(name: str, timeout: int = 900) -> Path:
    nb = nbformat.read(HERE / name, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(HERE)}}).execute()
    RENDERED.mkdir(parents=True, exist_ok=True)
    out = RENDERED / name
    nbformat.write(nb, out)
    return out


def main(names):
    for name in names or sorted(p.name for p in HERE.glob("*.ipynb")):
        start = time.perf_counter()
        print(f"{render(name)} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
