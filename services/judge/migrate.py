"""The judge part of the migrate step: brings schema `judge` to the newest revision, then (on
PostgreSQL) makes sure the judge role exists, grants the judge and reader roles what they
need, and lets the judge role's workers claim every user's tasks.

services.writer.migrate.migrate() runs it after schema `writer`, so `epochlens-migrate`
migrates both. On SQLite the schema is its own file, judge.db, under sqlite_dir.
"""

import logging

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.common.db import create_engine, is_postgres
from services.judge.models import SCHEMA
from services.writer.config import MigrateSettings

log = logging.getLogger(__name__)

# Table privileges per role. Judgments are immutable once stored (no UPDATE).
JUDGE_GRANTS = {"tasks": "SELECT, INSERT, UPDATE, DELETE", "judgments": "SELECT, INSERT",
                "llm_cache": "SELECT, INSERT", "run_llm_state": "SELECT, INSERT, UPDATE"}
READER_GRANTS = {"judgments": "SELECT", "run_llm_state": "SELECT", "tasks": "SELECT"}
WORKER_POLICY = "tasks_worker"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "services.judge:migrations")
    return cfg


def _upgrade(sync_conn: Connection) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")


async def migrate_judge(settings: MigrateSettings) -> None:
    """Upgrades schema judge to head and ensures roles, grants and the worker policy."""
    engine = create_engine(settings, (SCHEMA,), application_name="epochlens-migrate")
    try:
        async with engine.begin() as conn:
            if is_postgres(conn):
                await conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
            await conn.run_sync(_upgrade)
            if is_postgres(conn):
                await _ensure_roles(conn, settings)
    finally:
        await engine.dispose()
    log.info("schema %s is at head", SCHEMA)


async def ensure_login_role(conn: AsyncConnection, role: str, password: str | None) -> None:
    """Creates `role` (LOGIN) when missing and sets its password when one is configured."""
    exists = await conn.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role})
    if not exists:
        await conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
    if password is not None:
        statement = await conn.scalar(text("SELECT format('ALTER ROLE %I PASSWORD %L', :r, :p)"),
                                      {"r": role, "p": password})
        await conn.execute(text(statement))


async def _ensure_roles(conn: AsyncConnection, settings: MigrateSettings) -> None:
    roles = ((settings.judge_role, settings.judge_role_password, JUDGE_GRANTS),
             (settings.reader_role, settings.reader_role_password, READER_GRANTS))
    for role, password, grants in roles:
        await ensure_login_role(conn, role, password)
        await conn.execute(text(f'GRANT USAGE ON SCHEMA {SCHEMA} TO "{role}"'))
        for table, privileges in grants.items():
            await conn.execute(text(f'GRANT {privileges} ON {SCHEMA}.{table} TO "{role}"'))
    # Workers claim and settle every user's tasks; RLS policies are permissive (OR-ed), so the
    # owner policy still applies to every other role. Recreated so a renamed role is followed.
    await conn.execute(text(f"DROP POLICY IF EXISTS {WORKER_POLICY} ON {SCHEMA}.tasks"))
    await conn.execute(text(f'CREATE POLICY {WORKER_POLICY} ON {SCHEMA}.tasks '
                            f'TO "{settings.judge_role}" USING (true) WITH CHECK (true)'))
