"""--recipe v2: a generator learns L+ + L- from the policy and samples its pairs; the policy learns DPO on them."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import train
from sso_mini import trainer
from sso_mini.checkpoint import load_model
from sso_mini.records import read_jsonl
from sso_mini.assets import load_tensors
from sso_mini.trainer import TrainConfig, score_records
from test_train import run_killed, run_train

PROMPTS = ["Name a fruit.", "Say hello.", "Count to three.", "Name a color.", "Give a tip.", "Name a tree.",
           "Say goodbye.", "Name a bird."]


def v2_args(model_dir, prompts, out, *extra):
    return ["--recipe", "v2", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "6", "--batch-size", "2", "--iterations", "1", "--prompts-per-iteration", "6",
            "--eval-prompts", "2", "--verifier-share", "0", "--lr", "1e-3", "--save-every", "1", "--no-autocast",
            "--no-progress",
            *extra]


def weights(folder):
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def whole(tiny_model_dir, tmp_path_factory):
    """One uninterrupted 1-round v2 run, with the model that sampled each training-records file recorded."""
    tmp = tmp_path_factory.mktemp("v2")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS))
    samplers = {}
    real = train.build_records

    def spy(model, tokenizer, prompts, principles, **k):
        records, stats = real(model, tokenizer, prompts, principles, **k)
        samplers.setdefault(k["desc"], []).append({n: p.detach().clone() for n, p in model.state_dict().items()})
        return records, stats

    mp = pytest.MonkeyPatch()
    mp.setattr(train, "build_records", spy)
    try:
        train.main((v2_args(tiny_model_dir, tmp / "prompts.txt", tmp / "run")))
    finally:
        mp.undo()
    return tmp, samplers


def test_v2_trains_a_generator_then_the_policy_on_its_samples(tiny_model_dir, whole):
    tmp, samplers = whole
    run = tmp / "run"
    it = run / "iter_0"
    start, generator = (load_model(p)[0].state_dict() for p in (tiny_model_dir, it / "generator" / "model"))
    assert (it / "model" / "model.safetensors").exists() and (it / "generator" / "summary.json").exists()
    assert any(not torch.equal(generator[k], start[k]) for k in start)  # the generator learned something
    # training records: the generator's first (sampled by the start model), then the policy's, by the generator
    first, second = samplers["training prompts"]
    assert all(torch.equal(first[k], start[k]) for k in start)
    assert all(torch.equal(second[k], generator[k]) for k in generator)
    # held-out records of both stages come from the policy itself
    assert all(all(torch.equal(s[k], start[k]) for k in start) for s in samplers["held-out prompts"])
    # the policy's reference log-probs are the start model's, of the two sequences its loss reads (x: y+, y-) only
    model, tok = load_model(tiny_model_dir)
    records = read_jsonl(it / "pairs.jsonl")
    every = score_records(model, tok, records, TrainConfig(loss_type="dpo", autocast=False), progress=False)  # [R, 6]
    saved = load_tensors(it / "ref_logps.safetensors")["logps"]
    assert torch.allclose(saved[:, :2], every[:, :2]) and saved[:, 2:].isnan().all()
    g_saved = load_tensors(it / "generator" / "ref_logps.safetensors")["logps"]  # the generator's: x+ and x- pairs
    assert g_saved[:, :2].isnan().all() and not g_saved[:, 2:].isnan().any()
    # the policy's loss is DPO on the x pair alone: at its first step (policy = reference) exactly log 2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["unweighted_loss"] == rows[0]["loss"]
    # the generator's loss is L+ + L- (DPO, gamma * SFT): at its first step 2 log 2 + gamma * (its SFT terms)
    g_rows = [json.loads(x) for x in (it / "generator" / "metrics.jsonl").read_text().splitlines()]
    assert g_rows[0]["loss"] > 2 * math.log(2)
    summary, g_summary = (json.loads((p / "summary.json").read_text()) for p in (it, it / "generator"))
    assert summary["recipe"] == {"recipe": "v2", "form": "v1", "use_w": False, "use_g": False}
    assert g_summary["recipe"] == {"recipe": "v2", "form": "generator", "use_w": True, "use_g": True,
                                   "terms": ["pos", "neg"], "neg_chosen": "y_raw"}
    assert summary["eval"]["n"] == 2 and g_summary["eval"]["n"] == 2  # both stages evaluated on held-out records
    config = json.loads((run / "train_config.json").read_text())  # the policy's loss, as trained
    assert (config["use_w"], config["use_g"], config["form"]) == (False, False, "v1")
    run_json = json.loads((run / "run.json").read_text())
    assert (run_json["recipe"], run_json["generator_terms"], run_json["neg_chosen"], run_json["loss"]) == \
        ("v2", "pos,neg", "y_raw", "dpo")


@pytest.mark.parametrize("stage", ["generator", "policy"])
def test_sigkill_in_either_stage_resumes_to_the_same_weights(tiny_model_dir, tmp_path, whole, stage):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    where = "generator" if stage == "generator" else "iter_0"
    patch = f"""
        real = train.train_epoch
        def patched(model, tokenizer, records, ref, cfg, it, **k):
            if str(it).endswith({where!r}):
                k["on_step"] = lambda step: step == 2 and die()
            return real(model, tokenizer, records, ref, cfg, it, **k)
        train.train_epoch = patched
    """
    args = v2_args(tiny_model_dir, tmp_path / "prompts.txt", tmp_path / "cut")
    assert run_killed(tmp_path, patch, *args).returncode == -9
    done = (tmp_path / "cut" / "iter_0" / "generator" / "model").exists()
    assert done == (stage == "policy")  # killed in the stage named
    resumed = run_train(*args, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    for sub in ("iter_0/generator/model", "iter_0/model"):
        a, b = weights(whole[0] / "run" / sub), weights(tmp_path / "cut" / sub)
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def test_neg_chosen_y_neg_puts_y_neg_in_the_place_of_y_raw(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    seen = []
    real = trainer.sso_loss

    def spy(*a, **k):
        seen.append(k.get("terms"))
        return real(*a, **k)

    monkeypatch.setattr(trainer, "sso_loss", spy)
    train.main((v2_args(tiny_model_dir, tmp_path / "prompts.txt", tmp_path / "run", "--neg-chosen", "y_neg",
                                       "--generator-terms", "neg")))
    gen = tmp_path / "run" / "iter_0" / "generator"
    for name in ("pairs.jsonl", "eval_pairs.jsonl"):
        for r in read_jsonl(gen / name):
            assert r["raw"] == r["rejected"] and r["capped"]["raw"] == r["capped"]["rejected"]  # L-: x-: y- > y+
    policy_records = read_jsonl(tmp_path / "run" / "iter_0" / "pairs.jsonl")
    assert any(r["raw"] != r["rejected"] for r in policy_records)  # the policy's own records are untouched
    assert ("neg",) in seen  # the generator trained L- alone
