"""What happens to judging is visible, and what went wrong can be undone, over real gRPC
servers (PostgreSQL, and SQLite where the shared stack or the judge database runs on both):

* EstimateCost and RecordHumanJudgment bound every numeric input (INVALID_ARGUMENT naming
  the field, never INTERNAL);
* CreateRun refuses a judge section the judge refuses, with the judge's own rules (fields
  under config.judge), and is UNAVAILABLE while the judge is down; what still fails later
  (failed tasks, a hand-off the judge refuses) is in GetRunSummary;
* a transient provider error is retried minutes later (the task goes back to the queue)
  instead of becoming a permanent unscored judgment; on_error applies on the last attempt;
* ResumeJudging clears a paused run and judges its unscored and failed predictions again,
  for the run's owner only;
* a human judgment can be revised: the latest counts, every revision is kept and listed.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from sqlalchemy import text

from epochlens.v1 import (
    judge_pb2,
    judge_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    writer_pb2,
    writer_pb2_grpc,
)
from services.common.auth import mint_token
from services.common.convert import dict_to_struct
from services.judge.config import JudgeSettings
from services.judge.models import tasks_table
from services.judge.queue import backoff_s
from services.judge.server import start
from services.judge.store import TaskState
from services.query.config import QuerySettings
from services.query.server import start as start_query
from services.writer.models import judge_outbox_table
from services.writer.server import start as start_writer
from tests.conftest import (
    JUDGE_ROLE,
    PAGE_SECRET,
    PG_HOST,
    PG_PORT,
    READER_ROLE,
    migrated_database,
    pg_url,
)
from tests.helpers import create_run, field_violations, grid, rich_status
from tests.integration.test_handoff import free_port, judge_up, wait_until, writer_settings
from tests.integration.test_query_judgments import NO_JUDGING, insert_rows, settled, task_row
from tests.judge.fake_llm import FakeLlmServer, server_error, unauthorized
from tests.judge.test_service import ALICE, BOB, LLM_CRITERIA, Judge, enqueue_request

INT64_MAX = 2**63 - 1
RULES = 5  # rule criteria of the default config for an item with a ground truth


@pytest.fixture
async def judge(judge_db, auth_settings, fake_llm) -> AsyncIterator[Judge]:
    """A judge whose transient LLM retries come back after 0.1-0.2 s (minutes by default),
    with two attempts per task and two revisions per human judgment; endpoint "local" is the
    fake LLM server."""
    settings = judge_db.settings(worker_count=2, idle_poll_s=0.05, retry_backoff_base_s=0.2,
                                 llm_transient_retry_base_s=0.2, max_attempts=2,
                                 max_human_revisions=2,
                                 llm_endpoints={"local": {"base_url": fake_llm.openai_url}})
    running = await start(settings, auth_settings)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            yield Judge(judge_db, judge_pb2_grpc.JudgeServiceStub(channel), auth_settings)
    finally:
        await running.stop(0.5)


@pytest.fixture
def fake_llm() -> AsyncIterator[FakeLlmServer]:
    server = FakeLlmServer().start()
    yield server
    server.stop()


def llm_config(**fields: Any) -> dict:
    """The fake LLM server (endpoint "local"), no in-call retry, one call at a time."""
    return {"llm": {"provider": "openai_compatible", "endpoint": "local",
                    "model": "local-judge", "max_retries": 0, "concurrency": 1, **fields}}


async def expect_code(call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def violations_of(call) -> dict[str, str]:
    return field_violations(rich_status(await expect_code(call, grpc.StatusCode.INVALID_ARGUMENT)))


async def llm_rows(judge: Judge, run_id: uuid.UUID) -> list[Any]:
    return await judge.db.rows(
        "SELECT criterion, status, unscored_reason FROM judge.judgments WHERE run_id = :r "
        "AND judge_type = :t ORDER BY criterion", r=judge.run(run_id), t=judge_pb2.JUDGE_TYPE_LLM)


async def task_state(judge: Judge, run_id: uuid.UUID) -> tuple[int, int]:
    row = (await judge.db.rows("SELECT state, attempts FROM judge.tasks WHERE run_id = :r",
                               r=judge.run(run_id)))[0]
    return row.state, row.attempts


async def wait_for(judge: Judge, run_id: uuid.UUID, state: tuple[int, int], scored: int) -> None:
    """Until the run's one task is in `state` (state, attempts) with `scored` LLM scored."""
    async def reached() -> bool:
        rows = await llm_rows(judge, run_id)
        done = sum(r.status == judge_pb2.JUDGMENT_STATUS_SCORED for r in rows)
        return await task_state(judge, run_id) == state and done == scored
    await wait_until(reached, f"task {state} with {scored} scored LLM judgments", 30.0)


