"""The JSON API: one route per google.api.http binding of QueryService.

A unary method answers its response message in the proto3 JSON mapping (lowerCamelCase
names, int64 as strings, enums by name, zero values printed: services.web.errors.message_json).
A server-streaming method (WatchRun) answers server-sent events (services.web.sse). The
caller's token goes to the query service as `authorization: Bearer <token>`; a refusal
keeps its google.rpc.Status.
"""

from collections.abc import Awaitable, Callable

import grpc
from google.rpc import code_pb2
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.web import sse
from services.web.errors import (
    NO_STORE,
    ApiError,
    from_rpc_error,
    json_error,
    message_json,
    status_of,
)
from services.web.httprules import Binding
from services.web.params import build_request
from services.web.session import metadata, request_token
from services.web.state import web_state

Endpoint = Callable[[Request], Awaitable[Response]]


def routes(bindings: list[Binding]) -> list[Route]:
    """A GET route per binding, then a JSON 404 for any other path under /v1/."""
    found = [Route(b.path, _endpoint(b), methods=["GET"], name=f"{b.method.name}:{index}")
             for index, b in enumerate(bindings)]
    prefixes = sorted({"/" + b.template.strip("/").split("/")[0] for b in bindings})
    found += [Route(prefix + "/{rest:path}", _no_route, methods=["GET"]) for prefix in prefixes]
    return found


def _endpoint(binding: Binding) -> Endpoint:
    stream = binding.streaming

    async def endpoint(request: Request) -> Response:
        state = web_state(request)
        try:
            token = request_token(request, state.settings)
            message = build_request(binding, request.path_params,
                                    request.query_params.multi_items())
            if stream and request.method == "HEAD":  # headers only: no stream to hold open
                return Response(media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
            if stream:
                return await sse.open_stream(request, state, binding, message, token)
            reply = await _call(state.calls[binding.method.name], binding, message, token,
                                state.settings.query_timeout_s)
        except ApiError as error:
            return json_error(error)
        return JSONResponse(message_json(reply), headers=NO_STORE)

    return endpoint


async def _call(method, binding: Binding, message, token: str, timeout_s: float):
    try:
        return await method(message, metadata=metadata(token), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc, binding.method.name) from None


async def _no_route(request: Request) -> Response:
    return json_error(ApiError(status_of(
        code_pb2.NOT_FOUND, f"no API route {request.method} {request.url.path}")))
