"""Reading a service's /metrics, and the process's in-memory span exporter, for the
telemetry tests."""

import asyncio
import time
import urllib.request
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

WAIT_S = 30.0
_exporter: InMemorySpanExporter | None = None

Samples = dict[tuple[str, frozenset], float]


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


async def scrape(port: int) -> Samples:
    """Every sample the endpoint serves, by (name, labels)."""
    body = await asyncio.to_thread(_get, port)
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def eventually(check: Callable[[], object], what: str, timeout_s: float = WAIT_S):
    """Awaits check() (a coroutine function) until it returns a true value; returns it."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


def span_exporter() -> InMemorySpanExporter:
    """The process's tracer provider exporting every ended span to memory (installed once:
    OpenTelemetry allows one provider per process)."""
    global _exporter
    if _exporter is None:
        _exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    return _exporter
