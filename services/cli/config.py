"""Settings of the `epochlens` command line (env prefix EPOCHLENS_CLI_)."""

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.balancing import LB_POLICY_DESCRIPTION, LbPolicy
from services.common.config import ENV_FILE
from trainer_client.tls import check_pairs


class CliSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EPOCHLENS_CLI_", env_file=ENV_FILE,
                                      extra="ignore")

    writer_address: str = Field("127.0.0.1:50051", description="Writer service host:port.")
    query_address: str = Field("127.0.0.1:50052", description="Query service host:port.")
    judge_address: str = Field("127.0.0.1:50053", description="Judge service host:port "
                               "(`epochlens judge resume`).")
    lb_policy: LbPolicy = Field("round_robin", description="The three addresses are gRPC "
                                "targets (ipv4:host1:port1,host2:port2 or dns:///name:port "
                                "name several replicas). " + LB_POLICY_DESCRIPTION)
    web_url: str = Field("http://127.0.0.1:8080", description="Base URL of the web service "
                         "(`epochlens ui`).")
    tls: bool = Field(False, description="Reach the services over TLS even without "
                      "tls_ca_file (gRPC's default trusted roots); a CA or client certificate "
                      "file implies TLS.")
    tls_ca_file: Path | None = Field(None, description="CA (PEM) the services' certificates "
                                     "must be signed by (also trusted by `health --url`).")
    tls_cert_file: Path | None = Field(None, description="Client certificate chain (PEM) for "
                                       "services that require mutual TLS; with tls_key_file.")
    tls_key_file: Path | None = Field(None, description="Private key (PEM, unencrypted) of "
                                      "tls_cert_file.")
    tls_server_name: str | None = Field(None, description="Name checked in the services' "
                                        "certificates instead of the address's host "
                                        "(grpc.ssl_target_name_override).")
    token: str | None = Field(None, description="Bearer token; unset: minted for `user`.")
    user: str = Field("local", description="User the CLI mints a token for when token is unset.")
    timeout_s: float = Field(10.0, gt=0, description="Deadline of each RPC the CLI makes.")
    delete_timeout_s: float = Field(3600.0, gt=0, description="Deadline of `epochlens "
                                    "delete` (a run of millions of rows takes minutes).")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024,
                                   description="Largest gRPC message the CLI accepts.")
    smoke_samples: int = Field(4, ge=1, description="Samples per epoch in `epochlens smoke`.")
    smoke_epochs: int = Field(3, ge=1, description="Epochs written by `epochlens smoke`.")
    list_limit: int = Field(50, ge=1, description="Predictions `epochlens predictions` shows "
                            "when neither --limit nor --all is given.")
    page_size: int = Field(100, ge=1, description="page_size the listing commands ask for; the "
                           "query service caps it at its page_size_max.")
    export_page_size: int = Field(500, ge=1, description="page_size of the pages `export`, "
                                  "`summary` and `watch` stream (capped by page_size_max).")
    prefetch_pages: int = Field(4, ge=1, description="Pages fetched ahead in a thread while "
                                "the current one is written or counted.")
    prefetch_poll_s: float = Field(0.1, gt=0, description="How often the prefetch thread "
                                   "re-checks a full queue for a consumer that stopped early.")
    export_buffer_bytes: int = Field(1024 * 1024, ge=4096,
                                     description="Write buffer of the file `export -o` writes.")
    progress_refresh_per_s: float = Field(4.0, gt=0, description="Redraws per second of the "
                                          "progress bars on stderr.")
    watch_max_failures: int = Field(30, ge=0, description="Failed stream openings in a row "
                                    "`epochlens watch` retries while the query service is "
                                    "unreachable or slow.")
    watch_interval_s: float = Field(2.0, gt=0, description="Seconds without news after which "
                                    "`epochlens watch` prints an epoch as landed, and its pause "
                                    "before opening a failed stream again (default of "
                                    "--interval).")
    preview_chars: int = Field(100, ge=10, description="Longest text shown in a table cell; "
                               "longer texts are cut with '...' (--json gives them whole).")
    report_page_size: int = Field(500, ge=1, description="page_size of the ListPredictions "
                                  "pages `epochlens report` fetches (capped by page_size_max).")
    # `epochlens eval` (services.cli.evaluate)
    eval_chunk_size: int = Field(100, ge=1, description="Rows per EvaluationService.Evaluate "
                                 "call of `epochlens eval` (default of --chunk-size; the "
                                 "writer caps a call at its max_batch).")
    eval_rpc_timeout_s: float = Field(600.0, gt=0, description="Deadline of one Evaluate call "
                                      "(it may wait for an endpoint to generate a chunk).")
    eval_batch_size: int = Field(8, ge=1, description="Prompts generated together by a local "
                                 "model (default of --batch-size).")
    eval_max_new_tokens: int = Field(256, ge=1, description="Most new tokens per response of "
                                     "a local model or endpoint (default of --max-new-tokens).")
    eval_precision: str = Field("auto", pattern="^(auto|bf16|fp16|fp32)$", description="Autocast "
                                "precision of a local model: auto (bf16 on a GPU that has it, "
                                "else fp32), bf16, fp16 or fp32.")
    eval_device: str = Field("auto", description="Device of a local model: auto (cuda when "
                             "available, else cpu), or a torch device such as cuda:1.")
    eval_poll_s: float = Field(1.0, gt=0, description="How often `epochlens eval` asks the "
                               "query service whether judging is done (GetRunSummary).")
    eval_wait_s: float = Field(3600.0, ge=0, description="Longest wait for judging to finish "
                               "before the summary is printed with what is judged so far.")
    eval_hash_chunk_bytes: int = Field(1024 * 1024, ge=4096, description="Read size when "
                                       "hashing a dataset for the evaluation's request id.")
    eval_request_max_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest Evaluate request `epochlens eval` sends: "
        "a chunk whose rows are longer is sent in several calls (below the writer's gRPC "
        "message limit, 16 MiB by default; a row alone is sent as it is).")

    @model_validator(mode="after")
    def _tls_pair(self) -> "CliSettings":
        check_pairs(self, ("tls_cert_file", "tls_key_file"))
        return self
