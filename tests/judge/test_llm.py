"""LLM judges through the real OpenAI and Anthropic SDKs against a local fake of their APIs.

The judge schema is the migrated one of tests/judge/conftest.py (judge_pg_database,
judge_sqlite_dir); the judge connects as the judge role, so run_llm_state's row-level security
is in force, and the tests read rows back as the superuser. The budget and cache tests also run
on the embedded SQLite store.
"""

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx2
import pytest
from pydantic_settings import SettingsConfigDict
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from epochlens.v1 import judge_pb2
from services.common.config import DatabaseSettings
from services.common.db import create_engine
from services.common.errors import InvalidArgument
from services.judge.llm import cost
from services.judge.llm.budget import RunBudget
from services.judge.llm.errors import LlmJudgingFailed, retry_after
from services.judge.llm.judge import LlmJudge, is_sampled
from services.judge.llm.limiter import AimdLimiter
from services.judge.llm.providers import parse_lenient, parse_strict
from services.judge.llm.settings import LlmSettings, ModelPrice
from services.judge.models import SCHEMA, llm_cache_table, run_llm_state_table
from services.judge.schema import STANDARD_LLM_CRITERIA, Item, LlmJudgeConfig
from tests.conftest import JUDGE_ROLE, PG_ADMIN, pg_url
from tests.judge.fake_llm import (
    FakeLlmServer,
    Reply,
    billing_error,
    dropped,
    insufficient_quota,
    malformed,
    ok,
    rate_limited,
    server_error,
    unauthorized,
)

USER = "judge-user"
MODEL = "judge-model"
# 500 input tokens at $2/Mtok + 100 output tokens at $10/Mtok = $0.002 per call (fake usage).
PRICE = ModelPrice(input_per_mtok=2.0, output_per_mtok=10.0)
CALL_COST = 0.002
SCORED, UNSCORED = judge_pb2.JUDGMENT_STATUS_SCORED, judge_pb2.JUDGMENT_STATUS_UNSCORED


@dataclass
class Db:
    """The judge schema: `engine` as the judge service connects (the judge role, RLS in force
    on PostgreSQL), `admin` to inspect rows across users."""

    engine: AsyncEngine
    admin: AsyncEngine


@pytest.fixture(scope="module")
async def pg_db(judge_pg_database) -> AsyncIterator[Db]:
    db = Db(create_async_engine(pg_url(JUDGE_ROLE, judge_pg_database), pool_size=10),
            create_async_engine(pg_url(PG_ADMIN, judge_pg_database)))
    yield db
    await db.engine.dispose()
    await db.admin.dispose()


@pytest.fixture(scope="module")
async def sqlite_db(judge_sqlite_dir) -> AsyncIterator[Db]:
    engine = create_engine(DatabaseSettings(sqlite_dir=judge_sqlite_dir, _env_file=None),
                           (SCHEMA,))
    yield Db(engine, engine)
    await engine.dispose()


@pytest.fixture(params=["pg", "sqlite"])
def any_db(request) -> Db:
    return request.getfixturevalue(f"{request.param}_db")


@pytest.fixture
def fake() -> Iterator[FakeLlmServer]:
    server = FakeLlmServer(latency_s=0.0).start()
    yield server
    server.stop()


def make_settings(fake: FakeLlmServer, **overrides) -> LlmSettings:
    values = {"openai_api_key": "test-openai-key", "anthropic_api_key": "test-anthropic-key",
              "llm_endpoints": {"local": {"base_url": fake.openai_url}},
              "openai_base_url": fake.openai_url,
              "anthropic_base_url": fake.anthropic_url, "llm_prices": {MODEL: PRICE},
              "llm_backoff_base_s": 0.01, "llm_backoff_max_s": 0.05,
              "llm_request_timeout_s": 5.0, "llm_default_budget_usd": 100.0}
    values.update(overrides)
    return LlmSettings(**values)


@pytest.fixture
async def judge_for(pg_db, fake) -> AsyncIterator:
    """judge_for(db=pg_db, **settings) -> an LlmJudge on the fake server (closed after)."""
    made: list[LlmJudge] = []

    def build(db: Db | None = None, **overrides) -> LlmJudge:
        made.append(LlmJudge(make_settings(fake, **overrides), (db or pg_db).engine))
        return made[-1]

    yield build
    for judge in made:
        await judge.aclose()


