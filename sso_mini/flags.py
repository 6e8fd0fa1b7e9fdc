"""train.py's flags: their defaults (from TrainConfig where it has one), what each allows, and the
checks that run before anything is loaded or written. `parse_args` is train.py's argument parser."""

import argparse
import math
import sys

import torch

from .checkpoint import DEFAULT_MODEL
from .distributed import check_device
from .lora import TARGETS
from .losses import FORMS, LOSS_TYPES, TERMS
from .principles import available
from .trainer import TrainConfig

# Flags that say how to run, not what: a resume may change them. Every other flag defines the
# run (resuming with a different value would mix two experiments), so a new flag is checked too.
OPERATIONAL = ("iterations", "out", "resume", "device", "dtype", "micro_batch_size", "tokens_per_micro_batch",
               "sample_batch_size", "gradient_checkpointing", "save_every", "no_progress", "ablation", "scale")
LORA_THRESHOLD = 3e9  # parameters: above this, full fine-tuning with AdamW does not fit one 80 GB GPU
EVAL_PROMPTS = 64  # held out by default (at most EVAL_SHARE of the prompts): sampled and scored every iteration
EVAL_SHARE = 0.25
DEFAULT_PRINCIPLES = "brevity"
VERIFIER_SHARE = 0.25  # where the principles have no rule check, a quarter of the prompts carry one instead
POLICY_FORMS = tuple(f for f in FORMS if f != "generator")  # --recipe v2 trains the generator's form itself


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other failure of train.py
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(description="Self-Steering Optimization (arXiv 2410.17131)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF model folder or known name (default: %(default)s)")
    ap.add_argument("--prompts", help=".txt (one per line) or .jsonl (prompt/instruction); default: AlpacaEval")
    ap.add_argument("--pairs", help="train on this pairs.jsonl (one iteration, no sampling)")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--prompts-per-iteration", type=int, default=64)
    ap.add_argument("--eval-prompts", type=int, default=None,
                    help=f"prompts held out of training and evaluated every iteration (default: {EVAL_PROMPTS}, or "
                         f"a {EVAL_SHARE:g} share of a smaller prompt file; 0: off); with --pairs, records of the file "
                         "held out (default 0)")
    ap.add_argument("--principles", default=DEFAULT_PRINCIPLES,
                    help=f"principle set: a name ({', '.join(available())}) or a .toml file (docs/principles.md); "
                         "default: %(default)s")
    ap.add_argument("--verifier-share", type=float, default=None,
                    help="share of prompts replaced by ones with a checkable IFEval instruction (default: "
                         f"{VERIFIER_SHARE} with a principle set that has no rule checks, else 0)")
    ap.add_argument("--loss", help=f"base preference loss: {' | '.join(LOSS_TYPES)} (default: ipo; v2: dpo)")
    ap.add_argument("--recipe", default="v1", choices=["v1", "v2"], help="v1: SSO trains the policy; v2: SSO trains a "
                    "data generator and the policy learns the base loss on its pairs (docs/algorithm.md)")
    ap.add_argument("--form", default=TrainConfig.form, help=f"v1's SSO objective: {' | '.join(POLICY_FORMS)}")
    ap.add_argument("--generator-terms", default="pos,neg", help="v2: the generator's L+ (pos), L- (neg) or both")
    ap.add_argument("--neg-pair", default="eq4", choices=["eq4", "eq3"],
                    help="v2: L- prefers y^o over y+ under x- (Eq. 4) or y- over y+ (Eq. 3)")
    ap.add_argument("--no-w", action="store_true", help="ablation: drop the weight W")
    ap.add_argument("--no-g", action="store_true", help="ablation: drop the self-steering term G")
    ap.add_argument("--theta", type=float, default=TrainConfig.theta, help="weight of G")
    ap.add_argument("--alpha", type=float, default=TrainConfig.alpha, help="weight of y+ in W")
    ap.add_argument("--beta", type=float, default=None, help="loss beta (default: 0.2 IPO, 0.1 DPO)")
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="records per optimizer step")
    ap.add_argument("--micro-batch-size", type=int, default=TrainConfig.micro_batch_size,
                    help="records per forward (6 sequences, 3 prompts, packed in one row)")
    ap.add_argument("--tokens-per-micro-batch", type=int, default=None,
                    help="instead: as many records per forward as fit in this many tokens (default: on CUDA, "
                         "what the GPU's free memory holds by sso_mini.lora's memory model, up to 16384; 0 = off)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="response length cap when sampling")
    ap.add_argument("--sample-batch-size", type=int, default=None,
                    help="rows per sampler batch (default: 48 on the CPU; on CUDA, what half the free memory holds, "
                         "up to 512)")
    ap.add_argument("--cutoff", type=int, default=TrainConfig.cutoff, help="max tokens of a training sequence")
    ap.add_argument("--logprob-filter", action="store_true",
                    help="keep only pairs whose log-probs move the right way with the principles")
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                    help=f"train low-rank adapters (default: on for CUDA models above {LORA_THRESHOLD / 1e9:.0f}B)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--lora-targets", default=",".join(TARGETS), help="comma-separated projection names")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="recompute each block in the backward (default: on CUDA where one record would not fit "
                         "the GPU's memory without it; off on the CPU)")
    ap.add_argument("--save-every", type=int, default=TrainConfig.save_every, help="steps between resume points")
    ap.add_argument("--out", default="runs/sso", help="run folder")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out")
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="weight dtype (default float32)")
    ap.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast for scoring and training, fp32 master weights (default: on where bf16 "
                         "matmuls are native: a GPU, or a CPU with AVX512-BF16 or AMX; --no-autocast: plain fp32)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--ablation", action="store_true",
                    help="SSO, w/o W, w/o G and PBAA from the same start, compared (sso_mini/eval/ablation.py)")
    ap.add_argument("--scale", type=int, default=1, help="--ablation: multiply its small default sizes")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    args.loss = args.loss or ("dpo" if args.recipe == "v2" else TrainConfig.loss_type)  # v2's main results: DPO
    if args.recipe == "v2" and args.pairs:
        ap.error("--recipe v2 samples the policy's pairs with its generator; --pairs is for --recipe v1")
    if args.loss not in LOSS_TYPES:
        ap.error(f"unknown --loss {args.loss!r} (choose from {', '.join(LOSS_TYPES)})")
    if args.form not in POLICY_FORMS:
        ap.error(f"unknown --form {args.form!r} (choose from {', '.join(POLICY_FORMS)})")
    if not args.generator_terms or set(args.generator_terms.split(",")) - set(TERMS):
        ap.error(f"--generator-terms {args.generator_terms!r}: give pos, neg or pos,neg")
    unknown = [t for t in args.lora_targets.split(",") if t not in TARGETS]
    if unknown:
        ap.error(f"unknown --lora-targets {', '.join(unknown)} (valid: {', '.join(TARGETS)})")
    for flag, ok, allowed in RANGES:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and (not math.isfinite(value) or not ok(value, args)):
            ap.error(f"{flag} {value} is out of range (allowed: {allowed})")
    device_error = check_device(args.device)
    if device_error:
        ap.error(device_error)
    args.iterations = 1 if args.pairs else args.iterations  # --pairs: one iteration on the file
    return args


