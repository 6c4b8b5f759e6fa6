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
from services.writer.models import SCHEMA as WRITER_SCHEMA

log = logging.getLogger(__name__)

# Table privileges per role. Unscored pairwise results are deleted by ResumeJudging (their
# tasks queued again). Judgment rows are never updated. DELETE is for a human judgment
# replaced by its next revision (every revision is kept in judgment_revisions) and for the
# unscored LLM judgments ResumeJudging judges again; a restrictive policy (revision 0003)
# keeps every other judgment from being deleted. PurgeRun (services.judge.purge) deletes
# every row of a purged run, all acting for its owner; the revision 0006 policy lets it
# delete that run's judgments.
JUDGE_GRANTS = {"tasks": "SELECT, INSERT, UPDATE, DELETE",
                "judgments": "SELECT, INSERT, DELETE",
                "llm_cache": "SELECT, INSERT, DELETE",
                "run_llm_state": "SELECT, INSERT, UPDATE, DELETE",
                "judgment_revisions": "SELECT, INSERT, DELETE",
                "pairwise_tasks": "SELECT, INSERT, UPDATE, DELETE",
                "pairwise_results": "SELECT, INSERT, DELETE",
                "purged_runs": "SELECT, INSERT"}
READER_GRANTS = {"judgments": "SELECT", "run_llm_state": "SELECT", "tasks": "SELECT",
                 "judgment_revisions": "SELECT", "pairwise_tasks": "SELECT",
                 "pairwise_results": "SELECT"}
WORKER_POLICY = "tasks_worker"
# The same for the pairwise judging queue (services.judge.pairwise).
PAIRWISE_WORKER_POLICY = "pairwise_tasks_worker"
# The judge reads the writer's runs and predictions acting for a user (their row-level
# security applies): who owns a run, and the stored text it judges.
JUDGE_WRITER_GRANTS = {"runs": "SELECT", "predictions": "SELECT", "samples": "SELECT"}


async def migrate_judge(settings: MigrateSettings) -> None:
    """Upgrades schema judge to head and ensures roles, grants and the worker policy."""
    await upgrade_schema(settings, SCHEMA, "services.judge:migrations",
                         lambda conn: _ensure_roles(conn, settings))


async def _ensure_roles(conn: AsyncConnection, settings: MigrateSettings) -> None:
    roles = ((settings.judge_role, settings.judge_role_password, JUDGE_GRANTS),
             (settings.reader_role, settings.reader_role_password, READER_GRANTS))
    for role, password, grants in roles:
        await grant_tables(conn, SCHEMA, role, password, grants)
    await grant_tables(conn, WRITER_SCHEMA, settings.judge_role, settings.judge_role_password,
                       JUDGE_WRITER_GRANTS)
    # Workers claim and settle every user's tasks; RLS policies are permissive (OR-ed), so the
    # owner policy still applies to every other role. Recreated so a renamed role is followed.
    await conn.execute(text(f"DROP POLICY IF EXISTS {WORKER_POLICY} ON {SCHEMA}.tasks"))
    await conn.execute(text(f'CREATE POLICY {WORKER_POLICY} ON {SCHEMA}.tasks '
                            f'TO "{settings.judge_role}" USING (true) WITH CHECK (true)'))
    await conn.execute(text(f"DROP POLICY IF EXISTS {PAIRWISE_WORKER_POLICY} "
                            f"ON {SCHEMA}.pairwise_tasks"))
    await conn.execute(text(f'CREATE POLICY {PAIRWISE_WORKER_POLICY} ON {SCHEMA}.pairwise_tasks '
                            f'TO "{settings.judge_role}" USING (true) WITH CHECK (true)'))
