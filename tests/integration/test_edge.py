"""Hostile input against the real services (issue 8, items 1-4): NUL, NaN/inf, unparseable
bytes, deep Structs, huge integers, unknown enums. Every such request gets a precise status
(never INTERNAL or UNKNOWN) and what was stored before stays as it was."""

import math
import uuid

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2

from epochlens.v1 import judge_pb2, judge_pb2_grpc, query_pb2, writer_pb2
from services.common.auth import mint_token
from tests.helpers import create_run, field_violations, item, rich_status
from tests.integration.test_writer import stored_count

WRITER = "/epochlens.v1.PredictionWriterService/"


@pytest.fixture
async def judge_stub(stack):
    async with grpc.aio.insecure_channel(stack.judge.address) as channel:
        yield judge_pb2_grpc.JudgeServiceStub(channel)


async def invalid(call) -> dict[str, str]:
    """Awaits a call that must fail with INVALID_ARGUMENT; its field violations."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return field_violations(rich_status(err.value))


def struct(value: dict) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def _varint(value: int) -> bytes:
    out = b""
    while True:
        low, value = value & 0x7F, value >> 7
        out += bytes([low | (0x80 if value else 0)])
        if not value:
            return out


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def nested_struct_bytes(depth: int) -> bytes:
    """A serialized Struct nested `depth` levels ({"a": {"a": ...}}), built by hand: the
    protobuf runtime refuses to build one deeper than its own limit."""
    struct = b""
    for _ in range(depth):
        value = _field(5, struct)  # Value.struct_value
        struct = _field(1, _field(1, b"a") + _field(2, value))  # Struct.fields entry
    return struct


def nested_struct(depth: int) -> struct_pb2.Struct:
    root = struct_pb2.Struct()
    node = root
    for _ in range(depth - 1):
        node = node.fields["a"].struct_value
    node.fields["leaf"].number_value = 1
    return root


async def test_nul_in_model_texts_is_stored_replaced_and_reported(stack, writer_stub,
                                                                  query_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    batch = [item(1, 0, prompt="a\x00b", prediction="\x00", ground_truth="x\x00y"),
             item(1, 1, prediction="clean")]
    response = await writer_stub.WritePredictions(
        writer_pb2.WritePredictionsRequest(run_id=run.id, predictions=batch), metadata=md)
    assert response.inserted_count == 2
    assert list(response.nul_replaced_fields) == [
        "predictions[0].prompt", "predictions[0].ground_truth", "predictions[0].prediction"]
    page = await query_stub.ListPredictions(
        query_pb2.ListPredictionsRequest(run_id=run.id), metadata=md)
    first = page.predictions[0]
    assert (first.prompt, first.ground_truth, first.prediction) == (
        "a\ufffdb", "x\ufffdy", "\ufffd")
    assert page.predictions[1].prediction == "clean"


@pytest.mark.parametrize("fields, path", [
    ({"name": "run\x00"}, "name"),
    ({"request_id": "req\x00"}, "request_id"),
    ({"config": struct({"lr\x00": 1})}, "config"),
    ({"config": struct({"opt": {"name": "adam\x00"}})}, "config.opt.name"),
    ({"config": struct({"tags": ["ok", "bad\x00"]})}, "config.tags[1]"),
])
async def test_nul_in_identifiers_and_config_is_invalid_argument(stack, writer_stub, fields,
                                                                 path):
    request = writer_pb2.CreateRunRequest(**{"name": "run", "model_name": "tiny", **fields})
    violations = await invalid(writer_stub.CreateRun(request, metadata=stack.metadata("alice")))
    assert path in violations and "NUL" in violations[path]


async def test_nul_in_a_filter_and_in_human_reasoning_is_invalid_argument(
        stack, writer_stub, query_stub, judge_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    violations = await invalid(query_stub.ListJudgments(
        query_pb2.ListJudgmentsRequest(run_id=run.id, criterion="acc\x00"), metadata=md))
    assert "criterion" in violations
    human = judge_pb2.RecordHumanJudgmentRequest(
        prediction=judge_pb2.PredictionRef(run_id=run.id, step=1, sample_index=0),
        criterion="accuracy", score=1.0, threshold=0.5, reasoning="fine\x00")
    violations = await invalid(judge_stub.RecordHumanJudgment(human, metadata=md))
    assert "reasoning" in violations


async def test_jwt_subject_with_nul_is_unauthenticated(stack, writer_stub):
    token = mint_token(stack.auth, "mallory\x00")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_run(writer_stub, (("authorization", f"Bearer {token}"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_non_finite_numbers_are_field_violations(stack, writer_stub, judge_stub, value):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=[item(1, 0)]), metadata=md)
    bad = writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=[item(2, 0), item(2, 1, generation_time_ms=value)])
    assert "predictions[1].generation_time_ms" in await invalid(
        writer_stub.WritePredictions(bad, metadata=md))
    config = struct({"lr": 0.1})
    config.fields["lr"].number_value = value
    assert "config.lr" in await invalid(writer_stub.CreateRun(writer_pb2.CreateRunRequest(
        name="r", model_name="m", config=config), metadata=md))
    assert "config.lr" in await invalid(judge_stub.EstimateCost(
        judge_pb2.EstimateCostRequest(prediction_count=5, config=config), metadata=md))
    assert "config.lr" in await invalid(judge_stub.JudgePredictions(
        judge_pb2.JudgePredictionsRequest(config=config), metadata=md))
    assert await stored_count(stack, run.id) == 1


@pytest.mark.parametrize("field, value", [
    ("prediction_count", 2**63 - 1), ("average_item_tokens", 2**62), ("prediction_count", -2**63)])
async def test_huge_integers_are_field_violations(stack, judge_stub, field, value):
    request = judge_pb2.EstimateCostRequest(**{field: value})
    assert field in await invalid(judge_stub.EstimateCost(request,
                                                          metadata=stack.metadata("alice")))


async def test_huge_step_and_unknown_enum_are_field_violations(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    assert "predictions[0].step" in await invalid(writer_stub.WritePredictions(
        writer_pb2.WritePredictionsRequest(run_id=run.id, predictions=[item(2**60, 0)]),
        metadata=md))
    assert "state" in await invalid(writer_stub.FinishRun(
        writer_pb2.FinishRunRequest(run_id=run.id, state=99), metadata=md))


async def test_unparseable_requests_are_invalid_argument_in_plain_words(stack):
    good = writer_pb2.CreateRunRequest(name="abc", model_name="m").SerializeToString()
    assert good[:5] == b"\x0a\x03abc"
    invalid_utf8 = good[:4] + b"\xff" + good[5:]
    corrupt = b"\x0a\xff\xff\xff\xff\x0f"
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        create = channel.unary_unary(WRITER + "CreateRun")
        for payload in (invalid_utf8, corrupt):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await create(payload, metadata=stack.metadata("alice"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == "request could not be parsed as CreateRunRequest"
            assert "Error" not in err.value.details()


async def test_structs_deeper_than_the_limits_are_invalid_argument(stack, writer_stub):
    md = stack.metadata("alice")
    violations = await invalid(writer_stub.CreateRun(writer_pb2.CreateRunRequest(
        name="r", model_name="m", config=nested_struct(20)), metadata=md))
    [(path, description)] = violations.items()
    assert path.startswith("config.a.a") and "nested deeper than 16" in description
    beyond_protobuf = (writer_pb2.CreateRunRequest(name="r", model_name="m").SerializeToString()
                       + _field(4, nested_struct_bytes(120)))
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        create = channel.unary_unary(WRITER + "CreateRun")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create(beyond_protobuf, metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_thousand_violations_are_reported_capped_with_the_total(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    batch = [item(1, i, generation_time_ms=math.nan) for i in range(1000)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=run.id, predictions=batch), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rich_status(err.value)
    assert len(field_violations(status)) == 20
    info = error_details_pb2.ErrorInfo()
    [packed] = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    packed.Unpack(info)
    assert info.metadata["violation_count"] == "1000"


async def _stream(stub, md, requests):
    call = stub.StreamPredictions(metadata=md)
    for request in requests:
        await call.write(request)
    await call.done_writing()
    return [response async for response in call]


async def test_stream_rejects_a_non_finite_batch_alone_and_stores_nul_texts(
        stack, writer_stub, query_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    requests = [
        writer_pb2.StreamPredictionsRequest(sequence=1, run_id=run.id,
                                            predictions=[item(1, 0, prediction="a\x00")]),
        writer_pb2.StreamPredictionsRequest(sequence=2, run_id=run.id, predictions=[
            item(2, 0, generation_time_ms=math.inf)]),
        writer_pb2.StreamPredictionsRequest(sequence=3, run_id=run.id,
                                            predictions=[item(3, 0)]),
    ]
    responses = await _stream(writer_stub, md, requests)
    assert responses[-1].acked_sequence == 3
    rejections = [r for response in responses for r in response.rejections]
    assert [r.sequence for r in rejections] == [2]
    assert rejections[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    replaced = [f for response in responses for f in response.nul_replaced_fields]
    assert replaced == ["1:predictions[0].prediction"]
    page = await query_stub.ListPredictions(
        query_pb2.ListPredictionsRequest(run_id=run.id), metadata=md)
    assert [(p.step, p.prediction) for p in page.predictions] == [
        (1, "a\ufffd"), (3, "prediction 3/0")]


async def test_stream_of_unparseable_bytes_is_invalid_argument(stack):
    good = writer_pb2.StreamPredictionsRequest(sequence=1, run_id=str(uuid.uuid4()),
                                               predictions=[item(1, 0)]).SerializeToString()
    broken = good.replace(b"prompt 0", b"prompt \xff")
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        stream = channel.stream_stream(WRITER + "StreamPredictions")
        call = stream(metadata=stack.metadata("alice"))
        await call.write(broken)
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [response async for response in call]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
