"""The GPU check kit (benchmarks/gpu_kit.py): it packs under a device call's 64 MiB, its dry run measures every stage
on a CPU offline (no cache, no package index) within 3 minutes, and its synthetic model samples as a trained one."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_kit  # noqa: E402


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kit") / "kit"
    subprocess.run([sys.executable, "benchmarks/gpu_kit.py", "pack", str(folder)], cwd=ROOT, check=True)
    return folder


def test_the_kit_fits_a_device_call(kit):
    assert sum(f.stat().st_size for f in kit.rglob("*") if f.is_file()) <= 64 * 2**20
    assert {p.name for p in kit.iterdir()} == {"tokenizer", "prompts.txt", "ended.toml"}


def test_the_dry_run_measures_every_stage_offline(kit, tmp_path):
    env = {**os.environ, "SSO_MINI_CACHE": str(tmp_path / "empty"), "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "benchmarks/gpu_kit.py", "run", str(kit), str(tmp_path / "out"), "--tiny",
                           "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.perf_counter() - start < 180
    assert not (tmp_path / "empty").exists()  # nothing was fetched or cached
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    sampled = results["sampling"]
    assert sampled["rows"] == 8 and all(sampled[c]["tokens"] > 0 and sampled[c]["tokens_per_s"] > 0
                                        for c in ("first", "second"))
    assert sampled["second"]["graphs"] == 0  # eager on a CPU: nothing compiled
    assert sampled["cache_moved"] is False  # the second call sampled in the first one's KV cache
    assert sampled["first"]["tokens"] == sampled["second"]["tokens"]  # one seed, the same answers
    it = results["iteration"]
    assert {"load", "sample", "reference", "train", "save"} <= set(it["seconds"]) and it["train_tokens_per_s"] > 0
    assert it["mfu"] is None and results["checks"] == {"skipped": "no GPU"}  # a CPU has no bf16 peak
    assert (tmp_path / "out" / "iteration.log").read_text().count("[iter_0]") >= 3  # each stage's own output


def test_the_synthetic_model_has_peaked_logits_and_rows_that_end(kit, tmp_path):
    from sso_mini.checkpoint import load_model
    from sso_mini.tokenizer import prompt_ids

    folder = gpu_kit.synthetic_model(kit, tmp_path / "model", True, torch.device("cpu"))
    model, tok = load_model(folder)
    assert len(tok.stop_ids) >= model.config.vocab_size // 100  # 1% of the vocabulary ends a row
    ids = torch.tensor([prompt_ids(tok, "", "Name a fruit.")])
    with torch.no_grad():
        logits = model(ids)[0]  # [T, V]
    assert logits.std(-1).mean().item() == pytest.approx(4.0, rel=0.2)
    probs = (logits / 0.7).softmax(-1).sort(-1, descending=True).values  # train.py's temperature
    nucleus = ((probs.cumsum(-1) - probs) < 0.8).sum(-1)  # top-p 0.8
    assert nucleus.float().median().item() < 256  # the sampler's common path: the nucleus within its candidates


def test_a_stage_out_of_time_is_recorded_and_the_next_still_runs(kit, tmp_path):
    gpu_kit.run(kit, tmp_path / "out", True, torch.device("cpu"), budgets={"sampling": 0.5})
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["sampling"]["failed"] == "stopped after 0.5 s"
    assert results["iteration"]["train_tokens_per_s"] > 0


def test_a_stage_out_of_time_stops_with_the_processes_it_started(kit, tmp_path):
    """The iteration stage runs train.py in a process of its own: stopped at its limit, the stage goes with it (one
    process group), so no train.py goes on alone, holding the GPU (read from /proc: Linux)."""
    gpu_kit.run(kit, tmp_path / "out", True, torch.device("cpu"), budgets={"iteration": 5})
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["iteration"]["failed"] == "stopped after 5 s"
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().decode(errors="replace") if proc.name.isdigit() else ""
        except OSError:  # (a process that ended meanwhile)
            continue
        if "train.py" in command and str(kit) in command:
            alive.append(command.replace("\0", " "))
    assert alive == []
