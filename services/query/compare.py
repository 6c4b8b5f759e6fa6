"""CompareRuns: a run's epoch (the candidate) against a baseline epoch of the same run or of
another of the caller's runs, on the samples both have.

Reading (one transaction, every statement filtered by the caller): both runs owned (else
NOT_FOUND), the epochs resolved (services.query.compare_epochs), each side's samples at the
latest step of its epoch, matched by sample_index within one run and by (prompt, ground
truth) across runs, and each side's scored judgments of those predictions. Human judgments
count as one judge "human": several people's latest revisions are averaged per sample (score
and threshold; the verdict is mean score >= mean threshold).

Computing the response from the two sides: services.query.compare_result.
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
from services.writer.models import prediction_texts as P

HUMAN = judge_pb2.JUDGE_TYPE_HUMAN
HUMAN_MODEL = "human"
SCORED = judge_pb2.JUDGMENT_STATUS_SCORED

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
