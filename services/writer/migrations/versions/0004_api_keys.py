"""api keys: per-user API keys, stored as hashes, exchanged for short-lived tokens

Row-level security like the other tables (owner policy). ExchangeApiKey runs before any
user is known: it sets `epochlens.api_key_hash` to the hash of the key it was given, and
two more permissive policies let a transaction read, and stamp last_used_time on, the one
row with that hash (and no other row), so the exchange never needs a policy that shows
every user's keys. Role grants (writer SELECT, INSERT, UPDATE) are made by the migrate
step (services.writer.migrate) like for the other tables.

Revision ID: 0004_api_keys
Revises: 0003_metrics
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_api_keys"
down_revision = "0003_metrics"
branch_labels = None
depends_on = None

SCHEMA = "writer"
TABLE = "api_keys"
# Must equal services.common.db.RLS_USER_SETTING and services.writer.api_keys.KEY_HASH_SETTING
# (kept literal: migrations are frozen history).
USER_SETTING = "epochlens.user_id"
KEY_HASH_SETTING = "epochlens.api_key_hash"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column("key_hash", sa.Text(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoke_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_time", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=f"pk_{TABLE}"),
        sa.UniqueConstraint("key_hash", name=f"uq_{TABLE}_key_hash"),
        schema=SCHEMA,
    )
    op.create_index(f"ix_{TABLE}_user_id_create_time", TABLE, ["user_id", "create_time"],
                    schema=SCHEMA)
    if op.get_bind().dialect.name == "postgresql":
        _policies()


def _policies() -> None:
    qualified = f"{SCHEMA}.{TABLE}"
    owner = f"user_id = current_setting('{USER_SETTING}', true)"
    by_hash = f"key_hash = current_setting('{KEY_HASH_SETTING}', true)"
    op.execute(f"ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {qualified} FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY {TABLE}_owner ON {qualified} USING ({owner}) WITH CHECK ({owner})")
    op.execute(f"CREATE POLICY {TABLE}_exchange_select ON {qualified} FOR SELECT "
               f"USING ({by_hash})")
    op.execute(f"CREATE POLICY {TABLE}_exchange_update ON {qualified} FOR UPDATE "
               f"USING ({by_hash}) WITH CHECK ({by_hash})")


def downgrade() -> None:
    op.drop_table(TABLE, schema=SCHEMA)
