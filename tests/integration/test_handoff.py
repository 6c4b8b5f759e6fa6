"""The durable hand-off from the writer to the judge, with real servers.

The shared `stack` (PostgreSQL and SQLite) shows the path end to end. The other tests
start writers and judges of their own on a PostgreSQL database of this module's own: the
stack's writer also runs a dispatcher, which would hand these tests' rows to a judge that
is up while a test needs it down.
"""

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import grpc
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select, text

from epochlens.v1 import judge_pb2, writer_pb2, writer_pb2_grpc
from services.common.auth import mint_token
from services.common.convert import dict_to_struct
from services.common.db import create_engine
from services.common.server import RunningServer
from services.judge.config import JudgeSettings
from services.judge.models import judgments_table
from services.judge.server import start as start_judge
from services.writer.config import MigrateSettings, WriterSettings
from services.writer.models import WriterBase, judge_outbox_table
from services.writer.outbox import backoff_s
from services.writer.server import start as start_writer
from tests.conftest import (
    JUDGE_ROLE,
    PG_ADMIN,
    PG_HOST,
    PG_PORT,
    WRITER_ROLE,
    migrated_database,
    pg_url,
)
from tests.helpers import create_run, item

USER = "handoff-user"
# Rule criteria a prediction gets with the default judge config: with a ground truth
# exact_match, chrf, edit_similarity, length, structure; without one length, structure.
CRITERIA_WITH_TRUTH, CRITERIA_WITHOUT_TRUTH = 5, 2
WAIT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_until(check: Callable[[], Awaitable[bool]], what: str,
                     timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def handoff_db() -> AsyncIterator[str]:
    """A database of this module's own, migrated (schemas writer and judge, roles)."""
    async with migrated_database("handoff") as name:
        yield name


@pytest.fixture
async def db(handoff_db) -> AsyncIterator[asyncpg.Connection]:
    """The superuser's view, for counting stored rows (bypasses RLS)."""
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_ADMIN, database=handoff_db)
    yield conn
    await conn.close()


def writer_settings(database: str, judge_port: int | None, **overrides) -> WriterSettings:
    fields = {"port": 0, "shutdown_grace_s": 0.5, "database_url": pg_url(WRITER_ROLE, database),
              "judge_address": f"127.0.0.1:{judge_port}" if judge_port else None,
              "outbox_poll_s": 0.05, "outbox_backoff_base_s": 0.1, "outbox_backoff_max_s": 0.3,
              "outbox_rpc_timeout_s": 5.0, "outbox_rpc_max_attempts": 2, "_env_file": None}
    return WriterSettings(**{**fields, **overrides})


async def judge_up(database: str, port: int, auth) -> RunningServer:
    return await start_judge(JudgeSettings(
        port=port, database_url=pg_url(JUDGE_ROLE, database), shutdown_grace_s=0.5,
        worker_count=2, idle_poll_s=0.05, _env_file=None), auth)


def metadata(auth, user: str = USER) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(auth, user)}"),)


async def write(writer: RunningServer, auth, run_id: str,
                items) -> writer_pb2.WritePredictionsResponse:
    async with grpc.aio.insecure_channel(writer.address) as channel:
        return await writer_pb2_grpc.PredictionWriterServiceStub(channel).WritePredictions(
            writer_pb2.WritePredictionsRequest(run_id=run_id, predictions=items),
            metadata=metadata(auth))


async def new_run(writer: RunningServer, auth, config: dict | None = None) -> str:
    async with grpc.aio.insecure_channel(writer.address) as channel:
        run = await create_run(writer_pb2_grpc.PredictionWriterServiceStub(channel),
                               metadata(auth), config=dict_to_struct(config or {}))
    return run.id


async def stream(writer: RunningServer, auth, run_id: str, batches) -> tuple[int, int]:
    """Streams the batches; returns (inserted, duplicates) over all acks."""
    requests = [writer_pb2.StreamPredictionsRequest(sequence=seq, run_id=run_id,
                                                    predictions=batch)
                for seq, batch in enumerate(batches, start=1)]
    async with grpc.aio.insecure_channel(writer.address) as channel:
        call = writer_pb2_grpc.PredictionWriterServiceStub(channel).StreamPredictions(
            iter(requests), metadata=metadata(auth))
        acks = [ack async for ack in call]
    assert acks[-1].acked_sequence == len(requests)
    assert not [r for ack in acks for r in ack.rejections]
    return sum(a.inserted_count for a in acks), sum(a.duplicate_count for a in acks)


