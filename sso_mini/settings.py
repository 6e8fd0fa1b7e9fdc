"""A run's settings: train.py's flags in one table, checked and resolved once into `Settings` before any
work, and the run folder whose run.json records them.

Resolving decides every default that depends on the machine or the data (LoRA above 3B on a GPU, bf16
autocast where it is native, the held-out share of a small prompt file, the GPU's micro-batch plan), so
nothing downstream rewrites a setting. Two settings follow the data as it comes: the sampler's rows per batch
(unless given) follow each batch's lengths, and on a GPU each iteration's micro-batches follow its longest record
(memory.planned_config). A bad flag or input file stops here with one `error:` line.
"""

import argparse
import atexit
import json
import math
import os
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .assets import write_atomic, write_json
from .checkpoint import DEFAULT_MODEL, resolve
from .config import ModelConfig
from .losses import FORMS, LOSS_TYPES, TERMS
from .principles import PrincipleSet, available, load_principles
from .records import default_prompts, load_prompts, read_jsonl
from .tokenizer import Tokenizer, prompt_ids
from .trainer import ONE_PROCESS, TrainConfig, bf16_is_native

LORA_THRESHOLD = 3e9  # parameters: above this, full fine-tuning with AdamW does not fit one 80 GB GPU
EVAL_PROMPTS = 64  # held out by default (at most EVAL_SHARE of the prompts): sampled and scored every iteration
EVAL_SHARE = 0.25
VERIFIER_SHARE = 0.25  # where the principles have no rule check, a quarter of the prompts carry one instead
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POLICY_FORMS = tuple(f for f in FORMS if f != "generator")  # --recipe v2 trains the generator's form itself
D = TrainConfig  # the training flags take their defaults from TrainConfig

# Every flag: argparse's keywords (a bool default or None with BooleanOptionalAction: a switch).
FLAGS = {
    "--model": dict(default=DEFAULT_MODEL, help="HF model folder or a model's name (find_model.py); "
                    "default: %(default)s"),
    "--prompts": dict(help=".txt (one per line) or .jsonl (prompt/instruction); default: AlpacaEval"),
    "--pairs": dict(help="train on this pairs.jsonl (one iteration, no sampling)"),
    "--iterations": dict(type=int, default=2),
    "--prompts-per-iteration": dict(type=int, default=64),
    "--eval-prompts": dict(type=int, help=f"prompts held out of training and evaluated every iteration (default: "
                           f"{EVAL_PROMPTS}, or a {EVAL_SHARE:g} share of a smaller prompt file; 0: off); with "
                           "--pairs, records of the file held out (default 0)"),
    "--principles": dict(default="brevity", help=f"principle set: a name ({', '.join(available())}) or a .toml file "
                         "(docs/principles.md); default: %(default)s"),
    "--verifier-share": dict(type=float, help="share of prompts replaced by ones with a checkable IFEval instruction "
                             f"(default: {VERIFIER_SHARE} with a principle set that has no rule checks, else 0)"),
    "--loss": dict(help=f"base preference loss: {' | '.join(LOSS_TYPES)} (default: ipo; v2: dpo)"),
    "--recipe": dict(default="v1", choices=["v1", "v2"], help="v1: SSO trains the policy; v2: SSO trains a data "
                     "generator and the policy learns the base loss on its pairs (docs/algorithm.md)"),
    "--form": dict(default=D.form, help=f"v1's SSO objective: {' | '.join(POLICY_FORMS)}"),
    "--generator-terms": dict(default="pos,neg", help="v2: the generator's L+ (pos), L- (neg) or both"),
    "--neg-chosen": dict(default="y_raw", choices=["y_raw", "y_neg"],
                         help="v2: what L- prefers over y+ under x-: y^o (v2 Eq. 4) or y- (Eq. 3)"),
    "--no-w": dict(action="store_true", help="ablation: drop the weight W"),
    "--no-g": dict(action="store_true", help="ablation: drop the self-steering term G"),
    "--theta": dict(type=float, default=D.theta, help="weight of G"),
    "--alpha": dict(type=float, default=D.alpha, help="weight of y+ in W"),
    "--beta": dict(type=float, help="loss beta (default: 0.2 IPO, 0.1 DPO)"),
    "--lr": dict(type=float, default=D.lr),
    "--batch-size": dict(type=int, default=D.batch_size, help="records per optimizer step"),
    "--micro-batch-size": dict(type=int, default=D.micro_batch_size,
                               help="records per forward (6 sequences, 3 prompts, packed in one row)"),
    "--tokens-per-micro-batch": dict(type=int, help="instead: as many records per forward as fit in this many tokens "
                                     "(default: on CUDA, what the GPU's free memory holds by sso_mini.memory's model, "
                                     "up to 16384; 0 = off)"),
    "--max-new-tokens": dict(type=int, default=64, help="response length cap when sampling"),
    "--sample-batch-size": dict(type=int, help="rows per sampler batch (default: 48 on the CPU; on CUDA, what half "
                                "the free memory holds, up to 512)"),
    "--cutoff": dict(type=int, default=D.cutoff, help="max tokens of a training sequence"),
    "--logprob-filter": dict(action="store_true",
                             help="keep only pairs whose log-probs move the right way with the principles"),
    "--lora": dict(action=argparse.BooleanOptionalAction,
                   help=f"train low-rank adapters (default: on for CUDA models above {LORA_THRESHOLD / 1e9:.0f}B)"),
    "--lora-rank": dict(type=int, default=16),
    "--lora-alpha": dict(type=float, default=32.0),
    "--lora-dropout": dict(type=float, default=0.0),
    "--lora-targets": dict(default=",".join(LORA_TARGETS), help="comma-separated projection names"),
    "--gradient-checkpointing": dict(action=argparse.BooleanOptionalAction,
                                     help="recompute each block in the backward (default: on CUDA where one record "
                                     "would not fit the GPU's memory without it; off on the CPU)"),
    "--save-every": dict(type=int, default=D.save_every, help="steps between resume points"),
    "--out": dict(default="runs/sso", help="run folder"),
    "--resume": dict(action="store_true", help="continue the run in --out"),
    "--seed": dict(type=int, default=D.seed),
    "--device": dict(default="cuda" if torch.cuda.is_available() else "cpu"),
    "--dtype": dict(choices=["float32", "bfloat16"], help="weight dtype (default float32)"),
    "--autocast": dict(action=argparse.BooleanOptionalAction,
                       help="bf16 autocast for scoring and training, fp32 master weights (default: on where bf16 "
                       "matmuls are native: a GPU, or a CPU with AVX512-BF16 or AMX; --no-autocast: plain fp32)"),
    "--no-progress": dict(action="store_true", help="no progress bars"),
}
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
    ("--lora-dropout", lambda v, a: 0 <= v < 1, "0 to below 1"),
)
# Flags that say how to run, not what: a resume may change them. Every other flag defines the run
# (resuming with a different value would mix two experiments), so a new flag is checked too.
OPERATIONAL = ("iterations", "out", "resume", "device", "dtype", "micro_batch_size", "tokens_per_micro_batch",
               "sample_batch_size", "gradient_checkpointing", "save_every", "no_progress")


