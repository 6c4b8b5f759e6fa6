"""Alembic environment of the judge schema. services.judge.migrate passes the connection."""

from alembic import context

from services.judge.models import SCHEMA, JudgeBase

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=JudgeBase.metadata,
    version_table_schema=SCHEMA,
    include_schemas=True,
)
with context.begin_transaction():
    context.run_migrations()
