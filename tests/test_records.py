"""Records and batches: filters, files, the six training sequences, and sampling on SmolLM2."""

import json

import pytest
import torch

from sso_mini import batches, logprob_filter, records
from sso_mini.batches import collate, record_sequences, truncate
from sso_mini.principles import load_principles
from sso_mini.records import clean, drop_reason, load_prompts, read_jsonl, write_jsonl
from sso_mini.tokenizer import chat, end_of_turn_id, prompt_ids

PAPER = load_principles("paper")
PROMPTS = ["Name three primary colors.", "Write a haiku about rain.", "What is 7 times 8?",
           "Give one tip for sleeping better."]


# --- filters (the released code's, docs/algorithm.md) ------------------------------------


def test_clean_strips_and_adds_a_dot_only_after_a_lowercase_letter():
    assert clean("  it rains\n", dot=True) == "it rains."
    assert clean("It rains!", dot=True) == "It rains!"
    assert clean("ends in CAPS", dot=True) == "ends in CAPS"
    assert clean("  short ", dot=False) == "short"


def test_dot_rule_needs_both_texts_longer_than_20_characters(smollm2, monkeypatch):
    model, tok = smollm2
    p_sys, n_sys = PAPER.system_prompts(["Helpfulness", "Accuracy"])
    answers = {tuple(prompt_ids(tok, p_sys, "q")): "a long enough good answer here",
               tuple(prompt_ids(tok, n_sys, "q")): "short bad one",
               tuple(prompt_ids(tok, "", "q")): "raw answer without a dot"}
    fake = lambda m, prompts, **k: [tok.encode(answers[tuple(p)]) for p in prompts]  # noqa: E731
    monkeypatch.setattr(records, "generate_batched", fake)
    monkeypatch.setattr(records, "select_features", lambda *a, **k: [["Helpfulness", "Accuracy"]])
    built, _ = records.build_records(model, tok, ["q"], PAPER, progress=False)
    assert built[0]["chosen"] == "a long enough good answer here"  # y- is only 13 characters: no dots
    assert built[0]["raw"] == "raw answer without a dot"


def test_drop_reasons():
    helpful, accuracy, safety = (PAPER.features[f] for f in ("Helpfulness", "Accuracy", "Safety"))
    assert drop_reason("Same text.", "Same text.", "other", helpful) == "identical_pair"
    # prefixes are stripped for the comparison only
    assert drop_reason("Helpful Response: Same.", "Unhelpful Response: Same.", "x", helpful) == "identical_pair"
    assert drop_reason("Response: Same.", "Same.", "x", accuracy) == "identical_pair"
    assert drop_reason("Accurate Response: Same.", "Same.", "x", helpful) is None  # another feature's adjective
    assert drop_reason("good", "bad", "good", safety) == "chosen_equals_raw"
    assert drop_reason("good", "bad", "bad", safety) == "rejected_equals_raw"
    assert drop_reason("good", "bad", "plain", safety) is None


def test_truncate_keeps_the_response():
    p, r = list(range(100)), list(range(1000, 1030))
    assert truncate(p, r, 200) == (p, r)
    tp, tr = truncate(p, r, 64)
    assert tr == r and len(tp) + len(tr) == 64 and tp == p[-34:]  # the prompt loses its start
    tp, tr = truncate(p, list(range(1000, 1200)), 64)
    assert len(tr) == 32 and len(tp) == 32 and tp == p[-32:]  # a huge response keeps half the budget


# --- files -------------------------------------------------------------------------------


def record(**kw):
    base = {"prompt": "q", "system": "", "p_system": "be good", "n_system": "be bad", "chosen": "yes",
            "rejected": "no", "raw": "maybe", "features": ["Safety", "Accuracy"], "iteration": 0, "seed": 0}
    return {**base, **kw}


