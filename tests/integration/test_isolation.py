"""Row-level security on PostgreSQL: the database itself keeps users apart, so a
query that forgets its user filter still cannot see or write another user's rows."""

import asyncpg
import pytest

from epochlens.v1 import writer_pb2
from services.common.db import RLS_USER_SETTING
from tests.conftest import PG_ADMIN, PG_HOST, PG_PORT, READER_ROLE, WRITER_ROLE
from tests.helpers import create_run, grid

pytestmark = pytest.mark.parametrize("stack", ["postgres"], indirect=True)


@pytest.fixture
async def two_users_data(stack, writer_stub):
    runs = {}
    for user, samples in (("rls-alice", 3), ("rls-bob", 5)):
        md = stack.metadata(user)
        run = await create_run(writer_stub, md)
        await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=run.id, predictions=grid(2, samples)), metadata=md)
        runs[user] = run.id
    return runs


async def connect(stack, role: str) -> asyncpg.Connection:
    return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=role, database=stack.database)


async def count_as(conn: asyncpg.Connection, user: str | None, table: str) -> int:
    async with conn.transaction():
        if user is not None:
            await conn.execute("SELECT set_config($1, $2, true)", RLS_USER_SETTING, user)
        # Deliberately no user filter: only the policies separate the users.
        return await conn.fetchval(f"SELECT count(*) FROM writer.{table}")


async def test_unfiltered_reads_see_only_the_callers_rows(stack, two_users_data):
    reader = await connect(stack, READER_ROLE)
    admin = await connect(stack, PG_ADMIN)
    try:
        for user in ("rls-alice", "rls-bob"):
            expected = await admin.fetchval(
                "SELECT count(*) FROM writer.predictions WHERE user_id = $1", user)
            assert expected > 0
            assert await count_as(reader, user, "predictions") == expected
            assert await count_as(reader, user, "runs") == await admin.fetchval(
                "SELECT count(*) FROM writer.runs WHERE user_id = $1", user)
            assert await count_as(reader, user, "samples") == await admin.fetchval(
                "SELECT count(*) FROM writer.samples WHERE user_id = $1", user) > 0
        assert await count_as(reader, None, "predictions") == 0
        assert await count_as(reader, None, "samples") == 0
        assert await count_as(reader, "nobody", "runs") == 0
    finally:
        await reader.close()
        await admin.close()


async def test_writer_role_cannot_write_rows_for_another_user(stack, two_users_data):
    writer = await connect(stack, WRITER_ROLE)
    try:
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            async with writer.transaction():
                await writer.execute("SELECT set_config($1, 'rls-alice', true)", RLS_USER_SETTING)
                await writer.execute(
                    "INSERT INTO writer.predictions (run_id, user_id, epoch, step, sample_index,"
                    " prediction, generation_time_ms, create_time)"
                    " VALUES ($1, 'rls-bob', 1, 999, 0, 'x', 0, now())",
                    two_users_data["rls-bob"])
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            async with writer.transaction():
                await writer.execute("SELECT set_config($1, 'rls-alice', true)", RLS_USER_SETTING)
                await writer.execute(
                    "INSERT INTO writer.samples (run_id, sample_index, user_id, prompt)"
                    " VALUES ($1, 999, 'rls-bob', 'p')", two_users_data["rls-bob"])
    finally:
        await writer.close()


async def test_predictions_are_immutable_for_the_writer_role(stack, two_users_data):
    writer = await connect(stack, WRITER_ROLE)
    try:
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            async with writer.transaction():
                await writer.execute("SELECT set_config($1, 'rls-alice', true)", RLS_USER_SETTING)
                await writer.execute("UPDATE writer.predictions SET prediction = 'changed'")
    finally:
        await writer.close()


async def test_reader_role_cannot_write(stack, two_users_data):
    reader = await connect(stack, READER_ROLE)
    try:
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await reader.execute("DELETE FROM writer.runs")
    finally:
        await reader.close()
