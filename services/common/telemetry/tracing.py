"""OpenTelemetry traces, on when otel_endpoint is set (off: no interceptor, no exporter).

The servers get the instrumentation's aio server interceptor (outermost, so every other
interceptor and the handler run inside the server span); clients built with
client_interceptors() send the current context as W3C traceparent metadata. Work handed over
through a table (the writer's judge outbox) carries the traceparent of the request that wrote
it (current_traceparent) and continues it later (continued_span). The process's tracer
provider, with a batching OTLP gRPC exporter, is installed once at service start-up
(install_tracing), and flushed at exit (shutdown_tracing).
"""

import logging
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common.config import ServiceSettings

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
_propagator = TraceContextTextMapPropagator()
_tracer = trace.get_tracer("epochlens")


def tracing_on(settings: ServiceSettings) -> bool:
    return settings.otel_endpoint is not None


def server_interceptors(settings: ServiceSettings) -> list:
    """The tracing server interceptor, or none when tracing is off."""
    return [aio_server_interceptor()] if tracing_on(settings) else []


def client_interceptors(settings: ServiceSettings) -> list | None:
    """Interceptors of a channel to another service (None when tracing is off)."""
    return aio_client_interceptors() if tracing_on(settings) else None


def install_tracing(settings: ServiceSettings, label: str) -> None:
    """Installs the process's tracer provider exporting to otel_endpoint (nothing when
    tracing is off, or when a provider is installed already: one per process)."""
    if not tracing_on(settings):
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        log.info("a tracer provider is installed already in this process; spans go to it")
        return
    name = settings.otel_service_name or f"epochlens-{label}"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
        endpoint=settings.otel_endpoint, insecure=settings.otel_insecure)))
    trace.set_tracer_provider(provider)
    log.info("traces of %s exported to %s", name, settings.otel_endpoint)


def shutdown_tracing() -> None:
    """Flushes and stops the installed provider (a no-op when none is installed)."""
    shutdown = getattr(trace.get_tracer_provider(), "shutdown", None)
    if shutdown is not None:
        shutdown()


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, None outside a recorded trace."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get(TRACEPARENT)


def continued_span(name: str, traceparents: Iterable[str | None],
                   on: bool) -> AbstractContextManager:
    """A span continuing the first traceparent (its parent) and linking the others; a plain
    no-op block when tracing is off or none is given."""
    known = list(dict.fromkeys(tp for tp in traceparents if tp))
    if not on or not known:
        return nullcontext()
    return _continued(name, known)


@contextmanager
def _continued(name: str, traceparents: list[str]) -> Iterator[None]:
    parent = _propagator.extract({TRACEPARENT: traceparents[0]})
    links = []
    for other in traceparents[1:]:
        context = trace.get_current_span(_propagator.extract({TRACEPARENT: other}))
        links.append(Link(context.get_span_context()))
    with _tracer.start_as_current_span(name, context=parent, links=links,
                                       kind=SpanKind.PRODUCER):
        yield
