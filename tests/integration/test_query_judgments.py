"""The judge side of the QueryService over real gRPC, on PostgreSQL and SQLite:
ListJudgments (pages, filters, tokens), GetRunSummary (means over scored judgments
only, pass rates, counts, tokens, cost, budget, pending tasks), CompareSample with
judgments, and isolation (another user's run is NOT_FOUND; on PostgreSQL the
policies alone keep judgments apart).

Judgments are seeded by inserting rows into schema `judge` directly as the
database admin (no RLS), into runs whose config turns the rule judges off and
whose predictions the stack's judge has finished (settled()), so the seeded rows
are the only ones. One test lets the real judge service judge a run with its
default rules, end to end. The helpers at the top are shared with the CLI and
report tests.
"""

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from sqlalchemy import func, insert, select

from epochlens.v1 import judge_pb2, query_pb2, writer_pb2
from services.common.config import DatabaseSettings
from services.common.db import RLS_USER_SETTING, create_engine
from services.judge.models import SCHEMA as JUDGE_SCHEMA
from services.judge.models import judgments_table, run_llm_state_table, tasks_table
from services.judge.store import TaskState
from services.writer.models import SCHEMA as WRITER_SCHEMA
from services.writer.models import judge_outbox_table
from tests.conftest import PG_ADMIN, PG_HOST, PG_PORT, READER_ROLE, pg_url
from tests.helpers import create_run, field_violations, grid, rich_status

RULE, LLM, HUMAN = (judge_pb2.JUDGE_TYPE_RULE, judge_pb2.JUDGE_TYPE_LLM,
                    judge_pb2.JUDGE_TYPE_HUMAN)
SCORED, UNSCORED = judge_pb2.JUDGMENT_STATUS_SCORED, judge_pb2.JUDGMENT_STATUS_UNSCORED
LLM_MODEL = "openai/gpt-test"
EPOCHS, SAMPLES = 3, 4
# A run config under which the judge stores no judgment (its tasks still complete).
NO_JUDGING = {"judge": {"rules": {"enabled": False}}}
SETTLE_TIMEOUT_S = 30.0


def judgment_row(run_id: str, user: str, epoch: int, step: int, sample: int, criterion: str,
                 judge_type: int, score: float, threshold: float, **fields) -> dict:
    """One judge.judgments row; scored with passed = score >= threshold unless overridden."""
    row = {"run_id": uuid.UUID(run_id), "user_id": user, "epoch": epoch, "step": step,
           "sample_index": sample, "criterion": criterion, "judge_type": judge_type,
           "judge_model": "rules" if judge_type == RULE else LLM_MODEL, "score": score,
           "passed": score >= threshold, "threshold": threshold,
           "reasoning": f"{criterion} of {step}/{sample}", "confidence": 0.0, "status": SCORED,
           "unscored_reason": "", "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0,
           "prompt_version": "v1", "create_time": datetime.now(UTC)}
    row.update(fields)
    return row


def llm_row(run_id: str, user: str, epoch: int, step: int, sample: int, score: float,
            **fields) -> dict:
    """A helpfulness judgment billed 100 + 20 tokens and $0.01; score 0 means unscored."""
    usage = {"input_tokens": 100, "output_tokens": 20, "cost_usd": 0.01}
    if not score:
        usage.update(status=UNSCORED, passed=False, unscored_reason="reply could not be parsed")
    return judgment_row(run_id, user, epoch, step, sample, "helpfulness", LLM, score, 7.0,
                        **{**usage, **fields})


def seed_rows(run_id: str, user: str, epochs: int = EPOCHS, samples: int = SAMPLES
              ) -> list[dict]:
    """Per prediction of grid(epochs, samples) (step = 10 * epoch): chrf = 0.1 * (epoch +
    sample) (pass 0.4), and helpfulness = epoch + sample + 4 (pass 7) except the last
    sample's, which is unscored."""
    rows = []
    for epoch in range(1, epochs + 1):
        for sample in range(samples):
            step = epoch * 10
            rows.append(judgment_row(run_id, user, epoch, step, sample, "chrf", RULE,
                                     round(0.1 * (epoch + sample), 3), 0.4))
            rows.append(llm_row(run_id, user, epoch, step, sample,
                                0 if sample == samples - 1 else epoch + sample + 4))
    return rows


