"""The one definition of exact match, with no server package: services/common/matching.py
re-exports it for the judge's exact_match rule, the CLI and the report, so the rate a
training loop logs is the rate `epochlens summary` shows for the same pass.

Two texts match when they are equal after Unicode NFC, stripping surrounding whitespace,
collapsing inner whitespace to one space and case folding.
"""

import unicodedata
from collections.abc import Iterable

from trainer_client.results import GenerationResult


def normalize(text: str) -> str:
    """NFC, outer whitespace stripped, inner whitespace collapsed to one space, case folded."""
    return " ".join(unicodedata.normalize("NFC", text).split()).casefold()


def exact_match(prediction: str, ground_truth: str | None) -> bool | None:
    """Whether the prediction matches the ground truth; None when there is no ground truth."""
    if ground_truth is None:
        return None
    return normalize(prediction) == normalize(ground_truth)


def exact_match_rate(results: Iterable[GenerationResult]) -> float | None:
    """Share of generated predictions with a ground truth that match it; None when there is
    none (failed samples store no prediction and are left out, like rows without a ground
    truth)."""
    verdicts = [exact_match(r.prediction, r.ground_truth) for r in results
                if r.prediction is not None and r.ground_truth is not None]
    return sum(verdicts) / len(verdicts) if verdicts else None
