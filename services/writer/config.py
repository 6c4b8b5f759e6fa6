"""Settings of the writer service (env prefix EPOCHLENS_WRITER_)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.config import ENV_FILE, DatabaseSettings, ServiceSettings


class WriterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="EPOCHLENS_WRITER_", env_file=ENV_FILE,
                                      extra="ignore")

    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    max_batch_size: int = Field(1000, ge=1, description="Most predictions in one batch.")
    max_text_chars: int = Field(
        32768, ge=1, description="Longest prompt, ground truth or prediction, in characters.")
    max_name_chars: int = Field(256, ge=1, description="Longest run/model/dataset name.")
    max_config_bytes: int = Field(65536, ge=2, description="Largest run config (JSON bytes).")
    stream_read_ahead_batches: int = Field(
        64, ge=1, description="Batches read from a stream ahead of the commit in progress.")
    stream_group_rows: int = Field(
        1024, ge=1, description="Most predictions committed in one transaction on a stream "
        "(queued batches are grouped up to this many rows).")
    stream_commit_concurrency: int = Field(
        2, ge=1, description="Groups of one stream committed at once, each in its own "
        "transaction; acks still go out in sequence order.")


class MigrateSettings(DatabaseSettings):
    """What the migrate step needs (env prefix EPOCHLENS_MIGRATE_)."""

    model_config = SettingsConfigDict(env_prefix="EPOCHLENS_MIGRATE_", env_file=ENV_FILE,
                                      extra="ignore")

    database_url: str | None = Field(
        None, description="Admin URL that may create schemas, roles and policies. "
        "Unset: the embedded SQLite store under sqlite_dir.")
    writer_role: str = Field("epochlens_writer", pattern=r"^[a-z_][a-z0-9_]{0,62}$",
                             description="PostgreSQL login role of the writer service.")
    writer_role_password: str | None = Field(None, description="Password set on writer_role.")
    reader_role: str = Field("epochlens_reader", pattern=r"^[a-z_][a-z0-9_]{0,62}$",
                             description="PostgreSQL read-only login role of the query service.")
    reader_role_password: str | None = Field(None, description="Password set on reader_role.")
