"""DeleteRun and the retention sweep: removing a run and everything stored for it.

1. Mark (one short transaction acting for the owner): the run row is locked FOR UPDATE (so
   a commit holding it FOR KEY SHARE finishes first), a RUNNING run is refused (RunActive)
   or, with `force`, cancelled, and `delete_time` is set. From that commit on every reader
   and writer path filters the run out (services.writer.models.live_run): writes,
   Evaluate, ListRuns, GetRun, page tokens, WatchRun, the web, the judge's checks all say
   NOT_FOUND. The same transaction takes the deletion claim: a lease (`delete_claim`,
   `delete_claim_until`) that keeps every other deleter (another DeleteRun, another writer
   replica's sweep) off the run while this one works, with no session state and no long
   transaction (safe behind PgBouncer's transaction pooling).
2. Purge: JudgeService.PurgeRun, with a token minted for the owner over the writer's judge
   channel, removes the judge's rows (tasks, judgments, cache entries, spend). A judge that
   cannot be reached makes DeleteRun UNAVAILABLE; the claim is released, the run stays
   hidden, and the next DeleteRun or the sweep resumes.
3. Remove the writer's rows table by table (RUN_TABLES) in chunks of `delete_chunk_rows`,
   each chunk its own short transaction that first renews the lease, then the run row.

A deleter that dies leaves the run marked; once its lease passed, the sweep (or a DeleteRun
of the same run) claims it and resumes: every step is idempotent.
"""

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from sqlalchemy import Row, Table, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from epochlens.v1 import common_pb2, judge_pb2, judge_pb2_grpc, writer_pb2
from services.common.auth import mint_token
from services.common.chunked import delete_run_rows
from services.common.config import AuthSettings
from services.common.db import setting_transaction, user_transaction
from services.common.errors import DomainError, NotFound, RunActive, Unavailable
from services.writer.config import WriterSettings
from services.writer.models import (
    epochs_table,
    judge_outbox_table,
    metric_rollups_table,
    metrics_table,
    predictions_table,
    runs_table,
    samples_table,
)
from services.writer.outbox import TRANSIENT_CODES
from services.writer.repository import notify_commit

log = logging.getLogger(__name__)

# Every writer table holding rows of a run, in deletion order (the outbox first, so the
# dispatcher stops handing the run's predictions to the judge), with the DeleteRunResponse
# field its removed rows count in ("" : not reported). A new per-run table is one line here.
RUN_TABLES: tuple[tuple[Table, str], ...] = (
    (judge_outbox_table, ""),
    (predictions_table, "prediction_count"),
    (samples_table, "sample_count"),
    (epochs_table, ""),
    (metric_rollups_table, "metric_count"),
    (metrics_table, "metric_count"),
)
# Transaction setting under which the writer role sees (and claims) every user's runs on
# PostgreSQL: only the sweep's claiming transaction sets it (policies in
# services.writer.migrate).
RETENTION_SETTING = "epochlens.retention"
RETENTION_ON = "on"


class JudgePurgeFailed(DomainError):
    """The judge refused PurgeRun with an error that is neither transient nor expected (a
    misconfigured deployment); the run stays hidden and marked, INTERNAL."""

    reason = "JUDGE_PURGE_FAILED"


class ClaimLost(RuntimeError):
    """Another deleter took the run over (this one's lease had passed): this one stops."""


@dataclass(frozen=True)
class Claim:
    """A run this deleter holds: its owner and the claim token its lease is renewed with."""

    user_id: str
    run_id: uuid.UUID
    token: uuid.UUID


Purge = Callable[[str, uuid.UUID], Awaitable[judge_pb2.PurgeRunResponse]]


