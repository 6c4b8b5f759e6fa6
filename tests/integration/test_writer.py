"""The writer over real gRPC, on PostgreSQL and on SQLite."""

import uuid

import grpc
import pytest
from sqlalchemy import func, select

from epochlens.v1 import common_pb2, writer_pb2
from services.common.db import create_engine
from services.writer.config import WriterSettings
from services.writer.models import SCHEMA, predictions_table
from tests.conftest import PG_ADMIN, pg_url
from tests.helpers import create_run, error_reason, field_violations, grid, item, rich_status


async def stored_count(stack, run_id: str) -> int:
    """Rows of the run, counted directly in the database (as admin: no RLS)."""
    settings = (WriterSettings(port=0, database_url=pg_url(PG_ADMIN, stack.database))
                if stack.database else WriterSettings(port=0, sqlite_dir=stack.sqlite_dir))
    engine = create_engine(settings, (SCHEMA,))
    try:
        async with engine.connect() as conn:
            return await conn.scalar(select(func.count()).select_from(predictions_table).where(
                predictions_table.c.run_id == uuid.UUID(run_id)))
    finally:
        await engine.dispose()


async def test_create_run_returns_owned_running_run(stack, writer_stub):
    run = await create_run(writer_stub, stack.metadata("alice"), name="sft-1",
                           config={"predictions": {"sample_count": 5}})
    assert uuid.UUID(run.id)
    assert (run.user_id, run.name, run.state) == ("alice", "sft-1", common_pb2.RUN_STATE_RUNNING)
    assert run.config["predictions"]["sample_count"] == 5
    assert run.create_time.seconds > 0 and not run.HasField("finish_time")


async def test_create_run_is_idempotent_with_request_id(stack, writer_stub):
    md = stack.metadata("alice")
    first = await create_run(writer_stub, md, request_id="req-42")
    again = await create_run(writer_stub, md, request_id="req-42")
    other = await create_run(writer_stub, stack.metadata("bob"), request_id="req-42")
    assert first.id == again.id
    assert other.id != first.id


async def test_create_run_requires_name_and_model(stack, writer_stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await writer_stub.CreateRun(writer_pb2.CreateRunRequest(), metadata=stack.metadata("a"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(rich_status(err.value))) == {"name", "model_name"}


async def test_write_stores_rows_and_replay_adds_none(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    batch = writer_pb2.WritePredictionsRequest(run_id=run.id, predictions=grid(2, 5))
    first = await writer_stub.WritePredictions(batch, metadata=md)
    replay = await writer_stub.WritePredictions(batch, metadata=md)
    assert (first.inserted_count, first.duplicate_count) == (10, 0)
    assert (replay.inserted_count, replay.duplicate_count) == (0, 10)
    assert await stored_count(stack, run.id) == 10


async def test_bad_item_rejects_whole_batch_naming_it(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    items = [item(1, 0, prediction=""), item(-1, 1), item(1, 2, epoch=-1)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await writer_stub.WritePredictions(
            writer_pb2.WritePredictionsRequest(run_id=run.id, predictions=items), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(rich_status(err.value))
    assert set(violations) == {"predictions[1].step", "predictions[2].epoch"}
    assert await stored_count(stack, run.id) == 0


@pytest.mark.parametrize("field_name", ["prompt", "prediction", "ground_truth"])
async def test_text_over_limit_is_invalid(stack, writer_stub, field_name):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    too_long = "x" * (WriterSettings(port=0).max_text_chars + 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=run.id, predictions=[item(1, 0, **{field_name: too_long})]), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum" in field_violations(rich_status(err.value))[f"predictions[0].{field_name}"]


async def test_batch_over_limit_and_empty_batch_are_invalid(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    limit = WriterSettings(port=0).max_batch_size
    for items in ([], [item(i, 0) for i in range(limit + 1)]):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await writer_stub.WritePredictions(
                writer_pb2.WritePredictionsRequest(run_id=run.id, predictions=items), metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "predictions" in field_violations(rich_status(err.value))


async def test_malformed_run_id_is_invalid(stack, writer_stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id="not-a-uuid", predictions=[item(1, 0)]), metadata=stack.metadata("a"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "run_id" in field_violations(rich_status(err.value))


async def test_other_users_run_is_not_found_for_writes(stack, writer_stub):
    run = await create_run(writer_stub, stack.metadata("alice"))
    for call in (
        writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=run.id, predictions=[item(1, 0)]), metadata=stack.metadata("mallory")),
        writer_stub.FinishRun(writer_pb2.FinishRunRequest(run_id=run.id),
                              metadata=stack.metadata("mallory")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(rich_status(err.value)) == "NOT_FOUND"
    assert await stored_count(stack, run.id) == 0


async def test_finish_run_once(stack, writer_stub):
    md = stack.metadata("alice")
    run = await create_run(writer_stub, md)
    done = await writer_stub.FinishRun(writer_pb2.FinishRunRequest(
        run_id=run.id, state=common_pb2.RUN_STATE_FAILED), metadata=md)
    again = await writer_stub.FinishRun(writer_pb2.FinishRunRequest(run_id=run.id), metadata=md)
    assert done.state == again.state == common_pb2.RUN_STATE_FAILED
    assert done.finish_time == again.finish_time and done.HasField("finish_time")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await writer_stub.FinishRun(writer_pb2.FinishRunRequest(
            run_id=run.id, state=common_pb2.RUN_STATE_RUNNING), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("header", [None, "Bearer nonsense", "Basic abc", "Bearer "])
async def test_missing_or_invalid_token_is_unauthenticated(stack, writer_stub, header):
    metadata = () if header is None else (("authorization", header),)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_run(writer_stub, metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_expired_token_is_unauthenticated(stack, writer_stub):
    from services.common.auth import mint_token
    token = mint_token(stack.auth, "alice", ttl_s=1)
    import jwt
    claims = jwt.decode(token, options={"verify_signature": False})
    claims["exp"] = claims["iat"] - 3600
    expired = jwt.encode(claims, stack.auth.jwt_secret, algorithm="HS256")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_run(writer_stub, (("authorization", f"Bearer {expired}"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in err.value.details()
