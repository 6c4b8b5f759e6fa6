"""Each (run, sample) prompt and ground truth is stored once (issue 12): declared samples,
old-style clients that send the prompt on every prediction, conflicts, missing samples, and
the stream committing groups concurrently, on PostgreSQL and on SQLite."""

import asyncio
import uuid

import grpc
import pytest
from google.rpc import code_pb2
from sqlalchemy import func, select

from epochlens.v1 import query_pb2, writer_pb2
from services.common.db import create_engine
from services.writer.config import WriterSettings
from services.writer.models import SCHEMA, predictions_table, samples_table
from tests.conftest import PG_ADMIN, pg_url
from tests.helpers import create_run, field_violations, item, rich_status

ACK_WAIT_S = 10.0


async def counts(stack, run_id: str) -> tuple[int, int]:
    """(samples, predictions) of the run, counted in the database as admin (no RLS)."""
    settings = (WriterSettings(port=0, database_url=pg_url(PG_ADMIN, stack.database))
                if stack.database else WriterSettings(port=0, sqlite_dir=stack.sqlite_dir))
    engine = create_engine(settings, (SCHEMA,))
    try:
        async with engine.connect() as conn:
            return tuple([await conn.scalar(select(func.count()).select_from(table).where(
                table.c.run_id == uuid.UUID(run_id)))
                for table in (samples_table, predictions_table)])
    finally:
        await engine.dispose()


def sample(index: int, prompt: str | None = None, truth: str | None = None
           ) -> writer_pb2.SampleInput:
    message = writer_pb2.SampleInput(sample_index=index, prompt=prompt or f"prompt {index}")
    message.ground_truth = truth or f"truth {index}"
    return message


def bare(step: int, index: int, epoch: int = 1):
    """A prediction that relies on its declared sample (empty prompt, no ground truth)."""
    prediction = item(step, index, epoch=epoch, prompt="")
    prediction.ClearField("ground_truth")
    return prediction


async def write(stub, md, run_id: str, predictions, samples=()):
    return await stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run_id, predictions=predictions, samples=samples), metadata=md)


async def refused(stub, md, run_id: str, predictions, samples=()) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await write(stub, md, run_id, predictions, samples)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return field_violations(rich_status(err.value))