# ---- item 4: numeric inputs are bounded ----

async def test_estimate_cost_bounds_its_counts(judge):
    limits = JudgeSettings(_env_file=None)
    config = dict_to_struct({"llm": {"provider": "openai", "model": "gpt-4o-mini"}})
    limit = {"prediction_count": limits.estimate_max_predictions,
             "average_item_tokens": limits.estimate_max_item_tokens}
    for name, value in [(n, v) for n in limit for v in (INT64_MAX, limit[n] + 1, -1)]:
        request = judge_pb2.EstimateCostRequest(**{"config": config, "prediction_count": 1,
                                                   name: value})
        found = await violations_of(judge.stub.EstimateCost(request, metadata=judge.md(ALICE)))
        assert list(found) == [name], found
        if value != INT64_MAX:  # (that one may be refused by the generic integer check)
            assert found[name] == f"must be within 0..{limit[name]}, got {value}"
    biggest = await judge.stub.EstimateCost(judge_pb2.EstimateCostRequest(
        config=config, prediction_count=limits.estimate_max_predictions,
        average_item_tokens=limits.estimate_max_item_tokens), metadata=judge.md(ALICE))
    assert (biggest.judged_predictions, biggest.llm_calls) == (
        limits.estimate_max_predictions, limits.estimate_max_predictions * len(LLM_CRITERIA))
    assert biggest.exceeds_budget and biggest.input_tokens > 0


async def test_human_score_and_threshold_are_finite_and_in_range(judge):
    run_id = await judge.db.create_run(ALICE)
    await judge.stub.EnqueueJudging(enqueue_request(run_id, 1), metadata=judge.md(ALICE))
    ref = judge_pb2.PredictionRef(run_id=str(run_id), step=10, sample_index=0)
    cases = [({"score": 11.0, "threshold": 5.0}, {"score": "must be within 0..10, got 11"}),
             ({"score": 5.0, "threshold": -1.0}, {"threshold": "must be within 0..10, got -1"}),
             ({"score": 1e308, "threshold": 1e-3 - 1}, None)]
    for values, expected in cases:
        request = judge_pb2.RecordHumanJudgmentRequest(prediction=ref, criterion="tone", **values)
        found = await violations_of(judge.stub.RecordHumanJudgment(request,
                                                                   metadata=judge.md(ALICE)))
        assert found == (expected or {"score": "must be within 0..10, got 1e+308",
                                      "threshold": "must be within 0..10, got -0.999"})
    assert await judge.db.scalar("SELECT count(*) FROM judge.judgments WHERE judge_type = :t",
                                 t=judge_pb2.JUDGE_TYPE_HUMAN) == 0


# ---- item 15: transient errors are retried over minutes; resume ----

def test_default_transient_retry_schedule_spans_minutes():
    """With the defaults, a task whose provider keeps failing transiently is tried
    max_attempts times over at least 7.5 minutes (each delay is at least half its step)
    before on_error applies, not over seconds."""
    s = JudgeSettings(_env_file=None)
    steps = [min(s.retry_backoff_max_s, s.llm_transient_retry_base_s * 2 ** (a - 1))
             for a in range(1, s.max_attempts)]
    assert (s.max_attempts, steps) == (5, [60.0, 120.0, 240.0, 480.0])
    delays = [backoff_s(a, s.llm_transient_retry_base_s, s.retry_backoff_max_s)
              for a in range(1, s.max_attempts)]
    assert all(step / 2 <= delay <= step for step, delay in zip(steps, delays, strict=True))
    assert sum(steps) / 2 >= 450.0


async def test_a_transient_provider_error_is_retried_later_not_left_unscored(judge, fake_llm):
    """on_error skip (the default), no in-call retry: a 500 sends the task back to the queue
    (its rule verdicts stored); the next attempt scores all five LLM criteria, the four that
    answered the first time from the cache."""
    fake_llm.script(server_error())
    run_id = await judge.db.create_run(ALICE)
    await judge.stub.EnqueueJudging(enqueue_request(run_id, 1, llm_config()),
                                    metadata=judge.md(ALICE))
    await wait_for(judge, run_id, (TaskState.DONE, 2), len(LLM_CRITERIA))
    assert [r.status for r in await llm_rows(judge, run_id)] == [
        judge_pb2.JUDGMENT_STATUS_SCORED] * len(LLM_CRITERIA)
    assert [r.status for r in fake_llm.requests] == [500] + [200] * len(LLM_CRITERIA)
    assert await judge.db.scalar("SELECT count(*) FROM judge.judgments WHERE run_id = :r",
                                 r=judge.run(run_id)) == RULES + len(LLM_CRITERIA)


