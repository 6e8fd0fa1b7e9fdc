"""What a run tells its reader: stage times, iter_t/summary.json, the end-of-run table, metrics.png.

The table and the plot read only what train.py wrote (summary.json files, metrics.jsonl),
so they can be redrawn for any finished or interrupted run.
"""

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from ..assets import write_atomic, write_json
from ..batches import record_sequences
from ..distributed import barrier, is_main, on_main
from ..losses import CHOSEN, REJECTED, implicit_rewards, sso_loss
from ..records import DROP_REASONS, RESPONSES, generation_stats, read_jsonl, sample_plain, write_jsonl
from ..tokenizer import end_of_turn_id
from ..trainer import TrainConfig, load_tensors, loss_settings, score_records
from . import ifeval


@contextlib.contextmanager
def timed(it: Path, stage: str, what: str = ""):
    """Say what runs (and what the same stage took last iteration); add its wall time to it/timing.json
    (a stage finished over two attempts, or run in several parts, adds up)."""
    if is_main() and what:
        t = int(it.name.split("_")[1]) if it.name.startswith("iter_") else None  # final/, iter_t/generator/
        last = it.with_name(f"iter_{t - 1}") / "timing.json" if t else None
        before = json.loads(last.read_text()).get(stage) if last and last.exists() else None
        print(f"[{it.name}] {stage}: {what}" + (f" (last iteration: {before:.0f} s)" if before else ""),
              file=sys.stderr)
    start = time.perf_counter()
    yield
    if is_main():
        path = it / "timing.json"
        seconds = json.loads(path.read_text()) if path.exists() else {}
        seconds[stage] = round(seconds.get(stage, 0) + time.perf_counter() - start, 1)
        write_json(path, seconds)


def record_lengths(tokenizer, records, cutoff: int) -> torch.Tensor:
    """[R, 6] response-token counts of the six sequences (what score_records sums over)."""
    eot = end_of_turn_id(tokenizer)
    return torch.tensor([[len(y) for _, y in record_sequences(tokenizer, r, cutoff, eot)] for r in records])


def held_out_metrics(tokenizer, records, policy_logps, ref_logps, cfg: TrainConfig) -> dict:
    """The SSO loss and rewards of held-out records, with TRL's eval_ prefix (eval_loss,
    eval_rewards/accuracies, eval_p_rewards/margins, ...): one batch of all of them. Plus
    `n` and `intervals`: a 95% Wilson interval for each pair's accuracy."""
    _, metrics = sso_loss(policy_logps, ref_logps, record_lengths(tokenizer, records, cfg.cutoff),
                          **loss_settings(cfg))
    metrics, n = {f"eval_{k}": v for k, v in metrics.items()}, len(records)
    intervals = {key: wilson_interval(round(metrics[key] * n), n)
                 for key in (f"eval_{p}rewards/accuracies" for p in ("", "p_", "n_"))}
    return {"n": n, **metrics, "intervals": intervals}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% for z = 1.96)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def signal_accuracy(records, margins=None) -> dict:
    """How often y+ really is better than y-, judged by a rule, over the records that carry checks.

    A record's y+ and y- each pass (every instruction, strict) or fail. Pairs where both pass or
    both fail say nothing; of the rest (`decided`), accuracy = P(y+ passes | exactly one passes),
    with its 95% Wilson interval. `margins` ([R] reward margins of y+ over y-, e.g. a trained
    policy's on held-out records) adds `reward_agrees`: the share of decided pairs where the
    margin's sign agrees with the rule.
    """
    cases, agree = dict.fromkeys(("both_pass", "pos_only", "neg_only", "both_fail"), 0), 0
    for i, r in enumerate(records):
        if not r.get("checks"):
            continue
        check = {**r["checks"], "prompt": r["prompt"]}
        pos, neg = (all(ifeval.check(check, r[k])[0]) for k in ("chosen", "rejected"))
        cases["both_pass" if pos and neg else "pos_only" if pos else "neg_only" if neg else "both_fail"] += 1
        if margins is not None and pos != neg:
            agree += int(bool(margins[i] > 0) == pos)
    decided = cases["pos_only"] + cases["neg_only"]
    out = {"checked": sum(cases.values()), "decided": decided, **cases,
           "accuracy": cases["pos_only"] / decided if decided else None,
           "interval": wilson_interval(cases["pos_only"], decided)}
    if margins is not None:
        out |= {"reward_agrees": agree / decided if decided else None,
                "reward_interval": wilson_interval(agree, decided)}
    return out


def pooled_signal(*signals) -> dict:
    """signal_accuracy over several record sets of one iteration (its training and held-out records)."""
    right, decided = sum(g["pos_only"] for g in signals), sum(g["decided"] for g in signals)
    return {"accuracy": right / decided if decided else None, "interval": wilson_interval(right, decided),
            "decided": decided, "checked": sum(g["checked"] for g in signals)}


