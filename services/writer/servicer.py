"""PredictionWriterService: runs and predictions in, acks out."""

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from epochlens.v1 import common_pb2, writer_pb2, writer_pb2_grpc
from services.common.auth import current_user
from services.common.convert import parse_run_id, run_to_proto
from services.common.errors import DomainError, FieldViolation, InvalidArgument, NotFound
from services.writer.config import WriterSettings
from services.writer.repository import Batch, WriterRepository
from services.writer.validation import check_finish_state, validate_batch, validate_create_run

log = logging.getLogger(__name__)

_END = object()


@dataclass
class _Group:
    """Batches read from a stream that are settled together in one transaction."""

    requests: list[writer_pb2.StreamPredictionsRequest] = field(default_factory=list)
    rows: int = 0
    ended: bool = False


class WriterServicer(writer_pb2_grpc.PredictionWriterServiceServicer):
    def __init__(self, repository: WriterRepository, settings: WriterSettings) -> None:
        self._repo = repository
        self._settings = settings
        self.counts: Counter[str] = Counter()

    async def CreateRun(self, request: writer_pb2.CreateRunRequest,
                        context: grpc.aio.ServicerContext) -> common_pb2.Run:
        config = validate_create_run(request, self._settings)
        row = await self._repo.create_run(current_user(), {
            "name": request.name, "model_name": request.model_name,
            "dataset_name": request.dataset_name, "config": config,
            "request_id": request.request_id or None})
        log.info("run %s created by %s (%s)", row.id, row.user_id, row.name)
        return run_to_proto(row)

    async def FinishRun(self, request: writer_pb2.FinishRunRequest,
                        context: grpc.aio.ServicerContext) -> common_pb2.Run:
        run_id = parse_run_id(request.run_id)
        state = check_finish_state(request.state)
        return run_to_proto(await self._repo.finish_run(current_user(), run_id, state))

    async def WritePredictions(self, request: writer_pb2.WritePredictionsRequest,
                               context: grpc.aio.ServicerContext
                               ) -> writer_pb2.WritePredictionsResponse:
        run_id = validate_batch(request.run_id, request.predictions, self._settings)
        result, missing = await self._repo.commit(current_user(),
                                                  [Batch(run_id, request.predictions)])
        if missing:
            raise NotFound(f"run {run_id} not found", {"run_id": str(run_id)})
        self.counts["inserted"] += result.inserted
        self.counts["duplicates"] += result.duplicates
        return writer_pb2.WritePredictionsResponse(inserted_count=result.inserted,
                                                   duplicate_count=result.duplicates)

    async def StreamPredictions(self, request_iterator: AsyncIterator,
                                context: grpc.aio.ServicerContext
                                ) -> AsyncIterator[writer_pb2.StreamPredictionsResponse]:
        user = current_user()
        queue: asyncio.Queue = asyncio.Queue(maxsize=self._settings.stream_read_ahead_batches)
        reader = asyncio.create_task(_pump(request_iterator, queue))
        acked = 0
        try:
            while True:
                group = await self._next_group(queue)
                if group.requests:
                    response = await self._settle(user, group.requests, acked)
                    acked = response.acked_sequence
                    yield response
                if group.ended:
                    return
        finally:
            reader.cancel()

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
            group.rows += len(item.predictions)
            if group.rows >= self._settings.stream_group_rows or queue.empty():
                return group
            item = queue.get_nowait()

    async def _settle(self, user: str, requests: list[writer_pb2.StreamPredictionsRequest],
                      acked: int) -> writer_pb2.StreamPredictionsResponse:
        """Validates each batch, commits the valid ones together, reports the rest."""
        response = writer_pb2.StreamPredictionsResponse(acked_sequence=acked)
        batches: list[tuple[int, Batch]] = []
        for request in requests:
            try:
                batches.append((request.sequence, self._check(request, response.acked_sequence)))
            except DomainError as exc:
                self._reject(response, user, request.sequence, exc)
            response.acked_sequence = max(response.acked_sequence, request.sequence)
        if batches:
            result, missing = await self._repo.commit(user, [b for _, b in batches])
            response.inserted_count, response.duplicate_count = result.inserted, result.duplicates
            self.counts["inserted"] += result.inserted
            self.counts["duplicates"] += result.duplicates
            for sequence, batch in batches:
                if batch.run_id in missing:
                    self._reject(response, user, sequence, NotFound(
                        f"run {batch.run_id} not found", {"run_id": str(batch.run_id)}))
        return response

    def _check(self, request: writer_pb2.StreamPredictionsRequest, acked: int) -> Batch:
        if request.sequence <= acked:
            raise InvalidArgument([FieldViolation(
                "sequence", f"must be > {acked} (strictly increasing), got {request.sequence}")])
        run_id = validate_batch(request.run_id, request.predictions, self._settings)
        return Batch(run_id, request.predictions)

    def _reject(self, response: writer_pb2.StreamPredictionsResponse, user: str, sequence: int,
                exc: DomainError) -> None:
        self.counts["rejected_batches"] += 1
        log.warning("stream batch %d of %s rejected (%s, total rejected %d): %s", sequence, user,
                    exc.reason, self.counts["rejected_batches"], exc.message)
        response.rejections.add(sequence=sequence, status=exc.to_status())


async def _pump(request_iterator: AsyncIterator, queue: asyncio.Queue) -> None:
    """Reads the client's batches into the queue; ends with _END or the read error."""
    try:
        async for request in request_iterator:
            await queue.put(request)
    except Exception as exc:  # handed to the settling loop, which raises it
        await queue.put(exc)
        return
    await queue.put(_END)
