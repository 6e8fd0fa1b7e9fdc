"""Self-reference AI feedback: a model judges two answers against its own answer.

After Bao et al., "Aligning Large Language Models from Self-Reference AI Feedback with
one General Principle" (arXiv 2406.11190). Under one general principle the judge
1. answers the instruction itself (greedy): its *reference*;
2. with that answer still in the conversation, critiques candidates A and B and ends
   with a parseable line "Verdict: A" or "Verdict: B";
3. does step 2 again with A and B swapped. Only a verdict that survives the swap
   counts (self-consistency against position bias); otherwise the pair gets no vote.

Preference strength comes from *semantic perplexity*: the judge's per-token perplexity
of a candidate y when its context is the principle, the instruction x and the judge's
own reference answer r (followed by a request to answer again),

    SPPL(y) = exp( -1/|y| * sum_t log p_judge(y_t | principle, x, r, y_<t) ).

A candidate that says what the reference says is cheap to predict with r in context,
so low SPPL means semantically close to the judge's own answer. We define the strength
of "chosen over rejected" as log SPPL(rejected) - log SPPL(chosen) (> 0: the judge's
perplexity prefers chosen). The paper's exact formula is not public (its code does not
include it); this is our reading of its abstract.
"""

import json
import re

import torch

from ..batches import collate_groups, response_tokens
from ..generate import generate
from ..logprobs import packed_logprobs
from ..tokenizer import end_of_turn_id

PRINCIPLE = "The best response is the one that is best for humanity: the most helpful, honest and harmless."
JUDGE_REQUEST = (
    "Two assistants also answered my instruction. Using your own answer above as the reference, "
    "critique both answers under the principle, then decide which one is better.\n\n"
    "[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
    'Write a short critique of each answer, then end with one final line: "Verdict: A" or "Verdict: B".'
)
REPEAT_REQUEST = "Please answer my instruction once more."
VERDICT_CUE = "\n\nVerdict:"  # appended after a critique that ended without a verdict
_VERDICT = re.compile(r"(?i:verdict)\W*(?:(?i:answer|response)\s*)?\[?([AB])\b")


# ---------------------------------------------------------------------------------------
# Pure string functions: the three conversations and the verdict.


def system_message(principle: str = PRINCIPLE) -> dict:
    return {"role": "system", "content": f"You are a careful, helpful assistant. Principle: {principle}"}


def answer_messages(instruction: str, principle: str = PRINCIPLE) -> list[dict]:
    """Step 1: the judge answers the instruction itself."""
    return [system_message(principle), {"role": "user", "content": instruction}]


def judge_messages(instruction: str, reference: str, a: str, b: str, principle: str = PRINCIPLE) -> list[dict]:
    """Step 2: with its own answer in the conversation, critique A and B and give a verdict."""
    return answer_messages(instruction, principle) + [
        {"role": "assistant", "content": reference},
        {"role": "user", "content": JUDGE_REQUEST.format(a=a, b=b)},
    ]


def perplexity_messages(instruction: str, reference: str, principle: str = PRINCIPLE) -> list[dict]:
    """The context under which a candidate's semantic perplexity is measured (it is the next assistant turn)."""
    return answer_messages(instruction, principle) + [
        {"role": "assistant", "content": reference},
        {"role": "user", "content": REPEAT_REQUEST},
    ]


def parse_verdict(text: str) -> str | None:
    """"A" or "B" from the last "Verdict: X" in the text (also "Verdict: Answer B", "verdict - [A]"), else None."""
    found = _VERDICT.findall(text or "")
    return found[-1] if found else None


def combine_verdicts(verdict: str | None, verdict_swapped: str | None) -> str | None:
    """The winner in the original order if both orders agree, else None (no vote).

    In the swapped judgment "A" names the original B, so agreement is ("A", "B") or ("B", "A").
    """
    if verdict is not None and verdict_swapped is not None and verdict != verdict_swapped:
        return verdict
    return None


