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

from .. import rules
from ..assets import write_atomic, write_json
from ..batches import is_capped, record_sequences
from ..distributed import barrier, is_main, on_main
from ..losses import CHOSEN, REJECTED, implicit_rewards, sso_loss
from ..records import DROP_REASONS, RESPONSES, generation_stats, read_jsonl, sample_plain, write_jsonl
from ..tokenizer import end_of_turn_id
from ..trainer import TrainConfig, load_tensors, loss_settings, score_records
from .ifeval import paired_difference


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


def decided_pairs(verdicts, margins=None) -> dict:
    """The four cases of (y+ passes, y- passes) over `verdicts` [(pos, neg), ...]: pairs where both pass
    or both fail say nothing; of the rest (`decided`), accuracy = P(y+ passes | exactly one passes),
    with its 95% Wilson interval. `margins` (one reward margin of y+ over y- per verdict, e.g. a
    trained policy's on held-out records) adds `reward_agrees`: the share of decided pairs where the
    margin's sign agrees with the rule."""
    cases, agree = dict.fromkeys(("both_pass", "pos_only", "neg_only", "both_fail"), 0), 0
    for i, (pos, neg) in enumerate(verdicts):
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


def signal_accuracy(records, margins=None) -> dict:
    """How often y+ really is better than y-, judged by a rule, over the records whose prompt carries an
    IFEval instruction (`checks`, --verifier-share): a response passes when it follows every
    instruction (strict). decided_pairs gives the numbers."""
    kept = [i for i, r in enumerate(records) if r.get("checks")]
    verdicts = [tuple(all(rules.check({**records[i]["checks"], "prompt": records[i]["prompt"]}, records[i][k])[0])
                      for k in ("chosen", "rejected")) for i in kept]
    return decided_pairs(verdicts, None if margins is None else [margins[i] for i in kept])


def feature_signal(records, principles, margins=None) -> dict:
    """Signal accuracy per checked feature of the principle set: over the records steered by that
    feature, whether y+ shows its good behaviour and y- does not (the feature's rule check;
    decided_pairs gives the numbers)."""
    out = {}
    for name in principles.checked:
        kept = [i for i, r in enumerate(records) if name in r.get("features", ())]
        verdicts = [tuple(principles.passes(name, records[i][k], is_capped(records[i], k))
                          for k in ("chosen", "rejected")) for i in kept]
        out[name] = decided_pairs(verdicts, None if margins is None else [margins[i] for i in kept])
    return out


def behaviour(records, principles) -> dict:
    """How the policy behaves on its own: per checked feature, the share of plain answers y^o that
    pass the feature's check, with its 95% Wilson interval (records: dicts with raw and capped)."""
    out = {}
    for name in principles.checked:
        k = sum(principles.passes(name, r["raw"], is_capped(r, "raw")) for r in records)
        out[name] = {"pass": k, "n": len(records), "rate": k / len(records) if records else None,
                     "interval": wilson_interval(k, len(records))}
    return out


def behaviour_change(start, end, principles) -> dict:
    """Per checked feature, the plain answers of two policies to the same prompts (matched by prompt):
    pass rates and McNemar's exact test on the prompts whose verdict changed."""
    before = {r["prompt"]: r for r in start}
    pairs = [(before[r["prompt"]], r) for r in end if r["prompt"] in before]
    out = {}
    for name in principles.checked:
        a, b = ([principles.passes(name, r["raw"], is_capped(r, "raw")) for r in side] for side in zip(*pairs))
        d = paired_difference(b, a)  # end - start
        out[name] = {"n": d["n"], "start": sum(a) / d["n"], "end": sum(b) / d["n"], "difference": d["difference"],
                     "became_passing": d["a_only"], "became_failing": d["b_only"], "p_exact": d["p_exact"]}
    return out


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


def final_generation(final: Path, load_policy, prompts, iteration: int, principles, start: Path, *, progress: bool,
                     **sampling) -> dict:
    """final/summary.json: the last policy (load_policy() -> model, tokenizer) answers the
    held-out prompts' y^o once more: point `iteration` of the policy's behaviour, and, per checked
    feature, its change from the start model's answers to the same prompts (`start`: iter_0's
    eval_pairs.jsonl)."""
    if (final / "summary.json").exists():
        return json.loads((final / "summary.json").read_text())
    with timed(final, "eval_sample", f"the final policy answers the {len(prompts)} held-out prompts (y^o)"):
        model, tokenizer = load_policy()
        records = sample_plain(model, tokenizer, prompts, progress=progress, **sampling)
        write_jsonl(final / "generation.jsonl", records)
    seconds = json.loads((final / "timing.json").read_text())
    summary = {"iteration": iteration, "generation": generation_stats(tokenizer, records),
               "behaviour": behaviour(records, principles),
               "vs_start": behaviour_change(read_jsonl(start), records, principles) if principles.checked else {},
               "seconds": {**seconds, "total": round(sum(seconds.values()), 1)}}
    write_json(final / "summary.json", summary)
    return summary


