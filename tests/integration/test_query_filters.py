"""ListRuns filters (name, model, state) and the ListPredictions judgment filter (criterion,
passed) over real gRPC, on PostgreSQL and SQLite: exact rows, pages, and tokens bound to the
filters."""

import grpc
import pytest

from epochlens.v1 import common_pb2, query_pb2, writer_pb2
from tests.helpers import create_run, field_violations, rich_status
from tests.integration.test_query_judgments import EPOCHS, SAMPLES, judged_run


async def runs(query_stub, md, page_size: int = 0, **filters) -> list[str]:
    names, token = [], ""
    while True:
        reply = await query_stub.ListRuns(query_pb2.ListRunsRequest(
            page_size=page_size, page_token=token, **filters), metadata=md)
        names += [run.name for run in reply.runs]
        token = reply.next_page_token
        if not token:
            return names


async def test_list_runs_filters_by_name_model_and_state(stack, writer_stub, query_stub):
    md = stack.metadata("filter-user")
    made = {}
    for name, model in (("lr-1e-4 qwen", "Qwen/Qwen2-0.5B"), ("LR-3e-4 qwen", "Qwen/Qwen2-1.5B"),
                        ("baseline", "meta-llama/Llama-3.2-1B"), ("100%_done", "tiny")):
        made[name] = await create_run(writer_stub, md, name=name, model_name=model)
    await writer_stub.FinishRun(writer_pb2.FinishRunRequest(
        run_id=made["baseline"].id, state=common_pb2.RUN_STATE_FAILED), metadata=md)

    assert await runs(query_stub, md, name_contains="lr-") == ["LR-3e-4 qwen", "lr-1e-4 qwen"]
    assert await runs(query_stub, md, page_size=1, model_contains="qwen") == [
        "LR-3e-4 qwen", "lr-1e-4 qwen"]
    assert await runs(query_stub, md, state=common_pb2.RUN_STATE_FAILED) == ["baseline"]
    assert await runs(query_stub, md, state=common_pb2.RUN_STATE_RUNNING,
                      name_contains="qwen", model_contains="1.5b") == ["LR-3e-4 qwen"]
    # LIKE wildcards in the text are matched literally.
    assert await runs(query_stub, md, name_contains="%_") == ["100%_done"]
    assert await runs(query_stub, md, name_contains="_") == ["100%_done"]
    assert await runs(query_stub, stack.metadata("someone-else"), name_contains="qwen") == []


async def test_list_runs_token_is_bound_to_its_filters(stack, writer_stub, query_stub):
    md = stack.metadata("filter-token-user")
    for n in range(3):
        await create_run(writer_stub, md, name=f"run-{n}")
    first = await query_stub.ListRuns(query_pb2.ListRunsRequest(
        page_size=1, name_contains="run-"), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await query_stub.ListRuns(query_pb2.ListRunsRequest(
            page_size=1, name_contains="run-1", page_token=first.next_page_token), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(rich_status(err.value))


async def predictions(query_stub, md, run_id: str, **filters) -> list[tuple[int, int]]:
    keys, token = [], ""
    while True:
        reply = await query_stub.ListPredictions(query_pb2.ListPredictionsRequest(
            run_id=run_id, page_size=4, page_token=token, **filters), metadata=md)
        keys += [(p.epoch, p.sample_index) for p in reply.predictions]
        token = reply.next_page_token
        if not token:
            return keys


async def test_list_predictions_by_judgment_verdict(stack, writer_stub, query_stub):
    """seed_rows: chrf passes when epoch + sample >= 4; helpfulness (threshold 7, score
    epoch + sample + 4) passes when epoch + sample >= 3, and sample 3's is unscored."""
    md = stack.metadata("verdict-user")
    run_id = await judged_run(stack, writer_stub, "verdict-user")
    grid = [(e, s) for e in range(1, EPOCHS + 1) for s in range(SAMPLES)]
    assert await predictions(query_stub, md, run_id, criterion="chrf") == grid
    assert await predictions(query_stub, md, run_id, criterion="chrf", passed=True) == [
        (e, s) for e, s in grid if e + s >= 4]
    assert await predictions(query_stub, md, run_id, criterion="helpfulness",
                             passed=False) == [(1, 0), (1, 1), (2, 0)]
    assert await predictions(query_stub, md, run_id, criterion="helpfulness", passed=True,
                             epoch=3) == [(3, 0), (3, 1), (3, 2)]
    assert await predictions(query_stub, md, run_id, criterion="no-such-criterion") == []


async def test_passed_without_criterion_is_invalid(stack, writer_stub, query_stub):
    md = stack.metadata("verdict-user-2")
    run = await create_run(writer_stub, md)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await query_stub.ListPredictions(query_pb2.ListPredictionsRequest(
            run_id=run.id, passed=True), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(rich_status(err.value)) == {"passed": "needs criterion"}