# ---------------------------------------------------------------------------------------
# Semantic perplexity.


@torch.no_grad()
def response_logprobs(model, tokenizer, contexts, responses, batch_size: int = 8, capped=None):
    """(sum of log p(response + end-of-turn | chat(context)), their token count), each [N] float32 on CPU.

    capped: [N] bools; a capped response is scored without the end-of-turn token (a prefix).
    """
    if len(contexts) != len(responses):
        raise ValueError(f"response_logprobs: {len(contexts)} contexts but {len(responses)} responses")
    eot = end_of_turn_id(tokenizer)
    capped = [False] * len(responses) if capped is None else capped
    sequences = [(tokenizer.encode_chat(c), response_tokens(tokenizer, y, cap, eot))
                 for c, y, cap in zip(contexts, responses, capped, strict=True)]
    device = model.lm_head_weight.device
    sums, counts = [], []
    for i in range(0, len(sequences), batch_size):  # a few sequences per packed row, each its own group
        groups = [(prompt, [response]) for prompt, response in sequences[i:i + batch_size]]
        logp_sum, n_tokens = packed_logprobs(model, collate_groups(groups, device))  # [b]
        sums.append(logp_sum.float().cpu())
        counts.append(n_tokens.float().cpu())
    return torch.cat(sums), torch.cat(counts)


def semantic_log_perplexity(model, tokenizer, instructions, references, responses, principle=PRINCIPLE,
                            batch_size: int = 8) -> torch.Tensor:
    """log SPPL(y) = -mean_t log p_judge(y_t | principle, x, reference, y_<t) for each response: [N]."""
    contexts = [perplexity_messages(x, r, principle) for x, r in zip(instructions, references, strict=True)]
    logp_sum, n_tokens = response_logprobs(model, tokenizer, contexts, responses, batch_size)
    return -logp_sum / n_tokens


def preference_strength(model, tokenizer, instructions, references, chosen, rejected, principle=PRINCIPLE,
                        batch_size: int = 8):
    """strength = log SPPL(rejected) - log SPPL(chosen), with both log SPPLs: three [N] tensors."""
    n = len(chosen)
    log_ppl = semantic_log_perplexity(model, tokenizer, list(instructions) * 2, list(references) * 2,
                                      list(chosen) + list(rejected), principle, batch_size)  # [2N]
    return log_ppl[n:] - log_ppl[:n], log_ppl[:n], log_ppl[n:]


# ---------------------------------------------------------------------------------------
# The judge.


def complete(model, tokenizer, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, n=1, seed=None,
             stop_strings=(), progress=True) -> list[str]:
    """Text in, text out: each prompt is raw text (used as is, e.g. few-shot) or a list of chat
    messages (rendered with the chat template). Returns n strings per prompt, in prompt order,
    each cut before the first of `stop_strings`."""
    if any(not s for s in stop_strings):
        raise ValueError("complete: stop_strings contains an empty string")
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids.append(tokenizer.encode(p))
        elif isinstance(p, list) and all(isinstance(m, dict) for m in p):
            ids.append(tokenizer.encode_chat(p, add_generation_prompt=True))
        else:
            raise ValueError(f"complete: prompt {i} is a {type(p).__name__}; expected text or a list of messages")
    outs = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    stop_ids=tokenizer.stop_ids, n=n, seed=seed, progress=progress)
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    return [min((t.split(s, 1)[0] for s in stop_strings), key=len, default=t) for t in texts]


