"""One user cannot hurt or read another through the judge (the security issue's items 7, 8,
9, 10, 11, 13 and 14), on PostgreSQL as the judge role (row-level security on) and, where the
point is not PostgreSQL's, on SQLite too:

* 7: a rule pattern runs in linear time (RE2); a pattern RE2 cannot run is refused.
* 8: an item that cannot be judged fails alone, whoever else's items share its batch.
* 9: every judge RPC naming a run checks it is the caller's; the text judged is the stored one.
* 10: the LLM cache is per user.
* 11: a run config picks an operator-configured endpoint by name, never a URL; a key goes only
  to its own endpoint.
* 13: spending never exceeds the budget, at concurrency 32, across two judges.
* 14: a verdict judged again after a crash carries the cost billed for it.
Each test fails on the code before the fix (the reason is in its docstring).
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydantic import ValidationError
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from epochlens.v1 import judge_pb2, judge_pb2_grpc
from services.common.convert import dict_to_struct
from services.common.db import create_engine
from services.common.errors import InvalidArgument
from services.judge.config import JudgeSettings, validate_judge_config
from services.judge.llm import cache
from services.judge.llm.cost import max_call_cost
from services.judge.llm.judge import LlmJudge
from services.judge.llm.prompts import STANDARD_RUBRICS, render
from services.judge.llm.settings import LlmSettings, ModelPrice
from services.judge.models import (
    SCHEMA,
    JudgeBase,
    llm_cache_table,
    run_llm_state_table,
    tasks_table,
)
from services.judge.queue import JudgeWorkers, Judging
from services.judge.rules import judge_items
from services.judge.schema import Item, ItemFailure, LlmJudgeConfig, RulesConfig
from services.judge.server import start
from services.judge.store import JudgeStore, TaskState
from tests.conftest import JUDGE_ROLE, PG_ADMIN, PG_HOST, PG_PORT, pg_url
from tests.judge.conftest import JudgeDb, make_items
from tests.judge.fake_llm import FakeLlmServer
from tests.judge.test_service import Judge, enqueue_request, expect_invalid, items, tasks_done

ALICE, BOB = "alice", "bob"
MODEL = "judge-model"
# Fake usage: 500 input tokens at $2/Mtok + 100 output tokens at $10/Mtok = $0.002 per call.
PRICE = ModelPrice(input_per_mtok=2.0, output_per_mtok=10.0)
CALL_COST = 0.002
RULES_WITH_TRUTH = 5  # exact_match, chrf, edit_similarity, length, structure
SCORED = judge_pb2.JUDGMENT_STATUS_SCORED


@pytest.fixture
def fake() -> Iterator[FakeLlmServer]:
    server = FakeLlmServer(latency_s=0.0).start()
    yield server
    server.stop()


def llm_settings(fake: FakeLlmServer) -> dict[str, Any]:
    """Settings of an LLM judge whose OpenAI provider and endpoint "local" are the fake."""
    return {"openai_api_key": "operator-openai-key", "openai_base_url": fake.openai_url,
            "anthropic_api_key": None, "llm_prices": {MODEL: PRICE},
            "llm_endpoints": {"local": {"base_url": fake.openai_url}},
            "llm_backoff_base_s": 0.01, "llm_backoff_max_s": 0.05,
            "llm_request_timeout_s": 5.0, "llm_default_budget_usd": 100.0}


@pytest.fixture
async def server(judge_db, auth_settings, fake) -> AsyncIterator[Judge]:
    """A judge server (two workers) on judge_db, its LLM provider the fake."""
    settings = judge_db.settings(worker_count=2, idle_poll_s=0.05, **llm_settings(fake))
    running = await start(settings, auth_settings)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            yield Judge(judge_db, judge_pb2_grpc.JudgeServiceStub(channel), auth_settings)
    finally:
        await running.stop(0.5)


@dataclass
class Pg:
    """The judge schema on PostgreSQL: `engine` as the judge role, `admin` across users."""

    engine: AsyncEngine
    admin: AsyncEngine
    database: str


@pytest.fixture
async def pg(judge_pg_database) -> AsyncIterator[Pg]:
    db = Pg(create_async_engine(pg_url(JUDGE_ROLE, judge_pg_database), pool_size=40),
            create_async_engine(pg_url(PG_ADMIN, judge_pg_database)), judge_pg_database)
    yield db
    await db.engine.dispose()
    await db.admin.dispose()


def judge_config(**fields: Any) -> LlmJudgeConfig:
    return LlmJudgeConfig(provider="openai", model=MODEL, **fields)


def llm_items(count: int, run_id: uuid.UUID | None = None, step: int = 10) -> list[Item]:
    """Items with texts no other test uses (no cache hit from elsewhere)."""
    tag = uuid.uuid4().hex
    return [Item(run_id=run_id, step=step, sample_index=i, epoch=1, prompt=f"q {i} [{tag}]",
                 ground_truth=f"a {i} [{tag}]", prediction=f"answer {i} [{tag}]")
            for i in range(count)]


def workers(db: JudgeDb, engine: AsyncEngine, **overrides: Any) -> JudgeWorkers:
    settings = db.settings(**overrides)
    return JudgeWorkers(settings, JudgeStore(engine), Judging(settings, engine))


async def task_states(db: JudgeDb, run_id: uuid.UUID) -> list[Any]:
    key = run_id if db.backend == "postgres" else run_id.hex
    return await db.rows("SELECT sample_index, state, attempts, last_error FROM judge.tasks "
                         "WHERE run_id = :r ORDER BY sample_index", r=key)


async def judgments_of(db: JudgeDb, run_id: uuid.UUID) -> list[Any]:
    key = run_id if db.backend == "postgres" else run_id.hex
    return await db.rows("SELECT sample_index, criterion, judge_type, score, passed, reasoning, "
                         "input_tokens, output_tokens, cost_usd FROM judge.judgments "
                         "WHERE run_id = :r ORDER BY sample_index, criterion", r=key)


async def expect_code(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details()


# --- 7: rule patterns run in linear time; what RE2 cannot run is refused --------------------

async def test_catastrophic_pattern_is_judged_in_linear_time(server):
    """Python's re backtracks (a+)+$ exponentially: on 30000 'a's and a '!' the old judge
    never answered (the deadline passes, and the judge is held for everyone)."""
    item = judge_pb2.JudgeItem(prompt="Say a lot of a", prediction_text="a" * 30000 + "!")
    config = {"rules": {"pattern": "(a+)+$", "criteria": ["output_format"]}}
    started = time.monotonic()
    reply = await server.stub.JudgePredictions(judge_pb2.JudgePredictionsRequest(
        items=[item], config=dict_to_struct(config)), metadata=server.md(ALICE), timeout=20)
    assert time.monotonic() - started < 5
    assert [(j.criterion, j.score, j.passed, j.reasoning) for j in reply.judgments] == [
        ("output_format", 0.0, False, "does not match the pattern")]


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?=a)a", r"(?<!x)a", "a{1001}"])
async def test_pattern_re2_cannot_run_is_refused_by_every_path(server, pattern):
    """Backreferences, lookaround and huge repetitions compiled in Python's re, so the old
    judge accepted them (and the CreateRun check, validate_judge_config, did too)."""
    config = {"rules": {"pattern": pattern}}
    run_id = await server.db.create_run(ALICE)
    calls = [server.stub.EnqueueJudging(enqueue_request(run_id, 1, config),
                                        metadata=server.md(ALICE)),
             server.stub.JudgePredictions(judge_pb2.JudgePredictionsRequest(
                 items=items(run_id, 1), config=dict_to_struct(config)),
                 metadata=server.md(ALICE))]
    for call in calls:
        violations = await expect_invalid(call)
        assert list(violations) == ["config.rules.pattern"]
        assert "linear time (RE2 syntax)" in violations["config.rules.pattern"]
    with pytest.raises(InvalidArgument) as caught:
        validate_judge_config(JudgeSettings(_env_file=None, port=0), config)
    assert [v.field for v in caught.value.violations] == ["config.rules.pattern"]
    assert await server.db.scalar("SELECT count(*) FROM judge.tasks") == 0


async def test_stored_task_with_a_pattern_re2_refuses_fails_with_the_reason(judge_db):
    """A task queued before the upgrade with a backtracking-only pattern: the old worker ran
    it (Python re) and marked it done."""
    engine = judge_db.engine()
    run_id = uuid.uuid4()
    try:
        await JudgeStore(engine).enqueue(ALICE, run_id, make_items(1, run_id),
                                         {"rules": {"pattern": r"(a)\1"}})
        assert await workers(judge_db, engine, max_attempts=1).run_once() == 1
    finally:
        await engine.dispose()
    [task] = await task_states(judge_db, run_id)
    assert (task.state, task.attempts) == (TaskState.FAILED, 1)
    assert task.last_error.startswith("stored judge config does not parse")
    assert "rules.pattern" in task.last_error and "RE2" in task.last_error
    assert await judgments_of(judge_db, run_id) == []


# --- 8: an item that cannot be judged fails alone ---------------------------------------------

async def test_poisoned_prediction_fails_no_other_users_task(judge_db):
    """'[' * 30000 made json.loads raise RecursionError, which escaped the format rule and
    failed the whole claimed batch: the old worker put all 601 tasks back (and after
    max_attempts failed them), 600 of them another user's."""
    engine = judge_db.engine()
    store = JudgeStore(engine)
    config = {"rules": {"output_format": "json"}}
    poisoned_run, other_run = uuid.uuid4(), uuid.uuid4()
    others = [replace(item, prediction=json.dumps({"answer": item.sample_index}))
              for item in make_items(600, other_run)]
    try:
        await store.enqueue(ALICE, poisoned_run,
                            make_items(1, poisoned_run, prediction="[" * 30000), config)
        await store.enqueue(BOB, other_run, others, config)
        assert await workers(judge_db, engine, claim_batch=1000).run_once() == 601
    finally:
        await engine.dispose()
    assert {(t.state, t.attempts) for t in await task_states(judge_db, other_run)} == {
        (TaskState.DONE, 1)}
    bob = await judgments_of(judge_db, other_run)
    assert len(bob) == 600 * (RULES_WITH_TRUTH + 1)
    assert {r.passed for r in bob if r.criterion == "output_format"} == {True}
    [task] = await task_states(judge_db, poisoned_run)
    assert (task.state, task.last_error) == (TaskState.DONE, None)
    alice = {r.criterion: r for r in await judgments_of(judge_db, poisoned_run)}
    assert (alice["output_format"].score, alice["output_format"].reasoning) == (
        0.0, "not valid JSON (nested too deeply to parse)")


