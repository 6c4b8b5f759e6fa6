"""DeleteRun, PurgeRun and the retention sweep with real servers and real databases.

The shared `stack` (PostgreSQL and SQLite) shows deletion end to end: every row of the run
in both schemas is counted before and after. The judge-down, interruption and two-replica
tests run writers and judges of their own on a PostgreSQL database of this module's own, so
no other test's server touches their runs.
"""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from sqlalchemy import func, select, update

from epochlens.v1 import (
    common_pb2,
    judge_pb2,
    judge_pb2_grpc,
    query_pb2,
    writer_pb2,
    writer_pb2_grpc,
)
from services.common.config import DatabaseSettings
from services.common.db import create_engine
from services.judge.models import SCHEMA as JUDGE_SCHEMA
from services.judge.models import (
    judgment_revisions_table,
    judgments_table,
    llm_cache_table,
    purged_runs_table,
    run_llm_state_table,
    tasks_table,
)
from services.judge.pairwise.models import pairwise_results_table, pairwise_tasks_table
from services.writer.config import WriterSettings
from services.writer.deletion import JudgePurge, RunDeleter
from services.writer.models import SCHEMA as WRITER_SCHEMA
from services.writer.models import (
    epochs_table,
    judge_outbox_table,
    metric_rollups_table,
    metrics_table,
    predictions_table,
    runs_table,
    samples_table,
)
from tests.conftest import PG_ADMIN, WRITER_ROLE, migrated_database, pg_url
from tests.helpers import create_run, error_reason, grid, item, rich_status
from tests.integration.test_handoff import free_port, judge_up, wait_until, writer_settings
from tests.integration.test_query_judgments import insert_rows, llm_state_row, settled

WRITER_TABLES = (predictions_table, samples_table, epochs_table, judge_outbox_table,
                 metrics_table, metric_rollups_table)
JUDGE_TABLES = (tasks_table, judgments_table, judgment_revisions_table, llm_cache_table,
                run_llm_state_table, pairwise_tasks_table, pairwise_results_table)
EPOCHS, SAMPLES = 2, 5
METRIC_STEPS = 30


def admin_engine(database: str | None, sqlite_dir=None):
    settings = (DatabaseSettings(database_url=pg_url(PG_ADMIN, database), _env_file=None)
                if database else DatabaseSettings(sqlite_dir=sqlite_dir, _env_file=None))
    return create_engine(settings, (WRITER_SCHEMA, JUDGE_SCHEMA))


async def counts(engine, run_id: str) -> dict[str, int]:
    """Rows of the run in every per-run table of both schemas, and its run row."""
    found = {}
    async with engine.connect() as conn:
        for table in (runs_table, *WRITER_TABLES, *JUDGE_TABLES):
            column = table.c.id if table is runs_table else table.c.run_id
            found[table.name] = await conn.scalar(select(func.count()).select_from(table)
                                                  .where(column == uuid.UUID(run_id)))
    return found


def cache_row(run_id: str, user: str, key: str, sample: int) -> dict:
    return {"key": key, "user_id": user, "verdict": {"score": 7.0}, "run_id": uuid.UUID(run_id),
            "step": 10, "sample_index": sample, "input_tokens": 10, "output_tokens": 2,
            "cost_usd": 0.001, "create_time": datetime.now(UTC)}


def pairwise_rows(run_id: str, user: str) -> tuple[dict, dict]:
    now, rid = datetime.now(UTC), uuid.UUID(run_id)
    task = {"run_id": rid, "step": 20, "sample_index": 0, "user_id": user, "epoch": 2,
            "baseline_run_id": rid, "baseline_epoch": 1, "config": {}, "state": 3,
            "attempts": 1, "lease_until": None, "not_before": now, "last_error": None,
            "create_time": now, "update_time": now}
    result = {"run_id": rid, "step": 20, "sample_index": 0, "criterion": "helpfulness",
              "judge_model": "m", "user_id": user, "epoch": 2, "baseline_run_id": rid,
              "baseline_epoch": 1, "baseline_step": 10, "baseline_sample_index": 0,
              "outcome": 1, "answer_1": "B", "answer_2": "A", "reason_1": "", "reason_2": "",
              "position_bias": False, "unscored_reason": "", "input_tokens": 1,
              "output_tokens": 1, "cost_usd": 0.0, "prompt_version": "v1", "create_time": now}
    return task, result


