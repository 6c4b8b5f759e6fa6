"""JudgeService over real gRPC (server on port 0, its workers running) on PostgreSQL and SQLite:
the hand-off is durable and judged once, validation names the field, ad hoc judging stores
nothing, criteria paging, cost estimates, human judgments scoped to their user, and the LLM
judge (the local fake server) inside the queue, retried after a failure."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from epochlens.v1 import judge_pb2, judge_pb2_grpc
from services.common.auth import mint_token
from services.common.convert import dict_to_struct
from services.judge.server import start
from services.judge.store import TaskState
from tests.helpers import field_violations, rich_status
from tests.judge.conftest import JudgeDb
from tests.judge.fake_llm import DEFAULT_SCORES, FakeLlmServer, server_error

ALICE, BOB = "alice", "bob"
RULE_CRITERIA = 5  # default config, items with a ground truth
LLM_CRITERIA = ("helpfulness", "accuracy", "clarity", "safety", "completeness")
MAX_ITEMS = 20


class Judge:
    """A running judge server, a stub, and the database under it."""

    def __init__(self, db: JudgeDb, stub: judge_pb2_grpc.JudgeServiceStub, auth) -> None:
        self.db, self.stub, self._auth = db, stub, auth

    def md(self, user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {mint_token(self._auth, user)}"),)

    def run(self, run_id: uuid.UUID) -> Any:
        return run_id if self.db.backend == "postgres" else run_id.hex


@pytest.fixture
async def judge(judge_db, auth_settings, fake_llm) -> AsyncIterator[Judge]:
    settings = judge_db.settings(worker_count=2, idle_poll_s=0.05, max_items=MAX_ITEMS,
                                 retry_backoff_base_s=0.2, llm_transient_retry_base_s=0.2,
                                 llm_endpoints={"local": {"base_url": fake_llm.openai_url}})
    running = await start(settings, auth_settings)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            yield Judge(judge_db, judge_pb2_grpc.JudgeServiceStub(channel), auth_settings)
    finally:
        await running.stop(0.5)


def items(run_id: uuid.UUID | str, count: int, **overrides: Any) -> list[judge_pb2.JudgeItem]:
    out = []
    for index in range(count):
        fields: dict[str, Any] = {
            "prediction": judge_pb2.PredictionRef(run_id=str(run_id), step=10,
                                                  sample_index=index),
            "epoch": 1, "prompt": f"Say {index}", "ground_truth": f"{index}",
            "prediction_text": f"{index}" if index % 2 == 0 else f"not {index}"}
        fields.update(overrides)
        out.append(judge_pb2.JudgeItem(**fields))
    return out


def enqueue_request(run_id: uuid.UUID | str, count: int, config: dict | None = None,
                    **overrides: Any) -> judge_pb2.EnqueueJudgingRequest:
    return judge_pb2.EnqueueJudgingRequest(run_id=str(run_id), config=dict_to_struct(config or {}),
                                           items=items(run_id, count, **overrides))


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def tasks_done(judge: Judge, run_id: uuid.UUID, count: int) -> None:
    async def done() -> bool:
        return await judge.db.scalar(
            "SELECT count(*) FROM judge.tasks WHERE run_id = :r AND state = :s",
            r=judge.run(run_id), s=int(TaskState.DONE)) == count
    await wait_until(done, f"{count} tasks done")


async def expect_invalid(call: Awaitable) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return field_violations(rich_status(caught.value))


async def test_enqueue_without_token_is_unauthenticated(judge):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await judge.stub.EnqueueJudging(enqueue_request(uuid.uuid4(), 1))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await judge.db.scalar("SELECT count(*) FROM judge.tasks") == 0


async def test_enqueue_is_durable_idempotent_and_judged_once(judge):
    run_id, count = await judge.db.create_run(ALICE), 6
    md = judge.md(ALICE)
    first = await judge.stub.EnqueueJudging(enqueue_request(run_id, count), metadata=md)
    again = await judge.stub.EnqueueJudging(enqueue_request(run_id, count), metadata=md)
    assert (first.enqueued_count, first.duplicate_count) == (count, 0)
    assert (again.enqueued_count, again.duplicate_count) == (0, count)
    await tasks_done(judge, run_id, count)
    rows = await judge.db.rows(
        "SELECT sample_index, criterion, user_id, passed FROM judge.judgments WHERE run_id = :r",
        r=judge.run(run_id))
    assert len(rows) == count * RULE_CRITERIA
    assert len({(r.sample_index, r.criterion) for r in rows}) == count * RULE_CRITERIA
    assert {r.user_id for r in rows} == {ALICE}
    exact = sorted((r.sample_index, bool(r.passed)) for r in rows if r.criterion == "exact_match")
    assert exact == [(i, i % 2 == 0) for i in range(count)]
    # A replay after judging is still a duplicate, and nothing is judged twice.
    replay = await judge.stub.EnqueueJudging(enqueue_request(run_id, count),
                                             metadata=judge.md(ALICE))
    assert replay.duplicate_count == count
    await asyncio.sleep(0.2)
    assert await judge.db.scalar("SELECT count(*) FROM judge.judgments WHERE run_id = :r",
                                 r=judge.run(run_id)) == count * RULE_CRITERIA


@pytest.mark.parametrize(("config", "field"), [
    ({"llm": {"provider": "openai", "model": "gpt-4o-mini", "concurrency": 1000}},
     "config.llm.concurrency"),
    ({"llm": {"provider": "openai", "model": "gpt-4o-mini", "budget_usd": 1e6}},
     "config.llm.budget_usd"),
    ({"llm": {"provider": "openai", "model": "gpt-4o-mini", "sample_rate": 0}},
     "config.llm.sample_rate"),
    ({"llm": {"provider": "openai_compatible", "model": "m"}}, "config.llm.endpoint"),
    ({"llm": {"provider": "openai", "model": "m", "criteria": ["wit"]}},
     "config.llm.criteria[0]"),
    ({"llm": {"provider": "nope", "model": "m"}}, "config.llm.provider"),
    ({"rules": {"criteria": ["exact_match", "bleu"]}}, "config.rules.criteria"),
    ({"rules": {"pattern": "([a-z"}}, "config.rules.pattern"),
    ({"rules": {"thresholds": {"chrf": 2}}}, "config.rules.thresholds.chrf"),
    ({"rules": {"min_chars": 10, "max_chars": 5}}, "config.rules.min_chars"),
    ({"rules": {"bogus": True}}, "config.rules.bogus"),
])
async def test_bad_config_is_invalid_argument_naming_the_field(judge, config, field):
    violations = await expect_invalid(judge.stub.EnqueueJudging(
        enqueue_request(uuid.uuid4(), 1, config), metadata=judge.md(ALICE)))
    assert field in violations, violations
    violations = await expect_invalid(judge.stub.JudgePredictions(
        judge_pb2.JudgePredictionsRequest(items=items(uuid.uuid4(), 1),
                                          config=dict_to_struct(config)),
        metadata=judge.md(ALICE)))
    assert field in violations, violations
    assert await judge.db.scalar("SELECT count(*) FROM judge.tasks") == 0


async def test_enqueue_validates_run_and_items(judge):
    run_id = uuid.uuid4()
    request = enqueue_request(run_id, 3)
    request.items[1].prediction.run_id = str(uuid.uuid4())
    request.items[2].prompt = ""
    request.items[0].ClearField("prediction")
    violations = await expect_invalid(judge.stub.EnqueueJudging(request, metadata=judge.md(ALICE)))
    assert set(violations) == {"items[0].prediction", "items[1].prediction.run_id",
                               "items[2].prompt"}
    violations = await expect_invalid(judge.stub.EnqueueJudging(
        enqueue_request("not-a-uuid", 1), metadata=judge.md(ALICE)))
    assert "run_id" in violations
    violations = await expect_invalid(judge.stub.EnqueueJudging(
        enqueue_request(run_id, MAX_ITEMS + 1), metadata=judge.md(ALICE)))
    assert "exceed the maximum of 20" in violations["items"]
    violations = await expect_invalid(judge.stub.EnqueueJudging(
        judge_pb2.EnqueueJudgingRequest(run_id=str(run_id)), metadata=judge.md(ALICE)))
    assert "items" in violations
    assert await judge.db.scalar("SELECT count(*) FROM judge.tasks") == 0


async def test_judge_predictions_answers_now_and_stores_nothing(judge):
    adhoc = [judge_pb2.JudgeItem(prompt="Capital of France?", ground_truth="Paris",
                                 prediction_text=" paris "),
             judge_pb2.JudgeItem(prompt="Capital of Italy?", prediction_text="Rome")]
    # An LLM judge is asked for, but no OpenAI key is configured here: rules only.
    config = {"llm": {"provider": "openai", "model": "gpt-4o-mini"},
              "rules": {"required_keywords": ["paris"]}}
    reply = await judge.stub.JudgePredictions(judge_pb2.JudgePredictionsRequest(
        items=adhoc, config=dict_to_struct(config)), metadata=judge.md(ALICE))
    got = [(j.criterion, j.judge_type, j.passed) for j in reply.judgments]
    assert got[:6] == [("exact_match", judge_pb2.JUDGE_TYPE_RULE, True),
                       ("chrf", judge_pb2.JUDGE_TYPE_RULE, True),
                       ("edit_similarity", judge_pb2.JUDGE_TYPE_RULE, False),
                       ("length", judge_pb2.JUDGE_TYPE_RULE, True),
                       ("structure", judge_pb2.JUDGE_TYPE_RULE, True),
                       ("keywords", judge_pb2.JUDGE_TYPE_RULE, True)]
    assert got[6:] == [("length", judge_pb2.JUDGE_TYPE_RULE, True),
                       ("structure", judge_pb2.JUDGE_TYPE_RULE, True),
                       ("keywords", judge_pb2.JUDGE_TYPE_RULE, False)]
    assert all(j.judge_model == "rules" and not j.HasField("prediction") for j in reply.judgments)
    assert await judge.db.scalar("SELECT count(*) FROM judge.judgments") == 0
    assert await judge.db.scalar("SELECT count(*) FROM judge.tasks") == 0


async def test_list_criteria_pages_through_rule_and_llm_criteria(judge):
    seen: list[judge_pb2.Criterion] = []
    token, pages = "", 0
    while True:
        page = await judge.stub.ListCriteria(judge_pb2.ListCriteriaRequest(
            page_size=4, page_token=token), metadata=judge.md(ALICE))
        seen += page.criteria
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 4 and len(seen) == 14
    rules = [c for c in seen if c.judge_type == judge_pb2.JUDGE_TYPE_RULE]
    llm = {c.name: c for c in seen if c.judge_type == judge_pb2.JUDGE_TYPE_LLM}
    assert [c.name for c in rules][:3] == ["exact_match", "chrf", "edit_similarity"]
    assert all(c.needs_ground_truth for c in rules[:3]) and len(rules) == 9
    assert set(llm) == set(LLM_CRITERIA)
    assert (llm["safety"].default_threshold, llm["clarity"].default_threshold) == (8.0, 7.0)
    assert (llm["safety"].min_score, llm["safety"].max_score) == (1.0, 10.0)
    whole = await judge.stub.ListCriteria(judge_pb2.ListCriteriaRequest(),
                                          metadata=judge.md(ALICE))
    assert len(whole.criteria) == 14 and whole.next_page_token == ""
    assert "page_token" in await expect_invalid(judge.stub.ListCriteria(
        judge_pb2.ListCriteriaRequest(page_token="bogus"), metadata=judge.md(ALICE)))
    assert "page_size" in await expect_invalid(judge.stub.ListCriteria(
        judge_pb2.ListCriteriaRequest(page_size=-1), metadata=judge.md(ALICE)))


async def test_estimate_cost(judge):
    none = await judge.stub.EstimateCost(judge_pb2.EstimateCostRequest(prediction_count=100),
                                         metadata=judge.md(ALICE))
    assert (none.llm_calls, none.cost_usd, none.judge_model) == (0, 0.0, "")
    config = {"llm": {"provider": "openai", "model": "gpt-4o-mini", "sample_rate": 0.5}}
    reply = await judge.stub.EstimateCost(judge_pb2.EstimateCostRequest(
        prediction_count=1000, config=dict_to_struct(config), average_item_tokens=200),
        metadata=judge.md(ALICE))
    assert (reply.judged_predictions, reply.llm_calls) == (500, 2500)
    assert reply.judge_model == "openai/gpt-4o-mini"
    assert reply.input_tokens > 2500 * 200 and reply.cost_usd > 0
    assert "prediction_count" in await expect_invalid(judge.stub.EstimateCost(
        judge_pb2.EstimateCostRequest(prediction_count=-1), metadata=judge.md(ALICE)))


async def test_human_judgment_is_scoped_to_its_user(judge):
    run_id = await judge.db.create_run(ALICE)
    await judge.stub.EnqueueJudging(enqueue_request(run_id, 2), metadata=judge.md(ALICE))
    ref = judge_pb2.PredictionRef(run_id=str(run_id), step=10, sample_index=1)
    request = judge_pb2.RecordHumanJudgmentRequest(prediction=ref, criterion="tone", score=4,
                                                   threshold=3, reasoning="polite enough")
    stored = await judge.stub.RecordHumanJudgment(request, metadata=judge.md(ALICE))
    assert (stored.judge_type, stored.judge_model, stored.criterion) == (
        judge_pb2.JUDGE_TYPE_HUMAN, ALICE, "tone")
    assert (stored.score, stored.threshold, stored.passed, stored.epoch) == (4, 3, True, 1)
    assert stored.status == judge_pb2.JUDGMENT_STATUS_SCORED and stored.create_time.seconds > 0
    assert stored.revision == 1
    again = await judge.stub.RecordHumanJudgment(request, metadata=judge.md(ALICE))
    assert again == stored
    rows = await judge.db.rows("SELECT user_id, judge_model, score FROM judge.judgments WHERE "
                               "run_id = :r AND judge_type = :t", r=judge.run(run_id),
                               t=judge_pb2.JUDGE_TYPE_HUMAN)
    assert [tuple(r) for r in rows] == [(ALICE, ALICE, 4.0)]
    # A changed judgment is a new revision (tests/judge/test_visibility.py has the history).
    changed = judge_pb2.RecordHumanJudgmentRequest(prediction=ref, criterion="tone", score=1,
                                                   threshold=3)
    revised = await judge.stub.RecordHumanJudgment(changed, metadata=judge.md(ALICE))
    assert (revised.revision, revised.score, revised.passed) == (2, 1.0, False)


async def test_human_judgment_of_another_users_prediction_is_not_found(judge):
    run_id = await judge.db.create_run(ALICE)
    await judge.stub.EnqueueJudging(enqueue_request(run_id, 2), metadata=judge.md(ALICE))
    request = judge_pb2.RecordHumanJudgmentRequest(criterion="tone", score=4, threshold=3)
    for user, sample_index in ((BOB, 1), (ALICE, 7)):
        request.prediction.CopyFrom(judge_pb2.PredictionRef(run_id=str(run_id), step=10,
                                                            sample_index=sample_index))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await judge.stub.RecordHumanJudgment(request, metadata=judge.md(user))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    request.criterion = ""
    assert "criterion" in await expect_invalid(
        judge.stub.RecordHumanJudgment(request, metadata=judge.md(ALICE)))
    assert await judge.db.scalar("SELECT count(*) FROM judge.judgments WHERE judge_type = :t",
                                 t=judge_pb2.JUDGE_TYPE_HUMAN) == 0


@pytest.fixture
def fake_llm() -> AsyncIterator[FakeLlmServer]:
    server = FakeLlmServer().start()
    yield server
    server.stop()


async def test_llm_judge_in_the_queue_retries_a_failed_task(judge, fake_llm):
    """on_error=fail: the first call fails (500, no retries), the task goes back to the queue
    with its rule verdicts stored; the next attempt stores the five LLM verdicts."""
    fake_llm.script(server_error())
    run_id = await judge.db.create_run(ALICE)
    config = {"llm": {"provider": "openai_compatible", "endpoint": "local",
                      "model": "local-judge", "on_error": "fail", "max_retries": 0,
                      "concurrency": 1}}
    await judge.stub.EnqueueJudging(enqueue_request(run_id, 1, config), metadata=judge.md(ALICE))
    await tasks_done(judge, run_id, 1)
    task = (await judge.db.rows("SELECT attempts, last_error FROM judge.tasks WHERE run_id = :r",
                                r=judge.run(run_id)))[0]
    assert task.attempts == 2 and task.last_error is None
    rows = await judge.db.rows("SELECT criterion, judge_type, judge_model, score, passed "
                               "FROM judge.judgments WHERE run_id = :r", r=judge.run(run_id))
    llm = {r.criterion: r for r in rows if r.judge_type == judge_pb2.JUDGE_TYPE_LLM}
    assert len(rows) == RULE_CRITERIA + len(LLM_CRITERIA)
    assert {r.judge_model for r in llm.values()} == {"openai_compatible/local-judge"}
    assert {name: (r.score, bool(r.passed)) for name, r in llm.items()} == {
        name: (float(DEFAULT_SCORES[name]), DEFAULT_SCORES[name] >= (8 if name == "safety"
                                                                     else 7))
        for name in LLM_CRITERIA}
    assert [r.status for r in fake_llm.requests] == [500] + [200] * len(LLM_CRITERIA)
