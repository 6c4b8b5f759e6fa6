"""Reads and writes of schema `judge`: the task queue, judgments, human judgments.

Tasks are enqueued, and judgments stored, in transactions acting for the task's user (RLS on
PostgreSQL). Claiming runs as the judge role across users: on PostgreSQL its permissive
`tasks_worker` policy lets it see every user's tasks, and `FOR UPDATE SKIP LOCKED` keeps
concurrent workers apart; on SQLite one UPDATE ... RETURNING statement claims atomically.
"""

import json
import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Row,
    and_,
    bindparam,
    delete,
    exists,
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from epochlens.v1 import judge_pb2
from services.common.db import is_postgres, user_transaction
from services.common.errors import FailedPrecondition, NotFound
from services.judge.models import (
    SCHEMA,
    judgment_revisions_table,
    judgments_table,
    run_llm_state_table,
    tasks_table,
)
from services.judge.purge import purged_among
from services.judge.schema import Item, Verdict

log = logging.getLogger(__name__)

HUMAN_PROMPT_VERSION = "human"
_ERROR_CHARS = 2000


class TaskState(IntEnum):
    """State of a task (judge.tasks.state)."""

    QUEUED = 1
    RUNNING = 2
    DONE = 3
    FAILED = 4


@dataclass(frozen=True)
class Task:
    """A claimed task: the prediction to judge, its run's judge config, attempts so far
    (this one included)."""

    run_id: uuid.UUID
    step: int
    sample_index: int
    user_id: str
    epoch: int
    prompt: str
    ground_truth: str | None
    prediction: str
    config: dict[str, Any]
    attempts: int

    def item(self) -> Item:
        return Item(run_id=self.run_id, step=self.step, sample_index=self.sample_index,
                    epoch=self.epoch, prompt=self.prompt, ground_truth=self.ground_truth,
                    prediction=self.prediction)


@dataclass(frozen=True)
class Outcome:
    """What became of one claimed task: its verdicts (stored whatever the state), and the
    state it goes to. QUEUED waits retry_delay_s (from the settle); QUEUED and FAILED carry
    the error."""

    task: Task
    verdicts: Sequence[Verdict]
    state: TaskState
    error: str | None = None
    retry_delay_s: float = 0.0


def now_utc() -> datetime:
    return datetime.now(UTC)


_TASK_COLUMNS = ("run_id", "step", "sample_index", "user_id", "epoch", "prompt",
                 "ground_truth", "prediction", "config", "attempts")

# One statement per enqueue on PostgreSQL: the items arrive as arrays, are inserted in key
# order (concurrent enqueues of the same identities lock in the same order) skipping
# identities already queued; it returns how many were inserted.
_PG_ENQUEUE = text(f"""
WITH ins AS (
    INSERT INTO {SCHEMA}.tasks (run_id, step, sample_index, user_id, epoch, prompt,
        ground_truth, prediction, config, state, attempts, lease_until, not_before,
        last_error, create_time, update_time)
    SELECT CAST(:run_id AS UUID), s, i, :user_id, e, p, g, o, CAST(:config AS JSONB),
           {TaskState.QUEUED.value}, 0, NULL, :now, NULL, :now, :now
    FROM unnest(CAST(:steps AS BIGINT[]), CAST(:indices AS BIGINT[]),
                CAST(:epochs AS BIGINT[]), CAST(:prompts AS TEXT[]), CAST(:truths AS TEXT[]),
                CAST(:outputs AS TEXT[])) AS u(s, i, e, p, g, o)
    ORDER BY s, i
    ON CONFLICT (run_id, step, sample_index) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM ins
""")

# Judgments of one settle on PostgreSQL, one statement: the rows arrive as one JSON array
# (json.dumps and PostgreSQL's JSON parser are far cheaper than encoding 20 arrays), become
# judge.judgments records, go in in key order, and a judgment already stored (same prediction,
# criterion, judge type and model) is skipped. Returns how many were inserted.
_PG_JUDGMENTS = text(f"""
WITH ins AS (
    INSERT INTO {SCHEMA}.judgments
    SELECT * FROM json_populate_recordset(NULL::{SCHEMA}.judgments, CAST(:rows AS JSON))
    ORDER BY run_id, step, sample_index, criterion, judge_type, judge_model
    ON CONFLICT ON CONSTRAINT pk_judgments DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM ins
""")