async def test_on_error_applies_on_the_last_attempt(judge, fake_llm):
    """Still failing on the last attempt (max_attempts 2): on_error skip leaves the five
    unscored, with the provider's error as the reason."""
    fake_llm.script(*[server_error()] * (2 * len(LLM_CRITERIA)))
    run_id = await judge.db.create_run(ALICE)
    await judge.stub.EnqueueJudging(enqueue_request(run_id, 1, llm_config()),
                                    metadata=judge.md(ALICE))
    await wait_for(judge, run_id, (TaskState.DONE, 2), 0)
    rows = await llm_rows(judge, run_id)
    assert len(rows) == len(LLM_CRITERIA)
    assert all(r.status == judge_pb2.JUDGMENT_STATUS_UNSCORED
               and r.unscored_reason.startswith("gave up: server error") for r in rows)
    assert [r.status for r in fake_llm.requests] == [500] * (2 * len(LLM_CRITERIA))


async def set_task_failed(judge: Judge, run_id: uuid.UUID, error: str) -> None:
    async with judge.db.admin.begin() as conn:
        await conn.execute(text("UPDATE judge.tasks SET state = :s, last_error = :e "
                                "WHERE run_id = :r"),
                           {"s": int(TaskState.FAILED), "e": error, "r": judge.run(run_id)})


async def test_resume_clears_a_pause_and_judges_again(judge, fake_llm):
    """A 401 pauses the run's LLM judging (five unscored verdicts); once the key is fixed the
    owner resumes it and has them judged again; a failed task is queued again too."""
    fake_llm.script(unauthorized())
    run_id = await judge.db.create_run(ALICE)
    await judge.stub.EnqueueJudging(enqueue_request(run_id, 1, llm_config()),
                                    metadata=judge.md(ALICE))
    await wait_for(judge, run_id, (TaskState.DONE, 1), 0)
    paused = await judge.db.scalar("SELECT paused_reason FROM judge.run_llm_state "
                                   "WHERE run_id = :r", r=judge.run(run_id))
    assert paused.startswith("authentication failed")
    assert {r.unscored_reason for r in await llm_rows(judge, run_id)} == {
        f"llm judging paused: {paused}"}
    request = judge_pb2.ResumeJudgingRequest(run_id=str(run_id), rejudge_unscored=True)
    for user, run in ((BOB, str(run_id)), (ALICE, str(uuid.uuid4()))):
        await expect_code(judge.stub.ResumeJudging(judge_pb2.ResumeJudgingRequest(
            run_id=run, rejudge_unscored=True), metadata=judge.md(user)),
            grpc.StatusCode.NOT_FOUND)
    reply = await judge.stub.ResumeJudging(request, metadata=judge.md(ALICE))
    assert (reply.cleared_paused_reason, reply.deleted_unscored, reply.requeued_predictions) == (
        paused, len(LLM_CRITERIA), 1)
    await wait_for(judge, run_id, (TaskState.DONE, 1), len(LLM_CRITERIA))
    assert await judge.db.scalar("SELECT paused_reason FROM judge.run_llm_state "
                                 "WHERE run_id = :r", r=judge.run(run_id)) is None
    await set_task_failed(judge, run_id, "RuntimeError: boom")
    again = await judge.stub.ResumeJudging(judge_pb2.ResumeJudgingRequest(
        run_id=str(run_id), rejudge_failed=True), metadata=judge.md(ALICE))
    assert (again.cleared_paused_reason, again.deleted_unscored, again.requeued_predictions) == (
        "", 0, 1)
    await wait_for(judge, run_id, (TaskState.DONE, 1), len(LLM_CRITERIA))


# ---- item 12: CreateRun checks the judge section; later failures are in the summary ----

