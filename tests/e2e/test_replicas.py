"""Replicas: 2 writers, 3 judges and 2 queries as processes on one PostgreSQL database.

Trainer streaming clients upload over both writers (one ipv4: target, round_robin), the
writers hand off to the three judges the same way, and a caller reads through both query
replicas. While predictions are still streaming and judging is in progress, one replica of
each kind is killed with SIGKILL (the writer killed is one that has stored predictions of
a stream still going). Then, exactly: every prediction stored once, judged once per criterion, the
outbox and the judge queue drained, and the surviving query replica answers."""

import asyncio
import os
import time
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import grpc
import pytest

from epochlens.v1 import common_pb2, query_pb2, query_pb2_grpc
from services.common.auth import mint_token
from services.common.balancing import balancing_options
from services.common.config import AuthSettings
from tests.conftest import (
    JUDGE_ROLE,
    JWT_SECRET,
    PAGE_SECRET,
    PG_ADMIN,
    PG_HOST,
    PG_PORT,
    READER_ROLE,
    WRITER_ROLE,
    migrated_database,
    pg_url,
)
from tests.replicas import Replica, base_env, start_replica, stop_all, target, wait_serving
from trainer_client.config import PredictionsConfig
from trainer_client.results import GenerationResult
from trainer_client.spool import RunRecord, Spool
from trainer_client.streaming import StreamingClient

WRITERS, JUDGES, QUERIES = 2, 3, 2
CLIENTS, PASSES, SAMPLES, PASS_PAUSE_S = 4, 60, 10, 0.1
# The kill comes while at most this share of the predictions is stored.
KILL_BEFORE_SHARE = 0.75
CRITERIA_WITH_TRUTH = 5  # the rule criteria of a run without a judge section
USER = "replica-user"
WAIT_S = 60.0
POLL_S = 0.1
FLUSH_TIMEOUT_S = 60.0
QUERY_TIMEOUT_S = 5.0
# Calls through the query target that must all succeed after the kill.
CALLS_AFTER_KILL = 20

COMMON_SETTINGS = {"SHUTDOWN_GRACE_S": "0.5", "LOG_LEVEL": "INFO"}
# The dispatcher hands off while ingest goes on (no deferring), so judging overlaps it.
WRITER_SETTINGS = {**COMMON_SETTINGS, "OUTBOX_POLL_S": "0.05", "OUTBOX_INGEST_QUIET_S": "0",
                   "OUTBOX_BACKOFF_BASE_S": "0.1", "OUTBOX_BACKOFF_MAX_S": "1.0",
                   "OUTBOX_BATCH": "100"}
# Small claims spread the tasks over the judges; a dead judge's tasks return after 3 s.
JUDGE_SETTINGS = {**COMMON_SETTINGS, "IDLE_POLL_S": "0.05", "LEASE_S": "3",
                  "CLAIM_BATCH": "16"}
QUERY_SETTINGS = {**COMMON_SETTINGS, "PAGE_TOKEN_SECRET": PAGE_SECRET}


@pytest.fixture(scope="module")
async def database():
    async with migrated_database("replicas") as name:
        yield name


@pytest.fixture
def replicas(database, tmp_path):
    env, logs = base_env(JWT_SECRET), tmp_path / "logs"
    started: dict[str, list[Replica]] = {"writer": [], "judge": [], "query": []}
    try:
        started["judge"] = [start_replica("judge", pg_url(JUDGE_ROLE, database), env,
                                          JUDGE_SETTINGS, logs) for _ in range(JUDGES)]
        writer_settings = {**WRITER_SETTINGS, "JUDGE_ADDRESS": target(started["judge"])}
        started["writer"] = [start_replica("writer", pg_url(WRITER_ROLE, database), env,
                                           writer_settings, logs) for _ in range(WRITERS)]
        started["query"] = [start_replica("query", pg_url(READER_ROLE, database), env,
                                          QUERY_SETTINGS, logs) for _ in range(QUERIES)]
        wait_serving([r for kind in started.values() for r in kind])
        yield started
    finally:
        stop_all([r for kind in started.values() for r in kind])


