"""Reads over schema `judge` for the QueryService: a run's judgments in keyset
pages, its per-epoch and per-criterion summary (with what keeps predictions from
being judged: failed tasks, and the writer's hand-off when it waits, from its
outbox), the judgments of one sample, the revisions of human judgments, and their
protobuf messages.

Every statement filters by the caller's user id (and, on PostgreSQL, runs
under row-level security in the caller's transaction). Means and pass rates
count SCORED judgments only; UNSCORED ones are counted apart.
"""

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Row, and_, case, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from epochlens.v1 import judge_pb2, query_pb2
from services.common.convert import utc
from services.judge.models import judgment_revisions_table as V
from services.judge.models import judgments_table as J
from services.judge.models import run_llm_state_table as S
from services.judge.models import tasks_table as T
from services.judge.store import TaskState
from services.writer.models import judge_outbox_table as O

SCORED = judge_pb2.JUDGMENT_STATUS_SCORED
# ListJudgments order: the prediction's identity, then the judgment's own key.
JUDGMENT_ORDER = (J.c.step, J.c.sample_index, J.c.criterion, J.c.judge_type, J.c.judge_model)
_GROUP = (J.c.epoch, J.c.criterion, J.c.judge_type, J.c.judge_model)


@dataclass(frozen=True)
class JudgmentFilter:
    """ListJudgments filters: epoch (None: all), criterion ("": all), judge_type (0: all)."""

    epoch: int | None
    criterion: str
    judge_type: int


async def judgment_page(conn: AsyncConnection, user_id: str, run_id: uuid.UUID,
                        filters: JudgmentFilter, after: tuple | None,
                        limit: int) -> Sequence[Row]:
    """Up to `limit` judgments of the run after the keyset `after`, in JUDGMENT_ORDER."""
    stmt = select(J).where(J.c.run_id == run_id, J.c.user_id == user_id)
    if filters.epoch is not None:
        stmt = stmt.where(J.c.epoch == filters.epoch)
    if filters.criterion:
        stmt = stmt.where(J.c.criterion == filters.criterion)
    if filters.judge_type:
        stmt = stmt.where(J.c.judge_type == filters.judge_type)
    if after is not None:
        stmt = stmt.where(tuple_(*JUDGMENT_ORDER) > tuple_(*after))
    return (await conn.execute(stmt.order_by(*JUDGMENT_ORDER).limit(limit))).all()


def judged(user_id: str, criterion: str, passed: bool | None, run_id, step, sample_index):
    """EXISTS: the prediction (run_id, step, sample_index columns of the outer query) has a
    judgment on `criterion` (any judge type); with `passed`, a scored one with that verdict."""
    stmt = select(J.c.step).where(J.c.run_id == run_id, J.c.user_id == user_id,
                                  J.c.step == step, J.c.sample_index == sample_index,
                                  J.c.criterion == criterion)
    if passed is not None:
        stmt = stmt.where(J.c.status == SCORED, J.c.passed == passed)
    return stmt.exists()


async def sample_judgments(conn: AsyncConnection, user_id: str, run_id: uuid.UUID,
                           sample_index: int, steps: tuple[int, int]) -> dict[int, list[Row]]:
    """The judgments of one sample at steps steps[0]..steps[1] (one CompareSample page) by
    step, each list ordered by criterion, type, model."""
    stmt = (select(J).where(J.c.run_id == run_id, J.c.user_id == user_id,
                            J.c.sample_index == sample_index, J.c.step.between(*steps))
            .order_by(J.c.step, J.c.criterion, J.c.judge_type, J.c.judge_model))
    by_step: dict[int, list[Row]] = defaultdict(list)
    for row in (await conn.execute(stmt)).all():
        by_step[row.step].append(row)
    return by_step


async def summary_rows(conn: AsyncConnection, user_id: str, run_id: uuid.UUID) -> Sequence[Row]:
    """Per (epoch, criterion, judge_type, judge_model): mean score and passes over scored
    judgments, scored and total counts, tokens and cost."""
    scored = J.c.status == SCORED
    stmt = (select(*_GROUP,
                   func.avg(case((scored, J.c.score))).label("mean_score"),
                   func.sum(case((and_(scored, J.c.passed), 1), else_=0)).label("passed_count"),
                   func.sum(case((scored, 1), else_=0)).label("scored_count"),
                   func.count().label("total_count"),
                   func.sum(J.c.input_tokens).label("input_tokens"),
                   func.sum(J.c.output_tokens).label("output_tokens"),
                   func.sum(J.c.cost_usd).label("cost_usd"))
            .where(J.c.run_id == run_id, J.c.user_id == user_id)
            .group_by(*_GROUP).order_by(*_GROUP))
    return (await conn.execute(stmt)).all()


async def llm_state(conn: AsyncConnection, user_id: str, run_id: uuid.UUID) -> Row | None:
    """The run's LLM budget and status, or None before its first LLM task."""
    stmt = select(S).where(S.c.run_id == run_id, S.c.user_id == user_id)
    return (await conn.execute(stmt)).one_or_none()


async def pending_count(conn: AsyncConnection, user_id: str, run_id: uuid.UUID) -> int:
    """Predictions of the run handed to the judge and still queued or being judged."""
    stmt = (select(func.count()).select_from(T)
            .where(T.c.run_id == run_id, T.c.user_id == user_id,
                   T.c.state.in_([TaskState.QUEUED, TaskState.RUNNING])))
    return int(await conn.scalar(stmt) or 0)


@dataclass(frozen=True)
class Trouble:
    """What keeps a run's predictions from being judged: failed tasks (how many, and the
    first `limit` of them) and the writer's hand-off that waits (how many, the last error
    and the next try)."""

    failed_count: int
    failed: Sequence[Row]
    handoff_waiting: int
    handoff_error: str
    handoff_retry_time: datetime | None


