"""What the judge reads of the writer's store (schema `writer`), always acting for one user, so
the writer's row-level security applies on PostgreSQL: whether a run is the user's, and the
stored text of the user's predictions.

Every judge RPC that names a run checks it here first: another user's run and a run that does
not exist are the same NOT_FOUND, so a caller never learns whether someone else's run exists.
The judged text of a prediction the writer stores is always the stored one (read again when
the task is judged), never what a caller sent.
"""

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.common.db import user_transaction
from services.common.errors import NotFound
from services.writer.models import live_run, prediction_texts, runs_table

Key = tuple[int, int]  # (step, sample_index)


@dataclass(frozen=True)
class StoredText:
    """A prediction as the writer stored it: what the judge judges."""

    epoch: int
    prompt: str
    ground_truth: str | None
    prediction: str


async def owned_runs(conn: AsyncConnection, user_id: str,
                     run_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
    """The runs among `run_ids` that exist and belong to `user_id`."""
    wanted = sorted(set(run_ids))
    if not wanted:
        return set()
    r = runs_table
    return set(await conn.scalars(select(r.c.id).where(r.c.id.in_(wanted),
                                                       r.c.user_id == user_id, live_run())))


async def require_runs(engine: AsyncEngine, user_id: str,
                       run_ids: Iterable[uuid.UUID]) -> None:
    """NOT_FOUND naming the first of `run_ids` that is not the user's (missing or another
    user's: the same answer)."""
    wanted = sorted(set(run_ids))
    async with user_transaction(engine, user_id) as conn:
        owned = await owned_runs(conn, user_id, wanted)
    for run_id in wanted:
        if run_id not in owned:
            raise NotFound(f"run {run_id} not found", {"run_id": str(run_id)})


async def stored_texts(conn: AsyncConnection, user_id: str, run_id: uuid.UUID,
                       keys: Sequence[Key]) -> dict[Key, StoredText]:
    """The stored text of the user's predictions of `run_id` among `keys` (absent: not in
    the writer's store)."""
    if not keys:
        return {}
    p = prediction_texts
    rows = await conn.execute(select(
        p.c.step, p.c.sample_index, p.c.epoch, p.c.prompt, p.c.ground_truth, p.c.prediction,
    ).where(p.c.run_id == run_id, p.c.user_id == user_id,
            tuple_(p.c.step, p.c.sample_index).in_(sorted(set(keys)))))
    return {(row.step, row.sample_index): StoredText(row.epoch, row.prompt, row.ground_truth,
                                                     row.prediction) for row in rows}


async def texts_by_run(engine: AsyncEngine, user_id: str,
                       keys: dict[uuid.UUID, list[Key]]) -> dict[uuid.UUID, dict[Key, StoredText]]:
    """stored_texts() of several runs of one user, in one transaction."""
    async with user_transaction(engine, user_id) as conn:
        return {run_id: await stored_texts(conn, user_id, run_id, run_keys)
                for run_id, run_keys in keys.items()}


async def run_judge_section(engine: AsyncEngine, user_id: str, run_id: uuid.UUID) -> Any:
    """The "judge" section of the user's run's stored config as stored (any JSON value; None
    when the run has none, or is not the user's: the caller's later check says NOT_FOUND)."""
    r = runs_table
    async with user_transaction(engine, user_id) as conn:
        config = await conn.scalar(select(r.c.config).where(r.c.id == run_id,
                                                            r.c.user_id == user_id, live_run()))
    return config.get("judge") if isinstance(config, dict) else None