def test_rule_judging_isolates_each_item():
    """judge_items() raised for the whole chunk when one item raised."""
    good = make_items(2, uuid.uuid4())
    broken = replace(good[0], sample_index=7, prediction=None)  # type: ignore[arg-type]
    defaults = JudgeSettings(_env_file=None, port=0).rule_defaults()
    results = judge_items([good[0], broken, good[1]], [RulesConfig()] * 3, defaults)
    assert [len(r) for r in (results[0], results[2])] == [RULES_WITH_TRUTH] * 2
    assert isinstance(results[1], ItemFailure)
    assert results[1].reason == ("rule judging raised TypeError: normalize() argument 2 must "
                                 "be str, not None")


async def test_task_whose_rules_raise_fails_alone_with_its_reason(judge_db):
    """The queue: one claimed task whose rules raise (a corrupt row: no prediction text) is
    failed at once with the reason; the old worker put the whole batch back to the queue."""
    engine = judge_db.engine()
    store = JudgeStore(engine)
    run_a, run_b = uuid.uuid4(), uuid.uuid4()
    pool = workers(judge_db, engine, claim_batch=10)
    try:
        await store.enqueue(ALICE, run_a, make_items(1, run_a), {})
        await store.enqueue(BOB, run_b, make_items(3, run_b), {})
        claimed = await pool.claim()
        corrupt = [replace(t, prediction=None) if t.user_id == ALICE else t for t in claimed]
        await pool.settle(await pool.judge(corrupt))
    finally:
        await engine.dispose()
    [task] = await task_states(judge_db, run_a)
    assert (task.state, task.attempts) == (TaskState.FAILED, 1)
    assert task.last_error.startswith("rule judging raised TypeError: ")
    assert await judgments_of(judge_db, run_a) == []
    assert [t.state for t in await task_states(judge_db, run_b)] == [TaskState.DONE] * 3
    assert len(await judgments_of(judge_db, run_b)) == 3 * RULES_WITH_TRUTH
    assert (pool.counts["item_errors"], pool.counts["failed"], pool.counts["done"]) == (1, 1, 3)


