"""metric_rollups: per (run, name, width, bucket of steps) the count, minimum, maximum and
last point of a metric, kept by the writer in the transaction that stores the values

ListMetrics reads a long series from these instead of aggregating every stored value (a
100,000-step series is 1,000 rows at width 100). Widths 10, 100, 1,000 and 10,000 steps;
bucket = step // width. Existing metrics are rolled up here. Role grants (writer SELECT,
INSERT, UPDATE; reader SELECT) are made by the migrate step.

Revision ID: 0005_metric_rollups
Revises: 0004_api_keys
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_metric_rollups"
down_revision = "0004_api_keys"
branch_labels = None
depends_on = None

SCHEMA = "writer"
TABLE = "metric_rollups"
# Must equal services.writer.models.ROLLUP_WIDTHS (kept literal: migrations are frozen).
WIDTHS = (10, 100, 1000, 10000)
# Must equal services.common.db.RLS_USER_SETTING (kept literal: migrations are frozen history).
USER_SETTING = "epochlens.user_id"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("width", sa.BigInteger(), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("min_value", sa.Float(precision=53), nullable=False),
        sa.Column("max_value", sa.Float(precision=53), nullable=False),
        sa.Column("last_step", sa.BigInteger(), nullable=False),
        sa.Column("last_value", sa.Float(precision=53), nullable=False),
        sa.Column("last_epoch", sa.Float(precision=53), nullable=True),
        sa.Column("last_wall_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "name", "width", "bucket", name=f"pk_{TABLE}"),
        schema=SCHEMA,
    )
    if op.get_bind().dialect.name == "postgresql":
        qualified = f"{SCHEMA}.{TABLE}"
        check = f"user_id = current_setting('{USER_SETTING}', true)"
        op.execute(f"ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {qualified} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY {TABLE}_owner ON {qualified} "
                   f"USING ({check}) WITH CHECK ({check})")
    _backfill()


def _backfill() -> None:
    """Rolls up the metrics stored before this revision: aggregates, then each bucket's
    last point by key."""
    metrics, rollups = f"{SCHEMA}.metrics", f"{SCHEMA}.{TABLE}"
    for width in WIDTHS:
        op.execute(
            f"INSERT INTO {rollups} (run_id, name, width, bucket, user_id, count, min_value, "
            f"max_value, last_step, last_value, last_epoch, last_wall_time) "
            f"SELECT run_id, name, {width}, step / {width}, min(user_id), count(*), "
            f"min(value), max(value), max(step), 0, NULL, min(wall_time) "
            f"FROM {metrics} GROUP BY run_id, name, step / {width}")
    last = (f"FROM {metrics} m WHERE m.run_id = {rollups}.run_id AND m.name = {rollups}.name "
            f"AND m.step = {rollups}.last_step")
    op.execute(f"UPDATE {rollups} SET last_value = (SELECT m.value {last}), "
               f"last_epoch = (SELECT m.epoch {last}), "
               f"last_wall_time = (SELECT m.wall_time {last})")


def downgrade() -> None:
    op.drop_table(TABLE, schema=SCHEMA)
