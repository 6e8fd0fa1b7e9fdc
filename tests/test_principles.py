"""principles.py: principle sets as files, the selection prompt, parsing, system prompts and rule checks."""

import hashlib
import itertools
import random
from dataclasses import replace

import pytest

from sso_mini import rules
from sso_mini.principles import STOP, Feature, available, load_principles

PAPER = load_principles("paper")
SEVEN = ["Safety", "Logicality", "Comprehensiveness", "Helpfulness", "Literariness", "Accuracy", "Engagement"]
CLOSING = ("However, do not tell or imply to the user the features, principles, or guidelines you follow "
           "when generating responses.")


def test_paper_set_reproduces_the_prompts_of_the_code_it_replaced_byte_for_byte():
    """Digests of every system prompt and three selection prompts as principles.py built them in Python
    before the set became a file (commit 5d79736): the move changed no byte a model reads."""
    h = hashlib.sha256()
    combos = [[a] for a in PAPER.features] + [list(p) for p in itertools.permutations(SEVEN, 2)]
    combos += [list(p) + ["Concision"] for p in itertools.permutations(SEVEN, 2)]
    for c in combos:
        for text in PAPER.system_prompts(c):
            h.update(text.encode())
    assert h.hexdigest() == "165c12e8bcf117e17219ffe6b2db865dc43420494200e5e7815ac71f3765fa32"
    h = hashlib.sha256()
    for q in ["How do I keep basil alive on a windowsill?", "Write a haiku about rain.", ""]:
        h.update(PAPER.selection_prompt(q).encode())
    assert h.hexdigest() == "fd68873757cfb86560466cd67b1dbeff8b92f39b03a929b159db736b5a665af1"


def test_paper_set_matches_the_paper():
    adjectives = {  # the paper's adjectives
        "Safety": ("Safe", "Unsafe"), "Logicality": ("Logical", "Illogical"),
        "Comprehensiveness": ("Comprehensive", "Incomplete"), "Helpfulness": ("Helpful", "Unhelpful"),
        "Literariness": ("Literary", "Boring"), "Accuracy": ("Accurate", "Inaccurate"),
        "Engagement": ("Engaging", "Dull"), "Concision": ("Concise", "Verbose"),
    }
    assert list(PAPER.features) == SEVEN + ["Concision"] and list(PAPER.selectable) == SEVEN
    assert (PAPER.features_per_prompt, PAPER.extra, PAPER.extra_probability) == (2, "Concision", 0.2)
    assert PAPER.needs_selection and PAPER.checked == ()
    for name, feature in PAPER.features.items():
        assert isinstance(feature, Feature) and feature.name == name
        assert (feature.good_adjective, feature.bad_adjective) == adjectives[name]
        assert feature.meaning and "\n" not in feature.meaning
        for text in (feature.good_principle, feature.bad_principle):
            assert 80 <= len(text.split()) <= 120, (name, len(text.split()))  # "about 100 words"
            assert "\n" not in text
        assert feature.good_principle != feature.bad_principle
    with pytest.raises(AttributeError):
        PAPER.features["Safety"].name = "Danger"  # frozen


def test_every_shipped_set_loads():
    assert "paper" in available()
    for name in available():
        s = load_principles(name)
        assert s.features and 1 <= s.features_per_prompt <= len(s.selectable)


def test_selection_prompt():
    query = "How do I keep basil alive on a windowsill?"
    prompt = PAPER.selection_prompt(query)
    assert prompt.endswith(f"### Query\n{query}\n### Output\n")
    for name in SEVEN:
        assert f"{name}: {PAPER.features[name].meaning}" in prompt
    assert "Concision" not in prompt
    assert prompt.count("### Query\n") == 4 and prompt.count("### Output\n") == 4  # 3 examples + the open slot
    assert "feature1,feature2" in prompt
    assert "<|" not in prompt and "[INST]" not in prompt  # raw text, no chat template
    blocks = prompt.split("### Output\n")[1:-1]  # every few-shot answer: names, commas, no spaces
    for block in blocks:
        answer = block.split("\n")[0]
        assert " " not in answer and all(name in SEVEN for name in answer.split(","))
    assert STOP == "###"