class UsageError(ValueError):
    """A bad flag or input file, found before any model is loaded or file written (exit 2)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other failure of train.py
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(description="Self-Steering Optimization (arXiv 2410.17131)")
    for flag, keywords in FLAGS.items():
        ap.add_argument(flag, **keywords)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, each checked against what it allows; the parser's error exits with one line."""
    ap = build_parser()
    args = ap.parse_args(argv)
    problems = [
        (args.recipe == "v2" and args.pairs, "--recipe v2 samples the policy's pairs with its generator; --pairs is "
                                             "for --recipe v1"),
        (args.loss not in (None, *LOSS_TYPES), f"unknown --loss {args.loss!r} (choose from {', '.join(LOSS_TYPES)})"),
        (args.form not in POLICY_FORMS, f"unknown --form {args.form!r} (choose from {', '.join(POLICY_FORMS)})"),
        (not args.generator_terms or set(args.generator_terms.split(",")) - set(TERMS),
         f"--generator-terms {args.generator_terms!r}: give pos, neg or pos,neg"),
        (set(args.lora_targets.split(",")) - set(LORA_TARGETS), "unknown --lora-targets "
         f"{', '.join(t for t in args.lora_targets.split(',') if t not in LORA_TARGETS)} "
         f"(valid: {', '.join(LORA_TARGETS)})"),
        *((value is not None and (not math.isfinite(value) or not ok(value, args)),
           f"{flag} {value} is out of range (allowed: {allowed})")
          for flag, ok, allowed in RANGES for value in [getattr(args, flag[2:].replace("-", "_"))]),
        (True, device_error(args.device)),
    ]
    for bad, message in problems:
        if bad and message:
            ap.error(message)
    return args


