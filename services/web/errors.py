"""Errors of the web service in one shape: a google.rpc.Status, answered as JSON (the API)
or as a small HTML page (browser navigations such as the sign-in link).

A QueryService error keeps its code, message and details (field violations included, read
from the call's trailing metadata); its HTTP status is the standard google.rpc mapping
(google/rpc/code.proto). The web service's own refusals (no token, bad parameter, cross-site
request) are built as the same Status.
"""

import html
import logging

import grpc
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

log = logging.getLogger(__name__)

HTTP_STATUS = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
}

# Answers that hold a user's data or token are never stored by a cache.
NO_STORE = {"Cache-Control": "no-store"}


class ApiError(Exception):
    """A refusal with its google.rpc.Status; http_status overrides the mapped one (413, 415)."""

    def __init__(self, status: status_pb2.Status, http_status: int | None = None) -> None:
        super().__init__(status.message)
        self.status = status
        self.http_status = http_status or HTTP_STATUS.get(status.code, 500)


def status_of(code: int, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message)


def bad_request(message: str, violations: list[tuple[str, str]]) -> ApiError:
    """INVALID_ARGUMENT with a google.rpc.BadRequest detail listing (field, description)."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
        for field, description in violations]))
    return ApiError(status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message,
                                      details=[detail]))


def unauthenticated(message: str) -> ApiError:
    return ApiError(status_of(code_pb2.UNAUTHENTICATED, message))


def from_rpc_error(exc: grpc.aio.AioRpcError, method: str) -> ApiError:
    """The QueryService's Status of a failed call (its details included), logged with the
    method: server-side failures at WARNING, the caller's own at INFO."""
    try:
        status = rpc_status.from_call(exc)
    except ValueError as mismatch:
        log.warning("%s: inconsistent rich status (%s); using the call's code and details",
                    method, mismatch)
        status = None
    if status is None:
        status = status_of(exc.code().value[0], exc.details() or "")
    error = ApiError(status)
    level = logging.WARNING if error.http_status >= 500 else logging.INFO
    log.log(level, "%s failed: %s: %s", method, exc.code().name, exc.details())
    return error


def message_json(message: Message) -> dict:
    """A response message in the proto3 JSON mapping (lowerCamelCase names, int64 as
    strings, enums by name), fields without presence printed even when zero or empty (a
    sample_index 0, an empty next_page_token) so a page never has to guess; fields with
    presence (optional, messages) only when set."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def status_json(status: status_pb2.Status) -> dict:
    """The Status in the proto3 JSON mapping: code, message, details (with @type)."""
    body = json_format.MessageToDict(status)
    body.setdefault("code", status.code)
    body.setdefault("message", status.message)
    return body


def json_error(error: ApiError) -> JSONResponse:
    return JSONResponse(status_json(error.status), status_code=error.http_status,
                        headers=NO_STORE)


def html_error(error: ApiError, title: str) -> HTMLResponse:
    """A small page (no script) saying what went wrong, escaped, with a way back to sign in."""
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)} - epochlens</title>"
        "<link rel=\"stylesheet\" href=\"/static/app.css\"></head>"
        f"<body><main><h1>{html.escape(title)}</h1><p>{html.escape(error.status.message)}</p>"
        "<p><a href=\"/login\">Sign in</a></p></main></body></html>\n")
    return HTMLResponse(page, status_code=error.http_status, headers=NO_STORE)


def wants_html(request: Request) -> bool:
    """Whether the caller is a browser navigation (Accept names text/html, not JSON)."""
    accept = request.headers.get("accept", "")
    return "text/html" in accept and "application/json" not in accept


def error_response(request: Request, error: ApiError, title: str) -> Response:
    """An HTML page for a browser navigation, the Status as JSON for anything else."""
    return html_error(error, title) if wants_html(request) else json_error(error)
