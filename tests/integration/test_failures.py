"""Failure paths: a database that cannot be reached is UNAVAILABLE, never INTERNAL."""

import socket
import sqlite3

import grpc
import pytest
from google.rpc import code_pb2
from sqlalchemy import exc as sa_exc

from epochlens.v1 import query_pb2, query_pb2_grpc, writer_pb2_grpc
from services.common.interceptors import _status_for
from services.query.config import QuerySettings
from services.query.server import start as start_query
from services.writer.config import WriterSettings
from services.writer.server import start as start_writer
from tests.conftest import PAGE_SECRET
from tests.helpers import create_run


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dead_db_url() -> str:
    return f"postgresql+asyncpg://nobody@127.0.0.1:{closed_port()}/none"


async def test_writer_with_unreachable_database_is_unavailable(auth_settings, dead_db_url):
    from services.common.auth import mint_token
    running = await start_writer(WriterSettings(port=0, database_url=dead_db_url,
                                                db_connect_timeout_s=1, _env_file=None),
                                 auth_settings)
    md = (("authorization", f"Bearer {mint_token(auth_settings, 'alice')}"),)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await create_run(writer_pb2_grpc.PredictionWriterServiceStub(channel), md)
    finally:
        await running.stop(0)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "traceback" not in err.value.details().lower()


async def test_query_with_unreachable_database_is_unavailable(auth_settings, dead_db_url):
    from services.common.auth import mint_token
    running = await start_query(QuerySettings(port=0, database_url=dead_db_url,
                                              db_connect_timeout_s=1,
                                              page_token_secret=PAGE_SECRET, _env_file=None),
                                auth_settings)
    md = (("authorization", f"Bearer {mint_token(auth_settings, 'alice')}"),)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await query_pb2_grpc.QueryServiceStub(channel).ListRuns(
                    query_pb2.ListRunsRequest(), metadata=md)
    finally:
        await running.stop(0)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_unexpected_error_is_internal_with_a_generic_message(caplog):
    status = _status_for(KeyError("secret detail"), "/epochlens.v1.X/Y")
    assert status.code == code_pb2.INTERNAL
    assert status.message == "internal error"
    assert "secret detail" in caplog.text


def test_a_missing_table_is_failed_precondition_not_a_transient_outage():
    """SQLite says "no such table" through an OperationalError, the class of a dead
    connection: a client told UNAVAILABLE would retry forever."""
    missing = sa_exc.OperationalError("SELECT 1", {},
                                      sqlite3.OperationalError("no such table: writer.runs"))
    status = _status_for(missing, "/epochlens.v1.X/Y")
    assert status.code == code_pb2.FAILED_PRECONDITION
    assert status.message == "the database is not migrated: run epochlens-migrate"
    locked = sa_exc.OperationalError("SELECT 1", {},
                                     sqlite3.OperationalError("database is locked"))
    assert _status_for(locked, "/epochlens.v1.X/Y").code == code_pb2.UNAVAILABLE
