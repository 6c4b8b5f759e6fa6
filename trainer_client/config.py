"""Configuration of the trainer-side predictions client (env prefix EPOCHLENS_TRAINER_).

Every tunable of the callback, the generator, the streaming client, the spool
and the cost estimator lives here, with its default and a description. Values
come from keyword arguments first, then from the environment (or `.env`).
Invalid values fail at construction with a message naming the field and the
limit it broke.
"""

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer_client.tls import check_pairs


class PredictionsConfig(BaseSettings):
    """What to predict, how often, how to generate it and how to ship it."""

    model_config = SettingsConfigDict(env_prefix="EPOCHLENS_TRAINER_", env_file=".env",
                                      extra="ignore", validate_assignment=True)

    # --- switches and limits (system side) ---
    enabled: bool = Field(True, description="System switch: false turns the callback into a "
                          "no-op that only logs that predictions are off.")
    max_sample_count: int = Field(100, ge=1, description="System ceiling on sample_count.")
    min_step_interval: int = Field(10, ge=1, description="System floor on step_interval.")
    max_text_chars: int = Field(32768, ge=16, description="Longest prompt, ground truth or "
                                "prediction sent to the writer; longer texts are cut (logged "
                                "and counted). Keep it <= the writer's max_text_chars.")

    # --- what to predict and when ---
    sample_count: int = Field(5, ge=1, description="Examples drawn once from the dataset and "
                              "predicted at every pass (at most max_sample_count).")
    frequency: Literal["epoch", "steps"] = Field(
        "epoch", description="When to predict: at each epoch end, or every step_interval steps.")
    step_interval: int = Field(50, ge=1, description="Optimizer steps between passes when "
                               "frequency is 'steps' (at least min_step_interval).")
    predict_at_start: bool = Field(False, description="Also predict once before training "
                                   "(epoch 0, step 0), as a baseline.")
    seed: int = Field(42, description="Seed of the sample draw and of sampled decoding.")
    stream_sample_rows: int = Field(1000, ge=1, description="Rows read from the start of a "
                                    "streaming (iterable) dataset; the sample is drawn from "
                                    "them.")

    # --- prompt extraction ---
    instruction_template: str = Field(
        "{instruction}\n\n{input}\n\n", description="Prompt of instruction/input/output rows "
        "with a non-empty input (str.format fields: instruction, input).")
    instruction_only_template: str = Field(
        "{instruction}\n\n", description="Prompt of instruction/output rows without input.")
    question_template: str = Field("{question}\n", description="Prompt of question/answer rows "
                                   "(str.format field: question).")

    # --- generation ---
    max_new_tokens: int = Field(256, ge=1, description="Generation length cap per prediction.")
    greedy: bool = Field(True, description="Greedy decoding; false samples with temperature.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (greedy=false).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (greedy=false).")
    top_k: int | None = Field(None, ge=1, description="Sample among the k likeliest tokens "
                              "(greedy=false); unset: no top-k cut.")
    repetition_penalty: float | None = Field(None, gt=0, description="Penalty on repeated "
                                             "tokens (1.0 = none); unset: the model's own.")
    generation_batch_size: int = Field(16, ge=1, description="Prompts generated together "
                                       "(left-padded batch).")
    max_prompt_tokens: int = Field(1024, ge=1, description="Prompts longer than this keep "
                                   "their last max_prompt_tokens tokens.")

    # --- streaming client ---
    writer_address: str = Field("localhost:50051", description="gRPC target of the writer: "
                                "host:port, or several replicas (ipv4:host1:port1,host2:port2 "
                                "or dns:///name:port).")
    writer_lb_policy: Literal["round_robin", "pick_first"] = Field(
        "round_robin", description="gRPC load-balancing policy over the writer addresses: "
        "round_robin (each stream to the next ready replica) or pick_first.")
    token: SecretStr | None = Field(None, description="Bearer token for the writer; unset: "
                                    "the API key (trainer_client.credentials), exchanged for "
                                    "short-lived tokens refreshed automatically.")
    tls: bool = Field(False, description="Reach the writer over TLS even without tls_ca_file "
                      "(gRPC's default trusted roots); a CA or client certificate file "
                      "implies TLS.")
    tls_ca_file: Path | None = Field(None, description="CA (PEM) the writer's certificate must "
                                     "be signed by.")
    tls_cert_file: Path | None = Field(None, description="Client certificate chain (PEM) for "
                                       "a writer that requires mutual TLS; with tls_key_file.")
    tls_key_file: Path | None = Field(None, description="Private key (PEM, unencrypted) of "
                                      "tls_cert_file.")
    tls_server_name: str | None = Field(None, description="Name checked in the writer's "
                                        "certificate instead of the host of writer_address "
                                        "(grpc.ssl_target_name_override).")
    run_name: str | None = Field(None, description="Run name; unset: the trainer's run_name "
                                 "or output_dir.")
    queue_size: int = Field(64, ge=1, description="Pass results waiting for the upload thread.")
    queue_full_policy: Literal["block", "spool"] = Field(
        "spool", description="Queue full: block the trainer until there is room, or write the "
        "batch straight to the spool file. Nothing is ever dropped.")
    spool_dir: Path = Field(Path(".epochlens/spool"), description="Folder of the spool files "
                            "that keep every batch until the writer acks it.")
    keep_spool_files: bool = Field(False, description="Keep a spool file after everything in "
                                   "it was uploaded (normally it is deleted).")
    stream_batch_predictions: int = Field(50, ge=1, description="Most predictions in one "
                                          "streamed batch (keep <= writer max_batch_size).")
    stream_batch_metrics: int = Field(500, ge=1, description="Most metrics in one streamed "
                                      "batch (keep <= writer max_metrics_batch_size).")
    max_metric_name_chars: int = Field(128, ge=1, description="Longest metric name "
                                       "log_metrics accepts (keep <= writer "
                                       "max_metric_name_chars).")
    max_in_flight_batches: int = Field(32, ge=1, description="Batches sent and not yet acked.")
    rpc_timeout_s: float = Field(10.0, gt=0, description="Timeout of CreateRun and FinishRun.")
    create_run_wait_s: float = Field(5.0, ge=0, description="How long train begin waits to "
                                     "learn the run id (the run is created later otherwise).")
    backoff_base_s: float = Field(0.5, gt=0, description="First reconnect delay.")
    backoff_max_s: float = Field(30.0, gt=0, description="Longest reconnect delay.")
    flush_timeout_s: float = Field(30.0, ge=0, description="How long train end waits for the "
                                   "writer to ack everything before leaving it in the spool.")
    thread_join_s: float = Field(5.0, gt=0, description="Wait for the upload thread to stop.")
    poison_batch_attempts: int = Field(5, ge=1, description="Streams in a row that fail with "
                                       "INTERNAL or UNKNOWN at the same oldest batch before "
                                       "that batch moves to the spool's rejected table and "
                                       "the upload goes on without it.")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024,
                                   description="Largest gRPC message sent or received.")

    # --- cost estimate ---
    measure_speed: bool = Field(True, description="Time a short generation at train begin "
                                "to estimate the cost (ignored when decode_ms_per_step is set).")
    speed_probe_tokens: int = Field(8, ge=1, description="New tokens generated by the probe.")
    decode_ms_per_step: float | None = Field(None, gt=0, description="Given decoding speed: "
                                             "milliseconds per token step of one batch.")
    cost_warn_s: float = Field(600.0, ge=0, description="Log a warning when the estimated "
                               "generation time of the whole run passes this.")
    cost_ceiling_s: float | None = Field(None, ge=0, description="Refuse to start training when "
                                         "the estimate passes this; unset: no ceiling.")

    @model_validator(mode="after")
    def _check_limits(self) -> "PredictionsConfig":
        if self.sample_count > self.max_sample_count:
            raise ValueError(f"sample_count={self.sample_count} exceeds the maximum "
                             f"max_sample_count={self.max_sample_count}")
        if self.frequency == "steps" and self.step_interval < self.min_step_interval:
            raise ValueError(f"step_interval={self.step_interval} is below the minimum "
                             f"min_step_interval={self.min_step_interval}")
        check_pairs(self, ("tls_cert_file", "tls_key_file"))
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError(f"backoff_max_s={self.backoff_max_s} is below "
                             f"backoff_base_s={self.backoff_base_s}")
        return self

    def public_dict(self) -> dict:
        """The settings worth storing with the run (no secrets, no local paths)."""
        return self.model_dump(mode="json", exclude={"token", "spool_dir", "writer_address",
                                                     "tls_ca_file", "tls_cert_file",
                                                     "tls_key_file", "tls_server_name"})
