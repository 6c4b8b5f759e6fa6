"""The start-up check of every service: the schemas it uses are at their migration head.

A service on a schema that was never migrated (or migrated by other code) would answer every
call with a database error; it refuses to start instead, saying which command to run. The
head is read from the migration scripts at run time (alembic ScriptDirectory), the current
revision from the schema's own version table (`<schema>.alembic_version`, which the migrate
step lets every service role read).

When PostgreSQL cannot be reached at start-up the check is skipped with a WARNING: the
service starts and its calls are UNAVAILABLE until the database is back, as with an outage
after start. The embedded SQLite store is always reachable, so there any failure refuses.
"""

import logging
from collections.abc import Sequence

from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from services.common.config import DatabaseSettings
from services.common.db import create_engine
from services.common.migrations import alembic_config
from services.common.startup import StartupError

log = logging.getLogger(__name__)

# Where each schema's Alembic scripts live (services.<schema>.migrations).
SCRIPT_LOCATIONS = {"writer": "services.writer:migrations", "judge": "services.judge:migrations"}
VERSION_TABLE = "alembic_version"
MIGRATE_COMMAND = "epochlens-migrate"
# Errors that mean "PostgreSQL cannot be reached" rather than "it answered no".
UNREACHABLE_ERRORS = (OSError, sa_exc.OperationalError, sa_exc.InterfaceError,
                      sa_exc.TimeoutError)


async def open_engine(settings: DatabaseSettings, schemas: tuple[str, ...],
                      read_only: bool = False, application_name: str = "epochlens") -> AsyncEngine:
    """create_engine(), then require_schemas_at_head(); the engine is disposed on failure."""
    engine = create_engine(settings, schemas, read_only=read_only,
                           application_name=application_name)
    try:
        await require_schemas_at_head(engine, schemas)
    except BaseException:
        await engine.dispose()
        raise
    return engine


async def require_schemas_at_head(engine: AsyncEngine, schemas: Sequence[str]) -> None:
    """Raises StartupError unless every schema's revision is its scripts' head."""
    try:
        async with engine.connect() as conn:
            current = {schema: await conn.run_sync(_current_revisions, schema)
                       for schema in schemas}
    except (sa_exc.SQLAlchemyError, OSError) as exc:
        cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if engine.dialect.name == "postgresql" and isinstance(exc, UNREACHABLE_ERRORS):
            log.warning("schemas %s not checked against their migration head: the database "
                        "cannot be reached (%s); calls are UNAVAILABLE until it can",
                        ", ".join(schemas), cause)
            return
        raise StartupError(f"cannot read the migration revision of schema "
                           f"{', '.join(schemas)} ({cause}): run `{MIGRATE_COMMAND}`, which "
                           "also grants each service role read access to it") from exc
    for schema in schemas:
        _require_head(schema, current[schema])
        log.info("schema %s is at its migration head (%s)", schema, ", ".join(current[schema]))


def _current_revisions(conn: Connection, schema: str) -> tuple[str, ...]:
    if not inspect(conn).has_table(VERSION_TABLE, schema=schema):
        return ()
    rows = conn.execute(text(f"SELECT version_num FROM {schema}.{VERSION_TABLE}"))
    return tuple(sorted(row[0] for row in rows))


def script_heads(schema: str) -> tuple[str, ...]:
    """The head revision(s) of `schema`'s migration scripts."""
    script = ScriptDirectory.from_config(alembic_config(SCRIPT_LOCATIONS[schema]))
    return tuple(sorted(script.get_heads()))


def _require_head(schema: str, current: tuple[str, ...]) -> None:
    heads = script_heads(schema)
    if current == heads:
        return
    needs = ", ".join(heads)
    if not current:
        raise StartupError(f"schema {schema} is not migrated (it has no revision), code "
                           f"needs {needs}: run `{MIGRATE_COMMAND}`")
    script = ScriptDirectory.from_config(alembic_config(SCRIPT_LOCATIONS[schema]))
    unknown = [revision for revision in current if not _known(script, revision)]
    at = ", ".join(current)
    if unknown:
        raise StartupError(f"schema {schema} is at revision {at}, which this code does not "
                           f"know (code needs {needs}): run the epochlens version that "
                           "migrated it, or a newer one")
    raise StartupError(f"schema {schema} is at revision {at}, code needs {needs}: "
                       f"run `{MIGRATE_COMMAND}`")


def _known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except CommandError:
        return False