def mean_token_logps(tokenizer, records, logps, cutoff: int) -> dict:
    """Mean per-token log-prob of y+ and y- under the plain prompt x (columns chosen, rejected): with the
    logps of the policy that sampled them (its reference pass), how on-policy the pairs are."""
    per_token = logps / record_lengths(tokenizer, records, cutoff).clamp(min=1)
    return {"y_pos": per_token[:, CHOSEN].mean().item(), "y_neg": per_token[:, REJECTED].mean().item()}


def score_held_out(it: Path, cfg, load_policy, progress: bool):
    """The trained policy (load_policy() -> model, tokenizer) scores the held-out records once
    (it/eval_logps.safetensors)."""
    if not (it / "eval_pairs.jsonl").exists() or on_main((it / "eval_logps.safetensors").exists):
        return
    records = read_jsonl(it / "eval_pairs.jsonl")
    with timed(it, "eval_score", f"the trained policy scores {len(records)} held-out records"):
        model, tokenizer = load_policy()
        score_records(model, tokenizer, records, cfg, cache=it / "eval_logps.safetensors", progress=progress,
                      desc="held-out log-probs (trained)")
    barrier()


def final_generation(final: Path, load_policy, prompts, iteration: int, *, progress: bool, **sampling) -> dict:
    """final/summary.json: the last policy (load_policy() -> model, tokenizer) answers the
    held-out prompts' y^o once more: point `iteration` of the policy's behaviour."""
    if (final / "summary.json").exists():
        return json.loads((final / "summary.json").read_text())
    with timed(final, "eval_sample", f"the final policy answers the {len(prompts)} held-out prompts (y^o)"):
        model, tokenizer = load_policy()
        records = sample_plain(model, tokenizer, prompts, progress=progress, **sampling)
        write_jsonl(final / "generation.jsonl", records)
    seconds = json.loads((final / "timing.json").read_text())
    summary = {"iteration": iteration, "generation": generation_stats(tokenizer, records),
               "seconds": {**seconds, "total": round(sum(seconds.values()), 1)}}
    write_json(final / "summary.json", summary)
    return summary


def mean(rows, key):
    return sum(r[key] for r in rows) / len(rows) if rows else None


def summarize(t, it, history, tokenizer, cfg, sampled: bool) -> dict:
    """iter_t/summary.json: the data, the training steps, the held-out metrics and the policy's behaviour.

    `sampled`: the records came from this run's policy (not from --pairs), so their plain
    responses y^o say how the policy behaves on its own.
    """
    records = read_jsonl(it / "pairs.jsonl")
    stats = json.loads((it / "data_stats.json").read_text())
    seconds = json.loads((it / "timing.json").read_text()) if (it / "timing.json").exists() else {}
    lengths = {k: sum(len(tokenizer.encode(r[k])) for r in records) / len(records) for k in RESPONSES}
    moved = [h for h in history if not h.get("policy_is_reference")]  # a tie with the reference is no failure
    summary = {
        "iteration": t, "prompts": stats.get("prompts", len(records)), "kept": len(records),
        "dropped": {k: v for k, v in stats.items() if k in DROP_REASONS}, "capped": stats.get("capped", 0),
        "sample_tokens_per_s": stats.get("sample_tokens", 0) / max(stats.get("sample_seconds", 0), 1e-9),
        "train_tokens_per_s": mean(history, "tokens_per_s"),
        "len_chosen": lengths["chosen"], "len_rejected": lengths["rejected"], "len_raw": lengths["raw"],
        "loss": mean(history, "loss"), "W": mean(history, "W"), "acc": mean(moved, "rewards/accuracies"),
        "p_acc": mean(moved, "p_rewards/accuracies"), "n_acc": mean(moved, "n_rewards/accuracies"),
        "steps_at_reference": len(history) - len(moved), "eval": None, "generation": None,
        "signal": signal_accuracy(records), "onpolicy": None,
        "seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
    }
    if (it / "eval_pairs.jsonl").exists():
        held_out = read_jsonl(it / "eval_pairs.jsonl")
        ref, policy = (load_tensors(it / f"eval_{name}.safetensors")["logps"] for name in ("ref_logps", "logps"))
        summary["eval"] = held_out_metrics(tokenizer, held_out, policy, ref, cfg)
        reward = implicit_rewards(policy, ref, record_lengths(tokenizer, held_out, cfg.cutoff), cfg.loss_type,
                                  cfg.beta)  # [R, 6], as the loss reads it
        summary["eval"]["signal"] = signal_accuracy(held_out, reward[:, CHOSEN] - reward[:, REJECTED])
        if sampled:
            summary["generation"] = generation_stats(tokenizer, held_out)
    if sampled:  # the reference pass is the policy that sampled these records
        summary["onpolicy"] = mean_token_logps(tokenizer, records, load_tensors(it / "ref_logps.safetensors")["logps"],
                                               cfg.cutoff)
    return summary


