"""The paper's ablation at small scale: SSO vs without W, without G, and PBAA (neither).

The paper's claims (docs/algorithm.md), each with the column that tests it here:

    1. SSO's pairs stay accurate over iterations  -> signal acc: of the pairs a rule can decide
       (checkable prompts, verified_pairs.py), the share where y+ passes and y- fails
    2. SSO's pairs stay on-policy                  -> on-policy: mean token log-prob of y+ and y-
       under x, by the policy that sampled them (its reference pass)
    3. W curbs length growth                       -> length / EOS rate of the held-out plain answers y^o,
       also sampled again at a cap where most of the start model's answers end (`plain_max_new_tokens`)
    4. quality rises                               -> IFEval prompt- and instruction-strict on a fixed
       subset, and with a rule-checked principle set the share of those plain answers that pass each
       feature's check; McNemar's test against the start model and between variants

With a principle set that has rule checks (--principles), claim 1 is also measured per feature
(pooled over the iterations of each variant, so that it rests on many decided pairs).

The four variants run train.py's loop from the same start, prompts and seeds (iteration 0's
data are shared, only training differs); a row "iteration t" holds the data iteration t
trained on (signal, on-policy) and the model it produced (held-out reward accuracy, length,
IFEval). The self-reference judge's accuracy where it votes and the semantic-perplexity
accuracy stay as second columns.

    python -m sso_mini.eval.ablation [--out runs/ablation] [--scale 4] [any flag of train.py]

Writes ablation.md (the table), ablation.json (every number in it, and more),
ablation_signals.png (signal accuracy and on-policy-ness against iteration, as v1 Fig. 4) and
ablation_length.png (length and EOS rate against iteration). Resumable: rerun with --resume.
"""

import argparse
import itertools
import json
import math
import shutil
import sys
from pathlib import Path

from ..assets import write_atomic
from ..batches import is_capped
from ..checkpoint import load_model
from ..metrics import wilson_interval
from ..principles import load_principles
from ..records import read_jsonl, sample_plain
from ..settings import parse_args
from .evaluate import ifeval_eval
from .ifeval import paired_difference
from .judge import judge_pairs
from .report import feature_signals, pooled_signal
from .runs import seed_run, train

VARIANTS = {"SSO": {"no_w": False, "no_g": False}, "w/o W": {"no_w": True, "no_g": False},
            "w/o G": {"no_w": False, "no_g": True}, "PBAA (w/o W, G)": {"no_w": True, "no_g": True}}
SHARED = ("pairs.jsonl", "data_stats.json", "ref_logps.safetensors",
          "eval_pairs.jsonl", "eval_data_stats.json", "eval_ref_logps.safetensors")


def slug(name):
    return {"SSO": "sso", "w/o W": "no_w", "w/o G": "no_g", "PBAA (w/o W, G)": "pbaa"}[name]


def settings(scale: int) -> dict:
    """The CPU default and --scale N (N times the data; --scale 8: the GPU size, 512-token cap). From the
    measurements in benchmarks/README.md: lr 2e-5, the default run's (the brevity set's learning curve);
    training samples at most 64 tokens on a CPU (the start model's answers have a median of 306 tokens,
    and a third never end), so the plain answers are sampled once more at 512 tokens, where two thirds
    of the start model's answers end, nearly all that ever do; 32 prompts per iteration and 64 held out
    give a rule-checked set over 100 decided pairs per variant. A set without checks mixes in a half of
    checkable prompts instead (verifier_share)."""
    variants = ["SSO", "w/o W", "PBAA (w/o W, G)"] if scale == 1 else list(VARIANTS)  # the CPU drops w/o G
    return {"variants": variants, "prompts_per_iteration": 32 * scale, "eval_prompts": 64 * scale,
            "max_new_tokens": 64 * min(scale, 8), "iterations": 3, "verifier_share": 0.5, "lr": 2e-5,
            "ifeval_limit": 40 * scale, "eval_max_new_tokens": 128 * min(scale, 4), "judge_samples": 4 * scale,
            "plain_max_new_tokens": 512, "eval_batch_size": 48}