async def test_samples_declared_once_are_stored_once_and_read_back(stack, writer_stub,
                                                                   query_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    first = await write(writer_stub, md, run.id, [bare(10, i) for i in range(100)],
                        [sample(i) for i in range(100)])
    assert first.inserted_count == 100
    for epoch in range(2, 6):
        reply = await write(writer_stub, md, run.id,
                            [bare(epoch * 10, i, epoch) for i in range(100)])
        assert reply.inserted_count == 100
    assert await counts(stack, run.id) == (100, 500)
    page = await query_stub.ListPredictions(query_pb2.ListPredictionsRequest(
        run_id=run.id, sample_index=7, page_size=10), metadata=md)
    assert [(p.step, p.prompt, p.ground_truth) for p in page.predictions] == [
        (step, "prompt 7", "truth 7") for step in (10, 20, 30, 40, 50)]


async def test_old_style_client_with_prompt_on_every_prediction(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    for epoch in (1, 2, 3):
        reply = await write(writer_stub, md, run.id,
                            [item(epoch * 10, i, epoch=epoch) for i in range(20)])
        assert (reply.inserted_count, reply.duplicate_count) == (20, 0)
    replay = await write(writer_stub, md, run.id, [item(10, i) for i in range(20)])
    assert (replay.inserted_count, replay.duplicate_count) == (0, 20)
    assert await counts(stack, run.id) == (20, 60)


async def test_other_text_for_a_stored_sample_rejects_the_whole_batch(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    await write(writer_stub, md, run.id, [item(10, 0)])
    violations = await refused(writer_stub, md, run.id, [bare(20, 0), bare(20, 2)],
                               [sample(2), sample(0, truth="other truth")])
    assert set(violations) == {"samples[1].ground_truth"}
    violations = await refused(writer_stub, md, run.id, [item(20, 1), item(20, 0, prompt="x")])
    assert set(violations) == {"predictions[1].prompt"}
    # Nothing of the refused batches is stored: neither predictions nor their new samples.
    assert await counts(stack, run.id) == (1, 1)


async def test_conflict_within_one_batch_is_refused(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    violations = await refused(writer_stub, md, run.id, [item(10, 3, prompt="mine")],
                               [sample(3)])
    assert set(violations) == {"predictions[0].prompt"}
    assert await counts(stack, run.id) == (0, 0)


async def test_empty_prompt_without_a_sample_is_refused(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    violations = await refused(writer_stub, md, run.id, [item(10, 0), bare(10, 1), bare(10, 2)])
    assert set(violations) == {"predictions[1].prompt", "predictions[2].prompt"}
    assert "no sample 1" in violations["predictions[1].prompt"]
    assert await counts(stack, run.id) == (0, 0)


async def test_nul_in_a_declared_sample_is_replaced(stack, writer_stub, query_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    reply = await write(writer_stub, md, run.id, [bare(10, 0)],
                        [sample(0, prompt="a\x00b", truth="c\x00")])
    assert list(reply.nul_replaced_fields) == ["samples[0].prompt", "samples[0].ground_truth"]
    page = await query_stub.ListPredictions(query_pb2.ListPredictionsRequest(
        run_id=run.id), metadata=md)
    assert [(p.prompt, p.ground_truth) for p in page.predictions] == [("a\ufffdb", "c\ufffd")]
    # The replaced text is the stored one: sending the same NUL text again is no conflict.
    again = await write(writer_stub, md, run.id, [item(20, 0, prompt="a\x00b",
                                                       ground_truth="c\x00")])
    assert again.inserted_count == 1


async def test_stream_batches_rely_on_samples_of_earlier_batches_in_flight(stack, writer_stub):
    """Batch 1 declares the samples; batches 2..6 (sent without waiting for acks, so the
    writer may commit them concurrently) only name them; batch 7 conflicts and is refused
    alone."""
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    requests = [writer_pb2.StreamPredictionsRequest(
        sequence=1, run_id=run.id, predictions=[bare(10, i) for i in range(50)],
        samples=[sample(i) for i in range(50)])]
    requests += [writer_pb2.StreamPredictionsRequest(
        sequence=n, run_id=run.id, predictions=[bare(n * 10, i, n) for i in range(50)])
        for n in range(2, 7)]
    requests.append(writer_pb2.StreamPredictionsRequest(
        sequence=7, run_id=run.id, predictions=[item(70, 4, 7, prompt="changed")]))
    call = writer_stub.StreamPredictions(metadata=md)
    for request in requests:
        await call.write(request)
    await call.done_writing()
    responses = [r async for r in call]
    assert max(r.acked_sequence for r in responses) == 7
    assert sum(r.inserted_count for r in responses) == 300
    rejections = [j for r in responses for j in r.rejections]
    assert [(j.sequence, j.status.code) for j in rejections] == [(7, code_pb2.INVALID_ARGUMENT)]
    assert set(field_violations(rejections[0].status)) == {"predictions[0].prompt"}
    assert await counts(stack, run.id) == (50, 300)


async def test_concurrent_old_style_writers_of_one_run_agree(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    replies = await asyncio.gather(*[
        write(writer_stub, md, run.id, [item(step, i) for i in range(30)])
        for step in range(10, 90, 10)])
    assert sum(r.inserted_count for r in replies) == 240
    assert await counts(stack, run.id) == (30, 240)


async def test_stream_refuses_other_text_for_a_sample_it_stored(stack, writer_stub):
    """Old-style batches acked one by one: the stream knows what it stored, and still
    refuses other text for it (and a NUL text equal after replacement is no conflict)."""
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    call = writer_stub.StreamPredictions(metadata=md)
    responses = []
    for sequence, prediction in enumerate([
            item(10, 0, prompt="a\x00"), item(20, 0, ground_truth="other"),
            item(30, 0, prompt="a\x00"), item(40, 0, prompt="a\ufffd")], 1):
        await call.write(writer_pb2.StreamPredictionsRequest(
            sequence=sequence, run_id=run.id, predictions=[prediction]))
        responses.append(await asyncio.wait_for(call.read(), ACK_WAIT_S))
    await call.done_writing()
    assert [r.inserted_count for r in responses] == [1, 0, 1, 1]
    (rejection,) = responses[1].rejections
    assert set(field_violations(rejection.status)) == {"predictions[0].prompt"}
    assert await counts(stack, run.id) == (1, 3)
