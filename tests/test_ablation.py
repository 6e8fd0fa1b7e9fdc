"""A tiny ablation: the Table-5-shaped table from its JSON alone, both figures, shared data, resume after SIGKILL."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from sso_mini.eval.ablation import VARIANTS, markdown, run_ablation, slug

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = "Name a fruit.\nSay hello.\nCount to three.\nName a color.\nName a tree.\nSay goodbye.\n"
TINY = dict(iterations=2, prompts_per_iteration=3, eval_prompts=2, max_new_tokens=6, verifier_share=0.5,
            ifeval_limit=3, eval_max_new_tokens=8, judge_samples=1, eval_batch_size=8, lr=1e-3,
            plain_max_new_tokens=10)


def test_tiny_ablation_writes_table_figures_and_json(tiny_model_dir, tmp_path, checked_set):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "ablation"
    argv = ["--model", str(tiny_model_dir), "--prompts", str(prompts), "--batch-size", "2", "--principles",
            str(checked_set), "--no-progress"]
    result = run_ablation(argv, out, **TINY, variants=list(VARIANTS))
    for name in ("ablation.md", "ablation.json", "ablation_signals.png", "ablation_length.png", "evaluations.json"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "ablation.json").read_text())
    rows = saved["rows"]
    assert [(r["variant"], r["iteration"]) for r in rows] == [("start", 0)] + [(v, t) for v in VARIANTS
                                                                            for t in (1, 2)]
    # every number of the table comes from the JSON: the table rebuilt from the file is the file's table
    assert markdown(saved) == (out / "ablation.md").read_text()
    assert json.dumps(result) == json.dumps(saved)
    assert len(saved["comparisons"]) == 18  # every two of the four variants: IFEval and both checked features
    evaluations = json.loads((out / "evaluations.json").read_text())
    for r in rows[1:]:
        assert r["onpolicy_y_pos"] < 0 and r["onpolicy_y_neg"] < 0 and 0 <= r["heldout_acc"] <= 1
        assert r["heldout_n"] == 2 and 0 <= r["eos_rate"] <= 1 and r["signal_checked"] >= 1
        assert 0 <= r["ifeval_prompt_strict"] <= 1 and 0 <= r["ifeval_vs_start_p"] <= 1
        plain = evaluations[f"{slug(r['variant'])}/{r['iteration'] - 1}"]["plain"]
        # the held-out prompts at the plain cap of 10 (random ids re-encode to a few tokens more or fewer)
        assert len(plain["length"]) == 2 and max(plain["length"]) < 20 and not any(plain["ended"])
        assert r["behaviour"]["Short"]["rate"] == sum(plain["passes"]["Short"]) / 2
        assert r["plain_ended"] == sum(plain["ended"]) / 2
    # claim 1 per feature: every iteration's training and held-out pairs of the variant, pooled
    for variant in VARIANTS:
        summaries = [json.loads((out / slug(variant) / f"iter_{t}" / "summary.json").read_text()) for t in (0, 1)]
        parts = [g for s in summaries for g in (s["feature_signal"]["Short"], s["eval"]["feature_signal"]["Short"])]
        assert saved["feature_signal"][variant]["Short"]["decided"] == sum(g["decided"] for g in parts)
    # the variants trained with their switches; iteration 0 was sampled and scored once and shared
    sso = out / "sso" / "iter_0"
    for variant, switches in VARIANTS.items():
        config = json.loads((out / slug(variant) / "train_config.json").read_text())
        assert config["use_w"] == (not switches["no_w"]) and config["use_g"] == (not switches["no_g"])
        it = out / slug(variant) / "iter_0"
        for name in ("pairs.jsonl", "ref_logps.safetensors", "eval_pairs.jsonl", "eval_ref_logps.safetensors"):
            assert (it / name).read_bytes() == (sso / name).read_bytes(), name
        assert ("sample" in json.loads((it / "timing.json").read_text())) == (variant == "SSO")
    assert not any("checks" in json.loads(x) for x in (sso / "pairs.jsonl").read_text().splitlines())  # set checks


def test_table_shows_a_dash_where_nothing_was_decided():
    start = {"variant": "start", "iteration": 0, "length": 10.0, "eos_rate": 0.5, "ifeval_prompt_strict": 0.25,
             "ifeval_prompt_strict_se": 0.1, "ifeval_instruction_strict": 0.5, "ifeval_instruction_strict_se": 0.1,
             "plain_length": 20.0, "plain_ended": 0.5, "behaviour": {}}
    row = {**start, "variant": "SSO", "iteration": 1, "signal_acc": None, "signal_interval": [0.0, 1.0],
           "signal_decided": 0, "onpolicy_y_pos": -1.5, "onpolicy_y_neg": -2.0, "heldout_acc": 0.75,
           "heldout_interval": [0.3, 0.95], "ifeval_vs_start": 0.05, "ifeval_vs_start_p": 0.5,
           "judge_acc": float("nan"), "judge_votes": 0, "sppl_acc": 0.5}
    lines = markdown({"rows": [start, row], "comparisons": [], "settings": {"plain_max_new_tokens": 512},
                      "feature_signal": {}}).splitlines()
    assert lines[2] == "| start | 0 | 10.0 | 0.50 | - | - | - | 25.0 ± 10.0 | 50.0 ± 10.0 | - | - |"
    assert lines[3] == ("| SSO | 1 | 10.0 | 0.50 | - [0.00, 1.00] (0) | -1.500 / -2.000 | 0.75 [0.30, 0.95] | "
                        "25.0 ± 10.0 (+5.0, p 0.50) | 50.0 ± 10.0 | - (0) | 0.50 |")


def ablation_script(tmp_path, kill_in: str | None) -> Path:
    """`python -m sso_mini.eval.ablation` at TINY sizes; with kill_in, each train.py it runs is one that SIGKILLs
    itself at step 2 of that variant's iteration."""
    trainer_script = tmp_path / f"train_{bool(kill_in)}.py"
    trainer_script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        sys.argv = ["train.py"] + sys.argv[1:]
        import train
        real = train.train_epoch
        def patched(model, tokenizer, records, ref, cfg, it, **k):
            if {kill_in!r} and {kill_in!r} in str(it) and not os.path.exists(str(it) + "/model"):
                k["on_step"] = lambda step: step == 2 and os.kill(os.getpid(), signal.SIGKILL)
            return real(model, tokenizer, records, ref, cfg, it, **k)
        train.train_epoch = patched
        sys.exit(train.cli())
    """))
    script = textwrap.dedent(f"""
        import sys
        from sso_mini.eval import ablation, runs
        ablation.settings = lambda scale: {{**{TINY!r}, "variants": ["SSO", "w/o W", "PBAA (w/o W, G)"]}}
        runs.TRAIN = {str(trainer_script)!r}
        ablation.main(sys.argv[1:])
    """)
    path = tmp_path / ("ablation_killed.py" if kill_in else "ablation_whole.py")
    path.write_text(script)
    return path


def test_ablation_resumed_after_sigkill_mid_variant_gives_the_same_json(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def ablation(script, out, *extra):
        return subprocess.run([sys.executable, str(script), "--model", str(tiny_model_dir), "--prompts",
                               str(prompts), "--batch-size", "1", "--save-every", "1", "--no-progress", "--out",
                               str(out), *extra], capture_output=True, text=True, env=env, cwd=tmp_path)

    whole = ablation(ablation_script(tmp_path, None), tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    killed = ablation(ablation_script(tmp_path, "no_w/iter_1"), tmp_path / "cut")
    assert killed.returncode != 0 and "failed (exit -9)" in killed.stderr, killed.stderr
    assert (tmp_path / "cut" / "no_w" / "iter_1" / "resume").is_dir()  # killed mid-variant, mid-epoch
    assert not (tmp_path / "cut" / "ablation.json").exists()
    resumed = ablation(ablation_script(tmp_path, None), tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "cut" / "ablation.json").read_text() == (tmp_path / "whole" / "ablation.json").read_text()
