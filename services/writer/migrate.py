"""The migrate step: brings schema `writer` to the newest revision, then (on
PostgreSQL) makes sure the service roles exist with the grants they need; then does the
same for schema `judge` (services.judge.migrate).

Run as `epochlens-migrate` (or `python -m services.writer.migrate`) with an
admin database URL in EPOCHLENS_MIGRATE_DATABASE_URL; without one it migrates
the embedded SQLite store.
"""

import asyncio
import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.common.migrations import grant_tables, upgrade_schema
from services.common.server import configure_logging
from services.common.startup import StartupError, exit_with, load_settings
from services.judge.migrate import migrate_judge
from services.writer.config import MigrateSettings
from services.writer.deletion import RETENTION_ON, RETENTION_SETTING
from services.writer.models import SCHEMA

log = logging.getLogger(__name__)


async def migrate(settings: MigrateSettings) -> None:
    """Upgrades schemas writer and judge to head and ensures roles; safe to run any number
    of times."""
    await upgrade_schema(settings, SCHEMA, "services.writer:migrations",
                         lambda conn: _ensure_roles(conn, settings))
    await migrate_judge(settings)


# Table privileges per role kind. Predictions, samples and metrics are immutable: the writer
# may not update them. DELETE is for DeleteRun and the retention sweep (services.writer.deletion),
# under the owner policy like every other statement.
WRITER_GRANTS = {"runs": "SELECT, INSERT, UPDATE, DELETE",
                 "predictions": "SELECT, INSERT, DELETE",
                 "samples": "SELECT, INSERT, DELETE",
                 "epochs": "SELECT, INSERT, UPDATE, DELETE",
                 "judge_outbox": "SELECT, INSERT, UPDATE, DELETE",
                 "metrics": "SELECT, INSERT, DELETE",
                 "metric_rollups": "SELECT, INSERT, UPDATE, DELETE",
                 "api_keys": "SELECT, INSERT, UPDATE (revoke_time, last_used_time)"}
# API keys: only revoke_time and last_used_time may change (a key never moves to another
# user, even in a transaction that knows its hash), no DELETE (a revoked key's row is
# kept); the reader has no grant on them.
# The reader sees its caller's outbox rows (owner policy): GetRunSummary shows a hand-off that
# is waiting, and why.
READER_GRANTS = {"runs": "SELECT", "predictions": "SELECT", "samples": "SELECT",
                 "epochs": "SELECT",
                 "judge_outbox": "SELECT", "metrics": "SELECT", "metric_rollups": "SELECT"}


async def _ensure_roles(conn: AsyncConnection, settings: MigrateSettings) -> None:
    roles = ((settings.writer_role, settings.writer_role_password, WRITER_GRANTS),
             (settings.reader_role, settings.reader_role_password, READER_GRANTS))
    for role, password, grants in roles:
        await grant_tables(conn, SCHEMA, role, password, grants)
    await _ensure_dispatcher_policies(conn, settings.writer_role)
    await _ensure_retention_policies(conn, settings.writer_role)


async def _ensure_dispatcher_policies(conn: AsyncConnection, role: str) -> None:
    """The writer's outbox dispatcher claims every user's rows: on judge_outbox only, the
    writer role may read, update and delete any row (inserts stay under the owner policy)."""
    for command_name in ("SELECT", "UPDATE", "DELETE"):
        policy = f"judge_outbox_dispatcher_{command_name.lower()}"
        await conn.execute(text(f"DROP POLICY IF EXISTS {policy} ON {SCHEMA}.judge_outbox"))
        await conn.execute(text(f'CREATE POLICY {policy} ON {SCHEMA}.judge_outbox '
                                f'FOR {command_name} TO "{role}" USING (true)'))


async def _ensure_retention_policies(conn: AsyncConnection, role: str) -> None:
    """The retention sweep claims every user's due runs: on runs only, in a transaction that
    sets RETENTION_SETTING (only the sweep's claim does), the writer role may read and
    update any run. Everything else the sweep does acts for the run's owner."""
    setting = f"current_setting('{RETENTION_SETTING}', true) = '{RETENTION_ON}'"
    for command_name in ("SELECT", "UPDATE"):
        policy = f"runs_retention_{command_name.lower()}"
        check = f" WITH CHECK ({setting})" if command_name == "UPDATE" else ""
        await conn.execute(text(f"DROP POLICY IF EXISTS {policy} ON {SCHEMA}.runs"))
        await conn.execute(text(f'CREATE POLICY {policy} ON {SCHEMA}.runs '
                                f'FOR {command_name} TO "{role}" USING ({setting}){check}'))


def main() -> None:
    """`epochlens-migrate`; a configuration error is one line on stderr and exit status 2."""
    try:
        (settings,) = load_settings(MigrateSettings)
    except StartupError as exc:
        exit_with(exc, "migrate")
    configure_logging("INFO")
    asyncio.run(migrate(settings))


if __name__ == "__main__":
    main()