def share_first_iteration(sso: Path, run: Path, switches: dict):
    """Start a variant's run folder with SSO's iteration-0 records and reference log-probs.

    Iteration 0 samples from the start model with the same prompts and seed in every variant,
    so its data are identical; only the training differs.
    """
    def fill(dst: Path):
        for name in SHARED:
            if (sso / "iter_0" / name).exists():
                shutil.copy2(sso / "iter_0" / name, dst / name)

    seed_run(run, json.loads((sso / "run.json").read_text()) | switches, fill)


def evaluate(model_dir: Path, pairs_file: Path | None, judge, held_out: list[str], principles, s: dict, memo: dict,
             progress: bool) -> dict:
    """IFEval on the fixed subset (greedy); the plain answers to the held-out prompts at
    plain_max_new_tokens (length, ended, and each checked feature's verdict per prompt); for a
    trained model's pairs, the judge's votes."""
    model, tokenizer = load_model(model_dir)
    out = {"ifeval": ifeval_eval(model, tokenizer, limit=s["ifeval_limit"], max_new_tokens=s["eval_max_new_tokens"],
                                 batch_size=s["eval_batch_size"], progress=progress), "judge": None}
    plain = sample_plain(model, tokenizer, held_out, seed=s["plain_seed"], max_new_tokens=s["plain_max_new_tokens"],
                         batch_size=s["eval_batch_size"], progress=progress)
    out["plain"] = {"length": [len(tokenizer.encode(r["raw"])) for r in plain],
                    "ended": [not is_capped(r, "raw") for r in plain],
                    "passes": {f: [principles.passes(f, r["raw"], is_capped(r, "raw")) for r in plain]
                               for f in principles.checked}}
    if pairs_file is not None and s["judge_samples"]:
        records = read_jsonl(pairs_file)[:s["judge_samples"]]
        out["judge"] = judge_pairs(*judge, records, max_new_tokens=s["eval_max_new_tokens"],
                                   batch_size=s["eval_batch_size"], progress=progress, memo=memo)
        out["judge"].pop("records")
    return out


def run_ablation(train_argv: list[str], out: Path, scale: int = 1, **overrides) -> dict:
    """Train the variants with `python train.py train_argv` (the ablation's own sizes replace theirs), then
    evaluate every iteration's model."""
    args = parse_args(train_argv)
    s = {**settings(scale), "plain_seed": args.seed + 4242, **overrides}
    principles = load_principles(args.principles)
    if principles.checked:  # the set's own checks decide the pairs: no prompt is swapped for a checkable one
        s["verifier_share"] = 0.0
    progress = not args.no_progress
    out.mkdir(parents=True, exist_ok=True)
    sizes = [f"--{k.replace('_', '-')}={s[k]}" for k in ("iterations", "prompts_per_iteration", "eval_prompts",
                                                         "max_new_tokens", "verifier_share", "lr")]
    for name in s["variants"]:
        run, switches = out / slug(name), VARIANTS[name]
        if name != "SSO" and not run.exists():
            share_first_iteration(out / "sso", run, switches)
        if not (run / "final" / "summary.json").exists():
            train([*train_argv, *sizes, *(f"--{k.replace('_', '-')}" for k, on in switches.items() if on),
                   "--out", run, *(["--resume"] if run.exists() else [])])
    start_model = json.loads((out / "sso" / "run.json").read_text())["model"]
    judge, memo = load_model(start_model), {}  # one fixed judge for every variant: the starting policy
    cache = out / "evaluations.json"
    evals = json.loads(cache.read_text()) if cache.exists() else {}
    held_out = [r["prompt"] for r in read_jsonl(out / "sso" / "iter_0" / "eval_pairs.jsonl")]
    todo = [("start", start_model, None)] + [
        (f"{slug(n)}/{t}", out / slug(n) / f"iter_{t}" / "model", out / slug(n) / f"iter_{t}" / "pairs.jsonl")
        for n in s["variants"] for t in range(s["iterations"])]
    for key, model_dir, pairs in todo:
        if key not in evals:
            evals[key] = evaluate(model_dir, pairs, judge, held_out, principles, s, memo, progress)
            write_atomic(cache, json.dumps(evals, indent=2))
    result = {"settings": s, "principles": principles.name, "rows": rows(out, evals, s, principles),
              "comparisons": comparisons(evals, s), "feature_signal": feature_signal_by_variant(out, s, principles)}
    write_atomic(out / "ablation.json", json.dumps(result, indent=2))
    write_atomic(out / "ablation.md", markdown(result))
    plot(result["rows"], out)
    return result


