"""Rule judges: cheap, deterministic criteria computed in process.

Each criterion is a pure function of the item, the run's RulesConfig and the service's
RuleDefaults that returns a score in 0..1 and what it measured. Reference criteria
(exact_match, chrf, edit_similarity) need a ground truth; length and structure always
apply; keywords, citation, output_format and policy_scope apply when configured.
Similarity metrics come from sacrebleu (chrF) and rapidfuzz (Levenshtein), not from code
written here.
"""

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sacrebleu
from rapidfuzz.distance import Levenshtein

from epochlens.v1 import judge_pb2
from services.common import matching
from services.common.matching import normalize
from services.judge.schema import Item, ItemFailure, RulesConfig, Verdict, compile_pattern

RULES_JUDGE_MODEL = "rules"
RULES_PROMPT_VERSION = "rules-v1"


@dataclass(frozen=True)
class RuleCriterion:
    """A rule criterion as ListCriteria describes it."""

    name: str
    description: str
    needs_ground_truth: bool


RULE_CRITERIA = (
    RuleCriterion("exact_match", "Prediction equals the ground truth after Unicode NFC, "
                  "stripping, collapsing whitespace and case folding (1 or 0).", True),
    RuleCriterion("chrf", "chrF similarity to the ground truth (sacrebleu), scaled to 0..1.",
                  True),
    RuleCriterion("edit_similarity", "Normalized Levenshtein similarity to the ground truth "
                  "(rapidfuzz), 0..1.", True),
    RuleCriterion("length", "Prediction length within the configured character bounds "
                  "(1 or 0).", False),
    RuleCriterion("structure", "Non-empty, not a copy of the prompt, and no degenerate "
                  "repetition of word n-grams (1 or 0).", False),
    RuleCriterion("keywords", "Share of keyword checks met: required keywords present, "
                  "forbidden keywords absent.", False),
    RuleCriterion("citation", "Prediction cites a source (matches the citation pattern) "
                  "(1 or 0).", False),
    RuleCriterion("output_format", "Share of format checks met: parses as JSON, matches "
                  "the configured pattern.", False),
    RuleCriterion("policy_scope", "Share of forbidden topics absent from the prediction.",
                  False),
)
RULE_NAMES = tuple(c.name for c in RULE_CRITERIA)
REFERENCE_RULES = frozenset(c.name for c in RULE_CRITERIA if c.needs_ground_truth)


@dataclass(frozen=True)
class RuleDefaults:
    """Service-wide rule settings (JudgeSettings.rule_defaults())."""

    thresholds: dict[str, float]
    min_chars: int
    max_chars: int
    repetition_ngram: int
    max_repeated_share: float
    citation_pattern: str


@dataclass(frozen=True)
class Measure:
    """A rule's raw outcome: score in 0..1 and what was measured."""

    score: float
    reasoning: str


RuleFn = Callable[[Item, RulesConfig, RuleDefaults], Measure]


@functools.lru_cache(maxsize=4096)
def _term_pattern(term: str) -> re.Pattern[str]:
    """Matches `term` (case folded) not inside a longer word."""
    return re.compile(rf"(?<!\w){re.escape(term.casefold())}(?!\w)")


def _contains(folded_text: str, term: str) -> bool:
    return _term_pattern(term).search(folded_text) is not None


def exact_match(item: Item, _config: RulesConfig, _defaults: RuleDefaults) -> Measure:
    """The one exact-match definition (services.common.matching), as the CLI and report use."""
    equal = bool(matching.exact_match(item.prediction, item.ground_truth or ""))
    return Measure(1.0 if equal else 0.0,
                   "normalized prediction equals the ground truth" if equal
                   else "normalized prediction differs from the ground truth")


def chrf(item: Item, _config: RulesConfig, _defaults: RuleDefaults) -> Measure:
    value = sacrebleu.sentence_chrf(item.prediction, [item.ground_truth or ""]).score / 100.0
    return Measure(value, f"chrF {value * 100:.2f} (sacrebleu, char 6-grams, beta 2)")


def edit_similarity(item: Item, _config: RulesConfig, _defaults: RuleDefaults) -> Measure:
    value = Levenshtein.normalized_similarity(item.prediction, item.ground_truth or "")
    return Measure(value, f"normalized Levenshtein similarity {value:.4f}")


def length(item: Item, config: RulesConfig, defaults: RuleDefaults) -> Measure:
    low = defaults.min_chars if config.min_chars is None else config.min_chars
    high = defaults.max_chars if config.max_chars is None else config.max_chars
    size = len(item.prediction)
    inside = low <= size <= high
    return Measure(1.0 if inside else 0.0,
                   f"{size} characters, bounds {low}..{high}: {'within' if inside else 'outside'}")


def repeated_share(text: str, n: int) -> float:
    """Share of the word n-grams of `text` that repeat an earlier n-gram (0 if fewer words)."""
    words = text.casefold().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def structure(item: Item, _config: RulesConfig, defaults: RuleDefaults) -> Measure:
    if not item.prediction.strip():
        return Measure(0.0, "empty prediction")
    if normalize(item.prediction) == normalize(item.prompt):
        return Measure(0.0, "prediction is a copy of the prompt")
    share = repeated_share(item.prediction, defaults.repetition_ngram)
    degenerate = share > defaults.max_repeated_share
    return Measure(0.0 if degenerate else 1.0,
                   f"non-empty, not the prompt; repeated word {defaults.repetition_ngram}-gram "
                   f"share {share:.2f} (max {defaults.max_repeated_share:.2f})")