_PG_DONE = text(f"""
UPDATE {SCHEMA}.tasks AS t SET state = {TaskState.DONE.value}, lease_until = NULL,
    last_error = NULL, update_time = :now
FROM unnest(CAST(:r AS UUID[]), CAST(:s AS BIGINT[]), CAST(:i AS BIGINT[])) AS u(r, s, i)
WHERE t.run_id = u.r AND t.step = u.s AND t.sample_index = u.i
""")


def _judgment_values(task: Task, verdict: Verdict) -> dict[str, Any]:
    return {"run_id": task.run_id, "step": task.step, "sample_index": task.sample_index,
            "criterion": verdict.criterion, "judge_type": verdict.judge_type,
            "judge_model": verdict.judge_model, "user_id": task.user_id, "epoch": task.epoch,
            "score": verdict.score, "passed": verdict.passed, "threshold": verdict.threshold,
            "reasoning": verdict.reasoning, "confidence": verdict.confidence,
            "status": verdict.status, "unscored_reason": verdict.unscored_reason,
            "input_tokens": verdict.input_tokens, "output_tokens": verdict.output_tokens,
            "cost_usd": verdict.cost_usd, "prompt_version": verdict.prompt_version,
            "revision": 1}


def _task_from_row(row: Row) -> Task:
    values = {name: getattr(row, name) for name in _TASK_COLUMNS}
    return Task(**values)


class JudgeStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @property
    def engine(self) -> AsyncEngine:
        """The judge's engine (schemas judge and writer; services.judge.stored reads the
        latter acting for a user)."""
        return self._engine

    async def enqueue(self, user_id: str, run_id: uuid.UUID, items: Sequence[Item],
                      config: dict[str, Any]) -> tuple[int, int]:
        """Queues the items of one run for `user_id`; identities already queued (or judged)
        are skipped. Returns (enqueued, duplicates)."""
        now = now_utc()
        async with user_transaction(self._engine, user_id) as conn:
            if await purged_among(conn, user_id, [run_id]):
                return 0, len(items)  # deleted meanwhile (PurgeRun): dropped, acknowledged
            if is_postgres(conn):
                inserted = int(await conn.scalar(_PG_ENQUEUE, {
                    "run_id": run_id, "user_id": user_id, "config": json.dumps(config),
                    "now": now, "steps": [i.step for i in items],
                    "indices": [i.sample_index for i in items],
                    "epochs": [i.epoch for i in items], "prompts": [i.prompt for i in items],
                    "truths": [i.ground_truth for i in items],
                    "outputs": [i.prediction for i in items]}))
            else:
                inserted = await self._sqlite_enqueue(conn, user_id, run_id, items, config, now)
        return inserted, len(items) - inserted

    @staticmethod
    async def _sqlite_enqueue(conn: AsyncConnection, user_id: str, run_id: uuid.UUID,
                              items: Sequence[Item], config: dict[str, Any],
                              now: datetime) -> int:
        stmt = (sqlite.insert(tasks_table).on_conflict_do_nothing()
                .returning(tasks_table.c.step))
        rows = [{"run_id": run_id, "step": i.step, "sample_index": i.sample_index,
                 "user_id": user_id, "epoch": i.epoch, "prompt": i.prompt,
                 "ground_truth": i.ground_truth, "prediction": i.prediction, "config": config,
                 "state": TaskState.QUEUED, "attempts": 0, "lease_until": None,
                 "not_before": now, "last_error": None, "create_time": now,
                 "update_time": now} for i in items]
        return len((await conn.execute(stmt, rows)).all())

    async def claim(self, limit: int, lease_s: float) -> list[Task]:
        """Claims up to `limit` tasks: first running ones whose lease passed (their worker
        died), then queued ones that are due. Each becomes running with a new lease and one
        more attempt. No ORDER BY: sorting every due task of a long queue on each claim cost
        more than the judging (queue-table statistics are always stale, so the planner sorts);
        a due task waits only until the workers have caught up with the tasks before it."""
        now = now_utc()
        t = tasks_table
        expired = and_(t.c.state == TaskState.RUNNING, t.c.lease_until < now)
        due = and_(t.c.state == TaskState.QUEUED, t.c.not_before <= now)
        async with self._engine.begin() as conn:
            tasks = await self._claim_where(conn, expired, limit, now, lease_s)
            if len(tasks) < limit:
                tasks += await self._claim_where(conn, due, limit - len(tasks), now, lease_s)
        return tasks

    @staticmethod
    async def _claim_where(conn: AsyncConnection, where, limit: int, now: datetime,
                           lease_s: float) -> list[Task]:
        t = tasks_table
        key = tuple_(t.c.run_id, t.c.step, t.c.sample_index)
        picked = (select(t.c.run_id, t.c.step, t.c.sample_index).where(where).limit(limit)
                  .with_for_update(skip_locked=True))
        stmt = (update(t).where(key.in_(picked))
                .values(state=TaskState.RUNNING, lease_until=now + timedelta(seconds=lease_s),
                        attempts=t.c.attempts + 1, update_time=now)
                .returning(*(t.c[name] for name in _TASK_COLUMNS)))
        return [_task_from_row(row) for row in (await conn.execute(stmt)).all()]

    async def extend_leases(self, tasks: Sequence[Task], lease_s: float) -> int:
        """Renews the lease of tasks this claim still holds (running, same attempt), so a
        batch that takes long (LLM calls) is not claimed again while it is being judged.
        Returns how many leases were renewed."""
        t = tasks_table
        now = now_utc()
        held = tuple_(t.c.run_id, t.c.step, t.c.sample_index, t.c.attempts).in_(
            [(task.run_id, task.step, task.sample_index, task.attempts) for task in tasks])
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(t).where(held, t.c.state == TaskState.RUNNING)
                .values(lease_until=now + timedelta(seconds=lease_s), update_time=now))
        return result.rowcount

    async def settle(self, user_id: str, outcomes: Sequence[Outcome]) -> int:
        """Stores every verdict of the outcomes (all of one user) and moves each task to its
        new state, in one transaction. Returns the judgments newly stored."""
        now = now_utc()
        async with user_transaction(self._engine, user_id) as conn:
            purged = await purged_among(conn, user_id, (o.task.run_id for o in outcomes))
            if purged:  # deleted while being judged: nothing of it is stored
                log.info("%d judged tasks of purged runs of %s dropped",
                         sum(1 for o in outcomes if o.task.run_id in purged), user_id)
                outcomes = [o for o in outcomes if o.task.run_id not in purged]
            rows = [_judgment_values(o.task, v) for o in outcomes for v in o.verdicts]
            stored = await self._insert_judgments(conn, rows, now) if rows else 0
            done = [o.task for o in outcomes if o.state == TaskState.DONE]
            if done:
                await self._mark_done(conn, done, now)
            unfinished = [o for o in outcomes if o.state != TaskState.DONE]
            if unfinished:
                await self._mark_unfinished(conn, unfinished, now)
        return stored

    @staticmethod
    async def _insert_judgments(conn: AsyncConnection, rows: list[dict[str, Any]],
                                now: datetime) -> int:
        if is_postgres(conn):
            stamp = now.isoformat()
            payload = json.dumps([{**row, "run_id": str(row["run_id"]), "create_time": stamp}
                                  for row in rows])
            return int(await conn.scalar(_PG_JUDGMENTS, {"rows": payload}))
        stmt = (sqlite.insert(judgments_table).on_conflict_do_nothing()
                .returning(judgments_table.c.step))
        return len((await conn.execute(stmt, [{**row, "create_time": now}
                                              for row in rows])).all())

    @staticmethod
    async def _mark_done(conn: AsyncConnection, tasks: list[Task], now: datetime) -> None:
        """Done whatever the current state: the task's verdicts are stored."""
        if is_postgres(conn):
            await conn.execute(_PG_DONE, {"now": now, "r": [t.run_id for t in tasks],
                                          "s": [t.step for t in tasks],
                                          "i": [t.sample_index for t in tasks]})
            return
        t = tasks_table
        await conn.execute(
            update(t).where(t.c.run_id == bindparam("r"), t.c.step == bindparam("s"),
                            t.c.sample_index == bindparam("i"))
            .values(state=TaskState.DONE, lease_until=None, last_error=None, update_time=now),
            [{"r": task.run_id, "s": task.step, "i": task.sample_index} for task in tasks])

    @staticmethod
    async def _mark_unfinished(conn: AsyncConnection, outcomes: list[Outcome],
                               now: datetime) -> None:
        """Back to queued (with a retry time) or failed, only while this claim still holds
        the task (running, same attempt): a worker that lost its lease changes nothing."""
        t = tasks_table
        stmt = (update(t).where(
            t.c.run_id == bindparam("r"), t.c.step == bindparam("s"),
            t.c.sample_index == bindparam("i"), t.c.attempts == bindparam("a"),
            t.c.state == TaskState.RUNNING)
            .values(state=bindparam("new_state"), lease_until=None,
                    not_before=bindparam("retry_at"), last_error=bindparam("error"),
                    update_time=now))
        await conn.execute(stmt, [
            {"r": o.task.run_id, "s": o.task.step, "i": o.task.sample_index,
             "a": o.task.attempts, "new_state": int(o.state),
             "retry_at": now + timedelta(seconds=o.retry_delay_s),
             "error": (o.error or "")[:_ERROR_CHARS]} for o in outcomes])

    async def record_human(self, user_id: str, run_id: uuid.UUID, step: int,
                           sample_index: int, verdict: Verdict, max_revisions: int) -> Row:
        """Stores a person's judgment of a prediction handed to the judge for `user_id`: the
        first revision, or a new one when score, threshold or reasoning differ from the latest
        (the same values again return the latest unchanged: a retry). Every revision is kept
        in judgment_revisions; judgments holds the latest, the one that counts. Another
        user's (or an unknown) prediction is NOT_FOUND; a revision past max_revisions is
        FAILED_PRECONDITION."""
        async with user_transaction(self._engine, user_id) as conn:
            # Locks the prediction's task row: one human judgment of it at a time.
            epoch = await _owned_epoch(conn, user_id, run_id, step, sample_index)
            task = Task(run_id, step, sample_index, user_id, epoch, "", None, "", {}, 0)
            current = await _human_row(conn, task, verdict)
            if current is not None and _same_judgment(current, verdict):
                return current
            revision = 1 if current is None else _next_revision(task, current, verdict,
                                                                max_revisions)
            now = now_utc()
            if current is not None:  # judgment rows are never updated: replaced
                await conn.execute(delete(judgments_table).where(*_human_key(task, verdict)))
            await self._insert_judgments(
                conn, [{**_judgment_values(task, verdict), "revision": revision}], now)
            await _add_revision(conn, task, verdict, revision, now)
            return await _human_row(conn, task, verdict)

    async def resume(self, user_id: str, run_id: uuid.UUID, rejudge_unscored: bool,
                     rejudge_failed: bool) -> "Resumed":
        """Clears the run's paused LLM judging; queues again (attempts reset) the failed tasks
        (rejudge_failed) and the finished ones with unscored LLM judgments, which are deleted
        (rejudge_unscored). One transaction for `user_id`, touching only their rows (the
        caller checks that the run is theirs)."""
        async with user_transaction(self._engine, user_id) as conn:
            cleared = await _clear_pause(conn, user_id, run_id)
            requeued = await _requeue(conn, user_id, run_id, rejudge_unscored, rejudge_failed)
            deleted = await _delete_unscored(conn, user_id, run_id) if rejudge_unscored else 0
        return Resumed(cleared or "", deleted, requeued)


