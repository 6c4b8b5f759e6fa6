"""The CompareRunsResponse of two read sides (services.query.compare), pure and CPU only
(numpy; callers run it off the event loop): per (criterion, judge_type, judge_model) with at
least one sample scored on both sides, the paired means, pass rates, their deltas with paired
bootstrap intervals (services.query.stats), improved / regressed / unchanged counts, and the
changed samples: verdict flips first (regressions, then improvements), then the largest
score changes."""

from dataclasses import dataclass

import numpy as np

from epochlens.v1 import query_pb2
from services.query.compare import JudgeKey, Sides
from services.query.stats import paired_bootstrap

# Two scores closer than this are the same score (averages of human scores carry rounding).
SAME_SCORE = 1e-9


@dataclass(frozen=True)
class Bootstrap:
    """How the intervals are computed: resamples, generator seed, confidence level."""

    resamples: int
    seed: int
    level: float


@dataclass(frozen=True)
class Paired:
    """One judge's scores on the paired samples, in pair order."""

    key: JudgeKey
    pairs: list[tuple[int, int]]
    base_score: np.ndarray
    cand_score: np.ndarray
    base_pass: np.ndarray
    cand_pass: np.ndarray


def _paired(sides: Sides) -> list[Paired]:
    """Every judge scored on both sides of at least one shared sample, in (criterion,
    judge_type, judge_model) order."""
    out = []
    for key in sorted(sides.candidate.scores.keys() & sides.baseline.scores.keys()):
        cand, base = sides.candidate.scores[key], sides.baseline.scores[key]
        both = [(c, b) for c, b in sides.pairs if c in cand and b in base]
        if not both:
            continue
        out.append(Paired(key, both,
                          np.array([base[b][0] for _, b in both]),
                          np.array([cand[c][0] for c, _ in both]),
                          np.array([base[b][1] for _, b in both], dtype=np.float64),
                          np.array([cand[c][1] for c, _ in both], dtype=np.float64)))
    return out


def _delta(paired: Paired, bootstrap: Bootstrap) -> query_pb2.CriterionDelta:
    diff = paired.cand_score - paired.base_score
    (low, high), (pass_low, pass_high) = paired_bootstrap(
        np.vstack([diff, paired.cand_pass - paired.base_pass]), bootstrap.resamples,
        bootstrap.seed, bootstrap.level)
    same = np.abs(diff) <= SAME_SCORE
    base_mean, cand_mean = float(paired.base_score.mean()), float(paired.cand_score.mean())
    base_rate, cand_rate = float(paired.base_pass.mean()), float(paired.cand_pass.mean())
    criterion, judge_type, judge_model = paired.key
    return query_pb2.CriterionDelta(
        criterion=criterion, judge_type=judge_type, judge_model=judge_model,
        paired_count=len(diff), baseline_mean=base_mean, candidate_mean=cand_mean,
        mean_delta=cand_mean - base_mean, mean_delta_low=float(low),
        mean_delta_high=float(high), baseline_pass_rate=base_rate,
        candidate_pass_rate=cand_rate, pass_rate_delta=cand_rate - base_rate,
        pass_rate_delta_low=float(pass_low), pass_rate_delta_high=float(pass_high),
        improved_count=int(np.sum((diff > 0) & ~same)),
        regressed_count=int(np.sum((diff < 0) & ~same)), unchanged_count=int(np.sum(same)))


def _changes(paired: list[Paired], limit: int) -> list[query_pb2.SampleChange]:
    """Changed samples: regressions of the verdict, then improvements of it, then the rest;
    each group by largest |score change|, then judge and sample."""
    ranked = []
    for p in paired:
        for i, (cand, base) in enumerate(p.pairs):
            change = float(p.cand_score[i] - p.base_score[i])
            bp, cp = bool(p.base_pass[i]), bool(p.cand_pass[i])
            if abs(change) <= SAME_SCORE and bp == cp:
                continue
            group = 0 if bp and not cp else 1 if cp and not bp else 2
            ranked.append(((group, -abs(change), *p.key, cand), query_pb2.SampleChange(
                sample_index=cand, baseline_sample_index=base, criterion=p.key[0],
                judge_type=p.key[1], judge_model=p.key[2],
                baseline_score=float(p.base_score[i]), candidate_score=float(p.cand_score[i]),
                baseline_passed=bp, candidate_passed=cp)))
    ranked.sort(key=lambda item: item[0])
    return [change for _, change in ranked[:limit]]


def build_response(sides: Sides, bootstrap: Bootstrap,
                   max_changes: int) -> query_pb2.CompareRunsResponse:
    """The CompareRunsResponse of two read sides (CPU only: callers run it off the loop)."""
    paired = _paired(sides)
    return query_pb2.CompareRunsResponse(
        run_id=str(sides.candidate.run_id), epoch=sides.candidate.epoch,
        baseline_run_id=str(sides.baseline.run_id), baseline_epoch=sides.baseline.epoch,
        shared_samples=len(sides.pairs), confidence_level=bootstrap.level,
        bootstrap_resamples=bootstrap.resamples,
        deltas=[_delta(p, bootstrap) for p in paired],
        changes=_changes(paired, max_changes))

