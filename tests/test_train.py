"""The SSO loop: trainer mechanics, train.py end to end, resume after SIGKILL, bad input."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from sso_mini import trainer
from sso_mini.batches import record_groups
from sso_mini.checkpoint import load_model
from sso_mini.settings import build_parser, parse_args, settle
from sso_mini.records import read_jsonl
from sso_mini.tokenizer import end_of_turn_id
from sso_mini.trainer import TrainConfig, TrainingError, score_records, train_epoch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Name a fruit.", "Say hello.", "Count to three.", "Name a color.", "Give a tip.", "Name a tree."]


def records_for_overfit():
    return [
        {"prompt": "Name a fruit.", "system": "", "p_system": "Answer helpfully.", "n_system": "Answer rudely.",
         "chosen": "An apple is a tasty fruit.", "rejected": "No. Figure it out yourself.", "raw": "Apple."},
        {"prompt": "Say hello.", "system": "", "p_system": "Be warm.", "n_system": "Be cold.",
         "chosen": "Hello! It is lovely to meet you.", "rejected": "What do you want?", "raw": "Hello."},
    ]


def test_overfit_two_records_drives_all_three_accuracies_to_one(smollm2, tmp_path):
    model, tok = load_model("SmolLM2-135M-Instruct")  # a private copy: this test changes the weights
    records = records_for_overfit()
    cfg = TrainConfig(lr=1e-4, batch_size=2, micro_batch_size=2, warmup_ratio=0.0, save_every=1000)
    ref = score_records(model, tok, records, cfg, progress=False)
    history = []
    for epoch in range(12):
        history += train_epoch(model, tok, records, ref, cfg, tmp_path / f"e{epoch}", progress=False)
        last = history[-1]
        if all(last[f"{p}rewards/accuracies"] == 1.0 for p in ("", "p_", "n_")) and epoch >= 2:
            break
    assert all(last[f"{p}rewards/accuracies"] == 1.0 for p in ("", "p_", "n_")), last
    assert last["rewards/margins"] > 0 and last["n_rewards/margins"] > 0
    assert history[-1]["loss"] < history[0]["loss"]


def test_micro_batches_give_the_same_update_as_one_batch(tiny_model_dir, tmp_path):
    records = records_for_overfit()
    weights, history = [], []
    # one record per forward, both in one, both by a token budget that holds them, each alone by one too small
    for k, (micro, budget) in enumerate(((1, None), (2, None), (1, 10_000), (2, 8))):
        model, tok = load_model(tiny_model_dir)
        cfg = TrainConfig(lr=1e-3, batch_size=2, micro_batch_size=micro, tokens_per_micro_batch=budget,
                          save_every=1000, autocast=False)
        ref = score_records(model, tok, records, cfg, progress=False)
        history.append(train_epoch(model, tok, records, ref, cfg, tmp_path / f"m{k}", progress=False)[0])
        weights.append(model.state_dict())
    for h, w in zip(history[1:], weights[1:]):
        # Adam ignores the gradient's scale, so the accumulated gradient is checked through its norm
        for key in ("loss", "grad_norm", "W", "rewards/margins", "n_rewards/margins"):
            assert h[key] == pytest.approx(history[0][key], rel=1e-5), key
        for name in weights[0]:
            torch.testing.assert_close(w[name], weights[0][name], rtol=0, atol=1e-5)


def test_bf16_autocast_scores_close_to_fp32(smollm2):
    model, tok = smollm2
    records = records_for_overfit()
    fp32 = score_records(model, tok, records, TrainConfig(autocast=False), progress=False)  # [2, 6]
    bf16 = score_records(model, tok, records, TrainConfig(autocast=True), progress=False)
    eot = end_of_turn_id(tok)
    n = torch.stack([trainer.score(model, record_groups(tok, r, 2048, eot), False)[1]
                     for r in records])  # [2, 6] scored tokens
    assert not torch.equal(bf16, fp32)  # the matmuls did run in bf16
    assert ((bf16 - fp32).abs() / n).max() < 0.1  # nats per token (measured: up to 0.06)


@pytest.mark.parametrize("mixed", [False, True])
def test_first_step_rewards_are_exactly_zero(tiny_model_dir, tmp_path, mixed):
    """Before the first update the policy is the reference: the training forward must score
    bit-identically to the reference pass (same precision, same packing)."""
    model, tok = load_model(tiny_model_dir)
    cfg = TrainConfig(batch_size=2, save_every=1000, autocast=mixed)
    ref = score_records(model, tok, records_for_overfit(), cfg, progress=False)
    first = train_epoch(model, tok, records_for_overfit(), ref, cfg, tmp_path, progress=False)[0]
    for p in ("", "p_", "n_"):
        assert first[f"{p}rewards/chosen"] == 0.0 and first[f"{p}rewards/rejected"] == 0.0, p


def test_non_finite_loss_names_the_step_and_keeps_the_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    model, tok = load_model(tiny_model_dir)
    records = records_for_overfit() * 3
    cfg = TrainConfig(batch_size=1, save_every=2)
    ref = score_records(model, tok, records, cfg, progress=False)
    real, calls = trainer.sso_loss, []

    def poisoned(*a, **k):
        loss, metrics = real(*a, **k)
        calls.append(1)
        if len(calls) == 4:
            return loss * float("nan"), {**metrics, "loss": float("nan")}
        return loss, metrics

    monkeypatch.setattr(trainer, "sso_loss", poisoned)
    with pytest.raises(TrainingError, match="non-finite loss at iteration 0 step 3"):
        train_epoch(model, tok, records, ref, cfg, tmp_path, progress=False)
    state = json.loads((tmp_path / "resume" / "state.json").read_text())
    assert state["step"] == 2  # the last good checkpoint is intact


def run_train(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          env=env)


def loop_args(model_dir, prompts_file, out, *extra):
    """A tiny run; no held-out prompts unless `extra` says --eval-prompts N (the last flag wins)."""
    return ["--model", str(model_dir), "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "6",
            "--batch-size", "2", "--eval-prompts", "0", "--no-progress", *extra]


def test_two_iterations_write_every_file_and_chain_the_weights(tiny_model_dir, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    loaded = []
    real_load = train.load_model
    monkeypatch.setattr(train, "load_model", lambda p, **k: (loaded.append(Path(p)), real_load(p, **k))[1])
    out = tmp_path / "run"
    train.main(loop_args(tiny_model_dir, prompts, out, "--iterations", "2", "--prompts-per-iteration", "4",
                         "--eval-prompts", "2"))
    for name in ("run.json", "train_config.json", "metrics.jsonl"):
        assert (out / name).exists(), name
    from sso_mini.eval import report
    assert report.main([str(out)]) == 0 and (out / "metrics.png").exists()  # the table and plot, from the folder
    native = trainer.bf16_is_native(torch.device("cpu"))  # the default precision is decided once, and recorded
    assert json.loads((out / "run.json").read_text())["autocast"] is native
    assert json.loads((out / "train_config.json").read_text())["autocast"] is native
    held_out = set()
    for t in (0, 1):
        for name in ("pairs.jsonl", "data_stats.json", "ref_logps.safetensors", "summary.json", "timing.json",
                     "eval_pairs.jsonl", "eval_data_stats.json", "eval_ref_logps.safetensors", "eval_logps.safetensors",
                     "model/config.json", "model/model.safetensors", "model/tokenizer.json"):
            assert (out / f"iter_{t}" / name).exists(), (t, name)
        assert not (out / f"iter_{t}" / "resume").exists()
        seconds = json.loads((out / f"iter_{t}" / "summary.json").read_text())["seconds"]
        assert set(seconds) == {"load", "sample", "reference", "train", "save", "eval_sample", "eval_reference",
                                "eval_score", "total"}
        assert seconds["total"] == pytest.approx(sum(v for k, v in seconds.items() if k != "total"), abs=0.2)
        eval_prompts = {r["prompt"] for r in read_jsonl(out / f"iter_{t}" / "eval_pairs.jsonl")}
        held_out |= eval_prompts
        assert len(eval_prompts) == 2
    # the same two prompts are held out in every iteration, and never trained on
    assert len(held_out) == 2 and held_out <= set(PROMPTS)
    for t in (0, 1):
        trained_on = {r["prompt"] for r in read_jsonl(out / f"iter_{t}" / "pairs.jsonl")}
        assert trained_on and not trained_on & held_out, t
    # after the last iteration the final policy answers the held-out prompts once more
    final = json.loads((out / "final" / "summary.json").read_text())
    assert final["iteration"] == 2 and final["generation"]["n"] == 2
    assert {r["prompt"] for r in read_jsonl(out / "final" / "generation.jsonl", required=("prompt", "raw"))} == held_out
    # iteration 1 samples from, and is referenced by, the weights iteration 0 saved; the final sample uses iteration 1's
    assert loaded == [tiny_model_dir, out / "iter_0" / "model", out / "iter_1" / "model"]
    start, _ = real_load(tiny_model_dir)
    after, tok = real_load(out / "iter_0" / "model")
    assert not torch.equal(start.layers[0].mlp.up_proj.weight, after.layers[0].mlp.up_proj.weight)
    records = [json.loads(line) for line in (out / "iter_1" / "pairs.jsonl").read_text().splitlines()]
    expected = score_records(after, tok, records, TrainConfig(autocast=native), progress=False)
    torch.testing.assert_close(load_file(out / "iter_1" / "ref_logps.safetensors")["logps"], expected)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["split"], r["step"]) for r in rows] == [
        (0, "train", 1), (0, "train", 2), (0, "eval", 2), (1, "train", 1), (1, "train", 2), (1, "eval", 2),
        (2, "final", 0)]
    for key in ("loss", "unweighted_loss", "W", "lr", "grad_norm", "tokens_per_s", "rewards/chosen", "p_rewards/margins",
                "n_logps/rejected", "rewards/accuracies", "policy_is_reference"):
        assert key in rows[0]
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
                "eval_rewards/rejected", "eval_p_rewards/accuracies", "eval_n_rewards/margins",
                "generation/mean_length", "generation/eos_rate"):
        assert key in rows[2], key
    # training accuracy leaves out step 1, where the policy still is the reference (every reward 0)
    assert [r["policy_is_reference"] for r in rows if r["split"] == "train"] == [True, False, True, False]
    for t, step_2 in ((0, rows[1]), (1, rows[4])):
        summary = json.loads((out / f"iter_{t}" / "summary.json").read_text())
        assert summary["steps_at_reference"] == 1
        for key, metric in (("acc", "rewards/accuracies"), ("p_acc", "p_rewards/accuracies"),
                            ("n_acc", "n_rewards/accuracies")):
            assert summary[key] == step_2[metric]
    # nothing is pickled: every file is JSON, JSONL, safetensors, PNG or tokenizer text
    for f in out.rglob("*"):
        if f.is_file():
            assert f.suffix in (".json", ".jsonl", ".safetensors", ".png"), f
            assert not f.read_bytes()[:2] == b"\x80\x04"


def run_killed(tmp_path, patch: str, *args):
    """train.py with a function wrapped by `patch`, which may call die(): SIGKILL, no cleanup."""
    script = textwrap.dedent("""
        import os, signal, sys
        sys.argv = ["train.py"] + sys.argv[1:]
        import train
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
    """) + textwrap.dedent(patch) + "\nsys.exit(train.cli())\n"  # as `python train.py` runs
    (tmp_path / "killer.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(tmp_path / "killer.py"), *args], capture_output=True, text=True,
                          env=env)


KILLED_AFTER_STEP_5 = """
    real = train.train_epoch
    def patched(*a, **k):
        k["on_step"] = lambda step: step == 5 and die()
        return real(*a, **k)
    train.train_epoch = patched
