"""Training metrics over real gRPC, on PostgreSQL and on SQLite: WriteMetrics, metrics on the
upload stream, and ListMetrics (ownership, filters, server-side downsampling)."""

import math
import uuid

import grpc
import pytest
from google.protobuf import timestamp_pb2
from sqlalchemy import select

from epochlens.v1 import query_pb2, writer_pb2
from services.common.db import create_engine
from services.writer.config import WriterSettings
from services.writer.models import SCHEMA, metrics_table
from tests.conftest import PG_ADMIN, pg_url
from tests.helpers import create_run, field_violations, item, rich_status


def metric(step: int, name: str = "loss", value: float = 1.0, **fields) -> writer_pb2.MetricInput:
    return writer_pb2.MetricInput(step=step, name=name, value=value, **fields)


async def stored_metrics(stack, run_id: str) -> list[tuple]:
    """(step, name, value, epoch) of the run, read directly as admin (no RLS)."""
    settings = (WriterSettings(port=0, database_url=pg_url(PG_ADMIN, stack.database))
                if stack.database else WriterSettings(port=0, sqlite_dir=stack.sqlite_dir))
    engine = create_engine(settings, (SCHEMA,))
    table = metrics_table.c
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(table.step, table.name, table.value, table.epoch)
                .where(table.run_id == uuid.UUID(run_id)).order_by(table.step, table.name))
            return [tuple(row) for row in rows]
    finally:
        await engine.dispose()


async def write(stub, md, run_id: str, metrics) -> writer_pb2.WriteMetricsResponse:
    return await stub.WriteMetrics(writer_pb2.WriteMetricsRequest(run_id=run_id,
                                                                  metrics=metrics), metadata=md)