def log_eval_row(metrics_path: Path, summary: dict, steps: int):
    """The iteration's held-out metrics as one metrics.jsonl row (split "eval"), written once."""
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] if metrics_path.exists() else []
    rows = [r for r in rows if not (r.get("split") == "eval" and r["iteration"] == summary["iteration"])]
    generation = {f"generation/{k}": v for k, v in (summary["generation"] or {}).items() if k != "n"}
    signal = {f"eval_signal/{k}": summary["eval"]["signal"][k] for k in ("accuracy", "decided", "reward_agrees")}
    metrics = {**{k: v for k, v in summary["eval"].items() if not isinstance(v, dict)}, **signal}
    rows.append({"iteration": summary["iteration"], "split": "eval", "step": steps, **metrics, **generation})
    write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_table(rows, final=None):
    """The end-of-run table: training (steps where the policy moved), held-out, the policy's own answers."""
    print("\n| iter | kept/prompts | len y+ / y- / y^o | loss | W | train acc x / x+ / x- "
          "| held-out acc x [95% CI] / x+ / x- (n) | signal acc (decided) | on-policy y+ / y- "
          "| y^o length / eos rate (held out) | minutes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows + ([final] if final else []):
        ev, gen = r.get("eval"), r.get("generation")
        if "kept" in r:
            train = (f"| {r['iteration']} | {r['kept']}/{r['prompts']} | {r['len_chosen']:.0f} / "
                     f"{r['len_rejected']:.0f} / {r['len_raw']:.0f} | {r['loss']:.4f} | {r['W']:.3f} | "
                     f"{fmt(r['acc'])} / {fmt(r['p_acc'])}"
                     f" / {fmt(r['n_acc'])} ")
        else:  # the final policy: its behaviour only
            train = f"| final ({r['iteration']}) | - | - | - | - | - "
        held = "-" if not ev else (
            f"{ev['eval_rewards/accuracies']:.2f} [{ev['intervals']['eval_rewards/accuracies'][0]:.2f}, "
            f"{ev['intervals']['eval_rewards/accuracies'][1]:.2f}] / {ev['eval_p_rewards/accuracies']:.2f} / "
            f"{ev['eval_n_rewards/accuracies']:.2f} ({ev['n']})")
        behaviour = "-" if not gen else f"{gen['mean_length']:.1f} / {gen['eos_rate']:.2f}"
        signal = pooled_signal(*(x for x in (r.get("signal"), (ev or {}).get("signal")) if x))
        signal = f"{signal['accuracy']:.2f} ({signal['decided']})" if signal["decided"] else "-"
        onpolicy = f"{r['onpolicy']['y_pos']:.3f} / {r['onpolicy']['y_neg']:.3f}" if r.get("onpolicy") else "-"
        print(f"{train}| {held} | {signal} | {onpolicy} | {behaviour} | {r['seconds']['total'] / 60:.1f} |")


def plot_metrics(out: Path, summaries: list[dict]):
    """metrics.png: per step loss, W and training accuracies; per iteration the held-out
    accuracies and the policy's own mean response length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split", "train") == "train"]
    if not train:
        return
    pairs = (("", "x: y+ > y-"), ("p_", "x+: y+ > y-"), ("n_", "x-: y^o > y+"))
    x = range(1, len(train) + 1)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    axes[0].plot(x, [r["loss"] for r in train], label="loss")
    axes[0].plot(x, [r["raw_loss"] for r in train], label="raw_loss (W = 1)")
    axes[1].plot(x, [r["W"] for r in train], label="W")
    for prefix, name in pairs:
        axes[2].plot(x, [None if r.get("policy_is_reference") else r[f"{prefix}rewards/accuracies"] for r in train],
                     ".-", label=name)  # a gap: the policy still was the reference
    for ax, title in zip(axes, ("loss", "weight W", "training reward accuracy")):
        ax.set_title(title)
        ax.set_xlabel("step (all iterations)")
        ax.legend()
    held = [s for s in summaries if s.get("eval")]
    for prefix, name in pairs:
        axes[3].plot([s["iteration"] for s in held], [s["eval"][f"eval_{prefix}rewards/accuracies"] for s in held],
                     "o-", label=f"held out {name}")
    axes[3].axhline(0.5, color="grey", lw=0.5)
    axes[3].set(title="held out: reward accuracy after training; policy's y^o length", ylim=(0, 1),
                xlabel="iteration (y^o: the policy at its start; the last point is the final policy)",
                xticks=range(len(summaries)))
    axes[3].legend(loc="lower left", fontsize="small")
    gen = [s for s in summaries if s.get("generation")]
    if gen:
        length = axes[3].twinx()
        length.plot([s["iteration"] for s in gen], [s["generation"]["mean_length"] for s in gen], "k--s",
                    label="mean y^o length (tokens)")
        length.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "metrics.png")
    plt.close(fig)
