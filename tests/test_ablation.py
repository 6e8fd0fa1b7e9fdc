"""A tiny ablation run produces the Table-5-shaped markdown, the JSON and the plot."""

import json

import train
from sso_mini.eval.ablation import VARIANTS, markdown, run_ablation


def test_tiny_ablation_writes_table_and_plot(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a fruit.\nSay hello.\nCount to three.\nName a color.\n")
    out = tmp_path / "ablation"
    args = train.parse_args(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--batch-size", "2",
                             "--no-progress"])
    result = run_ablation(train.run, args, out, iterations=1, prompts_per_iteration=4, max_new_tokens=6,
                          ifeval_limit=2, mtbench_limit=2, eval_max_new_tokens=8, judge_samples=1)
    for name in ("ablation.md", "ablation.json", "ablation.png", "evaluations.json"):
        assert (out / name).exists(), name
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [(r["variant"], r["iteration"]) for r in rows] == [("start", 0)] + [(v, 1) for v in VARIANTS]
    table = (out / "ablation.md").read_text()
    assert table.startswith("| variant | iter | length (tokens)") and "PBAA (w/o W, G)" in table
    for r in rows[1:]:
        assert r["onpolicy"] < 0 and 0 <= r["reward_acc"] <= 1 and r["length"] >= 0
    # the four variants trained with the intended switches
    for variant, switches in VARIANTS.items():
        slug = {"SSO": "sso", "w/o W": "no_w", "w/o G": "no_g", "PBAA (w/o W, G)": "pbaa"}[variant]
        config = json.loads((out / slug / "train_config.json").read_text())
        assert config["use_w"] == (not switches["no_w"]) and config["use_g"] == (not switches["no_g"])
    assert json.dumps(result["rows"]) == json.dumps(rows)  # NaN-safe: a tiny judge may cast no vote
    # iteration 0 is sampled and scored once (SSO) and shared: the others start at training
    sso = out / "sso" / "iter_0"
    assert "sample" in json.loads((sso / "timing.json").read_text())
    for slug in ("no_w", "no_g", "pbaa"):
        it = out / slug / "iter_0"
        assert (it / "pairs.jsonl").read_bytes() == (sso / "pairs.jsonl").read_bytes()
        assert (it / "ref_logps.safetensors").read_bytes() == (sso / "ref_logps.safetensors").read_bytes()
        assert "sample" not in json.loads((it / "timing.json").read_text())
        assert json.loads((out / slug / "run.json").read_text())["no_w"] == (slug != "no_g")


def test_table_shows_a_dash_where_the_judge_cast_no_vote():
    row = {"variant": "SSO", "iteration": 1, "length": 10.0, "capped": 0.5, "ifeval_strict": 0.25, "ifeval_se": 0.1,
           "onpolicy": -1.5, "judge_acc": float("nan"), "judge_votes": 0, "sppl_acc": 0.5, "reward_acc": 0.75}
    line = markdown({"rows": [row], "settings": {}}).splitlines()[2]
    assert line == "| SSO | 1 | 10 | 0.50 | 25.0 ± 10.0 | -1.500 | - (0) | 0.50 | 0.75 |"
