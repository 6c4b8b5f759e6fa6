"""Reads over schema `judge` for the QueryService: a run's judgments in keyset
pages, its per-epoch and per-criterion summary, the judgments of one sample,
and their protobuf messages.

Every statement filters by the caller's user id (and, on PostgreSQL, runs
under row-level security in the caller's transaction). Means and pass rates
count SCORED judgments only; UNSCORED ones are counted apart.
"""

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Row, and_, case, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from epochlens.v1 import judge_pb2, query_pb2
from services.common.convert import utc
from services.judge.models import judgments_table as J
from services.judge.models import run_llm_state_table as S
from services.judge.models import tasks_table as T
from services.judge.store import TaskState

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


async def sample_judgments(conn: AsyncConnection, user_id: str, run_id: uuid.UUID,
                           sample_index: int) -> dict[int, list[Row]]:
    """The judgments of one sample by step, each list ordered by criterion, type, model."""
    stmt = (select(J).where(J.c.run_id == run_id, J.c.user_id == user_id,
                            J.c.sample_index == sample_index)
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
    """Predictions of the run handed to the judge whose task is not done."""
    stmt = (select(func.count()).select_from(T)
            .where(T.c.run_id == run_id, T.c.user_id == user_id, T.c.state != TaskState.DONE))
    return int(await conn.scalar(stmt) or 0)


def add_judgments(target, rows: Sequence[Row]) -> None:
    """Appends one Judgment per row to the repeated field `target`, built in place (no
    message copies; the run id is formatted once per run): the hot loop of ListJudgments."""
    run_ids: dict[uuid.UUID, str] = {}
    for row in rows:
        run_id = run_ids.get(row.run_id) or run_ids.setdefault(row.run_id, str(row.run_id))
        judgment = target.add(
            epoch=row.epoch, criterion=row.criterion, judge_type=row.judge_type,
            judge_model=row.judge_model, score=row.score, passed=bool(row.passed),
            threshold=row.threshold, reasoning=row.reasoning, confidence=row.confidence,
            status=row.status, unscored_reason=row.unscored_reason,
            input_tokens=row.input_tokens, output_tokens=row.output_tokens,
            cost_usd=row.cost_usd, prompt_version=row.prompt_version)
        ref = judgment.prediction
        ref.run_id, ref.step, ref.sample_index = run_id, row.step, row.sample_index
        judgment.create_time.FromDatetime(utc(row.create_time))


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
