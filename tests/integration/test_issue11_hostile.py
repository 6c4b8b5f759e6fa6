"""Issue 11's new RPCs driven as a hostile or unlucky caller, on the real servers (PostgreSQL
and SQLite): EvaluationService.Evaluate with a request_id reused for another model, name or
config, the largest and smallest indices, no rows, a 1 MB prompt, invalid UTF-8 on the wire,
two concurrent calls of the same evaluation, another user's run id as request_id, and the
judge down mid-call (UNAVAILABLE, nothing lost, the same call later continues); CompareRuns
on runs without shared samples or judgments, with an epoch or max_changes out of range, and
another user's run as the baseline (NOT_FOUND with the same message as a missing run)."""

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from epochlens.v1 import common_pb2, evaluation_pb2_grpc, query_pb2
from services.common.convert import dict_to_struct
from services.writer.config import WriterSettings
from services.writer.server import start as start_writer
from tests.conftest import WRITER_ROLE, migrated_database, pg_url
from tests.helpers import create_run, error_reason, field_violations, item, rich_status
from tests.integration import test_evaluation as evaluation_tests
from tests.integration.test_compare import write_run
from tests.integration.test_evaluation import MAX_ROWS, evaluate, predictions, request, row, user

# test_evaluation's stack and clients, on this module's own database (below)
echo, estack, clients = evaluation_tests.echo, evaluation_tests.estack, evaluation_tests.clients
SAFE_MAX = 2**53 - 1  # the edge check's max_abs_integer (default)


@pytest.fixture(scope="module")
async def evaluation_database() -> AsyncIterator[str]:
    """This module's own database (test_evaluation's stack may be alive in the session)."""
    async with migrated_database("hostile") as name:
        yield name


