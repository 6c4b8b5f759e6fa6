"""Deleting a run's rows of one table in bounded chunks, each its own short transaction
(DeleteRun in the writer, PurgeRun in the judge).

Every per-run table's primary key starts with run_id. A chunk is a key range: the key of
the chunk's last row is read first (the run's keys in index order, after the previous
chunk's end, `chunk` of them), then one DELETE removes the run's rows with keys in
(previous end, that key]. The next chunk starts past everything deleted, so no chunk walks
over the dead rows of the earlier ones (a `LIMIT n` subselect without a range reads them
all again each time: quadratic on a run of millions of rows). Row-value comparisons work on
PostgreSQL (an index range scan) and SQLite alike.
"""

import uuid
from collections.abc import Awaitable, Callable

from sqlalchemy import Table, delete, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.common.db import user_transaction

BeforeChunk = Callable[[AsyncConnection], Awaitable[None]]


async def delete_run_rows(engine: AsyncEngine, table: Table, user_id: str, run_id: uuid.UUID,
                          chunk: int, before_chunk: BeforeChunk | None = None) -> int:
    """Removes the user's rows of `run_id` from `table`, `chunk` rows per transaction
    acting for the user (before_chunk runs first in each); returns how many."""
    columns = list(table.primary_key.columns)
    key = tuple_(*columns)
    own = (table.c.run_id == run_id, table.c.user_id == user_id)
    removed, after = 0, None
    while True:
        async with user_transaction(engine, user_id) as conn:
            if before_chunk is not None:
                await before_chunk(conn)
            past = (key > tuple_(*after),) if after is not None else ()
            end = (await conn.execute(select(*columns).where(*own, *past).order_by(*columns)
                                      .offset(chunk - 1).limit(1))).one_or_none()
            upto = (key <= tuple_(*end),) if end is not None else ()
            removed += (await conn.execute(delete(table).where(*own, *past, *upto))).rowcount
        if end is None:
            return removed
        after = tuple(end)
