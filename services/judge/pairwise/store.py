"""Reads and writes of pairwise judging: the queue (judge.pairwise_tasks), the results
(judge.pairwise_results) and the two texts of a pair (the writer's predictions, read acting
for the task's user).

Claiming runs as the judge role across users (SKIP LOCKED and a lease per task, as
services.judge.store claims judge.tasks); enqueue and settle run in the user's transaction.
A result is inserted with ON CONFLICT DO NOTHING on its primary key, so a pair is stored once
whatever happens to its task (a worker killed after the calls, a claim after a lease passed).
Order 1's charged answer is kept on its task (keep_first) until the result is stored, so a
later claim of the task pays only order 2.
"""

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, and_, bindparam, delete, func, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.common.db import is_postgres, user_transaction
from services.judge.pairwise.config import PairwiseConfig
from services.judge.pairwise.models import Outcome
from services.judge.pairwise.models import pairwise_results_table as R
from services.judge.pairwise.models import pairwise_tasks_table as T
from services.judge.purge import purged_among
from services.judge.schema import Item
from services.judge.store import TaskState, now_utc
from services.writer.models import prediction_texts as P

SAMPLE_SPACE = 2**64
ERROR_CHARS = 2000
_COLUMNS = ("run_id", "step", "sample_index", "user_id", "epoch", "baseline_run_id",
            "baseline_epoch", "config", "attempts")
_FIRST = ("order1_answer", "order1_reason", "order1_input_tokens", "order1_output_tokens",
          "order1_cost_usd", "order1_baseline_step", "order1_baseline_sample_index")


@dataclass(frozen=True)
class FirstAnswer:
    """Order 1's usable answer, kept on its task once charged, and the baseline prediction
    (step, sample index) it was asked against."""

    preferred: str
    reason: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    baseline_step: int
    baseline_sample_index: int


@dataclass(frozen=True)
class PairTask:
    """A claimed pairwise task (attempts: this one included)."""

    run_id: uuid.UUID
    step: int
    sample_index: int
    user_id: str
    epoch: int
    baseline_run_id: uuid.UUID
    baseline_epoch: int | None
    config: dict[str, Any]
    attempts: int
    first: FirstAnswer | None = None  # order 1's answer kept by an earlier attempt

    @property
    def where(self) -> str:
        return f"{self.run_id}/{self.step}/{self.sample_index}"


@dataclass(frozen=True)
class Settled:
    """What becomes of a claimed task: a result row to store (task done), or back to the
    queue after delay_s / failed, with the error."""

    task: PairTask
    result: dict[str, Any] | None
    state: TaskState
    error: str | None = None
    delay_s: float = 0.0


@dataclass(frozen=True)
class Text:
    """A stored prediction as a side of a pair."""

    step: int
    sample_index: int
    epoch: int
    prompt: str
    ground_truth: str | None
    prediction: str


