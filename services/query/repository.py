"""Reads over schemas `writer` and `judge`, always scoped to one user (and, on PostgreSQL,
under RLS). The judge statements are in services.query.judgments."""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from epochlens.v1 import judge_pb2, query_pb2
from services.common.db import user_transaction
from services.common.errors import NotFound
from services.query import judgments
from services.query.agreement import run_agreements
from services.query.compare import CompareQuery, Sides, read_sides
from services.query.metrics import MetricsQuery, list_metrics, points_after, run_names
from services.query.pairwise import pairwise_summaries
from services.query.watch import WatchCursor, WatchRead
from services.writer.models import epochs_table as E
from services.writer.models import live_run
from services.writer.models import prediction_texts as P
from services.writer.models import runs_table as R

_PREDICTION_COLUMNS = (P.c.run_id, P.c.epoch, P.c.step, P.c.sample_index, P.c.prompt,
                       P.c.ground_truth, P.c.prediction, P.c.generation_time_ms,
                       P.c.prompt_tokens, P.c.completion_tokens, P.c.create_time)


@dataclass(frozen=True)
class RunFilter:
    """ListRuns filters: substrings of name and model (case-insensitive; empty: any), a
    state (0: any) and a kind (0: any)."""

    name_contains: str = ""
    model_contains: str = ""
    state: int = 0
    kind: int = 0


@dataclass(frozen=True)
class PredictionFilter:
    """ListPredictions filters (None / "": any): epoch, sample, and a judgment on a
    criterion (with passed: a scored one that passed, or did not)."""

    epoch: int | None = None
    sample_index: int | None = None
    criterion: str = ""
    passed: bool | None = None


@dataclass(frozen=True)
class SamplePage:
    """A page of CompareSample: the sample's first prediction (its prompt and ground
    truth), the page's predictions in step order, and their judgments by step."""

    first: Row
    rows: Sequence[Row]
    judged: dict[int, list[Row]]


class QueryRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def list_runs(self, user_id: str, filters: RunFilter,
                        after: tuple[datetime, uuid.UUID] | None, limit: int) -> Sequence[Row]:
        """The user's runs that pass `filters`, newest first, after the keyset
        (create_time, id)."""
        stmt = select(R).where(R.c.user_id == user_id, live_run())
        if filters.name_contains:
            stmt = stmt.where(R.c.name.icontains(filters.name_contains, autoescape=True))
        if filters.model_contains:
            stmt = stmt.where(R.c.model_name.icontains(filters.model_contains,
                                                       autoescape=True))
        if filters.state:
            stmt = stmt.where(R.c.state == filters.state)
        if filters.kind:
            stmt = stmt.where(R.c.kind == filters.kind)
        if after is not None:
            stmt = stmt.where(tuple_(R.c.create_time, R.c.id) < tuple_(*after))
        stmt = stmt.order_by(R.c.create_time.desc(), R.c.id.desc()).limit(limit)
        async with user_transaction(self._engine, user_id) as conn:
            return (await conn.execute(stmt)).all()

    async def get_run(self, user_id: str, run_id: uuid.UUID) -> Row:
        async with user_transaction(self._engine, user_id) as conn:
            return await _owned_run(conn, user_id, run_id)

    async def list_predictions(self, user_id: str, run_id: uuid.UUID,
                               filters: PredictionFilter, after: tuple[int, int] | None,
                               limit: int) -> Sequence[Row]:
        """A page of the run's predictions that pass `filters`, in (step, sample_index)
        order."""
        stmt = select(*_PREDICTION_COLUMNS).where(P.c.run_id == run_id, P.c.user_id == user_id)
        if filters.epoch is not None:
            stmt = stmt.where(P.c.epoch == filters.epoch)
        if filters.sample_index is not None:
            stmt = stmt.where(P.c.sample_index == filters.sample_index)
        if filters.criterion:
            stmt = stmt.where(judgments.judged(user_id, filters.criterion, filters.passed,
                                               P.c.run_id, P.c.step, P.c.sample_index))
        if after is not None:
            stmt = stmt.where(tuple_(P.c.step, P.c.sample_index) > tuple_(*after))
        stmt = stmt.order_by(P.c.step, P.c.sample_index).limit(limit)
        async with user_transaction(self._engine, user_id) as conn:
            rows = (await conn.execute(stmt)).all()
            if not rows:
                await _owned_run(conn, user_id, run_id)
            return rows

    async def list_epochs(self, user_id: str, run_id: uuid.UUID, after: int | None,
                          limit: int) -> Sequence[Row]:
        """Per-epoch count, latest step and first/last write time, ascending by epoch."""
        stmt = select(E).where(E.c.run_id == run_id, E.c.user_id == user_id)
        if after is not None:
            stmt = stmt.where(E.c.epoch > after)
        stmt = stmt.order_by(E.c.epoch).limit(limit)
        async with user_transaction(self._engine, user_id) as conn:
            rows = (await conn.execute(stmt)).all()
            if not rows:
                await _owned_run(conn, user_id, run_id)
            return rows

    async def sample_page(self, user_id: str, run_id: uuid.UUID, sample_index: int,
                          after: int | None, limit: int) -> SamplePage:
        """Up to `limit` predictions of one sample in step order after step `after`, its
        first prediction and the judgments of the page's steps; NOT_FOUND when the sample
        has no prediction."""
        stmt = (select(*_PREDICTION_COLUMNS)
                .where(P.c.run_id == run_id, P.c.user_id == user_id,
                       P.c.sample_index == sample_index)
                .order_by(P.c.step))
        page_stmt = stmt if after is None else stmt.where(P.c.step > after)
        async with user_transaction(self._engine, user_id) as conn:
            rows = (await conn.execute(page_stmt.limit(limit))).all()
            first = (rows[0] if rows and after is None
                     else (await conn.execute(stmt.limit(1))).one_or_none())
            if first is None:
                await _owned_run(conn, user_id, run_id)
                raise NotFound(f"run {run_id} has no predictions for sample {sample_index}",
                               {"run_id": str(run_id), "sample_index": str(sample_index)})
            judged = (await judgments.sample_judgments(
                conn, user_id, run_id, sample_index, (rows[0].step, rows[-1].step))
                if rows else {})
            return SamplePage(first, rows, judged)

    async def list_judgments(self, user_id: str, run_id: uuid.UUID,
                             filters: judgments.JudgmentFilter, after: tuple | None,
                             limit: int) -> Sequence[Row]:
        """A page of the run's judgments in judgments.JUDGMENT_ORDER."""
        async with user_transaction(self._engine, user_id) as conn:
            rows = await judgments.judgment_page(conn, user_id, run_id, filters, after, limit)
            if not rows:
                await _owned_run(conn, user_id, run_id)
            return rows

    async def run_summary(self, user_id: str, run_id: uuid.UUID, max_failures: int,
                          agreement_key_chunk: int) -> query_pb2.RunSummary:
        """The run's judge summary (a RunSummary message) with up to max_failures failed
        predictions listed; NOT_FOUND for another's run."""
        async with user_transaction(self._engine, user_id) as conn:
            await _owned_run(conn, user_id, run_id)
            rows = await judgments.summary_rows(conn, user_id, run_id)
            state = await judgments.llm_state(conn, user_id, run_id)
            pending = await judgments.pending_count(conn, user_id, run_id)
            trouble = await judgments.trouble(conn, user_id, run_id, max_failures)
            agreements = await run_agreements(conn, user_id, run_id, agreement_key_chunk)
        summary = judgments.summary_to_proto(run_id, rows, state, pending)
        judgments.add_trouble(summary, trouble)
        summary.agreements.extend(agreements)
        return summary

    async def compare_sides(self, user_id: str, query: CompareQuery,
                            max_samples: int) -> Sides:
        """Both sides of a CompareRuns (services.query.compare), read in one transaction;
        NOT_FOUND when either run is not the caller's."""
        async with user_transaction(self._engine, user_id) as conn:
            return await read_sides(conn, user_id, query, max_samples)

    async def pairwise(self, user_id: str, run_id: uuid.UUID, confidence_level: float,
                       **only: Any) -> list[judge_pb2.PairwiseSummary]:
        """The run's pairwise judging summaries (services.query.pairwise), narrowed by `only`
        (epoch, baseline_run_id, baseline_epoch); the caller checked that the run is the
        user's."""
        async with user_transaction(self._engine, user_id) as conn:
            return await pairwise_summaries(conn, user_id, run_id, confidence_level, **only)

    async def judgment_revisions(self, user_id: str, run_id: uuid.UUID, step: int,
                                 sample_index: int, criterion: str) -> Sequence[Row]:
        """Every revision of the human judgments of one prediction on one criterion;
        NOT_FOUND for another's run."""
        async with user_transaction(self._engine, user_id) as conn:
            await _owned_run(conn, user_id, run_id)
            return await judgments.revisions(conn, user_id, run_id, step, sample_index,
                                             criterion)

    async def watch_read(self, user_id: str, run_id: uuid.UUID, cursor: WatchCursor,
                         limit: int, max_series: int) -> WatchRead:
        """One read of WatchRun: the run (NOT_FOUND for another's), then, in later
        statements (so a finished run's last commits are in them), all its epochs and the
        metric points to send (services.query.watch)."""
        async with user_transaction(self._engine, user_id) as conn:
            run = await _owned_run(conn, user_id, run_id)
            epochs = (await conn.execute(select(E).where(
                E.c.run_id == run_id, E.c.user_id == user_id).order_by(E.c.epoch))).all()
            names = (await run_names(conn, user_id, run_id))[:max_series]
            after = None if cursor.fresh else cursor.metric_steps
            points = await points_after(conn, user_id, run_id, after, names, limit)
        backlog = after is not None and any(len(rows) >= limit for rows in points.values())
        return WatchRead(run, list(epochs), {n: list(r) for n, r in points.items()}, backlog)

    async def list_metrics(self, user_id: str, query: MetricsQuery
                           ) -> query_pb2.ListMetricsResponse:
        """The run's metric series (services.query.metrics); NOT_FOUND for another's run."""
        async with user_transaction(self._engine, user_id) as conn:
            await _owned_run(conn, user_id, query.run_id)
            return await list_metrics(conn, user_id, query)


async def _owned_run(conn: AsyncConnection, user_id: str, run_id: uuid.UUID) -> Row:
    row = (await conn.execute(select(R).where(R.c.id == run_id, R.c.user_id == user_id,
                                             live_run()))
           ).one_or_none()
    if row is None:
        raise NotFound(f"run {run_id} not found", {"run_id": str(run_id)})
    return row
