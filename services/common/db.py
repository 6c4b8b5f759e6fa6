"""Database engines and user-scoped transactions.

PostgreSQL (asyncpg) is the production store; every transaction first sets
the caller's user id so row-level security policies see it. Without a
database URL the embedded SQLite store is used: one file per schema, attached
to every connection under the schema's name, so `writer.predictions` resolves
on both backends.
"""

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from services.common.config import DatabaseSettings

log = logging.getLogger(__name__)

# Name of the PostgreSQL setting the RLS policies compare user_id with.
RLS_USER_SETTING = "epochlens.user_id"


def sqlite_schema_file(sqlite_dir: Path, schema: str) -> Path:
    return sqlite_dir / f"{schema}.db"


def create_engine(settings: DatabaseSettings, schemas: tuple[str, ...],
                  read_only: bool = False, application_name: str = "epochlens") -> AsyncEngine:
    """Engine for settings.database_url, or the embedded SQLite store with `schemas` attached."""
    if settings.database_url:
        return create_async_engine(
            settings.database_url, pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow, pool_timeout=settings.db_pool_timeout_s,
            pool_pre_ping=True,
            connect_args={"timeout": settings.db_connect_timeout_s,
                          "server_settings": {"application_name": application_name},
                          **statement_cache_args(settings.db_statement_cache_size)},
        )
    return _create_sqlite_engine(settings, schemas, read_only)


def statement_cache_args(size: int) -> dict[str, Any]:
    """asyncpg connect arguments of a prepared statement cache of `size` per connection.
    0 (PgBouncer in transaction pooling mode, where consecutive transactions of one client
    connection may run on different server connections): no cache in SQLAlchemy or asyncpg,
    and every statement SQLAlchemy prepares gets a name of its own, so two clients sharing a
    server connection never collide on asyncpg's numbered names."""
    args: dict[str, Any] = {"statement_cache_size": size, "prepared_statement_cache_size": size}
    if size == 0:
        args["prepared_statement_name_func"] = _unique_statement_name
    return args


def _unique_statement_name() -> str:
    return f"__epochlens_{uuid.uuid4().hex}__"


def _create_sqlite_engine(settings: DatabaseSettings, schemas: tuple[str, ...],
                          read_only: bool) -> AsyncEngine:
    settings.sqlite_dir.mkdir(parents=True, exist_ok=True)
    main_file = settings.sqlite_dir / "main.db"
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{main_file}", pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow, pool_timeout=settings.db_pool_timeout_s,
        connect_args={"timeout": settings.sqlite_busy_timeout_ms / 1000},
    )
    files = {schema: sqlite_schema_file(settings.sqlite_dir, schema) for schema in schemas}

    @event.listens_for(engine.sync_engine, "connect")
    def _attach(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        for schema, path in files.items():
            quoted = str(path).replace("'", "''")
            cursor.execute(f"ATTACH DATABASE '{quoted}' AS {schema}")
            cursor.execute(f"PRAGMA {schema}.journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={settings.sqlite_busy_timeout_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        if read_only:
            cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    return engine


def is_postgres(conn: AsyncConnection | AsyncEngine) -> bool:
    return conn.dialect.name == "postgresql"


@asynccontextmanager
async def setting_transaction(engine: AsyncEngine, name: str,
                              value: str) -> AsyncIterator[AsyncConnection]:
    """One transaction with the setting `name` = `value` for its duration on PostgreSQL
    (what the RLS policies read); SQLite has no policies and no settings."""
    async with engine.begin() as conn:
        if is_postgres(conn):
            await conn.execute(text("SELECT set_config(:name, :value, true)"),
                               {"name": name, "value": value})
        yield conn


def user_transaction(engine: AsyncEngine,
                     user_id: str) -> AbstractAsyncContextManager[AsyncConnection]:
    """One transaction acting for `user_id`; on PostgreSQL the RLS policies see that user."""
    return setting_transaction(engine, RLS_USER_SETTING, user_id)
