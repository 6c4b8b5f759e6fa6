"""Settings of the web service (env prefix EPOCHLENS_WEB_).

The web service is a client of the QueryService only: it holds no database URL and no
signing key. The bearer token it forwards comes from the browser's cookie or the caller's
Authorization header.
"""

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.balancing import LB_POLICY_DESCRIPTION, LbPolicy
from services.common.config import ENV_FILE
from trainer_client.tls import check_pairs


class WebSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EPOCHLENS_WEB_", env_file=ENV_FILE,
                                      extra="ignore")

    host: str = Field("127.0.0.1", description="Interface the HTTP server binds to.")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    query_address: str = Field("127.0.0.1:50052", description="gRPC target of the query "
                               "service: host:port, or several replicas "
                               "(ipv4:host1:port1,host2:port2 or dns:///name:port).")
    query_lb_policy: LbPolicy = Field("round_robin", description=LB_POLICY_DESCRIPTION)
    query_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of each unary QueryService call the web service "
        "makes (WatchRun streams have none: they last as long as the browser watches).")
    health_timeout_s: float = Field(
        2.0, gt=0, description="Deadline of the query service health check behind /healthz.")
    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted from the "
        "query service.")
    cookie_name: str = Field(
        "epochlens_session", pattern=r"^[A-Za-z0-9_-]+$",
        description="Name of the HttpOnly cookie that holds the user's token.")
    cookie_secure: bool = Field(
        False, description="Mark the cookie Secure (sent over HTTPS only): set it when the "
        "web service is reached over HTTPS.")
    login_link_ttl_s: float = Field(
        300.0, gt=0, description="Lifetime of a one-time sign-in link (`epochlens ui`).")
    login_link_max_pending: int = Field(
        1000, ge=1, description="Unused sign-in links kept at once; more are refused with "
        "429 until some are used or expire.")
    sse_keepalive_s: float = Field(
        15.0, gt=0, description="Seconds of silence after which a WatchRun event stream sends "
        "a keepalive comment (keeps proxies from closing it).")
    watch_open_wait_s: float = Field(
        1.0, gt=0, description="How long the event stream route waits for WatchRun's first "
        "event before it answers 200: an error within it gets its own HTTP status, a later "
        "one an `rpc-error` event.")
    query_tls: bool = Field(
        False, description="Reach the query service over TLS even without query_tls_ca_file "
        "(gRPC's default trusted roots); a CA or client certificate file implies TLS.")
    query_tls_ca_file: Path | None = Field(
        None, description="CA (PEM) the query service's certificate must be signed by.")
    query_tls_cert_file: Path | None = Field(
        None, description="The web service's client certificate chain (PEM) for a query "
        "service that requires mutual TLS; with query_tls_key_file.")
    query_tls_key_file: Path | None = Field(
        None, description="Private key (PEM, unencrypted) of query_tls_cert_file.")
    query_tls_server_name: str | None = Field(
        None, description="Name checked in the query service's certificate instead of the "
        "host of query_address (grpc.ssl_target_name_override).")
    tls_cert_file: Path | None = Field(
        None, description="Certificate chain (PEM) of the web service. Set with tls_key_file: "
        "it serves HTTPS only (set cookie_secure too); unset: plain HTTP.")
    tls_key_file: Path | None = Field(
        None, description="Private key (PEM, unencrypted) of tls_cert_file.")
    max_body_bytes: int = Field(
        16 * 1024, ge=1024, description="Largest request body accepted (the login form).")
    shutdown_grace_s: float = Field(
        5.0, ge=0, description="Time given to in-flight requests on stop; open event streams "
        "are closed at once (browsers reconnect and resume).")
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or as JSON objects (one per line).")
    metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="Port of the Prometheus /metrics endpoint (process metrics); unset: no "
        "endpoint; 0 picks a free one.")
    metrics_host: str = Field("127.0.0.1", description="Interface the metrics endpoint binds to.")

    @model_validator(mode="after")
    def _tls_pairs(self) -> "WebSettings":
        check_pairs(self, ("tls_cert_file", "tls_key_file"),
                    ("query_tls_cert_file", "query_tls_key_file"))
        return self
