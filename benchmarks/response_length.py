"""How long the start model's plain answers are when nothing cuts them: the data for choosing a cap.

    python benchmarks/response_length.py [--prompts 64] [--max-new-tokens 1024] [--model NAME]

Samples y^o (no principle, the training sampler's settings) for the first --prompts of the
seeded prompt pool, i.e. train.py's held-out prompts, with a cap far above what training uses,
then prints the length percentiles and, for each candidate cap, the share of answers that end
before it. A cap is high enough for the length and stopping measures when at least 80% do.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sso_mini.checkpoint import DEFAULT_MODEL, load_model  # noqa: E402
from sso_mini.records import default_prompts, sample_plain  # noqa: E402

CAPS = (64, 128, 192, 256, 384, 512, 768, 1024)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/response_length.json")
    args = ap.parse_args(argv)
    pool = default_prompts()
    random.Random(args.seed).shuffle(pool)  # the order train.py holds its first prompts out in
    model, tokenizer = load_model(args.model)
    start = time.time()
    rows = sample_plain(model, tokenizer, pool[:args.prompts], seed=args.seed, max_new_tokens=args.max_new_tokens,
                        batch_size=args.prompts)
    wall = time.time() - start
    lengths = sorted(len(tokenizer.encode(r["raw"])) if not r["capped"]["raw"] else args.max_new_tokens
                     for r in rows)
    n = len(lengths)
    quantiles = {f"p{q}": lengths[min(n - 1, int(q / 100 * n))] for q in (50, 80, 90)}
    ends_before = {c: sum(1 for x in lengths if x < c) / n for c in CAPS if c <= args.max_new_tokens}
    result = {"model": args.model, "prompts": n, "max_new_tokens": args.max_new_tokens, "wall_s": wall,
              "lengths": lengths, **quantiles, "ends_before": ends_before}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{n} plain answers, cap {args.max_new_tokens}: median {quantiles['p50']}, 80th percentile "
          f"{quantiles['p80']}, 90th {quantiles['p90']} tokens ({wall:.0f} s)")
    print("cap   | share ending before it")
    for c, share in ends_before.items():
        print(f"{c:<5} | {share:.2f}")


if __name__ == "__main__":
    main()