def upload(address: str, spool_dir: Path, index: int) -> tuple[StreamingClient, object]:
    """One trainer's streaming upload of PASSES passes, PASS_PAUSE_S apart, then closed."""
    config = PredictionsConfig(_env_file=None, spool_dir=spool_dir / str(index),
                               backoff_base_s=0.05, backoff_max_s=0.5,
                               stream_batch_predictions=5)
    spool = Spool.create(config.spool_dir, RunRecord(os.urandom(8).hex(), f"replicas-{index}",
                                                     "tiny", "toy", {}))
    client = StreamingClient(config, spool, address, mint_token_for_test())
    client.start()
    for step in range(1, PASSES + 1):
        client.submit(1, step, [GenerationResult(i, f"prompt {i}", f"truth {i}",
                                                 f"prediction {step}/{i}", 1.0, 3, 2)
                                for i in range(SAMPLES)])
        time.sleep(PASS_PAUSE_S)
    client.finish()
    return client, client.close(FLUSH_TIMEOUT_S)


def mint_token_for_test() -> str:
    return mint_token(AuthSettings(jwt_secret=JWT_SECRET, _env_file=None), USER)


async def counts(admin: asyncpg.Connection) -> dict[str, int]:
    row = await admin.fetchrow("""
        SELECT (SELECT count(*) FROM writer.predictions) AS predictions,
               (SELECT count(*) FROM writer.judge_outbox) AS outbox,
               (SELECT count(*) FROM judge.judgments) AS judgments,
               (SELECT count(*) FROM judge.tasks WHERE state <> 3) AS open_tasks,
               (SELECT count(*) FROM judge.tasks WHERE state = 2) AS running_tasks""")
    return dict(row)


async def ingesting_writer(admin: asyncpg.Connection, writers: list[Replica]) -> Replica | None:
    """A writer one of whose database sessions has stored predictions (its last statement
    was the streams' insert): while the uploads go on, that writer has a stream open."""
    ports = {row["client_port"] for row in await admin.fetch(
        "SELECT client_port FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
        "AND query LIKE '%INSERT INTO writer.predictions%'")}
    return next((w for w in writers if w.database_ports(PG_PORT) & ports), None)


async def wait_mid_work(admin: asyncpg.Connection, writers: list[Replica],
                        total: int) -> tuple[Replica, dict[str, int]]:
    """Polls until predictions are streaming (some stored, not most), judging is in
    progress (judgments stored and more to come) and a writer is ingesting; returns that
    writer and the counts seen."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        now = await counts(admin)
        if (0 < now["predictions"] <= total * KILL_BEFORE_SHARE and now["judgments"]
                and now["open_tasks"] + now["outbox"]):
            victim = await ingesting_writer(admin, writers)
            if victim is not None:
                return victim, now
        await asyncio.sleep(POLL_S / 10)
    raise AssertionError(f"never caught the stack mid-work: {await counts(admin)}")


class QueryLoad:
    """ListRuns through the query target, over and over, until stopped; the codes seen."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=balancing_options("round_robin"))
        self.stub = query_pb2_grpc.QueryServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {mint_token_for_test()}"),)
        self.codes: list[grpc.StatusCode] = []
        self.task = asyncio.create_task(self._loop())

    async def call(self, request) -> query_pb2.ListPredictionsResponse:
        return await self.stub.ListPredictions(request, metadata=self.metadata,
                                               timeout=QUERY_TIMEOUT_S)

    async def _loop(self) -> None:
        while True:
            try:
                await self.stub.ListRuns(query_pb2.ListRunsRequest(page_size=1),
                                         metadata=self.metadata, timeout=QUERY_TIMEOUT_S)
                self.codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                self.codes.append(exc.code())
            await asyncio.sleep(POLL_S / 2)

    async def close(self) -> None:
        self.task.cancel()
        await self.channel.close()


async def stored_predictions(load: QueryLoad, run_id: str) -> int:
    """Every prediction of the run through the query target, page by page."""
    seen, token = 0, ""
    while True:
        page = await load.call(query_pb2.ListPredictionsRequest(
            run_id=run_id, page_size=500, page_token=token))
        seen += len(page.predictions)
        token = page.next_page_token
        if not token:
            return seen


