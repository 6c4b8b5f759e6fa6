"""Fixtures of the web tests: the real web service started in-process on port 0 in front of
the real query service of the `stack` fixture (PostgreSQL only here), and HTTP clients."""

from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_status import rpc_status

from epochlens.v1 import query_pb2_grpc
from services.common.auth import mint_token
from services.web.config import WebSettings
from services.web.server import RunningWeb
from services.web.server import start as start_web
from tests.conftest import Stack, _start_stack


@pytest.fixture(scope="session")
async def stack(auth_settings, pg_database) -> AsyncIterator[Stack]:
    """The writer, query and judge services on PostgreSQL (the web tests need one backend:
    the web service reads through the query service only)."""
    running = await _start_stack("postgres", auth_settings, pg_database, None)
    yield running
    await running.writer.stop(0.5)
    await running.query.stop(0.5)
    await running.judge.stop(0.5)


def web_settings(query_address: str, **overrides) -> WebSettings:
    """Settings of a test web server: port 0, the given query service, short waits."""
    fields = {"port": 0, "query_address": query_address, "shutdown_grace_s": 0.5,
              "sse_keepalive_s": 1.0, "watch_open_wait_s": 0.5, "_env_file": None}
    return WebSettings(**{**fields, **overrides})


@pytest.fixture(scope="session")
async def web(stack) -> AsyncIterator[RunningWeb]:
    """The web service (its .url: http://127.0.0.1:<port>) in front of stack.query."""
    running = await start_web(web_settings(stack.query.address))
    yield running
    await running.stop()


@pytest.fixture
async def http(web) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the web service without a token (no redirects followed)."""
    async with httpx.AsyncClient(base_url=web.url, timeout=30.0) as client:
        yield client


def bearer(stack: Stack, user: str) -> dict[str, str]:
    """The Authorization header of a token for `user`."""
    return {"Authorization": f"Bearer {mint_token(stack.auth, user)}"}


HTTP_OF = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
           grpc.StatusCode.UNAUTHENTICATED: 401}


def field_violations(body: dict) -> list[dict]:
    """The fieldViolations of the google.rpc.BadRequest detail of a Status body."""
    (bad,) = [d for d in body["details"]
              if d["@type"] == "type.googleapis.com/google.rpc.BadRequest"]
    return bad["fieldViolations"]


async def grpc_answer(stack, method: str, request: Message, md) -> tuple[int, dict]:
    """(HTTP status, JSON body) the web service should give for this gRPC call's outcome."""
    async with grpc.aio.insecure_channel(stack.query.address) as channel:
        try:
            reply = await getattr(query_pb2_grpc.QueryServiceStub(channel), method)(
                request, metadata=md)
        except grpc.aio.AioRpcError as exc:
            status = rpc_status.from_call(exc)
            assert status is not None, f"{method}: no rich status"
            return HTTP_OF[exc.code()], json_format.MessageToDict(status)
    return 200, json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)
