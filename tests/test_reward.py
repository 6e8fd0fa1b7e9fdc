"""Reward model: last-token head, Bradley-Terry loss, training, folders, Wilson interval, verified pairs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sso_mini.checkpoint import CheckpointError, load_model
from sso_mini import checkable, rules
from sso_mini.eval import ifeval, reward, verified_pairs
from sso_mini.metrics import wilson_interval
from sso_mini.model import padding_causal_mask, position_ids_from_mask
from sso_mini.records import write_jsonl
from sso_mini.tokenizer import end_of_turn_id

PAIRS = [{"system": "", "prompt": f"How many apples are in basket {i}?", "chosen": f"Basket {i} holds {3 * i} apples.",
          "rejected": f"I cannot say anything about basket {i}.", "margin": 0.0} for i in range(8)]


@pytest.mark.parametrize("left", [False, True])
def test_head_reads_the_last_real_token(left, tiny_transformer):
    rm = reward.RewardModel(tiny_transformer(), seed=1)
    seqs = [[5, 9, 13, 2, 7], [3, 4], [11, 12, 60, 1]]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, cols], mask[i, cols] = torch.tensor(s), 1
    with torch.no_grad():
        got = rm(ids, mask)
        for i, s in enumerate(seqs):  # each sequence alone, no padding: its final token's state
            alone = torch.ones(1, len(s), dtype=torch.long)
            h = rm.body.hidden_states(torch.tensor([s]), position_ids_from_mask(alone),
                                      padding_causal_mask(alone))[0, -1]  # [H]
            want = (h * rm.head.weight[0]).sum() + rm.head.bias[0]
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)


def test_bt_loss_matches_its_formula():
    r_chosen, r_rejected, margin = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 2.0, 1.0]), torch.tensor([0.5, 0.0, 1.0])
    by_hand = [math.log(1 + math.exp(-(1.0 - 0.0 - 0.5))), math.log(1 + math.exp(-(0.0 - 2.0))),
               math.log(1 + math.exp(-(3.0 - 1.0 - 1.0)))]
    assert reward.bt_loss(r_chosen, r_rejected, margin).item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    no_margin = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(2.0)), math.log(1 + math.exp(-2.0))]
    assert reward.bt_loss(r_chosen, r_rejected).item() == pytest.approx(sum(no_margin) / 3, rel=1e-6)


def test_pair_loss_adds_margin_and_chosen_nll(tiny_model_dir):
    rm, tok = reward.init_reward_model(tiny_model_dir, seed=0)
    pairs = [{**p, "margin": 0.1 * i} for i, p in enumerate(PAIRS[:3])]
    batch = reward.pair_batch(tok, pairs)
    cfg = reward.RewardConfig(use_margin=True, lm_coef=0.5)
    with torch.no_grad():
        loss, metrics = reward.pair_loss(rm, batch, cfg)
        r = rm(batch["input_ids"], batch["attention_mask"])
        logits = rm.body(batch["input_ids"][:3])  # [3, T, V]: the naive full-vocabulary path
    bt = -F.logsigmoid(r[:3] - r[3:] - torch.tensor([0.0, 0.1, 0.2])).mean()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:3, 1:, None])[..., 0]  # [3, T-1]
    scored = batch["response_mask"][:3, 1:]
    nll = -(logp * scored).sum() / scored.sum()
    assert loss.item() == pytest.approx((bt + 0.5 * nll).item(), rel=1e-5)
    assert metrics["lm_nll"] == pytest.approx(nll.item(), rel=1e-5)


def test_tiny_reward_model_overfits_eight_pairs(tiny_model_dir):
    rm, tok = reward.init_reward_model(tiny_model_dir, seed=0)
    before = reward.evaluate(rm, tok, PAIRS)
    cfg = reward.RewardConfig(lr=3e-3, steps=12, batch_size=8, warmup_ratio=0.0)
    history = reward.train_reward_model(rm, tok, PAIRS, cfg, progress=False)
    after = reward.evaluate(rm, tok, PAIRS)
    assert after["accuracy"] == 1.0 and after["correct"] == 8
    assert history[-1]["bt_loss"] < 0.1 < history[0]["bt_loss"]
    assert before["accuracy"] < 1.0 or history[0]["bt_loss"] > 0.5  # it had something to learn


def test_save_load_round_trip(tiny_model_dir, tmp_path):
    rm, tok = reward.init_reward_model(tiny_model_dir, seed=3)
    reward.train_reward_model(rm, tok, PAIRS[:4], reward.RewardConfig(lr=1e-3, steps=2, batch_size=4),
                              progress=False)
    folder = tmp_path / "rm"
    reward.save_reward_model(rm, tok, folder)
    loaded, tok2 = reward.load_reward_model(folder)
    a, b = reward.pair_rewards(rm, tok, PAIRS), reward.pair_rewards(loaded, tok2, PAIRS)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert json.loads((folder / "config.json").read_text())[reward.RM_MARKER] is True
    body, _ = load_model(folder)  # still a normal causal-LM folder
    assert torch.equal(body.embed_tokens.weight, rm.body.embed_tokens.weight)
    again, _ = reward.init_reward_model(folder)  # continuing from a reward model keeps its head
    assert torch.equal(again.head.weight, rm.head.weight)
    with pytest.raises(CheckpointError, match="not a reward model"):
        reward.load_reward_model(tiny_model_dir)


def test_wilson_interval_by_hand():
    k, n, z = 8, 10, 1.96
    # roots of (k/n - p)^2 = z^2 p (1 - p) / n, a quadratic in p
    a, b, c = 1 + z * z / n, -(2 * k / n + z * z / n), (k / n) ** 2
    roots = sorted(((-b - math.sqrt(b * b - 4 * a * c)) / (2 * a), (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))
    low, high = wilson_interval(k, n)
    assert (low, high) == pytest.approx(roots, abs=1e-12)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # the textbook 95% interval of 8/10
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)


def test_load_pairs_from_sso_and_plain_files(tmp_path):
    sso = {"prompt": "x", "system": "", "p_system": "be good", "n_system": "be bad", "chosen": "y+",
           "rejected": "y-", "raw": "yo", "features": [], "iteration": 0, "seed": 0}
    write_jsonl(tmp_path / "pairs.jsonl", [sso])
    write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2}])
    base = reward.load_pairs([tmp_path / "pairs.jsonl", tmp_path / "plain.jsonl"])
    assert [(p["system"], p["chosen"], p["rejected"], p["margin"]) for p in base] == [("", "y+", "y-", 0.0),
                                                                                    ("", "a", "b", 2.0)]
    three = reward.load_pairs([tmp_path / "pairs.jsonl"], ("base", "p", "n"))
    assert [(p["system"], p["chosen"], p["rejected"]) for p in three] == [
        ("", "y+", "y-"), ("be good", "y+", "y-"), ("be bad", "yo", "y+")]  # x-: y_raw > y_pos
    with pytest.raises(ValueError, match="sso-pairs"):
        reward.load_pairs([tmp_path / "pairs.jsonl"], ("base", "q"))
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}])
    with pytest.raises(ValueError, match="bad.jsonl: record 1 has a non-numeric margin"):
        reward.load_pairs([tmp_path / "bad.jsonl"])


def test_drawn_prompts_are_seeded_and_valid():
    records, _ = checkable.draw_prompts(40, seed=5, max_instructions=3)
    assert records == checkable.draw_prompts(40, seed=5, max_instructions=3)[0]
    evaluation = {r["prompt"] for r in ifeval.load_prompts()}
    conflicts = checkable.instruction_conflicts()
    for r in records:
        assert r["prompt"] not in evaluation and 1 <= len(r["instruction_id_list"]) <= 3
        assert "combination:repeat_prompt" not in r["instruction_id_list"]
        ids = r["instruction_id_list"]
        assert not any(b in conflicts.get(a, ()) for a in ids for b in ids if a != b)
        for iid, kw in zip(ids, r["kwargs"]):
            if iid == "length_constraints:nth_paragraph_first_word":
                assert kw["nth_paragraph"] <= kw["num_paragraphs"]


def test_label_pairs_by_hand(smollm2):
    _, tok = smollm2
    record = {"key": "t", "prompt": "Say hi. In your entire response, refrain from the use of any commas.",
              "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    texts = ["Hi there, friend.", "Hi there friend.", "Hello, you.", "Hey."]
    kept, counts = verified_pairs.label_pairs(tok, [record, record], [[tok.encode(t) for t in texts],
                                                                      [tok.encode(t) for t in texts[::2]]],
                                              seed=0, max_new_tokens=100)
    assert counts["mixed"] == 1 and counts["all_fail"] == 1 and len(kept) == 1
    assert kept[0]["strict_pass"] == [False, True, False, True]
    assert "," not in kept[0]["chosen"] and "," in kept[0]["rejected"]


def test_build_testset_cli_on_smollm2(tmp_path):
    out = tmp_path / "test.jsonl"
    reward.main(["build-testset", "--out", str(out), "--n-prompts", "3", "--samples", "6", "--max-new-tokens", "16",
                 "--temperature", "1.0", "--seed", "0"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows
    for r in rows:  # labels re-checked independently of the builder's bookkeeping
        assert all(rules.check(r, r["chosen"])[0]) and not all(rules.check(r, r["rejected"])[0])
        assert r["chosen"] in r["responses"] and r["rejected"] in r["responses"]
    recipe = json.loads(out.with_suffix(".recipe.json").read_text())
    assert recipe["counts"]["kept"] == len(rows) and recipe["seed"] == 0 and recipe["samples"] == 6
    with pytest.raises(SystemExit, match="written once"):
        reward.main(["build-testset", "--out", str(out)])


def test_reward_pairs_keep_a_capped_response_as_a_prefix(smollm2):
    _, tok = smollm2
    sso = {"prompt": "x", "system": "", "p_system": "be good", "n_system": "be bad", "chosen": "y+",
           "rejected": "y-", "raw": "yo", "capped": {"chosen": True, "rejected": False, "raw": True}}
    base, _, n = reward.sso_rm_pairs(sso, ("base", "p", "n"))
    assert base["capped"] == {"chosen": True, "rejected": False} and n["capped"] == {"chosen": True, "rejected": True}
    batch = reward.pair_batch(tok, [base])  # rows: chosen, rejected
    eot = end_of_turn_id(tok)
    chosen, rejected = (row[mask].tolist() for row, mask in zip(batch["input_ids"], batch["response_mask"]))
    assert chosen == tok.encode("y+") and rejected == tok.encode("y-") + [eot]

