"""Self-Steering Optimization, the whole loop in one recipe.

    held out = --eval-prompts prompts set aside once (never trained on)
    for t in iterations:
        policy   = the model iteration t-1 produced (the start model for t = 0)
        1. features  the policy picks the principles that matter for each prompt (from --principles;
                     a set that asks for all its features leaves nothing to pick)
        2. sample    y+ ~ pi(.|x+), y- ~ pi(.|x-), y^o ~ pi(.|x)      -> iter_t/pairs.jsonl
                     the same for the held-out prompts                 -> iter_t/eval_pairs.jsonl
        3. reference log-probs of the six sequences, from the policy   -> iter_t/{,eval_}ref_logps.safetensors
        4. train one epoch: W * (L(x: y+ > y-) + theta * [L(x+: y+ > y-) + L(x-: y^o > y+)])
        5. save                                                        -> iter_t/model/ (HF folder)
        6. evaluate  the trained policy scores the held-out records    -> eval_* metrics, iter_t/summary.json
    after the last iteration the final policy samples the held-out prompts once more -> final/summary.json

v1_iteration is that; --recipe v2 (the paper's second version, v2_iteration) puts a data generator in front
of the policy in each iteration:
    G. generator = a copy of the policy, trained through steps 1-6 with L+ + L- instead of the loss in 4
                                                                    -> iter_t/generator/ (model/, summary.json)
    P. the generator samples y+ ~ G(.|x+), y- ~ G(.|x-) for the iteration's prompts; the policy trains
       the base loss L(x: y+ > y-) on them (reference: the policy itself) -> iter_t/
The flags and their checks are in sso_mini/flags.py.

`python train.py` runs it on SmolLM2-135M-Instruct on a CPU; `--model Qwen2-7B` on a GPU;
`torchrun --nproc_per_node=N train.py ...` on N GPUs (FSDP2, see sso_mini/distributed.py).
Every stage writes its output atomically and is skipped when done: an interrupted run continues with `--resume`.
"""

import contextlib
import functools
import json
import random
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from sso_mini.assets import AssetError, open_run, write_json
from sso_mini.checkpoint import CheckpointError, load_model, resolve, save_model
from sso_mini.config import ModelConfig
from sso_mini.eval.report import (final_generation, log_eval_row, plot_metrics, print_table, score_held_out,
                                  summarize, timed)
from sso_mini.eval.verified_pairs import mix_in_checkable
from sso_mini.flags import EVAL_PROMPTS, EVAL_SHARE, LORA_THRESHOLD, OPERATIONAL, VERIFIER_SHARE, parse_args
from sso_mini.distributed import (barrier, deal, full_state_dict, gather_objects, is_main, merge_shares,
                                  on_main, setup, shard, teardown)
from sso_mini.lora import adapters_disabled, apply_lora, merge_lora, micro_batch_tokens
from sso_mini.model import Transformer
from sso_mini.principles import PrincipleSet, load_principles
from sso_mini.records import (build_records, check_cutoff, default_prompts, load_prompts, logprob_filter, read_jsonl,
                              write_jsonl)
from sso_mini.tokenizer import Tokenizer
from sso_mini.trainer import TrainConfig, TrainingError, bf16_is_native, score_records, train_iteration, write_config

EVAL_SEED = 1_000_003  # offsets the held-out sampling seeds from the training ones


class UsageError(ValueError):
    """A bad argument or input file, found before any model is loaded or file written (exit 2)."""


class Inputs(NamedTuple):
    train: list  # training prompts (records with --pairs)
    held_out: list  # prompts (records) held out of training for the whole run
    checks: dict  # {prompt: its IFEval instruction} for the checkable prompts (--verifier-share)
    principles: PrincipleSet  # what steers y+ and y- (--principles)


