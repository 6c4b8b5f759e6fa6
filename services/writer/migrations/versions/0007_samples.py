"""samples: each (run, sample_index) prompt and ground truth stored once in writer.samples;
predictions keep only what changes between epochs

Existing data moves: one sample row per (run, sample_index), with the text of the sample's
prediction at its lowest step. A stored prediction whose text differs from that (possible
before this revision, refused after it) keeps its own text in the nullable columns
predictions.legacy_prompt / legacy_ground_truth, which readers prefer when legacy_prompt is
set (services.writer.models.prediction_texts); every other row leaves them NULL (no bytes
on disk). Then predictions.prompt and predictions.ground_truth are dropped. Row-level
security on samples like on predictions; role grants are made by the migrate step.

Revision ID: 0007_samples
Revises: 0006_run_kind
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_samples"
down_revision = "0006_run_kind"
branch_labels = None
depends_on = None

SCHEMA = "writer"
TABLE = "samples"
# Must equal services.common.db.RLS_USER_SETTING (kept literal: migrations are frozen history).
USER_SETTING = "epochlens.user_id"
PREDICTIONS = f"{SCHEMA}.predictions"
SAMPLES = f"{SCHEMA}.{TABLE}"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("sample_index", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("ground_truth", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "sample_index", name=f"pk_{TABLE}"),
        schema=SCHEMA,
    )
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        check = f"user_id = current_setting('{USER_SETTING}', true)"
        op.execute(f"ALTER TABLE {SAMPLES} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {SAMPLES} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY {TABLE}_owner ON {SAMPLES} "
                   f"USING ({check}) WITH CHECK ({check})")
    with op.batch_alter_table("predictions", schema=SCHEMA) as batch:
        batch.add_column(sa.Column("legacy_prompt", sa.Text(), nullable=True))
        batch.add_column(sa.Column("legacy_ground_truth", sa.Text(), nullable=True))
    _move_texts(postgres)
    with op.batch_alter_table("predictions", schema=SCHEMA) as batch:
        batch.drop_column("prompt")
        batch.drop_column("ground_truth")


def _move_texts(postgres: bool) -> None:
    """One sample per (run, sample_index) from its lowest step, then the own text of the
    predictions that disagree with it."""
    op.execute(
        f"INSERT INTO {SAMPLES} (run_id, sample_index, user_id, prompt, ground_truth) "
        f"SELECT p.run_id, p.sample_index, p.user_id, p.prompt, p.ground_truth "
        f"FROM {PREDICTIONS} p WHERE p.step = (SELECT min(q.step) FROM {PREDICTIONS} q "
        f"WHERE q.run_id = p.run_id AND q.sample_index = p.sample_index)")
    differs = "IS DISTINCT FROM" if postgres else "IS NOT"
    op.execute(
        f"UPDATE {PREDICTIONS} SET legacy_prompt = prompt, legacy_ground_truth = ground_truth "
        f"WHERE EXISTS (SELECT 1 FROM {SAMPLES} s WHERE s.run_id = {PREDICTIONS}.run_id "
        f"AND s.sample_index = {PREDICTIONS}.sample_index AND (s.prompt <> "
        f"{PREDICTIONS}.prompt OR s.ground_truth {differs} {PREDICTIONS}.ground_truth))")


def downgrade() -> None:
    with op.batch_alter_table("predictions", schema=SCHEMA) as batch:
        batch.add_column(sa.Column("prompt", sa.Text(), nullable=True))
        batch.add_column(sa.Column("ground_truth", sa.Text(), nullable=True))
    own = f"{PREDICTIONS}.legacy_prompt IS NOT NULL"
    sample = (f"FROM {SAMPLES} s WHERE s.run_id = {PREDICTIONS}.run_id "
              f"AND s.sample_index = {PREDICTIONS}.sample_index")
    op.execute(
        f"UPDATE {PREDICTIONS} SET "
        f"prompt = CASE WHEN {own} THEN legacy_prompt ELSE (SELECT s.prompt {sample}) END, "
        f"ground_truth = CASE WHEN {own} THEN legacy_ground_truth "
        f"ELSE (SELECT s.ground_truth {sample}) END")
    with op.batch_alter_table("predictions", schema=SCHEMA) as batch:
        batch.alter_column("prompt", existing_type=sa.Text(), nullable=False)
        batch.drop_column("legacy_prompt")
        batch.drop_column("legacy_ground_truth")
    op.drop_table(TABLE, schema=SCHEMA)
