"""The one place where RPCs are authenticated and errors become gRPC status codes.

Domain errors map to their own code with google.rpc details; a database that
cannot be reached maps to UNAVAILABLE (clients retry); anything else is
INTERNAL with a generic message and the traceback in the server log.
"""

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable

import grpc
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy import exc as sa_exc

from services.common.auth import TokenVerifier, set_current_user
from services.common.errors import DomainError

log = logging.getLogger(__name__)

PUBLIC_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
UNAVAILABLE_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError,
                      ConnectionError, OSError, TimeoutError)

error_counts: Counter[str] = Counter()


def _status_for(exc: BaseException, method: str) -> status_pb2.Status:
    if isinstance(exc, DomainError):
        error_counts[exc.reason] += 1
        return exc.to_status()
    if isinstance(exc, UNAVAILABLE_ERRORS) or _is_disconnect(exc):
        error_counts["UNAVAILABLE"] += 1
        log.warning("database unavailable during %s: %s: %s", method, type(exc).__name__, exc)
        return status_pb2.Status(code=code_pb2.UNAVAILABLE,
                                 message="database unavailable, retry later")
    error_counts["INTERNAL"] += 1
    log.error("unexpected error in %s (count=%d)", method, error_counts["INTERNAL"],
              exc_info=exc)
    return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")


def _is_disconnect(exc: BaseException) -> bool:
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    status = rpc_status.to_status(_status_for(exc, method))
    await context.abort(status.code, status.details, status.trailing_metadata)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every non-public RPC and maps its errors to status codes."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(PUBLIC_PREFIXES):
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, details.method),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, details.method),
                handler.request_deserializer, handler.response_serializer)
        raise TypeError(f"{details.method}: only unary-unary and stream-stream RPCs are served")

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        set_current_user(self._verifier.verify_header(metadata.get("authorization")))

    def _wrap_unary(self, inner: Callable, method: str) -> Callable:
        async def behavior(request, context: grpc.aio.ServicerContext):
            try:
                self._authenticate(context)
                return await inner(request, context)
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await _abort(context, exc, method)
        return behavior

    def _wrap_stream(self, inner: Callable, method: str) -> Callable:
        async def behavior(request_iterator, context: grpc.aio.ServicerContext) -> AsyncIterator:
            try:
                self._authenticate(context)
                async for response in inner(request_iterator, context):
                    yield response
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await _abort(context, exc, method)
        return behavior

