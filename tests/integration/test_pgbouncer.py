"""The suite's core through PgBouncer in transaction pooling mode (tests/pgbouncer.py).

A database migrated through PgBouncer; judge, writer and query services whose database
URLs all go through it with db_statement_cache_size=0 (the query service's LISTEN
connection goes to PostgreSQL directly: watch_listen_url). The core tests of the other
modules run here against that stack (this module's `stack` fixture replaces the
conftest one for them): writes and streams, query pages, the hand-off to the judge and
its judgments, API keys, row-level security with two users, WatchRun. And the reason for
the setting: with statement caches on, a statement cached on one server connection is
gone (or belongs to another client) on the next transaction's."""

from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from services.common.config import AuthSettings, DatabaseSettings
from services.common.db import create_engine
from services.judge.config import JudgeSettings
from services.judge.server import start as start_judge
from services.query.config import QuerySettings
from services.query.server import start as start_query
from services.writer.config import MigrateSettings, WriterSettings
from services.writer.migrate import migrate
from services.writer.server import start as start_writer
from tests.conftest import (
    JUDGE_ROLE,
    PAGE_SECRET,
    PG_ADMIN,
    PG_HOST,
    PG_PORT,
    READER_ROLE,
    WRITER_ROLE,
    Stack,
    pg_url,
)
from tests.integration import (
    test_api_keys,
    test_handoff,
    test_isolation,
    test_query,
    test_stream,
    test_watch,
    test_writer,
)
from tests.pgbouncer import pgbouncer_url, running_pgbouncer

# PgBouncer before 1.21 keeps no prepared statement across transactions.
NO_STATEMENT_CACHE = 0
SHUTDOWN_S = 0.5


@pytest.fixture(scope="module")
def pgbouncer_port():
    with running_pgbouncer() as port:
        yield port


async def _start_services(auth: AuthSettings, database: str, port: int) -> Stack:
    common = {"port": 0, "shutdown_grace_s": SHUTDOWN_S, "_env_file": None,
              "db_statement_cache_size": NO_STATEMENT_CACHE}
    judge = await start_judge(JudgeSettings(
        database_url=pgbouncer_url(JUDGE_ROLE, database, port), idle_poll_s=0.05, **common),
        auth)
    writer = await start_writer(WriterSettings(
        database_url=pgbouncer_url(WRITER_ROLE, database, port), judge_address=judge.address,
        outbox_poll_s=0.05, outbox_backoff_base_s=0.1, outbox_backoff_max_s=1.0,
        api_key_max_failures=1_000_000, **common), auth)
    query = await start_query(QuerySettings(
        database_url=pgbouncer_url(READER_ROLE, database, port),
        watch_listen_url=pg_url(READER_ROLE, database), page_token_secret=PAGE_SECRET,
        **common), auth)
    return Stack("postgres", writer, query, database, None, auth, judge)


@pytest.fixture(scope="module")
async def stack(auth_settings, pgbouncer_port) -> AsyncIterator[Stack]:
    """The services behind PgBouncer on a database the migrate step made through it."""
    name = f"epochlens_test_pgbouncer_{pgbouncer_port}"
    admin = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_ADMIN, database="postgres")
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        await migrate(MigrateSettings(
            database_url=pgbouncer_url(PG_ADMIN, name, pgbouncer_port),
            db_statement_cache_size=NO_STATEMENT_CACHE, writer_role=WRITER_ROLE,
            reader_role=READER_ROLE, judge_role=JUDGE_ROLE, _env_file=None))
        running = await _start_services(auth_settings, name, pgbouncer_port)
        yield running
        for server in (running.writer, running.query, running.judge):
            await server.stop(SHUTDOWN_S)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _three_transactions(cache_size: int, port: int) -> list[int]:
    """One statement in a transaction on connection a, then b, then a again, through a
    PgBouncer with one server connection (so all three run on it)."""
    engine = create_engine(DatabaseSettings(
        database_url=pgbouncer_url(PG_ADMIN, "postgres", port),
        db_statement_cache_size=cache_size, _env_file=None), ())
    try:
        async with engine.connect() as a, engine.connect() as b:
            results = []
            for conn in (a, b, a):
                results.append(await conn.scalar(text("SELECT CAST(:x AS int) + 1"), {"x": 1}))
                await conn.commit()
            return results
    finally:
        await engine.dispose()


