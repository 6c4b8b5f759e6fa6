"""Settings of the query service (env prefix EPOCHLENS_QUERY_).

max_response_bytes bounds every page (services.query.pagination.fill_page). A page always
holds at least one row, so one row must fit in max_message_bytes: with the writer's
limits (services/writer/config.py) a prediction row is at most 3 * max_text_chars * 4
bytes of UTF-8 plus about 100 bytes of other fields (384 KiB at max_text_chars 32768),
CompareSample adds the sample's prompt and ground truth (256 KiB) and the row's judgments
(LLM reasoning is capped by the judge's llm_max_output_tokens), and a run holds at most
max_config_bytes (64 KiB) of config: far below the 4 MiB default budget, which is itself
below max_message_bytes (16 MiB). tests/unit/test_pagination.py checks this relation.
"""

from pydantic import Field, SecretStr, model_validator
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
    max_response_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Encoded bytes a page may grow to: a list "
        "response or CompareSample page stops early (fewer rows, with a next_page_token) "
        "rather than grow past it; it always holds at least one row. Must be below "
        "max_message_bytes.")
    summary_max_failures: int = Field(
        20, ge=0, description="Failed predictions GetRunSummary lists with their reason (the "
        "first ones in step, sample_index order; failed_predictions counts them all).")

    @model_validator(mode="after")
    def _pages_fit_in_a_message(self) -> "QuerySettings":
        if self.max_response_bytes >= self.max_message_bytes:
            raise ValueError(f"max_response_bytes ({self.max_response_bytes}) must be below "
                             f"max_message_bytes ({self.max_message_bytes})")
        return self
