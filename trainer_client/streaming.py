"""The upload side: a background thread that owns the gRPC channel and drains the spool.

The trainer thread only calls `submit` (a bounded queue put). The background
thread runs an asyncio loop with two tasks:

- intake: moves queued pass results into the spool (serialized batches);
- upload: creates the run (CreateRun with the spool's request_id, so retries
  and a later `sync` never create a second run), streams every spooled batch on
  StreamPredictions with its spool sequence number, deletes batches as acks
  arrive, and sends FinishRun once everything is acked.

Each sample's prompt and ground truth goes up once per run (trainer_client.samples): the
spool keeps predictions whole, and a batch declares the samples it names that the writer has
not acknowledged as stored.

A broken stream or an unreachable writer is retried with exponential backoff
and jitter; what was not acked stays in the spool and is replayed on the next
stream (the writer counts replays as duplicates, never stores them twice).
Errors that retrying cannot fix (bad token, invalid run) stop the upload and
leave everything in the spool for `epochlens-sync`; they are logged at ERROR.

A batch the writer refuses (a BatchRejection on the stream) moves to the
spool's rejected table and the upload goes on. A batch that breaks the whole
stream again and again (INTERNAL or UNKNOWN with the same oldest unacked batch,
`poison_batch_attempts` times in a row) is moved there too, so one bad batch can
never hold back the rest of the run. Texts the writer stored with NUL replaced
are logged and counted (`nul_replaced_fields`).
"""

import asyncio
import collections
import json
import logging
import queue
import random
import threading
from collections import Counter
from dataclasses import dataclass

import grpc
from google.protobuf import struct_pb2

from epochlens.v1 import common_pb2, writer_pb2, writer_pb2_grpc
from trainer_client.config import PredictionsConfig
from trainer_client.credentials import Credentials, CredentialsError, resolve_credentials
from trainer_client.payload import MetricsItem, PayloadEncoder
from trainer_client.samples import SampleTracker
from trainer_client.spool import METRICS, PREDICTIONS, Spool
from trainer_client.tls import ClientTLS, open_aio_channel
from trainer_client.tracing import capture_traceparent, trace_metadata

log = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                       grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                       grpc.StatusCode.CANCELLED})
# Failures that may come from the content of one batch rather than the connection.
POISON_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
_CODES = {status.value[0]: status for status in grpc.StatusCode}


@dataclass
class FlushReport:
    """What the upload achieved by the time the client was closed."""

    run_id: str | None
    finished: bool
    inserted: int
    duplicates: int
    pending_batches: int
    pending_predictions: int
    rejected_batches: int
    rejected_predictions: int
    spool_path: str | None
    error: str | None
    metrics_inserted: int = 0
    pending_metrics: int = 0
    rejected_metrics: int = 0
    # What epochlens-sync decided about the run's end state (see trainer_client.offline).
    note: str | None = None

    @property
    def complete(self) -> bool:
        return self.pending_batches == 0 and self.rejected_batches == 0 and self.error is None

    def describe(self) -> str:
        text = (f"run {self.run_id or '(not created yet)'}: {self.inserted} predictions stored, "
                f"{self.duplicates} replays skipped, {self.metrics_inserted} metrics stored, "
                f"finished={self.finished}")
        if self.pending_metrics or self.rejected_metrics:
            text += (f"; metrics still spooled: {self.pending_metrics}, rejected: "
                     f"{self.rejected_metrics}")
        if self.pending_batches:
            text += (f"; {self.pending_predictions} predictions in {self.pending_batches} "
                     f"batches still spooled in {self.spool_path} (upload them with "
                     "`epochlens-sync`)")
        if self.rejected_batches:
            text += (f"; {self.rejected_predictions} predictions in {self.rejected_batches} "
                     f"batches rejected by the writer (kept in {self.spool_path})")
        if self.error:
            text += f"; upload stopped: {self.error}"
        if self.note:
            text += f"; {self.note}"
        return text


