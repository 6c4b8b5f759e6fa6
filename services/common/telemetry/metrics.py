"""Prometheus metrics of a service process: one interceptor counts every RPC by method and
status code and times it by method; the endpoint serves the process's registry on
metrics_port; PeriodicGauge refreshes gauges that need a database query on a timer, so a
scrape (however frequent) never touches the database."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import Counter, Histogram, disable_created_metrics, start_http_server

from services.common.config import ServiceSettings
from services.common.startup import StartupError
from services.common.telemetry.logs import bind_run_id

log = logging.getLogger(__name__)

# No `*_created` series next to every counter: they double the scrape for nothing we read.
disable_created_metrics()

RPCS = Counter("epochlens_rpc_requests", "RPCs served, by full method and gRPC status code.",
               ["method", "code"])
RPC_SECONDS = Histogram("epochlens_rpc_duration_seconds",
                        "Time to serve an RPC (a stream: until it ends), by full method.",
                        ["method"])
OK = grpc.StatusCode.OK.name


def _code_of(context: grpc.aio.ServicerContext, failed: BaseException | None) -> str:
    """The status the RPC ends with: the one set or aborted with, else OK, or CANCELLED /
    UNKNOWN for a handler that was cancelled or raised without setting one."""
    code = context.code()
    if code is not None:
        return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code).name
    if isinstance(failed, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    return OK if failed is None else grpc.StatusCode.UNKNOWN.name


def _record(method: str, context: grpc.aio.ServicerContext, started: float,
            failed: BaseException | None, record: bool) -> None:
    if not record:
        return
    RPCS.labels(method, _code_of(context, failed)).inc()
    RPC_SECONDS.labels(method).observe(time.perf_counter() - started)


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC (health and reflection included), unary and streaming
    (record=False: not); binds the request's run_id (when it has one) to the log lines of a
    unary-request RPC."""

    def __init__(self, record: bool = True) -> None:
        self._record = record

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        wrap, make = _WRAPPERS[(handler.request_streaming, handler.response_streaming)]
        behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                    or handler.stream_stream)
        return make(wrap(behavior, details.method, self._record), handler.request_deserializer,
                    handler.response_serializer)


def rpc_interceptors(settings: ServiceSettings) -> list[RpcMetricsInterceptor]:
    """The metrics interceptor when the metrics endpoint or JSON logs (run_id) are on; none
    otherwise, so a service with both off pays nothing."""
    if metrics_on(settings) or settings.log_format == "json":
        return [RpcMetricsInterceptor(record=metrics_on(settings))]
    return []


def _wrap_unary(behavior: Callable, method: str, record: bool) -> Callable:
    async def counted(request, context: grpc.aio.ServicerContext):
        started, failed = time.perf_counter(), None
        try:
            with bind_run_id(getattr(request, "run_id", None)):
                return await behavior(request, context)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            _record(method, context, started, failed, record)
    return counted


def _wrap_stream(behavior: Callable, method: str, record: bool,
                 unary_request: bool) -> Callable:
    async def counted(request, context: grpc.aio.ServicerContext) -> AsyncIterator:
        started, failed = time.perf_counter(), None
        run_id = getattr(request, "run_id", None) if unary_request else None
        try:
            with bind_run_id(run_id):
                async for response in behavior(request, context):
                    yield response
        except BaseException as exc:
            failed = exc
            raise
        finally:
            _record(method, context, started, failed, record)
    return counted


_WRAPPERS = {
    (False, False): (_wrap_unary, grpc.unary_unary_rpc_method_handler),
    (True, False): (_wrap_unary, grpc.stream_unary_rpc_method_handler),
    (False, True): (lambda b, m, r: _wrap_stream(b, m, r, True),
                    grpc.unary_stream_rpc_method_handler),
    (True, True): (lambda b, m, r: _wrap_stream(b, m, r, False),
                   grpc.stream_stream_rpc_method_handler),
}


@dataclass
class MetricsEndpoint:
    """The HTTP server of /metrics (prometheus_client's, in its own thread)."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def start_metrics_endpoint(host: str, port: int | None) -> MetricsEndpoint | None:
    """Serves the process registry on host:port (None: no endpoint; 0: a free port)."""
    if port is None:
        return None
    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return MetricsEndpoint(server, thread)


def metrics_on(settings: ServiceSettings) -> bool:
    return settings.metrics_port is not None


class PeriodicGauge:
    """Runs `refresh` (an async database read that sets gauges) every `interval_s` in a task;
    a failed refresh is logged and the gauges keep their last values."""

    def __init__(self, name: str, refresh: Callable[[], Awaitable[None]],
                 interval_s: float) -> None:
        self._name = name
        self._refresh = refresh
        self._interval_s = interval_s
        self._task: asyncio.Task | None = None
        self.failures = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"gauge-{self._name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self._refresh()
            except Exception:
                self.failures += 1
                log.exception("refreshing the %s gauges failed (%d failures so far); next try "
                              "in %.1fs", self._name, self.failures, self._interval_s)
            await asyncio.sleep(self._interval_s)
