"""run_deletion (issue 12): writer.runs.delete_time and the deletion claim

delete_time: set by DeleteRun (or the retention sweep) in one short transaction; from then
on every reader and writer path treats the run as gone (NOT_FOUND) while its rows are
removed in bounded chunks. delete_claim and delete_claim_until: which deleter holds the run
and until when (a lease renewed between chunks), so several writer replicas never delete
the same run at once and a deleter that died is taken over once its lease passed. The
writer role's DELETE grants on the run's tables and the retention policies are in
services.writer.migrate.

Revision ID: 0008_run_deletion
Revises: 0006_run_kind
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_run_deletion"
down_revision = "0007_samples"
branch_labels = None
depends_on = None

SCHEMA = "writer"
COLUMNS = (("delete_time", sa.DateTime(timezone=True)), ("delete_claim", sa.Uuid()),
           ("delete_claim_until", sa.DateTime(timezone=True)))


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=SCHEMA) as batch:
        for name, type_ in COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))
    # The retention sweep finds old finished runs and half-deleted ones without a scan of
    # every user's runs.
    op.create_index("ix_runs_finish_time", "runs", ["finish_time"], schema=SCHEMA)
    op.create_index("ix_runs_delete_time", "runs", ["delete_time"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_index("ix_runs_delete_time", "runs", schema=SCHEMA)
    op.drop_index("ix_runs_finish_time", "runs", schema=SCHEMA)
    with op.batch_alter_table("runs", schema=SCHEMA) as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
