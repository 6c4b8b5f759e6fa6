"""WatchRun as server-sent events over the real stack: the same events as the gRPC stream
(data = the event's JSON, id = its resume token), a commit visible within 2 s, the `end`
event when the run finishes, resuming with Last-Event-ID, errors before the stream as HTTP
statuses, keepalive comments, and the gRPC call cancelled when the browser goes away or the
server stops."""

import asyncio
import json
import time
from contextlib import asynccontextmanager

import grpc
import httpx
from google.protobuf import json_format

from epochlens.v1 import common_pb2, query_pb2, query_pb2_grpc, writer_pb2
from services.query.config import QuerySettings
from services.query.server import start as start_query
from services.web.server import start as start_web
from tests.conftest import PAGE_SECRET, READER_ROLE, pg_url
from tests.helpers import create_run, item
from tests.web.conftest import bearer, grpc_answer, web_settings

VISIBLE_WITHIN_S = 2.0


class EventReader:
    """Reads the events of one text/event-stream response."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self.comments: list[str] = []

    async def next(self, wait_s: float = 10.0) -> dict | None:
        """The next event as {"event", "id", "data"}; None when the stream ended."""
        fields: dict = {}
        while True:
            try:
                line = await asyncio.wait_for(self._lines.__anext__(), wait_s)
            except StopAsyncIteration:
                return None
            if line.startswith(":"):
                self.comments.append(line)
            elif line:
                name, _, value = line.partition(": ")
                fields[name] = json.loads(value) if name == "data" else value
            elif fields:
                return {"event": fields.get("event", "message"), "id": fields.get("id"),
                        "data": fields["data"]}

    async def until(self, predicate, wait_s: float = 10.0) -> list[dict]:
        """Events up to and including the first one predicate() accepts."""
        seen = []
        while True:
            event = await self.next(wait_s)
            assert event is not None, f"stream ended before the expected event; got {seen}"
            seen.append(event)
            if predicate(event):
                return seen


@asynccontextmanager
async def sse(url: str, path: str, headers: dict, params: dict | None = None):
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        async with client.stream("GET", path, headers=headers, params=params) as response:
            yield EventReader(response)


async def grpc_events(stack, md, run_id: str, count: int, resume_token: str = "") -> list[dict]:
    """The first `count` events of a gRPC WatchRun, as the JSON the web service sends."""
    async with grpc.aio.insecure_channel(stack.query.address) as channel:
        call = query_pb2_grpc.QueryServiceStub(channel).WatchRun(
            query_pb2.WatchRunRequest(run_id=run_id, resume_token=resume_token), metadata=md)
        try:
            events = [await asyncio.wait_for(call.read(), 10) for _ in range(count)]
        finally:
            call.cancel()
    return [json_format.MessageToDict(e, always_print_fields_with_no_presence=True)
            for e in events]


async def new_run(writer_stub, md, epochs: int = 1):
    run = await create_run(writer_stub, md, name="watched")
    for epoch in range(epochs):
        await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=run.id, predictions=[item(10 * (epoch + 1), s, epoch=epoch)
                                        for s in range(3)]), metadata=md)
    await writer_stub.WriteMetrics(writer_pb2.WriteMetricsRequest(run_id=run.id, metrics=[
        writer_pb2.MetricInput(step=1, name="loss", value=2.0)]), metadata=md)
    return run


def is_metrics(event: dict) -> bool:
    return "metrics" in event["data"]


async def test_stream_sends_the_grpc_events_then_each_commit_then_end(stack, web, writer_stub):
    md, auth = stack.metadata("web-watcher"), bearer(stack, "web-watcher")
    run = await new_run(writer_stub, md)
    path = f"/v1/runs/{run.id}:watch"
    async with sse(web.url, path, auth) as reader:
        headers = reader.response.headers
        assert (reader.response.status_code, headers["content-type"]) == (
            200, "text/event-stream; charset=utf-8")
        assert headers["cache-control"] == "no-store"
        assert headers["content-security-policy"].startswith("default-src 'none'")
        first = await reader.until(is_metrics)
        assert [e["data"] for e in first] == await grpc_events(stack, md, run.id, len(first))
        assert [list(e["data"])[0] for e in first] == ["run", "epoch", "metrics"]
        assert [e["id"] for e in first] == [e["data"]["resumeToken"] for e in first]
        assert first[0]["data"]["run"]["state"] == "RUN_STATE_RUNNING"

        started = time.monotonic()
        await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=run.id, predictions=[item(20, s, epoch=1) for s in range(3)]), metadata=md)
        (landed,) = await reader.until(lambda e: "epoch" in e["data"])
        assert time.monotonic() - started < VISIBLE_WITHIN_S
        assert (landed["data"]["epoch"]["epoch"], landed["data"]["epoch"]["predictionCount"]) == (
            "1", "3")

        await writer_stub.FinishRun(writer_pb2.FinishRunRequest(
            run_id=run.id, state=common_pb2.RUN_STATE_SUCCEEDED), metadata=md)
        (done,) = await reader.until(lambda e: "run" in e["data"])
        assert done["data"]["run"]["state"] == "RUN_STATE_SUCCEEDED"
        assert await reader.next() == {"event": "end", "id": None, "data": {}}
        assert await reader.next() is None


async def test_last_event_id_resumes_after_that_event(stack, web, writer_stub):
    md, auth = stack.metadata("web-watcher"), bearer(stack, "web-watcher")
    run = await new_run(writer_stub, md)
    path = f"/v1/runs/{run.id}:watch"
    async with sse(web.url, path, auth) as reader:
        last_id = (await reader.until(is_metrics))[-1]["id"]
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=[item(20, s, epoch=1) for s in range(3)]), metadata=md)
    expected = await grpc_events(stack, md, run.id, 2, resume_token=last_id)
    resumed_by = ({"headers": {**auth, "Last-Event-ID": last_id}},
                  {"headers": auth, "params": {"resume_token": last_id}},
                  {"headers": {**auth, "Last-Event-ID": last_id},
                   "params": {"resume_token": "older-token-the-header-replaces"}})
    for how in resumed_by:
        async with sse(web.url, path, how["headers"], how.get("params")) as reader:
            events = [await reader.next(), await reader.next()]
        assert [e["data"] for e in events] == expected, how
        assert [list(e["data"])[0] for e in events] == ["epoch", "epoch"]


async def test_refusals_before_the_stream_are_http_errors(stack, web, writer_stub, http):
    md = stack.metadata("web-watcher")
    run = await new_run(writer_stub, md)
    path = f"/v1/runs/{run.id}:watch"
    other = await http.get(path, headers=bearer(stack, "web-stranger"))
    expected = await grpc_answer(stack, "GetRun", query_pb2.GetRunRequest(run_id=run.id),
                                 stack.metadata("web-stranger"))
    assert (other.status_code, other.json()["code"]) == (404, 5)
    assert other.json()["message"] == expected[1]["message"]
    bad = await http.get(path, headers={**bearer(stack, "web-watcher"),
                                        "Last-Event-ID": "forged"})
    assert (bad.status_code, bad.json()["code"]) == (400, 3)
    assert "resume_token" in json.dumps(bad.json()["details"])
    assert (await http.get(path)).status_code == 401


async def test_quiet_stream_gets_keepalive_comments(stack, web, writer_stub):
    md, auth = stack.metadata("web-watcher"), bearer(stack, "web-watcher")
    run = await new_run(writer_stub, md)
    async with sse(web.url, f"/v1/runs/{run.id}:watch", auth) as reader:
        await reader.until(is_metrics)
        pending = asyncio.ensure_future(reader.next(wait_s=30))
        await asyncio.sleep(web.state.settings.sse_keepalive_s * 3.5)
        assert reader.comments[:2] == [": keepalive", ": keepalive"]
        pending.cancel()


async def wait_streams(http: httpx.AsyncClient, count: int, wait_s: float = 5.0) -> int:
    deadline = time.monotonic() + wait_s
    while True:
        open_now = (await http.get("/healthz")).json()["streams"]
        if open_now == count or time.monotonic() > deadline:
            return open_now
        await asyncio.sleep(0.05)


async def test_client_that_goes_away_cancels_the_call(stack, web, writer_stub, http):
    md, auth = stack.metadata("web-watcher"), bearer(stack, "web-watcher")
    run = await new_run(writer_stub, md)
    async with sse(web.url, f"/v1/runs/{run.id}:watch", auth) as reader:
        await reader.until(is_metrics)
        assert await wait_streams(http, 1) == 1
        (stream,) = web.state.streams
        call = stream._call
    assert await wait_streams(http, 0) == 0
    assert call.cancelled()


async def test_stopping_server_closes_open_streams_at_once(stack, writer_stub):
    md, auth = stack.metadata("web-watcher"), bearer(stack, "web-watcher")
    run = await new_run(writer_stub, md)
    running = await start_web(web_settings(stack.query.address, shutdown_grace_s=5.0))
    async with sse(running.url, f"/v1/runs/{run.id}:watch", auth) as reader:
        await reader.until(is_metrics)
        started = time.monotonic()
        await running.stop()
        assert time.monotonic() - started < 2.0
        assert await reader.next(wait_s=5) is None  # closed, no `end`: the browser resumes


async def test_head_answers_the_headers_without_a_stream(stack, web, writer_stub, http):
    md = stack.metadata("web-watcher")
    run = await new_run(writer_stub, md)
    answer = await http.head(f"/v1/runs/{run.id}:watch", headers=bearer(stack, "web-watcher"))
    assert (answer.status_code, answer.headers["content-type"]) == (
        200, "text/event-stream; charset=utf-8")
    assert await wait_streams(http, 0) == 0


async def test_query_service_lost_mid_stream_is_a_last_rpc_error_event(stack, writer_stub):
    """A query service of its own (same database) that stops while the stream is open: the
    stream's last event is `rpc-error` with the gRPC status, then it closes."""
    md, auth = stack.metadata("web-watcher"), bearer(stack, "web-watcher")
    run = await new_run(writer_stub, md)
    query = await start_query(QuerySettings(
        database_url=pg_url(READER_ROLE, stack.database), page_token_secret=PAGE_SECRET,
        port=0, shutdown_grace_s=0.1, _env_file=None), stack.auth)
    running = await start_web(web_settings(query.address))
    try:
        async with sse(running.url, f"/v1/runs/{run.id}:watch", auth) as reader:
            await reader.until(is_metrics)
            await query.stop(0)
            last = await reader.next()
            assert await reader.next() is None
    finally:
        await running.stop()
    assert (last["event"], last["id"]) == ("rpc-error", None)
    assert last["data"] == {"code": 14, "message": "Cancelling all calls"}  # UNAVAILABLE
