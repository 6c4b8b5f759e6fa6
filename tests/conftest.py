"""Shared fixtures: a fresh PostgreSQL database per test session, and the real
writer and query servers started in-process on port 0 against it (or against
the embedded SQLite store)."""

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest

from epochlens.v1 import query_pb2_grpc, writer_pb2_grpc
from services.common.auth import mint_token
from services.common.config import AuthSettings
from services.common.server import RunningServer
from services.judge.config import JudgeSettings
from services.judge.server import start as start_judge
from services.query.config import QuerySettings
from services.query.server import start as start_query
from services.writer.config import MigrateSettings, WriterSettings
from services.writer.migrate import migrate
from services.writer.server import start as start_writer

PG_HOST = os.environ.get("EPOCHLENS_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("EPOCHLENS_TEST_PG_PORT", "5432"))
PG_ADMIN = os.environ.get("EPOCHLENS_TEST_PG_ADMIN", "postgres")
WRITER_ROLE, READER_ROLE = "epochlens_writer", "epochlens_reader"
JUDGE_ROLE = "epochlens_judge"
JWT_SECRET = "test-secret-for-hs256-at-least-32-bytes-long"
PAGE_SECRET = "test-page-token-secret"


def pg_url(role: str, database: str) -> str:
    return f"postgresql+asyncpg://{role}@{PG_HOST}:{PG_PORT}/{database}"


@dataclass
class Stack:
    """Running writer, query and judge servers and how to call them."""

    backend: str
    writer: RunningServer
    query: RunningServer
    database: str | None
    sqlite_dir: Path | None
    auth: AuthSettings
    judge: RunningServer

    def metadata(self, user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {mint_token(self.auth, user)}"),)


@pytest.fixture(scope="session")
def auth_settings() -> AuthSettings:
    return AuthSettings(jwt_secret=JWT_SECRET, _env_file=None)


@asynccontextmanager
async def migrated_database(prefix: str) -> AsyncIterator[str]:
    """A new PostgreSQL database named epochlens_test_<prefix>_<random>, migrated by the
    migrate step (both schemas, the three roles); dropped on exit."""
    name = f"epochlens_test_{prefix}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_ADMIN, database="postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        await migrate(MigrateSettings(database_url=pg_url(PG_ADMIN, name),
                                      writer_role=WRITER_ROLE, reader_role=READER_ROLE,
                                      judge_role=JUDGE_ROLE, _env_file=None))
        yield name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
async def pg_database() -> AsyncIterator[str]:
    """A new database for the session, migrated; dropped after the session."""
    async with migrated_database("session") as name:
        yield name


async def _start_stack(backend: str, auth: AuthSettings, database: str | None,
                       sqlite_dir: Path | None) -> Stack:
    common = {"port": 0, "shutdown_grace_s": 0.5, "_env_file": None}
    if sqlite_dir is not None:
        common["sqlite_dir"] = sqlite_dir
    writer_url = pg_url(WRITER_ROLE, database) if database else None
    query_url = pg_url(READER_ROLE, database) if database else None
    judge_url = pg_url(JUDGE_ROLE, database) if database else None
    judge = await start_judge(JudgeSettings(database_url=judge_url, idle_poll_s=0.05,
                                            **common), auth)
    writer = await start_writer(WriterSettings(database_url=writer_url,
                                               judge_address=judge.address, outbox_poll_s=0.05,
                                               outbox_backoff_base_s=0.1,
                                               outbox_backoff_max_s=1.0,
                                               # every test of the session shares this writer
                                               # and 127.0.0.1 (the fuzz suite sends bad keys);
                                               # the limit has its own test on its own writer
                                               api_key_max_failures=1_000_000, **common), auth)
    query = await start_query(QuerySettings(database_url=query_url, page_token_secret=PAGE_SECRET,
                                            **common), auth)
    return Stack(backend, writer, query, database, sqlite_dir, auth, judge)


@pytest.fixture(scope="session", params=["postgres", "sqlite"])
async def stack(request, auth_settings, pg_database, tmp_path_factory) -> AsyncIterator[Stack]:
    """The services on PostgreSQL and, as a second parameter, on embedded SQLite."""
    if request.param == "postgres":
        running = await _start_stack("postgres", auth_settings, pg_database, None)
    else:
        sqlite_dir = tmp_path_factory.mktemp("sqlite")
        await migrate(MigrateSettings(sqlite_dir=sqlite_dir))
        running = await _start_stack("sqlite", auth_settings, None, sqlite_dir)
    yield running
    await running.writer.stop(0.5)
    await running.query.stop(0.5)
    await running.judge.stop(0.5)


@pytest.fixture
async def writer_stub(stack) -> AsyncIterator[writer_pb2_grpc.PredictionWriterServiceStub]:
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        yield writer_pb2_grpc.PredictionWriterServiceStub(channel)


@pytest.fixture
async def query_stub(stack) -> AsyncIterator[query_pb2_grpc.QueryServiceStub]:
    async with grpc.aio.insecure_channel(stack.query.address) as channel:
        yield query_pb2_grpc.QueryServiceStub(channel)
