"""Run: the public client API for any training loop (no torch, no transformers).

    from trainer_client import Run

    with Run("sft-1", model_name="my-model", writer="localhost:50051") as run:
        for step in range(steps):
            loss = train_step()
            run.log_metrics(step, {"loss": loss, "learning_rate": lr}, epoch=step / per_epoch)
            if step % 100 == 0:
                run.log_predictions(epoch, step, [{"sample_index": 0, "prompt": "2+2=",
                                                   "prediction": "4", "ground_truth": "4"}])

The run is created with a request_id kept in a spool file (CreateRun is idempotent on it),
and everything logged goes through the same spool, acks, backoff and `epochlens-sync`
guarantees as PredictionsCallback, which is built on this class: nothing is lost when the
writer is away, nothing is stored twice when it comes back. Leaving the with-block finishes
the run SUCCEEDED, or FAILED when it is left by an exception (which is not swallowed).

In a multi-process job, create the run on one process only (active=False elsewhere makes
every call a no-op), or use Predictor, which gathers generations to rank 0.
"""

import logging
import math
import numbers
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from epochlens.v1 import common_pb2
from trainer_client.config import PredictionsConfig
from trainer_client.payload import MetricsItem
from trainer_client.results import GenerationResult
from trainer_client.spool import SPOOL_SUFFIX, RunRecord, Spool
from trainer_client.streaming import FlushReport, StreamingClient
from trainer_client.tls import TLSFileError

log = logging.getLogger(__name__)

FINISH_STATES = {"succeeded": common_pb2.RUN_STATE_SUCCEEDED,
                 "failed": common_pb2.RUN_STATE_FAILED,
                 "cancelled": common_pb2.RUN_STATE_CANCELLED}
# Keys a prediction row (a plain dict) may have; the first three are required.
ROW_REQUIRED = ("sample_index", "prompt", "prediction")
ROW_OPTIONAL = ("ground_truth", "generation_time_ms", "prompt_tokens", "completion_tokens",
                "error")


class Run:
    """A run of the writer, logged to from any loop; a context manager."""

    def __init__(self, name: str, *, model_name: str, dataset_name: str = "",
                 config: PredictionsConfig | None = None,
                 run_config: Mapping[str, Any] | None = None, writer: str | None = None,
                 token: Any = None, request_id: str | None = None,
                 active: bool = True) -> None:
        """request_id: the run's idempotency key; reusing one whose spool file is still in
        spool_dir (a crashed process) continues that run. token: a bearer token or
        credentials (trainer_client.credentials); None: the config's token, or the API key
        of EPOCHLENS_API_KEY / `epochlens login`."""
        if not name.strip() or not model_name.strip():
            raise ValueError("Run needs a non-empty name and model_name")
        self.config = config if config is not None else PredictionsConfig()
        secret = self.config.token.get_secret_value() if self.config.token else None
        self._token = token if token is not None else secret
        self._writer = writer or self.config.writer_address
        self._record = RunRecord(request_id or uuid.uuid4().hex, name, model_name,
                                 dataset_name, dict(run_config or {}))
        self.active = active
        self.client: StreamingClient | None = None
        self.report: FlushReport | None = None
        # The upload client's counters (sent batches, reconnects, ...), kept at finish.
        self.upload_counts: dict[str, int] = {}

    # ----- lifecycle -----

    def start(self) -> "Run":
        """Opens the spool, starts the upload thread and creates the run (waits up to
        create_run_wait_s for its id; an unreachable writer gets it later)."""
        if not self.active or self.client is not None:
            return self
        spool = self._open_spool()
        try:
            self.client = StreamingClient(self.config, spool, self._writer, self._token)
        except TLSFileError:
            spool.close()  # kept, with the run's record, for a start with usable TLS files
            raise
        self.client.start()
        if self.client.wait_for_run(self.config.create_run_wait_s):
            log.info("run %s on %s", self.client.run_id, self._writer)
        else:
            log.warning("writer %s not reachable yet: run %r will be created when it is "
                        "(request_id %s; everything logged waits in %s)", self._writer,
                        self._record.name, self._record.request_id, spool.path)
        return self

    def _open_spool(self) -> Spool:
        path = Path(self.config.spool_dir) / f"{self._record.request_id}{SPOOL_SUFFIX}"
        if path.exists():
            log.info("continuing run request %s from its spool %s", self._record.request_id,
                     path)
            return Spool(path)
        return Spool.create(self.config.spool_dir, self._record)

    def finish(self, state: str | int = "succeeded") -> FlushReport | None:
        """Records the final state, waits up to flush_timeout_s for everything to be acked
        and returns what was achieved (what is not acked stays spooled for epochlens-sync)."""
        if self.client is None:
            return self.report
        client, self.client = self.client, None
        client.finish(_state(state))
        try:
            self.report = client.close(self.config.flush_timeout_s)
        finally:
            self.upload_counts = dict(client.counts)
        message = f"epochlens: {self.report.describe()}"
        if self.report.complete:
            log.info(message)
        else:
            log.warning(message)
        return self.report

    def __enter__(self) -> "Run":
        return self.start()

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is not None and self.client is not None:
            log.error("run %s left by %s: finished as FAILED", self.run_id, exc_type.__name__)
        self.finish("failed" if exc_type is not None else "succeeded")
        return False

    @property
    def run_id(self) -> str | None:
        """The writer's id of the run, once CreateRun succeeded (also after finish)."""
        if self.client is not None:
            return self.client.run_id
        return self.report.run_id if self.report is not None else None

    # ----- logging -----

    def log_predictions(self, epoch: int, step: int,
                        rows: Iterable[Mapping[str, Any] | GenerationResult]) -> int:
        """Queues one pass's predictions; returns how many rows were queued. A row is a
        GenerationResult or a dict with sample_index, prompt and prediction (optional:
        ground_truth, generation_time_ms, prompt_tokens, completion_tokens, error). A row
        that is not one raises ValueError here, before anything is queued."""
        _check_position(epoch, "epoch")
        _check_position(step, "step")
        results = [_result(row, index) for index, row in enumerate(rows)]
        if self._client() is not None and results:
            self.client.submit(epoch, step, results)
        return len(results)

    def log_metrics(self, step: int, values: Mapping[str, Any],
                    epoch: float | None = None) -> None:
        """Queues scalars by name at a step (first value wins per run, step and name on
        the writer). Values must be real numbers (int, float, or a one-element tensor);
        NaN and infinities are left out, logged and counted (the writer refuses them)."""
        _check_position(step, "step")
        if epoch is not None and not (math.isfinite(epoch) and epoch >= 0):
            raise ValueError(f"epoch must be a finite number >= 0, got {epoch!r}")
        clean = {self._name(name): _number(name, value) for name, value in values.items()}
        if self._client() is not None and clean:
            self.client.submit_metrics(MetricsItem(step, clean, epoch, time.time()))

    def _client(self) -> StreamingClient | None:
        if self.active and self.client is None:
            raise RuntimeError("the run is not started: use `with Run(...) as run` or "
                               "call run.start() first (a finished run takes no more logs)")
        return self.client

    def _name(self, name: Any) -> str:
        limit = self.config.max_metric_name_chars
        if not isinstance(name, str) or not name.strip() or len(name) > limit:
            raise ValueError(f"metric name {name!r} must be a non-empty string of at most "
                             f"{limit} characters")
        if "\x00" in name:
            raise ValueError(f"metric name {name!r} contains a NUL character")
        return name