@pytest.mark.parametrize(("section", "field"), [
    ({"llm": {"provider": "openai", "model": "gpt-4o-mini", "sample_rate": 2.0}},
     "config.judge.llm.sample_rate"),
    ({"llm": {"provider": "openai", "model": "gpt-4o-mini", "budget_usd": 1e6}},
     "config.judge.llm.budget_usd"),
    ({"llm": {"provider": "nope", "model": "m"}}, "config.judge.llm.provider"),
    ({"rules": {"criteria": ["no_such_rule"]}}, "config.judge.rules.criteria"),
    ({"rules": {"pattern": r"(a)\1"}}, "config.judge.rules.pattern"),
    ({"llm": {"provider": "openai_compatible", "model": "m",
              "base_url": "http://169.254.169.254/"}}, "config.judge.llm.base_url"),
    ("rules only", "config.judge"),
])
async def test_create_run_refuses_a_judge_section_the_judge_refuses(stack, writer_stub,
                                                                   query_stub, section, field):
    user = f"refused-{uuid.uuid4().hex[:6]}"
    found = await violations_of(create_run(writer_stub, stack.metadata(user),
                                           config=dict_to_struct({"judge": section})))
    assert list(found) == [field], found
    runs = await query_stub.ListRuns(query_pb2.ListRunsRequest(), metadata=stack.metadata(user))
    assert list(runs.runs) == []
    fine = await create_run(writer_stub, stack.metadata(user), config=dict_to_struct(NO_JUDGING))
    assert fine.config["judge"]["rules"]["enabled"] is False


@pytest.fixture(scope="module")
async def own_db() -> AsyncIterator[str]:
    """A PostgreSQL database of this module's own: its writers and judges come and go
    without the shared stack's dispatcher handing rows around."""
    async with migrated_database("visibility") as name:
        yield name


async def test_create_run_is_unavailable_while_the_judge_is_down(own_db, auth_settings):
    """The judge cannot be asked: CreateRun with a judge section is UNAVAILABLE (clients
    retry it); without one it needs no judge."""
    writer = await start_writer(writer_settings(own_db, free_port(), judge_check_timeout_s=2.0),
                                auth_settings)
    md = (("authorization", f"Bearer {mint_token(auth_settings, 'down-user')}"),)
    try:
        async with grpc.aio.insecure_channel(writer.address) as channel:
            stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
            error = await expect_code(create_run(stub, md, config=dict_to_struct(NO_JUDGING)),
                                      grpc.StatusCode.UNAVAILABLE)
            plain = await create_run(stub, md)
    finally:
        await writer.stop(0.5)
    assert "judge service cannot check the run's judge config" in error.details()
    assert plain.id and plain.user_id == "down-user"


async def test_a_handoff_the_judge_refuses_is_in_the_summary(own_db, auth_settings):
    """A run created before the judge's rules changed (here: through a writer that does not
    judge) has a judge section the judge refuses: its predictions are parked, and
    GetRunSummary says how many and why, instead of pending=0 and nothing else."""
    judge_port = free_port()
    judge = await judge_up(own_db, judge_port, auth_settings)
    writer = await start_writer(writer_settings(own_db, judge_port), auth_settings)
    plain = await start_writer(writer_settings(own_db, None), auth_settings)
    query = await start_query(QuerySettings(
        port=0, database_url=pg_url(READER_ROLE, own_db), page_token_secret=PAGE_SECRET,
        shutdown_grace_s=0.5, _env_file=None), auth_settings)
    md = (("authorization", f"Bearer {mint_token(auth_settings, 'parked-user')}"),)
    try:
        run_id = await _run_through(plain, md, {"judge": {"rules": {"criteria": ["bleu"]}}})
        async with grpc.aio.insecure_channel(writer.address) as channel:
            await writer_pb2_grpc.PredictionWriterServiceStub(channel).WritePredictions(
                writer_pb2.WritePredictionsRequest(run_id=run_id, predictions=grid(2, 6)),
                metadata=md)
        async with grpc.aio.insecure_channel(query.address) as channel:
            summary = await _parked_summary(query_pb2_grpc.QueryServiceStub(channel), run_id, md)
    finally:
        for server in (writer, plain, query, judge):
            await server.stop(0.5)
    assert (summary.handoff_waiting, summary.pending_predictions, summary.failed_predictions,
            list(summary.rows)) == (12, 0, 0, [])
    assert summary.handoff_error.startswith("INVALID_ARGUMENT: ")
    assert "config.rules.criteria: unknown rule criterion 'bleu'" in summary.handoff_error
    assert summary.handoff_retry_time.ToDatetime(tzinfo=UTC) > datetime.now(UTC) + timedelta(
        minutes=50)