def device_error(name: str) -> str | None:
    """Why `--device name` cannot run here, or None."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r} is not a device (allowed: cpu, cuda, cuda:N)"
    if device.type not in ("cpu", "cuda"):
        return f"--device {name}: sso-mini runs on cpu or cuda"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: this machine has no CUDA device (torch {torch.__version__}); use --device cpu"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name}: there are {torch.cuda.device_count()} CUDA devices"
    return None


@dataclass(frozen=True)
class Settings:
    """One run, resolved from the flags before any work and passed along unchanged."""

    flags: argparse.Namespace  # every flag, with its default resolved: what run.json records
    principles: PrincipleSet  # what steers y+ and y- (--principles)
    prompts: list  # the training prompts (records, with --pairs): iteration t takes the t-th slice
    held_out: list  # prompts (records) held out of training for the whole run
    checks: dict  # {prompt: its IFEval instruction} for the checkable prompts (--verifier-share)
    stages: dict  # what each stage trains, a TrainConfig: "policy"; --recipe v2 adds "generator"
    ranks: object = ONE_PROCESS  # trainer.OneProcess, or distributed.Ranks under torchrun
    memory_plan: dict | None = None  # on a GPU: memory.first_plan's, which planned_config plans each iteration from

    @property
    def device(self) -> torch.device:
        return torch.device(self.flags.device)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.flags.dtype)

    @property
    def progress(self) -> bool:
        return not self.flags.no_progress

    @property
    def out(self) -> Path:
        return Path(self.flags.out)

    def prompts_for(self, t: int) -> list:
        """Iteration t's training prompts: the t-th slice of prompts_per_iteration, wrapping round (--pairs: all)."""
        k, pool = self.flags.prompts_per_iteration, self.prompts
        return pool if self.flags.pairs else [pool[(t * k + i) % len(pool)] for i in range(min(k, len(pool)))]


def settle(args: argparse.Namespace, ranks=ONE_PROCESS) -> Settings:
    """Every default that depends on the machine or the data, decided now; the inputs read and checked (on a first
    run this fetches the default model and prompts into the cache). ValueError (with what is wrong and what is
    allowed) before any model is loaded or any run file written."""
    if ranks.size > 1 and args.batch_size % ranks.size:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the world size {ranks.size} "
                         "(allowed: k*N)")
    principles = load_principles(args.principles)
    verifier_share = args.verifier_share if args.verifier_share is not None else \
        0.0 if principles.checked else VERIFIER_SHARE  # the principles' own checks measure the signal where they can
    defaults, memory_plan = machine_defaults(args, ranks)
    flags = argparse.Namespace(**{**vars(args), **defaults,
                                  "loss": args.loss or ("dpo" if args.recipe == "v2" else D.loss_type),
                                  "verifier_share": verifier_share,
                                  "iterations": 1 if args.pairs else args.iterations})  # --pairs: one iteration
    prompts, held_out, checks = split_prompts(flags)
    flags.eval_prompts = len(held_out)
    if not args.pairs:  # the prompts' token counts: the model folder's tokenizer, not its weights
        check_cutoff(Tokenizer.from_folder(resolve(args.model)), prompts + held_out, args.cutoff, args.max_new_tokens)
    if ranks.size > 1 and flags.lora:
        raise ValueError("--lora is single-GPU only; under torchrun FSDP2 shards a full fine-tune (--no-lora)")
    return Settings(flags, principles, prompts, held_out, checks, stage_configs(flags), ranks, memory_plan)


def machine_defaults(args, ranks=ONE_PROCESS) -> tuple[dict, dict | None]:
    """LoRA only where full fine-tuning cannot fit (a big model on a GPU), its frozen base in bf16; full
    fine-tuning keeps fp32 master weights, with bf16 autocast where bf16 matmuls are native. On a GPU the
    micro-batches and gradient checkpointing are planned from its free memory (memory.py); on the CPU records
    run one per forward, without checkpointing. Returns (the flags' values, the GPU's memory plan or None)."""
    config = ModelConfig.from_json(resolve(args.model) / "config.json")  # the model's check, too
    cuda = args.device.startswith("cuda")
    lora = args.lora if args.lora is not None else cuda and config.num_parameters > LORA_THRESHOLD
    tokens, checkpointing, memory_plan = args.tokens_per_micro_batch, args.gradient_checkpointing, None
    if cuda and tokens is None:
        from .memory import first_plan

        longest = max(len(stage.columns) for stage in stage_configs(args).values()) * args.cutoff
        tokens, checkpointing, memory_plan = first_plan(args, config, lora, ranks, longest)
    native = bf16_is_native(torch.device(args.device))
    return {"lora": lora, "dtype": args.dtype or ("bfloat16" if lora and cuda else "float32"),
            "autocast": native if args.autocast is None else args.autocast,
            "tokens_per_micro_batch": tokens or 0, "gradient_checkpointing": bool(checkpointing)}, memory_plan


