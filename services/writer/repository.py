"""Writes to schema `writer`. Every method runs in a transaction acting for one user."""

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, case, func, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from epochlens.v1 import common_pb2, writer_pb2
from services.common.db import is_postgres, user_transaction
from services.common.errors import NotFound, RunDeleting
from services.common.telemetry.tracing import current_traceparent
from services.writer.models import (
    COMMIT_CHANNEL,
    ROLLUP_WIDTHS,
    SCHEMA,
    epochs_table,
    judge_outbox_table,
    live_run,
    metric_rollups_table,
    metrics_table,
    predictions_table,
    runs_table,
)
from services.writer.samples import SampleKey, SampleText, SampleWrite, stored_texts
from services.writer.telemetry import count_commit

# PostgreSQL bulk path, one statement and one round trip per group: the rows arrive as
# arrays and are unnest()ed, inserted in key order (concurrent commits take row locks in
# the same order) skipping identities already stored, and the rows actually inserted
# update the per-epoch summary (and, with judging on, get a judge outbox row). The
# statement returns how many were inserted.
_PG_INSERT_CTE = f"""
WITH ins AS (
    INSERT INTO {SCHEMA}.predictions (run_id, user_id, epoch, step, sample_index,
        prediction, generation_time_ms, prompt_tokens, completion_tokens, create_time)
    SELECT r, :user_id, e, s, i, o, t, pt, ct, :now
    FROM unnest(CAST(:run_ids AS UUID[]), CAST(:epochs AS BIGINT[]), CAST(:steps AS BIGINT[]),
                CAST(:indices AS BIGINT[]), CAST(:outputs AS TEXT[]), CAST(:times AS FLOAT8[]),
                CAST(:ptoks AS INT[]), CAST(:ctoks AS INT[])) AS u(r, e, s, i, o, t, pt, ct)
    ORDER BY r, s, i
    ON CONFLICT (run_id, step, sample_index) DO NOTHING
    RETURNING run_id, epoch, step, sample_index
), per_epoch AS (
    SELECT run_id, epoch, count(*) AS n, max(step) AS latest FROM ins GROUP BY run_id, epoch
), summary AS (
    INSERT INTO {SCHEMA}.epochs AS e (run_id, epoch, user_id, prediction_count, latest_step,
        first_create_time, last_create_time)
    SELECT run_id, epoch, :user_id, n, latest, :now, :now FROM per_epoch
    ORDER BY run_id, epoch
    ON CONFLICT (run_id, epoch) DO UPDATE SET
        prediction_count = e.prediction_count + EXCLUDED.prediction_count,
        latest_step = GREATEST(e.latest_step, EXCLUDED.latest_step),
        last_create_time = GREATEST(e.last_create_time, EXCLUDED.last_create_time)
)"""
# Only predictions actually inserted (not duplicates) are handed to the judge.
_PG_OUTBOX_CTE = f""", outbox AS (
    INSERT INTO {SCHEMA}.judge_outbox (run_id, step, sample_index, user_id, create_time,
        attempts, next_attempt_time, last_error, traceparent)
    SELECT run_id, step, sample_index, :user_id, :now, 0, :now, NULL,
        CAST(:traceparent AS TEXT) FROM ins
    ORDER BY run_id, step, sample_index
)"""
# Also how many of the samples that predictions with an empty prompt rely on (and the
# commit does not declare) are not stored: the caller then refuses the batches at fault.
_PG_COUNT = f"""
SELECT COALESCE(SUM(n), 0),
    (SELECT count(*) FROM unnest(CAST(:relied_runs AS UUID[]), CAST(:relied_indices AS BIGINT[]))
     AS m(r, i) WHERE NOT EXISTS (SELECT 1 FROM {SCHEMA}.samples x
                                  WHERE x.run_id = m.r AND x.sample_index = m.i))
FROM per_epoch
"""


_PG_BULK_INSERT = text(_PG_INSERT_CTE + _PG_COUNT)
# Judging on: the inserted predictions get their outbox rows in the same statement.
_PG_BULK_INSERT_JUDGED = text(_PG_INSERT_CTE + _PG_OUTBOX_CTE + _PG_COUNT)


# Keys looked up per statement when metrics are checked against what is stored (3 bind
# parameters each: well within SQLite's and asyncpg's limits).
METRIC_LOOKUP_CHUNK = 1000