def choose_device_settings(args, n_ranks: int = 1):
    """LoRA by default only where full fine-tuning cannot fit (a big model on a GPU), its frozen base in bf16;
    full fine-tuning keeps fp32 master weights, with bf16 autocast where bf16 matmuls are native. On a GPU the
    micro-batch token budget and gradient checkpointing follow from its free memory (lora.micro_batch_tokens);
    on the CPU records run one per forward, without checkpointing."""
    config = ModelConfig.from_json(resolve(args.model) / "config.json")  # the model's check, too
    cuda = args.device.startswith("cuda")
    if args.autocast is None:
        args.autocast = bf16_is_native(torch.device(args.device))
    if args.lora is None:
        args.lora = cuda and config.num_parameters > LORA_THRESHOLD
    if args.dtype is None:
        args.dtype = "bfloat16" if args.lora and cuda else "float32"
    if cuda and args.tokens_per_micro_batch is None:
        free = torch.cuda.mem_get_info(torch.device(args.device))[0]
        tokens, checkpointing = micro_batch_tokens(config, free, args.lora_rank if args.lora else None, n_ranks,
                                                   args.cutoff)
        args.tokens_per_micro_batch = tokens
        if args.gradient_checkpointing is None:
            args.gradient_checkpointing = checkpointing
    args.tokens_per_micro_batch = args.tokens_per_micro_batch or 0
    args.gradient_checkpointing = bool(args.gradient_checkpointing)


def load_inputs(args) -> Inputs:
    """The run's prompts and principle set, checked before anything is written. Prompts: all in one fixed,
    seeded order, a --verifier-share of them replaced by checkable ones; the first --eval-prompts are held out
    for the whole run (never trained on), iteration t trains on the t-th slice of the rest.
    --pairs: a seeded sample of the file's records is held out, the rest keep the file's order."""
    principles = load_principles(args.principles)
    if args.verifier_share is None:  # the principles' own checks measure the signal where they have any
        args.verifier_share = 0.0 if principles.checked else VERIFIER_SHARE
    pool = read_jsonl(args.pairs) if args.pairs else load_prompts(args.prompts) if args.prompts else default_prompts()
    if args.eval_prompts is None:  # a small prompt file keeps most of its prompts for training
        args.eval_prompts = 0 if args.pairs else min(EVAL_PROMPTS, int(EVAL_SHARE * len(pool)))
    n = args.eval_prompts
    if n >= len(pool):
        what = f"records in {args.pairs}" if args.pairs else "prompts"
        raise ValueError(f"--eval-prompts {n} leaves none of the {len(pool)} {what} to train on "
                         f"(allowed: 0 to {len(pool) - 1})")
    if args.pairs:
        held = set(random.Random(args.seed).sample(range(len(pool)), n))
        return Inputs([r for i, r in enumerate(pool) if i not in held], [pool[i] for i in sorted(held)], {}, principles)
    random.Random(args.seed).shuffle(pool)
    pool, checks = mix_in_checkable(pool, args.verifier_share, args.seed)
    held_out, held = pool[:n], set(pool[:n])
    return Inputs([x for x in pool[n:] if x not in held], held_out, checks, principles)  # a duplicate stays held out


def make_records(args, load_sampler, tokenizer, t, it, inputs, run_inputs, progress, rank, n_ranks, held_out=False,
                 eq3=False) -> list[dict]:
    """it/pairs.jsonl (or it/eval_pairs.jsonl): the records of load_sampler()'s model (called only if there is
    something to sample) for these prompts, with their checks, built once. With --pairs the inputs are records
    already; under torchrun each rank samples its share, rank 0 writes. run_inputs: the run's Inputs (principle
    set, checks).
    eq3: y- takes y^o's place ("raw"), so that L- prefers y- over y+ under x- (v2 Eq. 3)."""
    prefix = "eval_" if held_out else ""
    pairs, stats_file = it / f"{prefix}pairs.jsonl", it / f"{prefix}data_stats.json"
    if not on_main(pairs.exists):  # decided once: rank 0 may write the file before another rank looks
        if args.pairs:
            records, stats = inputs, {}
        else:
            what = "held-out" if held_out else "training"
            with timed(it, "eval_sample" if held_out else "sample",
                       f"{'feature selection and ' if run_inputs.principles.needs_selection else ''}"
                       f"y+, y-, y^o for {len(inputs)} {what} prompts, "
                       f"up to {args.max_new_tokens} tokens each"):
                seed = args.seed + 7919 * rank + (EVAL_SEED if held_out else 0)
                model = load_sampler()
                records, stats = build_records(model, tokenizer, deal(inputs, n_ranks, rank), run_inputs.principles,
                                               iteration=t, seed=seed,
                                               max_new_tokens=args.max_new_tokens, batch_size=args.sample_batch_size,
                                               compile=args.device.startswith("cuda"), progress=progress and is_main(),
                                               desc=f"{what} prompts")
                if args.logprob_filter and not held_out:  # held-out records show what the policy samples
                    records, filter_stats = logprob_filter(model, tokenizer, records, cutoff=args.cutoff)
                    stats.update(filter_stats)
                records, stats = merge_shares(gather_objects((records, dict(stats))))
                checks = run_inputs.checks
                records = [r | {"checks": checks[r["prompt"]]} if r["prompt"] in checks else r for r in records]
        if eq3:
            records = [r | {"raw": r["rejected"], "capped": {**r["capped"], "raw": r["capped"]["rejected"]}}
                       for r in records]
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


