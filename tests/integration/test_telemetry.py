"""Metrics, traces and JSON logs of real servers on PostgreSQL (databases of this module's
own: the shared stack's dispatcher would hand these tests' outbox rows to its judge).

Counters are the process's (one registry per process), so each test asserts the exact
change its own calls made.
"""

import asyncio
import io
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.propagate import inject

from epochlens.v1 import writer_pb2, writer_pb2_grpc
from services.common.auth import mint_token
from services.common.server import RunningServer
from services.common.startup import StartupError
from services.common.telemetry.logs import configure_logging
from services.judge.config import JudgeSettings
from services.judge.server import start as start_judge
from services.writer.config import WriterSettings
from services.writer.server import start as start_writer
from tests.conftest import JUDGE_ROLE, WRITER_ROLE, migrated_database, pg_url
from tests.helpers import create_run, item
from tests.integration.test_handoff import free_port
from tests.telemetry_helpers import eventually, scrape, span_exporter, value
from trainer_client.config import PredictionsConfig
from trainer_client.results import GenerationResult
from trainer_client.spool import RunRecord, Spool
from trainer_client.streaming import StreamingClient

USER = "telemetry-user"
WRITER = "/epochlens.v1.PredictionWriterService/"
ENQUEUE = "/epochlens.v1.JudgeService/EnqueueJudging"
# Tracing on, but nothing installs an OTLP exporter in tests: spans go to span_exporter().
OTEL = {"otel_endpoint": "127.0.0.1:4317"}
COMMON = {"port": 0, "shutdown_grace_s": 0.5, "_env_file": None}


@pytest.fixture(scope="module")
async def telemetry_db() -> AsyncIterator[str]:
    async with migrated_database("telemetry") as name:
        yield name


@pytest.fixture(scope="module")
async def traced(telemetry_db, auth_settings) -> AsyncIterator[tuple[RunningServer, ...]]:
    """A judge and a writer handing off to it, both tracing; the writer set for JSON logs
    (its interceptor binds the requests' run ids)."""
    span_exporter()
    judge = await start_judge(JudgeSettings(
        database_url=pg_url(JUDGE_ROLE, telemetry_db), idle_poll_s=0.05, **OTEL, **COMMON),
        auth_settings)
    writer = await start_writer(WriterSettings(
        database_url=pg_url(WRITER_ROLE, telemetry_db), judge_address=judge.address,
        outbox_poll_s=0.05, outbox_ingest_quiet_s=0, log_format="json", **OTEL, **COMMON),
        auth_settings)
    yield judge, writer
    await writer.stop(0.5)
    await judge.stop(0.5)


@pytest.fixture(scope="module")
async def metered(telemetry_db, auth_settings) -> AsyncIterator[RunningServer]:
    """A writer with its /metrics endpoint (no judge: no outbox)."""
    writer = await start_writer(WriterSettings(
        database_url=pg_url(WRITER_ROLE, telemetry_db), metrics_port=0, **COMMON),
        auth_settings)
    yield writer
    await writer.stop(0.5)


async def _counts(port: int, method: str, code: str) -> tuple[float, float]:
    samples = await scrape(port)
    return (value(samples, "epochlens_rpc_requests_total", method=method, code=code),
            value(samples, "epochlens_rpc_duration_seconds_count", method=method))