# --- 9: the caller's own runs only; the stored text is what is judged -----------------------

async def test_another_users_run_is_not_found_on_every_judge_rpc(server):
    """The old EnqueueJudging took any run id: BOB could queue into ALICE's run (learning that
    a prediction exists) and pre-queue her future keys with his own text."""
    run_id = uuid.uuid4()
    await server.db.create_run(ALICE, run_id, make_items(1, run_id))
    for target in (run_id, uuid.uuid4()):  # another user's run, a run that does not exist
        enqueue = server.stub.EnqueueJudging(enqueue_request(target, 2),
                                             metadata=server.md(BOB))
        adhoc = server.stub.JudgePredictions(judge_pb2.JudgePredictionsRequest(
            items=items(target, 1)), metadata=server.md(BOB))
        for call in (enqueue, adhoc):
            assert await expect_code(call, grpc.StatusCode.NOT_FOUND) == f"run {target} not found"
    assert await server.db.scalar("SELECT count(*) FROM judge.tasks") == 0
    owned = await server.stub.EnqueueJudging(enqueue_request(run_id, 1), metadata=server.md(ALICE))
    assert owned.enqueued_count == 1


async def test_judged_text_is_the_stored_prediction(server):
    """The stored prediction 0 equals its ground truth; the caller sends other text. The old
    judge judged the caller's text (exact_match failed)."""
    run_id = uuid.uuid4()
    await server.db.create_run(ALICE, run_id, make_items(2, run_id))
    forged = enqueue_request(run_id, 2, prediction_text="forged", prompt="forged prompt")
    await server.stub.EnqueueJudging(forged, metadata=server.md(ALICE))
    await tasks_done(server, run_id, 2)
    exact = [(r.sample_index, bool(r.passed)) for r in await judgments_of(server.db, run_id)
             if r.criterion == "exact_match"]
    assert exact == [(0, True), (1, False)]
    reply = await server.stub.JudgePredictions(judge_pb2.JudgePredictionsRequest(
        items=forged.items[:1], config=dict_to_struct({"rules": {"criteria": ["exact_match"]}})),
        metadata=server.md(ALICE))
    assert [(j.criterion, j.passed) for j in reply.judgments] == [("exact_match", True)]


