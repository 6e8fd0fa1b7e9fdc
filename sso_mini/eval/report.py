"""A run's table and plot, drawn from its folder: the end-of-run table (one row per iteration) and
metrics.png. They read only what train.py wrote (iter_t/summary.json, final/summary.json,
metrics.jsonl), so they can be drawn for any finished or interrupted run.

    python -m sso_mini.eval.report runs/sso
"""

import json
import sys
from pathlib import Path

from ..metrics import fmt_rate, wilson_interval
from ..records import read_jsonl


def feature_signals(summary: dict, feature: str) -> tuple:
    """A summary's signal for one checked feature: (training pairs, held-out pairs or None)."""
    return summary["feature_signal"][feature], ((summary.get("eval") or {}).get("feature_signal") or {}).get(feature)


def pooled_signal(*signals) -> dict:
    """signal_accuracy over several record sets of one iteration (its training and held-out records;
    None: a set that was not scored)."""
    signals = [g for g in signals if g]
    right, decided = sum(g["pos_only"] for g in signals), sum(g["decided"] for g in signals)
    return {"accuracy": right / decided if decided else None, "interval": wilson_interval(right, decided),
            "decided": decided, "checked": sum(g["checked"] for g in signals)}


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_table(rows, final=None):
    """The end-of-run table: training (steps where the policy moved), held-out, the policy's own answers;
    per checked feature of the principle set its signal accuracy and how often the plain answers pass."""
    checked = list((rows[0].get("feature_signal") or {}) if rows else {})
    print("\n| iter | kept/prompts | len y+ / y- / y^o | loss | W | train acc x / x+ / x- "
          "| held-out acc x [95% CI] / x+ / x- (n) | IFEval signal acc (decided) | on-policy y+ / y- "
          "| y^o length / eos rate (held out) | "
          + "".join(f"{f}: signal acc train / held out (decided) | {f}: y^o pass rate [95% CI] | " for f in checked)
          + "minutes |")
    print("|---" * (11 + 2 * len(checked)) + "|")
    for r in rows + ([final] if final else []):
        ev, gen = r.get("eval"), r.get("generation")
        if "kept" in r:
            train = (f"| {r['iteration']} | {r['kept']}/{r['prompts']} | {r['len_chosen']:.0f} / "
                     f"{r['len_rejected']:.0f} / {r['len_raw']:.0f} | {r['loss']:.4f} | {fmt(r['W'], '.3f')} | "
                     f"{fmt(r['acc'])} / {fmt(r['p_acc'])}"
                     f" / {fmt(r['n_acc'])} ")
        else:  # the final policy: its behaviour only
            train = f"| final ({r['iteration']}) | - | - | - | - | - "
        held = "-" if not ev else (
            f"{ev['eval_rewards/accuracies']:.2f} [{ev['intervals']['eval_rewards/accuracies'][0]:.2f}, "
            f"{ev['intervals']['eval_rewards/accuracies'][1]:.2f}] / {fmt(ev.get('eval_p_rewards/accuracies'))} / "
            f"{fmt(ev.get('eval_n_rewards/accuracies'))} ({ev['n']})")
        behaviour_ = "-" if not gen else f"{gen['mean_length']:.1f} / {gen['eos_rate']:.2f}"
        signal = pooled_signal(r.get("signal"), (ev or {}).get("signal"))
        signal = f"{signal['accuracy']:.2f} ({signal['decided']})" if signal["decided"] else "-"
        onpolicy = f"{r['onpolicy']['y_pos']:.3f} / {r['onpolicy']['y_neg']:.3f}" if r.get("onpolicy") else "-"
        features = ""
        for f in checked:
            sig = "-"
            if "feature_signal" in r:
                train_f, held_f = feature_signals(r, f)
                sig = (f"{fmt(train_f['accuracy'])} / {fmt(held_f and held_f['accuracy'])} "
                       f"({train_f['decided']} / {held_f['decided'] if held_f else 0})")
            b = (r.get("behaviour") or {}).get(f)
            features += f"| {sig} | {fmt_rate(b)} "
        print(f"{train}| {held} | {signal} | {onpolicy} | {behaviour_} {features}| {r['seconds']['total'] / 60:.1f} |")
    for f, c in ((final or {}).get("vs_start") or {}).items():
        print(f"\n{f}: the held-out plain answers y^o pass its check {100 * c['start']:.0f}% at the start, "
              f"{100 * c['end']:.0f}% after the last iteration ({100 * c['difference']:+.0f} points on {c['n']} "
              f"prompts: {c['became_passing']} now pass, {c['became_failing']} no longer do; "
              f"exact McNemar p = {c['p_exact']:.2g})")


