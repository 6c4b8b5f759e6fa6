"""Metrics, traces and logs of the services (docs/ARCHITECTURE.md, "Metrics, traces and logs").

metrics: the RPC interceptor, the /metrics endpoint and gauges refreshed from the database;
tracing: OpenTelemetry gRPC interceptors, the OTLP exporter, the traceparent an outbox row
carries; logs: text or JSON lines, with the run id and trace id of the line's context.
"""
