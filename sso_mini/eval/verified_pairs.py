"""Preference pairs labelled by rule-based verifiers: a test set for reward models.

Human-labelled preference sets (RewardBench and the like) are not available offline, so
sso-mini scores reward models on pairs whose label is objective:

    base task (written here) + 1..k instructions from IFEval's own generators
      -> `samples` answers from the starting model (temperature sampling)
      -> every instruction passes (strict) = chosen, any fails = rejected
      -> prompts with both outcomes keep one (chosen, rejected) pair each

One pair per prompt keeps the pairs independent, so a binomial interval on the accuracy
is honest. The generators never produce the 541 IFEval evaluation prompts: the base tasks
are ours and the instruction arguments are random draws, seeded per prompt.
"""

import json
import random
from pathlib import Path

from .. import rules
from ..assets import write_json
from ..checkable import BASE_TASKS, SKIPPED_INSTRUCTIONS, draw_prompts
from ..checkpoint import load_model
from ..generate import generate_batched
from ..records import write_jsonl
from ..tokenizer import prompt_ids


def sample_answers(model, tokenizer, records, *, samples, temperature, top_p, max_new_tokens, seed, batch_size,
                   progress=True) -> list[list[list[int]]]:
    """`samples` answer token lists per record, to the user prompt alone (no system message)."""
    ids = [prompt_ids(tokenizer, "", r["prompt"]) for r in records]
    flat = generate_batched(model, ids, batch_size=batch_size, seed=seed, n=samples, progress=progress,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop_ids=tokenizer.stop_ids)
    return [flat[j * samples:(j + 1) * samples] for j in range(len(records))]


def label_pairs(tokenizer, records, answers, *, seed, max_new_tokens) -> tuple[list[dict], dict]:
    """Verify every answer; a prompt with both outcomes gives one random (pass, fail) pair."""
    kept, counts = [], {"all_pass": 0, "all_fail": 0, "mixed": 0, "strict_pass": 0, "capped": 0}
    for r, ids in zip(records, answers):
        counts["capped"] += sum(len(a) >= max_new_tokens for a in ids)
        responses = [tokenizer.decode(a).strip() for a in ids]
        passes = [all(rules.check(r, y)[0]) for y in responses]
        counts["strict_pass"] += sum(passes)
        if all(passes) or not any(passes):
            counts["all_pass" if all(passes) else "all_fail"] += 1
            continue
        counts["mixed"] += 1
        rng = random.Random(f"{seed}-pair-{r['key']}")
        chosen = rng.choice([i for i, ok in enumerate(passes) if ok])
        rejected = rng.choice([i for i, ok in enumerate(passes) if not ok])
        kept.append({**r, "chosen": responses[chosen], "rejected": responses[rejected], "responses": responses,
                     "strict_pass": passes,  # a capped answer is scored as the prefix it is (batches.response_ids)
                     "capped": {"chosen": len(ids[chosen]) >= max_new_tokens,
                                "rejected": len(ids[rejected]) >= max_new_tokens}})
    return kept, counts


def build_testset(model, tokenizer, n_prompts, *, seed=0, samples=4, temperature=0.8, top_p=1.0, max_new_tokens=128,
                  max_instructions=2, batch_size=16, progress=True) -> tuple[list[dict], dict]:
    """Draw prompts, sample answers, label them: (kept pair records, counts)."""
    records, dropped = draw_prompts(n_prompts, seed, max_instructions)
    answers = sample_answers(model, tokenizer, records, samples=samples, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, progress=progress)
    kept, counts = label_pairs(tokenizer, records, answers, seed=seed, max_new_tokens=max_new_tokens)
    return kept, {"prompts": len(records), "dropped_nth_paragraph": dropped, "responses": len(records) * samples,
                  **counts, "kept": len(kept)}


def cmd_build_testset(args):
    """`python -m sso_mini.eval.reward build-testset`: write the test set and its recipe (the settings) beside it."""
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists: a test set is written once (use --force to rebuild it)")
    model, tokenizer = load_model(args.model, device=args.device)
    settings = {"seed": args.seed, "model": str(args.model), "n_prompts": args.n_prompts, "samples": args.samples,
                "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                "max_instructions": args.max_instructions, "base_tasks": len(BASE_TASKS),
                "skipped_instructions": list(SKIPPED_INSTRUCTIONS), "verifiers": rules.VERIFIERS_WHEEL,
                "label": "chosen: every instruction passes (strict); rejected: one fails; one pair per prompt"}
    kept, counts = build_testset(model, tokenizer, args.n_prompts, seed=args.seed, samples=args.samples,
                                 temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                 max_instructions=args.max_instructions, batch_size=args.batch_size)
    if not kept:
        raise ValueError(f"no prompt had both a passing and a failing answer ({counts}); nothing written")
    write_jsonl(out, kept)
    write_json(out.with_suffix(".recipe.json"), {**settings, "counts": counts})
    print(f"{out}: {len(kept)} pairs; {json.dumps(counts)}")
