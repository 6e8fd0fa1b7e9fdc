"""Self-Steering Optimization, the whole loop in one recipe.

    for t in iterations:
        policy   = the model iteration t-1 produced (the start model for t = 0)
        1. features  the policy picks the principles that matter for each prompt
        2. sample    y+ ~ pi(.|x+), y- ~ pi(.|x-), y^o ~ pi(.|x)      -> iter_t/pairs.jsonl
        3. reference log-probs of the six sequences, from the policy   -> iter_t/ref_logps.safetensors
        4. train one epoch: W * (L(x: y+ > y-) + theta * [L(x+: y+ > y-) + L(x-: y^o > y+)])
        5. save                                                        -> iter_t/model/ (HF folder)

`python train.py` runs it on SmolLM2-135M-Instruct on a CPU; `--model Qwen2-7B` on a GPU;
`torchrun --nproc_per_node=N train.py ...` on N GPUs (FSDP2, see sso_mini/distributed.py).
Every stage writes its output atomically and is skipped when already done, so an
interrupted run continues with `--resume` and loses nothing.
"""

import argparse
import contextlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from sso_mini.assets import write_atomic
from sso_mini.checkpoint import DEFAULT_MODEL, CheckpointError, load_model, resolve, save_model
from sso_mini.config import ModelConfig
from sso_mini.data import (DROP_REASONS, build_records, default_prompts, load_prompts, logprob_filter, read_jsonl,
                           write_jsonl)
from sso_mini.distributed import (barrier, deal, full_state_dict, gather_objects, is_main, on_main, setup, shard,
                                  teardown)
from sso_mini.lora import TARGETS, adapters_disabled, apply_lora, merge_lora
from sso_mini.model import Transformer
from sso_mini.losses import FORMS, LOSS_TYPES
from sso_mini.tokenizer import Tokenizer
from sso_mini.trainer import (TrainConfig, TrainingError, bf16_is_native, reference_logprobs, train_iteration,
                              write_config)

# Settings that define a run: resuming with different values would mix two experiments.
RUN_KEYS = ("model", "prompts", "pairs", "prompts_per_iteration", "loss", "form", "no_w", "no_g", "theta", "alpha",
            "beta", "lr", "batch_size", "max_new_tokens", "seed", "logprob_filter", "cutoff", "lora", "lora_rank",
            "lora_alpha", "lora_targets", "autocast")
LORA_THRESHOLD = 3e9  # parameters: above this, full fine-tuning with AdamW does not fit one 80 GB GPU


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Self-Steering Optimization (arXiv 2410.17131)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF model folder or known name (default: %(default)s)")
    ap.add_argument("--prompts", help=".txt (one per line) or .jsonl (prompt/instruction); default: AlpacaEval")
    ap.add_argument("--pairs", help="train on this pairs.jsonl (one iteration, no sampling)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--prompts-per-iteration", type=int, default=64)
    ap.add_argument("--loss", default="ipo", help=f"base preference loss: {' | '.join(LOSS_TYPES)}")
    ap.add_argument("--form", default="v1", help=f"SSO objective: {' | '.join(FORMS)} (see sso_mini/losses.py)")
    ap.add_argument("--no-w", action="store_true", help="ablation: drop the weight W")
    ap.add_argument("--no-g", action="store_true", help="ablation: drop the self-steering term G")
    ap.add_argument("--theta", type=float, default=0.1, help="weight of G")
    ap.add_argument("--alpha", type=float, default=0.66, help="weight of y+ in W")
    ap.add_argument("--beta", type=float, default=None, help="loss beta (default: 0.2 IPO, 0.1 DPO)")
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--batch-size", type=int, default=8, help="records per optimizer step")
    ap.add_argument("--micro-batch-size", type=int, default=1, help="records per forward (6 sequences, 3 prompts, packed in one row)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="response length cap when sampling")
    ap.add_argument("--sample-batch-size", type=int, default=48, help="rows per sampler batch")
    ap.add_argument("--cutoff", type=int, default=2048, help="max tokens of a training sequence")
    ap.add_argument("--logprob-filter", action="store_true", help="keep only pairs the SSO_SPEC §2.7 filter passes")
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                    help=f"train low-rank adapters (default: on for CUDA models above {LORA_THRESHOLD / 1e9:.0f}B)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--lora-targets", default=",".join(TARGETS), help="comma-separated projection names")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--checkpoint-every", type=int, default=4, help="steps between resumable checkpoints")
    ap.add_argument("--out", default="runs/sso", help="run folder")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="weight dtype (default float32)")
    ap.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast for scoring and training, fp32 master weights (default: on where bf16 "
                         "matmuls are native: a GPU, or a CPU with AVX512-BF16 or AMX; --no-autocast: plain fp32)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--ablation", action="store_true",
                    help="run SSO, w/o W, w/o G and PBAA from the same start and compare them (sso_mini/ablation.py)")
    ap.add_argument("--scale", type=int, default=1, help="--ablation: multiply its small default sizes")
    args = ap.parse_args(argv)
    if args.loss not in LOSS_TYPES:
        ap.error(f"unknown --loss {args.loss!r} (choose from {', '.join(LOSS_TYPES)})")
    if args.form not in FORMS:
        ap.error(f"unknown --form {args.form!r} (choose from {', '.join(FORMS)})")
    unknown = [t for t in args.lora_targets.split(",") if t not in TARGETS]
    if unknown:
        ap.error(f"unknown --lora-targets {', '.join(unknown)} (valid: {', '.join(TARGETS)})")
    if args.pairs:
        args.iterations = 1
    return args


