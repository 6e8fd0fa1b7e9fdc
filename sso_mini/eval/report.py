"""What a run tells its reader: stage times, iter_t/summary.json, the end-of-run table, metrics.png.

The table and the plot read only what train.py wrote (summary.json files, metrics.jsonl),
so they can be redrawn for any finished or interrupted run.
"""

import contextlib
import json
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from ..assets import write_atomic, write_json
from ..distributed import is_main
from ..records import DROP_REASONS, RESPONSES, generation_stats, read_jsonl
from ..trainer import held_out_metrics


@contextlib.contextmanager
def timed(it: Path, stage: str, what: str = ""):
    """Say what runs (and what the same stage took last iteration); add its wall time to it/timing.json
    (a stage finished over two attempts, or run in several parts, adds up)."""
    if is_main() and what:
        last = None if it.name == "final" else it.with_name(f"iter_{int(it.name.split('_')[1]) - 1}") / "timing.json"
        before = json.loads(last.read_text()).get(stage) if last and last.exists() else None
        print(f"[{it.name}] {stage}: {what}" + (f" (last iteration: {before:.0f} s)" if before else ""), file=sys.stderr)
    start = time.perf_counter()
    yield
    if is_main():
        path = it / "timing.json"
        seconds = json.loads(path.read_text()) if path.exists() else {}
        seconds[stage] = round(seconds.get(stage, 0) + time.perf_counter() - start, 1)
        write_json(path, seconds)


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
        "seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
    }
    if (it / "eval_pairs.jsonl").exists():
        held_out = read_jsonl(it / "eval_pairs.jsonl")
        ref, policy = (load_file(it / f"eval_{name}.safetensors")["logps"] for name in ("ref_logps", "logps"))
        summary["eval"] = held_out_metrics(tokenizer, held_out, policy, ref, cfg)
        if sampled:
            summary["generation"] = generation_stats(tokenizer, held_out)
    return summary


def log_eval_row(metrics_path: Path, summary: dict, steps: int):
    """The iteration's held-out metrics as one metrics.jsonl row (split "eval"), written once."""
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] if metrics_path.exists() else []
    rows = [r for r in rows if not (r.get("split") == "eval" and r["iteration"] == summary["iteration"])]
    generation = {f"generation/{k}": v for k, v in (summary["generation"] or {}).items() if k != "n"}
    metrics = {k: v for k, v in summary["eval"].items() if k != "intervals"}
    rows.append({"iteration": summary["iteration"], "split": "eval", "step": steps, **metrics, **generation})
    write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_table(rows, final=None):
    """The end-of-run table: training (steps where the policy moved), held-out, the policy's own answers."""
    print("\n| iter | kept/prompts | len y+ / y- / y^o | loss | W | train acc x / x+ / x- "
          "| held-out acc x [95% CI] / x+ / x- (n) | y^o length / eos rate (held out) | minutes |")
    print("|---|---|---|---|---|---|---|---|---|")
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
        print(f"{train}| {held} | {behaviour} | {r['seconds']['total'] / 60:.1f} |")


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
