"""Self-Steering Optimization, the whole loop in one recipe.

    held out = --eval-prompts prompts set aside once (never trained on)
    for t in iterations:
        policy = the model iteration t-1 produced (the start model for t = 0)
        1. features  the policy picks the principles that matter for each prompt (from --principles)
        2. sample    y+ ~ pi(.|x+), y- ~ pi(.|x-), y^o ~ pi(.|x)      -> iter_t/pairs.jsonl
                     the same for the held-out prompts                 -> iter_t/eval_pairs.jsonl
        3. reference log-probs of the sequences the loss reads         -> iter_t/{,eval_}ref_logps.safetensors
        4. train one epoch: W * (L(x: y+ > y-) + theta * [L(x+: y+ > y-) + L(x-: y^o > y+)])
        5. save                                                        -> iter_t/model/ (HF folder)
        6. evaluate  the trained policy scores the held-out records    -> iter_t/summary.json, metrics.jsonl
    after the last iteration the final policy answers the held-out prompts once more -> final/summary.json

`sso_iteration` is steps 1-6. --recipe v2 (the paper's second version, `v2_iteration`) puts a data
generator in front of the policy: a copy of the policy trained through steps 1-6 with L+ + L- (in
iter_t/generator/), whose samples y+ ~ G(.|x+), y- ~ G(.|x-) the policy then learns the base loss
L(x: y+ > y-) on, against its own start as the reference.

`python train.py` runs it on SmolLM2-135M-Instruct on a CPU; `--model Qwen2-7B` on a GPU;
`torchrun --nproc_per_node=N train.py ...` on N GPUs (FSDP2, sso_mini/distributed.py). Every step writes its
output atomically and is skipped when done: an interrupted run continues with `--resume`. The flags are in
sso_mini/settings.py.
"""

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from sso_mini import metrics
from sso_mini.assets import AssetError, write_json
from sso_mini.checkpoint import CheckpointError, load_model, save_model
from sso_mini.records import build_records, read_jsonl, sample_plain, write_jsonl
from sso_mini.settings import Settings, UsageError, open_run, parse_args, settle
from sso_mini.tokenizer import Tokenizer
from sso_mini.trainer import ONE_PROCESS, TrainingError, cached_logps, logged_steps, score_records, train_epoch

EVAL_SEED = 1_000_003  # offsets the held-out sampling seeds from the training ones


def main(argv=None):
    """Parse and settle every setting, then run the recipe's iterations and the final answers."""
    args = parse_args(argv)
    ranks = ONE_PROCESS
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: FSDP2 over the ranks
        from sso_mini.distributed import Ranks

        ranks = Ranks()
    try:
        run(args, ranks)
    finally:
        ranks.close()


