"""What the web app's routes share: settings, the channel to the query service and the
calls over it, the one-time sign-in links, and the stopping flag."""

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import code_pb2
from starlette.requests import Request

from epochlens.v1 import query_pb2, query_pb2_grpc
from services.common.balancing import balancing_options
from services.web.config import WebSettings
from services.web.errors import ApiError, from_rpc_error, status_of
from services.web.httprules import Binding
from services.web.session import metadata
from trainer_client.tls import ClientTLS, open_aio_channel


class LinkStore:
    """One-time sign-in codes in memory: code -> token, each valid for ttl_s and taken once.
    In memory on purpose: a code never outlives the process (one replica serves the links it
    made)."""

    def __init__(self, ttl_s: float, max_pending: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s, self._max_pending, self._clock = ttl_s, max_pending, clock
        self._pending: dict[str, tuple[str, float]] = {}

    def add(self, token: str) -> str:
        """A new code for `token`; RESOURCE_EXHAUSTED when max_pending codes are unused."""
        self._drop_expired()
        if len(self._pending) >= self._max_pending:
            raise ApiError(status_of(code_pb2.RESOURCE_EXHAUSTED,
                                     f"{self._max_pending} sign-in links are waiting to be "
                                     "used; try again when some have expired"))
        code = secrets.token_urlsafe(32)
        self._pending[code] = (token, self._clock() + self._ttl_s)
        return code

    def take(self, code: str) -> str | None:
        """The token of `code`, once; None when unknown, used or expired."""
        self._drop_expired()
        found = self._pending.pop(code, None)
        return found[0] if found is not None else None

    def _drop_expired(self) -> None:
        now = self._clock()
        for code in [c for c, (_, until) in self._pending.items() if until <= now]:
            del self._pending[code]


@dataclass
class WebState:
    settings: WebSettings
    bindings: list[Binding]
    links: LinkStore
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # TLS of the channel to the query service (None: plaintext), read when the app is built.
    query_tls: ClientTLS | None = None
    channel: grpc.aio.Channel | None = None
    calls: dict[str, Any] = field(default_factory=dict)
    # The open event streams (services.web.sse.EventStream), each with its gRPC call.
    streams: set = field(default_factory=set)

    def open(self) -> None:
        """Opens the channel to the query service (inside the running event loop)."""
        self.channel = open_aio_channel(
            self.settings.query_address, self.query_tls,
            options=[("grpc.max_receive_message_length", self.settings.max_message_bytes),
                     *balancing_options(self.settings.query_lb_policy)])
        for binding in self.bindings:
            kind = self.channel.unary_stream if binding.streaming else self.channel.unary_unary
            self.calls[binding.method.name] = kind(
                binding.rpc_path, request_serializer=binding.request_class.SerializeToString,
                response_deserializer=binding.response_class.FromString)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    async def check_token(self, token: str) -> None:
        """Asks the query service whether it accepts `token` (ListRuns, one row): its refusal
        (UNAUTHENTICATED with its message, or UNAVAILABLE...) is raised as an ApiError."""
        stub = query_pb2_grpc.QueryServiceStub(self.channel)
        try:
            await stub.ListRuns(query_pb2.ListRunsRequest(page_size=1), metadata=metadata(token),
                                timeout=self.settings.query_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "ListRuns (token check)") from None


def web_state(request: Request) -> WebState:
    return request.app.state.web
