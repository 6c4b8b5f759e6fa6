"""The trace context the upload sends, when the training process traces.

opentelemetry-api is not a dependency of the light client: without it installed, or without
a recording span current where the StreamingClient is created, no traceparent is sent. With
one, every upload call carries it (W3C traceparent metadata), so the writer's spans, the
judge outbox hand-off and the judge's EnqueueJudging continue the trainer's trace.
"""

import logging

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"


def capture_traceparent() -> str | None:
    """The W3C traceparent of the calling thread's current span (None: none, or no
    opentelemetry installed)."""
    try:
        from opentelemetry.propagate import inject
    except ImportError:
        return None
    carrier: dict[str, str] = {}
    inject(carrier)
    traceparent = carrier.get(TRACEPARENT)
    if traceparent:
        log.debug("upload continues trace context %s", traceparent)
    return traceparent


def trace_metadata(traceparent: str | None) -> tuple[tuple[str, str], ...]:
    return ((TRACEPARENT, traceparent),) if traceparent else ()
