"""judge visibility (issue 8): revisions of human judgments

judgments.revision: 1, and for a human judgment its latest revision number.
judgment_revisions: every revision of every human judgment (who, when, what), with the owner
policy of the other tables on PostgreSQL.
On PostgreSQL a restrictive policy lets only human judgments (replaced by their next
revision) and unscored LLM judgments (judged again by ResumeJudging) be deleted: scored rule
and LLM judgments stay immutable whatever the grants (services.judge.migrate grants DELETE).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SCHEMA = "judge"
TABLE = "judgment_revisions"
# Must equal services.common.db.RLS_USER_SETTING (kept literal: migrations are frozen history).
USER_SETTING = "epochlens.user_id"
# epochlens.v1 JudgeType HUMAN and LLM, JudgmentStatus UNSCORED (literal, as above).
HUMAN, LLM, UNSCORED = 3, 2, 2
DELETABLE = "judgments_deletable"


def upgrade() -> None:
    op.add_column("judgments", sa.Column("revision", sa.Integer(), nullable=False,
                                         server_default=sa.text("1")), schema=SCHEMA)
    op.create_table(
        TABLE,
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("sample_index", sa.BigInteger(), nullable=False),
        sa.Column("criterion", sa.Text(), nullable=False),
        sa.Column("author", sa.Text(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("reasoning", sa.Text(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "step", "sample_index", "criterion", "author",
                                "revision", name=f"pk_{TABLE}"),
        schema=SCHEMA,
    )
    if op.get_bind().dialect.name == "postgresql":
        qualified = f"{SCHEMA}.{TABLE}"
        check = f"user_id = current_setting('{USER_SETTING}', true)"
        op.execute(f"ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {qualified} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY {TABLE}_owner ON {qualified} "
                   f"USING ({check}) WITH CHECK ({check})")
        op.execute(f"CREATE POLICY {DELETABLE} ON {SCHEMA}.judgments AS RESTRICTIVE FOR DELETE "
                   f"USING (judge_type = {HUMAN} OR (judge_type = {LLM} AND status = {UNSCORED}))")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP POLICY IF EXISTS {DELETABLE} ON {SCHEMA}.judgments")
    op.drop_table(TABLE, schema=SCHEMA)
    op.drop_column("judgments", "revision", schema=SCHEMA)
