"""QueryService.WatchRun over real gRPC, on PostgreSQL (LISTEN/NOTIFY) and SQLite (poll):
the first state, each commit as it lands, the end of a finished run, resuming, ownership and
token checks, and one notification per commit."""

import asyncio
import time
import uuid

import asyncpg
import grpc
import pytest

from epochlens.v1 import common_pb2, query_pb2, writer_pb2
from services.writer.models import COMMIT_CHANNEL
from tests.conftest import PG_ADMIN, PG_HOST, PG_PORT
from tests.helpers import create_run, field_violations, item, rich_status

# Within this many seconds a committed change must reach an open watch (issue 9: < 2 s).
VISIBLE_WITHIN_S = 2.0


def metric(step: int, name: str, value: float) -> writer_pb2.MetricInput:
    return writer_pb2.MetricInput(step=step, name=name, value=value)


async def write(writer_stub, md, run_id: str, predictions=(), metrics=()) -> None:
    if predictions:
        await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=run_id, predictions=list(predictions)), metadata=md)
    if metrics:
        await writer_stub.WriteMetrics(writer_pb2.WriteMetricsRequest(
            run_id=run_id, metrics=list(metrics)), metadata=md)


def epoch_rows(epoch: int, samples: int, step: int) -> list:
    return [item(step, s, epoch=epoch) for s in range(samples)]


class Watch:
    """One open WatchRun call and the events it has delivered."""

    def __init__(self, query_stub, md, run_id: str, resume_token: str = "") -> None:
        self.call = query_stub.WatchRun(query_pb2.WatchRunRequest(
            run_id=run_id, resume_token=resume_token), metadata=md)
        self.events: list[query_pb2.WatchRunEvent] = []

    async def until(self, predicate, wait_s: float = 10.0) -> float:
        """Reads events until predicate(event) holds for one; returns the seconds waited."""
        started = time.monotonic()
        while True:
            event = await asyncio.wait_for(self.call.read(), wait_s)
            assert event is not grpc.aio.EOF, "the watch ended before the expected event"
            self.events.append(event)
            if predicate(event):
                return time.monotonic() - started

    def cancel(self) -> None:
        self.call.cancel()


def kind(event: query_pb2.WatchRunEvent) -> str:
    return event.WhichOneof("change")