async def _run_through(writer, md, config: dict) -> str:
    async with grpc.aio.insecure_channel(writer.address) as channel:
        run = await create_run(writer_pb2_grpc.PredictionWriterServiceStub(channel), md,
                               config=dict_to_struct(config))
    return run.id


async def _parked_summary(stub, run_id: str, md) -> query_pb2.RunSummary:
    deadline = time.monotonic() + 30.0
    while True:
        summary = await stub.GetRunSummary(query_pb2.GetRunSummaryRequest(run_id=run_id),
                                           metadata=md)
        if summary.handoff_error or time.monotonic() > deadline:
            return summary
        await asyncio.sleep(0.1)


def outbox_row(run_id: str, user: str, sample: int, attempts: int, error: str | None,
               next_attempt: datetime) -> dict:
    return {"run_id": uuid.UUID(run_id), "step": 50, "sample_index": sample, "user_id": user,
            "create_time": datetime.now(UTC), "attempts": attempts,
            "next_attempt_time": next_attempt, "last_error": error}


async def test_summary_shows_failed_predictions_and_a_waiting_handoff(stack, writer_stub,
                                                                      query_stub):
    """Failed tasks are not pending: they are counted and listed with their reason; outbox
    rows the writer could not hand off are counted with the last error and the next try."""
    user = f"trouble-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    run = await create_run(writer_stub, md, config=dict_to_struct(NO_JUDGING))
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=grid(1, 2)), metadata=md)
    await settled(stack, run.id)
    states = [TaskState.QUEUED, TaskState.RUNNING] + [TaskState.FAILED] * 3
    tasks = [task_row(run.id, user, 40, s, state) for s, state in enumerate(states)]
    for row, attempts in zip(tasks[2:], (5, 5, 3), strict=True):
        row.update(attempts=attempts, last_error=f"RuntimeError: boom {row['sample_index']}")
    await insert_rows(stack, tasks_table, tasks)
    soon = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    await insert_rows(stack, judge_outbox_table, [
        outbox_row(run.id, user, 0, 1, "UNAVAILABLE: judge down (1)", soon + timedelta(hours=1)),
        outbox_row(run.id, user, 1, 2, "UNAVAILABLE: judge down (2)", soon),
        outbox_row(run.id, user, 2, 0, None, soon - timedelta(minutes=30))])
    summary = await query_stub.GetRunSummary(query_pb2.GetRunSummaryRequest(run_id=run.id),
                                             metadata=md)
    assert (summary.pending_predictions, summary.failed_predictions) == (2, 3)
    assert [(f.epoch, f.step, f.sample_index, f.attempts, f.reason) for f in summary.failures] == [
        (4, 40, s, a, f"RuntimeError: boom {s}") for s, a in ((2, 5), (3, 5), (4, 3))]
    assert all(f.update_time.seconds > 0 for f in summary.failures)
    assert (summary.handoff_waiting, summary.handoff_error) == (3, "UNAVAILABLE: judge down (2)")
    assert summary.handoff_retry_time.ToDatetime(tzinfo=UTC) == soon
    await expect_code(query_stub.GetRunSummary(query_pb2.GetRunSummaryRequest(run_id=run.id),
                                               metadata=stack.metadata(f"{user}-other")),
                      grpc.StatusCode.NOT_FOUND)


# ---- item 16: human judgments can be revised; the latest counts; history is kept ----

async def record(stub, md, ref: judge_pb2.PredictionRef, score: float, threshold: float,
                 reasoning: str) -> judge_pb2.Judgment:
    return await stub.RecordHumanJudgment(judge_pb2.RecordHumanJudgmentRequest(
        prediction=ref, criterion="tone", score=score, threshold=threshold,
        reasoning=reasoning), metadata=md)