def ifeval_columns(ev: dict, start: dict) -> dict:
    i = ev["ifeval"]
    vs = paired_difference(i["prompt_strict_pass"], start["ifeval"]["prompt_strict_pass"])
    return {"ifeval_prompt_strict": i["prompt_strict"], "ifeval_prompt_strict_se": i["prompt_strict_se"],
            "ifeval_instruction_strict": i["instruction_strict"],
            "ifeval_instruction_strict_se": i["instruction_strict_se"],
            "ifeval_vs_start": vs["difference"], "ifeval_vs_start_p": vs["p_exact"]}


def plain_columns(ev: dict, start: dict) -> dict:
    """Claims 3 and 4 on the plain answers at plain_max_new_tokens: mean length, ended share, and per checked
    feature the pass rate with its interval and McNemar's test against the start model."""
    p = ev["plain"]
    behaviour = {}
    for f, passes in p["passes"].items():
        vs = paired_difference(passes, start["plain"]["passes"][f])
        behaviour[f] = {"rate": sum(passes) / len(passes), "interval": wilson_interval(sum(passes), len(passes)),
                        "vs_start": vs["difference"], "vs_start_p": vs["p_exact"]}
    return {"plain_length": sum(p["length"]) / len(p["length"]), "plain_ended": sum(p["ended"]) / len(p["ended"]),
            "behaviour": behaviour}


def rows(out: Path, evals: dict, s: dict, principles) -> list[dict]:
    """One row for the start model, then one per variant and iteration (see the module docstring). The
    signal: the set's checked features pooled where it has any, else the checkable prompts'."""
    read = lambda path: json.loads(path.read_text())  # noqa: E731
    start_gen = read(out / "sso" / "iter_0" / "summary.json")["generation"]
    table = [{"variant": "start", "iteration": 0, "length": start_gen["mean_length"],
              "eos_rate": start_gen["eos_rate"], **ifeval_columns(evals["start"], evals["start"]),
              **plain_columns(evals["start"], evals["start"])}]
    iterations = s["iterations"]
    for name in s["variants"]:
        run = out / slug(name)
        for t in range(1, iterations + 1):
            s = read(run / f"iter_{t - 1}" / "summary.json")
            after = run / (f"iter_{t}" if t < iterations else "final") / "summary.json"
            gen, ev, judge = read(after)["generation"], s["eval"], evals[f"{slug(name)}/{t - 1}"]["judge"]
            signal = pooled_signal(*([g for f in principles.checked for g in feature_signals(s, f)]
                                     if principles.checked else [s["signal"], ev["signal"]]))
            table.append({
                "variant": name, "iteration": t, "length": gen["mean_length"], "eos_rate": gen["eos_rate"],
                "signal_acc": signal["accuracy"], "signal_interval": signal["interval"],
                "signal_decided": signal["decided"], "signal_checked": signal["checked"],
                "onpolicy_y_pos": s["onpolicy"]["y_pos"], "onpolicy_y_neg": s["onpolicy"]["y_neg"],
                "heldout_acc": ev["eval_rewards/accuracies"],
                "heldout_interval": ev["intervals"]["eval_rewards/accuracies"], "heldout_n": ev["n"],
                **ifeval_columns(evals[f"{slug(name)}/{t - 1}"], evals["start"]),
                **plain_columns(evals[f"{slug(name)}/{t - 1}"], evals["start"]),
                "judge_acc": judge["accuracy"] if judge else None, "judge_votes": judge["n_voted"] if judge else None,
                "sppl_acc": judge["perplexity_accuracy"] if judge else None,
                "train_acc": s["acc"], "len_chosen": s["len_chosen"], "len_rejected": s["len_rejected"], "W": s["W"],
            })
    return table