# Every numeric flag's range, checked before anything is loaded: (flag, test, what is allowed).
RANGES = (
    ("--iterations", lambda v, a: v >= 1, ">= 1"), ("--prompts-per-iteration", lambda v, a: v >= 1, ">= 1"),
    ("--eval-prompts", lambda v, a: v >= 0, ">= 0; 0 turns the held-out evaluation off"),
    ("--verifier-share", lambda v, a: 0 <= v <= 1, "0 to 1"), ("--alpha", lambda v, a: 0 <= v <= 1, "0 to 1"),
    ("--theta", lambda v, a: v >= 0, ">= 0"), ("--beta", lambda v, a: v > 0, "> 0"),
    ("--batch-size", lambda v, a: v >= 1, ">= 1"), ("--lr", lambda v, a: v >= 0, ">= 0; 0 keeps the policy as is"),
    ("--micro-batch-size", lambda v, a: 1 <= v <= a.batch_size, "1 to --batch-size"),
    ("--tokens-per-micro-batch", lambda v, a: v >= 0, ">= 0; 0 is off"),
    ("--max-new-tokens", lambda v, a: v >= 1, ">= 1"), ("--sample-batch-size", lambda v, a: v >= 1, ">= 1"),
    ("--cutoff", lambda v, a: v >= 2, ">= 2 tokens"), ("--save-every", lambda v, a: v >= 1, ">= 1 steps"),
    ("--lora-rank", lambda v, a: v >= 1, ">= 1"), ("--lora-alpha", lambda v, a: v > 0, "> 0"),
    ("--lora-dropout", lambda v, a: 0 <= v < 1, "0 to below 1"), ("--scale", lambda v, a: v >= 1, ">= 1"),
)
