"""Settings shared by every service: the base class and the auth settings.

Each service has its own settings class (its own env prefix) derived from
ServiceSettings. AuthSettings is one class for the one concern every service
and the token CLI must agree on: how bearer tokens are signed.
"""

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer_client.tls import check_pairs

ENV_FILE = ".env"

# The one environment variable of the embedded store's folder. Every process (migrate, writer,
# query, judge) must open the same files, so it is one setting whatever the service's prefix.
SQLITE_DIR_ENV = "EPOCHLENS_SQLITE_DIR"

# The secrets .env.example publishes. Anyone can read them, so a stack that uses them lets
# anyone mint tokens and forge page tokens: `epochlens up` refuses them (unless
# EPOCHLENS_STACK_ALLOW_EXAMPLE_SECRETS is true) and every service logs a WARNING.
EXAMPLE_SECRETS = {
    "EPOCHLENS_AUTH_JWT_SECRET": "dev-only-hs256-secret-change-me-0123456789",
    "EPOCHLENS_QUERY_PAGE_TOKEN_SECRET": "dev-only-page-token-secret-change-me",
}


class DatabaseSettings(BaseSettings):
    """How to reach the database. Subclasses set the env prefix (sqlite_dir excepted)."""

    model_config = SettingsConfigDict(env_file=ENV_FILE, extra="ignore", validate_by_name=True)

    database_url: str | None = Field(
        None,
        description="SQLAlchemy async URL (postgresql+asyncpg://...). "
        "Unset: the embedded SQLite store under sqlite_dir.",
    )
    sqlite_dir: Path = Field(
        Path(".epochlens"), validation_alias=SQLITE_DIR_ENV,
        description="Folder of the embedded SQLite files, one per schema; one setting "
        "(EPOCHLENS_SQLITE_DIR) shared by every service and the migrate step.")
    sqlite_busy_timeout_ms: int = Field(5000, ge=0, description="SQLite lock wait before failing.")
    db_pool_size: int = Field(10, ge=1, description="Open database connections kept in the pool.")
    db_max_overflow: int = Field(5, ge=0, description="Extra connections allowed above the pool.")
    db_pool_timeout_s: float = Field(5.0, gt=0, description="Wait for a free pooled connection.")
    db_connect_timeout_s: float = Field(5.0, gt=0, description="Timeout of one connection attempt.")
    db_statement_cache_size: int = Field(
        100, ge=0, description="PostgreSQL: prepared statements each connection keeps for "
        "reuse (SQLAlchemy's and asyncpg's caches). 0 behind PgBouncer in transaction pooling "
        "mode (before 1.21, or without max_prepared_statements): nothing is reused across "
        "transactions and each statement is prepared under a unique name.")


class ServiceSettings(DatabaseSettings):
    """Settings every gRPC service has. Subclasses set the env prefix."""

    host: str = Field("127.0.0.1", description="Interface the gRPC server binds to.")
    port: int = Field(ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent."
    )
    max_concurrent_rpcs: int | None = Field(
        None, ge=1, description="Cap on RPCs served at once; unset means no cap."
    )
    shutdown_grace_s: float = Field(5.0, ge=0, description="Time given to in-flight RPCs on stop.")
    log_level: str = Field("INFO", description="Python logging level.")
    max_abs_integer: int = Field(
        2**53 - 1, ge=1, le=2**63 - 1,
        description="Largest magnitude of any integer in a request (2**53-1: exact in JSON).",
    )
    max_struct_depth: int = Field(
        16, ge=1, le=32,
        description="Deepest nesting of a Struct (run config) in a request (protobuf itself stops "
        "parsing near 33).",
    )
    max_reported_violations: int = Field(
        20, ge=1, le=200,
        description="Field violations listed in one error (they travel in trailing metadata).",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="Port of the Prometheus /metrics endpoint; unset: no endpoint; 0 picks a "
        "free one.")
    metrics_host: str = Field("127.0.0.1", description="Interface the metrics endpoint binds to.")
    metrics_db_refresh_s: float = Field(
        15.0, gt=0, description="How often the gauges read from the database (writer outbox "
        "depth and age, judge queue depth) are refreshed while the metrics endpoint is on; "
        "a scrape never queries the database.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or as JSON objects (one per line) carrying "
        "run_id and trace_id when known.")
    otel_endpoint: str | None = Field(
        None, description="OTLP gRPC endpoint traces are exported to (host:port or URL); "
        "unset: tracing off.")
    otel_service_name: str | None = Field(
        None, description="service.name of the exported spans; unset: epochlens-<service>.")
    otel_insecure: bool = Field(
        True, description="Export to the OTLP endpoint without TLS (a collector beside the "
        "service).")
    tls_cert_file: Path | None = Field(
        None, description="Server certificate chain (PEM). Set with tls_key_file: the server "
        "serves TLS only; unset: plaintext (the local default).")
    tls_key_file: Path | None = Field(
        None, description="Private key (PEM, unencrypted) of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None, description="CA (PEM) that client certificates must be signed by. Set: mutual "
        "TLS is required, clients without such a certificate are refused at the handshake.")

    @model_validator(mode="after")
    def _tls_complete(self) -> "ServiceSettings":
        check_pairs(self, ("tls_cert_file", "tls_key_file"))
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            prefix = (self.model_config.get("env_prefix") or "").upper()
            raise ValueError(f"{prefix}TLS_CLIENT_CA_FILE needs {prefix}TLS_CERT_FILE and "
                             f"{prefix}TLS_KEY_FILE (mutual TLS is TLS first)")
        return self


class AuthSettings(BaseSettings):
    """How bearer tokens are verified (services) and minted (the token CLI)."""

    model_config = SettingsConfigDict(env_prefix="EPOCHLENS_AUTH_", env_file=ENV_FILE,
                                      extra="ignore")

    jwt_algorithm: Literal["HS256", "RS256"] = Field("HS256", description="Token signature.")
    jwt_secret: str | None = Field(None, description="HS256 shared secret.")
    jwt_public_key_file: Path | None = Field(None, description="RS256 public key (PEM).")
    jwt_private_key_file: Path | None = Field(
        None, description="RS256 private key (PEM); only the token CLI needs it."
    )
    jwt_audience: str | None = Field(None, description="Required `aud` claim, when set.")
    jwt_issuer: str | None = Field(None, description="Required `iss` claim, when set.")
    jwt_leeway_s: int = Field(30, ge=0, description="Clock skew tolerated on exp/nbf.")
    token_ttl_s: int = Field(86400, ge=1, description="Lifetime of tokens minted by the CLI.")

    @model_validator(mode="after")
    def _key_present(self) -> "AuthSettings":
        if self.jwt_algorithm == "HS256" and not self.jwt_secret:
            raise ValueError("EPOCHLENS_AUTH_JWT_SECRET is required when jwt_algorithm is HS256")
        if self.jwt_algorithm == "RS256" and not self.jwt_public_key_file:
            raise ValueError(
                "EPOCHLENS_AUTH_JWT_PUBLIC_KEY_FILE is required when jwt_algorithm is RS256"
            )
        return self