def comparisons(evals: dict, s: dict) -> list[dict]:
    """Every two variants' last models on the same prompts (McNemar): IFEval prompt-strict, and the
    plain answers' pass rate for each checked feature."""
    last = s["iterations"] - 1
    out = []
    for a, b in itertools.combinations(s["variants"], 2):
        ea, eb = evals[f"{slug(a)}/{last}"], evals[f"{slug(b)}/{last}"]
        measures = [("IFEval prompt strict", ea["ifeval"]["prompt_strict_pass"], eb["ifeval"]["prompt_strict_pass"])]
        measures += [(f"y^o passes {f}", ea["plain"]["passes"][f], eb["plain"]["passes"][f])
                     for f in ea["plain"]["passes"]]
        for measure, pa, pb in measures:
            d = paired_difference(pa, pb)
            out.append({"measure": measure, "a": a, "b": b, "difference": d["difference"], "se": d["se"],
                        "a_only": d["a_only"], "b_only": d["b_only"], "p_exact": d["p_exact"]})
    return out


def feature_signal_by_variant(out: Path, s: dict, principles) -> dict:
    """Claim 1 per checked feature: each variant's signal accuracy over the training and held-out pairs
    of all its iterations, pooled."""
    result = {}
    for name in s["variants"]:
        summaries = [json.loads((out / slug(name) / f"iter_{t}" / "summary.json").read_text())
                     for t in range(s["iterations"])]
        result[name] = {f: pooled_signal(*(g for summary in summaries for g in feature_signals(summary, f)))
                        for f in principles.checked}
    return result


def _f(v, spec):
    return "-" if v is None or math.isnan(v) else format(v, spec)  # None / NaN: e.g. no decided pair, no judge vote


def markdown(result) -> str:
    lines = ["| variant | iter | length (tokens) | EOS rate | signal acc [95% CI] (decided) | on-policy y+ / y- | "
             "held-out acc [95% CI] | IFEval prompt strict ± se (vs start, p) | IFEval instr strict ± se | "
             "judge acc (votes) | SPPL acc |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        signal = "-" if "signal_acc" not in r else (
            f"{_f(r['signal_acc'], '.2f')} [{r['signal_interval'][0]:.2f}, {r['signal_interval'][1]:.2f}] "
            f"({r['signal_decided']})")
        onpolicy = "-" if "onpolicy_y_pos" not in r else f"{r['onpolicy_y_pos']:.3f} / {r['onpolicy_y_neg']:.3f}"
        held = "-" if "heldout_acc" not in r else (
            f"{r['heldout_acc']:.2f} [{r['heldout_interval'][0]:.2f}, {r['heldout_interval'][1]:.2f}]")
        vs = "" if r["variant"] == "start" else f" ({100 * r['ifeval_vs_start']:+.1f}, p {r['ifeval_vs_start_p']:.2f})"
        votes = "" if r.get("judge_votes") is None else f" ({r['judge_votes']})"
        lines.append(
            f"| {r['variant']} | {r['iteration']} | {r['length']:.1f} | {r['eos_rate']:.2f} | {signal} | {onpolicy} | "
            f"{held} | {100 * r['ifeval_prompt_strict']:.1f} ± {100 * r['ifeval_prompt_strict_se']:.1f}{vs} | "
            f"{100 * r['ifeval_instruction_strict']:.1f} ± {100 * r['ifeval_instruction_strict_se']:.1f} | "
            f"{_f(r.get('judge_acc'), '.2f')}{votes} | {_f(r.get('sppl_acc'), '.2f')} |")
    features = list(result["rows"][0]["behaviour"])
    cap = result["settings"]["plain_max_new_tokens"]
    lines += ["", f"The held-out plain answers y^o sampled again with a {cap}-token cap (claims 3 and 4):", "",
              "| variant | iter | mean length (tokens) | ended | "
              + "".join(f"{f}: pass rate [95% CI] (vs start, p) | " for f in features),
              "|---|---|---|---|" + "---|" * len(features)]
    for r in result["rows"]:
        cells = "".join(
            f"{b['rate']:.2f} [{b['interval'][0]:.2f}, {b['interval'][1]:.2f}]"
            + ("" if r["variant"] == "start" else f" ({100 * b['vs_start']:+.0f}, p {b['vs_start_p']:.2g})") + " | "
            for b in r["behaviour"].values())
        lines.append(f"| {r['variant']} | {r['iteration']} | {r['plain_length']:.1f} | {r['plain_ended']:.2f} | "
                     f"{cells}")
    if features:
        lines += ["", "Signal accuracy per checked feature, training and held-out pairs of every iteration pooled "
                      "(claim 1):", "", "| variant | " + " | ".join(f"{f} [95% CI] (decided)" for f in features)
                  + " |", "|---|" + "---|" * len(features)]
        for name, signals in result["feature_signal"].items():
            lines.append(f"| {name} | " + " | ".join(
                f"{_f(g['accuracy'], '.2f')} [{g['interval'][0]:.2f}, {g['interval'][1]:.2f}] ({g['decided']})"
                for g in signals.values()) + " |")
    lines += ["", "Last iteration, A - B on the same prompts (McNemar, exact):", "",
              "| measure | A | B | A - B (points) ± se | A only / B only | p |", "|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        lines.append(f"| {c['measure']} | {c['a']} | {c['b']} | {100 * c['difference']:+.1f} ± {100 * c['se']:.1f} | "
                     f"{c['a_only']} / {c['b_only']} | {c['p_exact']:.2g} |")
    lines.append(f"\nSettings: {json.dumps(result['settings'])}")
    return "\n".join(lines) + "\n"