class StreamingClient:
    """Uploads a spool in a background thread; `submit` adds a pass's results to it."""

    def __init__(self, config: PredictionsConfig, spool: Spool, address: str,
                 token: str | Credentials | None) -> None:
        """token: a bearer token, or credentials (trainer_client.credentials); None: the API
        key of EPOCHLENS_API_KEY or the credentials file, exchanged for short-lived tokens
        that are refreshed before they end; no key either: calls go without a token.
        The config's tls* files are read here (TLSFileError when one cannot be used): the
        upload and the API key exchange go over TLS when they ask for it."""
        self._tls = ClientTLS.from_settings(config)
        self._config = config
        self._spool = spool
        self._address = address
        self._credentials = resolve_credentials(token, address, tls=self._tls)
        self._refreshed_after_refusal = False
        self._record = spool.record()
        self._encoder = PayloadEncoder(config)
        self._samples = SampleTracker()
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._random = random.Random()
        self.counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main_task: asyncio.Task | None = None
        self._started = threading.Event()
        self._drained = threading.Event()
        self._run_known = threading.Event()
        self._stopping = False
        self._error: str | None = None
        self._acked = 0
        self._poison: tuple[int, int] = (0, 0)  # (oldest pending sequence, failures there)
        self._isolate_until = 0  # send one batch per stream while the oldest is <= this
        self._highest_sent = 0
        self._traceparent = capture_traceparent()
        if self._record.run_id:
            self._run_known.set()

    @property
    def run_id(self) -> str | None:
        return self._record.run_id

    def start(self) -> None:
        """Starts the upload thread (returns once its loop runs)."""
        self._thread = threading.Thread(target=self._thread_main, name="epochlens-upload",
                                        daemon=True)
        self._thread.start()
        self._started.wait()

    def wait_for_run(self, timeout: float) -> str | None:
        """The run id once CreateRun succeeded, or None after timeout seconds."""
        self._run_known.wait(timeout)
        return self._record.run_id

    def submit(self, epoch: int, step: int, results: list) -> None:
        """Hands one pass's results to the upload thread (queue-full policy applies)."""
        self._enqueue((epoch, step, results))

    def submit_metrics(self, item: MetricsItem) -> None:
        """Hands one log_metrics call to the upload thread (queue-full policy applies); the
        metrics go up the same stream as the predictions, in submission order."""
        self._enqueue(item)

    def _enqueue(self, item: tuple | MetricsItem) -> None:
        step = _step_of(item)
        if self._thread is None or not self._thread.is_alive():
            self._count("spooled_without_thread")
            log.error("upload thread is not running: %s at step %d written to the spool "
                      "directly (%d times so far)", _kind_of(item), step,
                      self.counts["spooled_without_thread"])
            self._spool_item(item)
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._on_full(item)
        self._notify()

    def finish(self, state: int = common_pb2.RUN_STATE_SUCCEEDED) -> None:
        """Records the final run state; FinishRun is sent once the spool is uploaded."""
        self._spool.set_finish_state(state)
        self._record.finish_state = state
        self._notify()

    def close(self, timeout: float) -> FlushReport:
        """Waits up to timeout seconds for everything to be acked, then stops the thread."""
        self._stopping = True
        self._notify()
        if self._thread is not None and not self._drained.wait(timeout):
            log.warning("flush timeout (%.1fs) reached with the upload unfinished", timeout)
            if self._loop is not None and self._main_task is not None:
                self._loop.call_soon_threadsafe(self._main_task.cancel)
        if self._thread is not None:
            self._thread.join(self._config.thread_join_s)
        self._intake_now()
        return self._report()

    # ----- trainer-thread helpers -----

    def _on_full(self, item: tuple | MetricsItem) -> None:
        if self._config.queue_full_policy == "spool":
            self._count("spooled_queue_full")
            log.warning("upload queue full (queue_size=%d): %s at step %d written to the "
                        "spool directly (%d times so far)", self._config.queue_size,
                        _kind_of(item), _step_of(item), self.counts["spooled_queue_full"])
            self._spool_item(item)
            return
        self._count("blocked_queue_full")
        log.warning("upload queue full (queue_size=%d): trainer blocked until there is room "
                    "(%d times so far)", self._config.queue_size,
                    self.counts["blocked_queue_full"])
        self._notify()
        while self._thread is not None and self._thread.is_alive():
            try:
                self._queue.put(item, timeout=self._config.thread_join_s)
                return
            except queue.Full:
                continue
        self._spool_item(item)

    def _spool_item(self, item: tuple | MetricsItem) -> None:
        if isinstance(item, MetricsItem):
            batches = self._encoder.encode_metrics(item)
            for payload, count in batches:
                self._spool.append(payload, count, METRICS)
            self._count("spooled_metrics", sum(count for _, count in batches))
            return
        epoch, step, results = item
        for payload, count in self._encoder.encode(epoch, step, results):
            self._spool.append(payload, count)
        self._count("spooled_predictions", sum(1 for r in results if r.prediction is not None))

    def _notify(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop closed between the check and the call
                self._count("late_notifications")

    def _count(self, name: str, amount: int = 1) -> None:
        with self._counts_lock:
            self.counts[name] += amount

    def _intake_now(self) -> bool:
        """Moves everything queued into the spool; True when anything moved."""
        moved = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return moved
            try:
                self._spool_item(item)
                moved = True
            except Exception as exc:
                self._count("intake_errors")
                log.error("could not spool the %s at step %d (%d intake errors so far): %s",
                          _kind_of(item), _step_of(item), self.counts["intake_errors"], exc,
                          exc_info=True)

    def _report(self) -> FlushReport:
        batches, predictions = self._spool.pending_counts()
        rejected, rejected_predictions = self._spool.rejected_counts()
        done = self._spool.is_done()
        delete = done and rejected == 0 and not self._config.keep_spool_files
        path = None if delete else str(self._spool.path)
        metrics = (self._spool.pending_metrics(), self._spool.rejected_metrics())
        self._spool.close(delete=delete)
        return FlushReport(self._record.run_id, self._record.finished, self.counts["inserted"],
                           self.counts["duplicates"], batches, predictions, rejected,
                           rejected_predictions, path, self._error,
                           self.counts["metrics_inserted"], *metrics)

    # ----- upload thread -----

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except asyncio.CancelledError:
            log.info("upload thread stopped at the flush timeout")
        except Exception as exc:
            self._error = f"upload thread crashed: {type(exc).__name__}: {exc}"
            log.error("upload thread crashed; batches stay in %s: %s", self._spool.path, exc,
                      exc_info=True)
        finally:
            self._started.set()
            self._drained.set()  # nothing more will happen: close() need not wait

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        self._kick = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._main_task = asyncio.current_task()
        self._started.set()
        intake = asyncio.create_task(self._intake_loop())
        options = [("grpc.max_send_message_length", self._config.max_message_bytes),
                   ("grpc.max_receive_message_length", self._config.max_message_bytes),
                   ("grpc.service_config", json.dumps(
                       {"loadBalancingConfig": [{self._config.writer_lb_policy: {}}]}))]
        channel = open_aio_channel(self._address, self._tls, options)
        try:
            await self._upload_loop(writer_pb2_grpc.PredictionWriterServiceStub(channel))
        finally:
            intake.cancel()
            await channel.close(grace=None)
            self._intake_now()

    async def _intake_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._intake_now()
            self._kick.set()

    async def _upload_loop(self, stub: writer_pb2_grpc.PredictionWriterServiceStub) -> None:
        attempt = 0
        while True:
            self._kick.clear()
            self._intake_now()
            action = self._next_action()
            if action == "done":
                self._drained.set()
                return
            if action == "idle":
                await self._kick.wait()
                continue
            try:
                await self._act(action, stub)
            except grpc.RpcError as exc:
                if not self._retry_or_stop(exc, action):
                    continue
            except CredentialsError as exc:
                if not self._exchange_failed(exc):
                    continue
            except Exception as exc:
                self._count("upload_errors")
                log.error("unexpected error during %s (%d so far); retrying: %s", action,
                          self.counts["upload_errors"], exc, exc_info=True)
            else:
                attempt = 0
                self._refreshed_after_refusal = False
                continue
            attempt += 1
            await asyncio.sleep(self._retry_delay(action, attempt))

    def _retry_delay(self, action: str, attempt: int) -> float:
        """Counts the retry and logs it with the spool depth; returns the backoff."""
        delay = self._backoff(attempt)
        self._count("upload_retries")
        batches, predictions = self._spool.pending_counts()
        log.info("retrying %s in %.2fs (attempt %d; %d retries so far; spool holds %d batches, "
                 "%d predictions)", action, delay, attempt + 1, self.counts["upload_retries"],
                 batches, predictions)
        return delay

    def stats(self) -> dict[str, int]:
        """The client's counters (upload_retries, connection_errors, inserted, ...) and the
        spool depth now (spool_pending_batches, spool_pending_predictions, spool_rejected_
        batches); plain numbers, no metrics library needed. Call it before close()."""
        with self._counts_lock:
            stats = {"upload_retries": 0, "connection_errors": 0, **self.counts}
        stats["spool_pending_batches"], stats["spool_pending_predictions"] = (
            self._spool.pending_counts())
        stats["spool_rejected_batches"] = self._spool.rejected_counts()[0]
        return stats

    def _next_action(self) -> str:
        if self._error is not None:
            return "done" if self._stopping else "idle"
        if self._record.run_id is None:
            return "create"
        if self._spool.pending_counts()[0]:
            return "stream"
        if self._record.finish_state is not None and not self._record.finished:
            return "finish"
        return "done" if self._stopping else "idle"

    async def _act(self, action: str, stub: writer_pb2_grpc.PredictionWriterServiceStub) -> None:
        if action == "create":
            await self._create_run(stub)
        elif action == "stream":
            await self._stream(stub)
        else:
            await self._finish_run(stub)

    def _retry_or_stop(self, exc: grpc.RpcError, action: str) -> bool:
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.UNKNOWN
        details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        if action == "stream" and code in POISON_CODES:
            self._note_stream_failure(code, details)
        if code == grpc.StatusCode.UNAUTHENTICATED and self._refresh_after_refusal(details):
            return True
        if code in RETRYABLE:
            self._count("connection_errors")
            log.warning("writer %s: %s failed with %s (%s); retrying (errors so far: %d, "
                        "%d batches spooled)", self._address, action, code.name, details,
                        self.counts["connection_errors"], self._spool.pending_counts()[0])
            return True
        self._error = f"{action} failed with {code.name}: {details}"
        log.error("writer %s: %s failed with %s (%s); not retrying, everything stays in %s",
                  self._address, action, code.name, details, self._spool.path)
        return False

    async def _auth(self) -> tuple[tuple[str, str], ...]:
        """The metadata of the next call: authorization (a token exchanged for the API key is
        refreshed, in a worker thread off the loop, when it is near its end) and the
        traceparent of the span the client was created under, if any."""
        traced = trace_metadata(self._traceparent)
        if self._credentials is None:
            return traced
        if not self._credentials.refreshable:
            return (*self._credentials.metadata(), *traced)
        return (*await asyncio.to_thread(self._credentials.metadata), *traced)

    def _refresh_after_refusal(self, details: str) -> bool:
        """A token from an API key refused (expired early for the writer's clock): True once,
        after dropping it, so the next attempt exchanges the key again and reconnects."""
        if (self._credentials is None or not self._credentials.refreshable
                or self._refreshed_after_refusal):
            return False
        self._refreshed_after_refusal = True
        self._credentials.invalidate()
        self._count("token_refused_refreshed")
        log.warning("writer %s refused the token (%s); exchanging the API key again and "
                    "reconnecting (%d times so far)", self._address, details,
                    self.counts["token_refused_refreshed"])
        return True

    def _exchange_failed(self, exc: CredentialsError) -> bool:
        """An API key exchange that failed: True (retry with backoff) when the writer was
        unreachable or busy; otherwise the upload stops and everything stays spooled."""
        if exc.code in RETRYABLE:
            self._count("exchange_errors")
            log.warning("%s; retrying (%d exchange errors so far)", exc,
                        self.counts["exchange_errors"])
            return True
        self._error = str(exc)
        log.error("%s; not retrying, everything stays in %s", exc, self._spool.path)
        return False

    def _note_stream_failure(self, code: grpc.StatusCode, details: str) -> None:
        """Counts failed streams at the same oldest batch; quarantines it at the limit."""
        oldest = self._spool.pending(0, 1)
        if not oldest:
            return
        sequence = oldest[0][0]
        same, failures = self._poison
        failures = failures + 1 if same == sequence else 1
        self._poison = (sequence, failures)
        if failures < self._config.poison_batch_attempts:
            return
        if not self._isolating(sequence):
            # The oldest batch shared those streams with others: find the bad one by
            # sending one batch per stream up to the last one sent.
            self._isolate_until = self._highest_sent
            self._poison = (sequence, 0)
            log.warning("stream failed %d times at batch %d (%s); sending batches %d..%d one "
                        "per stream to find the one that fails", failures, sequence, code.name,
                        sequence, self._isolate_until)
            return
        message = (f"stream failed {failures} times in a row with this batch alone "
                   f"({code.name}: {details}); moved aside so the upload goes on")
        self._spool.settle(sequence, {sequence: (code.name, message)})
        self._poison = (0, 0)
        self._count("rejected_batches")
        self._count("quarantined_batches")
        log.error("batch %d of run %s quarantined in the spool's rejected table: %s "
                  "(%d rejected so far)", sequence, self._record.run_id, message,
                  self.counts["rejected_batches"])

    def _isolating(self, oldest: int) -> bool:
        return 0 < oldest <= self._isolate_until

    def _backoff(self, attempt: int) -> float:
        """Exponential delay with jitter: uniform in [delay/2, delay]."""
        cfg = self._config
        delay = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** min(attempt - 1, 30)))
        return self._random.uniform(delay / 2, delay)

    async def _create_run(self, stub: writer_pb2_grpc.PredictionWriterServiceStub) -> None:
        record = self._record
        config = struct_pb2.Struct()
        config.update(record.config)
        run = await stub.CreateRun(writer_pb2.CreateRunRequest(
            name=record.name, model_name=record.model_name, dataset_name=record.dataset_name,
            config=config, request_id=record.request_id),
            metadata=await self._auth(), timeout=self._config.rpc_timeout_s)
        self._spool.set_run_id(run.id)
        record.run_id = run.id
        self._run_known.set()
        log.info("run %s (%s) created on %s", run.id, record.name, self._address)

    async def _finish_run(self, stub: writer_pb2_grpc.PredictionWriterServiceStub) -> None:
        state = self._record.finish_state or common_pb2.RUN_STATE_SUCCEEDED
        await stub.FinishRun(writer_pb2.FinishRunRequest(run_id=self._record.run_id, state=state),
                             metadata=await self._auth(), timeout=self._config.rpc_timeout_s)
        self._spool.mark_finished()
        self._record.finished = True
        log.info("run %s finished (%s)", self._record.run_id, common_pb2.RunState.Name(state))

    async def _stream(self, stub: writer_pb2_grpc.PredictionWriterServiceStub) -> None:
        """One stream: sends every spooled batch in order (at most max_in_flight_batches
        unacked), half-closes, and returns when the writer has settled all of them."""
        call = stub.StreamPredictions(metadata=await self._auth())
        self._acked = 0
        self._samples.new_stream()
        reader = asyncio.create_task(self._read_acks(call))
        try:
            await self._send_all(call, reader)
            if not reader.done():
                await call.done_writing()
            await reader
        finally:
            if not reader.done():
                reader.cancel()
                call.cancel()

    async def _send_all(self, call, reader: asyncio.Task) -> None:
        last_sent = 0
        sent: collections.deque[int] = collections.deque()
        while not reader.done():
            self._kick.clear()
            while sent and sent[0] <= self._acked:
                sent.popleft()
            room = self._config.max_in_flight_batches - len(sent)
            rows = self._spool.pending(last_sent, room) if room > 0 else []
            isolating = bool(rows) and self._isolating(rows[0][0])
            for sequence, payload, kind in rows[:1] if isolating else rows:
                await call.write(self._request(sequence, payload, kind))
                self._count("sent_batches")
                sent.append(sequence)
                last_sent = self._highest_sent = sequence
            if isolating or not self._spool.pending(last_sent, 1):
                return  # everything (or the one isolated batch) is sent: half-close
            if not rows:
                await self._wait_any(self._kick.wait(), reader)

    def _request(self, sequence: int, payload: bytes,
                 kind: str) -> writer_pb2.StreamPredictionsRequest:
        if kind == METRICS:
            metrics = writer_pb2.WriteMetricsRequest.FromString(payload).metrics
            return writer_pb2.StreamPredictionsRequest(
                sequence=sequence, run_id=self._record.run_id, metrics=metrics)
        predictions = list(writer_pb2.WritePredictionsRequest.FromString(payload).predictions)
        samples = self._samples.prepare(sequence, predictions)
        return writer_pb2.StreamPredictionsRequest(sequence=sequence, run_id=self._record.run_id,
                                                   predictions=predictions, samples=samples)

    async def _read_acks(self, call) -> None:
        async for response in call:
            rejections = {}
            for rejection in response.rejections:
                code = _CODES.get(rejection.status.code, grpc.StatusCode.UNKNOWN).name
                rejections[rejection.sequence] = (code, rejection.status.message)
                self._count("rejected_batches")
                log.error("writer rejected batch %d of run %s (%s: %s); it is kept in the "
                          "spool's rejected table (%d rejected so far)", rejection.sequence,
                          self._record.run_id, code, rejection.status.message,
                          self.counts["rejected_batches"])
            self._spool.settle(response.acked_sequence, rejections)
            self._samples.settle(response.acked_sequence, set(rejections))
            self._note_replaced(response.nul_replaced_fields)
            self._acked = response.acked_sequence
            self._count("inserted", response.inserted_count)
            self._count("duplicates", response.duplicate_count)
            self._count("metrics_inserted", response.metric_inserted_count)
            self._count("metric_duplicates", response.metric_duplicate_count)
            self._note_conflicts(response.metric_conflicting_fields)
            self._kick.set()

    def _note_replaced(self, fields) -> None:
        if not fields:
            return
        self._count("nul_replaced_fields", len(fields))
        log.warning("writer stored %d texts of run %s with NUL replaced by U+FFFD (%s; %d so "
                    "far)", len(fields), self._record.run_id, ", ".join(fields[:5]),
                    self.counts["nul_replaced_fields"])

    def _note_conflicts(self, fields) -> None:
        if not fields:
            return
        self._count("metric_conflicts", len(fields))
        log.warning("writer kept the values already stored for %d metrics of run %s and did "
                    "not store the new ones (same run, step and name, another value: %s; %d "
                    "so far)", len(fields), self._record.run_id, ", ".join(fields[:5]),
                    self.counts["metric_conflicts"])

    @staticmethod
    async def _wait_any(awaitable, task: asyncio.Task) -> None:
        waiter = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()


def _step_of(item: tuple | MetricsItem) -> int:
    return item.step if isinstance(item, MetricsItem) else item[1]


def _kind_of(item: tuple | MetricsItem) -> str:
    return METRICS if isinstance(item, MetricsItem) else f"{PREDICTIONS} pass"
