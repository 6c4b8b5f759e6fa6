"""Migration 0007 moves the prompts and ground truths of predictions stored before samples
existed into writer.samples (one row per run and sample), keeps the own text of rows that
disagree with their sample, and drops the columns; and back. On PostgreSQL and SQLite."""

import uuid
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import select

from services.common.db import create_engine
from services.common.migrations import alembic_config
from services.writer.config import MigrateSettings
from services.writer.models import SCHEMA, prediction_texts, samples_table
from tests.conftest import PG_ADMIN, migrated_database, pg_url

BEFORE = "0006_run_kind"
RUN_A, RUN_B = uuid.UUID(int=1), uuid.UUID(int=2)

# writer.predictions as revision 0006 has it.
OLD_PREDICTIONS = sa.Table(
    "predictions", sa.MetaData(schema=SCHEMA),
    sa.Column("run_id", sa.Uuid(), primary_key=True),
    sa.Column("step", sa.BigInteger(), primary_key=True),
    sa.Column("sample_index", sa.BigInteger(), primary_key=True),
    sa.Column("user_id", sa.Text()), sa.Column("epoch", sa.BigInteger()),
    sa.Column("prompt", sa.Text()), sa.Column("ground_truth", sa.Text()),
    sa.Column("prediction", sa.Text()), sa.Column("generation_time_ms", sa.Float()),
    sa.Column("prompt_tokens", sa.Integer()), sa.Column("completion_tokens", sa.Integer()),
    sa.Column("create_time", sa.DateTime(timezone=True)))

# (run, step, sample_index, prompt, ground truth): sample 1 of run A has another text at
# step 20 (and no ground truth there); sample 0 of run B has no ground truth at all.
ROWS = [(RUN_A, step, index, f"p{index}", f"t{index}") for step in (10, 20, 30)
        for index in (0, 1, 2) if (step, index) != (20, 1)]
ROWS += [(RUN_A, 20, 1, "p1 changed", None), (RUN_B, 5, 0, "b0", None), (RUN_B, 7, 0, "b0", None)]


def _old_row(run_id, step, index, prompt, truth) -> dict:
    return {"run_id": run_id, "step": step, "sample_index": index, "user_id": "alice",
            "epoch": step // 10, "prompt": prompt, "ground_truth": truth,
            "prediction": f"out {step}/{index}", "generation_time_ms": 1.0,
            "prompt_tokens": None, "completion_tokens": None, "create_time": datetime.now(UTC)}


async def _alembic(engine, action: str, revision: str) -> None:
    cfg = alembic_config("services.writer:migrations")

    def act(sync_conn) -> None:
        cfg.attributes["connection"] = sync_conn
        getattr(command, action)(cfg, revision)
    async with engine.begin() as conn:
        await conn.run_sync(act)


async def _check_round_trip(settings: MigrateSettings) -> None:
    engine = create_engine(settings, (SCHEMA,))
    try:
        await _alembic(engine, "upgrade", "head")
        await _alembic(engine, "downgrade", BEFORE)
        async with engine.begin() as conn:
            await conn.execute(OLD_PREDICTIONS.insert(), [_old_row(*row) for row in ROWS])
        await _alembic(engine, "upgrade", "head")
        async with engine.connect() as conn:
            samples = (await conn.execute(select(
                samples_table.c.run_id, samples_table.c.sample_index, samples_table.c.prompt,
                samples_table.c.ground_truth).order_by("run_id", "sample_index"))).all()
            texts = (await conn.execute(select(
                prediction_texts.c.run_id, prediction_texts.c.step,
                prediction_texts.c.sample_index, prediction_texts.c.prompt,
                prediction_texts.c.ground_truth))).all()
            own = await conn.scalar(sa.text(
                f"SELECT count(*) FROM {SCHEMA}.predictions WHERE legacy_prompt IS NOT NULL"))
        assert [tuple(s) for s in samples] == [(RUN_A, 0, "p0", "t0"), (RUN_A, 1, "p1", "t1"),
                                               (RUN_A, 2, "p2", "t2"), (RUN_B, 0, "b0", None)]
        assert sorted(tuple(t) for t in texts) == sorted(ROWS)
        assert own == 1
        await _alembic(engine, "downgrade", BEFORE)
        async with engine.connect() as conn:
            back = (await conn.execute(select(
                OLD_PREDICTIONS.c.run_id, OLD_PREDICTIONS.c.step, OLD_PREDICTIONS.c.sample_index,
                OLD_PREDICTIONS.c.prompt, OLD_PREDICTIONS.c.ground_truth))).all()
        assert sorted(tuple(b) for b in back) == sorted(ROWS)
        await _alembic(engine, "upgrade", "head")
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
async def test_migration_moves_texts_to_samples_and_back(backend, tmp_path):
    if backend == "sqlite":
        await _check_round_trip(MigrateSettings(sqlite_dir=tmp_path, _env_file=None))
        return
    async with migrated_database("samples") as name:
        await _check_round_trip(MigrateSettings(database_url=pg_url(PG_ADMIN, name),
                                                _env_file=None))
