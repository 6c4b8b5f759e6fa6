"""The judge's metrics on a real server (port 0, /metrics on a free port), on PostgreSQL and
SQLite: LLM calls by provider and outcome and their spend (the local fake LLM server), and
the queue gauges refreshed from the database. Counters are the process's: each test asserts
the change its own calls made."""

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from sqlalchemy import text

from epochlens.v1 import judge_pb2_grpc
from services.judge.server import start
from services.judge.store import TaskState
from tests.judge.fake_llm import FakeLlmServer, server_error
from tests.judge.test_service import LLM_CRITERIA, Judge, enqueue_request, tasks_done
from tests.telemetry_helpers import eventually, scrape, value

ALICE = "alice"
PROVIDER = "openai_compatible"
# The fake bills 500 input and 100 output tokens per call: $0.002 at these prices.
PRICES = {"local-judge": {"input_per_mtok": 2.0, "output_per_mtok": 10.0}}
CALL_COST_USD = 0.002


@pytest.fixture
def fake_llm() -> Iterator[FakeLlmServer]:
    server = FakeLlmServer().start()
    yield server
    server.stop()


@pytest.fixture
async def metered_judge(request, judge_db, auth_settings, fake_llm) -> AsyncIterator:
    """judge(worker_count) -> a Judge whose server serves /metrics (gauges every 50 ms)."""
    running = []

    async def make(worker_count: int) -> tuple[Judge, int]:
        settings = judge_db.settings(
            worker_count=worker_count, idle_poll_s=0.05, metrics_port=0,
            metrics_db_refresh_s=0.05, retry_backoff_base_s=0.2, llm_transient_retry_base_s=0.2,
            llm_prices=PRICES,
            llm_endpoints={"local": {"base_url": fake_llm.openai_url}})
        server = await start(settings, auth_settings)
        running.append(server)
        channel = grpc.aio.insecure_channel(server.address)
        running.append(channel)
        return (Judge(judge_db, judge_pb2_grpc.JudgeServiceStub(channel), auth_settings),
                server.metrics.port)
    yield make
    for thing in reversed(running):
        await (thing.close() if isinstance(thing, grpc.aio.Channel) else thing.stop(0.5))


async def test_llm_calls_are_counted_by_provider_and_outcome_with_spend(metered_judge,
                                                                       fake_llm):
    judge, port = await metered_judge(worker_count=2)
    before = await scrape(port)
    fake_llm.script(server_error())
    run_id = await judge.db.create_run(ALICE)
    config = {"llm": {"provider": PROVIDER, "endpoint": "local", "model": "local-judge",
                      "on_error": "fail", "max_retries": 0, "concurrency": 1}}
    await judge.stub.EnqueueJudging(enqueue_request(run_id, 1, config), metadata=judge.md(ALICE))
    await tasks_done(judge, run_id, 1)
    after = await scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)
    assert [r.status for r in fake_llm.requests] == [500] + [200] * len(LLM_CRITERIA)
    calls = "epochlens_judge_llm_calls_total"
    assert delta(calls, provider=PROVIDER, outcome="retry") == 1
    assert delta(calls, provider=PROVIDER, outcome="ok") == len(LLM_CRITERIA)
    assert delta(calls, provider=PROVIDER, outcome="fatal") == 0
    spend = delta("epochlens_judge_llm_spend_usd_total", provider=PROVIDER)
    assert spend == pytest.approx(len(LLM_CRITERIA) * CALL_COST_USD)


async def test_queue_gauges_count_queued_and_running_tasks(metered_judge):
    judge, port = await metered_judge(worker_count=0)  # nothing claims: the tasks wait
    run_id = await judge.db.create_run(ALICE)
    await judge.stub.EnqueueJudging(enqueue_request(run_id, 4), metadata=judge.md(ALICE))

    async def gauges(queued: int, running: int):
        samples = await scrape(port)
        seen = (value(samples, "epochlens_judge_queue_tasks", state="queued"),
                value(samples, "epochlens_judge_queue_tasks", state="running"))
        return seen == (queued, running)
    await eventually(lambda: gauges(4, 0), "4 queued tasks")
    async with judge.db.admin.begin() as conn:
        await conn.execute(text("UPDATE judge.tasks SET state = :s WHERE run_id = :r AND "
                                "sample_index = 0"),
                           {"s": int(TaskState.RUNNING), "r": judge.run(run_id)})
    await eventually(lambda: gauges(3, 1), "3 queued tasks and 1 running")