async def filled_run(stack, writer_stub, user: str, finish: bool = True, **fields) -> str:
    """A run with predictions (judged by the stack's judge), metrics, and rows in every judge
    table: a human judgment revision, cache entries, spend, a pairwise task and result."""
    md = stack.metadata(user)
    run = await create_run(writer_stub, md, **fields)
    # Texts of the run's own (no other run shares its cache entries).
    own = [item(p.step, p.sample_index, epoch=p.epoch, prediction=f"{run.id} {p.prediction}")
           for p in grid(EPOCHS, SAMPLES)]
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=own), metadata=md)
    await writer_stub.WriteMetrics(writer_pb2.WriteMetricsRequest(run_id=run.id, metrics=[
        writer_pb2.MetricInput(step=s, name="loss", value=1.0 / (s + 1))
        for s in range(METRIC_STEPS)]), metadata=md)
    await settled(stack, run.id)
    async with grpc.aio.insecure_channel(stack.judge.address) as channel:
        await judge_pb2_grpc.JudgeServiceStub(channel).RecordHumanJudgment(
            judge_pb2.RecordHumanJudgmentRequest(
                prediction=judge_pb2.PredictionRef(run_id=run.id, step=10, sample_index=0),
                criterion="clarity", score=4.0, threshold=3.0, reasoning="ok"), metadata=md)
    await insert_rows(stack, llm_cache_table, [cache_row(run.id, user, f"{run.id}-{s}", s)
                                               for s in range(SAMPLES)])
    await insert_rows(stack, run_llm_state_table,
                      [llm_state_row(run.id, user, 5.0, False, None)])
    task, result = pairwise_rows(run.id, user)
    await insert_rows(stack, pairwise_tasks_table, [task])
    await insert_rows(stack, pairwise_results_table, [result])
    if finish:
        await writer_stub.FinishRun(writer_pb2.FinishRunRequest(
            run_id=run.id, state=common_pb2.RUN_STATE_SUCCEEDED), metadata=md)
    return run.id


def stack_engine(stack):
    return admin_engine(stack.database, stack.sqlite_dir)


