"""Settings of the `epochlens` command line (env prefix EPOCHLENS_CLI_)."""

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.config import ENV_FILE


class CliSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EPOCHLENS_CLI_", env_file=ENV_FILE,
                                      extra="ignore")

    writer_address: str = Field("127.0.0.1:50051", description="Writer service host:port.")
    query_address: str = Field("127.0.0.1:50052", description="Query service host:port.")
    token: str | None = Field(None, description="Bearer token; unset: minted for `user`.")
    user: str = Field("local", description="User the CLI mints a token for when token is unset.")
    timeout_s: float = Field(10.0, gt=0, description="Deadline of each RPC the CLI makes.")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024,
                                   description="Largest gRPC message the CLI accepts.")
    smoke_samples: int = Field(4, ge=1, description="Samples per epoch in `epochlens smoke`.")
    smoke_epochs: int = Field(3, ge=1, description="Epochs written by `epochlens smoke`.")