def admin_engine(stack):
    settings = (DatabaseSettings(database_url=pg_url(PG_ADMIN, stack.database), _env_file=None)
                if stack.database else DatabaseSettings(sqlite_dir=stack.sqlite_dir,
                                                        _env_file=None))
    return create_engine(settings, (WRITER_SCHEMA, JUDGE_SCHEMA))


async def insert_rows(stack, table, rows: list[dict]) -> None:
    """Rows into a judge table as the database admin (no RLS, no judge service)."""
    engine = admin_engine(stack)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(table), rows)
    finally:
        await engine.dispose()


async def _open_work(conn, run_id: uuid.UUID) -> tuple[int, int]:
    outbox = await conn.scalar(select(func.count()).select_from(judge_outbox_table).where(
        judge_outbox_table.c.run_id == run_id))
    tasks = await conn.scalar(select(func.count()).select_from(tasks_table).where(
        tasks_table.c.run_id == run_id, tasks_table.c.state != TaskState.DONE))
    return outbox, tasks


async def settled(stack, run_id: str) -> None:
    """Waits until the writer handed every prediction of the run to the judge (its outbox
    is empty) and the judge finished every task of it."""
    engine, deadline = admin_engine(stack), time.monotonic() + SETTLE_TIMEOUT_S
    try:
        while True:
            async with engine.connect() as conn:
                open_work = await _open_work(conn, uuid.UUID(run_id))
            if open_work == (0, 0):
                return
            assert time.monotonic() < deadline, f"run {run_id}: outbox, open tasks {open_work}"
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()


def task_row(run_id: str, user: str, step: int, sample: int, state: TaskState) -> dict:
    """A judge.tasks row the stack's judge workers leave alone while the test runs: not due
    for an hour (queued) or leased for an hour (running)."""
    now, later = datetime.now(UTC), datetime.now(UTC) + timedelta(hours=1)
    return {"run_id": uuid.UUID(run_id), "user_id": user, "step": step, "sample_index": sample,
            "epoch": step // 10, "prompt": "p", "ground_truth": None, "prediction": "x",
            "config": NO_JUDGING["judge"], "state": int(state), "attempts": 0,
            "lease_until": later if state == TaskState.RUNNING else None, "not_before": later,
            "last_error": None, "create_time": now, "update_time": now}


def llm_state_row(run_id: str, user: str, budget: float, exhausted: bool,
                  reason: str | None) -> dict:
    return {"run_id": uuid.UUID(run_id), "user_id": user, "budget_usd": budget,
            "spent_usd": budget if exhausted else 0.0, "input_tokens": 0, "output_tokens": 0,
            "budget_exhausted": exhausted, "paused_reason": reason,
            "update_time": datetime.now(UTC)}


async def judged_run(stack, writer_stub, user: str) -> str:
    """A run with grid(EPOCHS, SAMPLES) predictions and seed_rows() judgments only."""
    md = stack.metadata(user)
    run = await create_run(writer_stub, md, config=NO_JUDGING)
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=grid(EPOCHS, SAMPLES)), metadata=md)
    await settled(stack, run.id)
    await insert_rows(stack, judgments_table, seed_rows(run.id, user))
    return run.id


async def all_judgments(query_stub, md, **request) -> tuple[list[tuple], int]:
    keys, token, pages = [], "", 0
    while True:
        reply = await query_stub.ListJudgments(query_pb2.ListJudgmentsRequest(
            page_token=token, **request), metadata=md)
        keys += [(j.prediction.step, j.prediction.sample_index, j.criterion, j.judge_type)
                 for j in reply.judgments]
        pages += 1
        token = reply.next_page_token
        if not token:
            return keys, pages


def expected_keys(epochs=range(1, EPOCHS + 1), criteria=("chrf", "helpfulness")) -> list[tuple]:
    types = {"chrf": RULE, "helpfulness": LLM}
    return [(e * 10, s, c, types[c]) for e in epochs for s in range(SAMPLES) for c in criteria]