def plot_metrics(out: Path, summaries: list[dict]):
    """metrics.png: per step loss, W and training accuracies; per iteration the held-out
    accuracies and the policy's own mean response length; with a checked principle set, per
    feature the share of plain answers that pass its check and the pairs' signal accuracy."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) stays as it is

    rows = read_jsonl(out / "metrics.jsonl", required=())
    train = [r for r in rows if r.get("split", "train") == "train"]
    if not train:
        return
    pairs = (("", "x: y+ > y-"), ("p_", "x+: y+ > y-"), ("n_", "x-: y^o > y+"))
    x = range(1, len(train) + 1)
    checked = list(summaries[0].get("feature_signal") or {}) if summaries else []
    fig = Figure(figsize=(25 if checked else 20, 4))
    axes = fig.subplots(1, 5 if checked else 4)
    axes[0].plot(x, [r["loss"] for r in train], label="loss")
    axes[0].plot(x, [r["unweighted_loss"] for r in train], label="unweighted_loss (W = 1)")
    axes[1].plot(x, [r.get("W") for r in train], label="W")  # (a loss that reads neither pair under x logs none)
    for prefix, name in pairs:
        axes[2].plot(x, [None if r.get("policy_is_reference") else r.get(f"{prefix}rewards/accuracies") for r in train],
                     ".-", label=name)  # a gap: the policy still was the reference
    for ax, title in zip(axes, ("loss", "weight W", "training reward accuracy")):
        ax.set_title(title)
        ax.set_xlabel("step (all iterations)")
        ax.legend()
    held = [s for s in summaries if s.get("eval")]
    for prefix, name in pairs:
        axes[3].plot([s["iteration"] for s in held], [s["eval"].get(f"eval_{prefix}rewards/accuracies") for s in held],
                     "o-", label=f"held out {name}")
    axes[3].axhline(0.5, color="grey", lw=0.5)
    axes[3].set(title="held out: reward accuracy; y^o length", ylim=(0, 1),
                xlabel="iteration (y^o: the policy at its start; the last point is the final policy)",
                xticks=range(len(summaries)))
    axes[3].legend(loc="lower left", fontsize="small")
    gen = [s for s in summaries if s.get("generation")]
    if gen:
        length = axes[3].twinx()
        length.plot([s["iteration"] for s in gen], [s["generation"]["mean_length"] for s in gen], "k--s",
                    label="mean y^o length (tokens)")
        length.legend(loc="lower right", fontsize="small")
    for f in checked:
        gen = [s for s in summaries if (s.get("behaviour") or {}).get(f)]
        line, = axes[4].plot([s["iteration"] for s in gen], [s["behaviour"][f]["rate"] for s in gen], "o-",
                             label=f"{f}: y^o passes")
        signal = [(s["iteration"], pooled_signal(*feature_signals(s, f))) for s in summaries if "feature_signal" in s]
        axes[4].plot([t for t, _ in signal], [g["accuracy"] for _, g in signal], "s--", color=line.get_color(),
                     label=f"{f}: signal acc (y+ passes, y- fails)")
    if checked:
        axes[4].set(title="checked features: y^o pass rate, signal accuracy", ylim=(0, 1),
                    xlabel="iteration (y^o: the policy at its start; the last point is the final policy)",
                    xticks=range(len(summaries)))
        axes[4].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "metrics.png")


def summaries(run: Path) -> tuple[list[dict], dict | None]:
    """The run's iteration summaries in order, and the final policy's (None if the run has not ended)."""
    rows, t = [], 0
    while (run / f"iter_{t}" / "summary.json").exists():
        rows.append(json.loads((run / f"iter_{t}" / "summary.json").read_text()))
        t += 1
    final = run / "final" / "summary.json"
    return rows, json.loads(final.read_text()) if final.exists() else None


def main(argv=None):
    """`python -m sso_mini.eval.report RUN`: print the run's table and write RUN/metrics.png."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / "metrics.jsonl").exists():
        print("usage: python -m sso_mini.eval.report RUN  (a train.py run folder, with its metrics.jsonl)",
              file=sys.stderr)
        return 2
    run = Path(argv[0])
    rows, final = summaries(run)
    print_table(rows, final)
    plot_metrics(run, rows + ([final] if final else []))
    print(f"\nplot: {run / 'metrics.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