"""


def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    common = ["--prompts-per-iteration", "6", "--iterations", "1", "--batch-size", "1", "--save-every", "2"]
    whole = run_train(*loop_args(tiny_model_dir, prompts, tmp_path / "whole", *common), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    killed = run_killed(tmp_path, KILLED_AFTER_STEP_5, *loop_args(tiny_model_dir, prompts, tmp_path / "cut", *common))
    assert killed.returncode == -9, killed.stderr  # SIGKILL: no cleanup ran
    n_pairs = len((tmp_path / "cut" / "iter_0" / "pairs.jsonl").read_text().splitlines())
    assert n_pairs >= 5  # so step 5 was mid-iteration
    assert json.loads((tmp_path / "cut" / "iter_0" / "resume" / "state.json").read_text())["step"] == 4
    resumed = run_train(*loop_args(tiny_model_dir, prompts, tmp_path / "cut", *common, "--resume"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "whole" / "iter_0" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "iter_0" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa
    assert [r["loss"] for r in rows("cut")] == [r["loss"] for r in rows("whole")]  # no step logged twice


def test_bad_cli_input_gives_one_clear_line(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]))
    r = run_train("--form", "v3", cwd=tmp_path)
    assert r.returncode == 2 and "unknown --form 'v3'" in r.stderr
    r = run_train("--loss", "kto", cwd=tmp_path)
    assert r.returncode == 2 and "unknown --loss 'kto'" in r.stderr
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "raw": "d", "p_system": "e",
                                 "n_system": "f"}) + "\n" + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    r = run_train("--model", str(tiny_model_dir), "--pairs", str(pairs), "--out", str(tmp_path / "o1"), cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "pairs.jsonl:2: missing or non-string field(s) p_system, n_system, rejected, raw" in r.stderr
    assert not (tmp_path / "o1" / "iter_0" / "pairs.jsonl").exists()
    first = run_train(*loop_args(tiny_model_dir, prompts, tmp_path / "o2", "--iterations", "1"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = run_train(*loop_args(tiny_model_dir, prompts, tmp_path / "o2", "--iterations", "1", "--lr", "1e-3"),
                      cwd=tmp_path)
    assert again.returncode != 0 and "already holds a run: pass --resume" in again.stderr
    changed = run_train(*loop_args(tiny_model_dir, prompts, tmp_path / "o2", "--iterations", "1", "--lr", "1e-3",
                                   "--resume"), cwd=tmp_path)
    assert changed.returncode != 0 and "different settings (lr)" in changed.stderr
    r = run_train("--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o3"), cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing'}: no such model folder"


def test_offline_pairs_mode_trains_without_sampling(tiny_model_dir, tmp_path, monkeypatch):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records_for_overfit()))
    monkeypatch.setattr(train, "build_records", lambda *a, **k: pytest.fail("sampled in --pairs mode"))
    train.main(["--model", str(tiny_model_dir), "--pairs", str(pairs), "--out", str(tmp_path / "run"),
                "--batch-size", "1", "--no-progress"])
    assert (tmp_path / "run" / "iter_0" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "iter_1").exists()
    assert json.loads((tmp_path / "run" / "iter_0" / "summary.json").read_text())["eval"] is None  # default: off


def test_offline_pairs_mode_holds_out_records_of_the_file(tiny_model_dir, tmp_path, monkeypatch):
    pairs = tmp_path / "pairs.jsonl"
    records = records_for_overfit() + [{**r, "prompt": r["prompt"] + " Again."} for r in records_for_overfit()]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(train, "build_records", lambda *a, **k: pytest.fail("sampled in --pairs mode"))
    out = tmp_path / "run"
    train.main(["--model", str(tiny_model_dir), "--pairs", str(pairs), "--out", str(out), "--batch-size", "1",
                "--eval-prompts", "1", "--no-progress"])
    held, trained = (read_jsonl(out / "iter_0" / name) for name in ("eval_pairs.jsonl", "pairs.jsonl"))
    assert len(held) == 1 and held[0] in records and held[0] not in trained
    assert trained == [r for r in records if r != held[0]]  # the rest keep the file's order
    summary = json.loads((out / "iter_0" / "summary.json").read_text())
    assert summary["eval"]["n"] == 1
    assert summary["generation"] is None and not (out / "final").exists()  # the file's y^o are not the policy's


def test_lora_run_saves_a_merged_plain_folder(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]))
    out = tmp_path / "lora"
    train.main(loop_args(tiny_model_dir, prompts, out, "--iterations", "1", "--lora", "--lora-rank", "4",
                         "--lr", "1e-2"))
    # the reference is the frozen base: equal to scoring with the untouched start model
    start, tok = load_model(tiny_model_dir)
    records = [json.loads(line) for line in (out / "iter_0" / "pairs.jsonl").read_text().splitlines()]
    torch.testing.assert_close(load_file(out / "iter_0" / "ref_logps.safetensors")["logps"],
                               score_records(start, tok, records, TrainConfig(autocast=trainer.bf16_is_native(torch.device("cpu"))), progress=False))
    saved = load_file(out / "iter_0" / "model" / "model.safetensors")
    assert not any("lora" in k for k in saved)  # adapters merged into plain HF keys
    assert not torch.equal(saved["model.layers.0.self_attn.q_proj.weight"], start.layers[0].self_attn.q_proj.weight)
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "hi"}])])
    merged, _ = load_model(out / "iter_0" / "model")
    hf = AutoModelForCausalLM.from_pretrained(out / "iter_0" / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, merged(ids), rtol=1e-4, atol=1e-4)


def test_unknown_lora_target_is_a_clear_error(tmp_path):
    r = run_train("--lora", "--lora-targets", "q_proj,qkv", cwd=tmp_path)
    assert r.returncode == 2 and "unknown --lora-targets qkv" in r.stderr


# --- held-out evaluation --------------------------------------------------------------------


def ipo_metrics_by_hand(policy, ref, lengths, beta=0.2, theta=0.1, alpha=0.66):
    """The v1 SSO loss with IPO and its rewards, written out from the formula: [R, 6] sums -> floats."""
    pi, rf = policy / lengths, ref / lengths  # per-token means
    out, losses = {}, []
    for prefix, c, r in (("", 0, 1), ("p_", 2, 3), ("n_", 4, 5)):
        chosen, rejected = beta * (pi[:, c] - rf[:, c]), beta * (pi[:, r] - rf[:, r])
        h = (pi[:, c] - rf[:, c]) - (pi[:, r] - rf[:, r])
        losses.append((h - 1 / (2 * beta)) ** 2)
        out[f"eval_{prefix}rewards/chosen"] = chosen.mean().item()
        out[f"eval_{prefix}rewards/rejected"] = rejected.mean().item()
        out[f"eval_{prefix}rewards/margins"] = (chosen - rejected).mean().item()
        out[f"eval_{prefix}rewards/accuracies"] = (chosen > rejected).float().mean().item()
    W = torch.sigmoid(-(alpha * pi[:, 0] + (1 - alpha) * pi[:, 1]))
    out["eval_loss"] = (W * (losses[0] + theta * (losses[1] + losses[2]))).mean().item()
    out["eval_W"] = W.mean().item()
    return out


def test_eval_metrics_equal_a_recomputation_from_the_saved_files(tiny_model_dir, tmp_path):
    from sso_mini.batches import collate, is_capped, record_sequences
    from reference import sequence_logprobs

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "run"
    train.main(loop_args(tiny_model_dir, prompts, out, "--iterations", "1", "--prompts-per-iteration", "2",
                         "--eval-prompts", "4", "--lr", "1e-2", "--no-autocast"))
    it = out / "iter_0"
    records = read_jsonl(it / "eval_pairs.jsonl")
    model, tok = load_model(it / "model")
    seqs = [s for r in records for s in record_sequences(tok, r)]  # padded rows: not the trainer's packed path
    batch = collate(seqs, tok.pad_id)
    with torch.no_grad():
        logp, n = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    policy, lengths = logp.view(-1, 6), n.view(-1, 6).float()
    ref = load_file(it / "eval_ref_logps.safetensors")["logps"]
    expected = ipo_metrics_by_hand(policy, ref, lengths)
    summary = json.loads((it / "summary.json").read_text())
    assert summary["eval"]["n"] == len(records) >= 3
    assert expected["eval_rewards/margins"] != 0  # the policy did move
    for key, value in expected.items():
        assert summary["eval"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # the policy's own behaviour: its plain answers y^o to the held-out prompts
    gen = summary["generation"]
    assert gen["mean_length"] == pytest.approx(sum(len(tok.encode(r["raw"])) for r in records) / len(records))
    assert gen["eos_rate"] == pytest.approx(sum(not is_capped(r, "raw") for r in records) / len(records))
    eval_row, final_row = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-2:]
    assert eval_row["split"] == "eval" and eval_row["eval_loss"] == summary["eval"]["eval_loss"]
    assert final_row["split"] == "final" and final_row["iteration"] == 1


def test_lr_zero_gives_exactly_zero_eval_rewards_and_no_training_accuracy(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "run"
    train.main(loop_args(tiny_model_dir, prompts, out, "--iterations", "1", "--prompts-per-iteration", "4",
                         "--eval-prompts", "2", "--lr", "0"))
    summary = json.loads((out / "iter_0" / "summary.json").read_text())
    for p in ("", "p_", "n_"):
        for k in ("chosen", "rejected", "margins", "accuracies"):
            assert summary["eval"][f"eval_{p}rewards/{k}"] == 0.0, (p, k)  # the policy still is the reference
    # every step had policy = reference: no step counts toward the training accuracy
    assert summary["steps_at_reference"] == 2 and summary["acc"] is None and summary["n_acc"] is None


KILLED_IN_THE_HELD_OUT_PASS = """
    real = train.score_records
    def patched(*a, **k):
        if k.get("cache") is not None and k["cache"].name == "eval_logps.safetensors":
            die()
        return real(*a, **k)
    train.score_records = patched