async def test_a_human_judgment_can_be_revised_and_keeps_its_history(stack, writer_stub,
                                                                     query_stub):
    user = f"reviser-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    run = await create_run(writer_stub, md, config=dict_to_struct(NO_JUDGING))
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=grid(1, 2)), metadata=md)
    await settled(stack, run.id)
    ref = judge_pb2.PredictionRef(run_id=run.id, step=10, sample_index=1)
    async with grpc.aio.insecure_channel(stack.judge.address) as channel:
        judge = judge_pb2_grpc.JudgeServiceStub(channel)
        first = await record(judge, md, ref, 4, 5, "too terse")
        second = await record(judge, md, ref, 8, 5, "fine on a second reading")
        retried = await record(judge, md, ref, 8, 5, "fine on a second reading")
        await expect_code(record(judge, stack.metadata(f"{user}-other"), ref, 1, 5, "mine"),
                          grpc.StatusCode.NOT_FOUND)
    assert (first.revision, first.passed, second.revision, second.passed) == (1, False, 2, True)
    assert retried == second and second.judge_model == user
    listed = await query_stub.ListJudgments(query_pb2.ListJudgmentsRequest(
        run_id=run.id, judge_type=judge_pb2.JUDGE_TYPE_HUMAN), metadata=md)
    assert [(j.prediction.sample_index, j.criterion, j.judge_model, j.score, j.passed,
             j.reasoning, j.revision) for j in listed.judgments] == [
        (1, "tone", user, 8.0, True, "fine on a second reading", 2)]
    summary = await query_stub.GetRunSummary(query_pb2.GetRunSummaryRequest(run_id=run.id),
                                             metadata=md)
    assert [(r.criterion, r.judge_type, r.scored_count, r.mean_score, r.pass_rate)
            for r in summary.rows] == [("tone", judge_pb2.JUDGE_TYPE_HUMAN, 1, 8.0, 1.0)]
    history = await query_stub.ListJudgmentRevisions(query_pb2.ListJudgmentRevisionsRequest(
        run_id=run.id, step=10, sample_index=1, criterion="tone"), metadata=md)
    assert [(r.revision, r.author, r.score, r.threshold, r.passed, r.reasoning)
            for r in history.revisions] == [(1, user, 4.0, 5.0, False, "too terse"),
                                            (2, user, 8.0, 5.0, True, "fine on a second reading")]
    first_time, second_time = (r.create_time.ToDatetime() for r in history.revisions)
    assert first_time <= second_time and second.create_time.ToDatetime() == second_time
    await expect_code(query_stub.ListJudgmentRevisions(query_pb2.ListJudgmentRevisionsRequest(
        run_id=run.id, step=10, sample_index=1, criterion="tone"),
        metadata=stack.metadata(f"{user}-other")), grpc.StatusCode.NOT_FOUND)
    assert "criterion" in await violations_of(query_stub.ListJudgmentRevisions(
        query_pb2.ListJudgmentRevisionsRequest(run_id=run.id, step=10, sample_index=1),
        metadata=md))


async def test_revisions_are_bounded(judge):
    """max_human_revisions (2 here): a third different judgment is FAILED_PRECONDITION and
    changes nothing."""
    run_id = await judge.db.create_run(ALICE)
    await judge.stub.EnqueueJudging(enqueue_request(run_id, 1), metadata=judge.md(ALICE))
    ref = judge_pb2.PredictionRef(run_id=str(run_id), step=10, sample_index=0)
    for score in (3, 6):
        await record(judge.stub, judge.md(ALICE), ref, score, 5, f"take {score}")
    await expect_code(record(judge.stub, judge.md(ALICE), ref, 9, 5, "take 9"),
                      grpc.StatusCode.FAILED_PRECONDITION)
    rows = await judge.db.rows("SELECT revision, score FROM judge.judgment_revisions "
                               "WHERE run_id = :r ORDER BY revision", r=judge.run(run_id))
    assert [tuple(r) for r in rows] == [(1, 3.0), (2, 6.0)]
    assert await judge.db.scalar("SELECT score FROM judge.judgments WHERE run_id = :r AND "
                                 "judge_type = :t", r=judge.run(run_id),
                                 t=judge_pb2.JUDGE_TYPE_HUMAN) == 6.0


async def test_only_human_and_unscored_llm_judgments_can_be_deleted(judge):
    """PostgreSQL: the judge role acting for the owner deletes no scored rule judgment (a
    restrictive policy), while replacing a human judgment by its next revision works."""
    if judge.db.backend != "postgres":
        pytest.skip("row-level security is PostgreSQL's")
    run_id = await judge.db.create_run(ALICE)
    await judge.stub.EnqueueJudging(enqueue_request(run_id, 1), metadata=judge.md(ALICE))
    await wait_for(judge, run_id, (TaskState.DONE, 1), 0)
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=JUDGE_ROLE,
                                 database=judge.db.database)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('epochlens.user_id', $1, true)", ALICE)
            deleted = await conn.execute("DELETE FROM judge.judgments WHERE run_id = $1",
                                         run_id)
    finally:
        await conn.close()
    assert deleted == "DELETE 0"
    assert await judge.db.scalar("SELECT count(*) FROM judge.judgments WHERE run_id = :r",
                                 r=run_id) == RULES
