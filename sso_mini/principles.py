"""Principle sets: the features SSO steers with, the policy's pick among them, the system prompts p+ and p-.

A principle set is data, one TOML file (sso_mini/principle_sets/NAME.toml, or any path; the format is in
docs/principles.md): its features, each with good and bad adjectives, good and bad principles and an
optional rule check (rules.py); how many features the policy picks per prompt (with a raw few-shot
prompt; nothing to pick when that is all of them); an optional extra feature added at random. The picked
features' good and bad principles become p+ and p-. `paper` is the paper's seven features plus Concision,
in our own words.
"""

import random
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from . import rules

SETS = Path(__file__).parent / "principle_sets"
STOP = "###"  # sampling stop string of the feature-selection prompt
CLOSING = ("However, do not tell or imply to the user the features, principles, or guidelines you follow "
           "when generating responses.")
TEXT_FIELDS = ("name", "good_adjective", "bad_adjective", "meaning", "good_principle", "bad_principle")


@dataclass(frozen=True)
class Feature:
    name: str
    good_adjective: str
    bad_adjective: str
    meaning: str
    good_principle: str
    bad_principle: str
    check: tuple = ()  # conditions (rules.py) that all hold iff a response shows the good behaviour


@dataclass(frozen=True)
class PrincipleSet:
    name: str
    source: Path
    features: dict  # name -> Feature, in file order
    features_per_prompt: int
    extra: str | None = None  # a feature added with probability extra_probability, never picked
    extra_probability: float = 0.0
    examples: tuple = ()  # (query, (feature, ...)) few-shot examples of the selection prompt

    @property
    def selectable(self) -> tuple:
        return tuple(name for name in self.features if name != self.extra)

    @property
    def checked(self) -> tuple:
        """The features with a rule check, in file order."""
        return tuple(name for name, f in self.features.items() if f.check)

    @property
    def needs_selection(self) -> bool:
        return self.features_per_prompt < len(self.selectable)

    def selection_prompt(self, query: str) -> str:
        """Raw text (no chat template) that the policy continues with its chosen features; it ends with an
        open `### Output` slot, so sample with stop=STOP, before the model invents the next `### Query`."""
        features = "\n".join(f"- {name}: {self.features[name].meaning}" for name in self.selectable)
        examples = "\n\n".join(f"### Query\n{q}\n### Output\n{','.join(out)}" for q, out in self.examples)
        return (
            "You are an excellent teacher who coaches AI assistants to answer user queries well. "
            "Before an assistant replies, you decide which qualities matter most for the query at hand.\n\n"
            "Task: read the query and identify the most crucial few features that a good response to it must have. "
            f"Choose only from these {len(self.selectable)} features:\n{features}\n\n"
            "Answer with the feature names separated by commas, in the form feature1,feature2, "
            "with no additional spaces and nothing else.\n\n"
            f"{examples}\n\n### Query\n{query}\n### Output\n"
        )

    def parse_features(self, text: str, rng: random.Random) -> list[str]:
        """The policy's answer -> features_per_prompt distinct selectable names: split on commas (and newlines,
        which small models emit instead), shuffle with rng (so the model's order does not decide which survive),
        keep the names of selectable features (any case), take k, and top up at random from the rest."""
        k = self.features_per_prompt
        canonical = {name.lower(): name for name in self.selectable}
        parts = [part.strip(" \t\r\n.*`'\"-").lower() for part in re.split(r"[,\n]", text)]
        rng.shuffle(parts)
        chosen = []
        for part in parts:
            name = canonical.get(part)
            if name is not None and name not in chosen:
                chosen.append(name)
        chosen = chosen[:k]
        remaining = [name for name in self.selectable if name not in chosen]
        return chosen + rng.sample(remaining, k - len(chosen))

    def pick(self, answer: str | None, rng: random.Random) -> list[str]:
        """The features of one prompt: the policy's answer to the selection prompt parsed (or, with
        nothing to pick, every selectable feature), plus the extra feature with its probability."""
        picked = self.parse_features(answer, rng) if self.needs_selection else list(self.selectable)
        return picked + ([self.extra] if self.extra and rng.random() <= self.extra_probability else [])

    def system_prompts(self, features) -> tuple[str, str]:
        """(p_system, n_system): the good and bad system prompts for these features, laid out as the released
        code builds them (for two features F1, F2 with adjectives A1, A2; no trailing newline, no Oxford comma):

            Your response should be A1 and A2. Following these detailed guidelines:
            F1: <principle 1>

            F2: <principle 2>
            However, do not tell or imply to the user the features, principles, or guidelines you follow ...
        """
        if not features:
            raise ValueError("system_prompts needs at least one feature")
        unknown = [name for name in features if name not in self.features]
        if unknown:
            raise ValueError(f"unknown features {unknown}; expected names from {tuple(self.features)}")
        chosen = [self.features[name] for name in features]

        def build(adjectives, principles):
            joined = adjectives[0] if len(adjectives) == 1 else ", ".join(adjectives[:-1]) + " and " + adjectives[-1]
            header = f"Your response should be {joined}. Following these detailed guidelines:"
            body = "\n\n".join(f"{f.name}: {p}" for f, p in zip(chosen, principles))
            return f"{header}\n{body}\n{CLOSING}"

        return (build([f.good_adjective for f in chosen], [f.good_principle for f in chosen]),
                build([f.bad_adjective for f in chosen], [f.bad_principle for f in chosen]))

    def passes(self, feature: str, response: str, capped: bool) -> bool:
        """Whether a response (capped: it hit the token cap) shows `feature`'s good behaviour."""
        return rules.passes(self.features[feature].check, response, capped)