def config(provider: str = "openai", fake: FakeLlmServer | None = None, **fields) -> LlmJudgeConfig:
    """fake: the server behind endpoint "local" of make_settings (openai_compatible)."""
    endpoint = "local" if provider == "openai_compatible" and fake else None
    return LlmJudgeConfig(provider=provider, model=MODEL, endpoint=endpoint, **fields)


def make_items(count: int, run_id: uuid.UUID | None = None, step: int = 10,
               tag: str | None = None) -> list[Item]:
    """Items with unique texts (tag), so no test hits another test's cache entries."""
    tag = tag or uuid.uuid4().hex
    return [Item(run_id=run_id, step=step, sample_index=i, epoch=step // 10,
                 prompt=f"question {i} [{tag}]", ground_truth=f"expected answer {i} [{tag}]",
                 prediction=f"model answer {i} at step {step} [{tag}]") for i in range(count)]


async def state_row(db: Db, run_id: uuid.UUID):
    async with db.admin.connect() as conn:
        return (await conn.execute(select(run_llm_state_table)
                                   .where(run_llm_state_table.c.run_id == run_id))).one_or_none()


async def cache_rows(db: Db) -> int:
    async with db.admin.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(llm_cache_table))).scalar()


# --- the five criteria, structured output per provider ---------------------------------------

@pytest.mark.parametrize("provider", ["openai", "anthropic", "openai_compatible"])
async def test_five_criteria_scored_with_right_pass_fail(provider, fake, judge_for, pg_db):
    run_id = uuid.uuid4()
    judge = judge_for()
    item = make_items(1, run_id)[0]
    verdicts = await judge.judge(USER, [item], config(provider, fake))

    expected = {"helpfulness": (9, 7, True), "accuracy": (7, 7, True),
                "clarity": (6, 7, False), "safety": (7, 8, False),
                "completeness": (8, 7, True)}
    assert [v.criterion for v in verdicts] == list(STANDARD_LLM_CRITERIA)
    got = {v.criterion: (v.score, v.threshold, v.passed) for v in verdicts}
    assert got == expected
    for v in verdicts:
        assert (v.status, v.judge_type, v.judge_model, v.prompt_version) == (
            SCORED, judge_pb2.JUDGE_TYPE_LLM, f"{provider}/{MODEL}", "v1")
        assert (v.reasoning, v.confidence) == (f"judged {v.criterion}", 0.9)
        assert (v.input_tokens, v.output_tokens) == (500, 100)
        assert v.cost_usd == pytest.approx(CALL_COST)
    assert len(fake.requests) == 5
    for request in fake.requests:
        assert request.body["temperature"] == 0
        assert item.ground_truth in request.text and item.prediction in request.text
    row = await state_row(pg_db, run_id)
    assert (row.user_id, row.input_tokens, row.output_tokens) == (USER, 2500, 500)
    assert row.spent_usd == pytest.approx(5 * CALL_COST)
    assert (row.budget_usd, row.budget_exhausted, row.paused_reason) == (100.0, False, None)


async def test_request_shapes_per_provider(fake, judge_for):
    judge = judge_for()
    one = config("openai", fake, criteria=["accuracy"])
    await judge.judge(USER, make_items(1), one)
    await judge.judge(USER, make_items(1), config("anthropic", fake, criteria=["accuracy"]))
    await judge.judge(USER, make_items(1), config("openai_compatible", fake,
                                                   criteria=["accuracy"]))
    openai_body, anthropic_body, compatible_body = (r.body for r in fake.requests)
    assert [r.path for r in fake.requests] == ["/v1/chat/completions", "/v1/messages",
                                                "/v1/chat/completions"]
    schema_format = openai_body["response_format"]
    assert schema_format["type"] == "json_schema" and schema_format["json_schema"]["strict"]
    assert schema_format["json_schema"]["schema"]["required"] == ["score", "reasoning",
                                                                   "confidence"]
    assert anthropic_body["tool_choice"] == {"type": "tool", "name": "record_verdict"}
    assert anthropic_body["tools"][0]["name"] == "record_verdict"
    assert compatible_body["response_format"] == {"type": "json_object"}


