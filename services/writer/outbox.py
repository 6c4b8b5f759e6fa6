"""The judge outbox dispatcher: hands committed predictions to the judge service.

The writer stores an outbox row with every new prediction, in the same statement
(services/writer/repository.py). This task, started by the writer server when
`judge_address` is set, loops (deferring to ingest: no pass starts while the writer is
committing predictions, for at most `outbox_max_defer_s` in a row):

1. claim up to `outbox_batch` due rows (PostgreSQL: `FOR UPDATE SKIP LOCKED` in one
   transaction, so several writer replicas share the work without sending a row twice
   at once);
2. per (user, run): read the predictions' text and the run's judge config acting for
   that user (RLS), and call JudgeService.EnqueueJudging with a token minted for the
   run's owner, in chunks that fit a gRPC message;
3. accepted: delete the rows (in the claiming transaction); refused as INVALID_ARGUMENT
   (a bad judge config in the run): park them for `outbox_parked_delay_s`; any other
   failure (judge down, deadline): attempts + 1 and an exponential backoff with jitter.

Rows are never dropped: only an accepted hand-off deletes them, and EnqueueJudging is
idempotent, so a row sent twice (a crash between the call and the commit) is judged once.
On SQLite (one writer process) the claim is a plain select and each chunk's outcome is
written in its own short transaction, so the database is never locked during a call.
"""

import asyncio
import itertools
import logging
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import grpc
from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnElement,
    Row,
    Table,
    cast,
    delete,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from epochlens.v1 import judge_pb2, judge_pb2_grpc
from services.common.auth import mint_token
from services.common.balancing import service_config
from services.common.config import AuthSettings
from services.common.convert import dict_to_struct
from services.common.db import RLS_USER_SETTING, is_postgres
from services.common.telemetry.logs import bind_run_id
from services.common.telemetry.tracing import client_interceptors, continued_span, tracing_on
from services.writer.config import WriterSettings
from services.writer.models import judge_outbox_table, prediction_texts, runs_table
from trainer_client.tls import ClientTLS, open_aio_channel

log = logging.getLogger(__name__)

JUDGE_SERVICE = judge_pb2.DESCRIPTOR.services_by_name["JudgeService"].full_name
# Failures expected while the judge restarts or is overloaded: logged at WARNING.
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                             grpc.StatusCode.CANCELLED})
# Room left in a request for its run id, judge config and framing.
_REQUEST_OVERHEAD_BYTES = 64 * 1024

outbox = judge_outbox_table
predictions = prediction_texts


@dataclass(frozen=True)
class Outcome:
    """What became of a chunk: accepted (rows deleted), parked, or to retry with backoff."""

    accepted: bool
    parked: bool = False
    error: str = ""


ACCEPTED = Outcome(accepted=True)


@dataclass(frozen=True)
class Chunk:
    """Outbox rows of one (user, run) sent in one EnqueueJudging call."""

    user_id: str
    run_id: uuid.UUID
    keys: list[tuple[int, int]]
    attempts: int
    request: judge_pb2.EnqueueJudgingRequest | None = None
    # Trace contexts of the requests that stored these rows (the hand-off continues them).
    traceparents: tuple[str | None, ...] = ()


