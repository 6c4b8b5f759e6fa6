"""PredictionWriterService: runs and predictions in, acks out."""

import asyncio
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from sqlalchemy import exc as sa_exc

from epochlens.v1 import common_pb2, writer_pb2, writer_pb2_grpc
from services.common.auth import current_user
from services.common.convert import parse_run_id, run_to_proto
from services.common.errors import (
    DomainError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    StorageRefused,
)
from services.common.interceptors import RejectedRequest
from services.writer.config import WriterSettings
from services.writer.deletion import RunDeleter
from services.writer.judge_check import JudgeConfigCheck
from services.writer.repository import Batch, CommitResult, WriterRepository
from services.writer.samples import SampleConflict, StreamSamples
from services.writer.telemetry import REJECTED_BATCHES
from services.writer.validation import (
    check_finish_state,
    replace_nul_texts,
    validate_batch,
    validate_create_run,
    validate_metrics,
)

log = logging.getLogger(__name__)

# Database errors caused by a batch's content rather than by the database being away: a
# group that hits one is committed batch by batch, and only the batch that still fails is
# rejected (INTERNAL), so one bad batch cannot stop a stream.
BATCH_DATA_ERRORS = (sa_exc.IntegrityError, sa_exc.DataError)

_END = object()

# Valid batches of a group, each with its sequence number.
_Sequenced = list[tuple[int, Batch]]


@dataclass
class _Group:
    """Batches read from a stream that are settled together in one transaction."""

    requests: list[writer_pb2.StreamPredictionsRequest] = field(default_factory=list)
    rows: int = 0
    ended: bool = False


