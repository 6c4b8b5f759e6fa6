"""Settings of the writer service (env prefix EPOCHLENS_WRITER_)."""

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.balancing import LB_POLICY_DESCRIPTION, LbPolicy
from services.common.config import ENV_FILE, DatabaseSettings, ServiceSettings
from trainer_client.tls import check_pairs


class WriterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="EPOCHLENS_WRITER_", env_file=ENV_FILE,
                                      extra="ignore")

    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    max_batch_size: int = Field(1000, ge=1, description="Most predictions in one batch.")
    max_text_chars: int = Field(
        32768, ge=1, description="Longest prompt, ground truth or prediction, in characters.")
    max_name_chars: int = Field(256, ge=1, description="Longest run/model/dataset name.")
    max_config_bytes: int = Field(65536, ge=2, description="Largest run config (JSON bytes).")
    max_metrics_batch_size: int = Field(
        1000, ge=1, description="Most metrics in one WriteMetrics call or one stream message.")
    max_metric_name_chars: int = Field(
        128, ge=1, description="Longest metric name, in characters.")
    stream_read_ahead_batches: int = Field(
        64, ge=1, description="Batches read from a stream ahead of the commit in progress.")
    stream_group_rows: int = Field(
        1024, ge=1, description="Most predictions committed in one transaction on a stream "
        "(queued batches are grouped up to this many rows).")
    stream_commit_concurrency: int = Field(
        2, ge=1, description="Groups of one stream committed at once, each in its own "
        "transaction; acks still go out in sequence order.")
    judge_address: str | None = Field(
        None, description="gRPC target of the judge service: host:port, or several replicas "
        "(ipv4:host1:port1,host2:port2 or dns:///name:port). Set: every new prediction gets a "
        "judge outbox row in its transaction and the dispatcher hands them to the judge. "
        "Unset: judging is off.")
    judge_lb_policy: LbPolicy = Field("round_robin", description=LB_POLICY_DESCRIPTION)
    outbox_batch: int = Field(
        500, ge=1, description="Most outbox rows one dispatcher pass claims (keep it at or "
        "below the judge's most items per EnqueueJudging).")
    outbox_concurrency: int = Field(
        2, ge=1, description="Dispatcher passes run at once on PostgreSQL, each claiming its "
        "own rows (SKIP LOCKED); SQLite always runs one.")
    outbox_poll_s: float = Field(
        0.5, gt=0, description="Pause of the dispatcher after a pass that found less than "
        "a full batch, seconds.")
    outbox_backoff_base_s: float = Field(
        1.0, gt=0, description="First retry delay of outbox rows the judge did not accept "
        "(doubles per attempt, with jitter), seconds.")
    outbox_backoff_max_s: float = Field(
        60.0, gt=0, description="Longest retry delay of outbox rows, seconds.")
    outbox_rpc_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of one EnqueueJudging call, seconds.")
    outbox_rpc_max_attempts: int = Field(
        3, ge=1, le=5, description="Attempts of one EnqueueJudging call on UNAVAILABLE, by the "
        "channel's retry policy, before the rows wait for the next backoff.")
    outbox_ingest_quiet_s: float = Field(
        1.0, ge=0, description="Ingest comes first: the dispatcher starts no pass while "
        "predictions were committed in the last this many seconds (0: never defers).")
    outbox_max_defer_s: float = Field(
        30.0, gt=0, description="Longest the dispatcher defers to a continuous ingest; then "
        "it hands off until the outbox is drained, and defers again.")
    outbox_parked_delay_s: float = Field(
        3600.0, gt=0, description="Delay before outbox rows the judge refused as "
        "INVALID_ARGUMENT (a bad judge config in the run) are tried again, seconds.")
    judge_tls: bool = Field(
        False, description="Reach the judge over TLS even without judge_tls_ca_file (gRPC's "
        "default trusted roots); a CA or client certificate file implies TLS.")
    judge_tls_ca_file: Path | None = Field(
        None, description="CA (PEM) the judge's server certificate must be signed by.")
    judge_tls_cert_file: Path | None = Field(
        None, description="The writer's client certificate chain (PEM) for a judge that "
        "requires mutual TLS; with judge_tls_key_file.")
    judge_tls_key_file: Path | None = Field(
        None, description="Private key (PEM, unencrypted) of judge_tls_cert_file.")
    judge_tls_server_name: str | None = Field(
        None, description="Name checked in the judge's certificate instead of the host of "
        "judge_address (grpc.ssl_target_name_override).")
    judge_check_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of the judge's check of a run's judge section in "
        "CreateRun (ValidateJudgeConfig), seconds; a judge that does not answer makes "
        "CreateRun UNAVAILABLE.")
    evaluation_generate_chunk: int = Field(
        32, ge=1, description="Rows of an Evaluate call sent to JudgeService.GenerateResponses "
        "at once; each chunk's responses are stored before the next chunk is asked for, so "
        "an interrupted call loses at most one chunk. At most the judge's "
        "generation_max_prompts.")
    evaluation_generate_timeout_s: float = Field(
        600.0, gt=0, description="Deadline of one GenerateResponses call (one chunk of an "
        "Evaluate call), seconds; a judge that does not answer in time makes Evaluate "
        "UNAVAILABLE (what was stored stays; the same call continues it).")
    delete_chunk_rows: int = Field(
        5000, ge=1, description="Rows one transaction of DeleteRun (or the retention sweep) "
        "removes from one table; each chunk is its own short transaction, so other users' "
        "ingest is never blocked for long.")
    delete_chunk_pause_s: float = Field(
        0.0, ge=0, description="Pause between two chunks of a deletion, seconds: gives "
        "a busy database's CPU back to other users' ingest (0: no pause).")
    delete_claim_s: float = Field(
        60.0, gt=0, description="Lease of a deleter on a run, seconds, renewed before every "
        "chunk: another writer replica takes a half-deleted run over only once its deleter "
        "stopped renewing for this long.")
    delete_purge_timeout_s: float = Field(
        900.0, gt=0, description="Deadline of the judge's PurgeRun call of one DeleteRun, "
        "seconds; past it DeleteRun is UNAVAILABLE and the next DeleteRun (or the sweep) "
        "resumes where the judge stopped.")
    retention_days: float | None = Field(
        None, gt=0, description="Runs finished more than this many days ago (any user's) "
        "are deleted by the writer's sweep. Unset: runs are kept forever (the sweep still "
        "resumes deletions that were interrupted).")
    retention_interval_s: float = Field(
        3600.0, gt=0, description="Pause between two passes of the writer's retention sweep, "
        "seconds (each pass deletes every due run, one at a time).")

    api_token_ttl_s: int = Field(
        900, ge=1, le=86400, description="Lifetime of the tokens ExchangeApiKey gives, seconds "
        "(clients exchange their API key again before it ends).")
    api_key_pepper: SecretStr | None = Field(
        None, description="Server-side secret mixed into the stored hash of every API key "
        "(HMAC-SHA-256); unset: plain SHA-256. Changing it invalidates every API key.")
    api_key_max_per_user: int = Field(
        100, ge=1, description="Most API keys one user may hold that are not revoked.")
    api_key_max_days: int = Field(
        365, ge=1, description="Longest lifetime CreateApiKey accepts, days (expire_days 0, "
        "no expiry, is also accepted).")
    api_key_max_failures: int = Field(
        20, ge=1, description="Failed ExchangeApiKey calls one client address may make within "
        "api_key_failure_window_s; beyond it the address gets RESOURCE_EXHAUSTED.")
    api_key_failure_window_s: float = Field(
        60.0, gt=0, description="Window of api_key_max_failures, seconds.")

    @model_validator(mode="after")
    def _judge_tls_pair(self) -> "WriterSettings":
        check_pairs(self, ("judge_tls_cert_file", "judge_tls_key_file"))
        return self


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
    judge_role: str = Field("epochlens_judge", pattern=r"^[a-z_][a-z0-9_]{0,62}$",
                            description="PostgreSQL login role of the judge service.")
    judge_role_password: str | None = Field(None, description="Password set on judge_role.")
