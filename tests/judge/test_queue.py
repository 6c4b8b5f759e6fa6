"""The durable task queue on PostgreSQL (as the judge role, RLS on) and SQLite: idempotent
enqueue, every task judged exactly once by concurrent workers, a dead worker's tasks claimed
again after the lease, retries with backoff, then `failed`."""

import asyncio
import importlib
import logging
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from services.judge.queue import JudgeWorkers, Judging, backoff_s
from services.judge.schema import RulesConfig
from services.judge.store import JudgeStore, TaskState
from tests.conftest import JUDGE_ROLE, PG_HOST, PG_PORT, READER_ROLE
from tests.judge.conftest import JudgeDb, make_items
from tests.judge.fake_llm import FakeLlmServer

USER = "queue-user"
# Default judge config, items with a ground truth: exact_match, chrf, edit_similarity,
# length, structure.
RULE_CRITERIA = 5


def workers_for(db: JudgeDb, engine, **overrides) -> JudgeWorkers:
    settings = db.settings(**overrides)
    return JudgeWorkers(settings, JudgeStore(engine), Judging(settings, engine))


async def judgment_count(db: JudgeDb, run_id: uuid.UUID) -> tuple[int, int]:
    """(judgments, distinct (prediction, criterion, judge type, model)) of a run."""
    rows = await db.rows("SELECT step, sample_index, criterion, judge_type, judge_model "
                         "FROM judge.judgments WHERE run_id = :r", r=_param(db, run_id))
    return len(rows), len(set(rows))


def _param(db: JudgeDb, run_id: uuid.UUID) -> object:
    """How a Uuid column is compared in raw SQL: uuid on PostgreSQL, 32 hex chars on SQLite."""
    return run_id if db.backend == "postgres" else run_id.hex


async def task_rows(db: JudgeDb, run_id: uuid.UUID) -> list:
    return await db.rows("SELECT sample_index, state, attempts, last_error, not_before, "
                         "update_time FROM judge.tasks WHERE run_id = :r ORDER BY sample_index",
                         r=_param(db, run_id))


def _utc(value) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def test_enqueue_is_idempotent(judge_db):
    engine = judge_db.engine()
    store, run_id = JudgeStore(engine), uuid.uuid4()
    try:
        assert await store.enqueue(USER, run_id, make_items(3, run_id), {}) == (3, 0)
        assert await store.enqueue(USER, run_id, make_items(3, run_id), {}) == (0, 3)
        # A partly new batch: two known identities, one new.
        assert await store.enqueue(USER, run_id, make_items(4, run_id)[1:], {}) == (1, 2)
        # The same identity twice in one batch is one task.
        twice = make_items(1, run_id, epoch=2) * 2
        assert await store.enqueue(USER, run_id, twice, {}) == (1, 1)
    finally:
        await engine.dispose()
    rows = await task_rows(judge_db, run_id)
    assert len(rows) == 5
    assert {(r.state, r.attempts) for r in rows} == {(TaskState.QUEUED, 0)}


async def test_concurrent_workers_judge_every_task_exactly_once(judge_db):
    engine = judge_db.engine()
    run_id, count = uuid.uuid4(), 60
    workers = [workers_for(judge_db, engine, claim_batch=7) for _ in range(3)]
    try:
        await JudgeStore(engine).enqueue(USER, run_id, make_items(count, run_id), {})

        async def drain(worker: JudgeWorkers) -> None:
            while await worker.run_once():
                pass

        await asyncio.gather(*(drain(w) for w in workers))
    finally:
        await engine.dispose()
    assert await judgment_count(judge_db, run_id) == (count * RULE_CRITERIA,
                                                      count * RULE_CRITERIA)
    rows = await task_rows(judge_db, run_id)
    assert [(r.state, r.attempts) for r in rows] == [(TaskState.DONE, 1)] * count
    assert sum(w.counts["done"] for w in workers) == count
    assert sum(w.counts["judgments"] for w in workers) == count * RULE_CRITERIA
    # Exact-match verdicts: predictions with an even sample index equal their ground truth.
    passed = await judge_db.rows("SELECT sample_index, passed FROM judge.judgments WHERE "
                                 "run_id = :r AND criterion = 'exact_match' "
                                 "ORDER BY sample_index", r=_param(judge_db, run_id))
    assert [bool(p) for _, p in passed] == [i % 2 == 0 for i in range(count)]