def resolve_set(name_or_file) -> Path:
    """A set's file: a path to a .toml file, or the name of one in sso_mini/principle_sets/."""
    path = Path(name_or_file)
    if path.suffix == ".toml" or path.exists():
        return path
    return SETS / f"{name_or_file}.toml"


def available() -> list[str]:
    return sorted(p.stem for p in SETS.glob("*.toml"))


def load_principles(name_or_file) -> PrincipleSet:
    """Read and check a principle set; ValueError naming the file, the feature and the field."""
    path = resolve_set(name_or_file)
    if not path.is_file():
        raise ValueError(f"--principles {name_or_file}: no such file or set (sets: {', '.join(available())})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    try:
        return parse_set(path, data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def parse_set(path: Path, data: dict) -> PrincipleSet:
    known = {"description", "features_per_prompt", "extra", "feature", "example"}
    if set(data) - known:
        raise ValueError(f"unknown field(s) {', '.join(sorted(set(data) - known))} "
                         f"(allowed: {', '.join(sorted(known))})")
    rows = data.get("feature")
    if not isinstance(rows, list) or not rows:
        raise ValueError("no features (give at least one [[feature]] table)")
    features = {}
    for i, row in enumerate(rows):
        feature = parse_feature(row, i)
        if feature.name in features:
            raise ValueError(f"feature {feature.name!r}: the name is used twice")
        features[feature.name] = feature
    extra, p = parse_extra(data.get("extra"), features)
    selectable = [name for name in features if name != extra]
    if not selectable:
        raise ValueError("no feature the policy can pick (every feature is the extra one)")
    k = data.get("features_per_prompt", len(selectable))
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(selectable):
        raise ValueError(f"features_per_prompt {k!r} is out of range (allowed: 1 to {len(selectable)}, "
                         f"the number of features the policy can pick)")
    examples = parse_examples(data.get("example", []), selectable)
    if k < len(selectable) and not examples:
        raise ValueError(f"features_per_prompt {k} < {len(selectable)} features: the policy picks, so give at "
                         "least one [[example]] (query, features) for its selection prompt")
    return PrincipleSet(name=path.stem, source=path, features=features, features_per_prompt=k, extra=extra,
                        extra_probability=float(p), examples=examples)


def parse_feature(row, i: int) -> Feature:
    """The i-th [[feature]] table: every text field, and its check's conditions as rules.py reads them."""
    where = f"feature {row.get('name', i + 1)!r}: " if isinstance(row, dict) else f"feature {i + 1}: "
    if not isinstance(row, dict):
        raise ValueError(where + "must be a table")
    unknown = set(row) - set(TEXT_FIELDS) - {"check"}
    if unknown:
        raise ValueError(where + f"unknown field(s) {', '.join(sorted(unknown))} "
                                 f"(allowed: {', '.join(TEXT_FIELDS)}, check)")
    for field in TEXT_FIELDS:
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise ValueError(where + f"field '{field}' is missing or empty (a non-empty string)")
    check = row.get("check", [])
    if not isinstance(check, list):
        raise ValueError(where + "field 'check' must be a list of conditions, e.g. [{rule = \"ended\"}]")
    for condition in check:
        error = rules.condition_error(condition)
        if error:
            raise ValueError(where + f"field 'check': {error}")
    return Feature(**{k: row[k] for k in TEXT_FIELDS}, check=tuple(check))


def parse_extra(extra, features: dict) -> tuple[str | None, float]:
    """The [extra] table: (the feature added at random, its probability), or (None, 0)."""
    if extra is None:
        return None, 0.0
    if not isinstance(extra, dict) or set(extra) != {"feature", "probability"}:
        raise ValueError("field 'extra' needs exactly: feature (a feature's name), probability (0 to 1)")
    if extra["feature"] not in features:
        raise ValueError(f"field 'extra': {extra['feature']!r} is not one of the features")
    p = extra["probability"]
    if not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"field 'extra': probability {p!r} is not a number from 0 to 1")
    return extra["feature"], p


def parse_examples(rows: list, selectable: list) -> tuple:
    """The [[example]] tables of the selection prompt: ((query, (feature, ...)), ...)."""
    examples = []
    for i, ex in enumerate(rows):
        if (not isinstance(ex, dict) or set(ex) != {"query", "features"} or not isinstance(ex["query"], str)
                or not isinstance(ex["features"], list) or not ex["features"]
                or any(f not in selectable for f in ex["features"])):
            raise ValueError(f"example {i + 1}: needs a query (a string) and features (names from {selectable})")
        examples.append((ex["query"], tuple(ex["features"])))
    return tuple(examples)