async def test_owner_delete_removes_every_row_in_both_schemas(stack, writer_stub, query_stub):
    user = f"del-{uuid.uuid4().hex[:6]}"
    run_id = await filled_run(stack, writer_stub, user)
    kept = await filled_run(stack, writer_stub, user)
    engine = stack_engine(stack)
    try:
        before = await counts(engine, run_id)
        assert all(before[t.name] > 0 for t in (*WRITER_TABLES, *JUDGE_TABLES)
                   if t is not judge_outbox_table), before
        reply = await writer_stub.DeleteRun(writer_pb2.DeleteRunRequest(run_id=run_id),
                                            metadata=stack.metadata(user))
        after = await counts(engine, run_id)
        assert after == dict.fromkeys(after, 0), after
        assert reply.run_id == run_id
        assert reply.prediction_count == EPOCHS * SAMPLES == before["predictions"]
        assert reply.sample_count == SAMPLES == before["samples"]
        assert reply.metric_count == before["metrics"] + before["metric_rollups"]
        assert reply.judge_task_count == before["tasks"] + before["pairwise_tasks"]
        assert reply.judgment_count == before["judgments"] + before["pairwise_results"]
        assert (reply.cache_entry_count, reply.spend_record_count) == (SAMPLES, 1)
        assert await counts(engine, kept) == (await counts(engine, kept)) and all(
            v > 0 for k, v in (await counts(engine, kept)).items() if k != "judge_outbox")
    finally:
        await engine.dispose()
    md = stack.metadata(user)
    for call in (query_stub.GetRun(query_pb2.GetRunRequest(run_id=run_id), metadata=md),
                 writer_stub.DeleteRun(writer_pb2.DeleteRunRequest(run_id=run_id), metadata=md)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    again = await writer_stub.DeleteRun(writer_pb2.DeleteRunRequest(
        run_id=run_id, allow_missing=True), metadata=md)
    assert again == writer_pb2.DeleteRunResponse(run_id=run_id)
    runs = await query_stub.ListRuns(query_pb2.ListRunsRequest(page_size=100), metadata=md)
    assert [r.id for r in runs.runs] == [kept]


async def test_other_users_run_is_not_found_and_nothing_is_deleted(stack, writer_stub):
    owner, other = f"own-{uuid.uuid4().hex[:6]}", f"oth-{uuid.uuid4().hex[:6]}"
    run_id = await filled_run(stack, writer_stub, owner)
    engine = stack_engine(stack)
    try:
        before = await counts(engine, run_id)
        for request in (writer_pb2.DeleteRunRequest(run_id=run_id),
                        writer_pb2.DeleteRunRequest(run_id=run_id, force=True)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await writer_stub.DeleteRun(request, metadata=stack.metadata(other))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        quiet = await writer_stub.DeleteRun(writer_pb2.DeleteRunRequest(
            run_id=run_id, allow_missing=True), metadata=stack.metadata(other))
        assert quiet.prediction_count == 0
        async with grpc.aio.insecure_channel(stack.judge.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await judge_pb2_grpc.JudgeServiceStub(channel).PurgeRun(
                    judge_pb2.PurgeRunRequest(run_id=run_id), metadata=stack.metadata(other))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            # The owner cannot purge a live run by hand either: only a run DeleteRun marked.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await judge_pb2_grpc.JudgeServiceStub(channel).PurgeRun(
                    judge_pb2.PurgeRunRequest(run_id=run_id), metadata=stack.metadata(owner))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert await counts(engine, run_id) == before
    finally:
        await engine.dispose()


async def test_running_run_is_refused_unless_forced(stack, writer_stub, query_stub):
    user = f"run-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    run_id = await filled_run(stack, writer_stub, user, finish=False)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await writer_stub.DeleteRun(writer_pb2.DeleteRunRequest(run_id=run_id), metadata=md)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(rich_status(err.value)) == "RUN_ACTIVE"
    got = await query_stub.GetRun(query_pb2.GetRunRequest(run_id=run_id), metadata=md)
    assert got.state == common_pb2.RUN_STATE_RUNNING
    reply = await writer_stub.DeleteRun(writer_pb2.DeleteRunRequest(run_id=run_id, force=True),
                                        metadata=md)
    assert reply.prediction_count == EPOCHS * SAMPLES
    later = (writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run_id, predictions=[item(99, 0)]), metadata=md),
        writer_stub.FinishRun(writer_pb2.FinishRunRequest(
            run_id=run_id, state=common_pb2.RUN_STATE_SUCCEEDED), metadata=md))
    for call in later:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    engine = stack_engine(stack)
    try:
        assert set((await counts(engine, run_id)).values()) == {0}
    finally:
        await engine.dispose()


async def test_cache_entry_another_run_used_survives(stack, writer_stub):
    """The same prediction texts in two runs of one user share a cache key: deleting one run
    keeps the entry; entries only the deleted run's texts have are removed."""
    user = f"cache-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    gone = await create_run(writer_stub, md)
    twin = await create_run(writer_stub, md)
    shared, own = item(10, 0), item(10, 1, prediction="only in the deleted run")
    for run, items in ((gone, [shared, own]), (twin, [shared])):
        await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=run.id, predictions=items), metadata=md)
        await settled(stack, run.id)
    await insert_rows(stack, llm_cache_table, [cache_row(gone.id, user, f"k-{gone.id}-0", 0),
                                               cache_row(gone.id, user, f"k-{gone.id}-1", 1)])
    await writer_stub.FinishRun(writer_pb2.FinishRunRequest(
        run_id=gone.id, state=common_pb2.RUN_STATE_SUCCEEDED), metadata=md)
    reply = await writer_stub.DeleteRun(writer_pb2.DeleteRunRequest(run_id=gone.id),
                                        metadata=md)
    assert reply.cache_entry_count == 1
    engine = stack_engine(stack)
    try:
        async with engine.connect() as conn:
            keys = set(await conn.scalars(select(llm_cache_table.c.key).where(
                llm_cache_table.c.user_id == user)))
    finally:
        await engine.dispose()
    assert keys == {f"k-{gone.id}-0"}