async def test_watch_starts_with_the_state_then_streams_each_commit(stack, writer_stub,
                                                                      query_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    await write(writer_stub, md, run.id, epoch_rows(0, 3, 10),
                [metric(1, "loss", 3.0), metric(2, "loss", 2.5), metric(2, "lr", 0.1)])
    watch = Watch(query_stub, md, run.id)
    try:
        await watch.until(lambda e: kind(e) == "metrics" and e.metrics.name == "lr")
        first = watch.events
        assert [kind(e) for e in first] == ["run", "epoch", "metrics", "metrics"]
        assert first[0].run.state == common_pb2.RUN_STATE_RUNNING
        assert (first[1].epoch.epoch, first[1].epoch.prediction_count) == (0, 3)
        assert [(p.step, p.value) for p in first[2].metrics.points] == [(2, 2.5)]
        assert all(e.resume_token for e in first)

        await write(writer_stub, md, run.id, epoch_rows(1, 3, 20))
        waited = await watch.until(lambda e: kind(e) == "epoch" and e.epoch.epoch == 1)
        assert watch.events[-1].epoch.prediction_count == 3
        assert waited < VISIBLE_WITHIN_S

        await write(writer_stub, md, run.id, metrics=[metric(3, "loss", 2.0),
                                                      metric(4, "loss", 1.5)])
        await watch.until(lambda e: kind(e) == "metrics")
        assert [(p.step, p.value, p.count) for p in watch.events[-1].metrics.points] == [
            (3, 2.0, 1), (4, 1.5, 1)]

        await writer_stub.FinishRun(writer_pb2.FinishRunRequest(
            run_id=run.id, state=common_pb2.RUN_STATE_SUCCEEDED), metadata=md)
        await watch.until(lambda e: kind(e) == "run")
        assert watch.events[-1].run.state == common_pb2.RUN_STATE_SUCCEEDED
        assert await asyncio.wait_for(watch.call.read(), 10) is grpc.aio.EOF
        assert await watch.call.code() == grpc.StatusCode.OK
    finally:
        watch.cancel()


async def test_resumed_watch_sends_what_was_missed_and_nothing_twice(stack, writer_stub,
                                                                     query_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    await write(writer_stub, md, run.id, epoch_rows(0, 2, 10), [metric(1, "loss", 3.0)])
    watch = Watch(query_stub, md, run.id)
    await watch.until(lambda e: kind(e) == "metrics")
    token = watch.events[-1].resume_token
    watch.cancel()

    await write(writer_stub, md, run.id, epoch_rows(1, 2, 20),
                [metric(2, "loss", 2.0), metric(3, "loss", 1.0)])
    resumed = Watch(query_stub, md, run.id, token)
    try:
        await resumed.until(lambda e: kind(e) == "metrics")
        kinds = [kind(e) for e in resumed.events]
        assert kinds == ["epoch", "epoch", "metrics"]  # epoch totals changed: all resent
        assert [e.epoch.epoch for e in resumed.events[:2]] == [0, 1]
        assert [p.step for p in resumed.events[2].metrics.points] == [2, 3]
    finally:
        resumed.cancel()

    quiet = Watch(query_stub, md, run.id, resumed.events[-1].resume_token)
    try:
        await write(writer_stub, md, run.id, metrics=[metric(4, "loss", 0.5)])
        await quiet.until(lambda e: kind(e) == "metrics")
        assert [kind(e) for e in quiet.events] == ["metrics"]
        assert [p.step for p in quiet.events[0].metrics.points] == [4]
    finally:
        quiet.cancel()


async def test_watch_of_another_users_run_is_not_found(stack, writer_stub, query_stub):
    run = await create_run(writer_stub, stack.metadata("alice"))
    watch = Watch(query_stub, stack.metadata("mallory"), run.id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await watch.until(lambda e: True)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_resume_token_is_bound_to_caller_and_run_and_checked(stack, writer_stub,
                                                                   query_stub):
    alice = stack.metadata("alice")
    run = await create_run(writer_stub, alice)
    other = await create_run(writer_stub, alice)
    watch = Watch(query_stub, alice, run.id)
    await watch.until(lambda e: kind(e) == "run")
    token = watch.events[-1].resume_token
    watch.cancel()
    for md, run_id, bad in ((alice, other.id, token), (alice, run.id, token[:-3] + "AAA"),
                            (alice, run.id, "not a token"),
                            (stack.metadata("bob"), run.id, token)):
        refused = Watch(query_stub, md, run_id, bad)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await refused.until(lambda e: True)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (run_id, bad)
        assert "resume_token" in field_violations(rich_status(err.value))


async def test_unknown_or_malformed_run_id(stack, query_stub):
    md = stack.metadata("alice")
    for run_id, code in ((str(uuid.uuid4()), grpc.StatusCode.NOT_FOUND),
                         ("nope", grpc.StatusCode.INVALID_ARGUMENT)):
        watch = Watch(query_stub, md, run_id)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await watch.until(lambda e: True)
        assert err.value.code() == code


async def test_watch_without_token_is_unauthenticated(stack, writer_stub, query_stub):
    run = await create_run(writer_stub, stack.metadata("alice"))
    watch = Watch(query_stub, (), run.id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await watch.until(lambda e: True)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.postgres
async def test_one_notification_per_commit(stack, writer_stub):
    """A WritePredictions of 200 rows plus a WriteMetrics of 3 values: two commits, two
    notifications with the run id (not one per row)."""
    if stack.backend != "postgres":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_ADMIN,
                                 database=stack.database)
    heard: list[str] = []
    await conn.add_listener(COMMIT_CHANNEL, lambda *args: heard.append(args[-1]))
    try:
        await write(writer_stub, md, run.id, epoch_rows(0, 200, 10),
                    [metric(1, "loss", 1.0), metric(1, "lr", 0.1), metric(2, "loss", 0.9)])
        await asyncio.sleep(0.5)
    finally:
        await conn.close()
    assert heard == [run.id, run.id]


async def test_finished_event_comes_after_the_last_commits(stack, writer_stub, query_stub):
    """An epoch committed just before FinishRun (one read sees both) is sent before the
    event that says finished, which is the stream's last."""
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    await write(writer_stub, md, run.id, epoch_rows(0, 2, 10))
    watch = Watch(query_stub, md, run.id)
    try:
        await watch.until(lambda e: kind(e) == "epoch")
        await write(writer_stub, md, run.id, epoch_rows(1, 2, 20))
        await writer_stub.FinishRun(writer_pb2.FinishRunRequest(
            run_id=run.id, state=common_pb2.RUN_STATE_FAILED), metadata=md)
        await watch.until(lambda e: kind(e) == "run" and e.run.state != 1)
        assert await asyncio.wait_for(watch.call.read(), 10) is grpc.aio.EOF
    finally:
        watch.cancel()
    after_start = watch.events[2:]
    assert [kind(e) for e in after_start] == ["epoch", "run"]
    assert after_start[0].epoch.epoch == 1
    assert after_start[1].run.state == common_pb2.RUN_STATE_FAILED
