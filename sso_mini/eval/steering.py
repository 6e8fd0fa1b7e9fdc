"""Do your principles steer your model? Measure it before spending an SSO run on them.

SSO learns only where y+ (sampled under the good principle) and y- (under the bad one) differ
in the way the principle says. For every feature of one or more principle sets, alone in the
system prompt as train.py writes it, the model samples y+ and y- for N prompts, and one plain
y^o per prompt (no principle, shared by every feature); each feature's rule check then says
how often each shows the good behaviour:

    feature | y+ pass | y- pass | y^o pass | decided pairs (y+ right) | signal acc [95% CI] | mean tokens y+/y-/y^o

A feature steers when y+ passes far more often than y^o and y- far less; the decided pairs
(exactly one of y+, y- passes) are the rule-checkable signal SSO trains on, and their signal
accuracy is the share where y+ is the one that passes. Features without a check show lengths only.

    python -m sso_mini.eval.steering --principles brevity,paper [--prompts 32] [--max-new-tokens 160]
        [--model DIR] [--out steering.json]

The prompts are the last N of train.py's seeded AlpacaEval order (--prompts-file: your own),
prompts the default run neither trains nor evaluates on; sampling is train.py's (temperature
0.7, top-p 0.8), in fp32.
"""

import argparse
import random
import sys

from ..assets import write_json
from ..checkpoint import DEFAULT_MODEL, load_model
from ..generate import generate_batched
from ..principles import load_principles
from ..records import SAMPLING, default_prompts, load_prompts
from ..tokenizer import prompt_ids
from ..metrics import decided_pairs, wilson_interval


def steering_prompts(n: int, seed: int = 0, path=None) -> list[str]:
    """N prompts: the last N of train.py's shuffled pool (or of a prompts file)."""
    pool = load_prompts(path) if path else default_prompts()
    random.Random(seed).shuffle(pool)
    return pool[-n:]


def measure(model, tokenizer, sets, prompts, *, max_new_tokens, seed=0, batch_size=48, progress=True) -> list[dict]:
    """One row per (set, feature): pass rates of y+, y-, y^o under its check, decided pairs, lengths, and
    every response (y^o, one per prompt, is the same in every row)."""
    def sample(rows, offset):
        outs = generate_batched(model, rows, batch_size=batch_size, seed=seed + offset, max_new_tokens=max_new_tokens,
                                **SAMPLING, stop_ids=tokenizer.stop_ids, progress=progress, desc="steering")
        return [(tokenizer.decode(ids).strip(), len(ids) >= max_new_tokens, len(ids)) for ids in outs]

    raw = sample([prompt_ids(tokenizer, "", x) for x in prompts], 0)
    table = []
    for s_i, principles in enumerate(sets):
        for f_i, name in enumerate(principles.features):
            p_system, n_system = principles.system_prompts([name])
            rows = [prompt_ids(tokenizer, system, x) for x in prompts for system in (p_system, n_system)]
            out = sample(rows, 1000 * (s_i + 1) + 10 * (f_i + 1))
            pos, neg = out[0::2], out[1::2]
            row = {"set": principles.name, "feature": name, "n": len(prompts),
                   "tokens": {k: sum(t for *_, t in side) / len(side) for k, side in
                              (("y_pos", pos), ("y_neg", neg), ("y_raw", raw))},
                   "ended": {k: sum(not c for _, c, _ in side) / len(side) for k, side in
                             (("y_pos", pos), ("y_neg", neg), ("y_raw", raw))},
                   "responses": {k: [{"text": text, "capped": capped} for text, capped, _ in side]
                                 for k, side in (("y_pos", pos), ("y_neg", neg), ("y_raw", raw))}}
            if principles.features[name].check:
                verdicts = {k: [principles.passes(name, text, capped) for text, capped, _ in side]
                            for k, side in (("y_pos", pos), ("y_neg", neg), ("y_raw", raw))}
                row["pass"] = {k: sum(v) / len(v) for k, v in verdicts.items()}
                row["pass_interval"] = {k: wilson_interval(sum(v), len(v)) for k, v in verdicts.items()}
                row["signal"] = decided_pairs(list(zip(verdicts["y_pos"], verdicts["y_neg"])))
            table.append(row)
    return table


def markdown(table) -> str:
    lines = ["| set | feature | y+ pass | y- pass | y^o pass | decided pairs (y+ right) | signal acc [95% CI] | "
             "mean tokens y+ / y- / y^o | ended y+ / y- / y^o |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        t, e = r["tokens"], r["ended"]
        if "pass" in r:
            p, g = r["pass"], r["signal"]
            acc = ("-" if g["accuracy"] is None else
                   f"{g['accuracy']:.2f} [{g['interval'][0]:.2f}, {g['interval'][1]:.2f}]")
            checked = (f"{p['y_pos']:.2f} | {p['y_neg']:.2f} | {p['y_raw']:.2f} | {g['decided']} ({g['pos_only']}) "
                       f"| {acc}")
        else:
            checked = "- | - | - | - | -"
        lines.append(f"| {r['set']} | {r['feature']} | {checked} | {t['y_pos']:.0f} / {t['y_neg']:.0f} / "
                     f"{t['y_raw']:.0f} | {e['y_pos']:.2f} / {e['y_neg']:.2f} / {e['y_raw']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--principles", default="paper", help="comma-separated set names or .toml files")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=32, help="how many prompts")
    ap.add_argument("--prompts-file", help="your own prompts (.txt or .jsonl, as train.py reads them)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write every number and every response to this JSON file")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.prompts < 1 or args.max_new_tokens < 1:
            raise ValueError("--prompts and --max-new-tokens must be >= 1")
        sets = [load_principles(name) for name in args.principles.split(",")]
        prompts = steering_prompts(args.prompts, args.seed, args.prompts_file)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model)
    table = measure(model, tokenizer, sets, prompts, max_new_tokens=args.max_new_tokens, seed=args.seed,
                    progress=not args.no_progress)
    print(markdown(table))
    if args.out:
        write_json(args.out, {"settings": vars(args), "prompts": prompts, "rows": table})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
