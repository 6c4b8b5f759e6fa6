"""PurgeRun: removing everything the judge stores for a run, and keeping it removed.

The writer's DeleteRun calls it with a token minted for the run's owner, after marking the
run for deletion (writer.runs.delete_time). Everything runs acting for the owner (row-level
security on PostgreSQL).

1. Record (one short transaction): the run must be the caller's and marked for deletion
   (else NOT_FOUND, or FAILED_PRECONDITION for a live run), or already recorded as purged
   for the caller (a repeat: idempotent). A row in judge.purged_runs is written. On
   PostgreSQL the transaction holds the run's advisory lock exclusively; every worker
   transaction that stores judgments, pairwise results, cache entries or spend of a run
   holds the same lock shared and checks purged_runs after taking it (purged_among), so a
   worker either commits before the record (and its rows are removed below) or sees the
   record and stores nothing. On SQLite the check takes the write lock first (one writer at
   a time), which orders it the same way.
2. Remove, each table in chunks of `purge_chunk_rows` (one short transaction each): the LLM
   cache entries made for the run that no other run of the owner used, judgments, pairwise
   results, human judgment revisions, the run's LLM spend state, pairwise tasks, tasks.
   Tasks go last: the cache step reads their texts.

Cache entries (judge.llm_cache) are per user and keyed by a hash of the judged texts and the
judge's settings, not by run: each row names the prediction it was first made for. A later
run of the same user with a prediction of identical prompt, ground truth and prediction text
hits that same entry. So an entry made for this run is removed unless a task of another run
of the owner has the same three texts; entries made for other runs (even if this run hit
them) and ad hoc entries stay.
"""

import logging
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import Table, delete, exists, false, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from epochlens.v1 import judge_pb2
from services.common.chunked import delete_run_rows
from services.common.db import is_postgres, user_transaction
from services.common.errors import FailedPrecondition, NotFound
from services.judge.config import JudgeSettings
from services.judge.llm.cache import insert_ignoring_duplicates
from services.judge.models import (
    judgment_revisions_table,
    judgments_table,
    llm_cache_table,
    purged_runs_table,
    run_llm_state_table,
    tasks_table,
)
from services.judge.pairwise.models import pairwise_results_table, pairwise_tasks_table
from services.writer.models import runs_table

log = logging.getLogger(__name__)