async def refused(call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


@pytest.mark.parametrize("changed", [
    {"model_name": "vllm/another-model"}, {"name": "another name"},
    {"config": dict_to_struct({"judge": {"rules": {"criteria": ["exact_match"]}}})},
])
async def test_request_id_reused_for_another_model_name_or_config(estack, clients, changed):
    who, rid = user(), f"reuse-{uuid.uuid4().hex[:6]}"
    first = await evaluate(estack, clients, who, request([row(0, "a")], request_id=rid))
    error = await refused(evaluate(estack, clients, who, request(
        [row(1, "b")], request_id=rid, **changed)), grpc.StatusCode.FAILED_PRECONDITION)
    assert first.run.id in error.details() and next(iter(changed)) in error.details()
    assert error_reason(rich_status(error)) == "EVALUATION_CHANGED"
    assert [p.sample_index for p in await predictions(estack, clients, who, first.run.id)] == [0]
    # the same values continue the run; the dataset's name is only a label
    again = await evaluate(estack, clients, who, request(
        [row(1, "b")], request_id=rid, dataset_name="renamed.jsonl"))
    assert again.run.id == first.run.id and again.inserted_count == 1


async def test_largest_index_and_out_of_range_ones(estack, clients):
    who = user()
    reply = await evaluate(estack, clients, who, request([row(SAFE_MAX, "a"), row(SAFE_MAX - 1)],
                                                         request_id="big"))
    assert (reply.inserted_count, reply.generated_count) == (2, 1)
    stored = await predictions(estack, clients, who, reply.run.id)
    assert sorted(p.sample_index for p in stored) == [SAFE_MAX - 1, SAFE_MAX]
    for index in (2**63 - 1, -(2**63)):
        error = await refused(evaluate(estack, clients, who, request(
            [row(index, "a")], request_id="big")), grpc.StatusCode.INVALID_ARGUMENT)
        assert "rows[0].index" in field_violations(rich_status(error))


async def test_no_rows_with_finish_then_more_rows(estack, clients):
    who = user()
    done = await evaluate(estack, clients, who, request([], request_id="empty", finish=True))
    assert done.run.state == common_pb2.RUN_STATE_SUCCEEDED
    assert (done.inserted_count, done.duplicate_count, done.generated_count) == (0, 0, 0)
    later = await evaluate(estack, clients, who, request([row(0, "a")], request_id="empty"))
    assert later.run.id == done.run.id and later.run.state == common_pb2.RUN_STATE_SUCCEEDED
    assert later.inserted_count == 1


async def test_huge_prompt_and_invalid_utf8(estack, clients):
    who = user()
    error = await refused(evaluate(estack, clients, who, request(
        [row(0, "a", prompt="x" * 1_000_000)], request_id="huge")),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert "rows[0].prompt" in field_violations(rich_status(error))
    wire = request([row(0, "a", prompt="PROMPT")], request_id="utf8").SerializeToString()
    broken = wire.replace(b"PROMPT", b"PR\xff\xfeMT")
    async with grpc.aio.insecure_channel(estack.writer.address) as channel:
        call = channel.unary_unary("/epochlens.v1.EvaluationService/Evaluate",
                                   request_serializer=None, response_deserializer=None)
        await refused(call(broken, metadata=estack.md(who)), grpc.StatusCode.INVALID_ARGUMENT)


async def test_rows_beyond_max_batch_size(estack, clients):
    error = await refused(evaluate(estack, clients, user(), request(
        [row(i, "a") for i in range(MAX_ROWS + 1)], request_id="many")),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert "rows" in field_violations(rich_status(error))


async def test_concurrent_calls_of_one_evaluation_store_each_row_once(estack, clients):
    who = user()
    given = [request([row(i, f"r{i}") for i in range(0, 6)], request_id="race"),
             request([row(i, f"r{i}") for i in range(3, 9)], request_id="race")]
    replies = await asyncio.gather(*(evaluate(estack, clients, who, r) for r in given))
    assert replies[0].run.id == replies[1].run.id
    assert sum(r.inserted_count for r in replies) == 9
    assert sum(r.duplicate_count for r in replies) == 3
    generate = [request([row(i) for i in range(10, 14)], request_id="race") for _ in range(2)]
    replies = await asyncio.gather(*(evaluate(estack, clients, who, r) for r in generate))
    assert sum(r.inserted_count for r in replies) == 4
    stored = await predictions(estack, clients, who, replies[0].run.id)
    assert sorted(p.sample_index for p in stored) == [*range(9), *range(10, 14)]
    # both calls may generate a row neither had stored yet; it is stored once
    assert 4 <= len(estack.echo.requests) <= 8


async def test_another_users_run_id_as_request_id_is_a_new_run(estack, clients):
    alice, bob = user(), user()
    theirs = await evaluate(estack, clients, alice, request([row(0, "alice")]))
    mine = await evaluate(estack, clients, bob, request([row(0, "bob")],
                                                        request_id=theirs.run.id))
    assert mine.run.id != theirs.run.id and mine.inserted_count == 1
    assert [p.prediction for p in await predictions(estack, clients, alice, theirs.run.id)] == [
        "alice"]


async def test_judge_down_is_unavailable_and_the_same_call_continues(
        estack, clients, evaluation_database, auth_settings):
    """A writer of the same database whose judge is away (a closed port)."""
    if estack.backend != "postgres":
        pytest.skip("a second writer on the same SQLite files is not a deployment")
    writer = await start_writer(WriterSettings(
        database_url=pg_url(WRITER_ROLE, evaluation_database), judge_address="127.0.0.1:9",
        outbox_poll_s=0.05, evaluation_generate_timeout_s=2.0, port=0,
        _env_file=None), auth_settings)
    who = user()
    req = request([row(0, "given"), row(1), row(2)], request_id="judge-down", finish=True)
    try:
        async with grpc.aio.insecure_channel(writer.address) as channel:
            stub = evaluation_pb2_grpc.EvaluationServiceStub(channel)
            error = await refused(stub.Evaluate(req, metadata=estack.md(who)),
                                  grpc.StatusCode.UNAVAILABLE)
        assert "repeat the call" in error.details()
    finally:
        await writer.stop(0)
    again = await evaluate(estack, clients, who, req)
    assert (again.inserted_count, again.duplicate_count, again.generated_count) == (2, 1, 2)
    assert again.run.state == common_pb2.RUN_STATE_SUCCEEDED
    assert len(await predictions(estack, clients, who, again.run.id)) == 3


# CompareRuns ------------------------------------------------------------------------------

async def compare(stub, md, **fields) -> query_pb2.CompareRunsResponse:
    return await stub.CompareRuns(query_pb2.CompareRunsRequest(**fields), metadata=md)


async def test_compare_runs_without_shared_samples_or_judgments(stack, writer_stub, query_stub):
    who = f"cmp-hostile-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(who)
    a = await write_run(stack, writer_stub, who, [item(1, s, epoch=1) for s in range(3)])
    b = await write_run(stack, writer_stub, who, [
        item(1, s, epoch=1, prompt=f"other {s}") for s in range(3)])
    apart = await compare(query_stub, md, run_id=a, baseline_run_id=b)
    assert (apart.shared_samples, list(apart.deltas), list(apart.changes)) == (0, [], [])
    alone = await compare(query_stub, md, run_id=a)  # one epoch, no judgments
    assert (alone.epoch, alone.baseline_epoch, alone.shared_samples) == (1, 1, 3)
    assert list(alone.deltas) == []
    huge = await compare(query_stub, md, run_id=a, max_changes=2**31 - 1)  # int32: clamped
    assert list(huge.changes) == []
    for fields, field in (({"epoch": 2**63 - 1}, "epoch"), ({"epoch": SAFE_MAX}, "epoch"),
                          ({"baseline_epoch": 2}, "baseline_epoch"),
                          ({"baseline_choice": query_pb2.EPOCH_CHOICE_BEST,
                            "best_criterion": "no\u00e9such"}, "best_criterion")):
        error = await refused(compare(query_stub, md, run_id=a, **fields),
                              grpc.StatusCode.INVALID_ARGUMENT)
        assert field in field_violations(rich_status(error)), fields


async def test_compare_with_another_users_baseline_leaks_nothing(stack, writer_stub,
                                                                 query_stub):
    owner, other = (f"cmp-leak-{uuid.uuid4().hex[:6]}" for _ in range(2))
    mine = await write_run(stack, writer_stub, owner, [item(1, 0, epoch=1)])
    theirs = await write_run(stack, writer_stub, other, [item(1, 0, epoch=1)])
    missing = str(uuid.uuid4())
    md = stack.metadata(owner)
    messages = []
    for baseline in (theirs, missing):
        error = await refused(compare(query_stub, md, run_id=mine, baseline_run_id=baseline),
                              grpc.StatusCode.NOT_FOUND)
        messages.append(error.details().replace(baseline, "ID"))
    assert messages[0] == messages[1]
    empty = await create_run(writer_stub, stack.metadata(other))
    error = await refused(compare(query_stub, md, run_id=mine, baseline_run_id=empty.id),
                          grpc.StatusCode.NOT_FOUND)  # not "has no predictions"
    assert error.details().replace(empty.id, "ID") == messages[0]
