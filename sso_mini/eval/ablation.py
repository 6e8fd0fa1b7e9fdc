"""The paper's ablation at small scale: SSO vs without W, without G, and PBAA (neither).

docs/algorithm.md (v1 Tables 5/12): without W, response length grows fast over iterations
(Qwen2-7B-Instruct, iteration 3: ~4.5k tokens without W vs ~2.8k with it). Here the
four variants run the same loop from the same start, prompts and seeds; then every
iteration's model is measured objectively (evaluate.py) and the results are laid out
in the shape of Table 5:

    variant | iter | length (MT-Bench tokens) | IFEval strict | on-policy log-prob | judge acc | reward acc

"judge acc" counts only self-consistent votes of the self-reference judge (judge.py);
"SPPL acc" is the share of pairs whose semantic perplexity favours the chosen response.

    python train.py --ablation [--out runs/ablation] [--scale 4]   (any other flag of train.py applies too)
"""

import argparse
import json
import math
import os
import shutil
from pathlib import Path

from ..assets import write_atomic, write_json
from ..checkpoint import load_model
from .evaluate import evaluate_model

VARIANTS = {"SSO": {"no_w": False, "no_g": False}, "w/o W": {"no_w": True, "no_g": False},
            "w/o G": {"no_w": False, "no_g": True}, "PBAA (w/o W, G)": {"no_w": True, "no_g": True}}


def slug(name):
    return {"SSO": "sso", "w/o W": "no_w", "w/o G": "no_g", "PBAA (w/o W, G)": "pbaa"}[name]


def settings(scale: int) -> dict:
    """Default sizes finish on 2 CPU cores in about an hour; --scale N multiplies the data."""
    return {"prompts_per_iteration": 12 * scale, "max_new_tokens": 48 * min(scale, 4), "iterations": 3,
            "ifeval_limit": 40 * scale, "mtbench_limit": 12 * scale, "eval_max_new_tokens": 160 * min(scale, 4),
            "judge_samples": 6 * scale, "eval_batch_size": 48}


def share_first_iteration(sso: Path, run: Path, switches: dict):
    """Start a variant's run folder with SSO's iteration-0 pairs and reference log-probs.

    Iteration 0 samples from the start model with the same prompts and seed in every variant,
    so its data are identical; only the training differs. Sampling and scoring them once instead
    of four times saves ~3 minutes of the default run. The folder appears whole or not at all.
    """
    settings = json.loads((sso / "run.json").read_text()) | switches
    tmp = run.with_name(run.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "iter_0").mkdir(parents=True)
    for name in ("pairs.jsonl", "data_stats.json", "ref_logps.safetensors"):
        shutil.copy2(sso / "iter_0" / name, tmp / "iter_0" / name)
    write_json(tmp / "run.json", settings)  # what train.py --resume checks
    os.replace(tmp, run)


