"""Deleting a run's rows of one table in bounded chunks, each its own short transaction
(DeleteRun in the writer, PurgeRun in the judge).

Every per-run table's primary key starts with run_id. A chunk is a key range: the key of
the chunk's last row is read first (the run's keys in index order, after the previous
chunk's end, `chunk` of them), then one DELETE removes the run's rows with keys in
(previous end, that key]. The next chunk starts past everything deleted, so no chunk walks
over the dead rows of the earlier ones (a `LIMIT n` subselect without a range reads them
all again each time: quadratic on a run of millions of rows).

The range compares the key's columns after run_id (`run_id = :id AND (step, ...) > (...)`):
PostgreSQL then starts the index scan at the range's start. Comparing the whole key
(`(run_id, step, ...) > (...)`) lets it start at the run's first entry instead and walk
every dead one. On PostgreSQL each chunk also turns JIT off for its transaction: the
planner cannot tell a chunk is small and compiles the DELETE, which costs more than the
DELETE itself. Row-value comparisons work on SQLite too.
"""

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from sqlalchemy import Table, delete, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.common.db import is_postgres, user_transaction

BeforeChunk = Callable[[AsyncConnection], Awaitable[None]]


async def delete_run_rows(engine: AsyncEngine, table: Table, user_id: str, run_id: uuid.UUID,
                          chunk: int, before_chunk: BeforeChunk | None = None,
                          pause_s: float = 0.0) -> int:
    """Removes the user's rows of `run_id` from `table`, `chunk` rows per transaction
    acting for the user (before_chunk runs first in each; pause_s: sleep between two
    chunks, leaving the database to other work); returns how many."""
    rest = [c for c in table.primary_key.columns if c.name != "run_id"]
    own = (table.c.run_id == run_id, table.c.user_id == user_id)
    removed, after = 0, None
    while True:
        async with user_transaction(engine, user_id) as conn:
            if is_postgres(conn):
                await conn.execute(text("SET LOCAL jit = off"))
            if before_chunk is not None:
                await before_chunk(conn)
            past = (tuple_(*rest) > tuple_(*after),) if after is not None else ()
            end = None
            if rest:  # a table with one row per run (key run_id alone) goes in one chunk
                end = (await conn.execute(select(*rest).where(*own, *past).order_by(*rest)
                                          .offset(chunk - 1).limit(1))).one_or_none()
            upto = (tuple_(*rest) <= tuple_(*end),) if end is not None else ()
            removed += (await conn.execute(delete(table).where(*own, *past, *upto))).rowcount
        if end is None:
            return removed
        after = tuple(end)
        if pause_s > 0:
            await asyncio.sleep(pause_s)