def plot(rows, out: Path):
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) stays as it is

    start = rows[0]
    fig, fig_len = Figure(figsize=(11, 4)), Figure(figsize=(16, 4))
    axes, axes_len = fig.subplots(1, 2), fig_len.subplots(1, 3)
    for name in dict.fromkeys(r["variant"] for r in rows[1:]):
        rs = [r for r in rows if r["variant"] == name]
        x = [r["iteration"] for r in rs]
        acc = [r["signal_acc"] for r in rs]
        err = [[0 if a is None else a - r["signal_interval"][0] for a, r in zip(acc, rs)],
               [0 if a is None else r["signal_interval"][1] - a for a, r in zip(acc, rs)]]
        line = axes[0].errorbar(x, [float("nan") if a is None else a for a in acc], yerr=err, marker="o",
                                capsize=3, label=name)
        color = line[0].get_color()
        axes[1].plot(x, [r["onpolicy_y_pos"] for r in rs], "o-", color=color, label=f"{name} y+")
        axes[1].plot(x, [r["onpolicy_y_neg"] for r in rs], "s--", color=color, label=f"{name} y-")
        axes_len[0].plot([0] + x, [start["plain_length"]] + [r["plain_length"] for r in rs], "o-", label=name)
        axes_len[1].plot([0] + x, [start["plain_ended"]] + [r["plain_ended"] for r in rs], "o-", label=name)
        for f in start["behaviour"]:
            axes_len[2].plot([0] + x, [start["behaviour"][f]["rate"]] + [r["behaviour"][f]["rate"] for r in rs],
                             "o-", color=color, label=f"{name}: {f}")
    axes[0].set(title="signal accuracy: y+ passes, y- fails (rule-decided pairs, 95% CI)", ylim=(0, 1))
    axes[1].set(title="on-policy: mean token log-prob under x, sampling policy")
    axes_len[0].set(title="held-out plain answers y^o: mean length (tokens)")
    axes_len[1].set(title="held-out plain answers y^o: share ended", ylim=(0, 1))
    axes_len[2].set(title="y^o: pass rate per checked feature", ylim=(0, 1))
    for ax in (*axes, *axes_len):
        ax.set_xlabel("iteration")
        ax.legend(fontsize="small")
    for f, name in ((fig, "ablation_signals.png"), (fig_len, "ablation_length.png")):
        f.tight_layout()
        f.savefig(out / name)


def main(argv=None):
    """`python -m sso_mini.eval.ablation [--out DIR] [--scale N] [train.py flags]`."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--scale", type=int, default=1, help="multiply the small default sizes (8: the GPU size)")
    ours, train_argv = ap.parse_known_args(argv)
    if ours.scale < 1:
        ap.error(f"--scale {ours.scale} is out of range (allowed: >= 1)")
    out = Path(ours.out)
    run_ablation(train_argv, out, ours.scale)
    print((out / "ablation.md").read_text())
    print(f"ablation: {out / 'ablation.md'}, {out / 'ablation.json'}, figures {out}/ablation_{{signals,length}}.png")


if __name__ == "__main__":
    main(sys.argv[1:])