async def outbox_rows(db, run_id: str) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM writer.judge_outbox WHERE run_id = $1",
                          uuid.UUID(run_id))


async def count(db, table: str, run_id: str) -> int:
    return await db.fetchval(f"SELECT count(*) FROM {table} WHERE run_id = $1",
                             uuid.UUID(run_id))


async def stack_counts(stack, run_id: str) -> tuple[int, int]:
    """(outbox rows, judgments) of the run, counted as admin in the stack's database."""
    settings = (WriterSettings(port=0, database_url=pg_url(PG_ADMIN, stack.database),
                               _env_file=None) if stack.database
                else WriterSettings(port=0, sqlite_dir=stack.sqlite_dir, _env_file=None))
    engine = create_engine(settings, ("writer", "judge"))
    run = uuid.UUID(run_id)
    try:
        async with engine.connect() as conn:
            outbox = await conn.scalar(select(func.count()).select_from(judge_outbox_table)
                                       .where(judge_outbox_table.c.run_id == run))
            judged = await conn.scalar(select(func.count()).select_from(judgments_table)
                                       .where(judgments_table.c.run_id == run))
    finally:
        await engine.dispose()
    return outbox, judged


async def test_stack_judges_every_stored_prediction_once(stack, writer_stub):
    """PostgreSQL and SQLite: what the writer stores reaches the judge; a replay does not."""
    md = stack.metadata("carol")
    run = await create_run(writer_stub, md)
    items = [item(5, i, **({"ground_truth": None} if i < 4 else {})) for i in range(20)]
    request = writer_pb2.WritePredictionsRequest(run_id=run.id, predictions=items)
    assert (await writer_stub.WritePredictions(request, metadata=md)).inserted_count == 20
    expected = 16 * CRITERIA_WITH_TRUTH + 4 * CRITERIA_WITHOUT_TRUTH

    async def judged() -> bool:
        return await stack_counts(stack, run.id) == (0, expected)
    await wait_until(judged, f"{expected} judgments and an empty outbox")
    replay = await writer_stub.WritePredictions(request, metadata=md)
    assert (replay.inserted_count, replay.duplicate_count) == (0, 20)
    await asyncio.sleep(0.3)
    assert await stack_counts(stack, run.id) == (0, expected)


def test_backoff_doubles_with_jitter_and_is_capped():
    settings = WriterSettings(port=0, outbox_backoff_base_s=1.0, outbox_backoff_max_s=8.0,
                              _env_file=None)
    for attempts, (low, high) in enumerate([(0.5, 1), (1, 2), (2, 4), (4, 8), (4, 8)]):
        delays = [backoff_s(settings, attempts) for _ in range(200)]
        assert low <= min(delays) and max(delays) <= high
    assert 4 <= backoff_s(settings, 10_000) <= 8


async def test_outbox_rows_come_with_new_predictions_only(handoff_db, db, auth_settings):
    """One row per inserted prediction in the same commit; duplicates get none; a writer
    with judging off writes none. The judge is down, so the rows stay."""
    judging = await start_writer(writer_settings(handoff_db, free_port(),
                                                 outbox_backoff_base_s=30.0,
                                                 outbox_backoff_max_s=30.0), auth_settings)
    plain = await start_writer(writer_settings(handoff_db, None), auth_settings)
    try:
        run_id = await new_run(judging, auth_settings)
        first = await write(judging, auth_settings, run_id, [item(1, i) for i in range(30)])
        assert len(await outbox_rows(db, run_id)) == 30
        second = await write(judging, auth_settings, run_id, [item(1, i) for i in range(40)])
        assert (first.inserted_count, second.inserted_count, second.duplicate_count) == (
            30, 10, 30)
        assert len(await outbox_rows(db, run_id)) == 40
        third = await write(plain, auth_settings, run_id, [item(2, i) for i in range(10)])
        assert third.inserted_count == 10
        rows = await outbox_rows(db, run_id)
        assert len(rows) == 40 and {r["step"] for r in rows} == {1}
        assert {r["user_id"] for r in rows} == {USER}
        assert await count(db, "writer.predictions", run_id) == 50
    finally:
        await judging.stop(0.5)
        await plain.stop(0.5)