def test_jsonl_round_trip(tmp_path):
    records = [record(prompt="héllo 😀"), record(chosen="multi\nline")]
    write_jsonl(tmp_path / "pairs.jsonl", records)
    assert read_jsonl(tmp_path / "pairs.jsonl") == records
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(record()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: not valid JSON"):
        read_jsonl(path)
    bad = record()
    del bad["raw"]
    path.write_text(json.dumps(record()) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: missing or non-string field\(s\) raw"):
        read_jsonl(path)


def test_failed_write_leaves_no_file(tmp_path):
    class Boom:
        def __iter__(self):
            yield record()
            raise OSError("disk full")

    with pytest.raises(OSError):
        write_jsonl(tmp_path / "pairs.jsonl", Boom())
    assert list(tmp_path.iterdir()) == []


def test_load_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  second  \n")
    assert load_prompts(tmp_path / "p.txt") == ["first", "second"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"instruction": "b"}\n')
    assert load_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: needs a string 'prompt' or 'instruction' field"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:3: not valid JSON"):
        load_prompts(tmp_path / "broken.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="no such prompt file"):
        load_prompts(tmp_path / "missing.txt")


def test_default_prompts_are_real_alpaca_eval_instructions():
    prompts = records.default_prompts()
    assert len(prompts) == 627 and all(0 < len(p) <= 200 for p in prompts)


# --- the six training sequences ------------------------------------------------------------


def test_response_mask_selects_exactly_the_response_tokens(smollm2):
    _, tok = smollm2
    r = record(prompt="Say hi.", chosen="Hi there!", rejected="Go away.", raw="Hello.")
    seqs = record_sequences(tok, r)
    batch = collate(seqs, tok.pad_id)
    eot = end_of_turn_id(tok)
    assert tok.decode([eot], skip_special_tokens=False) == "<|im_end|>"
    expected = [("", "chosen"), ("", "rejected"), ("p_system", "chosen"), ("p_system", "rejected"),
                ("n_system", "raw"), ("n_system", "chosen")]
    for i, (system_key, response_key) in enumerate(expected):
        ids = batch["input_ids"][i]
        response = ids[batch["response_mask"][i]].tolist()
        assert response == tok.encode(r[response_key]) + [eot]
        # the tokens before the response are exactly the rendered prompt of that pair
        n_prompt = int(batch["response_mask"][i].nonzero()[0])
        system = r[system_key] if system_key else ""
        assert ids[:n_prompt].tolist() == prompt_ids(tok, system, r["prompt"])
        # and prompt + response is what the template renders for the whole conversation
        convo = chat(system, r["prompt"]) + [{"role": "assistant", "content": r[response_key]}]
        full = tok.encode(tok.apply_chat_template(convo, add_generation_prompt=False))
        assert ids[:n_prompt + len(response)].tolist() == full[:n_prompt + len(response)]
    assert (batch["attention_mask"].sum(1) == torch.tensor([len(p) + len(q) for p, q in seqs])).all()


def test_a_capped_response_is_a_prefix_in_every_sequence(smollm2, monkeypatch):
    """A response that hit max_new_tokens gets no "." and no end-of-turn token; the others keep both rules."""
    model, tok = smollm2
    p_sys, n_sys = PAPER.system_prompts(["Helpfulness", "Accuracy"])
    texts = {p_sys: "a long enough good answer that was cut", n_sys: "a long enough bad answer here",
             "": "a plain answer that ended"}
    cap = len(tok.encode(texts[p_sys]))
    assert all(len(tok.encode(t)) < cap for t in (texts[n_sys], texts[""]))
    answers = {tuple(prompt_ids(tok, system, "q")): tok.encode(text) for system, text in texts.items()}
    monkeypatch.setattr(records, "generate_batched", lambda m, prompts, **k: [answers[tuple(p)] for p in prompts])
    monkeypatch.setattr(records, "select_features", lambda *a, **k: [["Helpfulness", "Accuracy"]])
    built, stats = records.build_records(model, tok, ["q"], PAPER, max_new_tokens=cap, progress=False)
    r = built[0]
    assert r["capped"] == {"chosen": True, "rejected": False, "raw": False} and stats["capped"] == 1
    assert r["chosen"] == texts[p_sys]  # no "." invented for a text that did not end
    assert r["rejected"] == texts[n_sys] + "." and r["raw"] == texts[""] + "."
    eot = end_of_turn_id(tok)
    seqs = record_sequences(tok, r)
    for i, key in enumerate(("chosen", "rejected", "chosen", "rejected", "raw", "chosen")):  # batches.SEQUENCES
        response = seqs[i][1]
        if key == "chosen":
            assert response == tok.encode(r["chosen"]) and eot not in response, i
        else:
            assert response == tok.encode(r[key]) + [eot], i


def test_a_record_without_capped_loads_as_uncapped(smollm2, tmp_path):
    _, tok = smollm2
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(record()) + "\n")  # a file written before the field existed
    r = read_jsonl(path)[0]
    assert not any(batches.is_capped(r, k) for k in ("chosen", "rejected", "raw"))
    eot = end_of_turn_id(tok)
    assert all(response[-1] == eot for _, response in record_sequences(tok, r))


def test_logprob_filter_scores_capped_responses_as_prefixes(smollm2, monkeypatch):
    model, tok = smollm2
    eot, seen = end_of_turn_id(tok), []

    def spy(model, batch):  # the scored tokens of each response in the packed row
        n = int(batch["segment"].max()) + 1
        seen.extend(batch["input_ids"][batch["segment"] == s].tolist() for s in range(n))
        return torch.zeros(n), torch.ones(n)

    monkeypatch.setattr(logprob_filter, "packed_logprobs", spy)
    logprob_filter.logprob_filter(model, tok, [record(capped={"chosen": True, "rejected": False, "raw": False})])
    assert seen[:3] == [tok.encode("yes")] * 3  # y+ under x, x+, x-: no end-of-turn token
    assert seen[3:] == [tok.encode("no") + [eot]] * 3


# --- sampling on the real model --------------------------------------------------------------


def test_build_records_on_smollm2(smollm2, monkeypatch):
    model, tok = smollm2
    calls = {}
    real = records.generate_batched

    def spy(m, prompts, **kw):
        out = real(m, prompts, **kw)
        for p, o in zip(prompts, out):
            calls[tuple(p)] = o
        return out

    monkeypatch.setattr(records, "generate_batched", spy)
    built, stats = records.build_records(model, tok, PROMPTS, PAPER, seed=3, max_new_tokens=16, progress=False)
    assert stats["prompts"] == 4 and stats["kept"] == len(built)
    assert sum(stats[k] for k in records.DROP_REASONS) == 4 - len(built)
    assert stats["sample_tokens"] > 0 and stats["sample_seconds"] > 0
    assert built, stats
    for r in built:
        assert set(r) >= {"prompt", "system", "p_system", "n_system", "chosen", "rejected", "raw", "features",
                          "iteration", "seed"}
        assert r["system"] == "" and len(set(r["features"]) - {"Concision"}) == 2
        assert all(f in PAPER.features for f in r["features"])
        assert (r["p_system"], r["n_system"]) == PAPER.system_prompts(r["features"])
        # y+ was sampled from exactly the p+ prompt tokens, y- from p-, y^o from the default-system prompt
        for system, key in ((r["p_system"], "chosen"), (r["n_system"], "rejected"), ("", "raw")):
            ids = tuple(prompt_ids(tok, system, r["prompt"]))
            assert ids in calls
            assert clean(tok.decode(calls[ids]), dot=False).rstrip(".") == r[key].rstrip(".")
        raw_prompt = tok.decode(prompt_ids(tok, "", r["prompt"]), skip_special_tokens=False)
        assert "named SmolLM" in raw_prompt  # the template's default system message


def test_too_long_prompts_are_counted_and_skipped(smollm2, monkeypatch):
    model, tok = smollm2
    monkeypatch.setattr(records, "select_features",
                        lambda m, t, p, prompts, *a, **k: [["Safety", "Accuracy"]] * len(prompts))
    monkeypatch.setattr(records, "generate_batched",
                        lambda m, prompts, **k: [tok.encode("fine " * 8 + "x")] * len(prompts))
    huge = "word " * 9000
    built, stats = records.build_records(model, tok, [huge, ""], PAPER, max_new_tokens=8, progress=False)
    assert stats["too_long"] == 1 and stats["empty_prompt"] == 1 and built == []


def test_logprob_filter_steps(smollm2, monkeypatch):
    """Scores are injected; the rule is checked against a hand computation."""
    model, tok = smollm2
    # per record: mean log-probs of (y+ under o, p, n), then (y- under o, p, n)
    table = torch.tensor([
        [[-1.0, -0.5, -2.0], [-1.0, -2.0, -0.5]],  # ordered, on-policy, big gaps: kept
        [[-1.0, -1.5, -2.0], [-1.0, -2.0, -0.5]],  # y+ not most likely under p+: fails step 1
        [[-3.0, -2.5, -4.0], [-3.0, -4.0, -2.5]],  # ordered, but far off-policy: fails step 2
        [[-1.1, -1.0, -1.2], [-1.1, -1.2, -1.0]],  # ordered, on-policy-ish, small gaps: fails step 3
    ])
    flat = table.flatten().tolist()

    def fake(model, batch):  # summed log-probs of 2 tokens each, in the row's order
        n = int(batch["segment"].max()) + 1
        out = torch.tensor([flat.pop(0) for _ in range(n)])
        return out * 2, torch.full((n,), 2)

    monkeypatch.setattr(logprob_filter, "packed_logprobs", fake)
    kept, stats = logprob_filter.logprob_filter(model, tok, [record(prompt=str(i)) for i in range(4)])
    assert [r["prompt"] for r in kept] == ["0"]
    assert stats["filter_order"] == 3 and stats["filter_onpolicy"] == 2 and stats["filter_gap"] == 1


def test_trl_export_round_trips_and_renders_to_our_token_ids(smollm2, tmp_path):
    from sso_mini.batches import response_ids
    from sso_mini.export_trl import export_trl

    _, tok = smollm2
    eot = end_of_turn_id(tok)
    base = {"system": "", "p_system": "Be precise.", "n_system": "Be vague.", "raw": "Hm.", "features": ["Accuracy"]}
    records = [{**base, "prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "No idea.",
                "capped": {"chosen": False, "rejected": False, "raw": False}},
               {**base, "prompt": "Say hello.", "chosen": "Hello there, how", "rejected": "Hi.",
                "capped": {"chosen": True, "rejected": False, "raw": False}}]
    write_jsonl(tmp_path / "pairs.jsonl", records)
    assert export_trl(tmp_path / "pairs.jsonl", tmp_path / "trl.jsonl") == {"pairs": 2, "exported": 1,
                                                                            "left_out_capped": 1}
    (row,) = [json.loads(x) for x in (tmp_path / "trl.jsonl").read_text().splitlines()]
    r = records[0]
    assert row["prompt"] == [{"role": "user", "content": r["prompt"]}]
    assert (row["chosen"][0]["content"], row["rejected"][0]["content"]) == (r["chosen"], r["rejected"])
    assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
    assert (row["p_system"], row["n_system"], row["features"]) == (r["p_system"], r["n_system"], r["features"])
    # what TRL's DPO trainer does with a conversational row: render the prompt with the generation prompt,
    # and each answer as the rest of the rendered whole conversation
    prompt_text = tok.apply_chat_template(row["prompt"], add_generation_prompt=True)
    assert tok.encode(prompt_text) == prompt_ids(tok, "", r["prompt"])
    for side in ("chosen", "rejected"):
        whole = tok.apply_chat_template(row["prompt"] + row[side], add_generation_prompt=False)
        assert whole.startswith(prompt_text)
        ids = tok.encode(prompt_text) + tok.encode(whole[len(prompt_text):])
        ours = prompt_ids(tok, "", r["prompt"]) + response_ids(tok, r, side, eot)  # ends with the end-of-turn
        assert ids[:len(ours)] == ours and tok.decode(ids[len(ours):]).strip() == ""  # then only a newline


def test_trl_export_command_writes_the_file_and_refuses_bad_input(tmp_path):
    import subprocess
    import sys

    pair = {"prompt": "Say hi.", "chosen": "Hi.", "rejected": "No.", "capped": {"chosen": False, "rejected": False}}
    write_jsonl(tmp_path / "pairs.jsonl", [pair])
    done = subprocess.run([sys.executable, "-m", "sso_mini.export_trl", str(tmp_path / "pairs.jsonl"),
                           str(tmp_path / "trl.jsonl")], capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout) == {"pairs": 1, "exported": 1, "left_out_capped": 0}
    assert json.loads((tmp_path / "trl.jsonl").read_text())["chosen"] == [{"role": "assistant", "content": "Hi."}]
    bad = subprocess.run([sys.executable, "-m", "sso_mini.export_trl", str(tmp_path / "missing.jsonl"),
                          str(tmp_path / "out.jsonl")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and not (tmp_path / "out.jsonl").exists()
