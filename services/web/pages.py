"""The pages: static/index.html for every page path (the page's script routes on
location.pathname), static/ under /static/, /healthz, and the security headers every
response carries."""

import logging
from pathlib import Path

import grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from epochlens.v1 import query_pb2
from services.web.errors import NO_STORE, ApiError, html_error, status_of
from services.web.state import web_state

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_PATHS = ("/", "/login", "/compare", "/runs/{run_id}", "/runs/{run_id}/samples/{sample_index}",
              "/runs/{run_id}/vs")  # the last: one epoch against a baseline (CompareRuns)
QUERY_SERVICE = query_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class SecurityHeaders:
    """ASGI wrapper that sets SECURITY_HEADERS on every HTTP response, errors included (it
    sits outside Starlette's own error handling)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def index(request: Request) -> Response:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        log.error("page %s asked for, but %s is missing", request.url.path, page)
        missing = status_of(code_pb2.NOT_FOUND,
                            f"The web pages are not installed ({page.name} is missing).")
        return html_error(ApiError(missing), "Page not found")
    return FileResponse(page, media_type="text/html", headers={"Cache-Control": "no-cache"})


async def healthz(request: Request) -> Response:
    """200 when the query service reports SERVING (and this server is not stopping), else
    503; the body says what the query service reported and how many event streams are
    open."""
    state = web_state(request)
    if state.stopping.is_set():
        return JSONResponse({"status": "NOT_SERVING", "web": "stopping"}, status_code=503,
                            headers=NO_STORE)
    try:
        reply = await health_pb2_grpc.HealthStub(state.channel).Check(
            health_pb2.HealthCheckRequest(service=QUERY_SERVICE),
            timeout=state.settings.health_timeout_s)
        query = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.aio.AioRpcError as exc:
        query = f"{exc.code().name}: {exc.details()}"
        log.warning("health check of the query service at %s failed: %s",
                    state.settings.query_address, query)
    serving = query == "SERVING"
    return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING", "query": query,
                         "streams": len(state.streams)},
                        status_code=200 if serving else 503, headers=NO_STORE)


ROUTES = [
    *(Route(path, index, methods=["GET"]) for path in PAGE_PATHS),
    Route("/healthz", healthz, methods=["GET"]),
    Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
]