def _state(state: str | int) -> int:
    if isinstance(state, str):
        if state.lower() not in FINISH_STATES:
            raise ValueError(f"unknown run state {state!r}; one of {sorted(FINISH_STATES)}")
        return FINISH_STATES[state.lower()]
    if state not in FINISH_STATES.values():
        raise ValueError(f"unknown run state {state!r}")
    return state


def _check_position(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}")


def _number(name: str, value: Any) -> float:
    """The metric's value as a float; a bool, a string or a tensor of several values raise."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise TypeError(f"metric {name!r}: {value!r} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metric {name!r}: {type(value).__name__} is not a number") from exc


def _result(row: Mapping[str, Any] | GenerationResult, index: int) -> GenerationResult:
    if isinstance(row, GenerationResult):
        return row
    if not isinstance(row, Mapping):
        raise ValueError(f"rows[{index}]: a dict or GenerationResult, got {type(row).__name__}")
    missing = [key for key in ROW_REQUIRED if key not in row]
    unknown = sorted(set(row) - set(ROW_REQUIRED) - set(ROW_OPTIONAL))
    if missing or unknown:
        raise ValueError(f"rows[{index}]: missing {missing}, unknown {unknown} (a row has "
                         f"{list(ROW_REQUIRED)} and optionally {list(ROW_OPTIONAL)})")
    _check_position(row["sample_index"], f"rows[{index}].sample_index")
    for key in ("prompt", "prediction", "ground_truth"):
        if key in row and row[key] is not None and not isinstance(row[key], str):
            raise ValueError(f"rows[{index}].{key} must be a string, got "
                             f"{type(row[key]).__name__}")
    if not row["prompt"]:
        raise ValueError(f"rows[{index}].prompt is empty")
    return GenerationResult(
        row["sample_index"], row["prompt"], row.get("ground_truth"), row["prediction"],
        float(row.get("generation_time_ms", 0.0)), row.get("prompt_tokens"),
        row.get("completion_tokens"), row.get("error"))
