"""The LLM verdict cache (table judge.llm_cache): replays and repeats cost nothing.

The key is sha256 over the user, the provider and the URL its calls go to, the model, the
prompt template version, the criterion and its rubric, and the item's prompt, ground truth and
prediction (and, for a criterion with a scale of its own, the scale and threshold): everything
the verdict depends on (calls run at temperature 0). The user is part
of the key and of the row (row-level security on PostgreSQL): one user's verdicts are never
another's, so a cache hit says nothing about what others judged. Only parsed verdicts are
cached; a failed or unparseable call is tried again next time.

A row also records what its call cost and the prediction it was made for: a verdict judged
again for that same prediction (its task claimed again after a crash, before its judgments
were stored) carries the cost billed for it, so the run's judgments add up to what was paid.
"""

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.common.db import is_postgres, user_transaction
from services.judge.llm.providers import ParsedVerdict
from services.judge.models import llm_cache_table
from services.judge.schema import Item, LlmJudgeConfig

# Keys per SELECT ... WHERE key IN (...) of one lookup.
LOOKUP_CHUNK = 1000


@dataclass(frozen=True)
class Entry:
    """A cached verdict, what its call billed, and the prediction it was called for (run_id
    None: an ad hoc JudgePredictions item)."""

    key: str
    verdict: ParsedVerdict
    run_id: uuid.UUID | None
    step: int
    sample_index: int
    input_tokens: int
    output_tokens: int
    cost_usd: float

    def paid_for(self, item: Item) -> bool:
        """Whether this entry's call was made for `item` (a stored run's prediction)."""
        return item.run_id is not None and (self.run_id, self.step, self.sample_index) == (
            item.run_id, item.step, item.sample_index)


def cache_key(user_id: str, config: LlmJudgeConfig, endpoint_url: str | None,
              prompt_version: str, criterion: str, rubric: str, item: Item,
              own_scale: tuple[int, int, float] | None = None) -> str:
    """own_scale: (scale_min, scale_max, threshold) of a criterion object, appended to the
    hashed parts (the key of a standard-scale criterion is what it always was)."""
    parts = [user_id, config.provider, endpoint_url, config.model, prompt_version, criterion,
             rubric, item.prompt, item.ground_truth, item.prediction]
    if own_scale is not None:
        parts += list(own_scale)
    return hashlib.sha256(json.dumps(parts, ensure_ascii=True).encode()).hexdigest()


async def lookup(engine: AsyncEngine, user_id: str, keys: Iterable[str]) -> dict[str, Entry]:
    """The user's cached entries of the given keys (missing keys are absent)."""
    wanted = sorted(set(keys))
    found: dict[str, Entry] = {}
    c = llm_cache_table.c
    async with user_transaction(engine, user_id) as conn:
        for start in range(0, len(wanted), LOOKUP_CHUNK):
            chunk = wanted[start:start + LOOKUP_CHUNK]
            rows = await conn.execute(select(
                c.key, c.verdict, c.run_id, c.step, c.sample_index, c.input_tokens,
                c.output_tokens, c.cost_usd).where(c.key.in_(chunk), c.user_id == user_id))
            found.update((row.key, Entry(row.key, _verdict(row.verdict), *row[2:]))
                         for row in rows)
    return found


async def store(conn: AsyncConnection, user_id: str, entries: Sequence[Entry]) -> None:
    """Caches parsed verdicts in one statement (a key stored already keeps its first entry)."""
    now = datetime.now(UTC)
    await conn.execute(insert_ignoring_duplicates(conn, llm_cache_table), [
        {"key": e.key, "user_id": user_id, "verdict": e.verdict.to_json(), "run_id": e.run_id,
         "step": e.step, "sample_index": e.sample_index, "input_tokens": e.input_tokens,
         "output_tokens": e.output_tokens, "cost_usd": e.cost_usd, "create_time": now}
        for e in entries])


def insert_ignoring_duplicates(conn: AsyncConnection, table: Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING on PostgreSQL and SQLite."""
    dialect = postgresql if is_postgres(conn) else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


def _verdict(data: dict[str, Any]) -> ParsedVerdict:
    return ParsedVerdict(float(data["score"]), str(data.get("reasoning", "")),
                         float(data.get("confidence", 0.0)))
