"""What the command line says about a run's judging, against the real in-process services
(PostgreSQL and SQLite): `summary` shows the predictions the judge gave up on and the
hand-off that waits, `judge resume` undoes a pause and failures, `judge history` lists the
revisions of a human judgment, and the exact-match figure of `summary` is the judge's own.
"""

import json
import uuid
from datetime import UTC, datetime, timedelta

import grpc
from sqlalchemy import text

from epochlens.v1 import common_pb2, judge_pb2, judge_pb2_grpc, writer_pb2
from services.common.convert import dict_to_struct
from services.judge.models import run_llm_state_table, tasks_table
from services.judge.store import TaskState
from services.writer.models import judge_outbox_table
from tests.cli.test_views import cli, ok, one_error_line
from tests.helpers import create_run, grid
from tests.integration.test_query_judgments import (
    NO_JUDGING,
    admin_engine,
    insert_rows,
    llm_state_row,
    settled,
    task_row,
)

PAUSED = "authentication failed for openai (HTTP 401): Incorrect API key provided"


async def quiet_run(stack, writer_stub, user: str, epochs: int = 1, samples: int = 3) -> str:
    """A run with the rule judges off, its predictions handed off and their tasks done."""
    run = await create_run(writer_stub, stack.metadata(user), config=dict_to_struct(NO_JUDGING))
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=grid(epochs, samples)), metadata=stack.metadata(user))
    await settled(stack, run.id)
    return run.id


async def admin_sql(stack, sql: str, **params) -> list:
    engine = admin_engine(stack)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(sql), params)
            return list(result.all()) if result.returns_rows else []
    finally:
        await engine.dispose()


def run_key(stack, run_id: str):
    """The run id as the admin engine binds it (SQLite stores UUIDs as hex)."""
    return uuid.UUID(run_id) if stack.database else uuid.UUID(run_id).hex


async def test_summary_shows_failed_predictions_and_the_waiting_handoff(stack, writer_stub):
    user = f"troubled-{uuid.uuid4().hex[:6]}"
    run_id = await quiet_run(stack, writer_stub, user)
    failed = [task_row(run_id, user, 40, s, TaskState.FAILED) for s in range(3)]
    for row in failed:
        row.update(attempts=5, last_error=f"RuntimeError: boom {row['sample_index']}")
    await insert_rows(stack, tasks_table, failed)
    retry_at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    await insert_rows(stack, judge_outbox_table, [
        {"run_id": uuid.UUID(run_id), "step": 50, "sample_index": s, "user_id": user,
         "create_time": datetime.now(UTC), "attempts": 1, "next_attempt_time": retry_at,
         "last_error": "INVALID_ARGUMENT: config.llm.sample_rate: too high"} for s in range(2)])
    out = ok(await cli(stack, user, "summary", run_id))
    lines = [line.strip() for line in out.splitlines()]
    expected = ["3 predictions failed judging (the judge gave up after its attempts):",
                "epoch 4 step 40 sample 0, 5 attempts: RuntimeError: boom 0",
                "epoch 4 step 40 sample 1, 5 attempts: RuntimeError: boom 1",
                "epoch 4 step 40 sample 2, 5 attempts: RuntimeError: boom 2",
                f"judge them again: epochlens judge resume {run_id} --rejudge-failed",
                "2 predictions not handed to the judge yet",
                "the writer's last attempt failed: INVALID_ARGUMENT: config.llm.sample_rate: "
                "too high",
                f"next attempt at {retry_at:%Y-%m-%d %H:%M:%S} UTC"]
    assert lines[-len(expected):] == expected
    assert "waiting for the judge" not in out
    judges = json.loads(ok(await cli(stack, user, "summary", run_id, "--json")))["judges"]
    assert (judges["pending_predictions"], judges["failed_predictions"],
            judges["handoff_waiting"], judges["handoff_error"]) == (
        0, 3, 2, "INVALID_ARGUMENT: config.llm.sample_rate: too high")
    assert [(f["step"], f["sample_index"], f["attempts"], f["reason"])
            for f in judges["failures"]] == [(40, s, 5, f"RuntimeError: boom {s}")
                                             for s in range(3)]
    assert judges["handoff_retry_time"] == f"{retry_at:%Y-%m-%dT%H:%M:%S}Z"


