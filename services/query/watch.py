"""WatchRun: a run's changes streamed as they are committed.

What wakes a watch: on PostgreSQL, the writer NOTIFYs COMMIT_CHANNEL with the run's id in
every transaction that stores its predictions or metrics or finishes it (one notification
per commit); CommitListener LISTENs on one connection per query process and sets the
events of that run's watches (CommitSignals). A watch also re-reads every watch_resync_s
in case a notification was lost with the listening connection (which is re-opened, and
every watch woken, when it drops). On SQLite nothing notifies: a watch re-reads every
watch_poll_s. Reads of one watch are at least watch_min_interval_s apart, so a burst of
commits costs one read.

What a read sends: the run when its state changed, every epoch summary that is new or
grew, and per metric name the points with a step above the last one sent for that name
(at most watch_metric_points per name per read; the next read follows at once). A watch
without a resume token starts with the run, all its epochs and the latest point of each
metric. The stream ends after the read that saw the run finished with nothing left to
send.

Resume tokens are signed like page tokens and bound to the caller and run. They carry the
state sent, the number of epochs and predictions the sent summaries added up to, and
the last step sent per metric name: a resumed watch sends the metric points after those
steps and, when the epoch totals differ, every epoch summary again (clients replace an
epoch's summary by epoch number), so nothing committed while it was away is missed.
"""

import asyncio
import json
import logging
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from epochlens.v1 import common_pb2, query_pb2
from services.common.convert import run_to_proto, timestamp
from services.common.errors import FieldViolation, InvalidArgument
from services.query.config import QuerySettings
from services.query.pagination import TEXT, PageTokens
from services.writer.models import COMMIT_CHANNEL

log = logging.getLogger(__name__)
counts: Counter[str] = Counter()


