"""IFEval wiring: real records, hand-written responses, the published floors, McNemar by hand."""

import math
import os
import random
import stat
import statistics

import pytest

from sso_mini import rules
from sso_mini.eval import ifeval


@pytest.fixture(scope="module")
def records():
    return {r["key"]: r for r in ifeval.load_prompts()}


# (key, instruction, a response that follows it, one that does not)
CASES = [
    (1019, "change_case:english_lowercase",
     "what are the two young boys doing with their toy guns and horns?",
     "What are the two young boys doing with their toy guns and horns?"),
    (1092, "length_constraints:number_words",
     "Japan was wonderful: temples, ramen and trains that always run on time.",
     " ".join(["word"] * 320)),
    (1075, "detectable_format:json_format",
     '{"product": "CloudSoft diaper", "slogan": "Comfort that lasts all night"}',
     "Introducing CloudSoft: the diaper that lets your baby sleep all night."),
    (1001, "punctuation:no_comma",
     "Day one thou shalt see Tokyo. Day two thou shalt rest in Kyoto.",
     "Day one, thou shalt see Tokyo. Day two, thou shalt rest in Kyoto."),
    (1268, "length_constraints:number_sentences",  # counted with the punkt sentence splitter
     "Dr. Smith told me to breathe. I wrote that down. It helped.",
     "I woke up. I was tense. I breathed. I walked. I wrote. I slept. I smiled."),
]


def test_prompts_file(records):
    assert len(records) == 541
    assert sum(len(r["instruction_id_list"]) for r in records.values()) == 834


@pytest.mark.parametrize("key, instruction, good, bad", CASES)
def test_pass_and_fail(records, key, instruction, good, bad):
    r = records[key]
    assert r["instruction_id_list"] == [instruction]
    assert rules.check(r, good) == ([True], [True])
    assert rules.check(r, bad) == ([False], [False])


def test_loose_forgives_a_preamble_line(records):
    r = records[1019]  # all lowercase: strict sees "Sure!", loose also tries without the first line
    assert rules.check(r, "Sure!\nwhat are the boys doing with their toy guns?") == ([False], [True])


def test_punkt_tab_is_rebuilt_private():
    import nltk

    english = rules.punkt_tab_root() / "tokenizers" / "punkt_tab" / "english"
    os.chmod(english, 0o775)  # as a umask of 002 would leave it: NLTK would silently skip it
    root = rules.punkt_tab_root()
    rules.verifiers()
    for d in (root, english.parent, english):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o755
    for f in english.iterdir():
        st = os.stat(f)
        assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_nlink == 1
    assert str(root) in nltk.data.path
    assert nltk.sent_tokenize("Dr. Smith went home. He was tired.") == ["Dr. Smith went home.", "He was tired."]


def test_score_aggregates(records):
    recs = [records[c[0]] for c in CASES] + [records[1122]]
    # 1122: lowercase + at least 4 '#': this answer meets the first only
    responses = [c[2] for c in CASES[:3]] + [c[3] for c in CASES[3:]] + ["new collection, soon. #playboy"]
    out = ifeval.score(recs, responses)
    assert out["n_prompts"] == 6 and out["n_instructions"] == 7
    assert out["prompt_strict_pass"] == [True, True, True, False, False, False]
    assert out["prompt_strict"] == pytest.approx(3 / 6)
    assert out["instruction_strict"] == pytest.approx(4 / 7)
    assert out["prompt_strict_se"] == pytest.approx(math.sqrt(0.5 * 0.5 / 6))
    assert out["instruction_strict_se"] == pytest.approx(math.sqrt((4 / 7) * (3 / 7) / 7))


def test_empty_response_fails_every_instruction(records):
    out = ifeval.score([records[1122]], [""])
    assert out["instruction_strict"] == 0.0 and out["n_instructions"] == 2


def test_random_letter_checker_is_seeded(records):
    """Record 1122's '#' is not a letter, so the checker draws one at random: a-m pass, n-z fail."""
    r = records[1122]
    response = " ".join(c * 4 for c in "abcdefghijklm")
    outcomes = set()
    for seed in range(20):
        random.seed(seed)
        outcomes.add(tuple(rules.check(r, response)[0]))
    assert len(outcomes) == 1
    random.seed(123)
    expected = random.random()
    random.seed(123)
    rules.check(r, response)
    assert random.random() == expected  # the caller's RNG stream is left untouched


def test_scores_identical_across_runs(records):
    recs = list(records.values())
    responses = [f"Hello! {r['prompt'][:60].lower()} #one #two." for r in recs]
    assert ifeval.score(recs, responses) == ifeval.score(recs, responses)


def test_floors_match_published_table():
    """The trivial-answer floors on all 541 prompts, in percent to one decimal."""
    expected = {
        "empty": (0.0, 0.0, 0.0, 0.0),
        "hello_world": (11.3, 11.3, 22.5, 22.5),
        "echo_prompt": (25.0, 29.9, 36.1, 41.1),
    }
    got = ifeval.floors()
    for name, values in expected.items():
        assert tuple(round(100 * got[name][m], 1) for m in ifeval.METRICS) == values


def test_paired_difference_by_hand():
    # 10 prompts only A passes, 2 only B, 5 both, 3 neither
    a = [True] * 10 + [False] * 2 + [True] * 5 + [False] * 3
    b = [False] * 10 + [True] * 2 + [True] * 5 + [False] * 3
    out = ifeval.paired_difference(a, b)
    d = [int(x) - int(y) for x, y in zip(a, b)]
    assert out["difference"] == pytest.approx(8 / 20)
    assert out["se"] == pytest.approx(statistics.pstdev(d) / math.sqrt(20))
    assert out["p_exact"] == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 2 P(X <= 2), X ~ Bin(12, 1/2)
    z = math.sqrt((8 - 1) ** 2 / 12)  # continuity-corrected chi-square with 1 df = z^2
    assert out["p_normal"] == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(z / math.sqrt(2)))))
    assert ifeval.paired_difference(a, a)["p_exact"] == 1.0
    with pytest.raises(ValueError):
        ifeval.paired_difference(a, b[:-1])
