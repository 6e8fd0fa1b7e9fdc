"""The paper's measures at small scale: checkable prompts mixed in, signal accuracy by a rule, on-policy-ness."""

import json
import math

import pytest
import torch

from sso_mini import rules
from sso_mini.eval import ifeval
from sso_mini.eval.report import pooled_signal, print_table
from sso_mini.metrics import on_policy, response_lengths, signal_accuracy, wilson_interval
from sso_mini.checkable import mix_in_checkable

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
        passes, _ = rules.check({**c, "prompt": prompt}, "")
        assert passes == [False]  # a check that runs: an empty answer passes nothing


def test_on_policy_reads_the_plain_prompt_columns(smollm2):
    _, tok = smollm2
    records = [record("Hi friend.", "Hi, friend, how are you?"), record("Hello there.", "No.")]
    logps = -torch.arange(1.0, 13.0).reshape(2, 6)  # [R, 6] summed log-probs, columns as in batches.SEQUENCES
    lengths = response_lengths(tok, records, cutoff=2048)
    got = on_policy(tok, records, logps, cutoff=2048)
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


def shows(feature: str, text: str, capped: bool) -> bool:
    """The two checks of the checked_set fixture, as the shipped checker and the rule say."""
    if feature == "Ends":
        return not capped
    _, registry = rules.verifiers()
    checker = registry["length_constraints:number_words"]("length_constraints:number_words")
    checker.build_description(relation="less than", num_words=3)
    return bool(text.strip()) and checker.check_following(text)


def counted(records, feature):
    verdicts = [(shows(feature, r["chosen"], r["capped"]["chosen"]),
                 shows(feature, r["rejected"], r["capped"]["rejected"]))
                for r in records if feature in r["features"]]
    return {"checked": len(verdicts), "pos_only": sum(p and not n for p, n in verdicts),
            "neg_only": sum(n and not p for p, n in verdicts)}


def test_a_checked_principle_set_reports_signal_and_behaviour_per_feature(tiny_model_dir, tmp_path, capsys,
                                                                          checked_set):
    import train
    from sso_mini.eval import report
    from sso_mini.records import read_jsonl

    (tmp_path / "prompts.txt").write_text("\n".join(["Name a fruit.", "Say hello.", "Count to three.", "Name a color.",
                                                     "Give a tip.", "Name a tree."]))
    out = tmp_path / "run"
    train.main(["--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out),
                "--principles", str(checked_set), "--max-new-tokens", "4", "--batch-size", "2",
                "--iterations", "2", "--prompts-per-iteration", "4", "--eval-prompts", "2", "--no-progress"])
    assert "Short: the held-out plain answers y^o pass its check" in capsys.readouterr().err  # train.py's last word
    assert report.main([str(out)]) == 0 and (out / "metrics.png").stat().st_size > 0  # the table, from the folder
    table = capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["verifier_share"] == 0.0  # the set's checks measure the signal
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["iteration"]: r for r in rows if r["split"] == "eval"}
    for t in (0, 1):
        it = out / f"iter_{t}"
        summary = json.loads((it / "summary.json").read_text())
        train_records, held_out = read_jsonl(it / "pairs.jsonl"), read_jsonl(it / "eval_pairs.jsonl")
        assert all(r["features"] == ["Short", "Ends"] for r in train_records)  # both, nothing to pick
        for f in ("Short", "Ends"):
            for got, records in ((summary["feature_signal"][f], train_records),
                                 (summary["eval"]["feature_signal"][f], held_out)):
                want = counted(records, f)
                assert {k: got[k] for k in want} == want, (t, f)
                assert got["decided"] == want["pos_only"] + want["neg_only"]
                assert tuple(got["interval"]) == wilson_interval(want["pos_only"], got["decided"])
            passing = sum(shows(f, r["raw"], r["capped"]["raw"]) for r in held_out)
            assert summary["behaviour"][f]["pass"] == passing and summary["behaviour"][f]["n"] == len(held_out)
            assert evals[t][f"eval_behaviour/{f}/pass_rate"] == passing / len(held_out)
            assert evals[t][f"eval_signal/{f}/decided"] == summary["eval"]["feature_signal"][f]["decided"]
            assert evals[t][f"signal/{f}/decided"] == summary["feature_signal"][f]["decided"]
    final = json.loads((out / "final" / "summary.json").read_text())
    start, end = read_jsonl(out / "iter_0" / "eval_pairs.jsonl"), read_jsonl(out / "final" / "generation.jsonl",
                                                                              required=("prompt", "raw"))
    for f in ("Short", "Ends"):
        a = {r["prompt"]: shows(f, r["raw"], r["capped"]["raw"]) for r in start}
        b = {r["prompt"]: shows(f, r["raw"], r["capped"]["raw"]) for r in end}
        change = final["vs_start"][f]
        assert change["n"] == len(a) and change["became_passing"] == sum(b[p] and not a[p] for p in a)
        assert change["became_failing"] == sum(a[p] and not b[p] for p in a)
        assert final["behaviour"][f]["pass"] == sum(b.values())
        assert f"{f}: the held-out plain answers y^o pass its check" in table
    assert "Short: signal acc train / held out (decided)" in table.splitlines()[1]
    assert rows[-1]["split"] == "final" and "eval_behaviour/Short/pass_rate" in rows[-1]