async def test_dispatcher_backs_off_while_the_judge_is_down(handoff_db, db, auth_settings):
    writer = await start_writer(writer_settings(handoff_db, free_port()), auth_settings)
    try:
        run_id = await new_run(writer, auth_settings)
        await write(writer, auth_settings, run_id, [item(1, i) for i in range(20)])

        async def retried_twice() -> bool:
            rows = await outbox_rows(db, run_id)
            return min(r["attempts"] for r in rows) >= 2
        await wait_until(retried_twice, "two failed hand-offs")
        rows = await outbox_rows(db, run_id)
    finally:
        await writer.stop(0.5)
    assert len(rows) == 20
    assert all(r["last_error"].startswith("UNAVAILABLE") for r in rows)
    assert all(r["next_attempt_time"] > r["create_time"] for r in rows)
    assert await count(db, "judge.tasks", run_id) == 0


async def test_judge_down_during_ingest_then_up_judges_each_prediction_once(
        handoff_db, db, auth_settings):
    judge_port = free_port()
    writer = await start_writer(writer_settings(handoff_db, judge_port), auth_settings)
    judge = None
    try:
        run_id = await new_run(writer, auth_settings)
        # 6 epochs x 25 samples; every fifth sample has no ground truth.
        batches = [[item(epoch * 10, s, epoch=epoch, **({"ground_truth": None} if s % 5 == 0
                                                          else {}))
                    for s in range(25)] for epoch in range(1, 7)]
        predictions, without_truth = 150, 30
        assert await stream(writer, auth_settings, run_id, batches) == (predictions, 0)

        async def waited() -> bool:
            rows = await outbox_rows(db, run_id)
            return len(rows) == predictions and min(r["attempts"] for r in rows) >= 1
        await wait_until(waited, "the hand-off to fail while the judge is down")

        judge = await judge_up(handoff_db, judge_port, auth_settings)
        expected = ((predictions - without_truth) * CRITERIA_WITH_TRUTH
                    + without_truth * CRITERIA_WITHOUT_TRUTH)

        async def judged() -> bool:
            return (await count(db, "judge.judgments", run_id) >= expected
                    and not await outbox_rows(db, run_id))
        await wait_until(judged, f"{expected} judgments")
        await assert_judged_once(db, run_id, predictions, expected)

        # A replay of the whole stream after judging stores nothing and judges nothing.
        assert await stream(writer, auth_settings, run_id, batches) == (0, predictions)
        assert await outbox_rows(db, run_id) == []
        await asyncio.sleep(0.5)
        await assert_judged_once(db, run_id, predictions, expected)
    finally:
        await writer.stop(0.5)
        if judge is not None:
            await judge.stop(0.5)


async def assert_judged_once(db, run_id: str, predictions: int, expected: int) -> None:
    per_key = await db.fetch(
        "SELECT step, sample_index, criterion, count(*) AS n FROM judge.judgments "
        "WHERE run_id = $1 GROUP BY step, sample_index, criterion", uuid.UUID(run_id))
    assert len(per_key) == expected
    assert {r["n"] for r in per_key} == {1}
    assert len({(r["step"], r["sample_index"]) for r in per_key}) == predictions
    assert await count(db, "judge.judgments", run_id) == expected
    assert await count(db, "judge.tasks", run_id) == predictions
    types = await db.fetch("SELECT DISTINCT judge_type FROM judge.judgments WHERE run_id = $1",
                           uuid.UUID(run_id))
    assert [r["judge_type"] for r in types] == [judge_pb2.JUDGE_TYPE_RULE]


