"""What the options of `epochlens eval` turn into: the run's judge config, the thresholds of
--fail-under and their outcome.

--fail-under syntax (repeatable):

* ``CRITERION=VALUE``: fails when the criterion's mean score is below VALUE (rule scores are
  0..1, LLM scores 1..10);
* ``CRITERION=pass:VALUE``: fails when the criterion's pass rate (0..1) is below VALUE.

The last ``=`` separates the two, so a criterion name may hold one.

A criterion judged by several judge models (a panel) is compared with the mean over all its
scored judgments.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epochlens.v1 import query_pb2
from services.judge.rules import RULE_NAMES

PASS_PREFIX = "pass:"
ON_ERROR_CHOICES = ("skip", "retry", "fail")


class OptionError(ValueError):
    """An option value the command cannot use (exit status 2)."""


@dataclass(frozen=True)
class Threshold:
    """One --fail-under: the criterion, the measure (mean or pass_rate) and its floor."""

    criterion: str
    measure: str
    value: float

    def text(self) -> str:
        prefix = PASS_PREFIX if self.measure == "pass_rate" else ""
        return f"{self.criterion}={prefix}{self.value:g}"


def parse_threshold(text: str) -> Threshold:
    """`CRITERION=VALUE` or `CRITERION=pass:VALUE`, or OptionError saying what is wrong."""
    # the last "=": a criterion object's name may hold one, a number never does
    criterion, sep, value = text.rpartition("=")
    criterion = criterion.strip()
    if not sep or not criterion:
        raise OptionError(f"--fail-under {text!r}: write CRITERION=VALUE (mean score) or "
                          "CRITERION=pass:VALUE (pass rate)")
    measure = "mean"
    if value.startswith(PASS_PREFIX):
        measure, value = "pass_rate", value[len(PASS_PREFIX):]
    try:
        number = float(value)
    except ValueError:
        raise OptionError(f"--fail-under {text!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise OptionError(f"--fail-under {text!r}: the value must be finite")
    if measure == "pass_rate" and not 0 <= number <= 1:
        raise OptionError(f"--fail-under {text!r}: a pass rate is between 0 and 1")
    return Threshold(criterion, measure, number)


def judge_config(config_file: Path | None, llm: str | None, criteria: list[str],
                 budget_usd: float | None, on_error: str | None) -> dict[str, Any]:
    """The "judge" section of the run's config: --judge-config's JSON (the section itself, or a
    whole run config holding one), with the shortcuts applied on top.

    --criteria names rule criteria (RULE_NAMES) and LLM criteria alike: rule names go to
    rules.criteria, the others to llm.criteria (which needs an LLM judge)."""
    section = _load_section(config_file) if config_file is not None else {}
    rules = [c for c in criteria if c in RULE_NAMES]
    llm_criteria = [c for c in criteria if c not in RULE_NAMES]
    if rules:
        section.setdefault("rules", {})["criteria"] = rules
    if llm is not None:
        provider, sep, model = llm.partition("/")
        if not sep or not provider or not model:
            raise OptionError(f"--llm {llm!r}: write PROVIDER/MODEL, e.g. openai/gpt-4o-mini")
        section.setdefault("llm", {}).update(provider=provider, model=model)
    llm_section = section.get("llm")
    extras = {"criteria": llm_criteria or None, "budget_usd": budget_usd, "on_error": on_error}
    extras = {k: v for k, v in extras.items() if v is not None}
    if extras and not isinstance(llm_section, dict):
        raise OptionError(f"{', '.join('--' + k.replace('_', '-') for k in extras)} need an "
                          "LLM judge: give --llm PROVIDER/MODEL or an llm section in "
                          "--judge-config (rule criteria: "
                          f"{', '.join(RULE_NAMES)})")
    if extras:
        llm_section.update(extras)
    return section


def _load_section(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OptionError(f"--judge-config {path}: {exc}") from None
    except RecursionError:
        raise OptionError(f"--judge-config {path}: JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise OptionError(f"--judge-config {path}: a JSON object is expected")
    section = data["judge"] if "judge" in data else data
    if not isinstance(section, dict):
        raise OptionError(f"--judge-config {path}: its judge section is not an object")
    return section


@dataclass(frozen=True)
class CriterionResult:
    """A criterion over the evaluation: mean score and pass rate of its scored judgments."""

    criterion: str
    mean_score: float
    pass_rate: float
    scored: int
    unscored: int
    judges: tuple[str, ...]


def criterion_results(summary: query_pb2.RunSummary) -> dict[str, CriterionResult]:
    """Per criterion, every judge model of it pooled (weighted by scored judgments)."""
    grouped: dict[str, list[query_pb2.CriterionEpochSummary]] = {}
    for row in summary.rows:
        grouped.setdefault(row.criterion, []).append(row)
    results = {}
    for criterion, rows in sorted(grouped.items()):
        scored = sum(r.scored_count for r in rows)
        mean = sum(r.mean_score * r.scored_count for r in rows) / scored if scored else 0.0
        rate = sum(r.pass_rate * r.scored_count for r in rows) / scored if scored else 0.0
        results[criterion] = CriterionResult(
            criterion, mean, rate, scored, sum(r.unscored_count for r in rows),
            tuple(sorted({r.judge_model for r in rows})))
    return results


def check_thresholds(thresholds: list[Threshold], results: dict[str, CriterionResult]
                     ) -> list[dict[str, Any]]:
    """Each threshold with the measured value and whether it passed; OptionError naming the
    criteria that were not judged at all (an unknown criterion)."""
    unknown = sorted({t.criterion for t in thresholds} - set(results))
    if unknown:
        raise OptionError(f"--fail-under names criteria this evaluation has no judgment of: "
                          f"{', '.join(unknown)} (judged: {', '.join(results) or 'none'})")
    outcomes = []
    for t in thresholds:
        result = results[t.criterion]
        measured = result.mean_score if t.measure == "mean" else result.pass_rate
        passed = result.scored > 0 and measured >= t.value
        outcomes.append({"threshold": t.text(), "criterion": t.criterion,
                         "measure": t.measure, "value": t.value, "measured": measured,
                         "scored": result.scored, "passed": passed})
    return outcomes