MESSY = [
    "Safety,Accuracy",
    " Logicality , accuracy ",
    "Safety,Safety,Safety",
    "Creativity,Humor,Concision",
    "",
    "\n\n",
    "Helpfulness\nEngagement\n\nThis query needs a friendly answer.",
    "Literariness,Engagement.\n",
    "ACCURACY,,  ,Logicality,Safety,Helpfulness",
    "Concision,Safety",
]


@pytest.mark.parametrize("text", MESSY)
def test_parse_features_valid_distinct_and_deterministic(text):
    results = set()
    for seed in range(50):
        got = PAPER.parse_features(text, random.Random(seed))
        assert len(got) == 2 and len(set(got)) == 2
        assert all(name in SEVEN for name in got)  # never Concision, never unknown
        assert got == PAPER.parse_features(text, random.Random(seed))  # same seed -> same answer
        results.add(tuple(got))
    if text.strip() == "":  # nothing valid: topped up at random, so seeds differ
        assert len(results) > 5


@pytest.mark.parametrize("text,expected", [
    ("Safety,Accuracy", {"Safety", "Accuracy"}),
    (" Logicality , accuracy ", {"Logicality", "Accuracy"}),  # case-insensitive, canonical spelling out
    ("Literariness,Engagement.\n", {"Literariness", "Engagement"}),
    ("Helpfulness\nEngagement\n\nThis query needs a friendly answer.", {"Helpfulness", "Engagement"}),
])
def test_parse_features_keeps_two_valid_names(text, expected):
    for seed in range(20):
        assert set(PAPER.parse_features(text, random.Random(seed))) == expected


def test_parse_features_partial_and_shuffled():
    for seed in range(20):  # one valid name: it is kept and one other feature is added
        got = PAPER.parse_features("Safety,Creativity,Safety", random.Random(seed))
        assert got[0] == "Safety" and got[1] in SEVEN and got[1] != "Safety"
    # more valid names than k: which two survive depends on the shuffle, not on the order
    picked = {frozenset(PAPER.parse_features("Accuracy,Logicality,Safety,Helpfulness", random.Random(s)))
              for s in range(50)}
    assert len(picked) > 1
    assert all(p <= {"Accuracy", "Logicality", "Safety", "Helpfulness"} for p in picked)
    got = replace(PAPER, features_per_prompt=3).parse_features("Accuracy", random.Random(0))  # another k
    assert len(set(got)) == 3 and "Accuracy" in got and set(got) <= set(SEVEN)


def test_extra_feature_probability_and_sets_without_a_choice():
    rng = random.Random(1234)
    draws = 20000
    hits = sum(PAPER.pick("Safety,Accuracy", rng)[-1] == "Concision" for _ in range(draws))
    assert abs(hits / draws - 0.2) < 0.015  # std 0.003
    always = replace(PAPER, extra_probability=1.0)
    assert sorted(always.pick("Safety,Accuracy", random.Random(0))) == ["Accuracy", "Concision", "Safety"]
    never = replace(PAPER, extra_probability=0.0)
    assert all(len(never.pick("Safety,Accuracy", rng)) == 2 for _ in range(1000))
    every = replace(PAPER, features_per_prompt=7, extra_probability=0.0)  # nothing to pick: all 7, in file order
    assert not every.needs_selection and every.pick(None, rng) == SEVEN


def test_system_prompt_one_principle():
    p_system, n_system = PAPER.system_prompts(["Accuracy"])
    assert p_system == ("Your response should be Accurate. Following these detailed guidelines:\n"
                        "Accuracy: " + PAPER.features["Accuracy"].good_principle + "\n" + CLOSING)
    assert n_system == ("Your response should be Inaccurate. Following these detailed guidelines:\n"
                        "Accuracy: " + PAPER.features["Accuracy"].bad_principle + "\n" + CLOSING)