async def test_dead_worker_task_is_claimed_again_after_lease_and_judged_once(judge_db):
    engine = judge_db.engine()
    run_id, count, lease_s = uuid.uuid4(), 8, 1.0
    dying = workers_for(judge_db, engine, lease_s=lease_s)
    survivor = workers_for(judge_db, engine, lease_s=30)
    try:
        await JudgeStore(engine).enqueue(USER, run_id, make_items(count, run_id), {})
        claimed = await dying.claim()
        outcomes = await dying.judge(claimed)  # judged, then "killed" before storing
        assert len(claimed) == count
        assert await survivor.run_once() == 0  # leases still held
        await asyncio.sleep(lease_s + 0.2)
        assert await survivor.run_once() == count
        # The dead worker's late settle (a zombie) stores nothing new.
        await dying.settle(outcomes)
    finally:
        await engine.dispose()
    assert await judgment_count(judge_db, run_id) == (count * RULE_CRITERIA,
                                                      count * RULE_CRITERIA)
    assert {(r.state, r.attempts) for r in await task_rows(judge_db, run_id)} == {
        (TaskState.DONE, 2)}
    assert survivor.counts["judgments"] == count * RULE_CRITERIA
    assert dying.counts["judgments"] == 0


async def test_failing_task_retries_with_backoff_then_fails(judge_db, caplog):
    engine = judge_db.engine()
    run_id, base_s = uuid.uuid4(), 0.6
    worker = workers_for(judge_db, engine, max_attempts=3, retry_backoff_base_s=base_s)
    store = JudgeStore(engine)
    try:
        # A config that cannot be judged (stored past validation) fails every attempt.
        await store.enqueue(USER, run_id, make_items(1, run_id), {"rules": {"bogus": 1}})
        await store.enqueue(USER, run_id, make_items(2, run_id)[1:], {})
        caplog.set_level(logging.WARNING, logger="services.judge.queue")
        for attempt in (1, 2):
            assert await worker.run_once() == (2 if attempt == 1 else 1)
            row = (await task_rows(judge_db, run_id))[0]
            assert (row.state, row.attempts) == (TaskState.QUEUED, attempt)
            assert "does not parse" in row.last_error
            delay = (_utc(row.not_before) - _utc(row.update_time)).total_seconds()
            full = base_s * 2 ** (attempt - 1)
            assert full / 2 - 0.001 <= delay <= full + 0.001
            assert await worker.run_once() == 0  # not due before its backoff
            await asyncio.sleep(delay + 0.05)
        assert await worker.run_once() == 1
    finally:
        await engine.dispose()
    failed, good = await task_rows(judge_db, run_id)
    assert (failed.state, failed.attempts) == (TaskState.FAILED, 3)
    assert (good.state, good.attempts) == (TaskState.DONE, 1)
    assert (worker.counts["retried"], worker.counts["failed"]) == (2, 1)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "failed for good after 3 attempts" in errors[0].getMessage()
    assert await judgment_count(judge_db, run_id) == (RULE_CRITERIA, RULE_CRITERIA)


async def test_task_whose_lease_keeps_expiring_fails(judge_db):
    engine = judge_db.engine()
    run_id = uuid.uuid4()
    worker = workers_for(judge_db, engine, max_attempts=2, lease_s=0.2)
    try:
        await JudgeStore(engine).enqueue(USER, run_id, make_items(1, run_id), {})
        for _ in range(2):
            assert len(await worker.claim()) == 1  # claimed, then the worker "dies"
            await asyncio.sleep(0.3)
        assert await worker.run_once() == 1
    finally:
        await engine.dispose()
    row = (await task_rows(judge_db, run_id))[0]
    assert (row.state, row.attempts) == (TaskState.FAILED, 3)
    assert "lease expired on all 2 attempts" in row.last_error
    assert await judgment_count(judge_db, run_id) == (0, 0)


async def test_server_workers_drain_the_queue_and_stop(judge_db):
    engine = judge_db.engine()
    run_id, count = uuid.uuid4(), 40
    workers = workers_for(judge_db, engine, worker_count=2, claim_batch=16, idle_poll_s=0.05)
    try:
        workers.start()
        await JudgeStore(engine).enqueue(USER, run_id, make_items(count, run_id), {})
        workers.notify()
        for _ in range(200):
            if workers.counts["done"] == count:
                break
            await asyncio.sleep(0.05)
        await workers.stop(1.0)
    finally:
        await engine.dispose()
    assert workers.counts["done"] == count
    assert await judgment_count(judge_db, run_id) == (count * RULE_CRITERIA,
                                                      count * RULE_CRITERIA)


@pytest.mark.parametrize("attempts", [1, 2, 5, 40])
def test_backoff_is_exponential_with_jitter_and_capped(attempts):
    full = min(60.0, 1.0 * 2 ** (attempts - 1))
    delays = [backoff_s(attempts, 1.0, 60.0) for _ in range(200)]
    assert all(full / 2 <= d <= full for d in delays)
    assert len(set(delays)) > 1


