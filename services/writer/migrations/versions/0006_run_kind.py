"""run_kind: writer.runs.kind, the RunKind of a run (1 training, 2 evaluation)

Runs created before kinds existed are training runs: the column is added NOT NULL with a
server default of 1, which fills every existing row. CreateRun always writes the kind.

Revision ID: 0006_run_kind
Revises: 0005_metric_rollups
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_run_kind"
down_revision = "0005_metric_rollups"
branch_labels = None
depends_on = None

SCHEMA = "writer"
# Must equal epochlens.v1.RunKind.RUN_KIND_TRAINING (kept literal: migrations are frozen).
TRAINING = 1


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=SCHEMA) as batch:
        batch.add_column(sa.Column("kind", sa.SmallInteger(), nullable=False,
                                   server_default=sa.text(str(TRAINING))))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=SCHEMA) as batch:
        batch.drop_column("kind")