async def test_retention_deletes_only_old_finished_runs_of_every_user(stack, writer_stub):
    users = [f"ret-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    old, recent, running = [], [], []
    for user in users:
        md = stack.metadata(user)
        for bucket, finish in ((old, True), (recent, True), (running, False)):
            run = await create_run(writer_stub, md)
            await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
                run_id=run.id, predictions=grid(1, 3)), metadata=md)
            if finish:
                await writer_stub.FinishRun(writer_pb2.FinishRunRequest(
                    run_id=run.id, state=common_pb2.RUN_STATE_FAILED), metadata=md)
            bucket.append(run.id)
    engine = stack_engine(stack)
    try:
        async with engine.begin() as conn:
            await conn.execute(update(runs_table).where(
                runs_table.c.id.in_([uuid.UUID(r) for r in old + running])).values(
                finish_time=datetime.now(UTC) - timedelta(days=3)))
        settings = WriterSettings(retention_days=2, database_url=_writer_url(stack),
                                  _env_file=None)
        async with grpc.aio.insecure_channel(stack.judge.address) as channel:
            purge = JudgePurge(judge_pb2_grpc.JudgeServiceStub(channel), stack.auth, settings)
            deleter = RunDeleter(_writer_engine(stack), settings, purge)
            try:
                assert await deleter.sweep_once() >= len(old)
            finally:
                await deleter._engine.dispose()
        for run_id in old:
            assert set((await counts(engine, run_id)).values()) == {0}
        for run_id in recent + running:
            assert (await counts(engine, run_id))["predictions"] == 3
    finally:
        await engine.dispose()


def _writer_url(stack) -> str | None:
    return pg_url(WRITER_ROLE, stack.database) if stack.database else None


def _writer_engine(stack):
    settings = (DatabaseSettings(database_url=_writer_url(stack), _env_file=None)
                if stack.database else DatabaseSettings(sqlite_dir=stack.sqlite_dir,
                                                        _env_file=None))
    return create_engine(settings, (WRITER_SCHEMA,))


# PostgreSQL, servers of this module's own.

@pytest.fixture(scope="module")
async def delete_db():
    async with migrated_database("delete") as name:
        yield name


async def _own_run(writer, auth, user: str, rows: int = 40) -> str:
    md = (("authorization", f"Bearer {_token(auth, user)}"),)
    async with grpc.aio.insecure_channel(writer.address) as channel:
        stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        run = await create_run(stub, md)
        await stub.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=run.id, predictions=[item(10, s) for s in range(rows)]), metadata=md)
        await stub.FinishRun(writer_pb2.FinishRunRequest(
            run_id=run.id, state=common_pb2.RUN_STATE_SUCCEEDED), metadata=md)
    return run.id


def _token(auth, user: str) -> str:
    from services.common.auth import mint_token
    return mint_token(auth, user)


