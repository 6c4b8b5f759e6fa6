"""Property-based fuzzing of every RPC of every service (issue 8, "Proving it").

For each method of PredictionWriterService, QueryService, JudgeService, AuthService and
EvaluationService (found from the descriptors, so a new RPC of these services is fuzzed without
touching this file), Hypothesis builds arbitrary requests (tests/fuzz/strategies.py) and
near-valid corrupt bytes, sends them to the real servers on PostgreSQL as user "fuzzer", and
asserts:

* no INTERNAL, UNKNOWN, UNAVAILABLE or DEADLINE_EXCEEDED: every bad input gets a precise
  status, and nothing hangs;
* the services still answer their health checks;
* another user's stored runs, predictions, metrics, judgments and API keys are unchanged.

EPOCHLENS_FUZZ_PROFILE picks the effort: "ci" (the default, part of `make test`) or
"long" (`make fuzz`).
"""

import asyncio
import hashlib
import os

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epochlens.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    evaluation_pb2,
    judge_pb2,
    query_pb2,
    writer_pb2,
    writer_pb2_grpc,
)
from services.common.auth import mint_token
from services.judge.store import TaskState
from tests.conftest import PG_ADMIN, PG_HOST, PG_PORT
from tests.fuzz.strategies import MessageStrategies, raw_mutations
from tests.helpers import create_run, grid

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
             grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT_S = 20.0
# Methods that remove what a run id names: fuzzed with runs of their own.
DESTRUCTIVE = frozenset({"DeleteRun", "PurgeRun"})
SETTLE_POLLS, SETTLE_POLL_S = 200, 0.05
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]

settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True,
                          database=None, suppress_health_check=list(HealthCheck))
settings.register_profile("long", max_examples=1500, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
PROFILE = os.environ.get("EPOCHLENS_FUZZ_PROFILE", "ci")

SERVICES = {"writer": writer_pb2.DESCRIPTOR.services_by_name["PredictionWriterService"],
            "query": query_pb2.DESCRIPTOR.services_by_name["QueryService"],
            "judge": judge_pb2.DESCRIPTOR.services_by_name["JudgeService"],
            "auth": auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
            "evaluation": evaluation_pb2.DESCRIPTOR.services_by_name["EvaluationService"]}
# Services hosted by another service's server: AuthService and EvaluationService are on the
# writer.
HOSTS = {"auth": "writer", "evaluation": "writer"}
METHODS = [(server, method) for server, service in SERVICES.items()
           for method in service.methods]
CONFIGS = [{"judge": {"rules": {"pattern": "(a+)+$", "format": "json"}}},
           {"judge": {"llm": {"provider": "openai", "sample_rate": 2.0, "budget_usd": 1e300}}},
           {"judge": {"llm": {"endpoint": "nowhere", "base_url": "http://169.254.169.254/"}}},
           {"judge": {"pairwise": {"provider": "openai", "model": "m", "baseline_epoch": 1e30,
                                   "baseline_run_id": "00000000-0000-0000-0000-000000000000"}}},
           {"predictions": {"sample_count": 5}}]


class Target:
    """The victim's data, the fuzzer's credentials, and how to check both."""

    def __init__(self, stack, victim_run: str, own_run: str, doomed_runs: list[str]) -> None:
        """doomed_runs: the fuzzer's runs that DeleteRun and PurgeRun may really remove
        (own_run stays for the other methods)."""
        self.stack = stack
        self.victim_run = victim_run
        self.own_run = own_run
        self.doomed_runs = doomed_runs
        self.metadata = (("authorization", f"Bearer {mint_token(stack.auth, 'fuzzer')}"),)

    async def settled(self) -> None:
        """Waits until the victim's predictions are judged (the outbox and the judge queue
        work in the background and would change the digest on their own)."""
        conn = await self._admin()
        try:
            for _ in range(SETTLE_POLLS):
                waiting = await conn.fetchval(
                    "SELECT (SELECT count(*) FROM writer.judge_outbox WHERE user_id = 'victim')"
                    " + (SELECT count(*) FROM judge.tasks WHERE user_id = 'victim' AND "
                    "state IN ($1, $2))", int(TaskState.QUEUED), int(TaskState.RUNNING))
                if waiting == 0:
                    return
                await asyncio.sleep(SETTLE_POLL_S)
            raise AssertionError("the victim's predictions were never judged")
        finally:
            await conn.close()

    async def _admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_ADMIN,
                                     database=self.stack.database)

    async def victim_digest(self) -> str:
        """A hash of everything stored for user "victim", read as admin (no RLS)."""
        conn = await self._admin()
        try:
            rows = []
            for query in ("SELECT * FROM writer.runs WHERE user_id = 'victim' ORDER BY id",
                          "SELECT * FROM writer.predictions WHERE user_id = 'victim' "
                          "ORDER BY run_id, step, sample_index",
                          "SELECT * FROM writer.metrics WHERE user_id = 'victim' "
                          "ORDER BY run_id, step, name",
                          "SELECT * FROM judge.judgments WHERE user_id = 'victim' "
                          "ORDER BY 1, 2, 3",
                          "SELECT * FROM writer.api_keys WHERE user_id = 'victim' ORDER BY id"):
                rows.extend(await conn.fetch(query))
            return hashlib.sha256(repr([tuple(r) for r in rows]).encode()).hexdigest()
        finally:
            await conn.close()


