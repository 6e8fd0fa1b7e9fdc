"""The learning-curve driver: one pool sampled once, every point trained from it, gathered into one table."""

import json

import torch

from sso_mini.eval import learning_curve
from sso_mini.records import read_jsonl
from sso_mini.assets import load_tensors

PROMPTS = ["Name a fruit.", "Say hello.", "Count to three.", "Name a color.", "Give a tip.", "Name a tree."]


def test_points_share_the_pool_and_gather_into_one_table(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    out = tmp_path / "curve"
    result = learning_curve.main(["--out", str(out), "--records", "2,4", "--lrs", "1e-3,1e-4", "--eval-prompts", "2",
                                  "--model", str(tiny_model_dir), "--prompts", "prompts.txt", "--max-new-tokens", "6",
                                  "--batch-size", "1", "--verifier-share", "0", "--no-progress"])
    pool = out / "pool" / "iter_0"
    pool_records = read_jsonl(pool / "pairs.jsonl")
    n_pool = len(pool_records)  # 4 prompts to train on; a record may be dropped as identical
    points = {(p["records"], p["lr"]) for p in result["points"]}
    assert points == {(n_pool, 1e-3), (2, 1e-3), (n_pool, 1e-4), (2, 1e-4)}  # the pool is the first point
    for name in ("ipo_lr0.001_n2", "ipo_lr0.0001_n2"):
        it = out / name / "iter_0"
        assert read_jsonl(it / "pairs.jsonl") == pool_records[:2]
        assert (it / "eval_pairs.jsonl").read_bytes() == (pool / "eval_pairs.jsonl").read_bytes()
        assert torch.equal(load_tensors(it / "ref_logps.safetensors")["logps"],
                           load_tensors(pool / "ref_logps.safetensors")["logps"][:2])
        assert "sample" not in json.loads((it / "timing.json").read_text())  # nothing sampled again
        assert json.loads((out / name / "run.json").read_text())["prompts_per_iteration"] == 2
    assert json.loads((out / "curve.json").read_text()) == json.loads(json.dumps(result))
    table = (out / "curve.md").read_text().splitlines()
    assert table[0].startswith("| loss | lr | records | held-out acc x") and len(table) == 2 + 1 + 4
    assert (out / "curve.png").stat().st_size > 0
    for p in result["points"]:
        assert p["n_eval"] == 2 and 0 <= p["eval_acc"] <= 1 and p["eval_acc_interval"][0] <= p["eval_acc"]