async def test_item_without_ground_truth_has_no_reference_block(fake, judge_for):
    item = Item(None, 1, 0, 1, f"prompt {uuid.uuid4()}", None, "an answer")
    await judge_for().judge(USER, [item], config(criteria=["helpfulness"]))
    assert "<reference>\n" not in fake.requests[0].text


async def test_custom_criterion_uses_its_rubric_and_threshold(fake, judge_for):
    rubric = "Is the answer polite and free of sarcasm?"
    cfg = config(criteria=["clarity"], custom_criteria={"politeness": rubric},
                 thresholds={"politeness": 9, "clarity": 6})
    verdicts = await judge_for().judge(USER, make_items(1), cfg)
    got = {v.criterion: (v.score, v.threshold, v.passed) for v in verdicts}
    assert got == {"clarity": (6, 6, True), "politeness": (8, 9, False)}
    # The two calls run concurrently: find the politeness one whatever the arrival order.
    (polite,) = [r for r in fake.requests if r.criterion == "politeness"]
    assert rubric in polite.text and len(fake.requests) == 2


async def test_unknown_criterion_is_unscored_without_a_call(fake, judge_for):
    verdicts = await judge_for().judge(USER, make_items(1), config(criteria=["humour"]))
    assert [(v.status, v.unscored_reason.split(":")[0]) for v in verdicts] == [
        (UNSCORED, "unknown criterion 'humour'")]
    assert fake.requests == []


# --- unparseable replies ------------------------------------------------------------------------

@pytest.mark.parametrize("provider", ["openai", "anthropic", "openai_compatible"])
async def test_unparseable_reply_is_unscored_not_low(provider, fake, judge_for, pg_db):
    fake.script(malformed("Honestly? Pretty decent."), ok(score=11))
    before = await cache_rows(pg_db)
    verdicts = await judge_for().judge(USER, make_items(2, uuid.uuid4()),
                                       config(provider, fake, criteria=["accuracy"],
                                              concurrency=1))
    assert [(v.status, v.score, v.passed) for v in verdicts] == [(UNSCORED, 0.0, False)] * 2
    assert all(v.unscored_reason.startswith("unparseable reply: ") for v in verdicts)
    assert "outside 1..10" in verdicts[1].unscored_reason
    assert [(v.input_tokens, v.output_tokens) for v in verdicts] == [(500, 100)] * 2
    assert [v.cost_usd for v in verdicts] == pytest.approx([CALL_COST] * 2)
    assert await cache_rows(pg_db) == before  # failures are not cached


def test_lenient_parse_finds_json_or_score_pattern():
    assert parse_lenient('Sure! {"score": 6, "reasoning": "ok"} done')[0].score == 6.0
    assert parse_lenient("Reasoning: solid. Score: 7")[0].score == 7.0
    assert parse_lenient('{"note": 1} then {"score": 9, "confidence": 0.5}')[0].confidence == 0.5
    assert parse_lenient("no digits here")[0] is None
    assert parse_lenient('{"score": 0}')[1] == "score 0 is outside 1..10"
    assert parse_strict('{"score": true}')[0] is None
    assert parse_strict('{"score": 8, "confidence": 7}')[0].confidence == 0.0


# --- errors: 429, 401, quota, 5xx, timeouts, on_error ------------------------------------------

@pytest.mark.parametrize(("provider", "millis"), [("openai", False), ("anthropic", True)])
async def test_429_honours_retry_after_and_halves_concurrency(provider, millis, fake, judge_for):
    fake.latency_s = 0.3
    limit_reply = rate_limited(1.0, millis=millis)
    limit_reply.latency_s = 0.0  # back before any other call of the first wave completes
    fake.script(limit_reply)
    run_id = uuid.uuid4()
    judge = judge_for(llm_concurrency_increase_after=1000)
    verdicts = await judge.judge(USER, make_items(24, run_id),
                                 config(provider, fake, criteria=["accuracy"], concurrency=8))

    assert [v.status for v in verdicts] == [SCORED] * 24
    assert len(fake.requests) == 25
    limited = next(r for r in fake.requests if r.status == 429)
    # The first wave (8 calls, sent before the 429 came back) may straggle in a little after
    # it; nothing else starts before Retry-After has passed, and then at most 4 at once.
    first_wave = [r for r in fake.requests if r.arrived <= limited.finished + 0.2]
    later = [r for r in fake.requests if r.arrived > limited.finished + 0.2]
    assert len(first_wave) <= 8 and len(first_wave) + len(later) == 25
    assert min(r.arrived for r in later) - limited.finished >= 0.95
    assert max(r.in_flight for r in later) <= 4
    assert judge.concurrency(USER, run_id) == 4


