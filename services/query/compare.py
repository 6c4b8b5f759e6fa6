"""CompareRuns: a run's epoch (the candidate) against a baseline epoch of the same run or of
another of the caller's runs, on the samples both have.

Reading (one transaction, every statement filtered by the caller): both runs owned (else
NOT_FOUND), the epochs resolved (services.query.compare_epochs), each side's samples at the
latest step of its epoch, matched by sample_index within one run and by (prompt, ground
truth) across runs, and each side's scored judgments of those predictions. Human judgments
count as one judge "human": several people's latest revisions are averaged per sample (score
and threshold; the verdict is mean score >= mean threshold).

Computing (pure, numpy, off the event loop): per (criterion, judge_type, judge_model) with at
least one sample scored on both sides, the paired means, pass rates, their deltas with
paired bootstrap intervals (services.query.stats), improved / regressed / unchanged counts,
and the changed samples: verdict flips first (regressions, then improvements), then the
largest score changes.
"""

import hashlib
import json
import uuid
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from sqlalchemy import and_, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from epochlens.v1 import judge_pb2, query_pb2
from services.common.convert import parse_run_id
from services.common.errors import FailedPrecondition, Violations
from services.judge.models import judgments_table as J
from services.query.compare_epochs import resolve_epochs
from services.query.stats import paired_bootstrap
from services.writer.models import predictions_table as P

HUMAN = judge_pb2.JUDGE_TYPE_HUMAN
HUMAN_MODEL = "human"
SCORED = judge_pb2.JUDGMENT_STATUS_SCORED
# Two scores closer than this are the same score (averages of human scores carry rounding).
SAME_SCORE = 1e-9

JudgeKey = tuple[str, int, str]  # criterion, judge_type, judge_model


@dataclass(frozen=True)
class CompareQuery:
    """A validated CompareRunsRequest: baseline_run_id is run_id when the request named
    none; max_changes is resolved against the settings."""

    run_id: uuid.UUID
    epoch: int | None
    baseline_run_id: uuid.UUID
    baseline_epoch: int | None
    choice: int
    best_criterion: str
    max_changes: int


@dataclass(frozen=True)
class Bootstrap:
    """How the intervals are computed: resamples, generator seed, confidence level."""

    resamples: int
    seed: int
    level: float


@dataclass
class Side:
    """One side of a comparison: the run and epoch, its samples (sample_index -> latest
    step) and its scores (judge -> sample_index -> (score, passed))."""

    run_id: uuid.UUID
    epoch: int
    samples: dict[int, int]
    scores: dict[JudgeKey, dict[int, tuple[float, bool]]]


@dataclass(frozen=True)
class Sides:
    candidate: Side
    baseline: Side
    pairs: list[tuple[int, int]]  # (candidate sample_index, baseline sample_index)


def compare_query(request: query_pb2.CompareRunsRequest, default_changes: int,
                  max_changes: int) -> CompareQuery:
    """The request checked field by field (INVALID_ARGUMENT naming every bad field)."""
    violations = Violations()
    run_id = parse_run_id(request.run_id, "run_id", violations)
    baseline = (parse_run_id(request.baseline_run_id, "baseline_run_id", violations)
                if request.baseline_run_id else run_id)
    epoch = request.epoch if request.HasField("epoch") else None
    baseline_epoch = request.baseline_epoch if request.HasField("baseline_epoch") else None
    for name, value in (("epoch", epoch), ("baseline_epoch", baseline_epoch),
                        ("max_changes", request.max_changes)):
        if value is not None and value < 0:
            violations.add(name, f"must be >= 0, got {value}")
    if request.baseline_choice not in query_pb2.EpochChoice.values():
        violations.add("baseline_choice", f"unknown epoch choice {request.baseline_choice}")
    best = request.baseline_choice == query_pb2.EPOCH_CHOICE_BEST
    if best and baseline_epoch is None and not request.best_criterion.strip():
        violations.add("best_criterion", "required with baseline_choice BEST")
    violations.raise_if_any()
    assert run_id is not None and baseline is not None
    return CompareQuery(run_id, epoch, baseline, baseline_epoch, request.baseline_choice,
                        request.best_criterion, min(request.max_changes or default_changes,
                                                    max_changes))


def _latest(user_id: str, run_id: uuid.UUID, epoch: int):
    """Subquery: each sample of the run's epoch with its latest step there."""
    return (select(P.c.sample_index, func.max(P.c.step).label("step"))
            .where(P.c.run_id == run_id, P.c.user_id == user_id, P.c.epoch == epoch)
            .group_by(P.c.sample_index).subquery())


