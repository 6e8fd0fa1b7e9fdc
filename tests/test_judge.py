"""Self-reference judge: prompts and verdicts on fixed strings; semantic perplexity against full logits."""

import pytest
import torch

from sso_mini.eval import judge

X = "Name a fruit that is yellow."
REF = "A banana is yellow."


def test_answer_and_judge_conversations():
    answer = judge.answer_messages(X, "Be kind.")
    assert [m["role"] for m in answer] == ["system", "user"]
    assert "Be kind." in answer[0]["content"] and answer[1]["content"] == X
    conversation = judge.judge_messages(X, REF, "Banana.", "Cucumber.", "Be kind.")
    assert [m["role"] for m in conversation] == ["system", "user", "assistant", "user"]
    assert conversation[:2] == answer and conversation[2]["content"] == REF  # the judge's own answer is the reference
    request = conversation[3]["content"]
    assert request.index("[Answer A]\nBanana.") < request.index("[Answer B]\nCucumber.")
    assert '"Verdict: A" or "Verdict: B"' in request
    swapped = judge.judge_messages(X, REF, "Cucumber.", "Banana.", "Be kind.")[3]["content"]
    assert swapped.index("[Answer A]\nCucumber.") < swapped.index("[Answer B]\nBanana.")
    ppl = judge.perplexity_messages(X, REF)
    assert [m["role"] for m in ppl] == ["system", "user", "assistant", "user"] and ppl[2]["content"] == REF


def test_rendered_by_the_chat_template(smollm2):
    _, tok = smollm2
    text = tok.apply_chat_template(judge.judge_messages(X, REF, "Banana.", "Cucumber."))
    assert text.startswith("<|im_start|>system\nYou are a careful") and text.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>assistant\n{REF}<|im_end|>" in text


@pytest.mark.parametrize("text, verdict", [
    ("A is short but right.\nVerdict: A", "A"),
    ("Both are fine.\n\nVerdict: B.", "B"),
    ("**Verdict:** B", "B"),
    ("verdict - [A]", "A"),
    ("Verdict: Answer B", "B"),
    ("Verdict: A\nOn reflection...\nVerdict: B", "B"),  # the final verdict counts
    ("I prefer answer A.", None),
    ("Verdict: a tie", None),
    ("Verdict: C", None),
    ("", None),
])
def test_parse_verdict(text, verdict):
    assert judge.parse_verdict(text) == verdict


def test_combine_swapped_verdicts():
    assert judge.combine_verdicts("A", "B") == "A"  # A first, and still the same answer once swapped
    assert judge.combine_verdicts("B", "A") == "B"
    assert judge.combine_verdicts("A", "A") is None  # position bias: always the first slot
    assert judge.combine_verdicts("B", "B") is None
    assert judge.combine_verdicts(None, "B") is None
    assert judge.combine_verdicts("A", None) is None


def test_strength_against_full_logits(smollm2):
    """log SPPL from fused, batched, padded log-probs equals a per-sequence log_softmax over all logits."""
    model, tok = smollm2
    chosen = ["A banana is yellow.", "Lemons."]
    rejected = ["Cucumbers are green and long, and they grow on vines in gardens.", "Blue."]
    xs, refs = [X, "Name a sour fruit."], [REF, "A lemon is sour."]
    strength, ppl_c, ppl_r = judge.preference_strength(model, tok, xs, refs, chosen, rejected, batch_size=3)

    def direct(x, ref, y):
        context = tok.encode(tok.apply_chat_template(judge.perplexity_messages(x, ref)))
        target = tok.encode(y) + [2]  # SmolLM2's <|im_end|>
        ids = torch.tensor([context + target])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).double(), dim=-1)[0]  # [T, V]
        picked = [logp[len(context) + j - 1, t] for j, t in enumerate(target)]
        return -torch.stack(picked).mean().item()

    for i in range(2):
        want_c, want_r = direct(xs[i], refs[i], chosen[i]), direct(xs[i], refs[i], rejected[i])
        assert ppl_c[i].item() == pytest.approx(want_c, abs=1e-4)
        assert ppl_r[i].item() == pytest.approx(want_r, abs=1e-4)
        assert strength[i].item() == pytest.approx(want_r - want_c, abs=2e-4)
    assert strength[0] > 0  # the answer that repeats the reference is the cheaper one to predict


def test_bad_record_is_named():
    with pytest.raises(ValueError, match="record 1 lacks"):
        judge.judge_pairs(None, None, [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p"}])


def test_judge_pairs_on_smollm2(smollm2):
    """The judge's reference is its own greedy answer under the principle; votes follow the swap rule."""
    model, tok = smollm2
    records = [{"prompt": X, "chosen": "A banana is yellow.", "rejected": "Cucumbers are green."}]
    out = judge.judge_pairs(model, tok, records, max_new_tokens=4)

    ids = tok.encode(tok.apply_chat_template(judge.answer_messages(X)))
    with torch.no_grad():  # greedy by hand: argmax of the full logits, one token at a time
        for _ in range(4):
            nxt = model(torch.tensor([ids]))[0, -1].argmax().item()
            if nxt in tok.stop_ids:
                break
            ids.append(nxt)
    n_prompt = len(tok.encode(tok.apply_chat_template(judge.answer_messages(X))))
    assert out["records"][0]["reference"] == tok.decode(ids[n_prompt:])

    r = out["records"][0]
    assert r["verdict"] in ("A", "B") and r["verdict_swapped"] in ("A", "B")  # forced after "Verdict:"
    expected = {("A", "B"): "chosen", ("B", "A"): "rejected"}.get((r["verdict"], r["verdict_swapped"]))
    assert r["winner"] == expected
    assert (out["n"], out["n_voted"], out["no_vote"]) == (1, int(expected is not None), int(expected is None))
    assert out["agreement"] == float(expected == "chosen")
    assert r["strength"] == pytest.approx(r["log_ppl_rejected"] - r["log_ppl_chosen"])
    assert out["perplexity_accuracy"] == float(r["strength"] > 0)


def test_judge_memo_reuses_greedy_completions(smollm2, monkeypatch):
    """With a memo, the same prompts are never decoded twice, and the outcome is unchanged."""
    model, tok = smollm2
    records = [{"prompt": X, "chosen": "A banana is yellow.", "rejected": "Cucumbers are green."}]
    plain = judge.judge_pairs(model, tok, records, max_new_tokens=4)
    memo, calls = {}, []
    complete = judge.complete
    monkeypatch.setattr(judge, "complete", lambda m, t, prompts, **kw: calls.append(len(prompts))
                        or complete(m, t, prompts, **kw))
    first = judge.judge_pairs(model, tok, records, max_new_tokens=4, memo=memo)
    n_first = sum(calls)
    again = judge.judge_pairs(model, tok, records * 2, max_new_tokens=4, memo=memo)
    assert n_first >= 3 and sum(calls) == n_first  # reference + 2 critiques (+ cues), then nothing new
    # the texts and verdicts exactly; the perplexities, scored in batches of another size, to float rounding
    # (some CPUs' kernels sum in another order at another batch size)
    texts = lambda rs: [{k: v for k, v in r.items() if not isinstance(v, float)} for r in rs]  # noqa: E731
    scores = lambda rs: [v for r in rs for v in r.values() if isinstance(v, float)]  # noqa: E731
    assert texts(first["records"]) == texts(plain["records"]) and texts(again["records"]) == texts(plain["records"]) * 2
    assert scores(first["records"]) == pytest.approx(scores(plain["records"]), rel=1e-5)
    assert scores(again["records"]) == pytest.approx(scores(plain["records"]) * 2, rel=1e-5)