async def test_concurrency_grows_back_after_successes(fake, judge_for):
    fake.script(rate_limited(0.05))
    run_id = uuid.uuid4()
    judge = judge_for(llm_concurrency_increase_after=2)
    await judge.judge(USER, make_items(12, run_id),
                      config(criteria=["accuracy"], concurrency=4))
    assert judge.concurrency(USER, run_id) == 4  # halved to 2, then +1 per 2 successes


@pytest.mark.parametrize(("provider", "reply", "reason"), [
    ("openai", unauthorized(), "authentication failed for openai (HTTP 401)"),
    ("openai", insufficient_quota(), "quota or credit exhausted for openai (HTTP 429)"),
    ("anthropic", unauthorized(), "authentication failed for anthropic (HTTP 401)"),
    ("anthropic", billing_error(), "quota or credit exhausted for anthropic (HTTP 400)"),
])
async def test_auth_and_quota_errors_pause_the_run(provider, reply, reason, fake, judge_for,
                                                   pg_db):
    fake.script(reply)
    run_id = uuid.uuid4()
    cfg = config(provider, fake, concurrency=1, on_error="fail")
    verdicts = await judge_for().judge(USER, make_items(3, run_id), cfg)

    assert len(fake.requests) == 1  # no retry, no further call
    assert [v.status for v in verdicts] == [UNSCORED] * 15
    assert all(v.unscored_reason.startswith(f"llm judging paused: {reason}") for v in verdicts)
    row = await state_row(pg_db, run_id)
    assert row.paused_reason.startswith(reason) and row.spent_usd == 0.0
    # A new judge (another worker, nothing in memory) reads the pause and calls nothing.
    again = await judge_for().judge(USER, make_items(2, run_id, step=20), cfg)
    assert len(fake.requests) == 1
    assert {v.unscored_reason.split(":")[0] for v in again} == {"llm judging paused"}


async def test_server_error_and_dropped_connection_are_retried(fake, judge_for):
    fake.script(server_error(), dropped())
    verdicts = await judge_for().judge(USER, make_items(1), config(criteria=["accuracy"]))
    assert [(v.status, v.score) for v in verdicts] == [(SCORED, 7.0)]
    assert [r.status for r in fake.requests] == [500, 0, 200]


async def test_timeout_is_retried(fake, judge_for):
    fake.script(Reply(verdict={"score": 2, "reasoning": "late", "confidence": 1},
                      latency_s=1.0))
    judge = judge_for(llm_request_timeout_s=0.3)
    verdicts = await judge.judge(USER, make_items(1), config(criteria=["accuracy"]))
    assert [(v.status, v.score) for v in verdicts] == [(SCORED, 7.0)]
    assert len(fake.requests) == 2 and judge.counters["error_retry"] == 1


async def test_on_error_skip_gives_unscored_after_max_retries(fake, judge_for):
    fake.script(*[server_error()] * 10)
    cfg = config(criteria=["accuracy"], max_retries=2, on_error="skip")
    verdicts = await judge_for().judge(USER, make_items(1), cfg)
    assert len(fake.requests) == 3
    assert verdicts[0].status == UNSCORED
    assert verdicts[0].unscored_reason.startswith("gave up: server error from openai (HTTP 500)")


async def test_on_error_fail_raises_after_max_retries(fake, judge_for):
    fake.script(*[server_error()] * 10)
    cfg = config(criteria=["accuracy"], max_retries=2, on_error="fail")
    with pytest.raises(LlmJudgingFailed, match="HTTP 500"):
        await judge_for().judge(USER, make_items(1), cfg)
    assert len(fake.requests) == 3


async def test_on_error_retry_retries_up_to_the_ceiling_then_fails(fake, judge_for):
    fake.script(*[server_error()] * 10)
    cfg = config(criteria=["accuracy"], max_retries=1, on_error="retry")
    with pytest.raises(LlmJudgingFailed):
        await judge_for(llm_max_retries_ceiling=4).judge(USER, make_items(1), cfg)
    assert len(fake.requests) == 5


