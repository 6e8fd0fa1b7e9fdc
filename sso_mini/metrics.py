"""What an iteration did on held-out prompts, with 95% Wilson intervals; written to iter_t/summary.json and one
metrics.jsonl row, from which eval/report.py draws the table and the plot.

    held-out pairs, scored by the reference (before) and the trained policy (after) -> SSO loss, reward accuracy
    pairs a rule decides (a principle's `check` or an IFEval instruction passes exactly one of y+, y-)
        -> signal accuracy: how often y+ is the one that passes
    the plain answers y^o (held-out pairs: sampled by the iteration's start policy; final/: the last policy's)
        -> per checked feature, the share that passes (final policy: change from start)
"""

import json
import math

import torch

from . import rules
from .assets import write_atomic
from .batches import is_capped, record_sequences
from .losses import CHOSEN, REJECTED, implicit_rewards, sso_loss
from .records import DROP_REASONS, RESPONSES, read_jsonl
from .tokenizer import end_of_turn_id


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% for z = 1.96)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar(pass_a: list[bool], pass_b: list[bool]) -> dict:
    """A minus B on the same prompts, with McNemar's exact test: only prompts where they differ count (a_only: A
    passes, B fails; b_only: the reverse); under no difference a_only ~ Binomial(a_only + b_only, 1/2), two-sided."""
    if len(pass_a) != len(pass_b) or not pass_a:
        raise ValueError(f"mcnemar: need two equal, non-empty lists (got {len(pass_a)} and {len(pass_b)})")
    a_only = sum(1 for a, b in zip(pass_a, pass_b) if a and not b)
    b_only = sum(1 for a, b in zip(pass_a, pass_b) if b and not a)
    m = a_only + b_only
    tail = sum(math.comb(m, k) for k in range(min(a_only, b_only) + 1))
    p_exact = min(1.0, 2 * tail / 2**m)  # int / int: exact even where 2**m overflows a float
    return {"n": len(pass_a), "difference": (a_only - b_only) / len(pass_a), "a_only": a_only, "b_only": b_only,
            "p_exact": p_exact}


def decided_pairs(verdicts, margins=None) -> dict:
    """The four cases of (y+ passes, y- passes) over `verdicts` [(pos, neg), ...] and the signal accuracy; `margins`
    (a policy's reward of y+ minus y-) adds `reward_agrees`: how often its sign agrees with the decided pairs."""
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
    """decided_pairs over the records whose prompt carries an IFEval instruction (`checks`), checked strictly."""
    kept = [i for i, r in enumerate(records) if r.get("checks")]
    verdicts = [tuple(all(rules.check({**records[i]["checks"], "prompt": records[i]["prompt"]}, records[i][k])[0])
                      for k in ("chosen", "rejected")) for i in kept]
    return decided_pairs(verdicts, None if margins is None else [margins[i] for i in kept])


def feature_signal(records, principles, margins=None) -> dict:
    """decided_pairs per checked feature of the principle set, over the records that feature steered."""
    out = {}
    for name in principles.checked:
        kept = [i for i, r in enumerate(records) if name in r.get("features", ())]
        verdicts = [tuple(principles.passes(name, records[i][k], is_capped(records[i], k))
                          for k in ("chosen", "rejected")) for i in kept]
        out[name] = decided_pairs(verdicts, None if margins is None else [margins[i] for i in kept])
    return out


def pass_rates(records, principles) -> dict:
    """Per checked feature, the share of the plain answers y^o that pass its check, with its 95% interval."""
    out = {}
    for name in principles.checked:
        k = sum(principles.passes(name, r["raw"], is_capped(r, "raw")) for r in records)
        out[name] = {"pass": k, "n": len(records), "rate": k / len(records) if records else None,
                     "interval": wilson_interval(k, len(records))}
    return out


def pass_rate_change(start, end, principles) -> dict:
    """Per checked feature, the pass rates of two policies' plain answers to the same prompts, and McNemar's test."""
    before = {r["prompt"]: r for r in start}
    pairs = [(before[r["prompt"]], r) for r in end if r["prompt"] in before]
    out = {}
    for name in principles.checked:
        start_pass, end_pass = ([principles.passes(name, r["raw"], is_capped(r, "raw")) for r in side]
                                for side in zip(*pairs))
        d = mcnemar(end_pass, start_pass)  # a_only: passes at the end only
        out[name] = {"n": d["n"], "start": sum(start_pass) / d["n"], "end": sum(end_pass) / d["n"],
                     "difference": d["difference"], "became_passing": d["a_only"], "became_failing": d["b_only"],
                     "p_exact": d["p_exact"]}
    return out


def plain_answers(tokenizer, records) -> dict:
    """The plain answers y^o: mean length in tokens and the share that ended before the cap (`eos_rate`)."""
    capped = sum(is_capped(r, "raw") for r in records)
    n = max(1, len(records))
    return {"n": len(records), "mean_length": sum(len(tokenizer.encode(r["raw"])) for r in records) / n,
            "eos_rate": 1 - capped / n, "capped": capped / n}


def response_lengths(tokenizer, records, cutoff: int) -> torch.Tensor:
    """[R, 6] response-token counts of the six sequences (what the scores sum over)."""
    eot = end_of_turn_id(tokenizer)
    return torch.tensor([[len(y) for _, y in record_sequences(tokenizer, r, cutoff, eot)] for r in records])


