"""Scoring only the sequences a loss reads, against scoring all six, on real records and the real SmolLM2.

For each recipe: the tokens the reference pass forwards and its time, when every record's six sequences are scored
(as before) and when only the columns the recipe's loss reads are (sso_mini.losses.columns_read); both in this
process, one after the other (the fastest of two runs each), and the read columns' log-probs compared.

    python benchmarks/bench_columns.py [--pairs iter_0/pairs.jsonl] [--prompts 32] [--max-new-tokens 64]

Without --pairs the default model samples records for the first --prompts AlpacaEval prompts under `brevity`, as
train.py's first iteration does.
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sso_mini.checkpoint import load_model  # noqa: E402
from sso_mini.principles import load_principles  # noqa: E402
from sso_mini.records import build_records, default_prompts, read_jsonl  # noqa: E402
from sso_mini.trainer import TrainConfig, bf16_is_native, score_records  # noqa: E402

RECIPES = {"SSO (v1)": dict(), "w/o G": dict(use_g=False), "PBAA, v2's policy stage": dict(use_w=False, use_g=False),
           "v2's generator": dict(form="generator")}


def timed_reference(model, tok, records, cfg, repeats=2):
    """The reference pass's log-probs, the tokens it forwards, and its fastest time of `repeats`."""
    seen, forward, seconds = [0], model.hidden_states, []
    model.hidden_states = lambda ids, *a, **k: seen.__setitem__(0, seen[0] + ids.numel()) or forward(ids, *a, **k)
    for _ in range(repeats):
        start = time.perf_counter()
        logps = score_records(model, tok, records, cfg, progress=False)
        seconds.append(time.perf_counter() - start)
    del model.hidden_states
    return logps, seen[0] // repeats, min(seconds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", help="a pairs.jsonl to score (default: sample records now)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model("SmolLM2-135M-Instruct")
    if args.pairs:
        records = read_jsonl(args.pairs)
    else:
        records, _ = build_records(model, tok, default_prompts()[:args.prompts], load_principles("brevity"), seed=0,
                                   max_new_tokens=args.max_new_tokens, progress=False)
    base = TrainConfig(autocast=bf16_is_native(torch.device("cpu")))
    print(f"{len(records)} records; autocast {base.autocast}; torch {torch.__version__}")
    print("| recipe | columns read | tokens, all six | tokens, read | ratio | seconds, all six | seconds, read | "
          "speed-up | max difference |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    every = None
    for name, settings in RECIPES.items():
        cfg = replace(base, **settings)
        if every is None:  # v1 reads all six: scoring them once serves every row's "all six" column
            every = timed_reference(model, tok, records, base)
        logps, tokens, seconds = timed_reference(model, tok, records, cfg)
        cols = list(cfg.columns)
        diff = (logps[:, cols] - every[0][:, cols]).abs().max().item()
        print(f"| {name} | {len(cols)} | {every[1]:,} | {tokens:,} | {tokens / every[1]:.2f} | {every[2]:.1f} | "
              f"{seconds:.1f} | {every[2] / seconds:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