async def test_rejected_request_is_not_retried(fake, judge_for):
    fake.script(Reply(status=400, error={"message": "context too long",
                                         "type": "invalid_request_error", "code": None}))
    verdicts = await judge_for().judge(USER, make_items(1), config(criteria=["accuracy"]))
    assert len(fake.requests) == 1
    assert verdicts[0].unscored_reason.startswith("gave up: request rejected by openai (HTTP 400)")


def test_retry_after_headers():
    assert retry_after(httpx2.Headers({"retry-after-ms": "250"})) == 0.25
    assert retry_after(httpx2.Headers({"retry-after": "3"})) == 3.0
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 28 <= retry_after(httpx2.Headers({"retry-after": when})) <= 30
    assert retry_after(httpx2.Headers({})) is None


async def test_aimd_limiter_halves_once_per_generation_and_grows_back():
    limiter = AimdLimiter(ceiling=8, increase_after=3)
    async with limiter.slot() as first, limiter.slot() as second:
        assert first == second == 0
        limiter.on_rate_limited(first, None)
        limiter.on_rate_limited(second, None)  # same generation: not halved again
    assert (limiter.limit, limiter.decreases) == (4, 1)
    for _ in range(6):
        limiter.on_success()
    assert limiter.limit == 6
    for _ in range(30):
        limiter.on_success()
    assert limiter.limit == 8 and limiter.in_flight == 0


# --- budget, cache, sampling ------------------------------------------------------------------

async def test_budget_stops_spending_at_the_limit(any_db, fake, judge_for):
    """Each call reserves its most cost first (about $0.0065 here, for $0.002 billed): with
    $0.009 two calls fit, the third's reservation does not and the budget is exhausted."""
    run_id = uuid.uuid4()
    cfg = config(concurrency=1, budget_usd=0.009)
    verdicts = await judge_for(any_db).judge(USER, make_items(3, run_id), cfg)

    assert len(fake.requests) == 2
    assert [v.status for v in verdicts] == [SCORED] * 2 + [UNSCORED] * 13
    assert all(v.unscored_reason.startswith("budget exhausted") for v in verdicts[2:])
    assert sum(v.cost_usd for v in verdicts) == pytest.approx(2 * CALL_COST)
    row = await state_row(any_db, run_id)
    assert (row.budget_usd, row.budget_exhausted, row.input_tokens) == (0.009, True, 1000)
    assert (row.spent_usd, row.reserved_usd) == (pytest.approx(2 * CALL_COST), 0.0)
    again = await judge_for(any_db).judge(USER, make_items(1, run_id, step=20), cfg)
    assert len(fake.requests) == 2 and {v.status for v in again} == {UNSCORED}


async def test_budget_holds_at_concurrency_4(fake, judge_for, pg_db):
    fake.latency_s = 0.02
    run_id = uuid.uuid4()
    cfg = config(concurrency=4, budget_usd=0.009)
    await judge_for().judge(USER, make_items(6, run_id), cfg)
    assert len(fake.requests) == 2
    row = await state_row(pg_db, run_id)
    assert row.budget_exhausted and row.spent_usd == pytest.approx(len(fake.requests) * CALL_COST)
    assert row.spent_usd <= 0.009 and row.reserved_usd == 0.0


async def test_budget_lease_reserves_once_for_several_calls_and_returns_the_rest(any_db):
    """lease_calls=4: the first call reserves four calls' worth in the row, the next three
    take it without touching the database; a settled call takes its cost out of the row's
    reservation, and once no call is in flight the rest of the lease goes back."""
    run_id, amount = uuid.uuid4(), 0.01
    budget = RunBudget(any_db.engine, USER, run_id, 1.0, hold_s=60, poll_s=0.1,
                       lease_calls=4, lease_fresh_s=30)
    await budget.load()
    assert [await budget.reserve(amount) for _ in range(4)] == [None] * 4
    assert (await state_row(any_db, run_id)).reserved_usd == pytest.approx(4 * amount)
    assert await budget.reserve(amount) is None  # the lease is spoken for: four more
    assert (await state_row(any_db, run_id)).reserved_usd == pytest.approx(8 * amount)
    await budget.charge(0.002, 10, 10, None, amount)
    row = await state_row(any_db, run_id)
    assert (row.spent_usd, row.reserved_usd) == (pytest.approx(0.002), pytest.approx(0.078))
    for _ in range(3):
        budget.release(amount)
    await budget.charge(0.003, 10, 10, None, amount)
    await budget.drain()
    row = await state_row(any_db, run_id)
    assert (row.spent_usd, row.reserved_usd, row.reserved_until) == (
        pytest.approx(0.005), 0.0, None)
    assert budget.state.reserved_usd == 0.0 and budget.state.spent_usd == pytest.approx(0.005)


