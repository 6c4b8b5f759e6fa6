"""Exact match against the ground truth, per-epoch counts built from a stream
of predictions (`epochlens summary`, `epochlens watch`), and the judge scores of
a run's RunSummary arranged per criterion (`summary`, `report`).

Exact match: the one definition of services.common.matching, which the judge's
exact_match rule and the report use too: equal after Unicode NFC, stripping
surrounding whitespace, collapsing inner whitespace to one space and case
folding. A prediction without a ground truth is neither a match nor a miss: the
exact-match rate of an epoch is the matches divided by the predictions that have
a ground truth, and is undefined (None) when none has one.

Judge scores: a criterion is (criterion, judge type, judge model). Its mean score
and pass rate in an epoch are over the scored judgments only (the query service
leaves unscored ones out); an epoch without a scored judgment has neither (None).
Rule scores are 0..1, LLM scores 1..10 and human scores are taken on the LLM
scale: normalized() divides by SCORE_SCALES so every criterion fits 0..1 (for
sparklines and the report's chart).
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

from epochlens.v1 import common_pb2, judge_pb2, query_pb2
from services.common.matching import exact_match

__all__ = ["exact_match"]

SCORE_SCALES = {judge_pb2.JUDGE_TYPE_RULE: 1.0, judge_pb2.JUDGE_TYPE_LLM: 10.0,
                judge_pb2.JUDGE_TYPE_HUMAN: 10.0}


@dataclass
class EpochStats:
    """What one epoch's predictions add up to."""

    epoch: int
    prediction_count: int = 0
    with_ground_truth: int = 0
    exact_match_count: int = 0
    latest_step: int = 0

    @property
    def exact_match_rate(self) -> float | None:
        if not self.with_ground_truth:
            return None
        return self.exact_match_count / self.with_ground_truth

    def add(self, prediction: common_pb2.Prediction) -> None:
        truth = prediction.ground_truth if prediction.HasField("ground_truth") else None
        match = exact_match(prediction.prediction, truth)
        self.prediction_count += 1
        self.latest_step = max(self.latest_step, prediction.step)
        if match is not None:
            self.with_ground_truth += 1
            self.exact_match_count += match

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "prediction_count": self.prediction_count,
                "with_ground_truth": self.with_ground_truth,
                "exact_match_count": self.exact_match_count,
                "exact_match_rate": self.exact_match_rate, "latest_step": self.latest_step}


def epoch_stats(pages: Iterable[list[common_pb2.Prediction]]) -> list[EpochStats]:
    """Per-epoch stats of every prediction in `pages`, ascending by epoch."""
    by_epoch: dict[int, EpochStats] = {}
    for page in pages:
        for prediction in page:
            stats = by_epoch.get(prediction.epoch)
            if stats is None:
                stats = by_epoch[prediction.epoch] = EpochStats(prediction.epoch)
            stats.add(prediction)
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def judge_type_name(judge_type: int) -> str:
    """rule, llm or human (the number for a value this client does not know)."""
    try:
        return judge_pb2.JudgeType.Name(judge_type).removeprefix("JUDGE_TYPE_").lower()
    except ValueError:
        return str(judge_type)


def normalized(score: float | None, judge_type: int) -> float | None:
    """The score on 0..1: divided by its judge type's scale, clamped."""
    if score is None:
        return None
    return min(1.0, max(0.0, score / SCORE_SCALES.get(judge_type, 1.0)))


def format_score(score: float | None, judge_type: int) -> str:
    """Rule scores with three decimals, LLM and human scores with two; '-' for None."""
    if score is None:
        return "-"
    return f"{score:.3f}" if judge_type == judge_pb2.JUDGE_TYPE_RULE else f"{score:.2f}"


@dataclass
class CriterionSeries:
    """One criterion's summary rows by epoch."""

    criterion: str
    judge_type: int
    judge_model: str
    by_epoch: dict[int, query_pb2.CriterionEpochSummary] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.criterion} ({self.judge_model})"

    @property
    def scale(self) -> float:
        return SCORE_SCALES.get(self.judge_type, 1.0)

    def mean(self, epoch: int) -> float | None:
        row = self.by_epoch.get(epoch)
        return row.mean_score if row is not None and row.scored_count else None

    def pass_rate(self, epoch: int) -> float | None:
        row = self.by_epoch.get(epoch)
        return row.pass_rate if row is not None and row.scored_count else None

    def as_dict(self, epochs: list[int], sparkline: str) -> dict:
        return {"criterion": self.criterion,
                "judge_type": judge_pb2.JudgeType.Name(self.judge_type),
                "judge_model": self.judge_model, "scale": self.scale, "sparkline": sparkline,
                "epochs": [{"epoch": e, "mean_score": self.mean(e),
                            "pass_rate": self.pass_rate(e),
                            "scored_count": self.by_epoch[e].scored_count,
                            "unscored_count": self.by_epoch[e].unscored_count}
                           for e in epochs if e in self.by_epoch]}


def criteria_series(summary: query_pb2.RunSummary) -> list[CriterionSeries]:
    """One series per criterion that has judgments, by criterion, judge type, judge model."""
    series: dict[tuple[str, int, str], CriterionSeries] = {}
    for row in summary.rows:
        key = (row.criterion, row.judge_type, row.judge_model)
        if key not in series:
            series[key] = CriterionSeries(*key)
        series[key].by_epoch[row.epoch] = row
    return [series[key] for key in sorted(series)]


@dataclass
class EpochCost:
    """What judging one epoch cost (every criterion together)."""

    epoch: int
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens, "cost_usd": self.cost_usd}


def epoch_costs(summary: query_pb2.RunSummary) -> list[EpochCost]:
    """Judge tokens and cost per epoch, ascending by epoch."""
    costs: dict[int, EpochCost] = {}
    for row in summary.rows:
        cost = costs.setdefault(row.epoch, EpochCost(row.epoch))
        cost.input_tokens += row.input_tokens
        cost.output_tokens += row.output_tokens
        cost.cost_usd += row.cost_usd
    return [costs[e] for e in sorted(costs)]