@dataclass(frozen=True)
class Resumed:
    """What ResumeJudging did: the paused reason cleared ("" if none), unscored judgments
    deleted, tasks queued again."""

    cleared_paused_reason: str
    deleted_unscored: int
    requeued: int


async def _owned_epoch(conn: AsyncConnection, user_id: str, run_id: uuid.UUID, step: int,
                       sample_index: int) -> int:
    """The epoch of a prediction handed to the judge for `user_id`, else NOT_FOUND."""
    t = tasks_table
    epoch = await conn.scalar(select(t.c.epoch).where(
        t.c.run_id == run_id, t.c.step == step, t.c.sample_index == sample_index,
        t.c.user_id == user_id).with_for_update())
    if epoch is None:
        raise NotFound(f"prediction {run_id}/{step}/{sample_index} not found",
                       {"run_id": str(run_id), "step": str(step),
                        "sample_index": str(sample_index)})
    return epoch


def _human_key(task: Task, verdict: Verdict) -> tuple[ColumnElement[bool], ...]:
    """The judgment of the task's prediction on the verdict's criterion by its author."""
    j = judgments_table
    return (j.c.run_id == task.run_id, j.c.step == task.step,
            j.c.sample_index == task.sample_index, j.c.criterion == verdict.criterion,
            j.c.judge_type == verdict.judge_type, j.c.judge_model == verdict.judge_model)