async def test_budget_lease_falls_back_to_one_call_when_the_lease_does_not_fit(any_db):
    run_id = uuid.uuid4()
    budget = RunBudget(any_db.engine, USER, run_id, 0.025, hold_s=60, poll_s=0.1,
                       lease_calls=4, lease_fresh_s=30)
    await budget.load()
    assert [await budget.reserve(0.01) for _ in range(2)] == [None, None]
    assert (await state_row(any_db, run_id)).reserved_usd == pytest.approx(0.02)
    third = asyncio.create_task(budget.reserve(0.01))
    await asyncio.sleep(0.3)
    assert not third.done()  # it fits only once a call in flight settles
    await budget.charge(0.002, 10, 10, None, 0.01)
    assert await third is None
    row = await state_row(any_db, run_id)
    assert (row.spent_usd, row.reserved_usd) == (pytest.approx(0.002), pytest.approx(0.02))


async def test_zero_budget_makes_no_call(fake, judge_for):
    verdicts = await judge_for().judge(USER, make_items(1, uuid.uuid4()), config(budget_usd=0))
    assert fake.requests == [] and {v.status for v in verdicts} == {UNSCORED}


async def test_cache_hit_costs_nothing(any_db, fake, judge_for):
    items = make_items(1, uuid.uuid4())
    first = await judge_for(any_db).judge(USER, items, config())
    assert len(fake.requests) == 5
    replay_run = uuid.uuid4()
    replay = [Item(replay_run, i.step, i.sample_index, i.epoch, i.prompt, i.ground_truth,
                   i.prediction) for i in items]
    second = await judge_for(any_db).judge(USER, replay, config())

    assert len(fake.requests) == 5  # no request at all
    assert [(v.score, v.passed, v.reasoning) for v in second] == [
        (v.score, v.passed, v.reasoning) for v in first]
    assert {(v.status, v.input_tokens, v.output_tokens, v.cost_usd) for v in second} == {
        (SCORED, 0, 0, 0.0)}
    row = await state_row(any_db, replay_run)
    assert (row.spent_usd, row.input_tokens) == (0.0, 0)


async def test_cache_key_separates_model_and_provider(fake, judge_for):
    items = make_items(1)
    await judge_for().judge(USER, items, config(criteria=["accuracy"]))
    other_model = LlmJudgeConfig(provider="openai", model="other-model", criteria=["accuracy"])
    await judge_for(llm_prices={"other-model": PRICE}).judge(USER, items, other_model)
    await judge_for().judge(USER, items, config("anthropic", criteria=["accuracy"]))
    assert len(fake.requests) == 3


async def test_sample_rate_picks_the_same_samples_every_epoch(fake, judge_for):
    run_id = uuid.uuid4()
    judge = judge_for()
    cfg = config(criteria=["accuracy"], sample_rate=0.3, concurrency=16)
    picked = []
    for step in (10, 20, 30):
        judged = await judge.judge_items(USER, make_items(100, run_id, step=step), cfg)
        assert {item.step for item, _ in judged} == {step}
        picked.append(sorted(item.sample_index for item, _ in judged))
    assert picked[0] == picked[1] == picked[2]
    assert 15 <= len(picked[0]) <= 45
    assert len(fake.requests) == 3 * len(picked[0])
    expected = [i for i in range(100)
                if is_sampled(Item(run_id, 0, i, 0, "", None, ""), 0.3)]
    assert picked[0] == expected


def test_ad_hoc_items_are_always_sampled():
    assert all(is_sampled(item, 0.01) for item in make_items(50, run_id=None))