"""


def test_resume_after_sigkill_in_the_eval_pass_gives_the_same_summary(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    common = ["--prompts-per-iteration", "3", "--iterations", "2", "--eval-prompts", "3"]
    whole = run_train(*loop_args(tiny_model_dir, prompts, tmp_path / "whole", *common), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    killed = run_killed(tmp_path, KILLED_IN_THE_HELD_OUT_PASS,
                        *loop_args(tiny_model_dir, prompts, tmp_path / "cut", *common))
    assert killed.returncode == -9, killed.stderr
    cut = tmp_path / "cut" / "iter_0"
    assert (cut / "model" / "model.safetensors").exists() and not (cut / "summary.json").exists()
    resumed = run_train(*loop_args(tiny_model_dir, prompts, tmp_path / "cut", *common, "--resume"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    def without_timings(path):
        s = json.loads(path.read_text())
        return {k: v for k, v in s.items() if k not in ("seconds", "sample_tokens_per_s", "train_tokens_per_s")}

    for part in ("iter_0/summary.json", "iter_1/summary.json"):
        assert without_timings(tmp_path / "cut" / part) == without_timings(tmp_path / "whole" / part), part
    assert (json.loads((tmp_path / "cut" / "final" / "summary.json").read_text())["generation"]
            == json.loads((tmp_path / "whole" / "final" / "summary.json").read_text())["generation"])
    value = {"train": "loss", "eval": "eval_loss", "final": "generation/mean_length"}
    rows = lambda run: [(r["iteration"], r["split"], r["step"], r[value[r["split"]]])  # noqa: E731
                        for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
    assert rows("cut") == rows("whole")  # one eval row per iteration, none twice


def test_too_many_eval_prompts_fail_before_anything_is_loaded_or_written(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]))
    r = run_train(*loop_args(tiny_model_dir, prompts, tmp_path / "o", "--eval-prompts", "4"), cwd=tmp_path)
    assert r.returncode == 2  # a usage error, from the real process
    assert r.stderr.strip().splitlines() == [
        "error: --eval-prompts 4 leaves none of the 4 prompts to train on (allowed: 0 to 3)"]
    assert not (tmp_path / "o").exists()


def test_every_flag_is_in_the_readme_cli_table():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## CLI reference"):readme.index("Other entry points")]
    flags = [o for a in build_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    missing = [f for f in flags if f"`{f}`" not in table and f"`{f} " not in table]  # `--prompts FILE`
    assert not missing, missing



def test_cli_defaults_are_the_train_config_defaults(tiny_model_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    s = settle(parse_args(["--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.txt")]))
    args, cfg = s.flags, TrainConfig()
    assert s.stages["policy"].autocast == args.autocast == trainer.bf16_is_native(torch.device("cpu"))
    for flag, field in (("loss", "loss_type"), ("form", "form"), ("theta", "theta"), ("alpha", "alpha"),
                        ("beta", "beta"), ("lr", "lr"), ("batch_size", "batch_size"), ("seed", "seed"),
                        ("micro_batch_size", "micro_batch_size"), ("cutoff", "cutoff"),
                        ("save_every", "save_every")):
        assert getattr(args, flag) == getattr(cfg, field), flag


# --- faults survived: each ends in weights equal to an uninterrupted run's ----------------------


FAULT_ARGS = ["--prompts-per-iteration", "6", "--iterations", "1", "--batch-size", "1", "--save-every", "2",
              "--eval-prompts", "2"]
FAULT_PROMPTS = PROMPTS + ["Say goodbye.", "Name a bird."]  # 6 to train on, 2 held out


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """The run every fault test must end equal to: its final weights."""
    tmp = tmp_path_factory.mktemp("whole")
    (tmp / "prompts.txt").write_text("\n".join(FAULT_PROMPTS))
    r = run_train(*loop_args(tiny_model_dir, tmp / "prompts.txt", tmp / "run", *FAULT_ARGS), cwd=tmp)
    assert r.returncode == 0, r.stderr
    return load_file(tmp / "run" / "iter_0" / "model" / "model.safetensors")


def fault_run(tiny_model_dir, tmp_path, patch=None, resume=False):
    (tmp_path / "prompts.txt").write_text("\n".join(FAULT_PROMPTS))
    args = loop_args(tiny_model_dir, tmp_path / "prompts.txt", tmp_path / "cut", *FAULT_ARGS,
                     *(["--resume"] if resume else []))
    return run_killed(tmp_path, patch, *args) if patch else run_train(*args, cwd=tmp_path)


def assert_same_weights(tmp_path, expected):
    got = load_file(tmp_path / "cut" / "iter_0" / "model" / "model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


SIGTERM_AFTER_STEP_5 = KILLED_AFTER_STEP_5.replace("die()", "os.kill(os.getpid(), signal.SIGTERM)")
SIGTERM_IN = """
    import {module} as where
    real = where.{function}
    def patched(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the stage runs
        return real(*a, **k)
    where.{function} = patched
"""
STAGES = {"sampling": ("sso_mini.records", "generate_batched"), "reference pass": ("train", "score_records"),
          "training": None, "saving the model": ("train", "save_model"),
          "held-out scoring": ("train", "evaluate"), "final sampling": ("train", "sample_plain")}


@pytest.mark.parametrize("stage", STAGES)
def test_sigterm_stops_with_one_line_and_resume_ends_equal(tiny_model_dir, tmp_path, uninterrupted, stage):
    patch = SIGTERM_IN.format(module=STAGES[stage][0], function=STAGES[stage][1]) if STAGES[stage] \
        else SIGTERM_AFTER_STEP_5
    stopped = fault_run(tiny_model_dir, tmp_path, patch)
    assert stopped.returncode == 130
    assert stopped.stderr.strip().splitlines()[-1] == \
        "error: interrupted; the same command with --resume continues from the last saved step"
    assert not (tmp_path / "cut" / "lock.json").exists()  # a clean stop releases --out
    assert fault_run(tiny_model_dir, tmp_path, resume=True).returncode == 0
    assert_same_weights(tmp_path, uninterrupted)


DISK_FULL = """
    import errno
    from sso_mini import {module}
    real = {module}.{writer}
    def patched(data, path, *a, **k):
        if "{where}" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(data, path, *a, **k)
    {module}.{writer} = patched
"""


@pytest.mark.parametrize("module,writer,where,named", [
    ("records", "write_atomic", "pairs.jsonl", "iter_0/pairs.jsonl'"),  # (path, text): the same shape
    ("assets", "save_file", "ref_logps.safetensors", "iter_0/ref_logps.safetensors: not written"),
    ("assets", "save_file", "resume.tmp-", "iter_0/resume: not written"),
    ("checkpoint", "save_file", "model.tmp-", "iter_0/model: not written"),
])
def test_a_full_disk_names_the_file_keeps_the_state_and_resume_ends_equal(tiny_model_dir, tmp_path, uninterrupted,
                                                                          module, writer, where, named):
    patch = DISK_FULL.format(module=module, writer=writer, where=where)
    if writer == "write_atomic":
        patch = patch.replace("(data, path,", "(path, data,")  # write_atomic(path, text)
    full = fault_run(tiny_model_dir, tmp_path, patch)
    last = full.stderr.strip().splitlines()[-1]
    assert full.returncode == 1 and last.startswith("error: ") and "No space left on device" in last and named in last
    it = tmp_path / "cut" / "iter_0"
    assert not [p for p in it.iterdir() if ".tmp-" in p.name]  # no half-written file or folder is left
    assert fault_run(tiny_model_dir, tmp_path, resume=True).returncode == 0
    assert_same_weights(tmp_path, uninterrupted)


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """assets.atomic_folder (the model folder, the resume state): the new folder takes the old one's place; stopped
    inside the block, or by Ctrl-C between its two renames, the old folder stays as it was, nothing left beside it."""
    from sso_mini import assets

    path = tmp_path / "model"
    path.mkdir()
    (path / "a").write_text("old")
    with assets.atomic_folder(path) as tmp:
        (tmp / "a").write_text("new")
    assert (path / "a").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with pytest.raises(KeyboardInterrupt), assets.atomic_folder(path) as tmp:
        (tmp / "a").write_text("newer")
        raise KeyboardInterrupt
    assert (path / "a").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]
    real, renames = os.replace, []

    def interrupted_second(src, dst):
        renames.append(dst)
        if len(renames) == 2:  # the old folder has stepped aside, the new one is not yet in its place
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(assets.os, "replace", interrupted_second)
    with pytest.raises(KeyboardInterrupt), assets.atomic_folder(path) as tmp:
        (tmp / "a").write_text("newer")
    assert len(renames) == 3  # the old folder came back
    assert (path / "a").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("how", ["truncated", "one bit flipped"])
@pytest.mark.parametrize("damaged", ["iter_0/ref_logps.safetensors", "iter_0/resume/weights.safetensors"])
def test_a_damaged_cache_is_never_used_and_resume_ends_equal(tiny_model_dir, tmp_path, uninterrupted, damaged, how):
    assert fault_run(tiny_model_dir, tmp_path, KILLED_AFTER_STEP_5).returncode == -9
    path = tmp_path / "cut" / damaged
    data = path.read_bytes()
    if how == "truncated":  # a write cut short
        path.write_bytes(data[:len(data) // 2])
    else:  # a well-formed file whose last tensor byte changed: only the recorded hash can tell
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    resumed = fault_run(tiny_model_dir, tmp_path, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    if "resume" in damaged:
        assert "the resume state is unreadable" in resumed.stderr
    assert_same_weights(tmp_path, uninterrupted)


def test_a_second_process_on_the_same_out_is_refused(tiny_model_dir, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "cut"
        out.mkdir()
        (out / "lock.json").write_text(json.dumps({"pid": sleeper.pid}))  # a live process holds --out
        r = fault_run(tiny_model_dir, tmp_path)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"error: {out} is in use by process {sleeper.pid} (another train.py?); wait for it or stop it"]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert fault_run(tiny_model_dir, tmp_path).returncode == 0  # its process gone, the lock is stale


def test_a_pairs_file_cut_at_a_line_is_refused_not_used(tiny_model_dir, tmp_path):
    assert fault_run(tiny_model_dir, tmp_path, KILLED_AFTER_STEP_5).returncode == -9
    pairs = tmp_path / "cut" / "iter_0" / "pairs.jsonl"
    pairs.write_text("".join(pairs.read_text().splitlines(keepends=True)[:3]))  # whole lines: valid JSONL
    resumed = fault_run(tiny_model_dir, tmp_path, resume=True)
    assert resumed.returncode == 1
    assert resumed.stderr.strip().splitlines()[-1] == \
        f"error: {pairs} holds 3 of its 6 records: delete it to sample again"