_MetricKey = tuple[uuid.UUID, int, str]


@dataclass(frozen=True)
class Batch:
    """A validated batch: the run it targets, its predictions, its metrics and the samples it
    declares."""

    run_id: uuid.UUID
    items: Sequence[common_pb2.PredictionInput]
    metrics: Sequence[writer_pb2.MetricInput] = ()
    samples: Sequence[writer_pb2.SampleInput] = ()


@dataclass(frozen=True)
class CommitResult:
    inserted: int
    duplicates: int
    metric_inserted: int = 0
    metric_duplicates: int = 0
    # (position of the batch in the commit, index of the metric in the batch) of every metric
    # not stored because its key holds a different value.
    metric_conflicts: tuple[tuple[int, int], ...] = ()


@dataclass
class MetricWrite:
    """Metrics of one transaction, settled first-value-wins per (run, step, name): a key
    already stored (or earlier in the same transaction) with the same value and epoch is a
    duplicate, with a different one a conflict; only new keys are inserted."""

    user_id: str
    inserted: int = 0
    duplicates: int = 0
    conflicts: list[tuple[int, int]] | None = None

    async def run(self, conn: AsyncConnection, batches: Sequence[Batch],
                  owned: set[uuid.UUID]) -> None:
        self.conflicts = []
        first: dict[_MetricKey, writer_pb2.MetricInput] = {}
        new: list[tuple[tuple[int, int], _MetricKey, writer_pb2.MetricInput]] = []
        for position, batch in enumerate(batches):
            if batch.run_id not in owned:
                continue
            for index, metric in enumerate(batch.metrics):
                key = (batch.run_id, metric.step, metric.name)
                if key not in first:
                    first[key] = metric
                    new.append(((position, index), key, metric))
                else:
                    self._settle_known((position, index), metric, first[key])
        if new:
            await self._store(conn, new)

    def _settle_known(self, where: tuple[int, int], metric: writer_pb2.MetricInput,
                      stored: tuple[float, float | None] | writer_pb2.MetricInput) -> None:
        value, epoch = stored if isinstance(stored, tuple) else _value_and_epoch(stored)
        if (value, epoch) == _value_and_epoch(metric):
            self.duplicates += 1
        else:
            self.conflicts.append(where)

    async def _store(self, conn: AsyncConnection, new: list) -> None:
        stored = await _stored_metrics(conn, [key for _, key, _ in new])
        rows = []
        for where, key, metric in new:
            if key in stored:
                self._settle_known(where, metric, stored[key])
            else:
                rows.append(_metric_row(self.user_id, key, metric))
        if not rows:
            return
        rows.sort(key=lambda row: (row["run_id"], row["step"], row["name"]))
        table = metrics_table.c
        stmt = (_insert(conn, metrics_table).on_conflict_do_nothing()
                .returning(table.run_id, table.step, table.name))
        keys = {tuple(key) for key in (await conn.execute(stmt, rows)).all()}
        # A key a concurrent transaction stored first: counted as a duplicate.
        self.inserted += len(keys)
        self.duplicates += len(rows) - len(keys)
        if keys:
            await _roll_up(conn, [row for row in rows
                                  if (row["run_id"], row["step"], row["name"]) in keys])


def _value_and_epoch(metric: writer_pb2.MetricInput) -> tuple[float, float | None]:
    return metric.value, (metric.epoch if metric.HasField("epoch") else None)


async def _stored_metrics(conn: AsyncConnection, keys: list[_MetricKey]
                          ) -> dict[_MetricKey, tuple[float, float | None]]:
    """(value, epoch) of the keys already stored (the caller's own, under RLS)."""
    table = metrics_table.c
    found: dict[_MetricKey, tuple[float, float | None]] = {}
    for start in range(0, len(keys), METRIC_LOOKUP_CHUNK):
        chunk = keys[start:start + METRIC_LOOKUP_CHUNK]
        result = await conn.execute(
            select(table.run_id, table.step, table.name, table.value, table.epoch)
            .where(tuple_(table.run_id, table.step, table.name).in_(chunk)))
        for run_id, step, name, value, epoch in result:
            found[(run_id, step, name)] = (value, epoch)
    return found


