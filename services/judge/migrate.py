"""The judge part of the migrate step: brings schema `judge` to the newest revision, then (on
PostgreSQL) makes sure the judge role exists, grants the judge and reader roles what they
need, and lets the judge role's workers claim every user's tasks.

services.writer.migrate.migrate() runs it after schema `writer`, so `epochlens-migrate`
migrates both. On SQLite the schema is its own file, judge.db, under sqlite_dir.
"""

import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.common.migrations import grant_tables, upgrade_schema
from services.judge.models import SCHEMA
from services.writer.config import MigrateSettings

log = logging.getLogger(__name__)

# Table privileges per role. Judgments are immutable once stored (no UPDATE).
JUDGE_GRANTS = {"tasks": "SELECT, INSERT, UPDATE, DELETE", "judgments": "SELECT, INSERT",
                "llm_cache": "SELECT, INSERT", "run_llm_state": "SELECT, INSERT, UPDATE"}
READER_GRANTS = {"judgments": "SELECT", "run_llm_state": "SELECT", "tasks": "SELECT"}
WORKER_POLICY = "tasks_worker"


async def migrate_judge(settings: MigrateSettings) -> None:
    """Upgrades schema judge to head and ensures roles, grants and the worker policy."""
    await upgrade_schema(settings, SCHEMA, "services.judge:migrations",
                         lambda conn: _ensure_roles(conn, settings))


async def _ensure_roles(conn: AsyncConnection, settings: MigrateSettings) -> None:
    roles = ((settings.judge_role, settings.judge_role_password, JUDGE_GRANTS),
             (settings.reader_role, settings.reader_role_password, READER_GRANTS))
    for role, password, grants in roles:
        await grant_tables(conn, SCHEMA, role, password, grants)
    # Workers claim and settle every user's tasks; RLS policies are permissive (OR-ed), so the
    # owner policy still applies to every other role. Recreated so a renamed role is followed.
    await conn.execute(text(f"DROP POLICY IF EXISTS {WORKER_POLICY} ON {SCHEMA}.tasks"))
    await conn.execute(text(f'CREATE POLICY {WORKER_POLICY} ON {SCHEMA}.tasks '
                            f'TO "{settings.judge_role}" USING (true) WITH CHECK (true)'))
