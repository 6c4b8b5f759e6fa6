"""judge pairwise order 1 kept (issue 11): a pair's first answer survives its worker

pairwise_tasks gains order 1's answer, reason, tokens and cost, and the baseline prediction
(step, sample index) it was asked against, all nullable: written once order 1 is charged,
so a task claimed again after its worker died asks only order 2 (order 1 is paid once).
Cleared when the pair's result is stored. The table's owner policy (0004), the judge role's
worker policy and the grants (services.judge.migrate) are per table and cover the new
columns unchanged.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SCHEMA = "judge"
TABLE = "pairwise_tasks"
COLUMNS = (("order1_answer", sa.Text()), ("order1_reason", sa.Text()),
           ("order1_input_tokens", sa.Integer()), ("order1_output_tokens", sa.Integer()),
           ("order1_cost_usd", sa.Float()), ("order1_baseline_step", sa.BigInteger()),
           ("order1_baseline_sample_index", sa.BigInteger()))


def upgrade() -> None:
    with op.batch_alter_table(TABLE, schema=SCHEMA) as batch:
        for name, type_ in COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table(TABLE, schema=SCHEMA) as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