def run_ablation(train_run, args: argparse.Namespace, out: Path, **overrides) -> dict:
    """Train the four variants with train.run on the settings in `args` (train.py's flags; the
    ablation's own sizes replace theirs), then evaluate every iteration's model."""
    s = {**settings(args.scale), **overrides}
    resume, progress = args.resume, not args.no_progress
    out.mkdir(parents=True, exist_ok=True)
    common = {**vars(args), "iterations": s["iterations"], "prompts_per_iteration": s["prompts_per_iteration"],
              "max_new_tokens": s["max_new_tokens"], "ablation": False,
              "eval_prompts": 0}  # the variants are measured below, on IFEval and MT-Bench
    for name, switches in VARIANTS.items():
        run = out / slug(name)
        if name != "SSO" and not run.exists():
            share_first_iteration(out / "sso", run, switches)
        if not (run / f"iter_{s['iterations'] - 1}" / "summary.json").exists():
            train_run(argparse.Namespace(**{**common, **switches, "out": str(run), "resume": run.exists()}))
    start_model = json.loads((out / "sso" / "run.json").read_text())["model"]
    judge = load_model(start_model)  # one fixed judge for every variant: the starting policy
    kw = dict(ifeval_limit=s["ifeval_limit"], mtbench_limit=s["mtbench_limit"], max_new_tokens=s["eval_max_new_tokens"],
              judge_samples=s["judge_samples"], judge_max_new_tokens=s["eval_max_new_tokens"], judge_memo={},
              batch_size=s["eval_batch_size"], progress=progress)
    cache = out / "evaluations.json"
    evals = json.loads(cache.read_text()) if cache.exists() and resume else {}
    if "start" not in evals:
        evals["start"] = evaluate_model(start_model, **kw)
        write_atomic(cache, json.dumps(evals, indent=2))
    rows = [_row("start", 0, evals["start"], None)]
    for name in VARIANTS:
        for t in range(s["iterations"]):
            it = out / slug(name) / f"iter_{t}"
            key = f"{slug(name)}/{t}"
            if key not in evals:
                evals[key] = evaluate_model(it / "model", pairs_file=it / "pairs.jsonl", judge=judge, **kw)
                write_atomic(cache, json.dumps(evals, indent=2))
            rows.append(_row(name, t + 1, evals[key], json.loads((it / "summary.json").read_text())))
    result = {"settings": s, "rows": rows}
    write_atomic(out / "ablation.json", json.dumps(result, indent=2))
    write_atomic(out / "ablation.md", markdown(result))
    plot(rows, out / "ablation.png")
    return result


def _row(name, iteration, ev, summary) -> dict:
    ifeval, length = ev["ifeval"], ev["length"]
    return {
        "variant": name, "iteration": iteration,
        "length": length["mean_tokens"], "capped": length["cap_share"],
        "ifeval_strict": ifeval["prompt_strict"], "ifeval_se": ifeval["prompt_strict_se"],
        "onpolicy": ev["onpolicy"]["mean"] if ev.get("onpolicy") else None,
        "judge_acc": ev["judge"]["accuracy"] if ev.get("judge") else None,
        "judge_votes": ev["judge"]["n_voted"] if ev.get("judge") else None,
        "sppl_acc": ev["judge"]["perplexity_accuracy"] if ev.get("judge") else None,
        "reward_acc": summary["acc"] if summary else None,
        "pairs_len": summary["len_chosen"] if summary else None,
    }


def _fmt(v, spec):
    return "-" if v is None or math.isnan(v) else format(v, spec)  # NaN: e.g. a judge accuracy with no votes


def markdown(result) -> str:
    lines = ["| variant | iter | length (tokens) | capped | IFEval strict (±se) | on-policy log-prob | "
             "judge acc (votes) | SPPL acc | reward acc |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        votes = "" if r["judge_votes"] is None else f" ({r['judge_votes']})"
        lines.append(f"| {r['variant']} | {r['iteration']} | {_fmt(r['length'], '.0f')} | {_fmt(r['capped'], '.2f')} | "
                     f"{100 * r['ifeval_strict']:.1f} ± {100 * r['ifeval_se']:.1f} | {_fmt(r['onpolicy'], '.3f')} | "
                     f"{_fmt(r['judge_acc'], '.2f')}{votes} | {_fmt(r['sppl_acc'], '.2f')} | "
                     f"{_fmt(r['reward_acc'], '.2f')} |")
    s = result["settings"]
    lines.append(f"\nSettings: {json.dumps(s)}")
    return "\n".join(lines) + "\n"


def plot(rows, png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    start = rows[0]
    for name in VARIANTS:
        rs = [start] + [r for r in rows if r["variant"] == name]
        x = [r["iteration"] for r in rs]
        axes[0].plot(x, [r["length"] for r in rs], marker="o", label=name)
        axes[1].plot(x, [100 * r["ifeval_strict"] for r in rs], marker="o", label=name)
        axes[2].plot(x[1:], [r["onpolicy"] for r in rs[1:]], marker="o", label=name)
    for ax, title in zip(axes, ("MT-Bench response length (tokens)", "IFEval prompt strict (%)",
                                "on-policy: mean log-prob of the pairs")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