def choose_lora_and_dtype(args):
    """LoRA by default only where full fine-tuning cannot fit: a big model on a GPU.

    Full fine-tuning keeps fp32 master weights, with bf16 autocast where bf16 matmuls are
    native (a GPU, or a CPU with AVX512-BF16 or AMX; on the Zen 5 box it cut the default
    iteration from 591 s to 386 s);
    LoRA keeps the frozen base in bf16 on GPU with fp32 adapters.
    """
    if args.autocast is None:
        args.autocast = bf16_is_native(torch.device(args.device))
    if args.lora is None:
        size = ModelConfig.from_json(resolve(args.model) / "config.json").num_parameters
        args.lora = args.device.startswith("cuda") and size > LORA_THRESHOLD
    if args.dtype is None:
        args.dtype = "bfloat16" if args.lora and args.device.startswith("cuda") else "float32"


def start_run(args) -> Path:
    """Create --out, or check that it holds this same run when resuming."""
    out = Path(args.out)
    settings = {k: getattr(args, k) for k in RUN_KEYS}
    run_file = out / "run.json"
    if run_file.exists():
        if not args.resume:
            raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        saved = json.loads(run_file.read_text())
        changed = [k for k in RUN_KEYS if saved.get(k) != settings[k]]
        if changed:
            raise ValueError(f"{out} holds a run with different settings ({', '.join(changed)}); use another --out")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no run.json; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=2))
    return out


def prompt_pool(args) -> list[str]:
    """All training prompts in a fixed, seeded order; iteration t takes the t-th slice."""
    pool = load_prompts(args.prompts) if args.prompts else default_prompts()
    random.Random(args.seed).shuffle(pool)
    return pool


def iteration_prompts(pool, t, n):
    return [pool[(t * n + i) % len(pool)] for i in range(min(n, len(pool)))]


def summarize(t, records, stats, history, tokenizer, seconds) -> dict:
    lengths = {k: sum(len(tokenizer.encode(r[k])) for r in records) / max(1, len(records))
               for k in ("chosen", "rejected", "raw")}
    mean = lambda key: sum(h[key] for h in history) / max(1, len(history))  # noqa: E731
    return {"iteration": t, "prompts": stats.get("prompts", len(records)), "kept": len(records),
            "dropped": {k: v for k, v in stats.items() if k in DROP_REASONS},
            "capped": stats.get("capped", 0),
            "sample_tokens_per_s": stats.get("sample_tokens", 0) / max(stats.get("sample_seconds", 0), 1e-9),
            "train_tokens_per_s": mean("tokens_per_s"),
            "len_chosen": lengths["chosen"], "len_rejected": lengths["rejected"], "len_raw": lengths["raw"],
            "loss": mean("loss"), "W": mean("W"), "acc": mean("rewards/accuracies"),
            "p_acc": mean("p_rewards/accuracies"), "n_acc": mean("n_rewards/accuracies"),
            "seconds": {**seconds, "total": round(sum(seconds.values()), 1)}}


