"""judge outbox: predictions committed and not yet handed to the judge service

Row-level security like the other tables (owner policy). The writer role also gets
permissive SELECT/UPDATE/DELETE policies on this table only, so that its dispatcher sees
every user's pending rows; those are created by the migrate step (services.writer.migrate)
once the role exists, because the role name is a setting of that step.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SCHEMA = "writer"
TABLE = "judge_outbox"
# Must equal services.common.db.RLS_USER_SETTING (kept literal: migrations are frozen history).
USER_SETTING = "epochlens.user_id"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("sample_index", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "step", "sample_index", name=f"pk_{TABLE}"),
        schema=SCHEMA,
    )
    op.create_index(f"ix_{TABLE}_next_attempt_time", TABLE, ["next_attempt_time"],
                    schema=SCHEMA)
    if op.get_bind().dialect.name == "postgresql":
        qualified = f"{SCHEMA}.{TABLE}"
        check = f"user_id = current_setting('{USER_SETTING}', true)"
        op.execute(f"ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {qualified} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY {TABLE}_owner ON {qualified} "
                   f"USING ({check}) WITH CHECK ({check})")


def downgrade() -> None:
    op.drop_table(TABLE, schema=SCHEMA)
