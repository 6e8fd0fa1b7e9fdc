"""Self-Steering Optimization, the whole loop in one recipe.

    held out = --eval-prompts prompts set aside once (never trained on)
    for t in iterations:
        policy   = the model iteration t-1 produced (the start model for t = 0)
        1. features  the policy picks the principles that matter for each prompt
        2. sample    y+ ~ pi(.|x+), y- ~ pi(.|x-), y^o ~ pi(.|x)      -> iter_t/pairs.jsonl
                     the same for the held-out prompts                 -> iter_t/eval_pairs.jsonl
        3. reference log-probs of the six sequences, from the policy   -> iter_t/{,eval_}ref_logps.safetensors
        4. train one epoch: W * (L(x: y+ > y-) + theta * [L(x+: y+ > y-) + L(x-: y^o > y+)])
        5. save                                                        -> iter_t/model/ (HF folder)
        6. evaluate  the trained policy scores the held-out records    -> eval_* metrics, iter_t/summary.json
    after the last iteration the final policy samples the held-out prompts once more -> final/summary.json

`python train.py` runs it on SmolLM2-135M-Instruct on a CPU; `--model Qwen2-7B` on a GPU;
`torchrun --nproc_per_node=N train.py ...` on N GPUs (FSDP2, see sso_mini/distributed.py).
Every stage writes its output atomically and is skipped when done: an interrupted run continues with `--resume`.
"""

import argparse
import contextlib
import json
import math
import random
import shutil
import signal
import sys
from pathlib import Path

import torch

from sso_mini.assets import lock_folder, write_json
from sso_mini.checkpoint import DEFAULT_MODEL, CheckpointError, load_model, resolve, save_model
from sso_mini.config import ModelConfig
from sso_mini.eval.report import (final_generation, log_eval_row, plot_metrics, print_table, score_held_out,
                                  summarize, timed)
from sso_mini.eval.verified_pairs import mix_in_checkable
from sso_mini.distributed import (barrier, check_device, deal, full_state_dict, gather_objects, is_main, merge_shares,
                                  on_main, setup, shard, teardown)
from sso_mini.lora import TARGETS, adapters_disabled, apply_lora, merge_lora
from sso_mini.losses import FORMS, LOSS_TYPES
from sso_mini.model import Transformer
from sso_mini.records import (build_records, check_cutoff, default_prompts, load_prompts, logprob_filter, read_jsonl,
                              write_jsonl)
from sso_mini.tokenizer import Tokenizer
from sso_mini.trainer import TrainConfig, TrainingError, bf16_is_native, score_records, train_iteration, write_config

# Flags that say how to run, not what: a resume may change them. Every other flag defines the
# run (resuming with a different value would mix two experiments), so a new flag is checked too.
OPERATIONAL = ("iterations", "out", "resume", "device", "dtype", "micro_batch_size", "sample_batch_size",
               "gradient_checkpointing", "save_every", "no_progress", "ablation", "scale")
LORA_THRESHOLD = 3e9  # parameters: above this, full fine-tuning with AdamW does not fit one 80 GB GPU
EVAL_PROMPTS = 16  # held out by default: sampled and scored twice, ~15% of a default iteration's time
EVAL_SEED = 1_000_003  # offsets the held-out sampling seeds from the training ones