async def test_pages_cover_every_judgment_once_in_order(stack, writer_stub, query_stub):
    md = stack.metadata("judged")
    run_id = await judged_run(stack, writer_stub, "judged")
    keys, pages = await all_judgments(query_stub, md, run_id=run_id, page_size=5)
    assert keys == expected_keys()
    assert pages == 5  # 24 judgments at 5 per page


async def test_filters_by_epoch_criterion_and_judge_type(stack, writer_stub, query_stub):
    md = stack.metadata("judged")
    run_id = await judged_run(stack, writer_stub, "judged")
    by_epoch, _ = await all_judgments(query_stub, md, run_id=run_id, epoch=2, page_size=3)
    by_criterion, _ = await all_judgments(query_stub, md, run_id=run_id, criterion="chrf")
    by_type, _ = await all_judgments(query_stub, md, run_id=run_id, judge_type=LLM,
                                     page_size=4)
    both, _ = await all_judgments(query_stub, md, run_id=run_id, epoch=3, judge_type=RULE)
    none, pages = await all_judgments(query_stub, md, run_id=run_id, judge_type=HUMAN)
    assert by_epoch == expected_keys(epochs=[2])
    assert by_criterion == expected_keys(criteria=["chrf"])
    assert by_type == expected_keys(criteria=["helpfulness"])
    assert both == expected_keys(epochs=[3], criteria=["chrf"])
    assert (none, pages) == ([], 1)


async def test_judgment_fields_round_trip(stack, writer_stub, query_stub):
    md = stack.metadata("judged")
    run_id = await judged_run(stack, writer_stub, "judged")
    reply = await query_stub.ListJudgments(query_pb2.ListJudgmentsRequest(
        run_id=run_id, epoch=2, criterion="helpfulness"), metadata=md)
    scored, unscored = reply.judgments[0], reply.judgments[3]
    assert (scored.prediction.run_id, scored.prediction.step, scored.prediction.sample_index,
            scored.epoch) == (run_id, 20, 0, 2)
    assert (scored.score, scored.passed, scored.threshold, scored.status) == (6.0, False, 7.0,
                                                                              SCORED)
    assert (scored.judge_type, scored.judge_model, scored.reasoning) == (
        LLM, LLM_MODEL, "helpfulness of 20/0")
    assert (scored.input_tokens, scored.output_tokens, scored.cost_usd) == (100, 20, 0.01)
    assert scored.prompt_version == "v1" and scored.create_time.seconds > 0
    assert (unscored.status, unscored.score, unscored.passed, unscored.unscored_reason) == (
        UNSCORED, 0.0, False, "reply could not be parsed")


async def test_summary_means_exclude_unscored_and_pass_rates(stack, writer_stub, query_stub):
    md = stack.metadata("judged")
    run_id = await judged_run(stack, writer_stub, "judged")
    summary = await query_stub.GetRunSummary(query_pb2.GetRunSummaryRequest(run_id=run_id),
                                             metadata=md)
    got = [(r.epoch, r.criterion, r.judge_type, r.judge_model, round(r.mean_score, 6),
            round(r.pass_rate, 6), r.scored_count, r.unscored_count, r.input_tokens,
            r.output_tokens, round(r.cost_usd, 6)) for r in summary.rows]
    expected = []
    for e in range(1, EPOCHS + 1):
        chrf = [0.1 * (e + s) for s in range(SAMPLES)]
        helpful = [e + s + 4 for s in range(SAMPLES - 1)]  # sample 3 unscored: left out
        expected += [
            (e, "chrf", RULE, "rules", round(sum(chrf) / 4, 6),
             sum(round(c, 3) >= 0.4 for c in chrf) / 4, 4, 0, 0, 0, 0.0),
            (e, "helpfulness", LLM, LLM_MODEL, round(sum(helpful) / 3, 6),
             round(sum(h >= 7 for h in helpful) / 3, 6), 3, 1, 400, 80, 0.04)]
    assert got == expected
    assert round(summary.total_cost_usd, 6) == 0.12
    assert (summary.run_id, summary.budget_usd, summary.budget_exhausted,
            summary.llm_paused_reason, summary.pending_predictions) == (run_id, 0.0, False,
                                                                        "", 0)