class WriterServicer(writer_pb2_grpc.PredictionWriterServiceServicer):
    def __init__(self, repository: WriterRepository, settings: WriterSettings,
                 judge_check: JudgeConfigCheck | None = None,
                 deleter: RunDeleter | None = None) -> None:
        """judge_check: the judge's check of a run's judge section (None: judging is off);
        deleter: DeleteRun's (None: one without the judge's purge)."""
        self._repo = repository
        self._settings = settings
        self._judge_check = judge_check
        self._deleter = deleter or RunDeleter(repository.engine, settings, None)
        self.counts: Counter[str] = Counter()

    async def CreateRun(self, request: writer_pb2.CreateRunRequest,
                        context: grpc.aio.ServicerContext) -> common_pb2.Run:
        config, kind = validate_create_run(request, self._settings)
        if self._judge_check is not None:
            await self._judge_check.check(current_user(), config)
        row = await self._repo.create_run(current_user(), {
            "name": request.name, "model_name": request.model_name,
            "dataset_name": request.dataset_name, "config": config, "kind": kind,
            "request_id": request.request_id or None})
        log.info("run %s created by %s (%s)", row.id, row.user_id, row.name)
        return run_to_proto(row)

    async def FinishRun(self, request: writer_pb2.FinishRunRequest,
                        context: grpc.aio.ServicerContext) -> common_pb2.Run:
        run_id = parse_run_id(request.run_id)
        state = check_finish_state(request.state)
        return run_to_proto(await self._repo.finish_run(current_user(), run_id, state))

    async def DeleteRun(self, request: writer_pb2.DeleteRunRequest,
                        context: grpc.aio.ServicerContext) -> writer_pb2.DeleteRunResponse:
        """Removes the caller's run and everything stored for it (services.writer.deletion)."""
        run_id = parse_run_id(request.run_id)
        return await self._deleter.delete_run(current_user(), run_id, request.force,
                                              request.allow_missing)

    async def WritePredictions(self, request: writer_pb2.WritePredictionsRequest,
                               context: grpc.aio.ServicerContext
                               ) -> writer_pb2.WritePredictionsResponse:
        run_id = validate_batch(request.run_id, request.predictions, self._settings,
                                samples=request.samples)
        replaced = self._replace_nul(current_user(), run_id, request.predictions, "",
                                     request.samples)
        batch = Batch(run_id, request.predictions, samples=request.samples)
        try:
            result, missing = await self._repo.commit(current_user(), [batch])
        except BATCH_DATA_ERRORS as exc:
            raise _refused_by_store(exc) from exc
        except SampleConflict as exc:
            raise _sample_error(current_user(), run_id, exc.error(0)) from exc
        if missing:
            raise NotFound(f"run {run_id} not found", {"run_id": str(run_id)})
        self.counts["inserted"] += result.inserted
        self.counts["duplicates"] += result.duplicates
        return writer_pb2.WritePredictionsResponse(
            inserted_count=result.inserted, duplicate_count=result.duplicates,
            nul_replaced_fields=replaced)

    async def WriteMetrics(self, request: writer_pb2.WriteMetricsRequest,
                           context: grpc.aio.ServicerContext) -> writer_pb2.WriteMetricsResponse:
        """First value wins per (run, step, name); see services.writer.repository.MetricWrite."""
        run_id = validate_metrics(request.run_id, request.metrics, self._settings)
        try:
            result, missing = await self._repo.commit(
                current_user(), [Batch(run_id, (), request.metrics)])
        except BATCH_DATA_ERRORS as exc:
            raise _refused_by_store(exc) from exc
        if missing:
            raise NotFound(f"run {run_id} not found", {"run_id": str(run_id)})
        conflicts = self._note_metrics(current_user(), result, lambda _: "")
        return writer_pb2.WriteMetricsResponse(
            inserted_count=result.metric_inserted, duplicate_count=result.metric_duplicates,
            conflicting_fields=conflicts)

    def _note_metrics(self, user: str, result: CommitResult, prefix_of) -> list[str]:
        """Counts the metrics of a commit; logs and returns the conflicting ones as paths
        (prefix_of(position of the batch) + `metrics[i]`)."""
        self.counts["metrics_inserted"] += result.metric_inserted
        self.counts["metric_duplicates"] += result.metric_duplicates
        paths = [f"{prefix_of(position)}metrics[{index}]"
                 for position, index in result.metric_conflicts]
        if paths:
            self.counts["metric_conflicts"] += len(paths)
            log.warning("%d metrics of %s not stored: another value is stored for their (run, "
                        "step, name) (%s; %d conflicts so far)", len(paths), user,
                        ", ".join(paths[:5]), self.counts["metric_conflicts"])
        return paths

    def _replace_nul(self, user: str, run_id, items, prefix: str, samples=()) -> list[str]:
        """Replaces NUL in the batch's model texts; logs and counts what it changed."""
        replaced = replace_nul_texts(items, samples)
        if replaced:
            self.counts["nul_replaced_fields"] += len(replaced)
            log.warning("run %s of %s: NUL replaced by U+FFFD in %d texts (%s; %d so far)",
                        run_id, user, len(replaced), ", ".join(replaced[:5]),
                        self.counts["nul_replaced_fields"])
        return [f"{prefix}{path}" for path in replaced]

    async def StreamPredictions(self, request_iterator: AsyncIterator,
                                context: grpc.aio.ServicerContext
                                ) -> AsyncIterator[writer_pb2.StreamPredictionsResponse]:
        """Validates groups in arrival order, commits up to stream_commit_concurrency of them
        at once (each in its own transaction), and acks each as soon as it and every
        group before it are committed."""
        user = current_user()
        queue: asyncio.Queue = asyncio.Queue(maxsize=self._settings.stream_read_ahead_batches)
        reader = asyncio.create_task(_pump(request_iterator, queue))
        commits: deque[asyncio.Task] = deque()
        samples = StreamSamples()
        fetch: asyncio.Task | None = None
        acked, ended = 0, False
        try:
            while not ended or commits:
                if fetch is None and not ended and (
                        len(commits) < self._settings.stream_commit_concurrency):
                    fetch = asyncio.create_task(self._next_group(queue))
                await asyncio.wait([t for t in (fetch, commits[0] if commits else None) if t],
                                   return_when=asyncio.FIRST_COMPLETED)
                if commits and commits[0].done():
                    yield commits.popleft().result()
                if fetch is not None and fetch.done():
                    group, fetch = fetch.result(), None
                    ended = group.ended
                    if group.requests:
                        response, batches = self._prepare(user, group.requests, acked)
                        acked = response.acked_sequence
                        after = (_metrics_wait(batches, commits)
                                 or samples.wait_for(b for _, b in batches))
                        commits.append(asyncio.create_task(self._commit(
                            user, response, batches, after, samples)))
                        samples.declared((b for _, b in batches), commits[-1])
        finally:
            for task in (reader, fetch, *commits):
                if task is not None:
                    task.cancel()

    async def _next_group(self, queue: asyncio.Queue) -> _Group:
        """Waits for one batch, then takes whatever else is queued, up to stream_group_rows."""
        group = _Group()
        item = await queue.get()
        while True:
            if item is _END:
                group.ended = True
                return group
            if isinstance(item, BaseException):
                raise item
            group.requests.append(item)
            message = _message_of(item)
            group.rows += len(message.predictions) + len(message.metrics)
            if group.rows >= self._settings.stream_group_rows or queue.empty():
                return group
            item = queue.get_nowait()

    def _prepare(self, user: str, requests: list[writer_pb2.StreamPredictionsRequest],
                 acked: int) -> tuple[writer_pb2.StreamPredictionsResponse, _Sequenced]:
        """Validates each batch on its own; the response settles them all once committed."""
        response = writer_pb2.StreamPredictionsResponse(acked_sequence=acked)
        batches: _Sequenced = []
        for request in requests:
            try:
                batch = self._check(request, response.acked_sequence)
            except DomainError as exc:
                self._reject(response, user, _sequence_of(request), exc)
            else:
                batches.append((request.sequence, batch))
                response.nul_replaced_fields.extend(self._replace_nul(
                    user, batch.run_id, request.predictions, f"{request.sequence}:",
                    request.samples))
            response.acked_sequence = max(response.acked_sequence, _sequence_of(request))
        return response, batches

    async def _commit(self, user: str, response: writer_pb2.StreamPredictionsResponse,
                      batches: _Sequenced, after: list[asyncio.Task] | None = None,
                      samples: StreamSamples | None = None
                      ) -> writer_pb2.StreamPredictionsResponse:
        """Commits the valid batches of one group together; unknown runs become rejections.
        after: commits of earlier groups to wait for first (see _metrics_wait and
        StreamSamples.wait_for); samples: what the stream knows of its samples."""
        if after:
            await asyncio.wait(after)
        if not batches:
            return response
        samples = samples or StreamSamples()
        try:
            result, missing = await self._repo.commit(user, [b for _, b in batches],
                                                      samples.stored)
        except SampleConflict as exc:
            for position, (sequence, _) in enumerate(batches):
                if position in exc.violations:
                    self._reject(response, user, sequence, exc.error(position))
            rest = [one for position, one in enumerate(batches)
                    if position not in exc.violations]
            return await self._commit(user, response, rest, samples=samples)
        except BATCH_DATA_ERRORS as exc:
            if len(batches) == 1:
                self._reject(response, user, batches[0][0], _refused_by_store(exc))
                return response
            log.warning("group of %d batches of %s refused by the database (%s); committing "
                        "them one by one", len(batches), user, type(exc.orig).__name__)
            for one in batches:
                await self._commit(user, response, [one], samples=samples)
            return response
        samples.committed(b for _, b in batches if b.run_id not in missing)
        response.inserted_count += result.inserted
        response.duplicate_count += result.duplicates
        self.counts["inserted"] += result.inserted
        self.counts["duplicates"] += result.duplicates
        response.metric_inserted_count += result.metric_inserted
        response.metric_duplicate_count += result.metric_duplicates
        response.metric_conflicting_fields.extend(self._note_metrics(
            user, result, lambda position: f"{batches[position][0]}:"))
        for sequence, batch in batches:
            if batch.run_id in missing:
                self._reject(response, user, sequence, NotFound(
                    f"run {batch.run_id} not found", {"run_id": str(batch.run_id)}))
        return response

    def _check(self, request: writer_pb2.StreamPredictionsRequest | RejectedRequest,
               acked: int) -> Batch:
        if isinstance(request, RejectedRequest):
            _check_sequence(request.request.sequence, acked)
            raise request.error
        _check_sequence(request.sequence, acked)
        run_id = validate_batch(request.run_id, request.predictions, self._settings,
                                metrics=request.metrics, samples=request.samples)
        return Batch(run_id, request.predictions, request.metrics, request.samples)

    def _reject(self, response: writer_pb2.StreamPredictionsResponse, user: str, sequence: int,
                exc: DomainError) -> None:
        self.counts["rejected_batches"] += 1
        REJECTED_BATCHES.labels(exc.reason).inc()
        log.warning("stream batch %d of %s rejected (%s, total rejected %d): %s", sequence, user,
                    exc.reason, self.counts["rejected_batches"], exc.message)
        response.rejections.add(sequence=sequence, status=exc.to_status())