def split_prompts(flags) -> tuple[list, list, dict]:
    """The run's prompts in one fixed, seeded order, a --verifier-share of them replaced by checkable ones;
    the first --eval-prompts are held out for the whole run (never trained on). --pairs: a seeded sample of
    the file's records is held out, the rest keep the file's order. Returns (train, held out, checks)."""
    pool = read_jsonl(flags.pairs) if flags.pairs else load_prompts(flags.prompts) if flags.prompts else \
        default_prompts()
    n = flags.eval_prompts
    if n is None:  # a small prompt file keeps most of its prompts for training
        n = 0 if flags.pairs else min(EVAL_PROMPTS, int(EVAL_SHARE * len(pool)))
    if n >= len(pool):
        what = f"records in {flags.pairs}" if flags.pairs else "prompts"
        raise ValueError(f"--eval-prompts {n} leaves none of the {len(pool)} {what} to train on "
                         f"(allowed: 0 to {len(pool) - 1})")
    if flags.pairs:
        held = set(random.Random(flags.seed).sample(range(len(pool)), n))
        return [r for i, r in enumerate(pool) if i not in held], [pool[i] for i in sorted(held)], {}
    random.Random(flags.seed).shuffle(pool)
    checks = {}
    if flags.verifier_share:  # some prompts replaced by ones a rule can check
        from .checkable import mix_in_checkable

        pool, checks = mix_in_checkable(pool, flags.verifier_share, flags.seed)
    held_out = pool[:n]
    return [x for x in pool[n:] if x not in set(held_out)], held_out, checks  # a prompt listed twice stays held out


def check_cutoff(tokenizer, prompts, cutoff: int, max_new_tokens: int):
    """ValueError unless a training sequence (--cutoff) holds the longest plain prompt and a full response."""
    longest = max(len(prompt_ids(tokenizer, "", x)) for x in prompts)
    if cutoff < longest + max_new_tokens + 1:  # + 1: the end-of-turn token of a finished response
        raise ValueError(f"--cutoff {cutoff} cannot hold the longest prompt ({longest} tokens with its chat template) "
                         f"and a {max_new_tokens}-token response (allowed: >= {longest + max_new_tokens + 1})")


def stage_configs(flags) -> dict:
    """The TrainConfig of each stage of the recipe. v1: "policy", the SSO objective. v2: "generator", L+ + L-
    (the data generator's loss), and "policy", the base loss on the base pair alone."""
    cfg = TrainConfig(loss_type=flags.loss, form=flags.form, use_w=not flags.no_w, use_g=not flags.no_g,
                      theta=flags.theta, alpha=flags.alpha, beta=flags.beta, lr=flags.lr, batch_size=flags.batch_size,
                      micro_batch_size=flags.micro_batch_size, cutoff=flags.cutoff, seed=flags.seed,
                      tokens_per_micro_batch=flags.tokens_per_micro_batch or None,
                      gradient_checkpointing=flags.gradient_checkpointing, save_every=flags.save_every,
                      autocast=flags.autocast)
    if flags.recipe == "v1":
        return {"policy": cfg}
    return {"generator": replace(cfg, form="generator", terms=tuple(flags.generator_terms.split(","))),
            "policy": replace(cfg, use_w=False, use_g=False)}


# --- the run folder ------------------------------------------------------------------------------


def open_run(s: Settings) -> Path:
    """Create the run folder holding the settings (run.json), or check that it holds this same run when
    resuming; lock it for this process. Under torchrun rank 0 decides, every rank learns the answer."""
    recorded = {k: v for k, v in vars(s.flags).items() if k not in OPERATIONAL}
    return s.ranks.on_rank0(lambda: claim(s.out, recorded, s.flags.resume))


def claim(out: Path, recorded: dict, resume: bool) -> Path:
    run_file = out / "run.json"
    if out.is_dir():
        lock(out)  # a second process on the same folder stops here
    started = out.is_dir() and any(p.name not in ("lock.json", "run.json", "train_config.json")
                                   and not (p.is_dir() and not any(p.iterdir())) for p in out.iterdir())
    if run_file.exists() and started:
        if not resume:
            raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        saved = json.loads(run_file.read_text())
        changed = [k for k in recorded if saved.get(k) != recorded[k]]
        if changed:
            raise ValueError(f"{out} holds a run with different settings ({', '.join(changed)}); use another --out")
    elif started:  # (run.json with nothing else: a start that failed before any stage wrote output)
        raise ValueError(f"{out} is not empty and holds no run.json; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    lock(out)
    write_json(run_file, recorded)
    return out


def lock(folder: Path):
    """Hold folder/lock.json for this process's life; refuse a folder a live process holds. A lock whose
    process is gone (a killed run) is taken over, so it never stays stuck."""
    path = Path(folder) / "lock.json"
    pid = json.loads(path.read_text()).get("pid") if path.exists() else None
    if pid == os.getpid():  # held already
        return
    if pid is not None:
        try:
            os.kill(pid, 0)  # signal 0: is it alive?
            raise ValueError(f"{folder} is in use by process {pid} (another train.py?); wait for it or stop it")
        except ProcessLookupError:
            pass  # a run that died: its lock is stale
    write_atomic(path, json.dumps({"pid": os.getpid()}))
    atexit.register(lambda: path.exists() and json.loads(path.read_text()).get("pid") == os.getpid() and path.unlink())
