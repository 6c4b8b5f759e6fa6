"""QueryService over real gRPC: pagination, filters, epochs, sample comparison, isolation."""

import uuid

import grpc
import pytest

from epochlens.v1 import query_pb2, writer_pb2
from tests.helpers import create_run, field_violations, grid, item, rich_status


async def seeded_run(stack, writer_stub, user="alice", epochs=3, samples=4):
    md = stack.metadata(user)
    run = await create_run(writer_stub, md)
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=grid(epochs, samples)), metadata=md)
    return run, md


async def all_pages(query_stub, md, **request):
    keys, token, pages = [], "", 0
    while True:
        reply = await query_stub.ListPredictions(query_pb2.ListPredictionsRequest(
            page_token=token, **request), metadata=md)
        keys += [(p.step, p.sample_index) for p in reply.predictions]
        pages += 1
        token = reply.next_page_token
        if not token:
            return keys, pages


async def test_pages_cover_every_prediction_once_in_order(stack, writer_stub, query_stub):
    run, md = await seeded_run(stack, writer_stub, epochs=5, samples=6)
    keys, pages = await all_pages(query_stub, md, run_id=run.id, page_size=7)
    assert keys == sorted((e * 10, s) for e in range(1, 6) for s in range(6))
    assert pages == 5  # 30 rows at 7 per page


async def test_filters_by_epoch_and_sample(stack, writer_stub, query_stub):
    run, md = await seeded_run(stack, writer_stub)
    by_epoch, _ = await all_pages(query_stub, md, run_id=run.id, epoch=2, page_size=3)
    by_sample, _ = await all_pages(query_stub, md, run_id=run.id, sample_index=1)
    both, _ = await all_pages(query_stub, md, run_id=run.id, epoch=3, sample_index=1)
    assert by_epoch == [(20, s) for s in range(4)]
    assert by_sample == [(10, 1), (20, 1), (30, 1)]
    assert both == [(30, 1)]


async def test_prediction_fields_round_trip(stack, writer_stub, query_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    sent = item(7, 3, epoch=2, prompt_tokens=11, completion_tokens=5)
    sent.ClearField("ground_truth")
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=[sent]), metadata=md)
    (got,) = (await query_stub.ListPredictions(query_pb2.ListPredictionsRequest(
        run_id=run.id), metadata=md)).predictions
    assert (got.run_id, got.epoch, got.step, got.sample_index) == (run.id, 2, 7, 3)
    assert (got.prompt, got.prediction) == (sent.prompt, sent.prediction)
    assert not got.HasField("ground_truth")
    assert (got.prompt_tokens, got.completion_tokens, got.generation_time_ms) == (11, 5, 1.5)
    assert got.create_time.seconds > 0


async def test_page_token_with_other_filters_or_tampered_is_invalid(stack, writer_stub,
                                                                    query_stub):
    run, md = await seeded_run(stack, writer_stub)
    first = await query_stub.ListPredictions(query_pb2.ListPredictionsRequest(
        run_id=run.id, page_size=2), metadata=md)
    token = first.next_page_token
    tampered = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
    for request in (
        query_pb2.ListPredictionsRequest(run_id=run.id, epoch=1, page_token=token),
        query_pb2.ListPredictionsRequest(run_id=run.id, page_token=tampered),
        query_pb2.ListPredictionsRequest(run_id=run.id, page_token="%%%not-base64"),
        query_pb2.ListPredictionsRequest(run_id=run.id, page_size=-1),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await query_stub.ListPredictions(request, metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(rich_status(err.value))) <= {"page_token", "page_size"}


async def test_page_size_above_max_is_clamped(stack, writer_stub, query_stub):
    run, md = await seeded_run(stack, writer_stub, epochs=1, samples=3)
    reply = await query_stub.ListPredictions(query_pb2.ListPredictionsRequest(
        run_id=run.id, page_size=10**6), metadata=md)
    assert len(reply.predictions) == 3 and reply.next_page_token == ""


async def test_list_epochs_counts_and_pages(stack, writer_stub, query_stub):
    run, md = await seeded_run(stack, writer_stub, epochs=3, samples=4)
    first = await query_stub.ListEpochs(query_pb2.ListEpochsRequest(run_id=run.id, page_size=2),
                                        metadata=md)
    rest = await query_stub.ListEpochs(query_pb2.ListEpochsRequest(
        run_id=run.id, page_size=2, page_token=first.next_page_token), metadata=md)
    epochs = list(first.epochs) + list(rest.epochs)
    assert [(e.epoch, e.prediction_count, e.latest_step) for e in epochs] == [
        (1, 4, 10), (2, 4, 20), (3, 4, 30)]
    assert rest.next_page_token == ""
    assert all(e.first_create_time.ToDatetime() <= e.last_create_time.ToDatetime()
               for e in epochs)


async def test_compare_sample_shows_prompt_once_and_every_epoch(stack, writer_stub, query_stub):
    run, md = await seeded_run(stack, writer_stub, epochs=3, samples=2)
    reply = await query_stub.CompareSample(query_pb2.CompareSampleRequest(
        run_id=run.id, sample_index=1), metadata=md)
    assert (reply.prompt, reply.ground_truth) == ("prompt 1", "truth 1")
    assert [(p.epoch, p.step, p.prediction) for p in reply.predictions] == [
        (e, e * 10, f"prediction {e * 10}/1") for e in (1, 2, 3)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await query_stub.CompareSample(query_pb2.CompareSampleRequest(
            run_id=run.id, sample_index=99), metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_runs_newest_first_and_only_own(stack, writer_stub, query_stub):
    user = f"lister-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    ids = [(await create_run(writer_stub, md, name=f"r{i}")).id for i in range(5)]
    await create_run(writer_stub, stack.metadata("someone-else"))
    seen, token = [], ""
    while True:
        reply = await query_stub.ListRuns(query_pb2.ListRunsRequest(page_size=2,
                                                                    page_token=token), metadata=md)
        seen += [r.id for r in reply.runs]
        token = reply.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids))


async def test_other_users_run_is_not_found_everywhere(stack, writer_stub, query_stub):
    run, _ = await seeded_run(stack, writer_stub, user="alice")
    md = stack.metadata("mallory")
    calls = [
        query_stub.GetRun(query_pb2.GetRunRequest(run_id=run.id), metadata=md),
        query_stub.ListPredictions(query_pb2.ListPredictionsRequest(run_id=run.id), metadata=md),
        query_stub.ListEpochs(query_pb2.ListEpochsRequest(run_id=run.id), metadata=md),
        query_stub.CompareSample(query_pb2.CompareSampleRequest(run_id=run.id), metadata=md),
        query_stub.GetRun(query_pb2.GetRunRequest(run_id=str(uuid.uuid4())), metadata=md),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_query_needs_a_token(stack, query_stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await query_stub.ListRuns(query_pb2.ListRunsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