def on_policy(tokenizer, records, ref_logps, cutoff: int) -> dict:
    """How on-policy the pairs are: mean per-token log-prob of y+ and y- under x, by the policy that sampled them."""
    per_token = ref_logps / response_lengths(tokenizer, records, cutoff).clamp(min=1)
    return {"y_pos": per_token[:, CHOSEN].mean().item(), "y_neg": per_token[:, REJECTED].mean().item()}


def held_out_rewards(tokenizer, records, policy_logps, ref_logps, cfg, principles) -> dict:
    """The held-out records scored before (ref_logps) and after (policy_logps) the epoch: SSO loss and rewards under
    TRL's eval_ names, an interval per accuracy, and the signal accuracy with the reward margin's agreement."""
    lengths = response_lengths(tokenizer, records, cfg.cutoff)
    _, metrics = sso_loss(policy_logps, ref_logps, lengths, **cfg.loss_settings())
    n = len(records)
    out = {"n": n, **{f"eval_{k}": v for k, v in metrics.items()}}
    out["intervals"] = {k: wilson_interval(round(out[k] * n), n)
                        for k in (f"eval_{p}rewards/accuracies" for p in ("", "p_", "n_")) if k in out}
    reward = implicit_rewards(policy_logps, ref_logps, lengths, cfg.loss_type, cfg.beta)  # [R, 6]
    margins = reward[:, CHOSEN] - reward[:, REJECTED] if CHOSEN in cfg.columns else None  # (not scored: v2's G)
    out["signal"] = signal_accuracy(records, margins)
    out["feature_signal"] = feature_signal(records, principles, margins)
    return out


def mean(rows, key):
    """The mean of `key` over the rows that log it (a loss logs only the pairs it reads), or None."""
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else None


def summarize(t: int, records, stats: dict, history: list[dict], tokenizer, principles) -> dict:
    """An iteration's training side for summary.json: what was kept, lengths, step means, the pairs' signal."""
    moved = [h for h in history if not h["policy_is_reference"]]  # accuracies skip these: a tie is no failure
    lengths = {k: sum(len(tokenizer.encode(r[k])) for r in records) / len(records) for k in RESPONSES}
    return {"iteration": t, "prompts": stats.get("prompts", len(records)), "kept": len(records),
            "dropped": {k: v for k, v in stats.items() if k in DROP_REASONS},
            "capped": stats.get("capped", 0),
            "sample_tokens_per_s": stats.get("sample_tokens", 0) / max(stats.get("sample_seconds", 0), 1e-9),
            "train_tokens_per_s": mean(history, "tokens_per_s"),
            "len_chosen": lengths["chosen"], "len_rejected": lengths["rejected"], "len_raw": lengths["raw"],
            "loss": mean(history, "loss"), "W": mean(history, "W"), "acc": mean(moved, "rewards/accuracies"),
            "p_acc": mean(moved, "p_rewards/accuracies"), "n_acc": mean(moved, "n_rewards/accuracies"),
            "steps_at_reference": len(history) - len(moved), "eval": None, "generation": None, "onpolicy": None,
            "signal": signal_accuracy(records), "feature_signal": feature_signal(records, principles)}


def metrics_row(summary: dict) -> dict:
    """Numbers by metrics.jsonl name: eval_*, eval_signal/*, [eval_]signal/F/*, eval_behaviour/F/*, generation/*."""
    out = {f"generation/{k}": v for k, v in (summary.get("generation") or {}).items() if k != "n"}
    out |= {f"eval_behaviour/{f}/pass_rate": b["rate"] for f, b in (summary.get("behaviour") or {}).items()}
    ev = summary.get("eval") or {}
    out |= {k: v for k, v in ev.items() if not isinstance(v, dict)}
    if ev:
        out |= {f"eval_signal/{k}": ev["signal"].get(k) for k in ("accuracy", "decided", "reward_agrees")}
    for prefix, signals in (("signal", summary.get("feature_signal")), ("eval_signal", ev.get("feature_signal"))):
        for f, g in (signals or {}).items():
            out |= {f"{prefix}/{f}/accuracy": g["accuracy"], f"{prefix}/{f}/decided": g["decided"]}
    return out


def log_row(metrics_path, summary: dict, steps: int, split: str = "eval"):
    """One metrics.jsonl row of held-out numbers (split "eval", or "final"); a resumed run replaces its own row."""
    rows = read_jsonl(metrics_path, required=()) if metrics_path.exists() else []
    rows = [r for r in rows if not (r.get("split") == split and r["iteration"] == summary["iteration"])]
    rows.append({"iteration": summary["iteration"], "split": split, "step": steps, **metrics_row(summary)})
    write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))


def fmt_rate(b: dict | None) -> str:
    return f"{b['rate']:.2f} [{b['interval'][0]:.2f}, {b['interval'][1]:.2f}]" if b and b["n"] else "-"


def one_line(summary: dict) -> str:
    """An iteration's headline: held-out reward accuracy, and per feature the pairs' signal and the pass rate."""
    ev, parts = summary.get("eval"), []
    if ev and "eval_rewards/accuracies" in ev:
        lo, hi = ev["intervals"]["eval_rewards/accuracies"]
        parts.append(f"held-out acc x {ev['eval_rewards/accuracies']:.2f} [{lo:.2f}, {hi:.2f}] (n {ev['n']})")
    for f, g in (summary.get("feature_signal") or {}).items():
        acc = "-" if g["accuracy"] is None else f"{g['accuracy']:.2f}"
        parts.append(f"{f}: signal acc {acc} ({g['decided']} decided), plain answers pass "
                     f"{fmt_rate((summary.get('behaviour') or {}).get(f))}")
    return "; ".join(parts)