def judge_channel(settings: WriterSettings, tls: ClientTLS | None) -> grpc.aio.Channel:
    """Channel to the judge replicas (judge_lb_policy over the addresses judge_address
    names; TLS or mutual TLS when tls is given, else plaintext); its service config retries
    EnqueueJudging on UNAVAILABLE (the call is idempotent) and reconnects within the outbox
    backoff bounds."""
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.initial_reconnect_backoff_ms", int(settings.outbox_backoff_base_s * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(settings.outbox_backoff_max_s * 1000)),
    ]
    method_config: dict[str, list] = {}
    if settings.outbox_rpc_max_attempts > 1:
        max_backoff = min(settings.outbox_backoff_max_s, settings.outbox_rpc_timeout_s)
        retry = {"maxAttempts": settings.outbox_rpc_max_attempts,
                 "initialBackoff": f"{settings.outbox_backoff_base_s}s",
                 "maxBackoff": f"{max_backoff}s",
                 "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
        method_config = {"methodConfig": [{"name": [{"service": JUDGE_SERVICE}],
                                           "retryPolicy": retry}]}
    options.append(("grpc.service_config",
                    service_config(settings.judge_lb_policy, **method_config)))
    return open_aio_channel(settings.judge_address, tls, options,
                            interceptors=client_interceptors(settings))


def backoff_s(settings: WriterSettings, attempts: int) -> float:
    """Delay before the next try after `attempts` earlier failures: exponential, capped,
    with jitter (uniform in the upper half) so replicas do not retry in lockstep."""
    delay = min(settings.outbox_backoff_max_s,
                settings.outbox_backoff_base_s * 2 ** min(attempts, 30))
    return random.uniform(delay / 2, delay)


class OutboxDispatcher:
    """The dispatcher task; counts holds what it did (sent, duplicates, failed, parked)."""

    def __init__(self, engine: AsyncEngine, settings: WriterSettings, auth: AuthSettings,
                 seconds_since_ingest: Callable[[], float] = lambda: math.inf,
                 tls: ClientTLS | None = None) -> None:
        """seconds_since_ingest: time since the writer last committed predictions; tls: of
        the channel to the judge (None: plaintext)."""
        self._engine = engine
        self._seconds_since_ingest = seconds_since_ingest
        self._settings = settings
        self._auth = auth
        mint_token(auth, "epochlens-writer")  # fails now, not at the first hand-off
        self._channel = judge_channel(settings, tls)
        self._stub = judge_pb2_grpc.JudgeServiceStub(self._channel)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        # Hand-offs failed in a row (any loop); while > 0 the loops pause with backoff, so
        # a judge that is down costs one failing call per pause, not one per batch.
        self._failures_in_row = 0
        self.counts: Counter[str] = Counter()

    @property
    def stub(self) -> judge_pb2_grpc.JudgeServiceStub:
        """The stub of the dispatcher's judge channel (CreateRun's judge config check uses it
        too)."""
        return self._stub

    def start(self) -> None:
        """Starts outbox_concurrency loops on PostgreSQL (SKIP LOCKED keeps their claims
        apart, and one's call overlaps another's database work); one on SQLite."""
        loops = self._settings.outbox_concurrency if is_postgres(self._engine) else 1
        self._tasks = [asyncio.create_task(self._run(), name=f"judge-outbox-{n}")
                       for n in range(loops)]
        log.info("judge outbox dispatcher started: %d loops, judge at %s", loops,
                 self._settings.judge_address)

    async def stop(self) -> None:
        """Lets the pass in progress finish, then closes the channel."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._channel.close()
        log.info("judge outbox dispatcher stopped: %s", dict(self.counts))

    async def _run(self) -> None:
        """Passes until stopped. While the writer is ingesting (a commit in the last
        outbox_ingest_quiet_s) no pass starts, for at most outbox_max_defer_s in a row; then
        the outbox is drained (passes until one claims less than a full batch)."""
        deferring_since: float | None = None
        draining = False
        while not self._stop.is_set():
            if not draining and self._ingesting():
                now = time.monotonic()
                deferring_since = deferring_since if deferring_since is not None else now
                if now - deferring_since < self._settings.outbox_max_defer_s:
                    await self._pause()
                    continue
                draining = True
                log.info("judge outbox: ingest busy for %.0fs; draining the outbox now",
                         now - deferring_since)
            deferring_since = None
            claimed = await self._pass()
            if self._failures_in_row:
                await self._pause(backoff_s(self._settings, self._failures_in_row - 1))
            elif claimed < self._settings.outbox_batch:
                draining = False
                await self._pause()

    def _ingesting(self) -> bool:
        quiet = self._settings.outbox_ingest_quiet_s
        return quiet > 0 and self._seconds_since_ingest() < quiet

    async def _pause(self, seconds: float | None = None) -> None:
        """Sleeps outbox_poll_s (or `seconds`), or less when stopped meanwhile."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds or self._settings.outbox_poll_s)
        except TimeoutError:
            pass

    async def _pass(self) -> int:
        try:
            return await self.dispatch_once()
        except Exception:
            self.counts["pass_errors"] += 1
            log.exception("judge outbox pass failed (%d so far); retrying in %.1fs",
                          self.counts["pass_errors"], self._settings.outbox_poll_s)
            return 0

    async def dispatch_once(self) -> int:
        """One pass over the due rows; returns how many were claimed."""
        if is_postgres(self._engine):
            async with self._engine.begin() as conn:
                rows = await _claim(conn, self._settings.outbox_batch)
                for user_id, run_id, group in _groups(rows):
                    await self._hand_off(conn, conn, user_id, run_id, group)
            return len(rows)
        async with self._engine.connect() as conn:
            rows = await _claim(conn, self._settings.outbox_batch)
            for user_id, run_id, group in _groups(rows):
                await self._hand_off(conn, None, user_id, run_id, group)
            await conn.rollback()
        return len(rows)

    async def _hand_off(self, conn: AsyncConnection, settle_conn: AsyncConnection | None,
                        user_id: str, run_id: uuid.UUID, group: list[Row]) -> None:
        """Reads, sends and settles one (user, run) group; settle_conn None: settle each chunk
        in its own transaction (SQLite)."""
        chunks, missing = await self._build_chunks(conn, user_id, run_id, group)
        if missing is not None:
            await self._settle(settle_conn, missing, Outcome(
                accepted=False, parked=True, error="no prediction or run to send"))
        for chunk in chunks:
            await self._settle(settle_conn, chunk, await self._send(chunk))

    async def _build_chunks(self, conn: AsyncConnection, user_id: str, run_id: uuid.UUID,
                            group: list[Row]) -> tuple[list[Chunk], Chunk | None]:
        """Requests for the group's predictions, and a chunk of the rows that have no
        prediction or run to send (parked with an error, never dropped)."""
        if is_postgres(conn):
            await conn.execute(text("SELECT set_config(:name, :user_id, true)"),
                               {"name": RLS_USER_SETTING, "user_id": user_id})
        attempts = max(row.attempts for row in group)
        keys = [(row.step, row.sample_index) for row in group]
        run_config = await conn.scalar(select(runs_table.c.config).where(
            runs_table.c.id == run_id, runs_table.c.user_id == user_id))
        items = await _read_items(conn, run_id, keys) if run_config is not None else {}
        lost = [key for key in keys if key not in items]
        missing = None
        if lost:
            what = "run" if run_config is None else "prediction"
            missing = Chunk(user_id, run_id, lost, attempts)
            self.counts["missing"] += len(lost)
            log.error("judge outbox: %d rows of run %s (user %s) have no %s to send; parked "
                      "(%d such rows so far)", len(lost), run_id, user_id, what,
                      self.counts["missing"])
        judge_config = dict_to_struct((run_config or {}).get("judge") or {})
        traces = {(row.step, row.sample_index): row.traceparent for row in group}
        return [replace(chunk, traceparents=tuple(traces[key] for key in chunk.keys))
                for chunk in _chunks(user_id, run_id, attempts, items, judge_config,
                                     self._settings.max_message_bytes)], missing

    async def _send(self, chunk: Chunk) -> Outcome:
        """Calls EnqueueJudging and classifies a failure."""
        token = mint_token(self._auth, chunk.user_id)
        try:
            with (bind_run_id(chunk.run_id), continued_span(
                    "judge_outbox.hand_off", chunk.traceparents, tracing_on(self._settings))):
                reply = await self._stub.EnqueueJudging(
                    chunk.request, timeout=self._settings.outbox_rpc_timeout_s,
                    metadata=(("authorization", f"Bearer {token}"),))
        except grpc.aio.AioRpcError as exc:
            return self._failed(chunk, exc)
        self._failures_in_row = 0
        self.counts["sent"] += reply.enqueued_count
        self.counts["duplicates"] += reply.duplicate_count
        return ACCEPTED

    def _failed(self, chunk: Chunk, exc: grpc.aio.AioRpcError) -> Outcome:
        error = f"{exc.code().name}: {exc.details()}"
        n = len(chunk.keys)
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            self.counts["parked"] += n
            log.error("judge refused %d predictions of run %s (user %s): %s; parked for %.0fs "
                      "(%d parked so far)", n, chunk.run_id, chunk.user_id, error,
                      self._settings.outbox_parked_delay_s, self.counts["parked"])
            return Outcome(accepted=False, parked=True, error=error)
        self.counts["failed"] += n
        self._failures_in_row += 1
        level = logging.WARNING if exc.code() in TRANSIENT_CODES else logging.ERROR
        log.log(level, "judge hand-off of %d predictions of run %s failed (attempt %d): %s; "
                "retrying with backoff (%d failed hand-offs so far)", n, chunk.run_id,
                chunk.attempts + 1, error, self.counts["failed"])
        return Outcome(accepted=False, error=error)

    async def _settle(self, conn: AsyncConnection | None, chunk: Chunk,
                      outcome: Outcome) -> None:
        """Deletes accepted rows; otherwise counts the attempt and sets the next try."""
        if conn is None:
            async with self._engine.begin() as own:
                await self._settle(own, chunk, outcome)
            return
        where = _key_match(conn, outbox, chunk.run_id, chunk.keys)
        if outcome.accepted:
            await conn.execute(delete(outbox).where(*where))
            return
        delay = (self._settings.outbox_parked_delay_s if outcome.parked
                 else backoff_s(self._settings, chunk.attempts))
        await conn.execute(update(outbox).where(*where).values(
            attempts=outbox.c.attempts + 1, last_error=outcome.error,
            next_attempt_time=datetime.now(UTC) + timedelta(seconds=delay)))
        if not outcome.parked:
            waiting = await conn.scalar(select(func.count()).select_from(outbox))
            log.warning("judge outbox: %d rows waiting; run %s retried in %.1fs",
                        waiting, chunk.run_id, delay)


async def _claim(conn: AsyncConnection, limit: int) -> Sequence[Row]:
    """Due rows, oldest first; on PostgreSQL locked (rows another replica holds are skipped)."""
    stmt = (select(outbox.c.user_id, outbox.c.run_id, outbox.c.step, outbox.c.sample_index,
                   outbox.c.attempts, outbox.c.traceparent)
            .where(outbox.c.next_attempt_time <= datetime.now(UTC))
            .order_by(outbox.c.next_attempt_time).limit(limit)
            .with_for_update(skip_locked=True))
    return (await conn.execute(stmt)).all()


def _key_match(conn: AsyncConnection, table: Table, run_id: uuid.UUID,
               keys: list[tuple[int, int]]) -> tuple[ColumnElement[bool], ...]:
    """WHERE clauses selecting the (step, sample_index) keys of one run. PostgreSQL: a join
    with the keys unnest()ed from two arrays (a hash join; DELETE ... USING, UPDATE ... FROM),
    about three times faster than a row-value IN list of hundreds of pairs."""
    if not is_postgres(conn):
        return (table.c.run_id == run_id,
                tuple_(table.c.step, table.c.sample_index).in_(keys))
    wanted = func.unnest(cast([s for s, _ in keys], ARRAY(BigInteger)),
                         cast([i for _, i in keys], ARRAY(BigInteger))).table_valued(
        "step", "sample_index").render_derived(name="wanted")
    return (table.c.run_id == run_id, table.c.step == wanted.c.step,
            table.c.sample_index == wanted.c.sample_index)


def _groups(rows: Sequence[Row]):
    ordered = sorted(rows, key=lambda r: (r.user_id, r.run_id, r.step, r.sample_index))
    for (user_id, run_id), group in itertools.groupby(ordered, lambda r: (r.user_id, r.run_id)):
        yield user_id, run_id, list(group)


async def _read_items(conn: AsyncConnection, run_id: uuid.UUID,
                      keys: list[tuple[int, int]]) -> dict[tuple[int, int], judge_pb2.JudgeItem]:
    stmt = select(predictions.c.step, predictions.c.sample_index, predictions.c.epoch,
                  predictions.c.prompt, predictions.c.ground_truth,
                  predictions.c.prediction).where(*_key_match(conn, predictions, run_id, keys))
    items = {}
    for row in await conn.execute(stmt):
        item = judge_pb2.JudgeItem(
            prediction=judge_pb2.PredictionRef(run_id=str(run_id), step=row.step,
                                               sample_index=row.sample_index),
            epoch=row.epoch, prompt=row.prompt, prediction_text=row.prediction)
        if row.ground_truth is not None:
            item.ground_truth = row.ground_truth
        items[(row.step, row.sample_index)] = item
    return items


def _chunks(user_id: str, run_id: uuid.UUID, attempts: int,
            items: dict[tuple[int, int], judge_pb2.JudgeItem], config, max_bytes: int
            ) -> list[Chunk]:
    """Splits the items into requests that stay under the message size limit."""
    budget = max(max_bytes - _REQUEST_OVERHEAD_BYTES - config.ByteSize(), 1)
    chunks: list[Chunk] = []
    keys: list[tuple[int, int]] = []
    size = 0
    for key, item in items.items():
        if keys and size + item.ByteSize() > budget:
            chunks.append(_chunk(user_id, run_id, attempts, keys, items, config))
            keys, size = [], 0
        keys.append(key)
        size += item.ByteSize()
    if keys:
        chunks.append(_chunk(user_id, run_id, attempts, keys, items, config))
    return chunks


def _chunk(user_id: str, run_id: uuid.UUID, attempts: int, keys: list[tuple[int, int]],
           items: dict[tuple[int, int], judge_pb2.JudgeItem], config) -> Chunk:
    request = judge_pb2.EnqueueJudgingRequest(run_id=str(run_id), config=config,
                                              items=[items[key] for key in keys])
    return Chunk(user_id, run_id, keys, attempts, request)