async def test_judge_resume_clears_a_pause_and_queues_failed_predictions(stack, writer_stub):
    user = f"resumer-{uuid.uuid4().hex[:6]}"
    run_id = await quiet_run(stack, writer_stub, user)
    await insert_rows(stack, run_llm_state_table, [llm_state_row(run_id, user, 5.0, False,
                                                                 PAUSED)])
    await admin_sql(stack, "UPDATE judge.tasks SET state = :s, attempts = 5, last_error = 'x' "
                    "WHERE run_id = :r", s=int(TaskState.FAILED), r=run_key(stack, run_id))
    env = {"EPOCHLENS_CLI_JUDGE_ADDRESS": stack.judge.address}
    other = await cli(stack, f"{user}-other", "judge", "resume", run_id, "--rejudge-failed",
                      **env)
    one_error_line(other, 1, f"judging of run {run_id} not found")
    out = ok(await cli(stack, user, "judge", "resume", run_id, "--rejudge-failed", **env))
    assert out.splitlines() == [f"LLM judging of run {run_id} resumed (it was paused: {PAUSED})",
                                "3 predictions queued for the judge again"]
    await settled(stack, run_id)
    rows = await admin_sql(stack, "SELECT state, attempts FROM judge.tasks WHERE run_id = :r",
                           r=run_key(stack, run_id))
    assert sorted(tuple(r) for r in rows) == [(int(TaskState.DONE), 1)] * 3
    again = ok(await cli(stack, user, "judge", "resume", run_id, "--rejudge-unscored", **env))
    assert again.splitlines() == [f"LLM judging of run {run_id} was not paused",
                                  "0 unscored LLM judgments deleted, to be judged again",
                                  "0 predictions queued for the judge again"]
    closed = await cli(stack, user, "judge", "resume", run_id,
                       EPOCHLENS_CLI_JUDGE_ADDRESS="127.0.0.1:1")
    one_error_line(closed, 1, "cannot reach the judge service at 127.0.0.1:1")


async def test_judge_history_lists_each_revision(stack, writer_stub):
    user = f"historian-{uuid.uuid4().hex[:6]}"
    run_id = await quiet_run(stack, writer_stub, user)
    ref = judge_pb2.PredictionRef(run_id=run_id, step=10, sample_index=2)
    async with grpc.aio.insecure_channel(stack.judge.address) as channel:
        stub = judge_pb2_grpc.JudgeServiceStub(channel)
        for score, reasoning in ((3, "wrong tone"), (7, "fine after all")):
            await stub.RecordHumanJudgment(judge_pb2.RecordHumanJudgmentRequest(
                prediction=ref, criterion="tone", score=score, threshold=5,
                reasoning=reasoning), metadata=stack.metadata(user))
    args = ("judge", "history", run_id, "--step", "10", "--sample", "2", "--criterion", "tone")
    table = ok(await cli(stack, user, *args))
    cells = [line.split() for line in table.splitlines() if line.strip()[:1] in ("1", "2")]
    assert [(c[0], c[1], c[4], c[5], c[6], " ".join(c[7:])) for c in cells] == [
        ("1", user, "3", "5", "fail", "wrong tone"), ("2", user, "7", "5", "pass",
                                                      "fine after all")]
    listed = json.loads(ok(await cli(stack, user, *args, "--json")))
    assert [(r["revision"], r["author"], r["score"], r["passed"]) for r in listed] == [
        (1, user, 3.0, False), (2, user, 7.0, True)]
    none = ok(await cli(stack, user, *args[:-1], "clarity"))
    assert none.strip() == f"no human judgment of run {run_id} step 10 sample 2 on 'clarity'"
    one_error_line(await cli(stack, f"{user}-other", *args), 1, f"run {run_id} not found")


TRUTH = "Paris is the capital"
# Case and inner/outer whitespace variants match; punctuation and other words do not.
VARIANTS = {"paris is the capital": True, "Paris  is\tthe\ncapital ": True,
            "  PARIS IS THE CAPITAL\n": True, "Paris is the capital.": False,
            "Paris is a capital": False}


async def test_summary_exact_match_is_the_judges_exact_match(stack, writer_stub):
    """One definition: the exact-match rate of `summary` equals the pass rate of the judge's
    exact_match criterion on case and whitespace variants, and compare marks the same."""
    user = f"exact-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    run = await create_run(writer_stub, md, config=dict_to_struct(
        {"judge": {"rules": {"criteria": ["exact_match"]}}}))
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=[common_pb2.PredictionInput(
            epoch=1, step=10, sample_index=i, prompt=f"capital? {i}", ground_truth=TRUTH,
            prediction=text_, generation_time_ms=1.0) for i, text_ in enumerate(VARIANTS)]),
        metadata=md)
    await settled(stack, run.id)
    data = json.loads(ok(await cli(stack, user, "summary", run.id, "--json")))
    (epoch,) = data["epochs"]
    (criterion,) = data["judges"]["criteria"]
    (judged,) = criterion["epochs"]
    assert (epoch["exact_match_count"], epoch["with_ground_truth"]) == (3, 5)
    assert (criterion["criterion"], judged["scored_count"]) == ("exact_match", 5)
    assert judged["pass_rate"] == epoch["exact_match_rate"] == 0.6
    compared = []
    for sample in range(len(VARIANTS)):
        reply = json.loads(ok(await cli(stack, user, "compare", run.id, str(sample), "--json")))
        (prediction,) = reply["predictions"]
        (verdict,) = prediction["judgments"]
        compared.append((prediction["exact_match"], verdict["passed"]))
    assert compared == [(match, match) for match in VARIANTS.values()]
