"""judge tasks, judgments, LLM cache and per-run LLM state, with row-level security on PostgreSQL

Revision ID: 0001
Revises:
Create Date: 2026-11-26

The permissive policy that lets the judge role's workers claim every user's tasks names the
role, which comes from the migrate settings: services.judge.migrate creates it after this.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA = "judge"
RLS_TABLES = ("tasks", "judgments", "run_llm_state")
# Must equal services.common.db.RLS_USER_SETTING (kept literal: migrations are frozen history).
USER_SETTING = "epochlens.user_id"
JSON_TYPE = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    _create_tasks()
    _create_judgments()
    _create_llm_cache()
    _create_run_llm_state()
    if op.get_bind().dialect.name == "postgresql":
        for table in RLS_TABLES:
            _enable_rls(table)


def _identity() -> list[sa.Column]:
    return [sa.Column("run_id", sa.Uuid(), nullable=False),
            sa.Column("step", sa.BigInteger(), nullable=False),
            sa.Column("sample_index", sa.BigInteger(), nullable=False)]


def _create_tasks() -> None:
    op.create_table(
        "tasks", *_identity(),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("ground_truth", sa.Text(), nullable=True),
        sa.Column("prediction", sa.Text(), nullable=False),
        sa.Column("config", JSON_TYPE, nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "step", "sample_index", name="pk_tasks"),
        schema=SCHEMA,
    )
    op.create_index("ix_tasks_state_not_before", "tasks", ["state", "not_before"], schema=SCHEMA)


def _create_judgments() -> None:
    op.create_table(
        "judgments", *_identity(),
        sa.Column("criterion", sa.Text(), nullable=False),
        sa.Column("judge_type", sa.SmallInteger(), nullable=False),
        sa.Column("judge_model", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("reasoning", sa.Text(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("unscored_reason", sa.Text(), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("prompt_version", sa.Text(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "step", "sample_index", "criterion", "judge_type",
                                "judge_model", name="pk_judgments"),
        schema=SCHEMA,
    )
    op.create_index("ix_judgments_run_id_epoch_criterion", "judgments",
                    ["run_id", "epoch", "criterion"], schema=SCHEMA)
    op.create_index("ix_judgments_run_id_sample_index_step", "judgments",
                    ["run_id", "sample_index", "step"], schema=SCHEMA)


def _create_llm_cache() -> None:
    op.create_table(
        "llm_cache",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("verdict", JSON_TYPE, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_llm_cache"),
        schema=SCHEMA,
    )


def _create_run_llm_state() -> None:
    op.create_table(
        "run_llm_state",
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("budget_usd", sa.Float(), nullable=False),
        sa.Column("spent_usd", sa.Float(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("budget_exhausted", sa.Boolean(), nullable=False),
        sa.Column("paused_reason", sa.Text(), nullable=True),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name="pk_run_llm_state"),
        schema=SCHEMA,
    )


def _enable_rls(table: str) -> None:
    qualified = f"{SCHEMA}.{table}"
    check = f"user_id = current_setting('{USER_SETTING}', true)"
    op.execute(f"ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {qualified} FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY {table}_owner ON {qualified} USING ({check}) WITH CHECK ({check})")


def downgrade() -> None:
    op.drop_table("run_llm_state", schema=SCHEMA)
    op.drop_table("llm_cache", schema=SCHEMA)
    op.drop_table("judgments", schema=SCHEMA)
    op.drop_table("tasks", schema=SCHEMA)