async def test_judge_role_reads_the_writers_rows_of_the_user_it_acts_for(pg):
    """The judge role had no grant on schema writer (permission denied)."""
    db = JudgeDb("postgres", pg.database, None, pg.admin)
    run_id = await db.create_run(ALICE)
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=JUDGE_ROLE,
                                 database=pg.database)
    try:
        for user, expected in ((ALICE, 1), (BOB, 0), (None, 0)):
            async with conn.transaction():
                if user is not None:
                    await conn.execute("SELECT set_config('epochlens.user_id', $1, true)", user)
                assert await conn.fetchval("SELECT count(*) FROM writer.runs WHERE id = $1",
                                           run_id) == expected
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM writer.predictions")
    finally:
        await conn.close()


# --- 10: the LLM cache is per user ----------------------------------------------------------

async def test_llm_cache_is_per_user(pg, fake):
    """The old cache key had no user: BOB got ALICE's verdict at 0 tokens, learning that she
    had judged that text."""
    judge = LlmJudge(LlmSettings(**llm_settings(fake)), pg.engine)
    shared = llm_items(1)
    try:
        first = await judge.judge(ALICE, shared, judge_config(criteria=["accuracy"]))
        second = await judge.judge(BOB, shared, judge_config(criteria=["accuracy"]))
        again = await judge.judge(BOB, shared, judge_config(criteria=["accuracy"]))
    finally:
        await judge.aclose()
    assert len(fake.requests) == 2
    assert [(v.input_tokens, v.cost_usd) for v in first + second] == [
        (500, pytest.approx(CALL_COST))] * 2
    assert [(again[0].status, again[0].input_tokens, again[0].cost_usd)] == [(SCORED, 0, 0.0)]
    config = judge_config(criteria=["accuracy"])
    keys = {user: cache.cache_key(user, config, fake.openai_url, "v1", "accuracy",
                                  STANDARD_RUBRICS["accuracy"], shared[0])
            for user in (ALICE, BOB)}
    async with pg.admin.connect() as conn:
        rows = (await conn.execute(select(llm_cache_table).where(
            llm_cache_table.c.key.in_(keys.values())))).all()
    assert sorted((r.user_id, r.key, r.input_tokens, r.cost_usd) for r in rows) == [
        (user, keys[user], 500, pytest.approx(CALL_COST)) for user in (ALICE, BOB)]
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=JUDGE_ROLE,
                                 database=pg.database)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('epochlens.user_id', $1, true)", BOB)
            seen = await conn.fetch("SELECT user_id FROM judge.llm_cache WHERE key = ANY($1)",
                                    list(keys.values()))
        assert [r["user_id"] for r in seen] == [BOB]  # row-level security
    finally:
        await conn.close()