async def test_write_metrics_stores_once_and_keeps_the_first_value(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    batch = [metric(1, "loss", 2.5, epoch=0.1), metric(1, "learning_rate", 1e-4),
             metric(2, "loss", 2.25)]
    first = await write(writer_stub, md, run.id, batch)
    replay = await write(writer_stub, md, run.id, batch)
    changed = await write(writer_stub, md, run.id, [metric(3, "loss", 2.0),
                                                     metric(2, "loss", 9.0)])
    assert (first.inserted_count, first.duplicate_count, list(first.conflicting_fields)) == (
        3, 0, [])
    assert (replay.inserted_count, replay.duplicate_count) == (0, 3)
    assert (changed.inserted_count, changed.duplicate_count,
            list(changed.conflicting_fields)) == (1, 0, ["metrics[1]"])
    assert await stored_metrics(stack, run.id) == [
        (1, "learning_rate", 1e-4, None), (1, "loss", 2.5, 0.1), (2, "loss", 2.25, None),
        (3, "loss", 2.0, None)]


async def test_same_key_twice_in_one_batch_is_settled_first_value_wins(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    response = await write(writer_stub, md, run.id, [metric(5, "loss", 1.0),
                                                      metric(5, "loss", 1.0),
                                                      metric(5, "loss", 3.0)])
    assert (response.inserted_count, response.duplicate_count,
            list(response.conflicting_fields)) == (1, 1, ["metrics[2]"])
    assert await stored_metrics(stack, run.id) == [(5, "loss", 1.0, None)]


async def test_invalid_metrics_are_refused_naming_each_field(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    bad = [metric(-1), metric(1, name=" "), metric(1, name="x" * 129), metric(1, epoch=-0.5),
           metric(1, wall_time=timestamp_pb2.Timestamp(seconds=-5))]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await write(writer_stub, md, run.id, bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(rich_status(err.value))) == {
        "metrics[0].step", "metrics[1].name", "metrics[2].name", "metrics[3].epoch",
        "metrics[4].wall_time"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await write(writer_stub, md, run.id, [])
    assert set(field_violations(rich_status(err.value))) == {"metrics"}
    assert await stored_metrics(stack, run.id) == []


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_non_finite_values_are_refused_at_the_edge(stack, writer_stub, value):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await write(writer_stub, md, run.id, [metric(1), metric(2, value=value)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(rich_status(err.value))) == {"metrics[1].value"}
    assert await stored_metrics(stack, run.id) == []


async def test_metrics_of_another_users_run_are_not_found(stack, writer_stub, query_stub):
    run = await create_run(writer_stub, stack.metadata("alice"))
    await write(writer_stub, stack.metadata("alice"), run.id, [metric(1)])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await write(writer_stub, stack.metadata("mallory"), run.id, [metric(2)])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await query_stub.ListMetrics(query_pb2.ListMetricsRequest(run_id=run.id),
                                     metadata=stack.metadata("mallory"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert await stored_metrics(stack, run.id) == [(1, "loss", 1.0, None)]


async def test_stream_carries_predictions_and_metrics(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    requests = [
        writer_pb2.StreamPredictionsRequest(sequence=1, run_id=run.id,
                                            predictions=[item(10, 0), item(10, 1)],
                                            metrics=[metric(10, "loss", 0.5)]),
        writer_pb2.StreamPredictionsRequest(sequence=2, run_id=run.id,
                                            metrics=[metric(11, "loss", 0.4),
                                                     metric(10, "loss", 0.7)]),
        writer_pb2.StreamPredictionsRequest(sequence=3, run_id=run.id),
    ]
    responses = [r async for r in writer_stub.StreamPredictions(iter(requests), metadata=md)]
    assert responses[-1].acked_sequence == 3
    assert sum(r.inserted_count for r in responses) == 2
    assert sum(r.metric_inserted_count for r in responses) == 2
    assert [f for r in responses for f in r.metric_conflicting_fields] == ["2:metrics[1]"]
    rejected = [(j.sequence, set(field_violations(j.status)))
                for r in responses for j in r.rejections]
    assert rejected == [(3, {"metrics"})]
    assert await stored_metrics(stack, run.id) == [(10, "loss", 0.5, None),
                                                   (11, "loss", 0.4, None)]


async def test_list_metrics_returns_series_in_step_order(stack, writer_stub, query_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    wall = timestamp_pb2.Timestamp(seconds=1_700_000_000)
    await write(writer_stub, md, run.id, [metric(s, "loss", 10.0 - s, epoch=s / 10,
                                                 wall_time=wall) for s in (3, 1, 2)]
                + [metric(1, "lr", 0.1), metric(1, "eval/acc", 0.5)])
    response = await query_stub.ListMetrics(query_pb2.ListMetricsRequest(run_id=run.id),
                                            metadata=md)
    assert [s.name for s in response.series] == ["eval/acc", "loss", "lr"]
    loss = response.series[1]
    assert (loss.stored_count, loss.downsampled, loss.bucket_steps) == (3, False, 1)
    assert [(p.step, p.value, p.epoch, p.min_value, p.max_value, p.count)
            for p in loss.points] == [(1, 9.0, 0.1, 9.0, 9.0, 1), (2, 8.0, 0.2, 8.0, 8.0, 1),
                                      (3, 7.0, 0.3, 7.0, 7.0, 1)]
    assert loss.points[0].wall_time.seconds == 1_700_000_000
    assert not response.series[2].points[0].HasField("epoch")
    only = await query_stub.ListMetrics(query_pb2.ListMetricsRequest(
        run_id=run.id, names=["loss"], start_step=2, end_step=2), metadata=md)
    assert [(s.name, [p.step for p in s.points]) for s in only.series] == [("loss", [2])]


async def test_long_series_is_downsampled_with_its_envelope(stack, writer_stub, query_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    values = {step: float(step % 7) for step in range(1000)}
    values[503] = 100.0  # a spike in the middle of a bucket stays visible as its maximum
    for start in range(0, 1000, 500):
        await write(writer_stub, md, run.id, [metric(s, "loss", values[s])
                                              for s in range(start, start + 500)])
    response = await query_stub.ListMetrics(query_pb2.ListMetricsRequest(
        run_id=run.id, max_points=10), metadata=md)
    (series,) = response.series
    assert (series.stored_count, series.downsampled, series.bucket_steps) == (1000, True, 100)
    assert [p.step for p in series.points] == list(range(99, 1000, 100))
    assert [p.count for p in series.points] == [100] * 10
    assert [p.value for p in series.points] == [values[s] for s in range(99, 1000, 100)]
    assert [p.max_value for p in series.points] == [6.0] * 5 + [100.0] + [6.0] * 4
    assert [p.min_value for p in series.points] == [0.0] * 10


async def test_list_metrics_checks_its_arguments(stack, writer_stub, query_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    bad = query_pb2.ListMetricsRequest(run_id=run.id, max_points=-1, start_step=5, end_step=4,
                                       names=[f"m{i}" for i in range(51)])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await query_stub.ListMetrics(bad, metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(rich_status(err.value))) == {"max_points", "end_step", "names"}
    empty = await query_stub.ListMetrics(query_pb2.ListMetricsRequest(run_id=run.id),
                                         metadata=md)
    assert (list(empty.series), list(empty.omitted_names)) == ([], [])


async def test_sparse_series_is_kept_whole_and_extra_names_are_omitted(stack, writer_stub,
                                                                     query_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    await write(writer_stub, md, run.id, [metric(s, "eval_loss", s / 1000) for s in
                                          (0, 500, 1000)])
    sparse = await query_stub.ListMetrics(query_pb2.ListMetricsRequest(
        run_id=run.id, max_points=5), metadata=md)
    assert [(s.name, s.stored_count, s.downsampled, [p.step for p in s.points])
            for s in sparse.series] == [("eval_loss", 3, False, [0, 500, 1000])]
    await write(writer_stub, md, run.id, [metric(1, f"m{i:02d}") for i in range(51)])
    crowded = await query_stub.ListMetrics(query_pb2.ListMetricsRequest(run_id=run.id),
                                           metadata=md)
    assert [s.name for s in crowded.series] == ["eval_loss"] + [f"m{i:02d}" for i in range(49)]
    assert list(crowded.omitted_names) == ["m49", "m50"]