def run(args, ranks):
    try:  # the inputs, the model's config and --out, before anything is written
        s = settle(args, ranks)
        out = open_run(s)
    except (AssetError, CheckpointError, FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    if s.device.type == "cuda":  # TF32 tensor cores for the matmuls that stay fp32 (the log-prob head)
        torch.set_float32_matmul_precision("high")
    if ranks.main:
        s.stages["policy"].save(out / "train_config.json")
        print(f"precision: {s.flags.dtype} weights{', bf16 autocast' if s.flags.autocast else ''} on {s.device}; "
              f"{len(s.held_out)} held-out {'records' if s.flags.pairs else 'prompts'}; principles "
              f"{s.principles.name} ({', '.join(s.principles.checked) or 'no'} rule-checked)", file=sys.stderr)
    for t in range(s.flags.iterations):
        policy = s.flags.model if t == 0 else out / f"iter_{t - 1}" / "model"
        recipe = sso_iteration if s.flags.recipe == "v1" else v2_iteration
        summary = recipe(s, t, policy, out / f"iter_{t}")
        if ranks.main:
            print(f"[iter_{t}] {metrics.one_line(summary)}", file=sys.stderr)
    if ranks.main and s.held_out and not s.flags.pairs:
        final_answers(s, out / f"iter_{s.flags.iterations - 1}" / "model", out)
        print(f"\nrun folder: {out} (pairs, models, metrics.jsonl); the table and metrics.png: "
              f"python -m sso_mini.eval.report {out}", file=sys.stderr)


def sso_iteration(s: Settings, t: int, policy, folder: Path, stage="policy", sampler=None) -> dict:
    """Steps 1-6 of iteration t in `folder` (iter_t/): train `policy` with s.stages[stage] into folder/model;
    returns folder/summary.json. Every step's output is reused when an earlier attempt wrote it. `sampler`:
    the model folder that samples the training pairs instead of the policy (v2's generator)."""
    if (folder / "summary.json").exists():  # finished before an interruption
        return json.loads((folder / "summary.json").read_text())
    cfg, ranks, trained = s.stages[stage], s.ranks, None  # cfg: what this stage trains (TrainConfig)
    if not (folder / "model" / "model.safetensors").exists():
        with timed(s, folder, "load"):
            model, tokenizer = load_model(policy, dtype=s.dtype, device=s.device)
        # 1-2. the policy builds its own preference data, for its training prompts and the held-out ones
        # (a GPU samples from a bf16 copy of fp32 weights: `sample_records` loads one from the policy's folder)
        policy_sampler = policy if s.device.type == "cuda" and s.dtype != torch.bfloat16 else model
        records = sample_pairs(s, t, folder, sampler or policy_sampler, tokenizer, stage)
        held_out = sample_pairs(s, t, folder, policy_sampler, tokenizer, stage, held_out=True)
        model.clear_cache()  # (if the model sampled) its KV cache stays between batches; training needs the memory
        if s.memory_plan and records:  # on a GPU: micro-batches fitted to this iteration's longest record
            from sso_mini.memory import planned_config

            cfg = planned_config(cfg, s.memory_plan, records, tokenizer)
        if ranks.size > 1:  # from here on every parameter, gradient and AdamW state is split across the ranks
            ranks.shard(model, bf16=cfg.autocast)
        # 3. reference log-probs: the iteration's starting weights, computed once
        with timed(s, folder, "reference", f"reference log-probs of {len(records)} records x "
                                                         f"{len(cfg.columns)} sequences"):
            ref = score_records(model, tokenizer, records, cfg, cache=folder / "ref_logps.safetensors",
                                progress=s.progress, desc="reference log-probs", ranks=ranks)
        with timed(s, folder, "eval_reference", f"reference log-probs of {len(held_out)} held-out records"):
            score_records(model, tokenizer, held_out, cfg, cache=folder / "eval_ref_logps.safetensors",
                          progress=s.progress, desc="reference log-probs (held out)", ranks=ranks)
        if s.flags.lora:  # fresh adapters on the policy's weights, which stay frozen (sso_mini/lora.py)
            from sso_mini.lora import apply_lora

            apply_lora(model, s.flags.lora_rank, s.flags.lora_alpha, s.flags.lora_dropout,
                       s.flags.lora_targets.split(","))
        # 4. one epoch of the SSO objective
        steps = -(-len(records) // cfg.batch_size)
        with timed(s, folder, "train", f"one epoch, {steps} steps of {cfg.batch_size} records"):
            train_epoch(model, tokenizer, records, ref, cfg, folder, iteration=t,
                        metrics_path=metrics_path(s, folder, stage), progress=s.progress, ranks=ranks)
        # 5. the trained policy becomes the next iteration's policy and reference
        trained = save(s, model, tokenizer, folder)
    # 6. the trained policy scores the held-out records: what the epoch did to pairs it never saw
    return evaluate(s, stage, t, folder, trained)


def v2_iteration(s: Settings, t: int, policy, folder: Path) -> dict:
    """SSO v2: a data generator, a copy of the policy, learns L+ + L- on the policy's own pairs (steps 1-6 in
    folder/generator/); then the trained generator samples the pairs (x: y+ > y-) the policy learns the base loss
    on, against its own start as the reference."""
    sso_iteration(s, t, policy, folder / "generator", stage="generator")
    return sso_iteration(s, t, policy, folder, sampler=folder / "generator" / "model")


def sample_pairs(s: Settings, t: int, folder: Path, sampler, tokenizer, stage: str, held_out=False) -> list[dict]:
    """folder/pairs.jsonl: the records of iteration t's training prompts (held_out: folder/eval_pairs.jsonl,
    those of the held-out prompts), sampled once by `sampler` (a model, or a folder to load one from), with
    their checks. With --pairs the prompts are records already. Under torchrun each rank samples its share
    of the prompts and rank 0 writes the file."""
    prompts = s.held_out if held_out else s.prompts_for(t)
    if not prompts:
        return []
    prefix = "eval_" if held_out else ""
    path, stats_file = folder / f"{prefix}pairs.jsonl", folder / f"{prefix}data_stats.json"
    # one answer for every rank (asked on rank 0): another rank could look after rank 0 wrote the file
    if not s.ranks.on_rank0(path.exists):
        with timed(s, folder, "eval_sample" if held_out else "sample",
                   f"y+, y-, y^o for {len(prompts)} {'held-out' if held_out else 'training'} prompts, up to "
                   f"{s.flags.max_new_tokens} tokens each"):
            records, stats = (prompts, {}) if s.flags.pairs else \
                sample_records(s, t, prompts, sampler, tokenizer, held_out)
        if stage == "generator" and s.flags.neg_chosen == "y_neg":  # L- prefers y- over y+ (v2 Eq. 3)
            records = [r | {"raw": r["rejected"], "capped": {**r["capped"], "raw": r["capped"]["rejected"]}}
                       for r in records]
        if not records:
            raise ValueError(f"iteration {t}: every pair of {path.name} was filtered out ({stats})")
        if s.ranks.main:
            write_json(stats_file, stats | {"records": len(records)})  # a pairs file cut short is refused below
            write_jsonl(path, records)
        s.ranks.wait()
    records, stats = read_jsonl(path), json.loads(stats_file.read_text())
    if len(records) != stats["records"]:
        raise ValueError(f"{path} holds {len(records)} of its {stats['records']} records: delete it to sample again")
    if s.ranks.main:
        print(f"[{path.parent.name}] {len(records)} pairs in {path}: {stats}", file=sys.stderr)
    return records


def sample_records(s: Settings, t: int, prompts: list, sampler, tokenizer, held_out: bool) -> tuple[list[dict], dict]:
    """The records of `prompts` (every rank samples its share) with each checkable prompt's check, and the
    counts of what was kept and dropped."""
    model = sampler if isinstance(sampler, torch.nn.Module) else \
        load_model(sampler, dtype=torch.bfloat16 if s.device.type == "cuda" else s.dtype, device=s.device)[0]
    seed = s.flags.seed + 7919 * s.ranks.rank + (EVAL_SEED if held_out else 0)
    records, counts = build_records(model, tokenizer, s.ranks.share(prompts), s.principles, iteration=t, seed=seed,
                                    max_new_tokens=s.flags.max_new_tokens, batch_size=s.flags.sample_batch_size,
                                    compile=s.device.type == "cuda", progress=s.progress and s.ranks.main,
                                    desc="held-out prompts" if held_out else "training prompts")
    if s.flags.logprob_filter and not held_out:  # held-out records show what the policy samples
        from sso_mini.logprob_filter import logprob_filter

        records, filtered = logprob_filter(model, tokenizer, records, cutoff=s.flags.cutoff)
        counts.update(filtered)
    records, counts = s.ranks.gather_records(records, counts)  # torchrun: every rank's share, on every rank
    return [r | {"checks": s.checks[r["prompt"]]} if r["prompt"] in s.checks else r for r in records], counts


def save(s: Settings, model, tokenizer, folder: Path):
    """folder/model: the trained weights as a Hugging Face folder (LoRA: merged into the base; torchrun: gathered
    on rank 0); the resume state is no longer needed. Returns the plain model (None on ranks other than 0)."""
    if s.ranks.size > 1:
        from sso_mini.model import Transformer

        state = s.ranks.full_state_dict(model)
        model = Transformer.from_state_dict(model.config, state) if s.ranks.main else None
    elif s.flags.lora:
        from sso_mini.lora import merge_lora

        model = merge_lora(model)
    if s.ranks.main:
        with timed(s, folder, "save"):
            save_model(model, tokenizer, folder / "model")
        shutil.rmtree(folder / "resume", ignore_errors=True)
    s.ranks.wait()
    return model


def evaluate(s: Settings, stage: str, t: int, folder: Path, trained=None) -> dict:
    """Step 6: the trained policy (`trained`, or folder/model) scores the held-out records; folder/summary.json holds
    the iteration's numbers (metrics.py) and metrics.jsonl their row. None on ranks other than 0."""
    cfg, tokenizer = s.stages[stage], Tokenizer.from_folder(folder / "model")
    held_out = read_jsonl(folder / "eval_pairs.jsonl") if s.held_out else []
    if held_out:
        with timed(s, folder, "eval_score", f"the trained policy scores {len(held_out)} held-out records"):
            policy_logps = cached_logps(folder / "eval_logps.safetensors")
            if policy_logps is None:
                model = trained or load_model(folder / "model", dtype=s.dtype, device=s.device)[0]
                policy_logps = score_records(model, tokenizer, held_out, cfg, cache=folder / "eval_logps.safetensors",
                                             progress=s.progress, desc="held-out log-probs (trained)",
                                             ranks=s.ranks)
    if not s.ranks.main:
        return None
    records, stats = read_jsonl(folder / "pairs.jsonl"), json.loads((folder / "data_stats.json").read_text())
    history = logged_steps(metrics_path(s, folder, stage), t)
    summary = metrics.summarize(t, records, stats, history, tokenizer, s.principles)
    sampled = not s.flags.pairs and stage == "policy"  # the policy's own answers (not a generator's)
    if held_out:
        ref_logps = cached_logps(folder / "eval_ref_logps.safetensors")
        summary["eval"] = metrics.held_out_rewards(tokenizer, held_out, policy_logps, ref_logps, cfg, s.principles)
    if held_out and sampled:  # the plain answers y^o of eval_pairs.jsonl: this iteration's start policy's
        summary["generation"] = metrics.plain_answers(tokenizer, held_out)
        summary["behaviour"] = metrics.pass_rates(held_out, s.principles)
    if sampled:  # the reference pass is the policy that sampled these records
        ref_logps = cached_logps(folder / "ref_logps.safetensors")
        summary["onpolicy"] = metrics.on_policy(tokenizer, records, ref_logps, cfg.cutoff)
    seconds = json.loads((folder / "timing.json").read_text())
    summary["seconds"] = {**seconds, "total": round(sum(seconds.values()), 1)}
    summary["recipe"] = {"recipe": s.flags.recipe, "form": cfg.form, "use_w": cfg.use_w, "use_g": cfg.use_g,
                         **({"terms": list(cfg.terms), "neg_chosen": s.flags.neg_chosen}
                            if stage == "generator" else {})}
    if held_out:
        metrics.log_row(metrics_path(s, folder, stage), summary, len(history))
    write_json(folder / "summary.json", summary)
    return summary


def metrics_path(s: Settings, folder: Path, stage: str) -> Path:
    """The run's metrics.jsonl; v2's generator logs its own steps in iter_t/generator/metrics.jsonl."""
    return folder / "metrics.jsonl" if stage == "generator" else s.out / "metrics.jsonl"


def final_answers(s: Settings, last: Path, out: Path):
    """final/summary.json: the last policy answers the held-out prompts once more (y^o): its plain answers,
    and per checked feature their change from the start model's answers to the same prompts."""
    final = out / "final"
    if not (final / "summary.json").exists():
        with timed(s, final, "eval_sample", f"the final policy answers the {len(s.held_out)} held-out prompts (y^o)"):
            model, tokenizer = load_model(last, dtype=s.dtype, device=s.device)
            seed = s.flags.seed + EVAL_SEED + 1000 * (s.flags.iterations + 1)
            answers = sample_plain(model, tokenizer, s.held_out, seed=seed, max_new_tokens=s.flags.max_new_tokens,
                                   batch_size=s.flags.sample_batch_size, compile=s.device.type == "cuda",
                                   progress=s.progress)
            write_jsonl(final / "generation.jsonl", answers)
        seconds = json.loads((final / "timing.json").read_text())
        start = read_jsonl(out / "iter_0" / "eval_pairs.jsonl")
        write_json(final / "summary.json", {
            "iteration": s.flags.iterations, "generation": metrics.plain_answers(tokenizer, answers),
            "behaviour": metrics.pass_rates(answers, s.principles),
            "vs_start": metrics.pass_rate_change(start, answers, s.principles) if s.principles.checked else {},
            "seconds": {**seconds, "total": round(sum(seconds.values()), 1)}})
    summary = json.loads((final / "summary.json").read_text())
    metrics.log_row(out / "metrics.jsonl", summary, 0, split="final")
    for f, c in summary["vs_start"].items():
        print(f"\n{f}: the held-out plain answers y^o pass its check {100 * c['start']:.0f}% at the start, "
              f"{100 * c['end']:.0f}% after the last iteration ({100 * c['difference']:+.0f} points on {c['n']} "
              f"prompts: {c['became_passing']} now pass, {c['became_failing']} no longer do; exact McNemar "
              f"p = {c['p_exact']:.2g})", file=sys.stderr)


@contextlib.contextmanager
def timed(s: Settings, folder: Path, phase: str, what: str = ""):
    """Say what runs (and what the same phase took last iteration); add its wall time to folder/timing.json, under
    `phase` (a phase finished over two attempts, or run in several parts, adds up); on a GPU, its peak memory to
    folder/memory.json (the highest over attempts)."""
    if s.ranks.main and what:
        t = int(folder.name.split("_")[1]) if folder.name.startswith("iter_") else None  # not final/, generator/
        last = folder.with_name(f"iter_{t - 1}") / "timing.json" if t else None
        before = json.loads(last.read_text()).get(phase) if last and last.exists() else None
        print(f"[{folder.name}] {phase}: {what}" + (f" (last iteration: {before:.0f} s)" if before else ""),
              file=sys.stderr)
    start = time.perf_counter()
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    yield
    if s.ranks.main:
        path = folder / "timing.json"
        seconds = json.loads(path.read_text()) if path.exists() else {}
        seconds[phase] = round(seconds.get(phase, 0) + time.perf_counter() - start, 1)
        write_json(path, seconds)
    if s.ranks.main and s.device.type == "cuda":
        path = folder / "memory.json"
        peaks = json.loads(path.read_text()) if path.exists() else {}
        peaks[phase] = max(peaks.get(phase, 0), round(torch.cuda.max_memory_allocated(s.device) / 2**30, 2))  # GiB
        write_json(path, peaks)


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
        if int(os.environ.get("RANK", "0")) == 0:  # every rank fails alike; rank 0 says why
            print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(cli())
