"""How many records and which learning rate one SSO iteration needs before held-out numbers move.

    python -m sso_mini.eval.learning_curve [--out runs/curve] [--records 32,64,128]
        [--lrs 1e-5,2e-5,5e-5] [--losses ipo] [--eval-prompts 64] [any other flag of train.py]

One pool of records is sampled once from the start model: the largest --records training
records plus --eval-prompts held-out ones. Every grid point (records N, lr, loss) is one
train.py iteration from the same start on the first N records of that pool, scored on the
same held-out records against the same reference log-probs, so only N, lr and the loss
differ. The numbers are train.py's own (iter_0/summary.json, final/summary.json):

    held-out eval_rewards/accuracies on x, x+, x- with 95% Wilson intervals
    `reward_agrees`: on held-out records a rule decides (eval/verified_pairs.py), the share
        where the trained policy's implicit reward prefers the response that passes
    the trained policy's plain answers (y^o) on the held-out prompts: mean length, EOS rate, and with a
        rule-checked principle set (--principles) the share that pass each feature's check, against the
        start model's answers to the same prompts (McNemar)

Several invocations may share --out (e.g. `--losses dpo --records 128` after the IPO grid);
curve.json, curve.md and curve.png gather every point found there.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from ..assets import load_tensors, save_tensors, write_atomic, write_json
from ..metrics import wilson_interval
from ..records import read_jsonl, write_jsonl
from .report import fmt
from .runs import recorded_settings, seed_run, train


def point_name(n: int, lr: float, loss: str) -> str:
    return f"{loss}_lr{lr:g}_n{n}"


def seed_point(source: Path, run: Path, n: int, settings: dict):
    """Start a grid point's run folder from the pool: the first n records, the held-out records and the
    reference log-probs of both (sliced: one row per record)."""
    src = source / "iter_0"

    def fill(dst: Path):
        write_jsonl(dst / "pairs.jsonl", read_jsonl(src / "pairs.jsonl")[:n])
        write_json(dst / "data_stats.json", {"prompts": n, "records": n, "pool": str(source)})
        save_tensors({"logps": load_tensors(src / "ref_logps.safetensors")["logps"][:n].contiguous()},
                     dst / "ref_logps.safetensors")
        for name in ("eval_pairs.jsonl", "eval_data_stats.json", "eval_ref_logps.safetensors"):
            shutil.copy2(src / name, dst / name)

    seed_run(run, settings, fill)


def point_row(run: Path) -> dict:
    """One grid point's numbers, from the summaries train.py wrote."""
    settings = json.loads((run / "run.json").read_text())
    s = json.loads((run / "iter_0" / "summary.json").read_text())
    final = json.loads((run / "final" / "summary.json").read_text())
    ev, n = s["eval"], s["eval"]["n"]
    row = {"records": s["kept"], "lr": settings["lr"], "loss": settings["loss"], "n_eval": n,
           "train_acc": s["acc"], "eval_loss": ev["eval_loss"],
           "y_raw_length": final["generation"]["mean_length"], "y_raw_eos_rate": final["generation"]["eos_rate"],
           "reward_agrees": ev["signal"].get("reward_agrees"), "decided": ev["signal"]["decided"],
           "reward_agrees_interval": ev["signal"].get("reward_interval"), "minutes": s["seconds"]["total"] / 60,
           "vs_start": final.get("vs_start", {})}
    for p in ("", "p_", "n_"):  # (x+ and x-: None where the loss reads no pair under them, --no-g)
        acc = ev.get(f"eval_{p}rewards/accuracies")
        row[f"eval_{p}acc"] = acc
        row[f"eval_{p}acc_interval"] = None if acc is None else wilson_interval(round(acc * n), n)
        row[f"eval_{p}margin"] = ev.get(f"eval_{p}rewards/margins")
    return row


