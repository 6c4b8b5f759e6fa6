"""Fixtures of the web tests: the real web service started in-process on port 0 in front of
the real query service of the `stack` fixture (PostgreSQL only here), and HTTP clients."""

from collections.abc import AsyncIterator

import httpx
import pytest

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