class CommitSignals:
    """The asyncio.Events of the open watches, by run id; set when the run has a commit."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = defaultdict(set)

    @contextmanager
    def subscribe(self, run_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._events[run_id].add(event)
        try:
            yield event
        finally:
            self._events[run_id].discard(event)
            if not self._events[run_id]:
                del self._events[run_id]

    def notify(self, run_id: str) -> None:
        for event in self._events.get(run_id, ()):
            event.set()

    def notify_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()

    @property
    def watching(self) -> int:
        return sum(len(events) for events in self._events.values())


class CommitListener:
    """LISTEN on COMMIT_CHANNEL over one dedicated asyncpg connection (PostgreSQL; to
    watch_listen_url when set, else to the engine's database), waking
    the watches of each notified run; re-connects after watch_listen_retry_s when the
    connection drops, waking every watch (commits in between were not heard)."""

    def __init__(self, engine: AsyncEngine, signals: CommitSignals,
                 settings: QuerySettings) -> None:
        source = (make_url(settings.watch_listen_url) if settings.watch_listen_url
                  else engine.url)
        url = source.set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._signals, self._settings = signals, settings
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="watch-commit-listener")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._listen_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                counts["listen_failures"] += 1
                log.warning("watch: LISTEN %s failed (%d so far): %s; retrying in %.1fs",
                            COMMIT_CHANNEL, counts["listen_failures"], exc,
                            self._settings.watch_listen_retry_s)
            self._signals.notify_all()
            await _wait(self._stop, self._settings.watch_listen_retry_s)

    async def _listen_once(self) -> None:
        """Listens until the connection closes or the listener is stopped."""
        conn = await asyncpg.connect(self._dsn, timeout=self._settings.db_connect_timeout_s,
                                     server_settings={"application_name": "epochlens-watch"})
        try:
            await conn.add_listener(COMMIT_CHANNEL, self._on_notification)
            self._signals.notify_all()  # whatever was committed before LISTEN took effect
            log.info("watch: listening on %s", COMMIT_CHANNEL)
            while not self._stop.is_set() and not conn.is_closed():
                await _wait(self._stop, self._settings.watch_listen_retry_s)
        finally:
            if not conn.is_closed():
                await conn.close()

    def _on_notification(self, _conn, _pid, _channel, payload: str) -> None:
        counts["notifications"] += 1
        self._signals.notify(payload)


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Waits up to `seconds` for `event`; True when it was set."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
        return True
    except TimeoutError:
        return False


@dataclass
class WatchCursor:
    """What a watch has sent: the run state, per epoch its (prediction_count,
    latest_step), and per metric name the last step. `fresh`: nothing sent yet and no
    resume token (metrics then start at each name's latest point)."""

    state: int = common_pb2.RUN_STATE_UNSPECIFIED
    epochs: dict[int, tuple[int, int]] = field(default_factory=dict)
    epoch_totals: tuple[int, int] | None = None  # from a resume token: (epochs, predictions)
    metric_steps: dict[str, int] = field(default_factory=dict)
    fresh: bool = True

    def totals(self) -> tuple[int, int]:
        if self.epoch_totals is not None:
            return self.epoch_totals
        return len(self.epochs), sum(count for count, _ in self.epochs.values())

    def dump(self) -> str:
        return json.dumps({"s": self.state, "e": list(self.totals()), "m": self.metric_steps},
                          separators=(",", ":"), sort_keys=True)


class ResumeTokens:
    """Signed resume tokens, bound to the caller and run like page tokens."""

    def __init__(self, secret: bytes) -> None:
        self._tokens = PageTokens(secret, "WatchRun", (TEXT,), field="resume_token")

    def encode(self, run_id: uuid.UUID, cursor: WatchCursor) -> str:
        return self._tokens.encode({"run_id": str(run_id)}, (cursor.dump(),))

    def decode(self, run_id: uuid.UUID, token: str) -> WatchCursor:
        decoded = self._tokens.decode(token, {"run_id": str(run_id)})
        if decoded is None:
            return WatchCursor()
        try:
            return _cursor_from(json.loads(decoded[0]))
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidArgument([FieldViolation("resume_token",
                                                  "token content is not valid")]) from exc


def _cursor_from(body: Any) -> WatchCursor:
    """The cursor a token's JSON describes; TypeError/ValueError on any other shape."""
    state, totals, steps = body["s"], body["e"], body["m"]
    if (type(state) is not int or not isinstance(totals, list) or len(totals) != 2
            or not all(type(n) is int for n in totals) or not isinstance(steps, dict)
            or not all(type(step) is int for step in steps.values())):
        raise TypeError("unexpected resume token content")
    return WatchCursor(state=state, epoch_totals=(totals[0], totals[1]),
                       metric_steps=dict(steps), fresh=False)


@dataclass(frozen=True)
class WatchRead:
    """One read of a watched run: the run row, all its epoch rows, and per metric name the
    rows to send (step order) and whether more may follow."""

    run: Any
    epochs: list[Any]
    metrics: dict[str, list[Any]]
    backlog: bool


def changes(read: WatchRead, cursor: WatchCursor) -> Iterator[query_pb2.WatchRunEvent]:
    """The events of one read, updating `cursor` as each is produced. A changed run comes
    first while it runs, and last once it is finished: the event that says finished is
    the stream's last (a client may stop reading at it)."""
    changed = read.run.state != cursor.state
    running = read.run.state == common_pb2.RUN_STATE_RUNNING
    if changed and running:
        cursor.state = read.run.state
        yield query_pb2.WatchRunEvent(run=run_to_proto(read.run))
    yield from _data_changes(read, cursor)
    if changed and not running:
        cursor.state = read.run.state
        yield query_pb2.WatchRunEvent(run=run_to_proto(read.run))
    cursor.fresh = False


def _data_changes(read: WatchRead, cursor: WatchCursor) -> Iterator[query_pb2.WatchRunEvent]:
    """Epoch summaries that are new or grew, and new metric points, updating `cursor`."""
    resend = (cursor.epoch_totals is not None and cursor.epoch_totals
              != (len(read.epochs), sum(row.prediction_count for row in read.epochs)))
    if cursor.epoch_totals is not None:
        cursor.epochs = {} if resend else {
            row.epoch: (row.prediction_count, row.latest_step) for row in read.epochs}
        cursor.epoch_totals = None
    for row in read.epochs:
        seen = (row.prediction_count, row.latest_step)
        if cursor.epochs.get(row.epoch) != seen:
            cursor.epochs[row.epoch] = seen
            yield query_pb2.WatchRunEvent(epoch=_epoch(row))
    for name, rows in read.metrics.items():
        if rows:
            cursor.metric_steps[name] = rows[-1].step
            yield query_pb2.WatchRunEvent(metrics=_metric_update(name, rows))


def _epoch(row) -> query_pb2.EpochSummary:
    return query_pb2.EpochSummary(
        epoch=row.epoch, prediction_count=row.prediction_count, latest_step=row.latest_step,
        first_create_time=timestamp(row.first_create_time),
        last_create_time=timestamp(row.last_create_time))


def _metric_update(name: str, rows: list[Any]) -> query_pb2.MetricUpdate:
    update = query_pb2.MetricUpdate(name=name)
    for row in rows:
        update.points.add(step=row.step, value=row.value, epoch=row.epoch,
                          wall_time=timestamp(row.wall_time), min_value=row.value,
                          max_value=row.value, count=1)
    return update


def finished(read: WatchRead) -> bool:
    return read.run.state != common_pb2.RUN_STATE_RUNNING and not read.backlog


async def watch_events(reader, wake: asyncio.Event, cursor: WatchCursor,
                       settings: QuerySettings, idle_s: float
                       ) -> AsyncIterator[query_pb2.WatchRunEvent]:
    """Reads with `reader(cursor)` (a WatchRead), yields its changes, then waits for `wake`
    (or idle_s) before the next read; ends once the run is finished and all is sent."""
    loop = asyncio.get_running_loop()
    while True:
        wake.clear()
        started = loop.time()
        read = await reader(cursor)
        for event in changes(read, cursor):
            yield event
        if finished(read):
            return
        if not read.backlog:
            await _wait(wake, idle_s)
        pause = settings.watch_min_interval_s - (loop.time() - started)
        if pause > 0:
            await asyncio.sleep(pause)