def run_iteration(args, cfg, t, it, policy, dtype, inputs, metrics_path, progress, rank=0, n_ranks=1, sampler=None):
    """Steps 1-5 for iteration t; each step's output is reused if an earlier attempt wrote it. `sampler`: a model
    folder that samples the training records instead of the policy (v2's generator). Returns the trained
    (model, tokenizer) for the held-out pass; None under torchrun (every rank loads the folder)."""
    with timed(it, "load"):
        model, tokenizer = load_model(policy, dtype=dtype, device=args.device)

    # 1-2. the policy builds its own preference data, for its training prompts and the held-out ones
    k, pool = args.prompts_per_iteration, inputs.train  # iteration t trains on the t-th slice, wrapping round
    prompts = pool if args.pairs else [pool[(t * k + i) % len(pool)] for i in range(min(k, len(pool)))]
    sample_dtype = torch.bfloat16 if args.device.startswith("cuda") else dtype  # a GPU samples from bf16 weights
    samplers = {}  # the models that sample (v2: the generator for the training records), loaded when needed

    def sampling(folder):
        if folder == policy and sample_dtype == dtype:
            return model
        if folder not in samplers:
            with timed(it, "load"):
                samplers[folder] = load_model(folder, dtype=sample_dtype, device=args.device)[0]
        return samplers[folder]

    eq3 = cfg.form == "generator" and args.neg_pair == "eq3"
    records = make_records(args, lambda: sampling(sampler or policy), tokenizer, t, it, prompts, inputs, progress,
                           rank, n_ranks, eq3=eq3)
    eval_records = make_records(args, lambda: sampling(policy), tokenizer, t, it, inputs.held_out, inputs, progress,
                                rank, n_ranks, held_out=True, eq3=eq3) if inputs.held_out else []
    samplers.clear()
    torch.manual_seed(args.seed + t)
    if args.lora:  # fresh adapters on the merged weights of the last iteration (after sampling: they start at zero)
        apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                   targets=args.lora_targets.split(","))
    if n_ranks > 1:  # from here on every parameter, gradient and AdamW state is split across the ranks
        shard(model, bf16=args.autocast)

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


def stage_configs(args) -> dict:
    """The TrainConfig of each stage of the recipe. v1: "policy", the SSO objective. v2: "generator", L+ + L-
    (the data generator's loss), and "policy", the base loss on the base pair alone."""
    cfg = TrainConfig(loss_type=args.loss, form=args.form, use_w=not args.no_w, use_g=not args.no_g,
                      theta=args.theta, alpha=args.alpha, beta=args.beta, lr=args.lr, batch_size=args.batch_size,
                      micro_batch_size=args.micro_batch_size, cutoff=args.cutoff, seed=args.seed,
                      tokens_per_micro_batch=args.tokens_per_micro_batch or None,
                      gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
                      autocast=args.autocast)  # the flags above take their defaults from TrainConfig
    if args.recipe == "v1":
        return {"policy": cfg}
    return {"generator": replace(cfg, form="generator", terms=tuple(args.generator_terms.split(","))),
            "policy": replace(cfg, use_w=False, use_g=False)}


def v1_iteration(stage, cfgs, it, metrics_path) -> dict:
    """SSO v1: the policy samples its own pairs and trains the SSO objective on them (steps 1-6)."""
    return stage(cfgs["policy"], it=it, metrics_path=metrics_path)


def v2_iteration(stage, cfgs, it, metrics_path) -> dict:
    """SSO v2: a data generator, a copy of the policy, learns L+ + L- on the policy's own pairs (steps 1-6 in
    it/generator/); then the trained generator samples the pairs (x: y+ > y-) the policy learns the base loss on,
    against its own start as the reference."""
    stage(cfgs["generator"], it=it / "generator", metrics_path=it / "generator" / "metrics.jsonl")
    return stage(cfgs["policy"], it=it, metrics_path=metrics_path, sampler=it / "generator" / "model")


