"""The one place where RPCs are authenticated, requests pass the edge check, and
errors become gRPC status codes.

A request that cannot be parsed (invalid UTF-8 in a string field, corrupt
bytes, nesting beyond protobuf's limit) is INVALID_ARGUMENT with a plain
message; every parsed request goes through services.common.validation before
the servicer runs (on a client stream, each message: one that fails reaches
the servicer as a RejectedRequest, so a stream can reject one batch and go on).
Domain errors map to their own code with google.rpc details; a database that
cannot be reached maps to UNAVAILABLE (clients retry); anything else is
INTERNAL with a generic message and the traceback in the server log.
"""

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy import exc as sa_exc

from services.common.auth import TokenVerifier, set_current_user
from services.common.errors import DomainError, FieldViolation, InvalidArgument
from services.common.validation import RequestChecker

log = logging.getLogger(__name__)

PUBLIC_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# Methods that take no bearer token (their request carries its own credential) but still
# pass the edge check and the error mapping: the API key exchange.
TOKENLESS_METHODS = frozenset({"/epochlens.v1.AuthService/ExchangeApiKey"})
UNAVAILABLE_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError,
                      ConnectionError, OSError, TimeoutError)

# How a missing table or schema shows: PostgreSQL SQLSTATEs, SQLite message prefixes.
MISSING_SCHEMA_SQLSTATES = frozenset({"42P01", "3F000"})
MISSING_SCHEMA_MARKERS = ("no such table:", "unknown database")

error_counts: Counter[str] = Counter()


@dataclass(frozen=True)
class Unparseable:
    """What the wrapped deserializer returns for bytes that do not parse."""

    type_name: str


@dataclass(frozen=True)
class RejectedRequest:
    """A client-stream message that failed the edge check; the servicer settles it."""

    request: Message
    error: InvalidArgument


def _unparseable_error(request: Unparseable) -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation("(request)", f"not a valid {request.type_name}: invalid UTF-8 in a "
                        "string field, nesting beyond the protobuf limit, or corrupt bytes")],
        message=f"request could not be parsed as {request.type_name}")


def _safe_deserializer(deserializer: Callable | None, method: str) -> Callable | None:
    """The handler's deserializer, returning Unparseable instead of raising."""
    if deserializer is None:
        return None
    type_name = method.rsplit("/", 1)[-1] + "Request"

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except (DecodeError, RecursionError, UnicodeDecodeError, ValueError) as exc:
            error_counts["UNPARSEABLE"] += 1
            log.warning("unparseable request to %s (%d so far): %s", method,
                        error_counts["UNPARSEABLE"], exc)
            return Unparseable(type_name)
    return deserialize


def _status_for(exc: BaseException, method: str,
                max_violations: int | None = None) -> status_pb2.Status:
    if isinstance(exc, InvalidArgument):
        error_counts[exc.reason] += 1
        return exc.to_status(max_violations)
    if isinstance(exc, DomainError):
        error_counts[exc.reason] += 1
        return exc.to_status()
    if _is_missing_schema(exc):
        error_counts["SCHEMA_MISSING"] += 1
        log.error("database schema missing during %s (%d so far): %s", method,
                  error_counts["SCHEMA_MISSING"], exc)
        return status_pb2.Status(code=code_pb2.FAILED_PRECONDITION,
                                 message="the database is not migrated: run epochlens-migrate")
    if isinstance(exc, UNAVAILABLE_ERRORS) or _is_disconnect(exc):
        error_counts["UNAVAILABLE"] += 1
        log.warning("database unavailable during %s: %s: %s", method, type(exc).__name__, exc)
        return status_pb2.Status(code=code_pb2.UNAVAILABLE,
                                 message="database unavailable, retry later")
    error_counts["INTERNAL"] += 1
    log.error("unexpected error in %s (count=%d)", method, error_counts["INTERNAL"],
              exc_info=exc)
    return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")


def _is_missing_schema(exc: BaseException) -> bool:
    """A table or schema that does not exist: not transient, retrying cannot help (SQLite
    reports it as an OperationalError, PostgreSQL as SQLSTATE 42P01 / 3F000)."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return sqlstate in MISSING_SCHEMA_SQLSTATES or any(
        marker in str(exc.orig) for marker in MISSING_SCHEMA_MARKERS)


def _is_disconnect(exc: BaseException) -> bool:
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str,
                 max_violations: int) -> None:
    status = rpc_status.to_status(_status_for(exc, method, max_violations))
    await context.abort(status.code, status.details, status.trailing_metadata)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every non-public RPC, checks its requests at the edge and maps its
    errors to status codes. `max_violations` bounds the field violations one error
    carries (they travel in trailing metadata, which has a size limit)."""

    def __init__(self, verifier: TokenVerifier, checker: RequestChecker,
                 max_violations: int) -> None:
        self._verifier = verifier
        self._checker = checker
        self._max_violations = max_violations

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(PUBLIC_PREFIXES):
            return handler
        deserializer = _safe_deserializer(handler.request_deserializer, details.method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, details.method),
                deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, details.method, self._checked),
                deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, details.method),
                deserializer, handler.response_serializer)
        raise TypeError(f"{details.method}: client-streaming RPCs are not served")

    def _authenticate(self, context: grpc.aio.ServicerContext, method: str) -> None:
        if method in TOKENLESS_METHODS:
            return
        metadata = dict(context.invocation_metadata() or ())
        set_current_user(self._verifier.verify_header(metadata.get("authorization")))

    def _checked(self, request):
        """The request once it passed the edge check (raises InvalidArgument otherwise)."""
        if isinstance(request, Unparseable):
            raise _unparseable_error(request)
        self._checker.check(request)
        return request

    async def _checked_stream(self, request_iterator: AsyncIterator) -> AsyncIterator:
        async for request in request_iterator:
            if isinstance(request, Unparseable):
                raise _unparseable_error(request)
            try:
                self._checker.check(request)
            except InvalidArgument as exc:
                error_counts["REJECTED_STREAM_MESSAGES"] += 1
                yield RejectedRequest(request, exc)
                continue
            yield request

    def _wrap_unary(self, inner: Callable, method: str) -> Callable:
        async def behavior(request, context: grpc.aio.ServicerContext):
            try:
                self._authenticate(context, method)
                return await inner(self._checked(request), context)
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await _abort(context, exc, method, self._max_violations)
        return behavior

    def _wrap_stream(self, inner: Callable, method: str,
                     check: Callable | None = None) -> Callable:
        """A streaming handler (stream-stream; with check=self._checked, unary-stream)
        behind authentication, the edge check and the error mapping."""
        check = check or self._checked_stream

        async def behavior(request, context: grpc.aio.ServicerContext) -> AsyncIterator:
            try:
                self._authenticate(context, method)
                async for response in inner(check(request), context):
                    yield response
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await _abort(context, exc, method, self._max_violations)
        return behavior