async def test_rules_in_worker_processes_match_the_thread(judge_db):
    engine = judge_db.engine()
    pooled = Judging(judge_db.settings(rule_processes=2), engine)
    inline = Judging(judge_db.settings(), engine)
    items = make_items(9, uuid.uuid4())
    configs = [RulesConfig(required_keywords=["beta"])] * len(items)
    try:
        from_pool = await pooled.rules(items, configs)
        from_thread = await inline.rules(items, configs)
    finally:
        await pooled.close()
        await inline.close()
        await engine.dispose()
    assert from_pool == from_thread
    assert [len(v) for v in from_pool] == [RULE_CRITERIA + 1] * len(items)


async def test_row_level_security_of_the_judge_schema(judge_db):
    """Judgments are visible and writable only for their user; the judge role's workers see
    every user's tasks; the reader role sees tasks only for the user it acts for."""
    if judge_db.backend != "postgres":
        pytest.skip("row-level security is PostgreSQL's")
    engine = judge_db.engine()
    run_id = uuid.uuid4()
    try:
        store = JudgeStore(engine)
        await store.enqueue(USER, run_id, make_items(2, run_id), {})
        await workers_for(judge_db, engine).run_once()
    finally:
        await engine.dispose()
    judge = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=JUDGE_ROLE,
                                  database=judge_db.database)
    reader = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=READER_ROLE,
                                   database=judge_db.database)
    try:
        assert await _count_as(judge, None, "judgments") == 0
        assert await _count_as(judge, "someone-else", "judgments") == 0
        assert await _count_as(judge, USER, "judgments") == 2 * RULE_CRITERIA
        assert await _count_as(judge, None, "tasks") == 2  # the worker policy
        assert await _count_as(reader, None, "tasks") == 0
        assert await _count_as(reader, USER, "tasks") == 2
        for statement, message in _foreign_writes(run_id):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match=message):
                async with judge.transaction():
                    await judge.execute("SELECT set_config('epochlens.user_id', "
                                        "'someone-else', true)")
                    await judge.execute(statement)
    finally:
        await judge.close()
        await reader.close()


async def _count_as(conn: asyncpg.Connection, user: str | None, table: str) -> int:
    async with conn.transaction():
        if user is not None:
            await conn.execute("SELECT set_config('epochlens.user_id', $1, true)", user)
        return await conn.fetchval(f"SELECT count(*) FROM judge.{table}")


def _foreign_writes(run_id: uuid.UUID) -> list[tuple[str, str]]:
    """Writes the judge role may not make, and the error each gets: judgments are immutable,
    and a judgment for another user than the one acted for breaks the owner policy."""
    insert = ("INSERT INTO judge.judgments (run_id, step, sample_index, criterion, judge_type, "
              "judge_model, user_id, epoch, score, passed, threshold, reasoning, confidence, "
              "status, unscored_reason, input_tokens, output_tokens, cost_usd, prompt_version, "
              f"create_time) VALUES ('{run_id}', 99, 0, 'c', 1, 'rules', '{USER}', 1, 1, true, "
              "1, '', 0, 1, '', 0, 0, 0, 'v', now())")
    return [("UPDATE judge.judgments SET score = 0", "permission denied"),
            (insert, "row-level security")]


async def test_leases_are_renewed_while_a_slow_batch_is_judged(judge_db):
    """Three LLM calls of 1.5 s each, one at a time, under a 3 s lease: the lease is renewed
    (every lease_s / 3) while the batch is judged, so a second worker never claims the task.
    (A 1 s lease renewed every 0.33 s was lost once under a loaded CI run.)"""
    importlib.import_module("services.judge.llm.judge")  # the SDKs' import is not timed
    fake = FakeLlmServer(latency_s=1.5).start()
    engine = judge_db.engine()
    run_id = uuid.uuid4()
    config = {"llm": {"provider": "openai_compatible", "endpoint": "fake",
                      "model": "slow", "criteria": ["helpfulness", "accuracy", "clarity"],
                      "concurrency": 1}}
    endpoints = {"fake": {"base_url": fake.openai_url}}
    slow, other = (workers_for(judge_db, engine, lease_s=3.0, llm_endpoints=endpoints)
                   for _ in range(2))
    try:
        await JudgeStore(engine).enqueue(USER, run_id, make_items(1, run_id), config)
        judging = asyncio.create_task(slow.run_once())
        await asyncio.sleep(0.1)  # claimed; its first call is under way
        stolen = 0
        while not judging.done():
            stolen += await other.run_once()
            await asyncio.sleep(0.05)
        assert (judging.result(), stolen) == (1, 0)
    finally:
        fake.stop()
        await engine.dispose()
    assert [(r.state, r.attempts) for r in await task_rows(judge_db, run_id)] == [
        (TaskState.DONE, 1)]
    assert await judgment_count(judge_db, run_id) == (RULE_CRITERIA + 3, RULE_CRITERIA + 3)
    assert len(fake.requests) == 3