def _metrics_wait(batches: _Sequenced, commits: deque[asyncio.Task]) -> list[asyncio.Task]:
    """A group with metrics commits after every earlier group of the stream: the first value
    stored for a (run, step, name) is then the one sent first (groups of predictions only
    commit concurrently; a replayed prediction is identical, so their order does not matter)."""
    return list(commits) if any(batch.metrics for _, batch in batches) else []


def _sample_error(user: str, run_id, error: InvalidArgument) -> InvalidArgument:
    log.warning("batch of run %s of %s refused over its samples: %s", run_id, user,
                error.message)
    return error


def _refused_by_store(exc: sa_exc.DBAPIError) -> StorageRefused:
    log.error("database refused a batch: %s", exc.orig, exc_info=exc)
    return StorageRefused(f"the database refused this batch ({type(exc.orig).__name__}); "
                          "the server log has the details")


def _message_of(request: writer_pb2.StreamPredictionsRequest | RejectedRequest
                ) -> writer_pb2.StreamPredictionsRequest:
    return request.request if isinstance(request, RejectedRequest) else request


def _sequence_of(request: writer_pb2.StreamPredictionsRequest | RejectedRequest) -> int:
    return _message_of(request).sequence


def _check_sequence(sequence: int, acked: int) -> None:
    if sequence <= acked:
        raise InvalidArgument([FieldViolation(
            "sequence", f"must be > {acked} (strictly increasing), got {sequence}")])


async def _pump(request_iterator: AsyncIterator, queue: asyncio.Queue) -> None:
    """Reads the client's batches into the queue; ends with _END or the read error."""
    try:
        async for request in request_iterator:
            await queue.put(request)
    except Exception as exc:  # handed to the settling loop, which raises it
        await queue.put(exc)
        return
    await queue.put(_END)
