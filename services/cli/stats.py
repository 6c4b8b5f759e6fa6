"""Exact match against the ground truth, and per-epoch counts built from a
stream of predictions (`epochlens summary`, `epochlens watch`).

Exact match: the prediction equals the ground truth once leading and trailing
whitespace is stripped from both (a model that ends its answer with a newline
still matches). Inner whitespace and case count. A prediction without a ground
truth is neither a match nor a miss: the exact-match rate of an epoch is the
matches divided by the predictions that have a ground truth, and is undefined
(None) when none has one.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from epochlens.v1 import common_pb2


def exact_match(prediction: str, ground_truth: str | None) -> bool | None:
    """True/False against the ground truth (stripped); None when there is none."""
    if ground_truth is None:
        return None
    return prediction.strip() == ground_truth.strip()


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
