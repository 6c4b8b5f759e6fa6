"""judge purged runs (issue 12): PurgeRun's record of the runs whose judge rows it removed

purged_runs: one row per (run, owner) that PurgeRun was called for, written before any row
is removed and kept: a late EnqueueJudging of the run is acknowledged and dropped, and a
worker that judged one of its predictions while the purge ran stores nothing (its settle
checks this table in the same transaction). The owner policy of the other judge tables
applies on PostgreSQL. The restrictive delete policy on judgments (revision 0003) is made
again to let every judgment of a purged run be deleted; scored rule and LLM judgments of
every other run stay immutable.

Revision ID: 0006_purged_runs
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_purged_runs"
down_revision = "0005"
branch_labels = None
depends_on = None

SCHEMA = "judge"
TABLE = "purged_runs"
# Must equal services.common.db.RLS_USER_SETTING (kept literal: migrations are frozen history).
USER_SETTING = "epochlens.user_id"
# epochlens.v1 JudgeType HUMAN and LLM, JudgmentStatus UNSCORED (literal, as above).
HUMAN, LLM, UNSCORED = 3, 2, 2
DELETABLE = "judgments_deletable"
KEPT_BEFORE = f"judge_type = {HUMAN} OR (judge_type = {LLM} AND status = {UNSCORED})"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("purge_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "user_id", name=f"pk_{TABLE}"),
        schema=SCHEMA,
    )
    if op.get_bind().dialect.name == "postgresql":
        qualified = f"{SCHEMA}.{TABLE}"
        check = f"user_id = current_setting('{USER_SETTING}', true)"
        op.execute(f"ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {qualified} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY {TABLE}_owner ON {qualified} "
                   f"USING ({check}) WITH CHECK ({check})")
        purged = (f"EXISTS (SELECT 1 FROM {qualified} AS p WHERE p.run_id = judgments.run_id "
                  "AND p.user_id = judgments.user_id)")
        _deletable(f"{KEPT_BEFORE} OR {purged}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _deletable(KEPT_BEFORE)
    op.drop_table(TABLE, schema=SCHEMA)


def _deletable(using: str) -> None:
    op.execute(f"DROP POLICY IF EXISTS {DELETABLE} ON {SCHEMA}.judgments")
    op.execute(f"CREATE POLICY {DELETABLE} ON {SCHEMA}.judgments AS RESTRICTIVE FOR DELETE "
               f"USING ({using})")