async def test_bad_judge_config_parks_the_rows(handoff_db, db, auth_settings):
    """The judge refuses the run's judge config (INVALID_ARGUMENT): the rows are parked for
    outbox_parked_delay_s with the judge's message, not dropped and not retried at once.
    (CreateRun through a writer that judges refuses such a config; this run was created by
    one that does not, as a run created before the judge's settings changed would be.)"""
    judge_port = free_port()
    judge = await judge_up(handoff_db, judge_port, auth_settings)
    writer = await start_writer(writer_settings(handoff_db, judge_port,
                                                outbox_parked_delay_s=3600.0), auth_settings)
    plain = await start_writer(writer_settings(handoff_db, None), auth_settings)
    try:
        run_id = await new_run(plain, auth_settings,
                               {"judge": {"rules": {"criteria": ["no_such_rule"]}}})
        started = time.time()
        await write(writer, auth_settings, run_id, [item(1, i) for i in range(12)])

        async def parked() -> bool:
            rows = await outbox_rows(db, run_id)
            return bool(rows) and min(r["attempts"] for r in rows) >= 1
        await wait_until(parked, "the rows to be parked")
        await asyncio.sleep(0.5)
        rows = await outbox_rows(db, run_id)
    finally:
        await writer.stop(0.5)
        await plain.stop(0.5)
        await judge.stop(0.5)
    assert len(rows) == 12
    assert {r["attempts"] for r in rows} == {1}
    assert all(r["last_error"].startswith("INVALID_ARGUMENT") for r in rows)
    assert all(r["last_error"].find("no_such_rule") >= 0 for r in rows)
    assert min(r["next_attempt_time"].timestamp() for r in rows) > started + 3000
    assert await count(db, "judge.tasks", run_id) == 0


async def test_dispatcher_defers_to_ingest_for_at_most_max_defer(handoff_db, db, auth_settings):
    """While the writer keeps committing, no hand-off starts (ingest first), but never for
    longer than outbox_max_defer_s in a row."""
    judge_port = free_port()
    judge = await judge_up(handoff_db, judge_port, auth_settings)
    try:
        patient = await start_writer(writer_settings(
            handoff_db, judge_port, outbox_ingest_quiet_s=3600.0, outbox_max_defer_s=3600.0),
            auth_settings)
        try:
            # A first write starts the ingest clock; a pass already in flight may claim
            # its row, but none starts after it, so the run's rows below all stay put.
            await write(patient, auth_settings, await new_run(patient, auth_settings),
                        [item(1, 0)])
            run_id = await new_run(patient, auth_settings)
            await write(patient, auth_settings, run_id, [item(1, i) for i in range(10)])
            await asyncio.sleep(1.0)
            rows = await outbox_rows(db, run_id)
        finally:
            await patient.stop(0.5)
        assert len(rows) == 10 and {r["attempts"] for r in rows} == {0}
        assert await count(db, "judge.tasks", run_id) == 0

        bounded = await start_writer(writer_settings(
            handoff_db, judge_port, outbox_ingest_quiet_s=3600.0, outbox_max_defer_s=0.3),
            auth_settings)
        try:
            await write(bounded, auth_settings, run_id, [item(2, i) for i in range(10)])

            async def handed_off() -> bool:
                return not await outbox_rows(db, run_id)
            await wait_until(handed_off, "the hand-off after outbox_max_defer_s", 10.0)
        finally:
            await bounded.stop(0.5)
        assert await count(db, "judge.tasks", run_id) == 20
    finally:
        await judge.stop(0.5)


async def test_migration_matches_the_model(handoff_db):
    """Revision 0002 creates judge_outbox exactly as services/writer/models.py declares it."""
    engine = create_engine(MigrateSettings(database_url=pg_url(PG_ADMIN, handoff_db),
                                           _env_file=None), ("writer",))

    def differences(sync_conn) -> list:
        context = MigrationContext.configure(sync_conn, opts={"include_schemas": True})
        return [diff for diff in compare_metadata(context, WriterBase.metadata)
                if "judge_outbox" in repr(diff)]
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(differences) == []
            policies = set(await conn.scalars(text(
                "SELECT policyname FROM pg_policies WHERE schemaname = 'writer' "
                "AND tablename = 'judge_outbox'")))
    finally:
        await engine.dispose()
    assert policies == {"judge_outbox_owner", "judge_outbox_dispatcher_select",
                        "judge_outbox_dispatcher_update", "judge_outbox_dispatcher_delete"}