async def test_summary_reports_budget_pause_and_pending_tasks(stack, writer_stub, query_stub):
    md = stack.metadata("judged")
    run_id = await judged_run(stack, writer_stub, "judged")
    await insert_rows(stack, run_llm_state_table, [
        llm_state_row(run_id, "judged", 0.12, True, "openai: 401 invalid api key")])
    states = [TaskState.DONE, TaskState.QUEUED, TaskState.RUNNING, TaskState.DONE]
    await insert_rows(stack, tasks_table, [task_row(run_id, "judged", 40, s, state)
                                           for s, state in enumerate(states)])
    summary = await query_stub.GetRunSummary(query_pb2.GetRunSummaryRequest(run_id=run_id),
                                             metadata=md)
    assert (summary.budget_usd, summary.budget_exhausted, summary.llm_paused_reason) == (
        0.12, True, "openai: 401 invalid api key")
    assert summary.pending_predictions == 2


async def test_summary_and_list_of_a_run_without_judgments(stack, writer_stub, query_stub):
    md = stack.metadata("judged")
    run = await create_run(writer_stub, md)
    summary = await query_stub.GetRunSummary(query_pb2.GetRunSummaryRequest(run_id=run.id),
                                             metadata=md)
    assert (list(summary.rows), summary.total_cost_usd, summary.pending_predictions) == (
        [], 0.0, 0)
    listed = await query_stub.ListJudgments(query_pb2.ListJudgmentsRequest(run_id=run.id),
                                            metadata=md)
    assert (list(listed.judgments), listed.next_page_token) == ([], "")


async def test_tampered_or_mismatched_tokens_are_invalid(stack, writer_stub, query_stub):
    md = stack.metadata("judged")
    run_id = await judged_run(stack, writer_stub, "judged")
    first = await query_stub.ListJudgments(query_pb2.ListJudgmentsRequest(
        run_id=run_id, criterion="chrf", page_size=2), metadata=md)
    token = first.next_page_token
    tampered = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
    request = query_pb2.ListJudgmentsRequest
    for bad, fields in (
        (request(run_id=run_id, criterion="helpfulness", page_token=token), {"page_token"}),
        (request(run_id=run_id, criterion="chrf", epoch=1, page_token=token), {"page_token"}),
        (request(run_id=run_id, criterion="chrf", judge_type=RULE, page_token=token),
         {"page_token"}),
        (request(run_id=run_id, page_token=token), {"page_token"}),
        (request(run_id=run_id, criterion="chrf", page_token=tampered), {"page_token"}),
        (request(run_id=run_id, page_token="%%%not-base64"), {"page_token"}),
        (request(run_id=run_id, page_size=-1), {"page_size"}),
        (request(run_id=run_id, epoch=-1), {"epoch"}),
        (request(run_id=run_id, judge_type=42), {"judge_type"}),
        (request(run_id="not-a-uuid"), {"run_id"}),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await query_stub.ListJudgments(bad, metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(rich_status(err.value))) == fields
    second = await query_stub.ListJudgments(request(run_id=run_id, criterion="chrf",
                                                    page_size=2, page_token=token), metadata=md)
    assert [(j.prediction.step, j.prediction.sample_index) for j in second.judgments] == [
        (10, 2), (10, 3)]


async def test_compare_sample_carries_each_epochs_judgments(stack, writer_stub, query_stub):
    md = stack.metadata("judged")
    run_id = await judged_run(stack, writer_stub, "judged")
    reply = await query_stub.CompareSample(query_pb2.CompareSampleRequest(
        run_id=run_id, sample_index=3), metadata=md)
    got = [(p.epoch, [(j.criterion, j.score, j.status, j.prediction.step, j.epoch)
                      for j in p.judgments]) for p in reply.predictions]
    assert got == [(e, [("chrf", round(0.1 * (e + 3), 3), SCORED, e * 10, e),
                        ("helpfulness", 0.0, UNSCORED, e * 10, e)]) for e in (1, 2, 3)]


async def test_compare_sample_without_judgments_has_none(stack, writer_stub, query_stub):
    md = stack.metadata("judged")
    run = await create_run(writer_stub, md, config=NO_JUDGING)
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=grid(2, 1)), metadata=md)
    await settled(stack, run.id)
    reply = await query_stub.CompareSample(query_pb2.CompareSampleRequest(
        run_id=run.id, sample_index=0), metadata=md)
    assert [len(p.judgments) for p in reply.predictions] == [0, 0]