def markdown(rows, start: dict) -> str:
    features = list(rows[0]["vs_start"]) if rows else []
    lines = ["| loss | lr | records | held-out acc x [95% CI] | x+ | x- | margin x | verifier agrees (decided) | "
             "y^o length / EOS | " + "".join(f"{f}: y^o pass start -> trained (p) | " for f in features)
             + "train acc | minutes |", "|---|---|---|---|---|---|---|---|---|" + "---|" * len(features) + "---|---|",
             f"| start | - | - | - | - | - | - | - | {start['mean_length']:.1f} / {start['eos_rate']:.2f} | "
             + "- | " * len(features) + "- | - |"]
    for r in rows:
        lo, hi = r["eval_acc_interval"]
        agree = "-" if r["reward_agrees"] is None else f"{r['reward_agrees']:.2f} ({r['decided']})"
        behaviour = "".join(f"{c['start']:.2f} -> {c['end']:.2f} ({c['p_exact']:.2g}) | "
                            for c in r["vs_start"].values())
        lines.append(f"| {r['loss']} | {r['lr']:g} | {r['records']} | {r['eval_acc']:.2f} [{lo:.2f}, {hi:.2f}] | "
                     f"{fmt(r['eval_p_acc'])} | {fmt(r['eval_n_acc'])} | {r['eval_margin']:.5f} | {agree} | "
                     f"{r['y_raw_length']:.1f} / {r['y_raw_eos_rate']:.2f} | {behaviour}{r['train_acc']:.2f} | "
                     f"{r['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows, png: Path):
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) stays as it is

    features = list(rows[0]["vs_start"]) if rows else []
    fig = Figure(figsize=(18 if features else 12, 4))
    axes = fig.subplots(1, 3 if features else 2)
    for loss, lr in sorted({(r["loss"], r["lr"]) for r in rows}):
        rs = sorted((r for r in rows if (r["loss"], r["lr"]) == (loss, lr)), key=lambda r: r["records"])
        x = [r["records"] for r in rs]
        y = [r["eval_acc"] for r in rs]
        err = [[a - r["eval_acc_interval"][0] for a, r in zip(y, rs)], [r["eval_acc_interval"][1] - a
                                                                       for a, r in zip(y, rs)]]
        axes[0].errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{loss} lr {lr:g}")
        axes[1].plot(x, [r["eval_margin"] for r in rs], marker="o", label=f"{loss} lr {lr:g}")
        for f in features:
            axes[2].plot(x, [r["vs_start"][f]["end"] for r in rs], marker="o", label=f"{f}, {loss} lr {lr:g}")
    for f in features:
        axes[2].axhline(rows[0]["vs_start"][f]["start"], color="grey", lw=0.5)
        axes[2].set(title="held-out plain answers passing the check after training (line: start)",
                    xlabel="training records", xscale="log", ylim=(0, 1))
    axes[0].axhline(0.5, color="grey", lw=0.5)
    axes[0].set(title="held-out reward accuracy x: y+ > y- (95% CI)", xlabel="training records", xscale="log",
                ylim=(0, 1))
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set(title="held-out reward margin x (beta * mean token log-prob)", xlabel="training records",
                xscale="log")
    for ax in axes:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(png)


def gather(out: Path, source: Path) -> dict:
    rows = [point_row(p) for p in sorted(out.iterdir())
            if p.is_dir() and (p / "final" / "summary.json").exists()]
    rows.sort(key=lambda r: (r["loss"], r["lr"], r["records"]))
    start = json.loads((source / "iter_0" / "summary.json").read_text())["generation"]
    result = {"pool": str(source), "start_generation": start, "points": rows}
    write_atomic(out / "curve.json", json.dumps(result, indent=2))
    write_atomic(out / "curve.md", markdown(rows, start))
    plot(rows, out / "curve.png")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    ap.add_argument("--out", default="runs/curve")
    ap.add_argument("--records", default="32,64,128")
    ap.add_argument("--lrs", default="1e-5,2e-5,5e-5")
    ap.add_argument("--losses", default="ipo")
    ap.add_argument("--eval-prompts", type=int, default=64)
    ours, rest = ap.parse_known_args(argv)
    sizes = sorted(int(v) for v in ours.records.split(","))
    lrs, losses, out = [float(v) for v in ours.lrs.split(",")], ours.losses.split(","), Path(ours.out)
    out.mkdir(parents=True, exist_ok=True)
    source = out / "pool"

    def point_argv(n, lr, loss, folder):
        return [*rest, "--iterations", "1", "--prompts-per-iteration", str(n), "--eval-prompts",
                str(ours.eval_prompts), "--lr", str(lr), "--loss", loss, "--out", str(folder)]

    if not (source / "final" / "summary.json").exists():  # the pool: sampled once, trained as the first point
        started = json.loads((source / "run.json").read_text()) if (source / "run.json").exists() else None
        n, lr, loss = ((started["prompts_per_iteration"], started["lr"], started["loss"]) if started  # as it began
                       else (max(sizes), lrs[0], losses[0]))
        train(point_argv(n, lr, loss, source) + (["--resume"] if started else []))
    pool_settings = json.loads((source / "run.json").read_text())
    pool_size = len(read_jsonl(source / "iter_0" / "pairs.jsonl"))
    for loss in losses:
        for lr in lrs:
            for n in sizes:
                run = out / point_name(min(n, pool_size), lr, loss)
                is_pool = (min(n, pool_size), lr, loss) == (pool_size, pool_settings["lr"], pool_settings["loss"])
                if is_pool or (run / "final" / "summary.json").exists():
                    continue
                argv = point_argv(n, lr, loss, run)
                if not (run / "run.json").exists():  # the settings train.py resolves and records, then checks
                    seed_point(source, run, min(n, pool_size), recorded_settings(argv))
                train(argv + ["--resume"])
    result = gather(out, source)
    print((out / "curve.md").read_text())
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
