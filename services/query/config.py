"""Settings of the query service (env prefix EPOCHLENS_QUERY_)."""

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.common.config import ENV_FILE, ServiceSettings


class QuerySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="EPOCHLENS_QUERY_", env_file=ENV_FILE,
                                      extra="ignore")

    port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    page_size_default: int = Field(50, ge=1, description="Page size when a request asks for 0.")
    page_size_max: int = Field(500, ge=1, description="Larger page sizes are clamped to this.")
    page_token_secret: SecretStr = Field(
        description="Key that signs page tokens so a tampered token is refused. "
        "Replicas behind one address must share it.")