def run_stage(args, cfg, t, it, policy, dtype, inputs, metrics_path, progress, rank, n_ranks, sampler=None):
    """Train `policy` into it/model with `cfg` unless that is done, then the held-out pass and it/summary.json
    (returned; None on ranks other than 0). Every step is skipped when an earlier attempt finished it."""
    if (it / "summary.json").exists():  # finished before an interruption
        return json.loads((it / "summary.json").read_text())
    it.mkdir(parents=True, exist_ok=True)
    trained = None
    if not (it / "model" / "model.safetensors").exists():
        trained = run_iteration(args, cfg, t, it, policy, dtype, inputs, metrics_path, progress and is_main(), rank,
                                n_ranks, sampler)
    score_held_out(it, cfg, lambda: trained or load_model(it / "model", dtype=dtype, device=args.device),
                   progress and is_main())
    if not is_main():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    history = [r for r in rows if r["iteration"] == t and r.get("split", "train") == "train"]
    summary = summarize(t, it, history, Tokenizer.from_folder(it / "model"), cfg, inputs.principles,
                        sampled=not args.pairs and cfg.form != "generator")  # v2: the policy stage reports it
    summary["recipe"] = {"recipe": args.recipe, "form": cfg.form, "use_w": cfg.use_w, "use_g": cfg.use_g,
                         **({"terms": list(cfg.terms), "neg_pair": args.neg_pair} if cfg.form == "generator" else {})}
    if summary["eval"]:
        log_eval_row(metrics_path, summary, len(history))
    write_json(it / "summary.json", summary)
    return summary


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
        choose_device_settings(args, n_ranks)
        if not args.pairs:  # the prompts' token counts: the model folder's tokenizer, not its weights
            check_cutoff(Tokenizer.from_folder(resolve(args.model)), inputs.train + inputs.held_out, args.cutoff,
                         args.max_new_tokens)
        if n_ranks > 1 and args.lora:
            raise ValueError("--lora is single-GPU only; under torchrun FSDP2 shards a full fine-tune (--no-lora)")
        out = on_main(lambda: open_run(Path(args.out), {k: v for k, v in vars(args).items() if k not in OPERATIONAL},
                                       args.resume))
    except (AssetError, CheckpointError, FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    if args.device.startswith("cuda"):  # TF32 tensor cores for the matmuls that stay fp32 (a full fine-tune's
        torch.set_float32_matmul_precision("high")  # fp32 log-prob head on one GPU)
    cfgs = stage_configs(args)
    if is_main():
        write_config(out / "train_config.json", cfgs["policy"])
        print(f"precision: {args.dtype} weights{', bf16 autocast' if args.autocast else ''} on {args.device}; "
              f"{len(inputs.held_out)} held-out {'records' if args.pairs else 'prompts'}; principles "
              f"{inputs.principles.name} ({', '.join(inputs.principles.checked) or 'no'} rule-checked)",
              file=sys.stderr)
    dtype = getattr(torch, args.dtype)
    metrics_path, summaries = out / "metrics.jsonl", []
    recipe = {"v1": v1_iteration, "v2": v2_iteration}[args.recipe]
    for t in range(args.iterations):
        it, policy = out / f"iter_{t}", args.model if t == 0 else out / f"iter_{t - 1}" / "model"
        stage = functools.partial(run_stage, args, t=t, policy=policy, dtype=dtype, inputs=inputs, progress=progress,
                                  rank=rank, n_ranks=n_ranks)
        summary = recipe(stage, cfgs, it, metrics_path)
        if is_main():
            summaries.append(summary)
            plot_metrics(out, summaries)

    if not is_main():
        return
    final = None
    if inputs.held_out and not args.pairs:  # the last policy answers the held-out prompts once more
        last = out / f"iter_{args.iterations - 1}" / "model"
        final = final_generation(out / "final", lambda: load_model(last, dtype=dtype, device=args.device),
                                 inputs.held_out, args.iterations, inputs.principles,
                                 out / "iter_0" / "eval_pairs.jsonl",
                                 seed=args.seed + EVAL_SEED + 1000 * (args.iterations + 1),
                                 max_new_tokens=args.max_new_tokens, batch_size=args.sample_batch_size,
                                 compile=args.device.startswith("cuda"), progress=progress)
        log_eval_row(metrics_path, final, 0, split="final")
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
    except (AssetError, CheckpointError, OSError, ValueError, TrainingError) as e:  # OSError: a full disk names it
        if is_main():  # every rank fails alike; rank 0 says why
            print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(cli())