def mean(rows, key):
    return sum(r[key] for r in rows) / len(rows) if rows else None


def summarize(t, it, history, tokenizer, cfg, principles, sampled: bool) -> dict:
    """iter_t/summary.json: the data, the training steps, the held-out metrics and the policy's behaviour.

    `sampled`: the records came from this run's policy (not from --pairs), so their plain
    responses y^o say how the policy behaves on its own. `principles`: the run's principle set;
    its checked features give the per-feature signal and behaviour.
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
        "signal": signal_accuracy(records), "feature_signal": feature_signal(records, principles), "onpolicy": None,
        "seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
    }
    if (it / "eval_pairs.jsonl").exists():
        held_out = read_jsonl(it / "eval_pairs.jsonl")
        ref, policy = (load_tensors(it / f"eval_{name}.safetensors")["logps"] for name in ("ref_logps", "logps"))
        summary["eval"] = held_out_metrics(tokenizer, held_out, policy, ref, cfg)
        reward = implicit_rewards(policy, ref, record_lengths(tokenizer, held_out, cfg.cutoff), cfg.loss_type,
                                  cfg.beta)  # [R, 6], as the loss reads it
        margins = reward[:, CHOSEN] - reward[:, REJECTED]
        summary["eval"]["signal"] = signal_accuracy(held_out, margins)
        summary["eval"]["feature_signal"] = feature_signal(held_out, principles, margins)
        if sampled:
            summary["generation"] = generation_stats(tokenizer, held_out)
            summary["behaviour"] = behaviour(held_out, principles)
    if sampled:  # the reference pass is the policy that sampled these records
        summary["onpolicy"] = mean_token_logps(tokenizer, records, load_tensors(it / "ref_logps.safetensors")["logps"],
                                               cfg.cutoff)
    return summary


def eval_metrics(summary: dict) -> dict:
    """A summary's per-iteration numbers under their metrics.jsonl names: the held-out loss and rewards
    (eval_*), the IFEval-instruction signal (eval_signal/*), per checked feature the signal of the
    training pairs (signal/F/*) and held-out pairs (eval_signal/F/*) and the plain answers' pass rate
    (eval_behaviour/F/pass_rate), and the plain answers' length (generation/*)."""
    out = {f"generation/{k}": v for k, v in (summary.get("generation") or {}).items() if k != "n"}
    out |= {f"eval_behaviour/{f}/pass_rate": b["rate"] for f, b in (summary.get("behaviour") or {}).items()}
    ev = summary.get("eval") or {}
    out |= {k: v for k, v in ev.items() if not isinstance(v, dict)}
    if ev:
        out |= {f"eval_signal/{k}": ev["signal"][k] for k in ("accuracy", "decided", "reward_agrees")}
    for prefix, signals in (("signal", summary.get("feature_signal")), ("eval_signal", ev.get("feature_signal"))):
        for f, g in (signals or {}).items():
            out |= {f"{prefix}/{f}/accuracy": g["accuracy"], f"{prefix}/{f}/decided": g["decided"]}
    return out


def log_eval_row(metrics_path: Path, summary: dict, steps: int, split: str = "eval"):
    """An iteration's held-out numbers (split "eval"), or the final policy's (split "final"), as one
    metrics.jsonl row, written once."""
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] if metrics_path.exists() else []
    rows = [r for r in rows if not (r.get("split") == split and r["iteration"] == summary["iteration"])]
    rows.append({"iteration": summary["iteration"], "split": split, "step": steps, **eval_metrics(summary)})
    write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _rate(b: dict) -> str:
    return f"{b['rate']:.2f} [{b['interval'][0]:.2f}, {b['interval'][1]:.2f}]" if b["n"] else "-"


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
                     f"{r['len_rejected']:.0f} / {r['len_raw']:.0f} | {r['loss']:.4f} | {r['W']:.3f} | "
                     f"{fmt(r['acc'])} / {fmt(r['p_acc'])}"
                     f" / {fmt(r['n_acc'])} ")
        else:  # the final policy: its behaviour only
            train = f"| final ({r['iteration']}) | - | - | - | - | - "
        held = "-" if not ev else (
            f"{ev['eval_rewards/accuracies']:.2f} [{ev['intervals']['eval_rewards/accuracies'][0]:.2f}, "
            f"{ev['intervals']['eval_rewards/accuracies'][1]:.2f}] / {ev['eval_p_rewards/accuracies']:.2f} / "
            f"{ev['eval_n_rewards/accuracies']:.2f} ({ev['n']})")
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
            features += f"| {sig} | {_rate(b) if b else '-'} "
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

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split", "train") == "train"]
    if not train:
        return
    pairs = (("", "x: y+ > y-"), ("p_", "x+: y+ > y-"), ("n_", "x-: y^o > y+"))
    x = range(1, len(train) + 1)
    checked = list(summaries[0].get("feature_signal") or {}) if summaries else []
    fig = Figure(figsize=(25 if checked else 20, 4))
    axes = fig.subplots(1, 5 if checked else 4)
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