async def test_judge_down_is_unavailable_and_a_retry_completes(delete_db, auth_settings):
    user, port = f"down-{uuid.uuid4().hex[:6]}", free_port()
    judge = await judge_up(delete_db, port, auth_settings)
    writer = await _start_writer(delete_db, port, auth_settings)
    engine = admin_engine(delete_db)
    md = (("authorization", f"Bearer {_token(auth_settings, user)}"),)
    try:
        run_id = await _own_run(writer, auth_settings, user)
        await wait_until(lambda: _judged(engine, run_id), "the run's tasks")
        await judge.stop(0.5)
        async with grpc.aio.insecure_channel(writer.address) as channel:
            stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.DeleteRun(writer_pb2.DeleteRunRequest(run_id=run_id), metadata=md)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            hidden = await counts(engine, run_id)
            assert hidden["runs"] == 1 and hidden["predictions"] == 40 and hidden["tasks"] == 40
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.WritePredictions(writer_pb2.WritePredictionsRequest(
                    run_id=run_id, predictions=[item(11, 0)]), metadata=md)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            judge = await judge_up(delete_db, port, auth_settings)
            reply = await _retry_unavailable(lambda: stub.DeleteRun(
                writer_pb2.DeleteRunRequest(run_id=run_id), metadata=md))
        assert (reply.prediction_count, reply.judge_task_count) == (40, 40)
        assert set((await counts(engine, run_id)).values()) == {0}
        async with engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(purged_runs_table).where(
                purged_runs_table.c.run_id == uuid.UUID(run_id))) == 1
    finally:
        await writer.stop(0.5)
        await judge.stop(0.5)
        await engine.dispose()


async def _retry_unavailable(call, timeout_s: float = 30.0):
    """The call's reply once it stops being UNAVAILABLE (the writer's judge channel
    reconnects with backoff), as a client retries."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if (exc.code() != grpc.StatusCode.UNAVAILABLE
                    or asyncio.get_running_loop().time() > deadline):
                raise
            await asyncio.sleep(0.2)


async def _start_writer(database: str, judge_port: int | None, auth, **overrides):
    from services.writer.server import start as start_writer
    return await start_writer(writer_settings(database, judge_port, **overrides), auth)


async def _judged(engine, run_id: str) -> bool:
    found = await counts(engine, run_id)
    return found["tasks"] == 40 and found["judge_outbox"] == 0


class _Killed(Exception):
    """Stands for the process dying between two chunks."""


class _DyingDeleter(RunDeleter):
    """Dies (without releasing its claim) at its `die_at`-th lease renewal."""

    def __init__(self, *args, die_at: int) -> None:
        super().__init__(*args)
        self._renewals, self._die_at = 0, die_at

    async def _renew(self, conn, claim) -> None:
        self._renewals += 1
        if self._renewals == self._die_at:
            raise _Killed
        await super()._renew(conn, claim)


async def test_deletion_killed_between_chunks_is_resumed_by_the_sweep(delete_db, auth_settings):
    user = f"kill-{uuid.uuid4().hex[:6]}"
    writer = await _start_writer(delete_db, None, auth_settings)
    engine = admin_engine(delete_db)
    settings = writer_settings(delete_db, None, delete_chunk_rows=7, delete_claim_s=2.0)
    try:
        run_id = await _own_run(writer, auth_settings, user)
        dying = _DyingDeleter(create_engine(settings, (WRITER_SCHEMA,)), settings, None,
                              die_at=4)
        with pytest.raises(_Killed):
            await dying.delete_run(user, uuid.UUID(run_id), False, False)
        await dying._engine.dispose()
        left = await counts(engine, run_id)
        assert left["runs"] == 1 and 0 < left["predictions"] < 40, left
        heir = RunDeleter(create_engine(settings, (WRITER_SCHEMA,)), settings, None)
        try:
            assert await heir.sweep_once() == 0  # the dead deleter's lease has not passed
            await asyncio.sleep(2.1)
            assert await heir.sweep_once() == 1
        finally:
            await heir._engine.dispose()
        assert set((await counts(engine, run_id)).values()) == {0}
    finally:
        await writer.stop(0.5)
        await engine.dispose()


async def test_two_writers_sweeping_together_delete_each_run_once(delete_db, auth_settings):
    writer = await _start_writer(delete_db, None, auth_settings)
    engine = admin_engine(delete_db)
    settings = writer_settings(delete_db, None, delete_chunk_rows=5, retention_days=1)
    runs = []
    try:
        for n in range(6):
            user = f"pair-{n % 2}-{uuid.uuid4().hex[:4]}"
            runs.append(await _own_run(writer, auth_settings, user))
        async with engine.begin() as conn:
            await conn.execute(update(runs_table).where(
                runs_table.c.id.in_([uuid.UUID(r) for r in runs])).values(
                finish_time=datetime.now(UTC) - timedelta(days=2)))
        deleters = [RunDeleter(create_engine(settings, (WRITER_SCHEMA,)), settings, None)
                    for _ in range(2)]
        try:
            done = await asyncio.gather(*(d.sweep_once() for d in deleters))
        finally:
            for deleter in deleters:
                await deleter._engine.dispose()
        assert sum(done) == len(runs)
        assert sum(d.counts["runs_deleted"] for d in deleters) == len(runs)
        for run_id in runs:
            assert set((await counts(engine, run_id)).values()) == {0}
    finally:
        await writer.stop(0.5)
        await engine.dispose()


async def test_late_enqueue_and_worker_results_of_a_purged_run_are_dropped(stack, writer_stub):
    """After PurgeRun, EnqueueJudging of the run is acknowledged as duplicates and stores no
    task; a worker's settle of one of its tasks stores no judgment."""
    from services.judge.schema import Verdict
    from services.judge.store import JudgeStore, Outcome, Task, TaskState
    user = f"late-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    run_id = await filled_run(stack, writer_stub, user)
    await writer_stub.DeleteRun(writer_pb2.DeleteRunRequest(run_id=run_id), metadata=md)
    async with grpc.aio.insecure_channel(stack.judge.address) as channel:
        reply = await judge_pb2_grpc.JudgeServiceStub(channel).EnqueueJudging(
            judge_pb2.EnqueueJudgingRequest(run_id=run_id, items=[judge_pb2.JudgeItem(
                prediction=judge_pb2.PredictionRef(run_id=run_id, step=10, sample_index=0),
                epoch=1, prompt="p", prediction_text="x")]), metadata=md)
    assert (reply.enqueued_count, reply.duplicate_count) == (0, 1)
    engine = stack_engine(stack)
    try:
        store = JudgeStore(engine)
        task = Task(uuid.UUID(run_id), 10, 0, user, 1, "p", None, "x", {}, 1)
        verdict = Verdict(criterion="length", judge_type=judge_pb2.JUDGE_TYPE_RULE,
                          judge_model="rules", score=1.0, passed=True, threshold=0.5,
                          reasoning="", status=judge_pb2.JUDGMENT_STATUS_SCORED,
                          prompt_version="v1")
        assert await store.settle(user, [Outcome(task, [verdict], TaskState.DONE)]) == 0
        assert set((await counts(engine, run_id)).values()) == {0}
    finally:
        await engine.dispose()


