"""runs, predictions and per-epoch summaries, with row-level security on PostgreSQL

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA = "writer"
RLS_TABLES = ("runs", "predictions", "epochs")
# Must equal services.common.db.RLS_USER_SETTING (kept literal: migrations are frozen history).
USER_SETTING = "epochlens.user_id"


def upgrade() -> None:
    _create_runs()
    _create_predictions()
    _create_epochs()
    if op.get_bind().dialect.name == "postgresql":
        for table in RLS_TABLES:
            _enable_rls(table)


def _create_runs() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("model_name", sa.Text(), nullable=False),
        sa.Column("dataset_name", sa.Text(), nullable=False),
        sa.Column("config", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finish_time", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("user_id", "request_id", name="uq_runs_user_id_request_id"),
        schema=SCHEMA,
    )
    op.create_index("ix_runs_user_id_create_time_id", "runs",
                    ["user_id", "create_time", "id"], schema=SCHEMA)


def _create_predictions() -> None:
    op.create_table(
        "predictions",
        sa.Column("run_id", sa.Uuid(), primary_key=True),
        sa.Column("step", sa.BigInteger(), primary_key=True),
        sa.Column("sample_index", sa.BigInteger(), primary_key=True),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("ground_truth", sa.Text(), nullable=True),
        sa.Column("prediction", sa.Text(), nullable=False),
        sa.Column("generation_time_ms", sa.Float(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "step", "sample_index", name="pk_predictions"),
        schema=SCHEMA,
    )
    op.create_index("ix_predictions_run_id_epoch_step_sample_index", "predictions",
                    ["run_id", "epoch", "step", "sample_index"], schema=SCHEMA)
    op.create_index("ix_predictions_run_id_sample_index_step", "predictions",
                    ["run_id", "sample_index", "step"], schema=SCHEMA)


def _create_epochs() -> None:
    op.create_table(
        "epochs",
        sa.Column("run_id", sa.Uuid(), sa.ForeignKey(f"{SCHEMA}.runs.id", ondelete="CASCADE",
                  name="fk_epochs_run_id_runs"), primary_key=True),
        sa.Column("epoch", sa.BigInteger(), primary_key=True),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("prediction_count", sa.BigInteger(), nullable=False),
        sa.Column("latest_step", sa.BigInteger(), nullable=False),
        sa.Column("first_create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "epoch", name="pk_epochs"),
        schema=SCHEMA,
    )


def _enable_rls(table: str) -> None:
    qualified = f"{SCHEMA}.{table}"
    check = f"user_id = current_setting('{USER_SETTING}', true)"
    op.execute(f"ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {qualified} FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY {table}_owner ON {qualified} USING ({check}) WITH CHECK ({check})")


def downgrade() -> None:
    op.drop_table("epochs", schema=SCHEMA)
    op.drop_table("predictions", schema=SCHEMA)
    op.drop_table("runs", schema=SCHEMA)