def insert_ignoring_duplicates(conn: AsyncConnection, table: Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING on PostgreSQL and SQLite."""
    return (postgresql if is_postgres(conn) else sqlite).insert(table).on_conflict_do_nothing()


def is_sampled(run_id: uuid.UUID, sample_index: int, sample_rate: float) -> bool:
    """sha256 of "run_id:sample_index" mapped to [0, 1) < rate: a sample is picked at every
    epoch or never (the LLM judges' rule)."""
    if sample_rate >= 1.0:
        return True
    digest = hashlib.sha256(f"{run_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / SAMPLE_SPACE < sample_rate


async def lowest_epoch(conn: AsyncConnection, user_id: str, run_id: uuid.UUID) -> int | None:
    return await conn.scalar(select(func.min(P.c.epoch)).where(
        P.c.run_id == run_id, P.c.user_id == user_id))


async def enqueue(engine: AsyncEngine, user_id: str, run_id: uuid.UUID, items: Sequence[Item],
                  config: dict[str, Any], pairwise: PairwiseConfig) -> int:
    """Queues a pairwise task for each sampled candidate among `items` (same run: every
    epoch but the baseline one, which defaults to the run's lowest stored or enqueued epoch;
    a baseline run: every item); a candidate already queued is skipped. Returns how many were
    queued."""
    sampled = [i for i in items if is_sampled(run_id, i.sample_index, pairwise.sample_rate)]
    if not sampled:
        return 0
    now = now_utc()
    async with user_transaction(engine, user_id) as conn:
        if await purged_among(conn, user_id, [run_id]):
            return 0  # deleted meanwhile (PurgeRun): nothing is queued again
        baseline_run, baseline_epoch = pairwise.baseline_run_id, pairwise.baseline_epoch
        if baseline_run is None:
            baseline_run = run_id
            if baseline_epoch is None:
                stored = await lowest_epoch(conn, user_id, run_id)
                baseline_epoch = min([i.epoch for i in sampled]
                                     + ([] if stored is None else [stored]))
            sampled = [i for i in sampled if i.epoch != baseline_epoch]
        rows = [{"run_id": run_id, "step": i.step, "sample_index": i.sample_index,
                 "user_id": user_id, "epoch": i.epoch, "baseline_run_id": baseline_run,
                 "baseline_epoch": baseline_epoch, "config": config,
                 "state": TaskState.QUEUED, "attempts": 0, "lease_until": None,
                 "not_before": now, "last_error": None, "create_time": now,
                 "update_time": now} for i in sorted(sampled, key=lambda i: (i.step,
                                                                            i.sample_index))]
        if not rows:
            return 0
        stmt = insert_ignoring_duplicates(conn, T).returning(T.c.step)
        return len((await conn.execute(stmt, rows)).all())


async def claim(engine: AsyncEngine, limit: int, lease_s: float) -> list[PairTask]:
    """Up to `limit` tasks: running ones whose lease passed, then queued ones that are due;
    each becomes running with a new lease and one more attempt."""
    now = now_utc()
    expired = and_(T.c.state == TaskState.RUNNING, T.c.lease_until < now)
    due = and_(T.c.state == TaskState.QUEUED, T.c.not_before <= now)
    async with engine.begin() as conn:
        tasks = await _claim_where(conn, expired, limit, now, lease_s)
        if len(tasks) < limit:
            tasks += await _claim_where(conn, due, limit - len(tasks), now, lease_s)
    return tasks


async def _claim_where(conn: AsyncConnection, where: Any, limit: int, now: datetime,
                       lease_s: float) -> list[PairTask]:
    key = tuple_(T.c.run_id, T.c.step, T.c.sample_index)
    picked = (select(T.c.run_id, T.c.step, T.c.sample_index).where(where).limit(limit)
              .with_for_update(skip_locked=True))
    stmt = (update(T).where(key.in_(picked))
            .values(state=TaskState.RUNNING, lease_until=now + timedelta(seconds=lease_s),
                    attempts=T.c.attempts + 1, update_time=now)
            .returning(*(T.c[name] for name in _COLUMNS + _FIRST)))
    return [PairTask(**{name: getattr(row, name) for name in _COLUMNS},
                     first=_first(row)) for row in (await conn.execute(stmt)).all()]


def _first(row: Any) -> FirstAnswer | None:
    if row.order1_answer is None:
        return None
    return FirstAnswer(*(getattr(row, name) for name in _FIRST))


async def keep_first(engine: AsyncEngine, task: PairTask, first: FirstAnswer) -> bool:
    """Keeps order 1's charged answer on the task while this claim holds it (running, same
    attempt); whether it was written."""
    async with user_transaction(engine, task.user_id) as conn:
        result = await conn.execute(update(T).where(
            T.c.run_id == task.run_id, T.c.step == task.step,
            T.c.sample_index == task.sample_index, T.c.attempts == task.attempts,
            T.c.state == TaskState.RUNNING).values(
            **dict(zip(_FIRST, astuple(first), strict=True)), update_time=now_utc()))
    return result.rowcount == 1


async def extend_leases(engine: AsyncEngine, tasks: Sequence[PairTask], lease_s: float) -> int:
    """Renews the leases this claim still holds (running, same attempt); how many."""
    now = now_utc()
    held = tuple_(T.c.run_id, T.c.step, T.c.sample_index, T.c.attempts).in_(
        [(t.run_id, t.step, t.sample_index, t.attempts) for t in tasks])
    async with engine.begin() as conn:
        result = await conn.execute(
            update(T).where(held, T.c.state == TaskState.RUNNING)
            .values(lease_until=now + timedelta(seconds=lease_s), update_time=now))
    return result.rowcount


async def settle(engine: AsyncEngine, user_id: str, settled: Sequence[Settled]) -> int:
    """Stores the results of one user's tasks and moves each task to its new state, in one
    transaction (only while this claim holds the task: running, same attempt); a task done
    drops order 1's kept answer. Returns the results newly stored."""
    now = now_utc()
    async with user_transaction(engine, user_id) as conn:
        purged = await purged_among(conn, user_id, (s.task.run_id for s in settled))
        settled = [s for s in settled if s.task.run_id not in purged]  # deleted meanwhile
        rows = [{**s.result, "create_time": now} for s in settled if s.result is not None]
        stored = 0
        if rows:
            stmt = insert_ignoring_duplicates(conn, R).returning(R.c.step)
            stored = len((await conn.execute(stmt, rows)).all())
        await conn.execute(update(T).where(
            T.c.run_id == bindparam("r"), T.c.step == bindparam("s"),
            T.c.sample_index == bindparam("i"), T.c.attempts == bindparam("a"),
            T.c.state == TaskState.RUNNING).values(
            state=bindparam("new_state"), lease_until=None, not_before=bindparam("retry_at"),
            last_error=bindparam("error"), update_time=now), [
            {"r": s.task.run_id, "s": s.task.step, "i": s.task.sample_index,
             "a": s.task.attempts, "new_state": int(s.state),
             "retry_at": now + timedelta(seconds=s.delay_s),
             "error": None if s.error is None else s.error[:ERROR_CHARS]} for s in settled])
        done = [(s.task.run_id, s.task.step, s.task.sample_index, s.task.attempts)
                for s in settled if s.state == TaskState.DONE]
        if done:  # the pair's result is stored: order 1's kept answer is of no more use
            await conn.execute(update(T).where(
                tuple_(T.c.run_id, T.c.step, T.c.sample_index, T.c.attempts).in_(done),
                T.c.state == TaskState.DONE, T.c.order1_answer.is_not(None)).values(
                **dict.fromkeys(_FIRST)))
    return stored


async def candidate(conn: AsyncConnection, task: PairTask) -> Text | None:
    """The stored candidate prediction of a task."""
    row = (await conn.execute(select(*_TEXT).where(
        P.c.run_id == task.run_id, P.c.user_id == task.user_id, P.c.step == task.step,
        P.c.sample_index == task.sample_index))).one_or_none()
    return None if row is None else Text(*row)


_TEXT = (P.c.step, P.c.sample_index, P.c.epoch, P.c.prompt, P.c.ground_truth, P.c.prediction)


async def baseline(conn: AsyncConnection, task: PairTask, epoch: int,
                   of: Text) -> Text | None:
    """The baseline of candidate `of`: the same sample at `epoch` of the same run, or the
    baseline run's prediction at `epoch` with the same prompt and reference (the latest
    step of the epoch; the lowest sample index among equals)."""
    where = [P.c.run_id == task.baseline_run_id, P.c.user_id == task.user_id,
             P.c.epoch == epoch]
    if task.baseline_run_id == task.run_id:
        where.append(P.c.sample_index == task.sample_index)
    else:
        where.append(P.c.prompt == of.prompt)
        where.append(P.c.ground_truth.is_(None) if of.ground_truth is None
                     else P.c.ground_truth == of.ground_truth)
    row = (await conn.execute(select(*_TEXT).where(*where)
                              .order_by(P.c.step.desc(), P.c.sample_index).limit(1))
           ).one_or_none()
    return None if row is None else Text(*row)


async def last_epoch(conn: AsyncConnection, user_id: str, run_id: uuid.UUID) -> int | None:
    return await conn.scalar(select(func.max(P.c.epoch)).where(
        P.c.run_id == run_id, P.c.user_id == user_id))


async def resume(engine: AsyncEngine, user_id: str, run_id: uuid.UUID, unscored: bool,
                 failed: bool) -> tuple[int, int]:
    """ResumeJudging for pairwise judging, in one transaction for `user_id`: queues again
    (attempts reset) the run's failed tasks (failed) and those whose result is unscored
    (unscored; the results are deleted). Returns (results deleted, tasks queued again)."""
    which = []
    if failed:
        which.append(T.c.state == TaskState.FAILED)
    if unscored:
        which.append(tuple_(T.c.step, T.c.sample_index).in_(
            select(R.c.step, R.c.sample_index).where(*_unscored(user_id, run_id))))
    if not which:
        return 0, 0
    now = now_utc()
    async with user_transaction(engine, user_id) as conn:
        requeued = (await conn.execute(update(T).where(
            T.c.run_id == run_id, T.c.user_id == user_id,
            T.c.state.in_([TaskState.DONE, TaskState.FAILED]), or_(*which)).values(
            state=TaskState.QUEUED, attempts=0, lease_until=None, not_before=now,
            last_error=None, update_time=now))).rowcount
        deleted = 0
        if unscored:
            deleted = (await conn.execute(delete(R).where(*_unscored(user_id, run_id)))).rowcount
    return deleted, requeued


def _unscored(user_id: str, run_id: uuid.UUID) -> tuple[Any, ...]:
    return (R.c.run_id == run_id, R.c.user_id == user_id,
            R.c.outcome == int(Outcome.UNSCORED))
