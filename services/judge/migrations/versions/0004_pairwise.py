"""judge pairwise (issue 11): the pairwise judging queue and its results

pairwise_tasks: one candidate prediction waiting for its pairwise judging (identity = the
prediction's), with the queue's state, attempts and lease as judge.tasks has them.
pairwise_results: one pair's outcome (win, loss, tie, unscored from the candidate's side),
both orders' raw answers and reasons, position bias, cost; one row per (prediction,
criterion, judge model).
Both have the owner policy of the other judge tables on PostgreSQL; the judge role's
permissive worker policy on pairwise_tasks and the grants are in services.judge.migrate.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SCHEMA = "judge"
TASKS = "pairwise_tasks"
RESULTS = "pairwise_results"
# Must equal services.common.db.RLS_USER_SETTING (kept literal: migrations are frozen history).
USER_SETTING = "epochlens.user_id"
JSON_TYPE = sa.JSON().with_variant(JSONB(), "postgresql")


def _identity() -> list[sa.Column]:
    return [sa.Column("run_id", sa.Uuid(), nullable=False),
            sa.Column("step", sa.BigInteger(), nullable=False),
            sa.Column("sample_index", sa.BigInteger(), nullable=False)]


def _create_tasks() -> None:
    op.create_table(
        TASKS, *_identity(),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("baseline_run_id", sa.Uuid(), nullable=False),
        sa.Column("baseline_epoch", sa.BigInteger(), nullable=True),
        sa.Column("config", JSON_TYPE, nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "step", "sample_index", name=f"pk_{TASKS}"),
        schema=SCHEMA,
    )
    op.create_index(f"ix_{TASKS}_state_not_before", TASKS, ["state", "not_before"],
                    schema=SCHEMA)


def _create_results() -> None:
    op.create_table(
        RESULTS, *_identity(),
        sa.Column("criterion", sa.Text(), nullable=False),
        sa.Column("judge_model", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("baseline_run_id", sa.Uuid(), nullable=False),
        sa.Column("baseline_epoch", sa.BigInteger(), nullable=False),
        sa.Column("baseline_step", sa.BigInteger(), nullable=True),
        sa.Column("baseline_sample_index", sa.BigInteger(), nullable=True),
        sa.Column("outcome", sa.SmallInteger(), nullable=False),
        sa.Column("answer_1", sa.Text(), nullable=False),
        sa.Column("answer_2", sa.Text(), nullable=False),
        sa.Column("reason_1", sa.Text(), nullable=False),
        sa.Column("reason_2", sa.Text(), nullable=False),
        sa.Column("position_bias", sa.Boolean(), nullable=False),
        sa.Column("unscored_reason", sa.Text(), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("prompt_version", sa.Text(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "step", "sample_index", "criterion", "judge_model",
                                name=f"pk_{RESULTS}"),
        schema=SCHEMA,
    )
    op.create_index(f"ix_{RESULTS}_run_id_epoch_criterion", RESULTS,
                    ["run_id", "epoch", "criterion"], schema=SCHEMA)


def upgrade() -> None:
    _create_tasks()
    _create_results()
    if op.get_bind().dialect.name == "postgresql":
        check = f"user_id = current_setting('{USER_SETTING}', true)"
        for table in (TASKS, RESULTS):
            qualified = f"{SCHEMA}.{table}"
            op.execute(f"ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY")
            op.execute(f"ALTER TABLE {qualified} FORCE ROW LEVEL SECURITY")
            op.execute(f"CREATE POLICY {table}_owner ON {qualified} "
                       f"USING ({check}) WITH CHECK ({check})")


def downgrade() -> None:
    op.drop_table(RESULTS, schema=SCHEMA)
    op.drop_table(TASKS, schema=SCHEMA)