def greedy_texts(model, tokenizer, prompts, max_new_tokens: int, batch_size: int, progress: bool,
                 memo: dict | None = None) -> list[str]:
    """complete() in batches (the KV cache grows with batch x length).

    memo: a dict kept by the caller across calls with the same judge. Greedy decoding is
    deterministic, so a prompt seen before (same text, same cap) is not decoded again: an
    ablation's variants judge the same prompts, often the very same pairs.
    """
    memo = {} if memo is None else memo
    keys = [json.dumps([p, max_new_tokens]) for p in prompts]
    todo = list(dict.fromkeys(k for k in keys if k not in memo))  # new prompts, each once, in order
    for i in range(0, len(todo), batch_size):
        batch = todo[i:i + batch_size]
        texts = complete(model, tokenizer, [json.loads(k)[0] for k in batch], max_new_tokens=max_new_tokens,
                         temperature=0.0, progress=progress)
        memo.update(zip(batch, texts))
    return [memo[k] for k in keys]


def judge_pairs(model, tokenizer, records: list[dict], *, principle: str = PRINCIPLE, max_new_tokens: int = 256,
                force_verdict: bool = True, batch_size: int = 8, progress: bool = False,
                memo: dict | None = None) -> dict:
    """Judge chosen vs rejected for each record {prompt, chosen, rejected}; greedy decoding throughout.

    With force_verdict, a critique that ends without a parseable verdict is continued
    after "Verdict:" for 3 tokens (small judges rarely end on the requested line).
    memo: reuse this judge's earlier completions (see greedy_texts).
    Returns {"records": per-record details, "n", "n_voted", "no_vote", "accuracy" (chosen
    wins among voted pairs), "agreement" (chosen wins among all), "perplexity_accuracy"
    (share with strength > 0), "mean_strength"}.
    """
    for i, r in enumerate(records):
        missing = {"prompt", "chosen", "rejected"} - set(r)
        if missing:
            raise ValueError(f"judge_pairs: record {i} lacks {sorted(missing)}")
    x = [r["prompt"] for r in records]
    greedy = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, memo=memo)
    references = greedy_texts(model, tokenizer, [answer_messages(p, principle) for p in x], **greedy)
    conversations = []
    for p, ref, r in zip(x, references, records):
        conversations.append(judge_messages(p, ref, r["chosen"], r["rejected"], principle))  # A = chosen
        conversations.append(judge_messages(p, ref, r["rejected"], r["chosen"], principle))  # A = rejected
    critiques = greedy_texts(model, tokenizer, conversations, **greedy)
    verdicts = [parse_verdict(c) for c in critiques]
    unparsed = [i for i, v in enumerate(verdicts) if v is None]
    if force_verdict and unparsed:
        cued = [tokenizer.apply_chat_template(conversations[i]) + critiques[i].rstrip() + VERDICT_CUE for i in unparsed]
        for i, tail in zip(unparsed, greedy_texts(model, tokenizer, cued, 3, batch_size, False, memo)):
            verdicts[i] = parse_verdict(VERDICT_CUE + tail)
    strength, ppl_chosen, ppl_rejected = preference_strength(
        model, tokenizer, x, references, [r["chosen"] for r in records], [r["rejected"] for r in records],
        principle, batch_size,
    )
    n = len(records)
    out = []
    for i in range(n):
        winner = combine_verdicts(verdicts[2 * i], verdicts[2 * i + 1])
        out.append({
            "reference": references[i], "critique": critiques[2 * i], "critique_swapped": critiques[2 * i + 1],
            "verdict": verdicts[2 * i], "verdict_swapped": verdicts[2 * i + 1],
            "winner": {"A": "chosen", "B": "rejected", None: None}[winner],
            "log_ppl_chosen": ppl_chosen[i].item(), "log_ppl_rejected": ppl_rejected[i].item(),
            "strength": strength[i].item(),
        })
    voted = [o for o in out if o["winner"] is not None]
    wins = sum(o["winner"] == "chosen" for o in voted)
    nan = float("nan")
    return {
        "records": out, "n": n, "n_voted": len(voted), "no_vote": n - len(voted),
        "accuracy": wins / len(voted) if voted else nan,
        "agreement": wins / n if n else nan,
        "perplexity_accuracy": sum(o["strength"] > 0 for o in out) / n if n else nan,
        "mean_strength": sum(o["strength"] for o in out) / n if n else nan,
    }