@pytest.fixture(scope="module")
async def target(stack):
    if stack.backend != "postgres":
        pytest.skip("the fuzz suite runs against PostgreSQL")
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        writer = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        victim_md = stack.metadata("victim")
        victim = await create_run(writer, victim_md, name="victim-run")
        await writer.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=victim.id, predictions=grid(2, 3)), metadata=victim_md)
        await writer.WriteMetrics(writer_pb2.WriteMetricsRequest(
            run_id=victim.id, metrics=[writer_pb2.MetricInput(step=s, name="loss", value=1.0 / s)
                                       for s in range(1, 4)]), metadata=victim_md)
        await auth_pb2_grpc.AuthServiceStub(channel).CreateApiKey(
            auth_pb2.CreateApiKeyRequest(name="victim-key"), metadata=victim_md)
        own = await create_run(writer, stack.metadata("fuzzer"), name="own-run")
        doomed = [await _doomed_run(writer, stack.metadata("fuzzer"), n) for n in range(4)]
    fuzz_target = Target(stack, victim.id, own.id, doomed)
    await fuzz_target.settled()
    return fuzz_target


async def _doomed_run(writer, metadata, n: int) -> str:
    """A run of the fuzzer's with predictions, RUNNING (odd n) or finished (even n)."""
    run = await create_run(writer, metadata, name=f"doomed-{n}")
    await writer.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=grid(1, 3)), metadata=metadata)
    if n % 2 == 0:
        await writer.FinishRun(writer_pb2.FinishRunRequest(run_id=run.id), metadata=metadata)
    return run.id


def _address(stack, server: str) -> str:
    return getattr(stack, HOSTS.get(server, server)).address


async def _send(channel: grpc.aio.Channel, method, payload, metadata) -> None:
    """One call; raw bytes go out as they are. Raises AioRpcError on a non-OK status."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    serialize = None if isinstance(payload, bytes) else type(payload).SerializeToString
    if method.client_streaming:
        call = channel.stream_stream(path, request_serializer=serialize)(
            metadata=metadata, timeout=CALL_TIMEOUT_S)
        await call.write(payload)
        await call.done_writing()
        async for _ in call:
            pass
        return
    if method.server_streaming:
        # A watch of a running run does not end: its first event (or error) is the answer.
        call = channel.unary_stream(path, request_serializer=serialize)(
            payload, metadata=metadata, timeout=CALL_TIMEOUT_S)
        await call.read()
        call.cancel()
        return
    await channel.unary_unary(path, request_serializer=serialize)(
        payload, metadata=metadata, timeout=CALL_TIMEOUT_S)


async def _check_one(target: Target, server: str, method, payload) -> None:
    async with grpc.aio.insecure_channel(_address(target.stack, server),
                                         options=CHANNEL_OPTIONS) as channel:
        try:
            await _send(channel, method, payload, target.metadata)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() not in FORBIDDEN, (
                f"{method.full_name} answered {exc.code().name}: {exc.details()}")


async def _assert_healthy(stack) -> None:
    for server in SERVICES:
        async with grpc.aio.insecure_channel(_address(stack, server)) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, server


def _requests(target: Target, method) -> st.SearchStrategy:
    """Requests naming the victim's run and the fuzzer's own; DeleteRun and PurgeRun name
    the fuzzer's doomed runs instead (they really delete them, and the victim's stays)."""
    mine = target.doomed_runs if method.name in DESTRUCTIVE else [target.own_run]
    known = [target.victim_run, *mine]
    messages = MessageStrategies(known, CONFIGS).for_message(method.input_type)
    return st.one_of(messages, messages.flatmap(lambda m: raw_mutations(m.SerializeToString())))


@pytest.mark.parametrize("server, method", METHODS,
                         ids=[f"{s}.{m.name}" for s, m in METHODS])
async def test_no_request_breaks_a_service_or_another_tenant(target, server, method):
    """Hypothesis drives a worker thread; each example runs on the servers' event loop."""
    before = await target.victim_digest()
    loop = asyncio.get_running_loop()

    @settings(settings.get_profile(PROFILE))
    @given(payload=_requests(target, method))
    def fuzz(payload) -> None:
        asyncio.run_coroutine_threadsafe(
            _check_one(target, server, method, payload), loop).result()

    await asyncio.to_thread(fuzz)
    await _assert_healthy(target.stack)
    assert await target.victim_digest() == before
