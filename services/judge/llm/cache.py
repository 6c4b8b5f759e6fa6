"""The LLM verdict cache (table judge.llm_cache): replays and repeats cost nothing.

The key is sha256 over the provider (and base URL of an OpenAI-compatible server), the model,
the prompt template version, the criterion and its rubric, and the item's prompt, ground truth
and prediction: everything the verdict depends on (calls run at temperature 0). Only parsed
verdicts are cached; a failed or unparseable call is tried again next time.
"""

import hashlib
import json
from collections.abc import Iterable, Sequence
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


def cache_key(config: LlmJudgeConfig, prompt_version: str, criterion: str, rubric: str,
              item: Item) -> str:
    base_url = config.base_url if config.provider == "openai_compatible" else None
    parts = [config.provider, base_url, config.model, prompt_version, criterion, rubric,
             item.prompt, item.ground_truth, item.prediction]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=True).encode()).hexdigest()


async def lookup(engine: AsyncEngine, user_id: str,
                 keys: Iterable[str]) -> dict[str, ParsedVerdict]:
    """Cached verdicts of the given keys (missing keys are absent)."""
    wanted = sorted(set(keys))
    found: dict[str, ParsedVerdict] = {}
    async with user_transaction(engine, user_id) as conn:
        for start in range(0, len(wanted), LOOKUP_CHUNK):
            chunk = wanted[start:start + LOOKUP_CHUNK]
            rows = await conn.execute(select(llm_cache_table.c.key, llm_cache_table.c.verdict)
                                      .where(llm_cache_table.c.key.in_(chunk)))
            found.update((key, _verdict(data)) for key, data in rows)
    return found


async def store(conn: AsyncConnection, entries: Sequence[tuple[str, ParsedVerdict]]) -> None:
    """Caches parsed verdicts in one statement (a key stored already keeps its first verdict)."""
    now = datetime.now(UTC)
    await conn.execute(insert_ignoring_duplicates(conn, llm_cache_table), [
        {"key": key, "verdict": verdict.to_json(), "create_time": now}
        for key, verdict in entries])


def insert_ignoring_duplicates(conn: AsyncConnection, table: Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING on PostgreSQL and SQLite."""
    dialect = postgresql if is_postgres(conn) else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


def _verdict(data: dict[str, Any]) -> ParsedVerdict:
    return ParsedVerdict(float(data["score"]), str(data.get("reasoning", "")),
                         float(data.get("confidence", 0.0)))
