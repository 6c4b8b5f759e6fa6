"""metrics: training scalars per (run, step, name), with row-level security on PostgreSQL

Immutable like predictions: the first value written for a (run_id, step, name) key stays; a
replay of the same key is a no-op and a different value for it is refused by the writer
(reported per key, never stored). Role grants (writer SELECT, INSERT; reader SELECT) are
made by the migrate step (services.writer.migrate) like for the other tables.

Revision ID: 0003_metrics
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_metrics"
down_revision = "0002"
branch_labels = None
depends_on = None

SCHEMA = "writer"
TABLE = "metrics"
# Must equal services.common.db.RLS_USER_SETTING (kept literal: migrations are frozen history).
USER_SETTING = "epochlens.user_id"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("value", sa.Float(precision=53), nullable=False),
        sa.Column("epoch", sa.Float(precision=53), nullable=True),
        sa.Column("wall_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "step", "name", name=f"pk_{TABLE}"),
        schema=SCHEMA,
    )
    # ListMetrics reads one name's series in step order.
    op.create_index(f"ix_{TABLE}_run_id_name_step", TABLE, ["run_id", "name", "step"],
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
