"""A server-streaming method (WatchRun) as server-sent events.

Each streamed message is one event: `data:` its proto3 JSON on one line, `id:` its
resume_token, so a browser's EventSource sends it back as Last-Event-ID when it reconnects;
that header (or a resume_token query parameter; the header wins, it is the newer one) fills
the request's resume_token. A comment line keeps a quiet stream open every
sse_keepalive_s. When the gRPC stream ends, a last `end` event says so (an EventSource would
otherwise reconnect: a client closes it on `end`). A gRPC error within watch_open_wait_s of
the request is answered with its HTTP status and Status body, like the unary routes; a later
one is a last `rpc-error` event whose data is the Status. A client that disconnects cancels
the gRPC call; a server that stops closes the stream (the browser reconnects and resumes).
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from services.web.errors import from_rpc_error, message_json, status_json
from services.web.httprules import Binding
from services.web.session import metadata
from services.web.state import WebState

log = logging.getLogger(__name__)

RESUME_FIELD = "resume_token"
KEEPALIVE = b": keepalive\n\n"
HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
MEDIA_TYPE = "text/event-stream"


def frame(data: object, event: str | None = None, event_id: str | None = None) -> bytes:
    """One event: optional `event:` and `id:` lines, then `data:` (JSON, one ASCII line)."""
    lines = [f"event: {event}"] if event else []
    if event_id:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode("ascii")


async def open_stream(request: Request, state: WebState, binding: Binding, message: Message,
                      token: str) -> Response:
    """Starts the call and waits up to watch_open_wait_s for its first message, so that an
    immediate refusal gets its own HTTP status (raised as ApiError)."""
    last_event_id = request.headers.get("last-event-id")
    if last_event_id and RESUME_FIELD in message.DESCRIPTOR.fields_by_name:
        setattr(message, RESUME_FIELD, last_event_id)
    call = state.calls[binding.method.name](message, metadata=metadata(token))
    first = asyncio.ensure_future(call.read())
    try:
        done, _ = await asyncio.wait({first}, timeout=state.settings.watch_open_wait_s)
        if done and isinstance(first.exception(), grpc.aio.AioRpcError):
            raise from_rpc_error(first.exception(), binding.method.name)
    except BaseException:
        first.cancel()
        call.cancel()
        raise
    return EventStreamResponse(EventStream(binding.method.name, call, first, state))


class EventStream:
    """The events of one call, from its first pending read on. Listed in state.streams
    from its creation until close()."""

    def __init__(self, method: str, call, first: asyncio.Future, state: WebState) -> None:
        self._method, self._call, self._read = method, call, first
        self._keepalive_s = state.settings.sse_keepalive_s
        self._stopping = state.stopping
        self._streams = state.streams
        self._streams.add(self)

    def close(self) -> None:
        """Cancels the pending read and the call (a no-op once the call has ended)."""
        self._read.cancel()
        self._call.cancel()
        self._streams.discard(self)

    async def events(self) -> AsyncIterator[bytes]:
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                done, _ = await asyncio.wait({self._read, stop}, timeout=self._keepalive_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if self._read in done:
                    chunk, more = self._take()
                    yield chunk
                    if not more:
                        return
                elif stop in done:
                    log.info("%s: server stopping, event stream closed", self._method)
                    return
                else:
                    yield KEEPALIVE
        finally:
            stop.cancel()
            self.close()

    def _take(self) -> tuple[bytes, bool]:
        """The finished read as an event, and whether the stream goes on (then the next read
        is started)."""
        try:
            message = self._read.result()
        except grpc.aio.AioRpcError as exc:
            return frame(status_json(from_rpc_error(exc, self._method).status),
                         event="rpc-error"), False
        if message is grpc.aio.EOF:
            return frame({}, event="end"), False
        self._read = asyncio.ensure_future(self._call.read())
        return frame(message_json(message), event_id=self._event_id(message)), True

    def _event_id(self, message: Message) -> str | None:
        if RESUME_FIELD not in message.DESCRIPTOR.fields_by_name:
            return None
        token = getattr(message, RESUME_FIELD)
        if any(c in token for c in "\r\n\x00"):
            log.error("%s: resume token with a line break or NUL left out of the event id "
                      "(the stream cannot be resumed from this event)", self._method)
            return None
        return token or None


class EventStreamResponse(StreamingResponse):
    """The stream as text/event-stream; its call is cancelled however the response ends
    (stream over, client gone, server stopping), even before the first event was sent."""

    def __init__(self, stream: EventStream) -> None:
        super().__init__(stream.events(), media_type=MEDIA_TYPE, headers=HEADERS)
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()