async def test_statement_caches_break_behind_transaction_pooling_and_size_0_works():
    with running_pgbouncer(pool_size=1) as port:
        with pytest.raises(DBAPIError, match="prepared statement .* does not exist"):
            await _three_transactions(100, port)
        assert await _three_transactions(NO_STATEMENT_CACHE, port) == [2, 2, 2]


async def test_watch_listens_on_a_direct_connection(stack):
    """A pooled server connection serves other clients between transactions, so a LISTEN
    sent through the pooler would not stay: the query service's listener is the one
    session (watch_listen_url, PostgreSQL itself) whose last statement is LISTEN."""
    direct = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=READER_ROLE,
                                   database=stack.database)
    try:
        listeners = await direct.fetch(
            "SELECT application_name FROM pg_stat_activity WHERE datname = $1 "
            "AND query LIKE 'LISTEN %'", stack.database)
    finally:
        await direct.close()
    assert [row["application_name"] for row in listeners] == ["epochlens-watch"]


# The core of the suite, run again here against the PgBouncer stack.
two_users_data = test_isolation.two_users_data
test_create_run_returns_owned_running_run = test_writer.test_create_run_returns_owned_running_run
test_create_run_is_idempotent_with_request_id = (
    test_writer.test_create_run_is_idempotent_with_request_id)
test_write_stores_rows_and_replay_adds_none = (
    test_writer.test_write_stores_rows_and_replay_adds_none)
test_bad_item_rejects_whole_batch_naming_it = (
    test_writer.test_bad_item_rejects_whole_batch_naming_it)
test_other_users_run_is_not_found_for_writes = (
    test_writer.test_other_users_run_is_not_found_for_writes)
test_finish_run_once = test_writer.test_finish_run_once
test_acks_follow_commits_and_bad_batch_is_rejected_alone = (
    test_stream.test_acks_follow_commits_and_bad_batch_is_rejected_alone)
test_replayed_stream_stores_nothing_twice = test_stream.test_replayed_stream_stores_nothing_twice
test_pages_cover_every_prediction_once_in_order = (
    test_query.test_pages_cover_every_prediction_once_in_order)
test_filters_by_epoch_and_sample = test_query.test_filters_by_epoch_and_sample
test_list_epochs_counts_and_pages = test_query.test_list_epochs_counts_and_pages
test_list_runs_newest_first_and_only_own = test_query.test_list_runs_newest_first_and_only_own
test_other_users_run_is_not_found_everywhere = (
    test_query.test_other_users_run_is_not_found_everywhere)
test_stack_judges_every_stored_prediction_once = (
    test_handoff.test_stack_judges_every_stored_prediction_once)
test_cli_creates_lists_and_revokes_keys_stored_hashed = (
    test_api_keys.test_cli_creates_lists_and_revokes_keys_stored_hashed)
test_exchanged_token_is_accepted_by_the_query_service = (
    test_api_keys.test_exchanged_token_is_accepted_by_the_query_service)
test_revoked_expired_and_unknown_keys_are_unauthenticated = (
    test_api_keys.test_revoked_expired_and_unknown_keys_are_unauthenticated)
test_row_level_security_shows_the_owner_or_the_hash_only = (
    test_api_keys.test_row_level_security_shows_the_owner_or_the_hash_only)
test_unfiltered_reads_see_only_the_callers_rows = (
    test_isolation.test_unfiltered_reads_see_only_the_callers_rows)
test_writer_role_cannot_write_rows_for_another_user = (
    test_isolation.test_writer_role_cannot_write_rows_for_another_user)
test_watch_starts_with_the_state_then_streams_each_commit = (
    test_watch.test_watch_starts_with_the_state_then_streams_each_commit)
test_one_notification_per_commit = test_watch.test_one_notification_per_commit