def print_table(rows):
    print("\n| iter | kept/prompts | len y+ / y- / y^o (tokens) | loss | W | acc x / x+ / x- | minutes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['iteration']} | {r['kept']}/{r['prompts']} | {r['len_chosen']:.0f} / {r['len_rejected']:.0f} / "
              f"{r['len_raw']:.0f} | {r['loss']:.4f} | {r['W']:.3f} | {r['acc']:.2f} / {r['p_acc']:.2f} / "
              f"{r['n_acc']:.2f} | {r['seconds']['total'] / 60:.1f} |")


def plot_metrics(metrics_path: Path, png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    x = range(1, len(rows) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(x, [r["loss"] for r in rows], label="loss")
    axes[0].plot(x, [r["raw_loss"] for r in rows], label="raw_loss (W = 1)")
    axes[1].plot(x, [r["W"] for r in rows], label="W")
    for prefix, name in (("", "x: y+ > y-"), ("p_", "x+: y+ > y-"), ("n_", "x-: y^o > y+")):
        axes[2].plot(x, [r[f"{prefix}rewards/accuracies"] for r in rows], label=name)
    for ax, title in zip(axes, ("loss", "weight W", "reward accuracy")):
        ax.set_title(title)
        ax.set_xlabel("step (all iterations)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


@contextlib.contextmanager
def timed(it: Path, stage: str):
    """Add a stage's wall time to it/timing.json (a stage finished over two attempts adds up)."""
    start = time.perf_counter()
    yield
    if is_main():
        path = it / "timing.json"
        seconds = json.loads(path.read_text()) if path.exists() else {}
        seconds[stage] = round(seconds.get(stage, 0) + time.perf_counter() - start, 1)
        write_atomic(path, json.dumps(seconds, indent=2))


def run_iteration(args, cfg, t, it, policy, dtype, pool, metrics_path, progress, rank=0, n_ranks=1):
    """Steps 1-5 for iteration t; each step's output is reused if an earlier attempt wrote it."""
    with timed(it, "load"):
        model, tokenizer = load_model(policy, dtype=dtype, device=args.device)
    torch.manual_seed(args.seed + t)
    if args.lora:  # fresh adapters on the merged weights of the last iteration
        apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                   targets=args.lora_targets.split(","))

    # 1-2. the policy builds its own preference data
    pairs, stats_file = it / "pairs.jsonl", it / "data_stats.json"
    if not on_main(pairs.exists):  # decided once: rank 0 may write the file before another rank looks
        if args.pairs:
            records, stats = read_jsonl(args.pairs), {}
        else:  # under torchrun each rank samples its share of the prompts with its full copy of the policy
            with timed(it, "sample"):
                prompts = deal(iteration_prompts(pool, t, args.prompts_per_iteration), n_ranks, rank)
                records, stats = build_records(model, tokenizer, prompts, iteration=t, seed=args.seed + 7919 * rank,
                                               max_new_tokens=args.max_new_tokens, batch_size=args.sample_batch_size,
                                               compile=args.device.startswith("cuda"), progress=progress and is_main())
                if args.logprob_filter:
                    records, filter_stats = logprob_filter(model, tokenizer, records, cutoff=args.cutoff)
                    stats.update(filter_stats)
                records, stats = merge_shares(gather_objects((records, dict(stats))))
        if not records:
            raise ValueError(f"iteration {t}: every pair was filtered out ({dict(stats)})")
        if is_main():
            stats_file.write_text(json.dumps(dict(stats), indent=2))
            write_jsonl(pairs, records)
        barrier()
    records = read_jsonl(pairs)
    if is_main():
        print(f"iteration {t}: {len(records)} pairs in {pairs} ({stats_file.read_text().strip()})", file=sys.stderr)
    if n_ranks > 1:  # from here on every parameter, gradient and AdamW state is split across the ranks
        shard(model)

    # 3. reference log-probs: the iteration's starting weights (LoRA: the frozen base), computed once
    with timed(it, "reference"), adapters_disabled(model) if args.lora else contextlib.nullcontext():
        ref = reference_logprobs(model, tokenizer, records, cfg, cache=it / "ref_logps.safetensors",
                                 progress=progress)

    # 4. one epoch of the SSO objective
    with timed(it, "train"):
        train_iteration(model, tokenizer, records, ref, cfg, it, iteration=t, metrics_path=metrics_path,
                        progress=progress)

    # 5. the trained policy becomes the next iteration's policy and reference
    if n_ranks > 1:  # gather the shards into one plain model on rank 0
        state = full_state_dict(model)
        if is_main():
            model = Transformer.from_state_dict(model.config, state)
    if is_main():
        if torch.cuda.is_available() and args.device.startswith("cuda"):
            stats = json.loads(stats_file.read_text())
            stats["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
            stats_file.write_text(json.dumps(stats, indent=2))
        with timed(it, "save"):
            save_model(merge_lora(model) if args.lora else model, tokenizer, it / "model")
        shutil.rmtree(it / "checkpoint", ignore_errors=True)
    barrier()


def merge_shares(shares):
    """[(records, stats)] from each rank -> all records (rank 0's first) and summed stats."""
    records = [r for part, _ in shares for r in part]
    stats = {}
    for _, part in shares:
        for k, v in part.items():
            stats[k] = max(stats.get(k, 0), v) if k == "sample_seconds" else stats.get(k, 0) + v
    return records, stats


def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    if args.ablation:
        from sso_mini.ablation import run_ablation

        shared = ["--model", args.model, "--loss", args.loss, "--form", args.form, "--theta", str(args.theta),
                  "--alpha", str(args.alpha), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
                  "--seed", str(args.seed), "--device", args.device,
                  *(["--prompts", args.prompts] * bool(args.prompts)),
                  *([f"--{'' if args.autocast else 'no-'}autocast"] if args.autocast is not None else [])]
        out = Path("runs/ablation" if args.out == "runs/sso" else args.out)
        result = run_ablation(main, shared, out, scale=args.scale, resume=args.resume, progress=progress)
        print((out / "ablation.md").read_text())
        print(f"ablation: {out / 'ablation.md'}, {out / 'ablation.json'}, plot {out / 'ablation.png'}")
        return result
    rank, n_ranks = setup()
    if n_ranks > 1 and args.batch_size % n_ranks:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the world size {n_ranks} "
                         f"(torchrun --nproc_per_node): every rank needs the same share of each step")
    choose_lora_and_dtype(args)
    if n_ranks > 1 and args.lora:
        raise ValueError("--lora is single-GPU only; under torchrun, FSDP2 shards a full fine-tune (pass --no-lora)")
    out = on_main(lambda: start_run(args))
    cfg = TrainConfig(loss_type=args.loss, form=args.form, use_w=not args.no_w, use_g=not args.no_g,
                      theta=args.theta, alpha=args.alpha, beta=args.beta, lr=args.lr, batch_size=args.batch_size,
                      micro_batch_size=args.micro_batch_size, cutoff=args.cutoff, seed=args.seed,
                      gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=args.checkpoint_every,
                      autocast=args.autocast)
    if is_main():
        write_config(out / "train_config.json", cfg)
        print(f"precision: {args.dtype} weights{', bf16 autocast' if args.autocast else ''} on {args.device}",
              file=sys.stderr)
    dtype = getattr(torch, args.dtype)
    pool = None if args.pairs else prompt_pool(args)
    metrics_path, summaries = out / "metrics.jsonl", []
    for t in range(args.iterations):
        it = out / f"iter_{t}"
        if (it / "summary.json").exists():  # finished before an interruption
            summaries.append(json.loads((it / "summary.json").read_text()))
            continue
        it.mkdir(exist_ok=True)
        if not (it / "model" / "model.safetensors").exists():
            policy = args.model if t == 0 else out / f"iter_{t - 1}" / "model"
            run_iteration(args, cfg, t, it, policy, dtype, pool, metrics_path, progress and is_main(), rank, n_ranks)
        if not is_main():
            continue
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        seconds = json.loads((it / "timing.json").read_text()) if (it / "timing.json").exists() else {}
        summary = summarize(t, read_jsonl(it / "pairs.jsonl"), json.loads((it / "data_stats.json").read_text()),
                            [r for r in rows if r["iteration"] == t], Tokenizer.from_folder(it / "model"), seconds)
        (it / "summary.json").write_text(json.dumps(summary, indent=2))
        summaries.append(summary)
        plot_metrics(metrics_path, out / "metrics.png")

    if not is_main():
        return
    print_table(summaries)
    print(f"\nrun folder: {out}\n  pairs:   {out}/iter_*/pairs.jsonl\n  models:  {out}/iter_*/model/\n"
          f"  metrics: {metrics_path}\n  plot:    {out / 'metrics.png'}")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, FileNotFoundError, ValueError, TrainingError) as e:
        sys.exit(f"error: {e}" if is_main() else 1)  # every rank fails alike; rank 0 says why
    finally:
        teardown()
