"""The paper's measures at small scale: checkable prompts mixed in, signal accuracy by a rule, on-policy-ness."""

import json
import math

import pytest
import torch

from sso_mini.eval import ifeval
from sso_mini.eval.report import (mean_token_logps, pooled_signal, print_table, record_lengths, signal_accuracy,
                                  wilson_interval)
from sso_mini.eval.verified_pairs import mix_in_checkable

NO_COMMA = {"key": "t", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


def record(chosen, rejected, checks=NO_COMMA):
    r = {"prompt": "Say hi. In your entire response, refrain from the use of any commas.", "system": "",
         "p_system": "Be kind.", "n_system": "Be rude.", "chosen": chosen, "rejected": rejected, "raw": "Hi."}
    return r | ({"checks": checks} if checks else {})


def test_signal_accuracy_counts_every_case_of_the_conditional():
    records = [record("Hi friend.", "Hi, friend."),  # y+ only passes: right
               record("Hi friend.", "Hi, friend."),
               record("Hi friend.", "Hi, friend."),
               record("Hi, friend.", "Hi friend."),  # y- only passes: wrong
               record("Hi friend.", "Hello friend."),  # both pass: undecided
               record("Hi, you.", "Hello, you."),  # both fail: undecided
               record("Hi, you.", "Hello friend.", checks=None)]  # no rule: not counted
    s = signal_accuracy(records)
    assert (s["checked"], s["decided"], s["pos_only"], s["neg_only"], s["both_pass"], s["both_fail"]) == (6, 4, 3, 1,
                                                                                                         1, 1)
    assert s["accuracy"] == 3 / 4 and s["interval"] == wilson_interval(3, 4)
    margins = torch.tensor([0.5, -0.1, 0.2, -0.3, 9.0, -9.0, 9.0])  # decided: right, wrong, right, right
    with_margins = signal_accuracy(records, margins)
    assert with_margins["reward_agrees"] == 3 / 4 and with_margins["reward_interval"] == wilson_interval(3, 4)
    assert json.loads(json.dumps(with_margins))["reward_agrees"] == 3 / 4  # plain numbers, as summary.json holds
    none = signal_accuracy([record("Hi friend.", "Hello friend.")])
    assert none["decided"] == 0 and none["accuracy"] is None and none["interval"] == (0.0, 1.0)
    pooled = pooled_signal(s, signal_accuracy([record("Hi friend.", "Hi, you.")]), none)  # 3 + 1 right of 4 + 1
    assert (pooled["accuracy"], pooled["decided"], pooled["checked"]) == (4 / 5, 5, 8)
    assert pooled["interval"] == wilson_interval(4, 5)


@pytest.mark.parametrize("share,expected", [(0.0, 0), (0.25, 10), (0.5, 20), (1.0, 40)])
def test_mix_in_checkable_replaces_an_even_share(share, expected):
    prompts = [f"plain prompt {i}" for i in range(40)]
    mixed, checks = mix_in_checkable(prompts, share, seed=3)
    assert len(mixed) == 40 and len(checks) == expected
    replaced = [i for i, (a, b) in enumerate(zip(prompts, mixed)) if a != b]
    assert len(replaced) == expected and all(mixed[i] in checks for i in replaced)
    if share == 0.25:  # one in every four, so every slice of train.py's pool gets its share
        assert all(sum(1 for i in replaced if 4 * k <= i < 4 * k + 4) == 1 for k in range(10))
    assert mix_in_checkable(prompts, share, seed=3) == (mixed, checks)  # seeded


def test_checkable_training_prompts_are_never_ifeval_evaluation_prompts():
    mixed, checks = mix_in_checkable([f"p{i}" for i in range(400)], 1.0, seed=0)
    evaluation = [r["prompt"] for r in ifeval.load_prompts()]
    assert len(evaluation) == 541
    assert not set(mixed) & set(evaluation)
    assert not {c["key"] for c in checks.values()} & {r["key"] for r in ifeval.load_prompts()}
    for prompt, c in checks.items():
        assert len(c["instruction_id_list"]) == 1
        passes, _ = ifeval.check({**c, "prompt": prompt}, "")
        assert passes == [False]  # a check that runs: an empty answer passes nothing


def test_mean_token_logps_reads_the_plain_prompt_columns(smollm2):
    _, tok = smollm2
    records = [record("Hi friend.", "Hi, friend, how are you?"), record("Hello there.", "No.")]
    logps = -torch.arange(1.0, 13.0).reshape(2, 6)  # [R, 6] summed log-probs, columns as in batches.SEQUENCES
    lengths = record_lengths(tok, records, cutoff=2048)
    got = mean_token_logps(tok, records, logps, cutoff=2048)
    assert math.isclose(got["y_pos"], ((-1 / lengths[0, 0]) + (-7 / lengths[1, 0])).item() / 2, rel_tol=1e-6)
    assert math.isclose(got["y_neg"], ((-2 / lengths[0, 1]) + (-8 / lengths[1, 1])).item() / 2, rel_tol=1e-6)


def test_end_of_run_table_pools_the_signal_and_shows_on_policy(capsys):
    signal = lambda right, wrong: {"pos_only": right, "neg_only": wrong, "decided": right + wrong,  # noqa: E731
                                   "checked": right + wrong + 1}
    row = {"iteration": 0, "kept": 8, "prompts": 8, "len_chosen": 10, "len_rejected": 11, "len_raw": 12, "loss": 1.0,
           "W": 0.7, "acc": 0.5, "p_acc": 0.5, "n_acc": 0.5, "generation": None, "seconds": {"total": 60},
           "signal": signal(2, 1), "onpolicy": {"y_pos": -1.25, "y_neg": -1.5},
           "eval": {"signal": signal(1, 0), "n": 4, "eval_rewards/accuracies": 0.5, "eval_p_rewards/accuracies": 0.5,
                    "eval_n_rewards/accuracies": 0.5, "intervals": {"eval_rewards/accuracies": [0.1, 0.9]}}}
    print_table([row])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "| 0.75 (4) | -1.250 / -1.500 |" in line  # 2 + 1 right of 3 + 1 decided