async def trouble(conn: AsyncConnection, user_id: str, run_id: uuid.UUID,
                  limit: int) -> Trouble:
    own = (T.c.run_id == run_id, T.c.user_id == user_id, T.c.state == TaskState.FAILED)
    failed_count = int(await conn.scalar(select(func.count()).select_from(T).where(*own)) or 0)
    failed = (await conn.execute(
        select(T.c.epoch, T.c.step, T.c.sample_index, T.c.attempts, T.c.last_error,
               T.c.update_time).where(*own).order_by(T.c.step, T.c.sample_index).limit(limit)
    )).all() if failed_count and limit else []
    mine = (O.c.run_id == run_id, O.c.user_id == user_id)
    # The error first: a row parked after it was read is still counted below (read committed
    # gives each statement its own snapshot), so an error is never shown without a retry time.
    error = await conn.scalar(select(O.c.last_error).where(*mine, O.c.last_error.is_not(None))
                              .order_by(O.c.attempts.desc()).limit(1))
    waiting = (await conn.execute(
        select(func.count(), func.min(O.c.next_attempt_time).filter(O.c.last_error.is_not(None)))
        .where(*mine))).one()
    return Trouble(failed_count, failed, int(waiting[0]), error or "",
                   waiting[1] if error else None)


def add_trouble(summary: query_pb2.RunSummary, found: Trouble) -> None:
    """Puts the failed predictions and the waiting hand-off into the RunSummary."""
    summary.failed_predictions = found.failed_count
    for row in found.failed:
        failure = summary.failures.add(epoch=row.epoch, step=row.step,
                                       sample_index=row.sample_index, attempts=row.attempts,
                                       reason=row.last_error or "")
        failure.update_time.FromDatetime(utc(row.update_time))
    summary.handoff_waiting = found.handoff_waiting
    summary.handoff_error = found.handoff_error
    if found.handoff_retry_time is not None:
        summary.handoff_retry_time.FromDatetime(utc(found.handoff_retry_time))


async def revisions(conn: AsyncConnection, user_id: str, run_id: uuid.UUID, step: int,
                    sample_index: int, criterion: str) -> Sequence[Row]:
    """Every revision of the human judgments of one prediction on one criterion, by author
    and revision."""
    stmt = (select(V).where(V.c.run_id == run_id, V.c.user_id == user_id, V.c.step == step,
                            V.c.sample_index == sample_index, V.c.criterion == criterion)
            .order_by(V.c.author, V.c.revision))
    return (await conn.execute(stmt)).all()


def revision_to_proto(row: Row) -> query_pb2.JudgmentRevision:
    revision = query_pb2.JudgmentRevision(
        revision=row.revision, author=row.author, score=row.score, threshold=row.threshold,
        passed=bool(row.passed), reasoning=row.reasoning)
    revision.create_time.FromDatetime(utc(row.create_time))
    return revision


def add_judgments(target, rows: Sequence[Row]) -> None:
    """Appends one Judgment per row to the repeated field `target` (the run id is formatted
    once per run)."""
    run_ids: dict[uuid.UUID, str] = {}
    for row in rows:
        add_judgment(target, row, run_ids.get(row.run_id)
                     or run_ids.setdefault(row.run_id, str(row.run_id)))


def add_judgment(target, row: Row, run_id: str) -> judge_pb2.Judgment:
    """Appends the Judgment of `row` (of run `run_id`, formatted by the caller) to the
    repeated field `target`, built in place with no message copy (the hot loop of
    ListJudgments), and returns it."""
    judgment = target.add(
        epoch=row.epoch, criterion=row.criterion, judge_type=row.judge_type,
        judge_model=row.judge_model, score=row.score, passed=bool(row.passed),
        threshold=row.threshold, reasoning=row.reasoning, confidence=row.confidence,
        status=row.status, unscored_reason=row.unscored_reason,
        input_tokens=row.input_tokens, output_tokens=row.output_tokens,
        cost_usd=row.cost_usd, prompt_version=row.prompt_version, revision=row.revision)
    ref = judgment.prediction
    ref.run_id, ref.step, ref.sample_index = run_id, row.step, row.sample_index
    judgment.create_time.FromDatetime(utc(row.create_time))
    return judgment


def _summary_row(row) -> query_pb2.CriterionEpochSummary:
    scored = int(row.scored_count or 0)
    return query_pb2.CriterionEpochSummary(
        epoch=row.epoch, criterion=row.criterion, judge_type=row.judge_type,
        judge_model=row.judge_model, mean_score=float(row.mean_score or 0.0),
        pass_rate=int(row.passed_count or 0) / scored if scored else 0.0,
        scored_count=scored, unscored_count=int(row.total_count) - scored,
        input_tokens=int(row.input_tokens or 0), output_tokens=int(row.output_tokens or 0),
        cost_usd=float(row.cost_usd or 0.0))


def summary_to_proto(run_id: uuid.UUID, rows: Sequence[Row], state: Row | None,
                     pending: int) -> query_pb2.RunSummary:
    """The RunSummary: total cost is the sum of the judgments' costs."""
    summary = query_pb2.RunSummary(run_id=str(run_id), rows=[_summary_row(r) for r in rows],
                                   pending_predictions=pending)
    summary.total_cost_usd = sum(r.cost_usd for r in summary.rows)
    if state is not None:
        summary.budget_usd = state.budget_usd
        summary.budget_exhausted = bool(state.budget_exhausted)
        summary.llm_paused_reason = state.paused_reason or ""
    return summary