def keywords(item: Item, config: RulesConfig, _defaults: RuleDefaults) -> Measure:
    text = item.prediction.casefold()
    missing = [k for k in config.required_keywords if not _contains(text, k)]
    present = [k for k in config.forbidden_keywords if _contains(text, k)]
    checks = len(config.required_keywords) + len(config.forbidden_keywords)
    met = checks - len(missing) - len(present)
    return Measure(met / checks if checks else 1.0,
                   f"{met}/{checks} keyword checks met; missing required: {missing}; "
                   f"forbidden present: {present}")


def citation(item: Item, _config: RulesConfig, defaults: RuleDefaults) -> Measure:
    found = compile_pattern(defaults.citation_pattern).search(item.prediction)
    if found is None:
        return Measure(0.0, "no citation found")
    return Measure(1.0, f"citation found: {found.group(0)[:80]!r}")


def _json_check(text: str) -> str:
    """"valid JSON", or why not. Nesting deeper than the interpreter's recursion limit is
    not valid JSON here (json raises RecursionError for it, e.g. on '[' * 30000)."""
    try:
        json.loads(text)
    except ValueError:
        return "not valid JSON"
    except RecursionError:
        return "not valid JSON (nested too deeply to parse)"
    return "valid JSON"


def output_format(item: Item, config: RulesConfig, _defaults: RuleDefaults) -> Measure:
    results: list[str] = []
    if config.output_format == "json":
        results.append(_json_check(item.prediction))
    if config.pattern is not None:
        matched = compile_pattern(config.pattern).search(item.prediction) is not None
        results.append("matches the pattern" if matched else "does not match the pattern")
    met = sum(1 for r in results if r in ("valid JSON", "matches the pattern"))
    return Measure(met / len(results) if results else 1.0,
                   "; ".join(results) or "no format configured")


def policy_scope(item: Item, config: RulesConfig, _defaults: RuleDefaults) -> Measure:
    text = item.prediction.casefold()
    found = [t for t in config.forbidden_topics if _contains(text, t)]
    topics = len(config.forbidden_topics)
    return Measure((topics - len(found)) / topics if topics else 1.0,
                   f"forbidden topics present: {found}" if found
                   else f"none of {topics} forbidden topics present")


RULES: dict[str, RuleFn] = {
    "exact_match": exact_match, "chrf": chrf, "edit_similarity": edit_similarity,
    "length": length, "structure": structure, "keywords": keywords, "citation": citation,
    "output_format": output_format, "policy_scope": policy_scope,
}


def _configured(name: str, config: RulesConfig) -> bool:
    """Whether a rule that depends on configuration has any."""
    if name == "keywords":
        return bool(config.required_keywords or config.forbidden_keywords)
    if name == "citation":
        return config.require_citation
    if name == "output_format":
        return config.output_format is not None or config.pattern is not None
    if name == "policy_scope":
        return bool(config.forbidden_topics)
    return True


def selected_rules(config: RulesConfig) -> list[str]:
    """Rule criteria this config runs (before the ground-truth check), in RULE_NAMES order."""
    if not config.enabled:
        return []
    wanted = RULE_NAMES if config.criteria is None else set(config.criteria)
    return [name for name in RULE_NAMES if name in wanted and _configured(name, config)]


def threshold(name: str, config: RulesConfig, defaults: RuleDefaults) -> float:
    return config.thresholds.get(name, defaults.thresholds[name])


def _verdict(name: str, limit: float, measure: Measure) -> Verdict:
    return Verdict(criterion=name, judge_type=judge_pb2.JUDGE_TYPE_RULE,
                   judge_model=RULES_JUDGE_MODEL, score=measure.score,
                   passed=measure.score >= limit, threshold=limit, reasoning=measure.reasoning,
                   status=judge_pb2.JUDGMENT_STATUS_SCORED, prompt_version=RULES_PROMPT_VERSION)


def judge_item(item: Item, config: RulesConfig, defaults: RuleDefaults) -> list[Verdict]:
    """The rule verdicts of one item. Without a ground truth, reference rules are left out
    by default and unscored when the config names them explicitly."""
    verdicts = []
    for name in selected_rules(config):
        limit = threshold(name, config, defaults)
        if name in REFERENCE_RULES and item.ground_truth is None:
            if config.criteria is not None:
                verdicts.append(Verdict.unscored(
                    name, judge_pb2.JUDGE_TYPE_RULE, RULES_JUDGE_MODEL, limit,
                    "no ground truth to compare with", RULES_PROMPT_VERSION))
            continue
        verdicts.append(_verdict(name, limit, RULES[name](item, config, defaults)))
    return verdicts


def judge_items(items: Sequence[Item], configs: Sequence[RulesConfig],
                defaults: RuleDefaults) -> list[list[Verdict] | ItemFailure]:
    """judge_item over paired items and configs (the unit handed to a worker process). Each
    item is judged in isolation: one that raises gets an ItemFailure (logged and counted by
    the caller), the others their verdicts."""
    return [_judge_isolated(item, config, defaults)
            for item, config in zip(items, configs, strict=True)]


def _judge_isolated(item: Item, config: RulesConfig,
                    defaults: RuleDefaults) -> list[Verdict] | ItemFailure:
    try:
        return judge_item(item, config, defaults)
    except Exception as exc:  # noqa: BLE001 - any error of one item stays with that item
        return ItemFailure(f"rule judging raised {type(exc).__name__}: {exc}")
