"""Checkable prompts: an everyday task plus IFEval instructions, drawn with IFEval's own generators.

train.py mixes a share of them into the training prompts where the principles have no rule check of their
own (--verifier-share), so that a rule can say whether y+ follows the instruction better than y-
(metrics.signal_accuracy); eval/verified_pairs.py and eval/reward.py draw whole sets of them.
"""

import math
import random

from .rules import verifiers

def instruction_conflicts() -> dict[str, set[str]]:
    """if-verifiable's table of instruction ids that must not share a prompt (not symmetric as shipped)."""
    verifiers()  # puts the package on sys.path
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    return INSTRUCTION_CONFLICTS


# Simple everyday tasks (written for sso-mini) that the generated instructions are appended to.
BASE_TASKS = (
    "Describe your favourite season of the year.", "Explain how a bicycle works.",
    "Write a short letter inviting a friend to a picnic.", "Give advice to someone starting their first job.",
    "Describe a busy market early in the morning.", "Write a product description for a reusable water bottle.",
    "Explain why people enjoy gardening.", "Tell a story about a lost dog that finds its way home.",
    "Write a short poem about the sea.", "Explain to a child what a rainbow is.",
    "Describe the steps to make a cup of tea.", "Write a review of an imaginary pizza restaurant.",
    "Explain the benefits of regular exercise.", "Describe a day in the life of a lighthouse keeper.",
    "Encourage a friend who is learning to play the piano.", "Explain how to plant a tree.",
    "Write a short speech welcoming new members to a chess club.", "Describe a city you would like to visit.",
    "Explain the difference between weather and climate.", "Tell a story about a robot that learns to paint.",
    "Give tips for saving money on groceries.", "Describe how the moon changes over a month.",
    "Write an email asking a neighbour to water your plants.", "Explain why sleep is important.",
    "Write a short blog post about learning a new language.", "Describe a train journey through the mountains.",
    "Explain how recycling helps the environment.", "Write a thank-you note to a teacher.",
    "Describe the perfect weekend breakfast.", "Explain how to prepare for a job interview.",
    "Write a fable about a fox and a crow.", "Explain what makes a good team leader.",
)
SKIPPED_INSTRUCTIONS = ("combination:repeat_prompt",)  # its generator needs the prompt as an argument


def _conflict(a: str, b: str, conflicts: dict) -> bool:
    return b in conflicts.get(a, ()) or a in conflicts.get(b, ())  # the registry's table is not symmetric


def draw_prompt(i: int, seed: int, max_instructions: int) -> dict | None:
    """Prompt i as an IFEval-style record {key, prompt, instruction_id_list, kwargs}; None if unsatisfiable."""
    _, registry = verifiers()
    conflicts = instruction_conflicts()
    rng = random.Random(f"{seed}-prompt-{i}")
    task = rng.choice(BASE_TASKS)
    k = rng.randint(1, max_instructions)
    candidates = sorted(set(registry) - set(SKIPPED_INSTRUCTIONS))
    ids = []
    for iid in rng.sample(candidates, len(candidates)):  # first k compatible ones of a random order
        if len(ids) < k and not any(_conflict(iid, j, conflicts) for j in ids):
            ids.append(iid)
    descriptions, kwargs = [], []
    state = random.getstate()
    try:
        for iid in ids:
            random.seed(f"{seed}-{i}-{iid}")  # the generators draw from the global RNG
            instruction = registry[iid](iid)
            descriptions.append(instruction.build_description())
            kwargs.append(instruction.get_instruction_args() or {})
    finally:
        random.setstate(state)
    for iid, kw in zip(ids, kwargs):
        if iid == "length_constraints:nth_paragraph_first_word" and kw["nth_paragraph"] > kw["num_paragraphs"]:
            return None  # asks for paragraph n of fewer than n (no answer can pass: the prompt is dropped)
    return {"key": f"rm-{seed}-{i}", "prompt": " ".join([task, *descriptions]),
            "instruction_id_list": ids, "kwargs": kwargs}


def draw_prompts(n_prompts: int, seed: int, max_instructions: int) -> tuple[list[dict], int]:
    """The first n_prompts satisfiable prompts, and how many were dropped on the way."""
    records, dropped, i = [], 0, 0
    while len(records) < n_prompts:
        r = draw_prompt(i, seed, max_instructions)
        i += 1
        if r is None:
            dropped += 1
        else:
            records.append(r)
    return records, dropped


def mix_in_checkable(prompts: list[str], share: float, seed: int) -> tuple[list[str], dict[str, dict]]:
    """Replace a `share` of the prompts, spread evenly through the list, by prompts a rule can check
    (one of our base tasks + one IFEval instruction, as draw_prompt draws them).

    Returns the new list and {prompt: its checks} for records to carry ("checks": key,
    instruction_id_list, kwargs), so that any later step can verify y+ and y- (metrics.signal_accuracy).
    One instruction per prompt: a single rule decides each pair.
    """
    slots = [j for j in range(len(prompts)) if math.floor((j + 1) * share) > math.floor(j * share)]
    drawn, _ = draw_prompts(len(slots), f"{seed}-mix", max_instructions=1)
    out, checks = list(prompts), {}
    for j, r in zip(slots, drawn):
        out[j] = r["prompt"]
        checks[r["prompt"]] = {k: r[k] for k in ("key", "instruction_id_list", "kwargs")}
    return out, checks
