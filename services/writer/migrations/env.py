"""Alembic environment of the writer schema. services.writer.migrate passes the connection."""

from alembic import context

from services.writer.models import SCHEMA, WriterBase

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=WriterBase.metadata,
    version_table_schema=SCHEMA,
    include_schemas=True,
)
with context.begin_transaction():
    context.run_migrations()