# --- 11: endpoints and keys are the operator's ------------------------------------------------

@pytest.mark.parametrize("llm", [
    {"provider": "openai_compatible", "model": "m", "base_url": "http://attacker.example/v1"},
    {"provider": "openai", "model": MODEL, "base_url": "http://attacker.example/v1"},
])
async def test_run_config_naming_a_url_is_refused(server, fake, llm):
    """The old judge sent the operator's key to whatever base_url a run config named."""
    run_id = await server.db.create_run(ALICE)
    config = {"llm": llm}
    for call in (server.stub.EnqueueJudging(enqueue_request(run_id, 1, config),
                                            metadata=server.md(ALICE)),
                 server.stub.JudgePredictions(judge_pb2.JudgePredictionsRequest(
                     items=items(run_id, 1), config=dict_to_struct(config)),
                     metadata=server.md(ALICE))):
        violations = await expect_invalid(call)
        assert "operator configuration" in violations["config.llm.base_url"]
    assert fake.requests == []


@pytest.mark.parametrize(("llm", "field", "says"), [
    ({"provider": "openai_compatible", "model": "m"}, "config.llm.endpoint",
     "required for provider openai_compatible: the name of an endpoint this judge is "
     "configured with (configured: local, pinned)"),
    ({"provider": "openai_compatible", "model": "m", "endpoint": "elsewhere"},
     "config.llm.endpoint", "unknown endpoint 'elsewhere' (configured: local, pinned)"),
    ({"provider": "openai_compatible", "model": "other", "endpoint": "pinned"},
     "config.llm.model", "endpoint 'pinned' serves only small"),
    ({"provider": "openai", "model": MODEL, "endpoint": "local"}, "config.llm.endpoint",
     "only for provider openai_compatible"),
])
def test_endpoint_must_be_one_the_operator_configured(llm, field, says):
    settings = JudgeSettings(_env_file=None, port=0, llm_endpoints={
        "local": {"base_url": "http://127.0.0.1:9/v1"},
        "pinned": {"base_url": "http://127.0.0.1:9/v1", "models": ["small"]}})
    with pytest.raises(InvalidArgument) as caught:
        validate_judge_config(settings, {"llm": llm})
    assert {v.field: v.description for v in caught.value.violations} == {field: says}


