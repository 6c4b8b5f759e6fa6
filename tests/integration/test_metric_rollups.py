"""Metric rollups: the writer keeps per-bucket count/min/max/last for every stored metric
value (first value wins, replays and conflicts left out), ListMetrics reads long series
from them with the same points the aggregating path gives, and migration 0005 rolls up
metrics stored before it."""

import random
import uuid
from datetime import UTC, datetime

import asyncpg
from alembic import command
from sqlalchemy import select

from epochlens.v1 import query_pb2, writer_pb2
from services.common.migrations import alembic_config
from services.writer.models import ROLLUP_WIDTHS, metric_rollups_table
from tests.conftest import PG_ADMIN, PG_HOST, PG_PORT, migrated_database, pg_url
from tests.helpers import create_run
from tests.integration.test_query_judgments import admin_engine

STEPS = 3000


def value_at(step: int) -> float:
    return round(((step * 7919) % 1000) / 100.0, 2)


def expected_buckets(values: dict[int, float], width: int) -> list[tuple]:
    """(last step, last value, min, max, count) per bucket step // width, in order."""
    buckets: dict[int, list] = {}
    for step in sorted(values):
        value = values[step]
        b = buckets.setdefault(step // width, [step, value, value, value, 0])
        b[0], b[1] = step, value
        b[2], b[3], b[4] = min(b[2], value), max(b[3], value), b[4] + 1
    return [tuple(buckets[k]) for k in sorted(buckets)]


def points(series: query_pb2.MetricSeries) -> list[tuple]:
    return [(p.step, p.value, p.min_value, p.max_value, p.count) for p in series.points]


async def test_list_metrics_reads_rollups_equal_to_the_values(stack, writer_stub, query_stub):
    md = stack.metadata("rollup-user")
    run = await create_run(writer_stub, md)
    steps = list(range(STEPS))
    random.Random(3).shuffle(steps)
    batches = [steps[i:i + 700] for i in range(0, STEPS, 700)]
    for batch in batches + [batches[1]]:  # the last one is a replay: duplicates only
        await writer_stub.WriteMetrics(writer_pb2.WriteMetricsRequest(run_id=run.id, metrics=[
            writer_pb2.MetricInput(step=s, name="loss", value=value_at(s)) for s in batch]),
            metadata=md)
    conflict = await writer_stub.WriteMetrics(writer_pb2.WriteMetricsRequest(
        run_id=run.id, metrics=[writer_pb2.MetricInput(step=5, name="loss", value=99.0)]),
        metadata=md)
    assert list(conflict.conflicting_fields) == ["metrics[0]"]
    values = {s: value_at(s) for s in range(STEPS)}

    whole = await query_stub.ListMetrics(query_pb2.ListMetricsRequest(
        run_id=run.id, names=["loss"], max_points=100), metadata=md)
    ranged = await query_stub.ListMetrics(query_pb2.ListMetricsRequest(
        run_id=run.id, names=["loss"], max_points=100, start_step=0), metadata=md)
    (series,) = whole.series
    assert (series.downsampled, series.bucket_steps, series.stored_count) == (True, 30, STEPS)
    assert points(series) == [(s, v, lo, hi, n) for s, v, lo, hi, n
                              in expected_buckets(values, 30)]
    assert points(ranged.series[0]) == points(series)  # the aggregating path agrees

    coarse = await query_stub.ListMetrics(query_pb2.ListMetricsRequest(
        run_id=run.id, names=["loss"], max_points=1), metadata=md)
    assert points(coarse.series[0]) == [(STEPS - 1, values[STEPS - 1], min(values.values()),
                                         max(values.values()), STEPS)]


async def test_rollup_rows_at_every_width(stack, writer_stub):
    md = stack.metadata("rollup-rows")
    run = await create_run(writer_stub, md)
    await writer_stub.WriteMetrics(writer_pb2.WriteMetricsRequest(run_id=run.id, metrics=[
        writer_pb2.MetricInput(step=s, name="lr", value=value_at(s)) for s in range(250)]),
        metadata=md)
    stored = await rollup_rows(stack, run.id)
    values = {s: value_at(s) for s in range(250)}
    for width in ROLLUP_WIDTHS:
        assert [row[2:] for row in stored if row[0] == width] == [
            (last, value, low, high, n) for last, value, low, high, n
            in expected_buckets(values, width)], width


async def rollup_rows(stack, run_id: str) -> list[tuple]:
    """(width, bucket, last_step, last_value, min, max, count) of the run, as admin."""
    R = metric_rollups_table.c
    engine = admin_engine(stack)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(R.width, R.bucket, R.last_step, R.last_value, R.min_value, R.max_value,
                       R.count).where(R.run_id == uuid.UUID(run_id))
                .order_by(R.width, R.bucket))
            return [tuple(row) for row in rows]
    finally:
        await engine.dispose()


async def test_migration_rolls_up_metrics_stored_before_it():
    """Writer schema down to 0004, metrics inserted as admin, then up to head."""
    async with migrated_database("rollups") as name:
        engine_url = pg_url(PG_ADMIN, name)
        await run_alembic(engine_url, "downgrade", "0004_api_keys")
        run_id, now = uuid.uuid4(), datetime.now(UTC)
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_ADMIN, database=name)
        try:
            await conn.copy_records_to_table(
                "metrics", schema_name="writer",
                columns=["run_id", "step", "name", "user_id", "value", "epoch", "wall_time",
                         "create_time"],
                records=[(run_id, s, "loss", "u", value_at(s), s / 100, now, now)
                         for s in range(1234)])
            await run_alembic(engine_url, "upgrade", "head")
            rows = await conn.fetch(
                "SELECT width, last_step, last_value, min_value, max_value, count, last_epoch "
                "FROM writer.metric_rollups WHERE run_id = $1 ORDER BY width, bucket", run_id)
        finally:
            await conn.close()
    values = {s: value_at(s) for s in range(1234)}
    for width in ROLLUP_WIDTHS:
        got = [tuple(r)[1:] for r in rows if r["width"] == width]
        assert got == [(last, v, lo, hi, n, last / 100) for last, v, lo, hi, n
                       in expected_buckets(values, width)], width


async def run_alembic(url: str, action: str, revision: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine
    engine = create_async_engine(url)
    cfg = alembic_config("services.writer:migrations")

    def act(sync_conn) -> None:
        cfg.attributes["connection"] = sync_conn
        getattr(command, action)(cfg, revision)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(act)
    finally:
        await engine.dispose()
