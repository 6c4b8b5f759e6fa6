"""QueryService: the read side, paginated with keyset page tokens."""

import uuid
from datetime import datetime

import grpc

from epochlens.v1 import common_pb2, judge_pb2, query_pb2, query_pb2_grpc
from services.common.auth import current_user
from services.common.convert import parse_run_id, run_to_proto, timestamp, utc
from services.common.errors import FieldViolation, InvalidArgument
from services.query.config import QuerySettings
from services.query.judgments import JudgmentFilter, add_judgments
from services.query.pagination import PageTokens, resolve_page_size
from services.query.repository import QueryRepository


def prediction_to_proto(row) -> common_pb2.Prediction:
    return common_pb2.Prediction(
        run_id=str(row.run_id), epoch=row.epoch, step=row.step, sample_index=row.sample_index,
        prompt=row.prompt, ground_truth=row.ground_truth, prediction=row.prediction,
        generation_time_ms=row.generation_time_ms, prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens, create_time=timestamp(row.create_time))


def _judgment_filter(request: query_pb2.ListJudgmentsRequest) -> JudgmentFilter:
    epoch = request.epoch if request.HasField("epoch") else None
    _check_non_negative("epoch", epoch)
    if request.judge_type not in judge_pb2.JudgeType.values():
        raise InvalidArgument([FieldViolation(
            "judge_type", f"unknown judge type {request.judge_type}")])
    return JudgmentFilter(epoch, request.criterion, request.judge_type)


def _check_non_negative(name: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise InvalidArgument([FieldViolation(name, f"must be >= 0, got {value}")])


class QueryServicer(query_pb2_grpc.QueryServiceServicer):
    def __init__(self, repository: QueryRepository, settings: QuerySettings) -> None:
        self._repo = repository
        self._settings = settings
        self._tokens = PageTokens(settings.page_token_secret.get_secret_value().encode())

    def _page_size(self, requested: int) -> int:
        return resolve_page_size(requested, self._settings.page_size_default,
                                 self._settings.page_size_max)

    async def ListRuns(self, request: query_pb2.ListRunsRequest,
                       context: grpc.aio.ServicerContext) -> query_pb2.ListRunsResponse:
        size = self._page_size(request.page_size)
        filters = {"method": "ListRuns"}
        key = self._tokens.decode(request.page_token, filters)
        after = None if key is None else (datetime.fromisoformat(key[0]), uuid.UUID(key[1]))
        rows = await self._repo.list_runs(current_user(), after, size + 1)
        response = query_pb2.ListRunsResponse(runs=[run_to_proto(r) for r in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = self._tokens.encode(
                filters, [utc(last.create_time).isoformat(), str(last.id)])
        return response

    async def GetRun(self, request: query_pb2.GetRunRequest,
                     context: grpc.aio.ServicerContext) -> common_pb2.Run:
        return run_to_proto(await self._repo.get_run(current_user(),
                                                     parse_run_id(request.run_id)))

    async def ListPredictions(self, request: query_pb2.ListPredictionsRequest,
                              context: grpc.aio.ServicerContext
                              ) -> query_pb2.ListPredictionsResponse:
        run_id = parse_run_id(request.run_id)
        epoch = request.epoch if request.HasField("epoch") else None
        sample = request.sample_index if request.HasField("sample_index") else None
        _check_non_negative("epoch", epoch)
        _check_non_negative("sample_index", sample)
        size = self._page_size(request.page_size)
        filters = {"method": "ListPredictions", "run_id": str(run_id), "epoch": epoch,
                   "sample_index": sample}
        key = self._tokens.decode(request.page_token, filters)
        rows = await self._repo.list_predictions(current_user(), run_id, epoch, sample,
                                                 None if key is None else tuple(key), size + 1)
        response = query_pb2.ListPredictionsResponse(
            predictions=[prediction_to_proto(r) for r in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = self._tokens.encode(filters, [last.step, last.sample_index])
        return response

    async def ListEpochs(self, request: query_pb2.ListEpochsRequest,
                         context: grpc.aio.ServicerContext) -> query_pb2.ListEpochsResponse:
        run_id = parse_run_id(request.run_id)
        size = self._page_size(request.page_size)
        filters = {"method": "ListEpochs", "run_id": str(run_id)}
        key = self._tokens.decode(request.page_token, filters)
        rows = await self._repo.list_epochs(current_user(), run_id,
                                            None if key is None else key[0], size + 1)
        response = query_pb2.ListEpochsResponse(epochs=[query_pb2.EpochSummary(
            epoch=r.epoch, prediction_count=r.prediction_count, latest_step=r.latest_step,
            first_create_time=timestamp(r.first_create_time),
            last_create_time=timestamp(r.last_create_time)) for r in rows[:size]])
        if len(rows) > size:
            response.next_page_token = self._tokens.encode(filters, [rows[size - 1].epoch])
        return response

    async def CompareSample(self, request: query_pb2.CompareSampleRequest,
                            context: grpc.aio.ServicerContext
                            ) -> query_pb2.CompareSampleResponse:
        run_id = parse_run_id(request.run_id)
        _check_non_negative("sample_index", request.sample_index)
        rows, judged = await self._repo.sample_history(current_user(), run_id,
                                                       request.sample_index)
        first = rows[0]
        response = query_pb2.CompareSampleResponse(
            run_id=str(run_id), sample_index=request.sample_index, prompt=first.prompt,
            ground_truth=first.ground_truth)
        for r in rows:
            entry = response.predictions.add(
                epoch=r.epoch, step=r.step, prediction=r.prediction,
                generation_time_ms=r.generation_time_ms, completion_tokens=r.completion_tokens,
                create_time=timestamp(r.create_time))
            add_judgments(entry.judgments, judged.get(r.step, ()))
        return response

    async def ListJudgments(self, request: query_pb2.ListJudgmentsRequest,
                            context: grpc.aio.ServicerContext
                            ) -> query_pb2.ListJudgmentsResponse:
        run_id = parse_run_id(request.run_id)
        filters = _judgment_filter(request)
        size = self._page_size(request.page_size)
        fingerprint = {"method": "ListJudgments", "run_id": str(run_id), "epoch": filters.epoch,
                       "criterion": filters.criterion, "judge_type": filters.judge_type}
        key = self._tokens.decode(request.page_token, fingerprint)
        rows = await self._repo.list_judgments(current_user(), run_id, filters,
                                               None if key is None else tuple(key), size + 1)
        response = query_pb2.ListJudgmentsResponse()
        add_judgments(response.judgments, rows[:size])
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = self._tokens.encode(fingerprint, [
                last.step, last.sample_index, last.criterion, last.judge_type, last.judge_model])
        return response

    async def GetRunSummary(self, request: query_pb2.GetRunSummaryRequest,
                            context: grpc.aio.ServicerContext) -> query_pb2.RunSummary:
        return await self._repo.run_summary(current_user(), parse_run_id(request.run_id))