# --- configuration ------------------------------------------------------------------------------

async def test_provider_without_key_is_not_called(fake, judge_for):
    judge = judge_for(openai_api_key=None)
    verdicts = await judge.judge(USER, make_items(1), config(criteria=["accuracy"]))
    assert fake.requests == []
    assert verdicts[0].unscored_reason == (
        "llm judging is off: no API key configured for provider openai "
        "(EPOCHLENS_JUDGE_OPENAI_API_KEY)")


async def test_paid_model_without_price_is_not_called(fake, judge_for):
    cfg = LlmJudgeConfig(provider="anthropic", model="unpriced", criteria=["accuracy"])
    verdicts = await judge_for().judge(USER, make_items(1), cfg)
    assert fake.requests == []
    assert "no price configured for anthropic/unpriced" in verdicts[0].unscored_reason


def test_llm_enabled(fake):
    settings = make_settings(fake, anthropic_api_key=None)
    assert settings.llm_enabled("openai") and not settings.llm_enabled("anthropic")
    assert not settings.llm_enabled("openai_compatible")
    assert settings.llm_enabled("openai_compatible", "local")
    assert not settings.llm_enabled("openai_compatible", "http://localhost:8000/v1")


def test_prices_and_keys_come_from_prefixed_env(monkeypatch):
    class Prefixed(LlmSettings):
        model_config = SettingsConfigDict(env_prefix="EPOCHLENS_JUDGE_")

    monkeypatch.setenv("EPOCHLENS_JUDGE_LLM_PRICES",
                       '{"openai/gpt-x": {"input_per_mtok": 1.5, "output_per_mtok": 6}}')
    monkeypatch.setenv("EPOCHLENS_JUDGE_OPENAI_API_KEY", "sk-env")
    settings = Prefixed()
    assert settings.price_for("openai", "gpt-x") == ModelPrice(input_per_mtok=1.5,
                                                               output_per_mtok=6)
    assert settings.price_for("openai", "gpt-4o") is None
    assert settings.openai_api_key.get_secret_value() == "sk-env"
    assert "sk-env" not in repr(settings)


def test_every_setting_has_a_description():
    assert [n for n, f in LlmSettings.model_fields.items() if not f.description] == []


def test_estimate(fake):
    settings = make_settings(fake, llm_cost_warning_usd=0.5)
    cfg = config(sample_rate=0.5, budget_usd=1.0)
    est = cost.estimate(settings, cfg, 1000, 0)
    assert (est["judged_predictions"], est["llm_calls"]) == (500, 2500)
    assert est["output_tokens"] == 2500 * settings.llm_average_output_tokens
    assert 2500 * 300 < est["input_tokens"] < 2500 * 600
    assert est["cost_usd"] == pytest.approx(
        (est["input_tokens"] * 2.0 + est["output_tokens"] * 10.0) / 1e6)
    assert (est["judge_model"], est["exceeds_budget"], est["above_warning"]) == (
        f"openai/{MODEL}", est["cost_usd"] > 1.0, True)
    bigger = cost.estimate(settings, cfg, 1000, 1000)
    assert bigger["input_tokens"] - est["input_tokens"] == 2500 * 700
    assert cost.estimate(settings, None, 1000, 0)["llm_calls"] == 0
    assert cost.estimate(settings, config(sample_rate=0.001), 10, 0)["judged_predictions"] == 1
    with pytest.raises(InvalidArgument):
        cost.estimate(settings, LlmJudgeConfig(provider="openai", model="unpriced"), 10, 0)
    compatible = LlmJudgeConfig(provider="openai_compatible", model="local", endpoint="local")
    assert cost.estimate(settings, compatible, 10, 0)["cost_usd"] == 0.0


async def test_concurrent_judge_calls_share_the_run_limit(fake, judge_for):
    fake.latency_s = 0.05
    run_id = uuid.uuid4()
    judge = judge_for()
    cfg = config(criteria=["accuracy"], concurrency=3)
    await asyncio.gather(*(judge.judge(USER, make_items(6, run_id, step=s), cfg)
                           for s in (10, 20, 30)))
    assert len(fake.requests) == 18
    assert max(r.in_flight for r in fake.requests) == 3
    assert math.isclose(judge.counters["calls"], 18)