async def wait_drained(admin: asyncpg.Connection, expected_judgments: int) -> dict[str, int]:
    deadline = time.monotonic() + WAIT_S
    while True:
        now = await counts(admin)
        if (now["judgments"] >= expected_judgments and not now["outbox"]
                and not now["open_tasks"]):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"not drained after {WAIT_S}s: {now}")
        await asyncio.sleep(POLL_S)


async def test_kill_one_replica_of_each_kind_mid_work(replicas, database, tmp_path):
    writers, judges, queries = replicas["writer"], replicas["judge"], replicas["query"]
    total = CLIENTS * PASSES * SAMPLES
    admin = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_ADMIN, database=database)
    load = QueryLoad(target(queries))
    try:
        uploads = [asyncio.create_task(asyncio.to_thread(upload, target(writers), tmp_path, i))
                   for i in range(CLIENTS)]
        victim, at_kill = await wait_mid_work(admin, writers, total)
        killed = [victim.kill(), judges[0].kill(), queries[0].kill()]
        calls_at_kill = len(load.codes)
        results = await asyncio.gather(*uploads)
        drained = await wait_drained(admin, total * CRITERIA_WITH_TRUTH)
        await assert_stored_once(admin, results, total)
        await assert_answers_after_kill(load, results, calls_at_kill)
    finally:
        await load.close()
        await admin.close()
    assert killed == [-9, -9, -9]
    assert 0 < at_kill["predictions"] <= total * KILL_BEFORE_SHARE, at_kill
    assert at_kill["judgments"] > 0, at_kill
    assert at_kill["open_tasks"] + at_kill["outbox"] > 0, at_kill
    assert drained == {"predictions": total, "outbox": 0, "judgments": total * CRITERIA_WITH_TRUTH,
                       "open_tasks": 0, "running_tasks": 0}
    survivors = [r for r in writers + judges + queries if r.popen.returncode is None]
    assert len(survivors) == WRITERS + JUDGES + QUERIES - 3
    assert all(r.popen.poll() is None for r in survivors), [r.log_tail() for r in survivors]


async def assert_stored_once(admin: asyncpg.Connection, results, total: int) -> None:
    """Each client's run finished with every (step, sample) stored once and judged once per
    criterion; the clients of the killed writer had to reconnect."""
    reports = [report for _, report in results]
    assert all(r.complete and r.finished for r in reports), [r.describe() for r in reports]
    run_ids = [uuid.UUID(r.run_id) for r in reports]
    assert len(set(run_ids)) == CLIENTS
    rows = await admin.fetch("SELECT run_id, step, sample_index FROM writer.predictions")
    assert Counter((r["run_id"], r["step"], r["sample_index"]) for r in rows) == Counter(
        {(run, step, i): 1 for run in run_ids for step in range(1, PASSES + 1)
         for i in range(SAMPLES)})
    per_key = await admin.fetch(
        "SELECT run_id, step, sample_index, count(*) AS n, count(DISTINCT criterion) AS d "
        "FROM judge.judgments GROUP BY run_id, step, sample_index")
    assert len(per_key) == total
    assert {(r["n"], r["d"]) for r in per_key} == {(CRITERIA_WITH_TRUTH, CRITERIA_WITH_TRUTH)}
    states = await admin.fetch("SELECT state FROM writer.runs")
    assert [r["state"] for r in states] == [common_pb2.RUN_STATE_SUCCEEDED] * CLIENTS
    reconnects = sum(client.counts["connection_errors"] for client, _ in results)
    assert reconnects >= 1, [client.counts for client, _ in results]


async def assert_answers_after_kill(load: QueryLoad, results, calls_at_kill: int) -> None:
    """The query target still answers (the surviving replica): CALLS_AFTER_KILL reads in a
    row succeed, and each run reads back whole through it."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if len(load.codes) >= calls_at_kill + CALLS_AFTER_KILL:
            break
        await asyncio.sleep(POLL_S)
    tail = load.codes[-CALLS_AFTER_KILL:]
    assert tail == [grpc.StatusCode.OK] * CALLS_AFTER_KILL, Counter(load.codes)
    for _, report in results:
        assert await stored_predictions(load, report.run_id) == PASSES * SAMPLES
