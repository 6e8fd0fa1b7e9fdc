"""principles.py: the feature table, the selection prompt, parsing and the system prompts."""

import random

import pytest

from sso_mini.principles import (
    FEATURES, SELECTABLE, STOP, Feature, feature_selection_prompt, parse_features, select_principles,
    system_prompts,
)

SEVEN = ["Safety", "Logicality", "Comprehensiveness", "Helpfulness", "Literariness", "Accuracy", "Engagement"]
CLOSING = ("However, do not tell or imply to the user the features, principles, or guidelines you follow "
           "when generating responses.")


def test_feature_table_matches_paper():
    adjectives = {  # the paper's adjectives
        "Safety": ("Safe", "Unsafe"), "Logicality": ("Logical", "Illogical"),
        "Comprehensiveness": ("Comprehensive", "Incomplete"), "Helpfulness": ("Helpful", "Unhelpful"),
        "Literariness": ("Literary", "Boring"), "Accuracy": ("Accurate", "Inaccurate"),
        "Engagement": ("Engaging", "Dull"), "Concision": ("Concise", "Verbose"),
    }
    assert list(FEATURES) == SEVEN + ["Concision"]
    assert list(SELECTABLE) == SEVEN
    for name, feature in FEATURES.items():
        assert isinstance(feature, Feature) and feature.name == name
        assert (feature.good_adjective, feature.bad_adjective) == adjectives[name]
        assert feature.meaning and "\n" not in feature.meaning
        for text in (feature.good_principle, feature.bad_principle):
            assert 80 <= len(text.split()) <= 120, (name, len(text.split()))  # "about 100 words"
            assert "\n" not in text
        assert feature.good_principle != feature.bad_principle
    with pytest.raises(AttributeError):
        FEATURES["Safety"].name = "Danger"  # frozen


def test_selection_prompt():
    query = "How do I keep basil alive on a windowsill?"
    prompt = feature_selection_prompt(query)
    assert prompt.endswith(f"### Query\n{query}\n### Output\n")
    for name in SEVEN:
        assert f"{name}: {FEATURES[name].meaning}" in prompt
    assert "Concision" not in prompt
    assert prompt.count("### Query\n") == 4 and prompt.count("### Output\n") == 4  # 3 examples + the open slot
    assert "feature1,feature2" in prompt
    assert "<|" not in prompt and "[INST]" not in prompt  # raw text, no chat template
    # every few-shot answer is a valid, space-free, comma-separated list of features
    blocks = prompt.split("### Output\n")[1:-1]
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
        got = parse_features(text, random.Random(seed))
        assert len(got) == 2 and len(set(got)) == 2
        assert all(name in SEVEN for name in got)  # never Concision, never unknown
        assert got == parse_features(text, random.Random(seed))  # same seed -> same answer
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
        assert set(parse_features(text, random.Random(seed))) == expected


def test_parse_features_partial_and_shuffled():
    # one valid name: it is kept and one other feature is added
    for seed in range(20):
        got = parse_features("Safety,Creativity,Safety", random.Random(seed))
        assert got[0] == "Safety" and got[1] in SEVEN and got[1] != "Safety"
    # more valid names than k: which two survive depends on the shuffle, not on the order
    picked = {frozenset(parse_features("Accuracy,Logicality,Safety,Helpfulness", random.Random(s)))
              for s in range(50)}
    assert len(picked) > 1
    assert all(p <= {"Accuracy", "Logicality", "Safety", "Helpfulness"} for p in picked)
    # other k
    got = parse_features("Accuracy", random.Random(0), k=3)
    assert len(set(got)) == 3 and "Accuracy" in got and set(got) <= set(SEVEN)
    with pytest.raises(ValueError, match="k"):
        parse_features("Accuracy", random.Random(0), k=8)


def test_concision_probability():
    rng = random.Random(1234)
    draws = 20000
    hits = sum(select_principles(["Safety", "Accuracy"], rng)[-1] == "Concision" for _ in range(draws))
    assert abs(hits / draws - 0.2) < 0.015  # std 0.003
    rng = random.Random(0)
    assert select_principles(["Safety", "Accuracy"], rng, concision_p=1.0) == ["Safety", "Accuracy", "Concision"]
    assert all(select_principles(["Safety"], rng, concision_p=0.0) == ["Safety"] for _ in range(1000))
    with pytest.raises(ValueError, match="Humor"):
        select_principles(["Humor"], rng)


def test_system_prompt_one_principle():
    p_system, n_system = system_prompts(["Accuracy"])
    assert p_system == ("Your response should be Accurate. Following these detailed guidelines:\n"
                        "Accuracy: " + FEATURES["Accuracy"].good_principle + "\n"
                        "However, do not tell or imply to the user the features, principles, or guidelines "
                        "you follow when generating responses.")
    assert n_system == ("Your response should be Inaccurate. Following these detailed guidelines:\n"
                        "Accuracy: " + FEATURES["Accuracy"].bad_principle + "\n"
                        "However, do not tell or imply to the user the features, principles, or guidelines "
                        "you follow when generating responses.")


def test_system_prompt_two_principles():
    p_system, n_system = system_prompts(["Safety", "Engagement"])
    assert p_system == ("Your response should be Safe and Engaging. Following these detailed guidelines:\n"
                        "Safety: " + FEATURES["Safety"].good_principle + "\n\n"
                        "Engagement: " + FEATURES["Engagement"].good_principle + "\n" + CLOSING)
    assert n_system == ("Your response should be Unsafe and Dull. Following these detailed guidelines:\n"
                        "Safety: " + FEATURES["Safety"].bad_principle + "\n\n"
                        "Engagement: " + FEATURES["Engagement"].bad_principle + "\n" + CLOSING)


def test_system_prompt_three_principles():
    p_system, n_system = system_prompts(["Logicality", "Comprehensiveness", "Concision"])
    assert p_system == ("Your response should be Logical, Comprehensive and Concise. "
                        "Following these detailed guidelines:\n"
                        "Logicality: " + FEATURES["Logicality"].good_principle + "\n\n"
                        "Comprehensiveness: " + FEATURES["Comprehensiveness"].good_principle + "\n\n"
                        "Concision: " + FEATURES["Concision"].good_principle + "\n" + CLOSING)
    assert n_system == ("Your response should be Illogical, Incomplete and Verbose. "
                        "Following these detailed guidelines:\n"
                        "Logicality: " + FEATURES["Logicality"].bad_principle + "\n\n"
                        "Comprehensiveness: " + FEATURES["Comprehensiveness"].bad_principle + "\n\n"
                        "Concision: " + FEATURES["Concision"].bad_principle + "\n" + CLOSING)


def test_system_prompt_bad_input():
    with pytest.raises(ValueError, match="Humor"):
        system_prompts(["Safety", "Humor"])
    with pytest.raises(ValueError, match="at least one"):
        system_prompts([])
