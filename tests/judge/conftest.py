"""Fixtures of the judge tests: a judge database of this package's own (the shared stack's
judge server runs workers that would claim these tests' tasks), on PostgreSQL as the judge
role and on embedded SQLite, emptied before each test."""

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.common.config import DatabaseSettings
from services.common.db import create_engine
from services.judge.config import JudgeSettings
from services.judge.models import SCHEMA
from services.judge.schema import Item
from services.writer.config import MigrateSettings
from services.writer.migrate import migrate
from services.writer.models import predictions_table, runs_table, samples_table
from tests.conftest import JUDGE_ROLE, PG_ADMIN, migrated_database, pg_url

TABLES = ("judgments", "tasks", "llm_cache", "run_llm_state", "judgment_revisions")


@dataclass
class JudgeDb:
    """A migrated judge schema: settings for a judge on it, and an admin engine to inspect
    (and empty) it without row-level security."""

    backend: str
    database: str | None
    sqlite_dir: Path | None
    admin: AsyncEngine

    def settings(self, **overrides: Any) -> JudgeSettings:
        where: dict[str, Any] = ({"database_url": pg_url(JUDGE_ROLE, self.database)}
                                 if self.database else {"sqlite_dir": self.sqlite_dir})
        return JudgeSettings(**{"port": 0, "_env_file": None, "worker_count": 0,
                                "shutdown_grace_s": 0.5, **where, **overrides})

    def engine(self) -> AsyncEngine:
        """An engine as the judge service has it (the judge role on PostgreSQL; schema
        writer attached on SQLite, as services.judge.server does)."""
        return create_engine(self.settings(), (SCHEMA, "writer"))

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        async with self.admin.connect() as conn:
            return list((await conn.execute(text(sql), params)).all())

    async def scalar(self, sql: str, **params: Any) -> Any:
        async with self.admin.connect() as conn:
            return await conn.scalar(text(sql), params)

    async def create_run(self, user: str, run_id: uuid.UUID | None = None,
                         predictions: Sequence[Item] = ()) -> uuid.UUID:
        """A run of `user` in the writer's store (the judge only judges its callers' own
        runs), with `predictions` stored as the writer stores them."""
        run_id = run_id or uuid.uuid4()
        now = datetime.now(UTC)
        async with self.admin.begin() as conn:
            await conn.execute(insert(runs_table).values(
                id=run_id, user_id=user, name=f"run {run_id}", model_name="m",
                dataset_name="d", config={}, state=1, request_id=None, create_time=now,
                finish_time=None))
            if predictions:
                samples = {p.sample_index: p for p in predictions}
                await conn.execute(insert(samples_table), [
                    {"run_id": run_id, "sample_index": index, "user_id": user,
                     "prompt": p.prompt, "ground_truth": p.ground_truth}
                    for index, p in samples.items()])
                await conn.execute(insert(predictions_table), [
                    {"run_id": run_id, "step": p.step, "sample_index": p.sample_index,
                     "user_id": user, "epoch": p.epoch, "prediction": p.prediction,
                     "generation_time_ms": 1.0, "prompt_tokens": None,
                     "completion_tokens": None, "create_time": now} for p in predictions])
        return run_id


@pytest.fixture(scope="session")
async def judge_pg_database() -> AsyncIterator[str]:
    async with migrated_database("judge") as name:
        yield name


@pytest.fixture(scope="session")
async def judge_sqlite_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("judge-sqlite")
    await migrate(MigrateSettings(sqlite_dir=path, _env_file=None))
    return path


@pytest.fixture(params=["postgres", "sqlite"])
async def judge_db(request, judge_pg_database, judge_sqlite_dir) -> AsyncIterator[JudgeDb]:
    """The judge schema on each backend, empty at the start of the test."""
    if request.param == "postgres":
        settings = DatabaseSettings(database_url=pg_url(PG_ADMIN, judge_pg_database),
                                    _env_file=None)
        db = JudgeDb("postgres", judge_pg_database, None,
                     create_engine(settings, (SCHEMA, "writer")))
    else:
        settings = DatabaseSettings(sqlite_dir=judge_sqlite_dir, _env_file=None)
        db = JudgeDb("sqlite", None, judge_sqlite_dir,
                     create_engine(settings, (SCHEMA, "writer")))
    async with db.admin.begin() as conn:
        for table in TABLES:
            await conn.execute(text(f"DELETE FROM {SCHEMA}.{table}"))
    yield db
    await db.admin.dispose()


def make_items(count: int, run_id: uuid.UUID | None = None, epoch: int = 1,
               **overrides: Any) -> list[Item]:
    """Items with a ground truth: prediction i equals its ground truth when i is even."""
    out = []
    for index in range(count):
        fields: dict[str, Any] = {
            "run_id": run_id, "step": epoch * 10, "sample_index": index, "epoch": epoch,
            "prompt": f"Reverse the words: alpha beta {index}",
            "ground_truth": f"{index} beta alpha",
            "prediction": f"{index} beta alpha" if index % 2 == 0 else f"alpha {index} beta"}
        fields.update(overrides)
        out.append(Item(**fields))
    return out