async def test_cli_delete_asks_refuses_running_and_prints_the_counts(stack, writer_stub):
    from tests.cli.test_views import cli, one_error_line
    user = f"cli-del-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    run = await create_run(writer_stub, md)
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=[item(10, s) for s in range(3)]), metadata=md)
    writer = {"EPOCHLENS_CLI_WRITER_ADDRESS": stack.writer.address}
    unasked = await cli(stack, user, "delete", run.id, **writer)
    assert "needs a confirmation" in one_error_line(unasked, 2, "deleting a run")
    running = await cli(stack, user, "delete", run.id, "--yes", **writer)
    assert "pass --force" in one_error_line(running, 1, "FAILED_PRECONDITION")
    engine = stack_engine(stack)
    try:
        assert (await counts(engine, run.id))["predictions"] == 3
        done = await cli(stack, user, "delete", run.id, "--yes", "--force", "--json", **writer)
        assert done.exit_code == 0, (done.stdout, done.stderr)
        assert '"prediction_count": 3' in done.stdout
        assert set((await counts(engine, run.id)).values()) == {0}
    finally:
        await engine.dispose()
    gone = await cli(stack, user, "delete", run.id, "--yes", **writer)
    assert one_error_line(gone, 1, "") == f"error: run {run.id} not found"