async def _samples(conn: AsyncConnection, user_id: str, run_id: uuid.UUID, epoch: int,
                   max_samples: int, field: str) -> dict[int, int]:
    latest = _latest(user_id, run_id, epoch)
    rows = (await conn.execute(select(latest.c.sample_index, latest.c.step)
                               .order_by(latest.c.sample_index).limit(max_samples + 1))).all()
    if len(rows) > max_samples:
        raise FailedPrecondition(
            f"epoch {epoch} of run {run_id} has more than {max_samples} samples, the most "
            "CompareRuns compares (compare_max_samples)",
            {"field": field, "limit": "compare_max_samples", "max_samples": str(max_samples)})
    return {row.sample_index: row.step for row in rows}


def _sample_key(prompt: str, ground_truth: str | None) -> bytes:
    return hashlib.sha256(json.dumps([prompt, ground_truth]).encode()).digest()


async def _keys(conn: AsyncConnection, user_id: str, side: Side) -> dict[bytes, list[int]]:
    """(prompt, ground truth) digest -> the side's sample indices with it, ascending; rows
    are streamed so only digests stay in memory."""
    latest = _latest(user_id, side.run_id, side.epoch)
    stmt = (select(P.c.sample_index, P.c.prompt, P.c.ground_truth)
            .join(latest, and_(P.c.sample_index == latest.c.sample_index,
                               P.c.step == latest.c.step))
            .where(P.c.run_id == side.run_id, P.c.user_id == user_id)
            .order_by(P.c.sample_index))
    keys: dict[bytes, list[int]] = defaultdict(list)
    async for row in await conn.stream(stmt):
        keys[_sample_key(row.prompt, row.ground_truth)].append(row.sample_index)
    return keys


async def _pairs(conn: AsyncConnection, user_id: str, candidate: Side,
                 baseline: Side) -> list[tuple[int, int]]:
    """Shared samples in candidate sample_index order: by index within one run, by (prompt,
    ground truth) across runs (the i-th candidate sample with a key paired with the i-th
    baseline sample with that key)."""
    if candidate.run_id == baseline.run_id:
        return [(i, i) for i in sorted(candidate.samples.keys() & baseline.samples.keys())]
    cand, base = await _keys(conn, user_id, candidate), await _keys(conn, user_id, baseline)
    pairs = [pair for key, indices in cand.items()
             for pair in zip(indices, base.get(key, ()), strict=False)]
    return sorted(pairs)


async def _scores(conn: AsyncConnection, user_id: str, side: Side) -> None:
    """Fills side.scores with the scored judgments of the side's latest predictions,
    people averaged per sample into one judge "human"."""
    latest = _latest(user_id, side.run_id, side.epoch)
    stmt = (select(J.c.sample_index, J.c.criterion, J.c.judge_type, J.c.judge_model,
                   J.c.score, J.c.passed, J.c.threshold)
            .join(latest, and_(J.c.sample_index == latest.c.sample_index,
                               J.c.step == latest.c.step))
            .where(J.c.run_id == side.run_id, J.c.user_id == user_id,
                   J.c.epoch == side.epoch, J.c.status == SCORED))
    people: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    async for row in await conn.stream(stmt):
        if row.judge_type == HUMAN:
            people[(row.criterion, row.sample_index)].append((row.score, row.threshold))
        else:
            side.scores.setdefault((row.criterion, row.judge_type, row.judge_model), {})[
                row.sample_index] = (float(row.score), bool(row.passed))
    for (criterion, sample), marks in people.items():
        score, threshold = np.mean(marks, axis=0)
        side.scores.setdefault((criterion, HUMAN, HUMAN_MODEL), {})[sample] = (
            float(score), bool(score >= threshold))


async def read_sides(conn: AsyncConnection, user_id: str, query: CompareQuery,
                     max_samples: int) -> Sides:
    """Both sides of the comparison, read for `user_id` (NOT_FOUND for another's run)."""
    epoch, baseline_epoch = await resolve_epochs(conn, user_id, query)
    candidate = Side(query.run_id, epoch,
                     await _samples(conn, user_id, query.run_id, epoch, max_samples, "run_id"),
                     {})
    baseline = Side(query.baseline_run_id, baseline_epoch,
                    await _samples(conn, user_id, query.baseline_run_id, baseline_epoch,
                                   max_samples, "baseline_run_id"), {})
    pairs = await _pairs(conn, user_id, candidate, baseline)
    await _scores(conn, user_id, candidate)
    await _scores(conn, user_id, baseline)
    return Sides(candidate, baseline, pairs)


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

