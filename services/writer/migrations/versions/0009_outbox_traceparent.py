"""outbox_traceparent: writer.judge_outbox.traceparent, the W3C trace context of the request
that stored the prediction (NULL when tracing was off), so the outbox hand-off continues that
trace (services.writer.outbox).

Numbers 0007 and 0008 are kept for other revisions of this release.

Revision ID: 0009_outbox_traceparent
Revises: 0006_run_kind
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_outbox_traceparent"
down_revision = "0008_run_deletion"
branch_labels = None
depends_on = None

SCHEMA = "writer"


def upgrade() -> None:
    with op.batch_alter_table("judge_outbox", schema=SCHEMA) as batch:
        batch.add_column(sa.Column("traceparent", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("judge_outbox", schema=SCHEMA) as batch:
        batch.drop_column("traceparent")