async def test_rpcs_are_counted_by_method_and_code(metered, auth_settings):
    port, meta = metered.metrics.port, (("authorization",
                                         f"Bearer {mint_token(auth_settings, USER)}"),)
    before = await scrape(port)
    async with grpc.aio.insecure_channel(metered.address) as channel:
        stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        run = await create_run(stub, meta, "metered")
        await stub.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=run.id, predictions=[item(1, i) for i in range(3)]), metadata=meta)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.WritePredictions(writer_pb2.WritePredictionsRequest(
                    run_id="not-a-uuid", predictions=[item(1, 0)]), metadata=meta)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.CreateRun(writer_pb2.CreateRunRequest(name="no token"))
        replies = [r async for r in stub.StreamPredictions(iter([
            writer_pb2.StreamPredictionsRequest(sequence=1, run_id=run.id,
                                                predictions=[item(1, i) for i in range(5)]),
            writer_pb2.StreamPredictionsRequest(sequence=2, run_id="bad",
                                                predictions=[item(2, 0)])]), metadata=meta)]
    assert sum(len(r.rejections) for r in replies) == 1

    async def settled():
        after = await scrape(port)
        changes = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
        return after if changes.get(("epochlens_rpc_requests_total", frozenset(
            {"method": WRITER + "WritePredictions", "code": "INVALID_ARGUMENT"}.items()))) == 2 \
            else None
    after = await eventually(settled, "the failed RPCs to be counted")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)
    rpcs = "epochlens_rpc_requests_total"
    assert delta(rpcs, method=WRITER + "CreateRun", code="OK") == 1
    assert delta(rpcs, method=WRITER + "CreateRun", code="UNAUTHENTICATED") == 1
    assert delta(rpcs, method=WRITER + "WritePredictions", code="OK") == 1
    assert delta(rpcs, method=WRITER + "WritePredictions", code="INVALID_ARGUMENT") == 2
    assert delta(rpcs, method=WRITER + "StreamPredictions", code="OK") == 1
    assert delta("epochlens_rpc_duration_seconds_count", method=WRITER + "WritePredictions") == 3
    assert delta("epochlens_rpc_duration_seconds_count", method=WRITER + "CreateRun") == 2
    # 3 new, then 5 of which 3 replay the first call's identities.
    assert delta("epochlens_writer_predictions_ingested_total") == 5
    assert delta("epochlens_writer_prediction_duplicates_total") == 3
    assert delta("epochlens_writer_rejected_batches_total", reason="INVALID_ARGUMENT") == 1


async def test_outbox_gauges_show_rows_waiting_for_a_judge_that_is_down(auth_settings):
    async with migrated_database("telemetry_outbox") as name:
        writer = await start_writer(WriterSettings(
            database_url=pg_url(WRITER_ROLE, name), judge_address=f"127.0.0.1:{free_port()}",
            metrics_port=0, metrics_db_refresh_s=0.05, outbox_poll_s=0.05,
            outbox_rpc_timeout_s=0.5, outbox_rpc_max_attempts=1, **COMMON), auth_settings)
        try:
            meta = (("authorization", f"Bearer {mint_token(auth_settings, USER)}"),)
            async with grpc.aio.insecure_channel(writer.address) as channel:
                stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
                run = await create_run(stub, meta, "parked")
                await stub.WritePredictions(writer_pb2.WritePredictionsRequest(
                    run_id=run.id, predictions=[item(1, i) for i in range(7)]), metadata=meta)

            async def waiting():
                samples = await scrape(writer.metrics.port)
                rows = value(samples, "epochlens_writer_outbox_rows")
                age = value(samples, "epochlens_writer_outbox_oldest_age_seconds")
                return (rows, age) if rows == 7 and age > 0 else None
            rows, age = await eventually(waiting, "the outbox gauges to show 7 rows")
            assert rows == 7 and 0 < age < 60
        finally:
            await writer.stop(0.5)


async def test_a_metrics_port_in_use_is_a_startup_error(telemetry_db, auth_settings):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await start_writer(WriterSettings(database_url=pg_url(WRITER_ROLE, telemetry_db),
                                              metrics_port=port, **COMMON), auth_settings)


def _results(count: int) -> list[GenerationResult]:
    return [GenerationResult(i, f"prompt {i}", f"truth {i}", f"prediction {i}", 1.0)
            for i in range(count)]


