"""Log lines as text or JSON (log_format), each carrying the run id and the trace id of its
context when they are known: the run id bound by bind_run_id (the RPC interceptor binds the
request's run_id; the outbox dispatcher the run it hands off), the trace id of the current
OpenTelemetry span."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"

_run_id: ContextVar[str | None] = ContextVar("epochlens_run_id", default=None)


@contextmanager
def bind_run_id(run_id: object) -> Iterator[None]:
    """Within the block, log lines of this context carry run_id (a non-empty value only)."""
    if not run_id:
        yield
        return
    token = _run_id.set(str(run_id))
    try:
        yield
    finally:
        _run_id.reset(token)


def current_trace_id() -> str | None:
    """The 32-hex-digit trace id of the current span, None outside a recorded trace."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


class ContextFilter(logging.Filter):
    """Sets record.run_id and record.trace_id when known (the JSON formatter then emits
    them; a record without them gets no such keys)."""

    def filter(self, record: logging.LogRecord) -> bool:
        run_id = _run_id.get()
        if run_id is not None and not hasattr(record, "run_id"):
            record.run_id = run_id
        trace_id = current_trace_id()
        if trace_id is not None and not hasattr(record, "trace_id"):
            record.trace_id = trace_id
        return True


def configure_logging(level: str, log_format: str = "text") -> None:
    """The root logger at `level`, lines as text or JSON objects (log_format "json")."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter(JSON_FIELDS) if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