async def test_rule_judgments_of_the_real_judge_add_up(stack, writer_stub, query_stub):
    """The stack's judge scores a run with its default rules; what the query service
    reports agrees with itself: every criterion has one judgment per prediction."""
    md = stack.metadata("judged")
    run = await create_run(writer_stub, md)
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=grid(EPOCHS, SAMPLES)), metadata=md)
    await settled(stack, run.id)
    summary = await query_stub.GetRunSummary(query_pb2.GetRunSummaryRequest(run_id=run.id),
                                             metadata=md)
    criteria = {r.criterion for r in summary.rows}
    assert {"exact_match", "chrf"} <= criteria
    assert {(r.epoch, r.judge_type, r.judge_model) for r in summary.rows} == {
        (e, RULE, "rules") for e in range(1, EPOCHS + 1)}
    assert all(r.scored_count + r.unscored_count == SAMPLES for r in summary.rows)
    assert (summary.total_cost_usd, summary.pending_predictions) == (0.0, 0)
    keys, _ = await all_judgments(query_stub, md, run_id=run.id, page_size=7)
    assert len(keys) == len(set(keys)) == EPOCHS * SAMPLES * len(criteria)
    exact = [r for r in summary.rows if r.criterion == "exact_match"]
    assert [(r.epoch, r.scored_count, r.pass_rate) for r in exact] == [
        (e, SAMPLES, 0.0) for e in range(1, EPOCHS + 1)]  # "prediction s/i" vs "truth i"


async def test_other_users_run_is_not_found(stack, writer_stub, query_stub):
    run_id = await judged_run(stack, writer_stub, "judged")
    md = stack.metadata("mallory")
    calls = [
        query_stub.ListJudgments(query_pb2.ListJudgmentsRequest(run_id=run_id), metadata=md),
        query_stub.ListJudgments(query_pb2.ListJudgmentsRequest(run_id=run_id, epoch=1,
                                                                criterion="chrf"), metadata=md),
        query_stub.GetRunSummary(query_pb2.GetRunSummaryRequest(run_id=run_id), metadata=md),
        query_stub.CompareSample(query_pb2.CompareSampleRequest(run_id=run_id), metadata=md),
        query_stub.GetRunSummary(query_pb2.GetRunSummaryRequest(run_id=str(uuid.uuid4())),
                                 metadata=md),
        query_stub.ListJudgments(query_pb2.ListJudgmentsRequest(run_id=str(uuid.uuid4())),
                                 metadata=md),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("stack", ["postgres"], indirect=True)
async def test_reader_role_sees_only_the_callers_judge_rows(stack, writer_stub):
    alice = await judged_run(stack, writer_stub, "rls-judged-alice")
    await insert_rows(stack, run_llm_state_table, [
        llm_state_row(alice, "rls-judged-alice", 1.0, False, None)])
    await insert_rows(stack, tasks_table, [task_row(alice, "rls-judged-alice", 40, 0,
                                                    TaskState.QUEUED)])
    reader = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=READER_ROLE,
                                   database=stack.database)
    try:
        # alice: the seeded judgments, her LLM state, the judge's tasks and the one above.
        alice_rows = (len(seed_rows(alice, "")), 1, EPOCHS * SAMPLES + 1)
        for user, expected in (("rls-judged-alice", alice_rows), ("rls-judged-bob", (0, 0, 0)),
                               (None, (0, 0, 0))):
            async with reader.transaction():
                if user is not None:
                    await reader.execute("SELECT set_config($1, $2, true)", RLS_USER_SETTING,
                                         user)
                # Deliberately no user filter: only the policies separate the users.
                counts = tuple([await reader.fetchval(
                    f"SELECT count(*) FROM judge.{table} WHERE run_id = $1", uuid.UUID(alice))
                    for table in ("judgments", "run_llm_state", "tasks")])
            assert counts == expected, (user, counts)
    finally:
        await reader.close()
