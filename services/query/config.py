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

# Largest encoded ListMetrics point (step, value, epoch, wall time, min, max, count, tags and
# length prefix, at their widest) and series header (a name of the writer's
# max_metric_name_chars, 128, in 4-byte UTF-8, plus its other fields), in bytes.
METRIC_POINT_MAX_BYTES = 80
METRIC_SERIES_MAX_BYTES = 560


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
    agreement_key_chunk: int = Field(
        1000, ge=1, description="GetRunSummary agreements: human-judged predictions whose "
        "rule and LLM judgments one statement looks up by primary key.")
    metrics_points_default: int = Field(
        1000, ge=1, description="Points per series ListMetrics returns when the request asks "
        "for 0 (longer series are downsampled to this many step buckets).")
    metrics_points_max: int = Field(
        10000, ge=1, description="Larger max_points in ListMetrics are clamped to this.")
    metrics_max_series: int = Field(
        50, ge=1, description="Most series in one ListMetrics response (more names requested: "
        "INVALID_ARGUMENT; none requested: the first ones by name, the rest listed as omitted).")
    metrics_max_points_total: int = Field(
        40000, ge=1, description="Points in one ListMetrics response, all series together: "
        "each series gets at most this divided by the number of series.")

    watch_max_streams: int = Field(
        200, ge=1, description="Open WatchRun streams one query process serves; more are "
        "refused with RESOURCE_EXHAUSTED.")
    watch_poll_s: float = Field(
        1.0, gt=0, description="SQLite: how often a WatchRun re-reads its run (nothing "
        "notifies commits there).")
    watch_resync_s: float = Field(
        30.0, gt=0, description="PostgreSQL: a WatchRun re-reads its run this often even "
        "without a commit notification (in case one was lost with the listening connection).")
    watch_min_interval_s: float = Field(
        0.25, ge=0, description="Least time between two reads of one WatchRun: a burst of "
        "commits costs one read.")
    watch_metric_points: int = Field(
        1000, ge=1, description="Most new points per metric name one WatchRun read sends "
        "(a longer backlog follows in the next reads, at once).")
    watch_listen_url: str | None = Field(
        None, description="PostgreSQL: URL of the one connection that LISTENs for commits "
        "(WatchRun). LISTEN needs a session of its own: behind PgBouncer in transaction "
        "pooling mode point it at PostgreSQL directly (or at a session-mode pool). Unset: "
        "database_url.")
    watch_listen_retry_s: float = Field(
        1.0, gt=0, description="PostgreSQL: pause before re-opening the LISTEN connection "
        "after it failed, and how often its liveness is checked.")

    confidence_level: float = Field(
        default=0.95, gt=0, lt=1, description="Confidence level of the intervals the query "
        "service reports (bootstrap deltas in CompareRuns, Wilson win-rate intervals of "
        "pairwise judging).")
    compare_bootstrap_resamples: int = Field(
        2000, ge=1, le=100_000, description="CompareRuns: bootstrap resamples behind each "
        "confidence interval (paired percentile bootstrap; memory and time grow with "
        "resamples x compare_max_samples).")
    compare_seed: int = Field(
        0, ge=0, description="CompareRuns: seed of the bootstrap's random generator, so the "
        "same comparison always reports the same intervals.")
    compare_max_changes_default: int = Field(
        20, ge=0, description="CompareRuns: changed samples listed when the request asks for "
        "0.")
    compare_max_changes_max: int = Field(
        500, ge=0, description="CompareRuns: larger max_changes are clamped to this.")
    compare_max_samples: int = Field(
        2000, ge=1, description="CompareRuns: most samples an epoch on either side may have; "
        "a larger comparison is refused with FAILED_PRECONDITION.")

    @model_validator(mode="after")
    def _pages_fit_in_a_message(self) -> "QuerySettings":
        if self.max_response_bytes >= self.max_message_bytes:
            raise ValueError(f"max_response_bytes ({self.max_response_bytes}) must be below "
                             f"max_message_bytes ({self.max_message_bytes})")
        metrics_bytes = (self.metrics_max_points_total * METRIC_POINT_MAX_BYTES
                         + self.metrics_max_series * METRIC_SERIES_MAX_BYTES)
        if metrics_bytes > self.max_response_bytes:
            raise ValueError(f"metrics_max_points_total ({self.metrics_max_points_total}) and "
                             f"metrics_max_series ({self.metrics_max_series}) allow ListMetrics "
                             f"responses of {metrics_bytes} bytes, above max_response_bytes "
                             f"({self.max_response_bytes})")
        return self