async def test_each_key_goes_only_to_its_own_endpoint(pg, monkeypatch):
    """Endpoint keys: `a` has its key inline, `b` from an environment variable; the OpenAI key
    goes to the OpenAI URL only. The old judge sent one compatible key to every base_url."""
    monkeypatch.setenv("EPOCHLENS_TEST_ENDPOINT_B_KEY", "key-b")
    one, two = FakeLlmServer().start(), FakeLlmServer().start()
    settings = LlmSettings(openai_api_key="openai-key", openai_base_url=two.openai_url,
                           llm_prices={MODEL: PRICE}, llm_endpoints={
                               "a": {"base_url": one.openai_url, "api_key": "key-a"},
                               "b": {"base_url": two.openai_url,
                                     "api_key_env": "EPOCHLENS_TEST_ENDPOINT_B_KEY"}})
    judge = LlmJudge(settings, pg.engine)
    try:
        for provider, endpoint in (("openai_compatible", "a"), ("openai_compatible", "b"),
                                   ("openai", None)):
            await judge.judge(ALICE, llm_items(1), LlmJudgeConfig(
                provider=provider, model=MODEL, endpoint=endpoint, criteria=["accuracy"]))
    finally:
        await judge.aclose()
        one.stop()
        two.stop()
    assert [r.headers["authorization"] for r in one.requests] == ["Bearer key-a"]
    assert [r.headers["authorization"] for r in two.requests] == ["Bearer key-b",
                                                                 "Bearer openai-key"]


def test_endpoint_settings_are_checked_at_start():
    for endpoint in ({"base_url": "file:///etc/passwd"},
                     {"base_url": "http://h/v1", "api_key_env": "EPOCHLENS_TEST_UNSET_VAR"},
                     {"base_url": "http://h/v1", "api_key": "k", "api_key_env": "HOME"}):
        with pytest.raises(ValidationError):
            LlmSettings(llm_endpoints={"x": endpoint})


# --- 13: spending never exceeds the budget --------------------------------------------------

async def test_budget_is_never_exceeded_at_concurrency_32(pg, fake):
    """Two judges (two replicas) on one run, each at concurrency 32, $0.10 of budget for
    calls billed $0.002 and reserved at about $0.0066 each. The old check (spent < budget
    before each call) let every call in flight complete: up to 31 calls per judge past it."""
    fake.latency_s = 0.05
    run_id, budget = uuid.uuid4(), 0.10
    settings = LlmSettings(**{**llm_settings(fake), "llm_max_concurrency": 32})
    judges = [LlmJudge(settings, pg.engine) for _ in range(2)]
    config = judge_config(concurrency=32, budget_usd=budget)
    try:
        verdicts = await asyncio.gather(*(
            judge.judge(ALICE, llm_items(40, run_id, step=10 * (n + 1)), config)
            for n, judge in enumerate(judges)))
    finally:
        for judge in judges:
            await judge.aclose()
    billed = fake.billed_usd(PRICE.input_per_mtok, PRICE.output_per_mtok)
    async with pg.admin.connect() as conn:
        row = (await conn.execute(select(run_llm_state_table).where(
            run_llm_state_table.c.run_id == run_id))).one()
    calls = len(fake.requests)
    assert billed <= budget and row.spent_usd <= budget
    assert (row.spent_usd, billed) == (pytest.approx(calls * CALL_COST),) * 2
    assert sum(v.cost_usd for batch in verdicts for v in batch) == pytest.approx(billed)
    assert sum(v.status == SCORED for batch in verdicts for v in batch) == calls
    assert (row.reserved_usd, row.reserved_until, row.budget_exhausted) == (0.0, None, True)
    most = max(max_call_cost(settings, PRICE, render("v1", name, rubric, item))
               for name, rubric in STANDARD_RUBRICS.items() for item in llm_items(1, run_id))
    assert budget - row.spent_usd < most  # it stopped only when no further call could fit
    assert max(r.in_flight for r in fake.requests) > 1
    print(f"\nbudget ${budget:.6f}, spent ${row.spent_usd:.6f}, billed ${billed:.6f} "
          f"({calls} calls, 2 judges at concurrency 32)")


