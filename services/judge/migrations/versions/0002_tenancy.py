"""judge tenancy (issue 8): the LLM cache per user, with what each call billed; budget
reservations

llm_cache is made again: its keys now include the user (a verdict is never shared across
users), so no row of the old table could ever be hit again. Each row carries its user (with
the owner policy of the other tables on PostgreSQL), what its call billed and the prediction
it was made for. run_llm_state gains reserved_usd and reserved_until: the estimated most cost
of the paid calls in flight, reserved before each call and settled after it.
The grants (the judge role reads writer.runs and writer.predictions, under their row-level
security) are in services.judge.migrate.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SCHEMA = "judge"
CACHE = "llm_cache"
STATE = "run_llm_state"
# Must equal services.common.db.RLS_USER_SETTING (kept literal: migrations are frozen history).
USER_SETTING = "epochlens.user_id"
JSON_TYPE = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.drop_table(CACHE, schema=SCHEMA)
    op.create_table(
        CACHE,
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("verdict", JSON_TYPE, nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=True),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("sample_index", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=f"pk_{CACHE}"),
        schema=SCHEMA,
    )
    op.add_column(STATE, sa.Column("reserved_usd", sa.Float(), nullable=False,
                                   server_default=sa.text("0")), schema=SCHEMA)
    op.add_column(STATE, sa.Column("reserved_until", sa.DateTime(timezone=True),
                                   nullable=True), schema=SCHEMA)
    if op.get_bind().dialect.name == "postgresql":
        qualified = f"{SCHEMA}.{CACHE}"
        check = f"user_id = current_setting('{USER_SETTING}', true)"
        op.execute(f"ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {qualified} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY {CACHE}_owner ON {qualified} "
                   f"USING ({check}) WITH CHECK ({check})")


def downgrade() -> None:
    op.drop_column(STATE, "reserved_until", schema=SCHEMA)
    op.drop_column(STATE, "reserved_usd", schema=SCHEMA)
    op.drop_table(CACHE, schema=SCHEMA)
    op.create_table(
        CACHE,
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("verdict", JSON_TYPE, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=f"pk_{CACHE}"),
        schema=SCHEMA,
    )
