"""What every service's migrate step shares: upgrading one schema with its own Alembic
environment, and (on PostgreSQL) login roles and table grants."""

import logging
from collections.abc import Awaitable, Callable

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.common.config import DatabaseSettings
from services.common.db import create_engine, is_postgres

log = logging.getLogger(__name__)

RoleStep = Callable[[AsyncConnection], Awaitable[None]]


def alembic_config(script_location: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", script_location)
    return cfg


async def upgrade_schema(settings: DatabaseSettings, schema: str, script_location: str,
                         ensure_roles: RoleStep) -> None:
    """Brings `schema` to its head revision, then runs ensure_roles on PostgreSQL; safe to
    run any number of times."""
    def upgrade(sync_conn: Connection) -> None:
        cfg = alembic_config(script_location)
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, "head")

    engine = create_engine(settings, (schema,), application_name="epochlens-migrate")
    try:
        async with engine.begin() as conn:
            if is_postgres(conn):
                await conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
            await conn.run_sync(upgrade)
            if is_postgres(conn):
                await ensure_roles(conn)
    finally:
        await engine.dispose()
    log.info("schema %s is at head", schema)


async def ensure_login_role(conn: AsyncConnection, role: str, password: str | None) -> None:
    """Creates `role` (LOGIN) when missing and sets its password when one is configured."""
    exists = await conn.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role})
    if not exists:
        await conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
    if password is not None:
        statement = await conn.scalar(text("SELECT format('ALTER ROLE %I PASSWORD %L', :r, :p)"),
                                      {"r": role, "p": password})
        await conn.execute(text(statement))


async def grant_tables(conn: AsyncConnection, schema: str, role: str, password: str | None,
                       grants: dict[str, str]) -> None:
    """Ensures the login role, then grants it USAGE on the schema, SELECT on the schema's
    alembic_version (each service checks at start-up that the schemas it uses are at their
    migration head: services.common.schema_check) and `grants` per table."""
    await ensure_login_role(conn, role, password)
    await conn.execute(text(f'GRANT USAGE ON SCHEMA {schema} TO "{role}"'))
    await conn.execute(text(f'GRANT SELECT ON {schema}.alembic_version TO "{role}"'))
    for table, privileges in grants.items():
        await conn.execute(text(f'GRANT {privileges} ON {schema}.{table} TO "{role}"'))
