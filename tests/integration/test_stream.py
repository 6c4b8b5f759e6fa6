"""StreamPredictions: acks after commit, per-batch rejections, a stream that stays usable."""

import asyncio

import grpc
import pytest
from google.rpc import code_pb2

from epochlens.v1 import writer_pb2
from tests.helpers import create_run, field_violations, item
from tests.integration.test_writer import stored_count


def batch(sequence: int, run_id: str, items) -> writer_pb2.StreamPredictionsRequest:
    return writer_pb2.StreamPredictionsRequest(sequence=sequence, run_id=run_id,
                                               predictions=items)


ACK_WAIT_S = 5


async def exchange(stub, metadata, requests) -> list[writer_pb2.StreamPredictionsResponse]:
    """Sends each request after the ack of the previous one (a window of one batch), so each
    gets its own response; an ack that does not come on its own fails the test."""
    call = stub.StreamPredictions(metadata=metadata)
    responses = []
    for request in requests:
        await call.write(request)
        responses.append(await asyncio.wait_for(call.read(), ACK_WAIT_S))
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    return responses


async def test_acks_follow_commits_and_bad_batch_is_rejected_alone(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    responses = await exchange(writer_stub, md, [
        batch(1, run.id, [item(10, 0), item(10, 1)]),
        batch(2, run.id, [item(20, 0), item(20, 5, prompt="")]),
        batch(3, run.id, [item(30, 0)]),
    ])
    assert [r.acked_sequence for r in responses] == [1, 2, 3]
    assert [r.inserted_count for r in responses] == [2, 0, 1]
    assert not responses[0].rejections and not responses[2].rejections
    (rejection,) = responses[1].rejections
    assert rejection.sequence == 2 and rejection.status.code == code_pb2.INVALID_ARGUMENT
    assert set(field_violations(rejection.status)) == {"predictions[1].prompt"}
    assert await stored_count(stack, run.id) == 3


async def test_replayed_stream_stores_nothing_twice(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    requests = [batch(s, run.id, [item(s, i) for i in range(8)]) for s in range(1, 6)]
    call = writer_stub.StreamPredictions(iter(requests), metadata=md)
    first = [r async for r in call]
    call = writer_stub.StreamPredictions(iter(requests), metadata=md)
    second = [r async for r in call]
    assert first[-1].acked_sequence == second[-1].acked_sequence == 5
    assert sum(r.inserted_count for r in first) == 40
    assert sum(r.inserted_count for r in second) == 0
    assert sum(r.duplicate_count for r in second) == 40
    assert await stored_count(stack, run.id) == 40


async def test_non_increasing_sequence_and_unknown_run_are_rejected(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    other = await create_run(writer_stub, stack.metadata("bob"))
    responses = await exchange(writer_stub, md, [
        batch(5, run.id, [item(1, 0)]),
        batch(5, run.id, [item(2, 0)]),
        batch(6, other.id, [item(3, 0)]),
        batch(7, run.id, [item(4, 0)]),
    ])
    assert [r.acked_sequence for r in responses] == [5, 5, 6, 7]
    assert [r.rejections[0].status.code for r in responses[1:3]] == [
        code_pb2.INVALID_ARGUMENT, code_pb2.NOT_FOUND]
    assert await stored_count(stack, run.id) == 2
    assert await stored_count(stack, other.id) == 0


async def test_stream_without_token_is_unauthenticated(stack, writer_stub):
    # No batch is written: a write racing the server's refusal of the stream surfaces as
    # INTERNAL ("Failed execute_batch") on a loaded machine, hiding the status under test.
    call = writer_stub.StreamPredictions(iter([]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [r async for r in call]
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
