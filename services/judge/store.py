"""Reads and writes of schema `judge`: the task queue, judgments, human judgments.

Tasks are enqueued, and judgments stored, in transactions acting for the task's user (RLS on
PostgreSQL). Claiming runs as the judge role across users: on PostgreSQL its permissive
`tasks_worker` policy lets it see every user's tasks, and `FOR UPDATE SKIP LOCKED` keeps
concurrent workers apart; on SQLite one UPDATE ... RETURNING statement claims atomically.
"""

import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Any

from google.rpc import code_pb2
from sqlalchemy import Row, and_, bindparam, select, text, tuple_, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from epochlens.v1 import judge_pb2
from services.common.db import is_postgres, user_transaction
from services.common.errors import DomainError, NotFound
from services.judge.models import SCHEMA, judgments_table, tasks_table
from services.judge.schema import Item, Verdict

HUMAN_PROMPT_VERSION = "human"
_ERROR_CHARS = 2000


class TaskState(IntEnum):
    """State of a task (judge.tasks.state)."""

    QUEUED = 1
    RUNNING = 2
    DONE = 3
    FAILED = 4


class AlreadyExists(DomainError):
    code = code_pb2.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


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
            "cost_usd": verdict.cost_usd, "prompt_version": verdict.prompt_version}


def _task_from_row(row: Row) -> Task:
    values = {name: getattr(row, name) for name in _TASK_COLUMNS}
    return Task(**values)


class JudgeStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def enqueue(self, user_id: str, run_id: uuid.UUID, items: Sequence[Item],
                      config: dict[str, Any]) -> tuple[int, int]:
        """Queues the items of one run for `user_id`; identities already queued (or judged)
        are skipped. Returns (enqueued, duplicates)."""
        now = now_utc()
        async with user_transaction(self._engine, user_id) as conn:
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
                           sample_index: int, verdict: Verdict) -> Row:
        """Stores a person's judgment of a prediction handed to the judge for `user_id`.
        A retry of the same judgment returns the stored row; a different one for the same
        prediction and criterion is ALREADY_EXISTS (judgments are immutable)."""
        t, j = tasks_table, judgments_table
        async with user_transaction(self._engine, user_id) as conn:
            epoch = await conn.scalar(select(t.c.epoch).where(
                t.c.run_id == run_id, t.c.step == step, t.c.sample_index == sample_index,
                t.c.user_id == user_id))
            if epoch is None:
                raise NotFound(f"prediction {run_id}/{step}/{sample_index} not found",
                               {"run_id": str(run_id), "step": str(step),
                                "sample_index": str(sample_index)})
            task = Task(run_id, step, sample_index, user_id, epoch, "", None, "", {}, 0)
            await self._insert_judgments(conn, [_judgment_values(task, verdict)], now_utc())
            stored = (await conn.execute(select(j).where(
                j.c.run_id == run_id, j.c.step == step, j.c.sample_index == sample_index,
                j.c.criterion == verdict.criterion, j.c.judge_type == verdict.judge_type,
                j.c.judge_model == verdict.judge_model))).one()
        if not _same_judgment(stored, verdict):
            raise AlreadyExists(
                f"{verdict.judge_model} already judged {run_id}/{step}/{sample_index} on "
                f"{verdict.criterion!r}; judgments cannot be changed",
                {"criterion": verdict.criterion})
        return stored


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