class JudgePurge:
    """Calls JudgeService.PurgeRun for a run's owner over the writer's judge channel."""

    def __init__(self, stub: judge_pb2_grpc.JudgeServiceStub, auth: AuthSettings,
                 settings: WriterSettings) -> None:
        self._stub = stub
        self._auth = auth
        self._settings = settings

    async def __call__(self, user_id: str, run_id: uuid.UUID) -> judge_pb2.PurgeRunResponse:
        metadata = (("authorization", f"Bearer {mint_token(self._auth, user_id)}"),)
        try:
            return await self._stub.PurgeRun(
                judge_pb2.PurgeRunRequest(run_id=str(run_id)), metadata=metadata,
                timeout=self._settings.delete_purge_timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in TRANSIENT_CODES:
                log.warning("judge cannot purge run %s of %s now: %s: %s", run_id, user_id,
                            code.name, exc.details())
                raise Unavailable(f"the judge service cannot remove the run's judgments now "
                                  f"({code.name}); the run stays hidden, retry DeleteRun "
                                  "later", {"service": "judge", "run_id": str(run_id)}) from exc
            log.error("judge refused to purge run %s of %s: %s: %s", run_id, user_id,
                      code.name, exc.details())
            raise JudgePurgeFailed(f"the judge refused PurgeRun ({code.name}): {exc.details()}",
                                   {"run_id": str(run_id)}) from exc


def _now() -> datetime:
    return datetime.now(UTC)


class RunDeleter:
    """Deletes runs (DeleteRun, the retention sweep); counts holds what it did."""

    def __init__(self, engine: AsyncEngine, settings: WriterSettings,
                 purge: Purge | None) -> None:
        """purge: the judge's PurgeRun (None: judging is off, the judge stores nothing)."""
        self._engine = engine
        self._settings = settings
        self._purge = purge
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.counts: Counter[str] = Counter()

    async def delete_run(self, user_id: str, run_id: uuid.UUID, force: bool,
                         allow_missing: bool) -> writer_pb2.DeleteRunResponse:
        """DeleteRun: marks the caller's run, then removes it (or resumes its removal)."""
        try:
            claim = await self._mark(user_id, run_id, force)
        except NotFound:
            if allow_missing:
                return writer_pb2.DeleteRunResponse(run_id=str(run_id))
            raise
        if claim is None:
            self.counts["claimed_elsewhere"] += 1
            log.info("run %s of %s is being deleted by another deleter; DeleteRun returns "
                     "at once (%d such calls so far)", run_id, user_id,
                     self.counts["claimed_elsewhere"])
            return writer_pb2.DeleteRunResponse(run_id=str(run_id))
        return await self.complete(claim)

    async def _mark(self, user_id: str, run_id: uuid.UUID, force: bool) -> Claim | None:
        """Step 1, one transaction: refuse or cancel a RUNNING run, set delete_time, take
        the claim. Returns the claim, or None when another deleter holds the run."""
        r = runs_table.c
        now = _now()
        async with user_transaction(self._engine, user_id) as conn:
            row = (await conn.execute(select(runs_table).where(
                r.id == run_id, r.user_id == user_id).with_for_update())).one_or_none()
            if row is None:
                raise NotFound(f"run {run_id} not found", {"run_id": str(run_id)})
            values = {} if row.delete_time is not None else self._marking(row, force, now)
            claim = None
            if _claimable(row, now):
                claim = Claim(user_id, run_id, uuid.uuid4())
                values.update(delete_claim=claim.token, delete_claim_until=self._until(now))
            if values:
                await conn.execute(update(runs_table).where(r.id == run_id).values(values))
                await notify_commit(conn, {run_id})
        if row.delete_time is None:
            log.info("run %s of %s marked for deletion (was %s)", run_id, user_id,
                     common_pb2.RunState.Name(row.state))
        return claim

    def _marking(self, row: Row, force: bool, now: datetime) -> dict:
        """The values that mark a live run for deletion; RunActive for a RUNNING one
        without force (with force it is cancelled)."""
        values: dict = {"delete_time": now}
        if row.state == common_pb2.RUN_STATE_RUNNING:
            if not force:
                raise RunActive(f"run {row.id} is RUNNING: finish it first, or delete with "
                                "force (which cancels it)", {"run_id": str(row.id)})
            values.update(state=common_pb2.RUN_STATE_CANCELLED, finish_time=now)
        return values

    def _until(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self._settings.delete_claim_s)

    async def complete(self, claim: Claim) -> writer_pb2.DeleteRunResponse:
        """Steps 2 and 3 for a claimed run: the judge's rows, the writer's rows in chunks,
        the run row. On failure the claim is released (the run stays marked)."""
        response = writer_pb2.DeleteRunResponse(run_id=str(claim.run_id))
        try:
            if self._purge is not None:
                purged = await self._purge(claim.user_id, claim.run_id)
                _add_judge_counts(response, purged)
            for table, field in RUN_TABLES:
                removed = await self._delete_rows(claim, table)
                if field:
                    setattr(response, field, getattr(response, field) + removed)
            await self._delete_run_row(claim)
        except (DomainError, ClaimLost):
            await self._release(claim)
            raise
        self.counts["runs_deleted"] += 1
        log.info("run %s of %s deleted: %d predictions, %d metrics, %d judge tasks, "
                 "%d judgments, %d cache entries, %d spend records (%d runs deleted so far)",
                 claim.run_id, claim.user_id, response.prediction_count,
                 response.metric_count, response.judge_task_count, response.judgment_count,
                 response.cache_entry_count, response.spend_record_count,
                 self.counts["runs_deleted"])
        return response

    async def _delete_rows(self, claim: Claim, table: Table) -> int:
        """Removes the run's rows of one table, `delete_chunk_rows` per transaction (each
        renews the lease first); returns how many."""
        return await delete_run_rows(self._engine, table, claim.user_id, claim.run_id,
                                     self._settings.delete_chunk_rows,
                                     lambda conn: self._renew(conn, claim),
                                     self._settings.delete_chunk_pause_s)

    async def _renew(self, conn: AsyncConnection, claim: Claim) -> None:
        """Extends the lease; ClaimLost when another deleter holds the run now."""
        r = runs_table.c
        result = await conn.execute(update(runs_table).where(
            r.id == claim.run_id, r.delete_claim == claim.token,
        ).values(delete_claim_until=self._until(_now())))
        if result.rowcount != 1:
            log.warning("lost the deletion claim of run %s of %s (another deleter took it "
                        "over); stopping", claim.run_id, claim.user_id)
            raise ClaimLost(f"run {claim.run_id}: deletion claim lost")

    async def _delete_run_row(self, claim: Claim) -> None:
        r = runs_table.c
        async with user_transaction(self._engine, claim.user_id) as conn:
            await self._renew(conn, claim)
            await conn.execute(delete(runs_table).where(r.id == claim.run_id,
                                                        r.delete_claim == claim.token))

    async def _release(self, claim: Claim) -> None:
        """Gives the claim up at once (a retry need not wait for the lease to pass)."""
        r = runs_table.c
        try:
            async with user_transaction(self._engine, claim.user_id) as conn:
                await conn.execute(update(runs_table).where(
                    r.id == claim.run_id, r.delete_claim == claim.token,
                ).values(delete_claim=None, delete_claim_until=None))
        except Exception:
            log.exception("could not release the deletion claim of run %s; it passes in "
                          "%.0fs", claim.run_id, self._settings.delete_claim_s)

    # The retention sweep.

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="run-retention")
        log.info("retention sweep started: %s, every %.0fs",
                 f"runs finished more than {self._settings.retention_days} days ago"
                 if self._settings.retention_days is not None else "no retention (resumes "
                 "interrupted deletions only)", self._settings.retention_interval_s)

    async def stop(self) -> None:
        """Ends the sweep; a deletion in progress stops where it is (its chunk rolls back,
        its claim passes and the next sweep resumes it)."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self.sweep_once()
            except Exception:
                self.counts["sweep_errors"] += 1
                log.exception("retention sweep pass failed (%d so far); next pass in %.0fs",
                              self.counts["sweep_errors"], self._settings.retention_interval_s)
            try:
                await asyncio.wait_for(self._stop.wait(), self._settings.retention_interval_s)
            except TimeoutError:
                pass

    async def sweep_once(self) -> int:
        """Deletes every due run (finished before the retention cutoff, or marked and not
        held by a live deleter), one claim at a time; returns how many this pass deleted."""
        deleted = 0
        while not self._stop.is_set():
            claim = await self._claim_next()
            if claim is None:
                return deleted
            try:
                await self.complete(claim)
            except (DomainError, ClaimLost) as exc:
                self.counts["sweep_failures"] += 1
                log.warning("retention sweep: run %s of %s not deleted now (%s); the next "
                            "pass retries", claim.run_id, claim.user_id, exc)
                return deleted
            deleted += 1
        return deleted

    async def _claim_next(self) -> Claim | None:
        """Claims one due run of any user: FOR UPDATE SKIP LOCKED on PostgreSQL (replicas
        never wait on each other's claims), then a conditional update (which is what keeps
        two claimers apart on SQLite)."""
        r = runs_table.c
        now = _now()
        due = [r.delete_time.is_not(None)]
        if self._settings.retention_days is not None:
            cutoff = now - timedelta(days=self._settings.retention_days)
            due.append((r.state != common_pb2.RUN_STATE_RUNNING) & (r.finish_time < cutoff))
        free = or_(r.delete_claim_until.is_(None), r.delete_claim_until < now)
        async with setting_transaction(self._engine, RETENTION_SETTING, RETENTION_ON) as conn:
            row = (await conn.execute(select(r.id, r.user_id).where(or_(*due), free)
                                      .order_by(r.delete_time, r.finish_time).limit(1)
                                      .with_for_update(skip_locked=True))).one_or_none()
            if row is None:
                return None
            claim = Claim(row.user_id, row.id, uuid.uuid4())
            result = await conn.execute(update(runs_table).where(r.id == row.id, free).values(
                delete_time=func.coalesce(r.delete_time, now), delete_claim=claim.token,
                delete_claim_until=self._until(now)))
            if result.rowcount != 1:
                return None
            await notify_commit(conn, {row.id})
        log.info("retention sweep claimed run %s of %s", row.id, row.user_id)
        return claim


def _claimable(row: Row, now: datetime) -> bool:
    return row.delete_claim_until is None or row.delete_claim_until < now


def _add_judge_counts(response: writer_pb2.DeleteRunResponse,
                      purged: judge_pb2.PurgeRunResponse) -> None:
    response.judge_task_count += purged.task_count
    response.judgment_count += purged.judgment_count
    response.cache_entry_count += purged.cache_entry_count
    response.spend_record_count += purged.spend_record_count