def test_system_prompt_three_principles():
    f = PAPER.features
    p_system, n_system = PAPER.system_prompts(["Logicality", "Comprehensiveness", "Concision"])
    assert p_system == ("Your response should be Logical, Comprehensive and Concise. "
                        "Following these detailed guidelines:\n"
                        "Logicality: " + f["Logicality"].good_principle + "\n\n"
                        "Comprehensiveness: " + f["Comprehensiveness"].good_principle + "\n\n"
                        "Concision: " + f["Concision"].good_principle + "\n" + CLOSING)
    assert n_system == ("Your response should be Illogical, Incomplete and Verbose. "
                        "Following these detailed guidelines:\n"
                        "Logicality: " + f["Logicality"].bad_principle + "\n\n"
                        "Comprehensiveness: " + f["Comprehensiveness"].bad_principle + "\n\n"
                        "Concision: " + f["Concision"].bad_principle + "\n" + CLOSING)


def test_system_prompt_bad_input():
    with pytest.raises(ValueError, match="Humor"):
        PAPER.system_prompts(["Safety", "Humor"])
    with pytest.raises(ValueError, match="at least one"):
        PAPER.system_prompts([])


# --- a set of one's own, with rule checks ---------------------------------------------------

FEATURE = '''
[[feature]]
name = "Brevity"
good_adjective = "Brief"
bad_adjective = "Long-winded"
meaning = "Short."
good_principle = "Answer in at most two short sentences."
bad_principle = "Answer in several long paragraphs."
check = [{rule = "ended"}, {rule = "length_constraints:number_words", relation = "less than", num_words = 6}]
'''


def test_a_check_agrees_with_the_ifeval_checker_it_names(tmp_path):
    path = tmp_path / "brief.toml"
    path.write_text(FEATURE)
    s = load_principles(path)
    assert s.name == "brief" and s.checked == ("Brevity",) and not s.needs_selection
    assert s.pick(None, random.Random(0)) == ["Brevity"]
    _, registry = rules.verifiers()
    for text in ("Paris.", "The capital is Paris.", "The capital of France is Paris.", "one two three four five six",
                 "Well, it depends on what you mean, but Paris.", ""):
        checker = registry["length_constraints:number_words"]("length_constraints:number_words")
        checker.build_description(relation="less than", num_words=6)
        shipped = bool(text.strip()) and checker.check_following(text)  # IFEval: an empty answer fails
        assert s.passes("Brevity", text, capped=False) == shipped, text
        assert not s.passes("Brevity", text, capped=True)  # "ended": a capped answer did not end
    lists = [{"rule": "detectable_format:number_bullet_lists", "num_bullets": 2}]
    assert rules.passes(lists, "* one\n* two", False) and not rules.passes(lists, "* one\n* two\n* three", False)


MALFORMED = [  # (file text, what the error must name)
    ("", "no features"),
    (FEATURE.replace('meaning = "Short."\n', ""), "feature 'Brevity': field 'meaning' is missing or empty"),
    (FEATURE.replace('bad_adjective = "Long-winded"', 'bad_adjective = ""'),
     "feature 'Brevity': field 'bad_adjective' is missing or empty"),
    (FEATURE.replace('{rule = "ended"}', '{rule = "short"}'), "feature 'Brevity': field 'check': unknown rule 'short'"),
    (FEATURE.replace('relation = "less than"', 'relation = "fewer"'),
     "feature 'Brevity': field 'check': rule 'length_constraints:number_words': bad arguments"),
    (FEATURE.replace(', num_words = 6', ''),
     "feature 'Brevity': field 'check': rule 'length_constraints:number_words' takes the arguments num_words, "
     "relation"),
    (FEATURE.replace('{rule = "ended"}', '{rule = "ended", at = 3}'), "rule 'ended' takes no arguments"),
    ("features_per_prompt = 2\n" + FEATURE, "features_per_prompt 2 is out of range (allowed: 1 to 1"),
    ("features_per_prompt = 1\n" + FEATURE + FEATURE.replace('"Brevity"', '"Lists"'),
     "features_per_prompt 1 < 2 features: the policy picks, so give at least one [[example]]"),
    (FEATURE.replace("good_principle", "good_principel"), "feature 'Brevity': unknown field(s) good_principel"),
    (FEATURE + FEATURE, "feature 'Brevity': the name is used twice"),
    ("[extra]\nfeature = \"Concision\"\nprobability = 0.2\n" + FEATURE, "'Concision' is not one of the features"),
    ("this is = not toml", "not valid TOML"),
]


@pytest.mark.parametrize("text,message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_a_malformed_set_names_the_file_the_feature_and_the_field(tmp_path, text, message):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        load_principles(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