async def _human_row(conn: AsyncConnection, task: Task, verdict: Verdict) -> Row | None:
    return (await conn.execute(select(judgments_table).where(*_human_key(task, verdict)))
            ).one_or_none()


async def _add_revision(conn: AsyncConnection, task: Task, verdict: Verdict, revision: int,
                        now: datetime) -> None:
    await conn.execute(insert(judgment_revisions_table).values(
        run_id=task.run_id, step=task.step, sample_index=task.sample_index,
        criterion=verdict.criterion, author=verdict.judge_model, revision=revision,
        user_id=task.user_id, epoch=task.epoch, score=verdict.score,
        threshold=verdict.threshold, passed=verdict.passed, reasoning=verdict.reasoning,
        create_time=now))


def _next_revision(task: Task, current: Row, verdict: Verdict, max_revisions: int) -> int:
    """The revision number after `current`; FAILED_PRECONDITION past max_revisions."""
    if current.revision >= max_revisions:
        where = f"{task.run_id}/{task.step}/{task.sample_index}"
        raise FailedPrecondition(
            f"{verdict.judge_model}'s judgment of {where} on {verdict.criterion!r} already has "
            f"{current.revision} revisions, the most allowed", {"criterion": verdict.criterion})
    return current.revision + 1


async def _clear_pause(conn: AsyncConnection, user_id: str, run_id: uuid.UUID) -> str | None:
    """Clears the run's paused LLM judging; returns why it was paused (None if it was not)."""
    s = run_llm_state_table
    own = (s.c.run_id == run_id, s.c.user_id == user_id)
    reason = await conn.scalar(select(s.c.paused_reason).where(*own).with_for_update())
    if reason:
        await conn.execute(update(s).where(*own).values(paused_reason=None,
                                                        update_time=now_utc()))
    return reason


def _unscored_llm(run_id: uuid.UUID, user_id: str) -> tuple[ColumnElement[bool], ...]:
    j = judgments_table
    return (j.c.run_id == run_id, j.c.user_id == user_id,
            j.c.judge_type == judge_pb2.JUDGE_TYPE_LLM,
            j.c.status == judge_pb2.JUDGMENT_STATUS_UNSCORED)


async def _requeue(conn: AsyncConnection, user_id: str, run_id: uuid.UUID, unscored: bool,
                   failed: bool) -> int:
    """Queues again, attempts reset, the run's failed tasks (failed) and its finished tasks
    with an unscored LLM judgment (unscored). Returns how many."""
    t, j = tasks_table, judgments_table
    which = []
    if failed:
        which.append(t.c.state == TaskState.FAILED)
    if unscored:
        which.append(exists().where(j.c.step == t.c.step, j.c.sample_index == t.c.sample_index,
                                    *_unscored_llm(run_id, user_id)))
    if not which:
        return 0
    now = now_utc()
    result = await conn.execute(update(t).where(
        t.c.run_id == run_id, t.c.user_id == user_id,
        t.c.state.in_([TaskState.DONE, TaskState.FAILED]), or_(*which)).values(
        state=TaskState.QUEUED, attempts=0, lease_until=None, not_before=now, update_time=now))
    return result.rowcount


async def _delete_unscored(conn: AsyncConnection, user_id: str, run_id: uuid.UUID) -> int:
    result = await conn.execute(delete(judgments_table).where(*_unscored_llm(run_id, user_id)))
    return result.rowcount


def _same_judgment(row: Row, verdict: Verdict) -> bool:
    return (math.isclose(row.score, verdict.score) and math.isclose(row.threshold,
                                                                    verdict.threshold)
            and row.reasoning == verdict.reasoning)


def human_verdict(user_id: str, criterion: str, score: float, threshold: float,
                  reasoning: str) -> Verdict:
    return Verdict(criterion=criterion, judge_type=judge_pb2.JUDGE_TYPE_HUMAN,
                   judge_model=user_id, score=score, passed=score >= threshold,
                   threshold=threshold, reasoning=reasoning,
                   status=judge_pb2.JUDGMENT_STATUS_SCORED, prompt_version=HUMAN_PROMPT_VERSION)