# The run's advisory lock key on PostgreSQL (a 64-bit hash of its id; a collision only
# makes two runs share a lock).
_LOCK_KEY = "hashtextextended(CAST(:run_id AS text), 0)"
_EXCLUSIVE = text(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
_SHARED = text(f"SELECT pg_advisory_xact_lock_shared({_LOCK_KEY})")

# Per-run judge tables removed after the cache step, in order, with the PurgeRunResponse
# field their rows count in ("": not reported). Tasks last (the cache step reads them).
PURGE_TABLES: tuple[tuple[Table, str], ...] = (
    (judgments_table, "judgment_count"),
    (pairwise_results_table, "judgment_count"),
    (judgment_revisions_table, ""),
    (run_llm_state_table, "spend_record_count"),
    (pairwise_tasks_table, "task_count"),
    (tasks_table, "task_count"),
)


async def purged_among(conn: AsyncConnection, user_id: str,
                       run_ids: Iterable[uuid.UUID | None]) -> set[uuid.UUID]:
    """The runs among `run_ids` that were purged for `user_id`. Call it in the transaction
    that stores rows of those runs, before storing: it first takes each run's advisory lock
    shared (PostgreSQL) or the write lock (SQLite), so a purge cannot slip in between the
    check and the commit."""
    wanted = sorted({run_id for run_id in run_ids if run_id is not None})
    if not wanted:
        return set()
    if is_postgres(conn):
        for run_id in wanted:
            await conn.execute(_SHARED, {"run_id": str(run_id)})
    else:
        p = purged_runs_table
        await conn.execute(update(p).where(false()).values(purge_time=p.c.purge_time))
    p = purged_runs_table.c
    return set(await conn.scalars(select(p.run_id).where(p.run_id.in_(wanted),
                                                         p.user_id == user_id)))


async def deleted_run(engine: AsyncEngine, user_id: str, run_id: uuid.UUID) -> bool:
    """Whether the user's run is marked for deletion or purged: EnqueueJudging acknowledges
    its items and drops them (the writer's outbox must not retry them forever)."""
    r, p = runs_table.c, purged_runs_table.c
    async with user_transaction(engine, user_id) as conn:
        marked = await conn.scalar(select(r.id).where(
            r.id == run_id, r.user_id == user_id, r.delete_time.is_not(None)))
        purged = await conn.scalar(select(p.run_id).where(p.run_id == run_id,
                                                          p.user_id == user_id))
    return marked is not None or purged is not None


class RunPurger:
    """PurgeRun's work; counts holds what it removed."""

    def __init__(self, engine: AsyncEngine, settings: JudgeSettings) -> None:
        self._engine = engine
        self._chunk = settings.purge_chunk_rows
        self._pause_s = settings.purge_chunk_pause_s
        self.counts: Counter[str] = Counter()

    async def purge(self, user_id: str, run_id: uuid.UUID) -> judge_pb2.PurgeRunResponse:
        await self._record(user_id, run_id)
        response = judge_pb2.PurgeRunResponse(cache_entry_count=await self._purge_cache(
            user_id, run_id))
        for table, field in PURGE_TABLES:
            removed = await self._delete_rows(user_id, run_id, table)
            if field:
                setattr(response, field, getattr(response, field) + removed)
        for name in ("task_count", "judgment_count", "cache_entry_count", "spend_record_count"):
            self.counts[name] += getattr(response, name)
        log.info("run %s of %s purged: %d tasks, %d judgments, %d cache entries, %d spend "
                 "records", run_id, user_id, response.task_count, response.judgment_count,
                 response.cache_entry_count, response.spend_record_count)
        return response

    async def _record(self, user_id: str, run_id: uuid.UUID) -> None:
        """Step 1: the ownership check and the purged_runs row."""
        r, p = runs_table.c, purged_runs_table.c
        async with user_transaction(self._engine, user_id) as conn:
            if is_postgres(conn):
                await conn.execute(_EXCLUSIVE, {"run_id": str(run_id)})
            run = (await conn.execute(select(r.delete_time).where(
                r.id == run_id, r.user_id == user_id))).one_or_none()
            purged = await conn.scalar(select(p.run_id).where(p.run_id == run_id,
                                                              p.user_id == user_id))
            if purged is None:
                _check_deleting(run_id, run)
                await conn.execute(insert_ignoring_duplicates(conn, purged_runs_table).values(
                    run_id=run_id, user_id=user_id, purge_time=datetime.now(UTC)))

    async def _delete_rows(self, user_id: str, run_id: uuid.UUID, table: Table) -> int:
        """The run's rows of one table, `purge_chunk_rows` per transaction; how many."""
        return await delete_run_rows(self._engine, table, user_id, run_id, self._chunk,
                                     pause_s=self._pause_s)

    async def _purge_cache(self, user_id: str, run_id: uuid.UUID) -> int:
        """The cache entries made for the run that no other run of the owner used, in
        chunks of entries (key order); how many were removed."""
        c = llm_cache_table.c
        removed, after = 0, ""
        while True:
            async with user_transaction(self._engine, user_id) as conn:
                keys = list(await conn.scalars(
                    select(c.key).where(c.run_id == run_id, c.user_id == user_id, c.key > after)
                    .order_by(c.key).limit(self._chunk)))
                if not keys:
                    return removed
                stmt = delete(llm_cache_table).where(c.key.in_(keys))
                if await _other_runs_judged(conn, user_id, run_id):
                    stmt = stmt.where(~_shared_entry())
                removed += (await conn.execute(stmt)).rowcount
            after = keys[-1]
            if len(keys) < self._chunk:
                return removed


def _check_deleting(run_id: uuid.UUID, run) -> None:
    """NOT_FOUND for a run that is not the caller's; FAILED_PRECONDITION for a live one."""
    if run is None:
        raise NotFound(f"run {run_id} not found", {"run_id": str(run_id)})
    if run.delete_time is None:
        raise FailedPrecondition(
            f"run {run_id} is not being deleted: PurgeRun only removes the judge's rows of a "
            "run that PredictionWriterService.DeleteRun marked", {"run_id": str(run_id)})


async def _other_runs_judged(conn: AsyncConnection, user_id: str, run_id: uuid.UUID) -> bool:
    """Whether the owner has tasks of another run (else no cache entry can be shared)."""
    t = tasks_table.c
    return await conn.scalar(select(exists().where(t.user_id == user_id,
                                                   t.run_id != run_id))) or False


def _shared_entry():
    """A cache entry whose prediction's texts (read from its run's task) are those of a task
    of another run of the same user: that run used (or would use) the same entry."""
    c = llm_cache_table.c
    own, other = tasks_table.alias("own"), tasks_table.alias("other")
    return exists().where(
        own.c.run_id == c.run_id, own.c.step == c.step, own.c.sample_index == c.sample_index,
        other.c.user_id == own.c.user_id, other.c.run_id != own.c.run_id,
        other.c.prompt == own.c.prompt, other.c.prediction == own.c.prediction,
        other.c.ground_truth.is_not_distinct_from(own.c.ground_truth))