async def test_trace_runs_from_the_trainer_upload_through_the_judge(traced, auth_settings,
                                                                    tmp_path):
    judge, writer = traced
    exporter = span_exporter()
    config = PredictionsConfig(_env_file=None, spool_dir=tmp_path, backoff_base_s=0.05,
                               backoff_max_s=0.2)
    spool = Spool.create(tmp_path, RunRecord(uuid.uuid4().hex, "traced", "tiny", "toy", {}))
    with trace.get_tracer("tests").start_as_current_span("training") as root:
        client = StreamingClient(config, spool, writer.address, mint_token(auth_settings, USER))
    trace_id = root.get_span_context().trace_id
    client.start()
    client.submit(1, 10, _results(3))
    client.finish()
    report = await asyncio.to_thread(client.close, 30)
    assert report.complete and report.inserted == 3

    async def handed_off():
        # The hand-off span ends last (after the judge's server span and the writer's client
        # span of the same call), so once it is exported the whole chain is.
        return [s for s in exporter.get_finished_spans()
                if s.name == "judge_outbox.hand_off" and s.context.trace_id == trace_id]
    hand_offs = await eventually(handed_off, "the outbox hand-off span")
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in spans}
    enqueued = [s for s in spans if s.name == ENQUEUE and s.kind == trace.SpanKind.SERVER]
    # Each hand-off call: judge server span <- writer client span <- hand-off span.
    assert len(enqueued) == len(hand_offs) >= 1
    for server_span in enqueued:
        assert server_span.status.is_ok
        client_span = by_id[server_span.parent.span_id]
        assert client_span.kind == trace.SpanKind.CLIENT
        assert by_id[client_span.parent.span_id].name == "judge_outbox.hand_off"
    streams = [s for s in spans if s.name == WRITER + "StreamPredictions"
               and s.kind == trace.SpanKind.SERVER]
    assert streams and {s.parent.span_id for s in streams} == {root.get_span_context().span_id}


async def test_trainer_client_counts_and_logs_retries_with_the_spool_depth(tmp_path, caplog):
    config = PredictionsConfig(_env_file=None, spool_dir=tmp_path, backoff_base_s=0.02,
                               backoff_max_s=0.05, stream_batch_predictions=2)
    spool = Spool.create(tmp_path, RunRecord(uuid.uuid4().hex, "offline", "tiny", "toy", {}))
    client = StreamingClient(config, spool, f"127.0.0.1:{free_port()}", "no-writer-token")
    with caplog.at_level(logging.INFO, logger="trainer_client.streaming"):
        client.start()
        try:
            client.submit(1, 10, _results(5))

            async def retried():
                stats = client.stats()
                return stats if stats["upload_retries"] >= 3 else None
            stats = await eventually(retried, "three upload retries")
        finally:
            report = await asyncio.to_thread(client.close, 0.5)
    assert (stats["spool_pending_batches"], stats["spool_pending_predictions"]) == (3, 5)
    assert stats["connection_errors"] >= stats["upload_retries"] >= 3
    assert report.pending_batches == 3 and not report.complete
    retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retrying")]
    assert retries and "spool holds 3 batches, 5 predictions" in retries[-1]


async def test_json_log_lines_carry_run_id_and_trace_id(traced, auth_settings):
    _, writer = traced
    root_logger = logging.getLogger()
    saved = (root_logger.handlers[:], root_logger.level)
    configure_logging("INFO", "json")
    buffer = io.StringIO()
    root_logger.handlers[0].setStream(buffer)
    meta = (("authorization", f"Bearer {mint_token(auth_settings, USER)}"),)
    try:
        with trace.get_tracer("tests").start_as_current_span("client") as root:
            carrier: dict[str, str] = {}
            inject(carrier)
            async with grpc.aio.insecure_channel(writer.address) as channel:
                stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
                run = await create_run(stub, meta, "logged")
                await stub.WritePredictions(writer_pb2.WritePredictionsRequest(
                    run_id=run.id, predictions=[item(1, 0, prediction="nul \x00 here")]),
                    metadata=(*meta, *carrier.items()))
    finally:
        root_logger.handlers[:], _ = saved
        root_logger.setLevel(saved[1])
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    (nul,) = [line for line in lines if "NUL replaced" in line["message"]]
    assert nul["run_id"] == run.id
    assert nul["trace_id"] == trace.format_trace_id(root.get_span_context().trace_id)
    assert nul["levelname"] == "WARNING" and nul["name"] == "services.writer.servicer"
    created = [line for line in lines if "created by" in line["message"]]
    assert created and "run_id" not in created[0]