async def _roll_up(conn: AsyncConnection, rows: list[dict]) -> None:
    """Adds newly stored metric values to their rollup buckets at every width (one upsert
    statement, buckets in key order so concurrent writers lock them in the same order)."""
    buckets: dict[tuple, dict] = {}
    for row in rows:
        for width in ROLLUP_WIDTHS:
            key = (row["run_id"], row["name"], width, row["step"] // width)
            bucket = buckets.get(key)
            if bucket is None:
                buckets[key] = _new_bucket(key, row)
            else:
                _add_to_bucket(bucket, row)
    R = metric_rollups_table.c
    stmt = _insert(conn, metric_rollups_table)
    new = stmt.excluded
    low, high = ((func.least, func.greatest) if is_postgres(conn) else (func.min, func.max))
    later = new.last_step > R.last_step
    stmt = stmt.on_conflict_do_update(
        index_elements=[R.run_id, R.name, R.width, R.bucket],
        set_={"count": R.count + new.count, "min_value": low(R.min_value, new.min_value),
              "max_value": high(R.max_value, new.max_value),
              **{column: case((later, getattr(new, column)), else_=getattr(R, column))
                 for column in ("last_step", "last_value", "last_epoch", "last_wall_time")}})
    await conn.execute(stmt, [buckets[key] for key in sorted(buckets)])


def _new_bucket(key: tuple, row: dict) -> dict:
    run_id, name, width, bucket = key
    return {"run_id": run_id, "name": name, "width": width, "bucket": bucket,
            "user_id": row["user_id"], "count": 1, "min_value": row["value"],
            "max_value": row["value"], "last_step": row["step"], "last_value": row["value"],
            "last_epoch": row["epoch"], "last_wall_time": row["wall_time"]}


def _add_to_bucket(bucket: dict, row: dict) -> None:
    bucket["count"] += 1
    bucket["min_value"] = min(bucket["min_value"], row["value"])
    bucket["max_value"] = max(bucket["max_value"], row["value"])
    if row["step"] > bucket["last_step"]:
        bucket.update(last_step=row["step"], last_value=row["value"], last_epoch=row["epoch"],
                      last_wall_time=row["wall_time"])


def _metric_row(user_id: str, key: _MetricKey, metric: writer_pb2.MetricInput) -> dict:
    now = _now()
    wall = metric.wall_time.ToDatetime(tzinfo=UTC) if metric.HasField("wall_time") else now
    value, epoch = _value_and_epoch(metric)
    return {"run_id": key[0], "step": key[1], "name": key[2], "user_id": user_id,
            "value": value, "epoch": epoch, "wall_time": wall, "create_time": now}


def _now() -> datetime:
    return datetime.now(UTC)


async def notify_commit(conn: AsyncConnection, run_ids: set[uuid.UUID]) -> None:
    """NOTIFY COMMIT_CHANNEL once per run, delivered when the transaction commits (one
    statement per commit, whatever the number of rows). PostgreSQL only: on SQLite the
    query service's WatchRun polls."""
    if run_ids and is_postgres(conn):
        await conn.execute(
            text("SELECT pg_notify(:channel, id) FROM unnest(CAST(:ids AS text[])) AS id"),
            {"channel": COMMIT_CHANNEL, "ids": sorted(str(run_id) for run_id in run_ids)})


def _insert(conn: AsyncConnection, table):
    return (postgresql if is_postgres(conn) else sqlite).insert(table)


class WriterRepository:
    def __init__(self, engine: AsyncEngine, judging: bool = False) -> None:
        """judging: new predictions also get a judge outbox row, in the same transaction."""
        self._engine = engine
        self._judging = judging
        self._pg_bulk_insert = _PG_BULK_INSERT_JUDGED if judging else _PG_BULK_INSERT
        self._last_commit = float("-inf")

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    def seconds_since_commit(self) -> float:
        """Seconds since predictions were last inserted or committed (inf: never); the outbox
        dispatcher defers to ingest with it. The mark is set before the commit as well as
        after it: a dispatcher pass that starts while the commit is in flight would otherwise
        see no ingest and claim the rows that commit makes visible."""
        return time.monotonic() - self._last_commit

    async def create_run(self, user_id: str, fields: dict[str, Any]) -> Row:
        """Inserts a run; with a request_id, returns the run an earlier call created."""
        values = {"id": uuid.uuid4(), "user_id": user_id, "create_time": _now(),
                  "state": common_pb2.RUN_STATE_RUNNING, **fields}
        async with user_transaction(self._engine, user_id) as conn:
            stmt = _insert(conn, runs_table).values(values)
            if values.get("request_id"):
                stmt = stmt.on_conflict_do_nothing(index_elements=["user_id", "request_id"])
                await conn.execute(stmt)
                where = (runs_table.c.user_id == user_id,
                         runs_table.c.request_id == values["request_id"])
                row = (await conn.execute(select(runs_table).where(*where))).one()
                if row.delete_time is not None:
                    raise RunDeleting(
                        f"run {row.id}, created earlier with request_id "
                        f"{values['request_id']!r}, is being deleted; use another request_id",
                        {"run_id": str(row.id), "request_id": values["request_id"]})
                return row
            await conn.execute(stmt)
            return (await conn.execute(select(runs_table).where(
                runs_table.c.id == values["id"]))).one()

    async def finish_run(self, user_id: str, run_id: uuid.UUID, state: int) -> Row:
        """Sets the final state once; a finished run is returned unchanged."""
        owned = (runs_table.c.id == run_id, runs_table.c.user_id == user_id, live_run())
        async with user_transaction(self._engine, user_id) as conn:
            await conn.execute(update(runs_table).where(
                *owned, runs_table.c.state == common_pb2.RUN_STATE_RUNNING,
            ).values(state=state, finish_time=_now()))
            row = (await conn.execute(select(runs_table).where(*owned))).one_or_none()
            if row is not None:
                await notify_commit(conn, {run_id})
        if row is None:
            raise NotFound(f"run {run_id} not found", {"run_id": str(run_id)})
        return row

    async def stored_samples(self, user_id: str, run_id: uuid.UUID, step: int,
                             indices: Sequence[int]) -> set[int]:
        """The sample indices among `indices` that the user's run has a prediction for at
        `step` (EvaluationService.Evaluate skips generating those)."""
        P = predictions_table.c
        found: set[int] = set()
        async with user_transaction(self._engine, user_id) as conn:
            for start in range(0, len(indices), METRIC_LOOKUP_CHUNK):
                chunk = list(indices[start:start + METRIC_LOOKUP_CHUNK])
                found.update((await conn.execute(select(P.sample_index).where(
                    P.run_id == run_id, P.user_id == user_id, P.step == step,
                    P.sample_index.in_(chunk)))).scalars())
        return found

    async def commit(self, user_id: str, batches: Sequence[Batch],
                     known_samples: Mapping[SampleKey, SampleText] | None = None
                     ) -> tuple[CommitResult, set[uuid.UUID]]:
        """Stores every batch whose run the user owns, in one transaction. known_samples:
        samples the caller knows are stored, with their text (an earlier commit of its
        stream stored them).

        Returns the counts and the run ids that were not found (their batches are skipped).
        Raises SampleConflict (nothing stored) when batches name a sample with another text
        than the stored one, or rely on a sample that is not stored (services.writer.samples).
        """
        run_ids = {batch.run_id for batch in batches}
        async with user_transaction(self._engine, user_id) as conn:
            owned = set((await conn.execute(select(runs_table.c.id).where(
                runs_table.c.id.in_(run_ids), runs_table.c.user_id == user_id, live_run(),
            ).with_for_update(key_share=True, read=True))).scalars())
            samples = SampleWrite.collect(batches, owned, known_samples)
            await samples.store(conn, user_id)
            rows = [(b.run_id, item) for b in batches if b.run_id in owned for item in b.items]
            inserted, missing = await self._insert_predictions(conn, user_id, rows, samples)
            if missing:
                await samples.raise_missing(conn, batches)
            if inserted:
                self._last_commit = time.monotonic()
            metrics = MetricWrite(user_id)
            if any(batch.metrics for batch in batches):
                await metrics.run(conn, batches, owned)
            if inserted or metrics.inserted:
                await notify_commit(conn, {b.run_id for b in batches if b.run_id in owned
                                           and (b.items or b.metrics)})
        if inserted:
            self._last_commit = time.monotonic()
        count_commit(inserted, len(rows) - inserted)
        return CommitResult(inserted, len(rows) - inserted, metrics.inserted,
                            metrics.duplicates, tuple(metrics.conflicts or ())), run_ids - owned

    async def _insert_predictions(self, conn: AsyncConnection, user_id: str,
                                  rows: list[tuple[uuid.UUID, common_pb2.PredictionInput]],
                                  samples: SampleWrite) -> tuple[int, int]:
        """How many rows were inserted, and how many samples rows with an empty prompt rely
        on are not stored (checked in the same statement on PostgreSQL)."""
        if not rows:
            return 0, 0
        if is_postgres(conn):
            relied = sorted(samples.relied)
            arrays = {**_pg_arrays(user_id, rows), "relied_runs": [k[0] for k in relied],
                      "relied_indices": [k[1] for k in relied]}
            if self._judging:
                arrays["traceparent"] = current_traceparent()
            inserted, missing = (await conn.execute(self._pg_bulk_insert, arrays)).one()
        else:
            inserted = await _sqlite_insert(conn, user_id, rows, self._judging)
            missing = len(samples.relied) - len(await stored_texts(conn, sorted(samples.relied)))
        return int(inserted), missing


async def _sqlite_insert(conn: AsyncConnection, user_id: str,
                         rows: list[tuple[uuid.UUID, common_pb2.PredictionInput]],
                         judging: bool) -> int:
    """The embedded path: insert skipping stored identities, then update the epoch summary
    and (judging) write the outbox rows of what was inserted."""
    now = _now()
    stmt = (sqlite.insert(predictions_table).on_conflict_do_nothing()
            .returning(predictions_table.c.run_id, predictions_table.c.epoch,
                       predictions_table.c.step, predictions_table.c.sample_index))
    inserted = (await conn.execute(stmt, [_row_dict(user_id, run_id, item, now)
                                          for run_id, item in rows])).all()
    if inserted:
        await _sqlite_update_epochs(conn, user_id, inserted, now)
    if inserted and judging:
        traceparent = current_traceparent()
        await conn.execute(sqlite.insert(judge_outbox_table), [
            {"run_id": run_id, "step": step, "sample_index": index, "user_id": user_id,
             "create_time": now, "attempts": 0, "next_attempt_time": now, "last_error": None,
             "traceparent": traceparent} for run_id, _, step, index in inserted])
    return len(inserted)


async def _sqlite_update_epochs(conn: AsyncConnection, user_id: str, inserted: Sequence[Row],
                                now: datetime) -> None:
    per_epoch: dict[tuple[uuid.UUID, int], list[int]] = {}
    for run_id, epoch, step, _ in inserted:
        count_and_step = per_epoch.setdefault((run_id, epoch), [0, step])
        count_and_step[0] += 1
        count_and_step[1] = max(count_and_step[1], step)
    upsert = sqlite.insert(epochs_table)
    await conn.execute(upsert.on_conflict_do_update(
        index_elements=["run_id", "epoch"],
        set_={"prediction_count": epochs_table.c.prediction_count
              + upsert.excluded.prediction_count,
              "latest_step": func.max(epochs_table.c.latest_step,
                                      upsert.excluded.latest_step),
              "last_create_time": upsert.excluded.last_create_time}),
        [{"run_id": run_id, "epoch": epoch, "user_id": user_id, "prediction_count": n,
          "latest_step": step, "first_create_time": now, "last_create_time": now}
         for (run_id, epoch), (n, step) in per_epoch.items()])


def _optional(item: common_pb2.PredictionInput, name: str) -> Any:
    return getattr(item, name) if item.HasField(name) else None


def _pg_arrays(user_id: str, rows: list[tuple[uuid.UUID, common_pb2.PredictionInput]]) -> dict:
    items = [item for _, item in rows]
    return {
        "user_id": user_id, "now": _now(),
        "run_ids": [run_id for run_id, _ in rows],
        "epochs": [i.epoch for i in items], "steps": [i.step for i in items],
        "indices": [i.sample_index for i in items],
        "outputs": [i.prediction for i in items],
        "times": [i.generation_time_ms for i in items],
        "ptoks": [_optional(i, "prompt_tokens") for i in items],
        "ctoks": [_optional(i, "completion_tokens") for i in items],
    }


def _row_dict(user_id: str, run_id: uuid.UUID, item: common_pb2.PredictionInput,
              now: datetime) -> dict:
    return {
        "run_id": run_id, "user_id": user_id, "epoch": item.epoch, "step": item.step,
        "sample_index": item.sample_index, "prediction": item.prediction,
        "generation_time_ms": item.generation_time_ms,
        "prompt_tokens": _optional(item, "prompt_tokens"),
        "completion_tokens": _optional(item, "completion_tokens"), "create_time": now,
    }