async def test_reservation_of_a_dead_judge_counts_as_spent_once_expired(pg, fake):
    """A judge killed mid-call leaves its reservation; once reserved_until passes it is
    counted as spent (the call may have been billed) and no longer blocks the run."""
    run_id = uuid.uuid4()
    judge = LlmJudge(LlmSettings(**llm_settings(fake)), pg.engine)
    config = judge_config(criteria=["accuracy"], budget_usd=0.01)
    try:
        await judge.judge(ALICE, llm_items(1, run_id), config)
        async with pg.admin.begin() as conn:
            await conn.execute(update(run_llm_state_table).where(
                run_llm_state_table.c.run_id == run_id).values(
                reserved_usd=0.004, reserved_until=datetime.now(UTC) - timedelta(seconds=1)))
        verdicts = await judge.judge(ALICE, llm_items(1, run_id, step=20), config)
    finally:
        await judge.aclose()
    async with pg.admin.connect() as conn:
        row = (await conn.execute(select(run_llm_state_table).where(
            run_llm_state_table.c.run_id == run_id))).one()
    # $0.002 + $0.004 expired = $0.006 spent; the next call (~$0.0066) no longer fits.
    assert row.spent_usd == pytest.approx(0.006) and row.reserved_usd == 0.0
    assert len(fake.requests) == 1 and verdicts[0].unscored_reason.startswith("budget exhausted")


# --- 14: the cost of a call is recorded when it is made ---------------------------------------

async def test_cost_billed_before_a_crash_is_kept_in_the_judgments(judge_db, fake):
    """The judge judged a task (5 paid calls, cached) and died before storing its judgments;
    the task was claimed again and judged from the cache. The old cache hit cost $0, so the
    run's judgments said $0 for $0.010 billed."""
    engine = judge_db.engine()
    run_id = uuid.uuid4()
    settings = llm_settings(fake)
    crashed, survivor = workers(judge_db, engine, **settings), workers(judge_db, engine,
                                                                      **settings)
    try:
        await JudgeStore(engine).enqueue(ALICE, run_id, llm_items(1, run_id),
                                         {"llm": {"provider": "openai", "model": MODEL}})
        await crashed.judge(await crashed.claim())  # judged and cached, never settled
        async with judge_db.admin.begin() as conn:
            await conn.execute(update(tasks_table).where(tasks_table.c.run_id == run_id).values(
                lease_until=datetime.now(UTC) - timedelta(seconds=1)))
        assert await survivor.run_once() == 1
    finally:
        for pool in (crashed, survivor):
            await pool._judging.close()
        await engine.dispose()
    billed = fake.billed_usd(PRICE.input_per_mtok, PRICE.output_per_mtok)
    llm = [r for r in await judgments_of(judge_db, run_id)
           if r.judge_type == judge_pb2.JUDGE_TYPE_LLM]
    assert len(fake.requests) == 5 and billed == pytest.approx(5 * CALL_COST)
    assert [(r.input_tokens, r.output_tokens) for r in llm] == [(500, 100)] * 5
    assert sum(r.cost_usd for r in llm) == pytest.approx(billed)
    spent = await judge_db.scalar("SELECT spent_usd FROM judge.run_llm_state")
    assert spent == pytest.approx(billed)


# --- the schema -------------------------------------------------------------------------------

async def test_migration_0002_matches_the_model(pg):
    def differences(sync_conn) -> list:
        context = MigrationContext.configure(sync_conn, opts={"include_schemas": True})
        return [diff for diff in compare_metadata(context, JudgeBase.metadata)
                if "llm_cache" in repr(diff) or "run_llm_state" in repr(diff)]
    engine = create_engine(JudgeSettings(_env_file=None, port=0,
                                         database_url=pg_url(PG_ADMIN, pg.database)), (SCHEMA,))
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(differences) == []
            policies = set(await conn.scalars(text(
                "SELECT policyname FROM pg_policies WHERE schemaname = 'judge' "
                "AND tablename = 'llm_cache'")))
    finally:
        await engine.dispose()
    assert policies == {"llm_cache_owner"}