class UsageError(ValueError):
    """A bad argument or input file, found before any model is loaded or file written (exit 2)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other failure of train.py
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(description="Self-Steering Optimization (arXiv 2410.17131)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF model folder or known name (default: %(default)s)")
    ap.add_argument("--prompts", help=".txt (one per line) or .jsonl (prompt/instruction); default: AlpacaEval")
    ap.add_argument("--pairs", help="train on this pairs.jsonl (one iteration, no sampling)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--prompts-per-iteration", type=int, default=64)
    ap.add_argument("--eval-prompts", type=int, default=None,
                    help=f"prompts held out of training and evaluated every iteration (default {EVAL_PROMPTS}; "
                         "0: off); with --pairs, records of the file held out (default 0)")
    ap.add_argument("--verifier-share", type=float, default=0.25, help="share of prompts with a checkable instruction")
    ap.add_argument("--loss", default=TrainConfig.loss_type, help=f"base preference loss: {' | '.join(LOSS_TYPES)}")
    ap.add_argument("--form", default=TrainConfig.form, help=f"SSO objective: {' | '.join(FORMS)} (docs/algorithm.md)")
    ap.add_argument("--no-w", action="store_true", help="ablation: drop the weight W")
    ap.add_argument("--no-g", action="store_true", help="ablation: drop the self-steering term G")
    ap.add_argument("--theta", type=float, default=TrainConfig.theta, help="weight of G")
    ap.add_argument("--alpha", type=float, default=TrainConfig.alpha, help="weight of y+ in W")
    ap.add_argument("--beta", type=float, default=None, help="loss beta (default: 0.2 IPO, 0.1 DPO)")
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="records per optimizer step")
    ap.add_argument("--micro-batch-size", type=int, default=TrainConfig.micro_batch_size,
                    help="records per forward (6 sequences, 3 prompts, packed in one row)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="response length cap when sampling")
    ap.add_argument("--sample-batch-size", type=int, default=48, help="rows per sampler batch")
    ap.add_argument("--cutoff", type=int, default=TrainConfig.cutoff, help="max tokens of a training sequence")
    ap.add_argument("--logprob-filter", action="store_true",
                    help="keep only pairs whose log-probs move the right way with the principles")
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                    help=f"train low-rank adapters (default: on for CUDA models above {LORA_THRESHOLD / 1e9:.0f}B)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--lora-targets", default=",".join(TARGETS), help="comma-separated projection names")
    ap.add_argument("--gradient-checkpointing", action="store_true")
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
    if args.loss not in LOSS_TYPES:
        ap.error(f"unknown --loss {args.loss!r} (choose from {', '.join(LOSS_TYPES)})")
    if args.form not in FORMS:
        ap.error(f"unknown --form {args.form!r} (choose from {', '.join(FORMS)})")
    unknown = [t for t in args.lora_targets.split(",") if t not in TARGETS]
    if unknown:
        ap.error(f"unknown --lora-targets {', '.join(unknown)} (valid: {', '.join(TARGETS)})")
    if args.eval_prompts is None:
        args.eval_prompts = 0 if args.pairs else EVAL_PROMPTS
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
    ("--max-new-tokens", lambda v, a: v >= 1, ">= 1"), ("--sample-batch-size", lambda v, a: v >= 1, ">= 1"),
    ("--cutoff", lambda v, a: v >= 2, ">= 2 tokens"), ("--save-every", lambda v, a: v >= 1, ">= 1 steps"),
    ("--lora-rank", lambda v, a: v >= 1, ">= 1"), ("--lora-alpha", lambda v, a: v > 0, "> 0"),
    ("--lora-dropout", lambda v, a: 0 <= v < 1, "0 to below 1"), ("--scale", lambda v, a: v >= 1, ">= 1"),
)


def choose_lora_and_dtype(args):
    """LoRA by default only where full fine-tuning cannot fit (a big model on a GPU), its frozen base in bf16;
    full fine-tuning keeps fp32 master weights, with bf16 autocast where bf16 matmuls are native."""
    size = ModelConfig.from_json(resolve(args.model) / "config.json").num_parameters  # the model's check, too
    if args.autocast is None:
        args.autocast = bf16_is_native(torch.device(args.device))
    if args.lora is None:
        args.lora = args.device.startswith("cuda") and size > LORA_THRESHOLD
    if args.dtype is None:
        args.dtype = "bfloat16" if args.lora and args.device.startswith("cuda") else "float32"


def start_run(args) -> Path:
    """Create --out, or check that it holds this same run when resuming."""
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in OPERATIONAL}
    run_file = out / "run.json"
    if out.is_dir():
        lock_folder(out)  # a second process on the same --out stops here
    if run_file.exists():
        if not args.resume:
            raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        saved = json.loads(run_file.read_text())
        changed = [k for k in settings if saved.get(k) != settings[k]]
        if changed:
            raise ValueError(f"{out} holds a run with different settings ({', '.join(changed)}); use another --out")
    elif out.exists() and any(p.name != "lock.json" for p in out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no run.json; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    lock_folder(out)
    write_json(run_file, settings)
    return out


def load_inputs(args) -> tuple[list, list, dict]:
    """(training inputs, held-out inputs, {prompt: checks}), checked before anything is written. Prompts: all
    in one fixed, seeded order, a --verifier-share of them replaced by checkable ones; the first --eval-prompts
    are held out for the whole run (never trained on), iteration t trains on the t-th slice of the rest.
    --pairs: a seeded sample of the file's records is held out, the rest keep the file's order."""
    pool = read_jsonl(args.pairs) if args.pairs else load_prompts(args.prompts) if args.prompts else default_prompts()
    n = args.eval_prompts
    if n >= len(pool):
        what = f"records in {args.pairs}" if args.pairs else "prompts"
        raise ValueError(f"--eval-prompts {n} leaves none of the {len(pool)} {what} to train on "
                         f"(allowed: 0 to {len(pool) - 1})")
    if args.pairs:
        held = set(random.Random(args.seed).sample(range(len(pool)), n))
        return [r for i, r in enumerate(pool) if i not in held], [pool[i] for i in sorted(held)], {}
    random.Random(args.seed).shuffle(pool)
    pool, checks = mix_in_checkable(pool, args.verifier_share, args.seed)
    held_out, held = pool[:n], set(pool[:n])
    return [x for x in pool[n:] if x not in held], held_out, checks  # a duplicated prompt stays held out


def make_records(args, model, tokenizer, t, it, inputs, checks, progress, rank, n_ranks, held_out=False) -> list[dict]:
    """it/pairs.jsonl (or it/eval_pairs.jsonl): the policy's records for these prompts (with their checks), built
    once. With --pairs the inputs are records already; under torchrun each rank samples its share, rank 0 writes."""
    prefix = "eval_" if held_out else ""
    pairs, stats_file = it / f"{prefix}pairs.jsonl", it / f"{prefix}data_stats.json"
    if not on_main(pairs.exists):  # decided once: rank 0 may write the file before another rank looks
        if args.pairs:
            records, stats = inputs, {}
        else:
            what = "held-out" if held_out else "training"
            with timed(it, "eval_sample" if held_out else "sample",
                       f"feature selection and y+, y-, y^o for {len(inputs)} {what} prompts, "
                       f"up to {args.max_new_tokens} tokens each"):
                seed = args.seed + 7919 * rank + (EVAL_SEED if held_out else 0)
                records, stats = build_records(model, tokenizer, deal(inputs, n_ranks, rank), iteration=t, seed=seed,
                                               max_new_tokens=args.max_new_tokens, batch_size=args.sample_batch_size,
                                               compile=args.device.startswith("cuda"), progress=progress and is_main(),
                                               desc=f"{what} prompts")
                if args.logprob_filter and not held_out:  # held-out records show what the policy samples
                    records, filter_stats = logprob_filter(model, tokenizer, records, cutoff=args.cutoff)
                    stats.update(filter_stats)
                records, stats = merge_shares(gather_objects((records, dict(stats))))
                records = [r | {"checks": checks[r["prompt"]]} if r["prompt"] in checks else r for r in records]
        if not records:
            raise ValueError(f"iteration {t}: every {prefix}pair was filtered out ({dict(stats)})")
        if is_main():
            write_json(stats_file, {**stats, "records": len(records)})  # read back below: a cut file is refused
            write_jsonl(pairs, records)
        barrier()
    records, stats = read_jsonl(pairs), json.loads(stats_file.read_text())
    if len(records) != stats.get("records", len(records)):
        raise ValueError(f"{pairs} holds {len(records)} of its {stats['records']} records: delete it to sample again")
    if is_main():
        print(f"[{it.name}] {len(records)} {prefix}pairs in {pairs}: {stats}", file=sys.stderr)
    return records


def run_iteration(args, cfg, t, it, policy, dtype, inputs, metrics_path, progress, rank=0, n_ranks=1):
    """Steps 1-5 for iteration t; each step's output is reused if an earlier attempt wrote it. Returns the
    trained (model, tokenizer) for the held-out pass; None under torchrun (every rank loads the folder)."""
    with timed(it, "load"):
        model, tokenizer = load_model(policy, dtype=dtype, device=args.device)
    torch.manual_seed(args.seed + t)
    if args.lora:  # fresh adapters on the merged weights of the last iteration
        apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                   targets=args.lora_targets.split(","))

    # 1-2. the policy builds its own preference data, for its training prompts and the held-out ones
    train_inputs, held_out, checks = inputs
    k, pool = args.prompts_per_iteration, train_inputs  # iteration t trains on the t-th slice, wrapping round
    prompts = pool if args.pairs else [pool[(t * k + i) % len(pool)] for i in range(min(k, len(pool)))]
    records = make_records(args, model, tokenizer, t, it, prompts, checks, progress, rank, n_ranks)
    eval_records = make_records(args, model, tokenizer, t, it, held_out, checks, progress, rank, n_ranks,
                                held_out=True) if held_out else []
    if n_ranks > 1:  # from here on every parameter, gradient and AdamW state is split across the ranks
        shard(model)

    # 3. reference log-probs: the iteration's starting weights (LoRA: the frozen base), computed once
    with adapters_disabled(model) if args.lora else contextlib.nullcontext():
        with timed(it, "reference", f"reference log-probs of {len(records)} records x 6 sequences"):
            ref = score_records(model, tokenizer, records, cfg, cache=it / "ref_logps.safetensors",
                                progress=progress, desc="reference log-probs")
        if eval_records:
            with timed(it, "eval_reference", f"reference log-probs of {len(eval_records)} held-out records"):
                score_records(model, tokenizer, eval_records, cfg, cache=it / "eval_ref_logps.safetensors",
                              progress=progress, desc="reference log-probs (held out)")

    # 4. one epoch of the SSO objective
    with timed(it, "train", f"one epoch, {-(-len(records) // args.batch_size)} steps of {args.batch_size} records"):
        train_iteration(model, tokenizer, records, ref, cfg, it, iteration=t, metrics_path=metrics_path,
                        progress=progress)

    # 5. the trained policy becomes the next iteration's policy and reference
    trained = model
    if n_ranks > 1:  # gather the shards into one plain model on rank 0
        state = full_state_dict(model)
        if is_main():
            trained = Transformer.from_state_dict(model.config, state)
    elif args.lora:
        trained = merge_lora(model)
    if is_main():
        if args.device.startswith("cuda"):  # the peak GPU memory, beside the data stats
            stats = json.loads((it / "data_stats.json").read_text())
            write_json(it / "data_stats.json", {**stats, "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30})
        with timed(it, "save"):
            save_model(trained, tokenizer, it / "model")
        shutil.rmtree(it / "resume", ignore_errors=True)
    barrier()
    return (trained, tokenizer) if n_ranks == 1 else None


def main(argv=None):
    args = parse_args(argv)
    if not args.ablation:
        return run(args)
    from sso_mini.eval.ablation import run_ablation

    out = Path("runs/ablation" if args.out == "runs/sso" else args.out)
    result = run_ablation(run, args, out)
    print((out / "ablation.md").read_text())
    print(f"ablation: {out / 'ablation.md'}, {out / 'ablation.json'}, figures {out}/ablation_{{signals,length}}.png")
    return result


def run(args):
    """The SSO loop on parsed settings (train.py's flags as an argparse.Namespace)."""
    progress = not args.no_progress
    rank, n_ranks = setup()
    if n_ranks > 1 and args.batch_size % n_ranks:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the world size {n_ranks} (allowed: k*N)")
    try:  # the inputs, the model's config and --out, before anything is written
        inputs = load_inputs(args)
        choose_lora_and_dtype(args)
        if not args.pairs:  # the prompts' token counts: the model folder's tokenizer, not its weights
            check_cutoff(Tokenizer.from_folder(resolve(args.model)), inputs[0] + inputs[1], args.cutoff,
                         args.max_new_tokens)
        if n_ranks > 1 and args.lora:
            raise ValueError("--lora is single-GPU only; under torchrun FSDP2 shards a full fine-tune (--no-lora)")
        out = on_main(lambda: start_run(args))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    cfg = TrainConfig(loss_type=args.loss, form=args.form, use_w=not args.no_w, use_g=not args.no_g,
                      theta=args.theta, alpha=args.alpha, beta=args.beta, lr=args.lr, batch_size=args.batch_size,
                      micro_batch_size=args.micro_batch_size, cutoff=args.cutoff, seed=args.seed,
                      gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
                      autocast=args.autocast)  # the flags above take their defaults from TrainConfig
    if is_main():
        write_config(out / "train_config.json", cfg)
        print(f"precision: {args.dtype} weights{', bf16 autocast' if args.autocast else ''} on {args.device}; "
              f"{len(inputs[1])} held-out {'records' if args.pairs else 'prompts'}", file=sys.stderr)
    dtype = getattr(torch, args.dtype)
    load = lambda path: load_model(path, dtype=dtype, device=args.device)  # noqa: E731
    metrics_path, summaries = out / "metrics.jsonl", []
    for t in range(args.iterations):
        it = out / f"iter_{t}"
        if (it / "summary.json").exists():  # finished before an interruption
            summaries.append(json.loads((it / "summary.json").read_text()))
            continue
        it.mkdir(exist_ok=True)
        trained = None
        if not (it / "model" / "model.safetensors").exists():
            policy = args.model if t == 0 else out / f"iter_{t - 1}" / "model"
            trained = run_iteration(args, cfg, t, it, policy, dtype, inputs, metrics_path, progress and is_main(),
                                    rank, n_ranks)
        score_held_out(it, cfg, lambda: trained or load(it / "model"), progress and is_main())
        if not is_main():
            continue
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        history = [r for r in rows if r["iteration"] == t and r.get("split", "train") == "train"]
        summary = summarize(t, it, history, Tokenizer.from_folder(it / "model"), cfg, sampled=not args.pairs)
        if summary["eval"]:
            log_eval_row(metrics_path, summary, len(history))
        write_json(it / "summary.json", summary)
        summaries.append(summary)
        plot_metrics(out, summaries)

    if not is_main():
        return
    final = None
    if inputs[1] and not args.pairs:  # the last policy answers the held-out prompts once more
        final = final_generation(out / "final", lambda: load(out / f"iter_{args.iterations - 1}" / "model"),
                                 inputs[1], args.iterations, seed=args.seed + EVAL_SEED + 1000 * (args.iterations + 1),
                                 max_new_tokens=args.max_new_tokens, batch_size=args.sample_batch_size,
                                 compile=args.device.startswith("cuda"), progress=progress)
        plot_metrics(out, summaries + [final])
    print_table(summaries, final)
    print(f"\nrun folder: {out}\n  pairs:   {out}/iter_*/pairs.jsonl (held out: eval_pairs.jsonl)\n  models:  "
          f"{out}/iter_*/model/\n  metrics: {metrics_path}\n  plot:    {out / 'metrics.png'}")


def cli(argv=None) -> int:
    """`python train.py`: 0 done, 2 a bad argument or input (nothing written), 1 a failure later,
    130 stopped by Ctrl-C or SIGTERM (everything finished so far is kept: rerun with --resume)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM stops like Ctrl-C
    try:
        main(argv)
        return 0
    except SystemExit as e:  # the parser's own exit: --help, or a bad flag (it said why)
        return e.code or 0
    except KeyboardInterrupt:
        print("error: interrupted; the same command with --resume continues from the last saved step", file=sys.stderr)
        return 130
    except (CheckpointError, OSError, ValueError, TrainingError) as e:  # OSError: a full disk names its file
        if is_main():  # every rank fails alike; rank 0 says why
            print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(cli())
