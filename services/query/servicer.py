"""QueryService: the read side, paginated with keyset page tokens."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict

import grpc

from epochlens.v1 import common_pb2, judge_pb2, query_pb2, query_pb2_grpc
from services.common.auth import current_user
from services.common.convert import parse_run_id, run_to_proto, timestamp
from services.common.errors import FieldViolation, InvalidArgument, ResourceExhausted
from services.query.compare import compare_query
from services.query.compare_result import Bootstrap, build_response
from services.query.config import QuerySettings
from services.query.judgments import (
    JudgmentFilter,
    add_judgment,
    add_judgments,
    revision_to_proto,
)
from services.query.metrics import MetricsQuery
from services.query.pagination import (
    INT,
    TEXT,
    TIMESTAMP,
    UUID,
    PageLimits,
    PageTokens,
    fill_page,
    resolve_page_size,
)
from services.query.repository import PredictionFilter, QueryRepository, RunFilter
from services.query.watch import CommitSignals, ResumeTokens, watch_events

# The keyset key of each paged method, as its page tokens carry it.
PAGE_KEYS = {
    "ListRuns": (TIMESTAMP, UUID),  # (create_time, id), newest first
    "ListPredictions": (INT, INT),  # (step, sample_index)
    "ListEpochs": (INT,),  # (epoch,)
    "CompareSample": (INT,),  # (step,) within the sample
    "ListJudgments": (INT, INT, TEXT, INT, TEXT),  # judgments.JUDGMENT_ORDER
}


def add_prediction(target, row) -> common_pb2.Prediction:
    """Appends the Prediction of `row` to the repeated field `target` and returns it."""
    return target.add(
        run_id=str(row.run_id), epoch=row.epoch, step=row.step, sample_index=row.sample_index,
        prompt=row.prompt, ground_truth=row.ground_truth, prediction=row.prediction,
        generation_time_ms=row.generation_time_ms, prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens, create_time=timestamp(row.create_time))


def _add_run(target, row) -> common_pb2.Run:
    target.append(run_to_proto(row))
    return target[-1]


def _add_epoch(target, row) -> query_pb2.EpochSummary:
    return target.add(epoch=row.epoch, prediction_count=row.prediction_count,
                      latest_step=row.latest_step,
                      first_create_time=timestamp(row.first_create_time),
                      last_create_time=timestamp(row.last_create_time))


def _sample_adder(judged: dict[int, list]):
    """A fill_page `add` for CompareSample: one SamplePrediction with its judgments."""
    def add(target, row) -> query_pb2.SamplePrediction:
        entry = target.add(epoch=row.epoch, step=row.step, prediction=row.prediction,
                           generation_time_ms=row.generation_time_ms,
                           completion_tokens=row.completion_tokens,
                           create_time=timestamp(row.create_time))
        add_judgments(entry.judgments, judged.get(row.step, ()))
        return entry
    return add


def _judgment_filter(request: query_pb2.ListJudgmentsRequest) -> JudgmentFilter:
    epoch = request.epoch if request.HasField("epoch") else None
    _check_non_negative("epoch", epoch)
    if request.judge_type not in judge_pb2.JudgeType.values():
        raise InvalidArgument([FieldViolation(
            "judge_type", f"unknown judge type {request.judge_type}")])
    return JudgmentFilter(epoch, request.criterion, request.judge_type)


def _prediction_filter(request: query_pb2.ListPredictionsRequest) -> PredictionFilter:
    epoch = request.epoch if request.HasField("epoch") else None
    sample = request.sample_index if request.HasField("sample_index") else None
    _check_non_negative("epoch", epoch)
    _check_non_negative("sample_index", sample)
    passed = request.passed if request.HasField("passed") else None
    if passed is not None and not request.criterion:
        raise InvalidArgument([FieldViolation("passed", "needs criterion")])
    return PredictionFilter(epoch, sample, request.criterion, passed)


def _run_kind_filter(kind: int) -> int:
    """ListRuns' kind filter (0: any kind); an enum value this code does not know is
    INVALID_ARGUMENT."""
    if kind not in common_pb2.RunKind.values():
        raise InvalidArgument([FieldViolation("kind", f"unknown run kind {kind}")])
    return kind


def _check_non_negative(name: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise InvalidArgument([FieldViolation(name, f"must be >= 0, got {value}")])


class QueryServicer(query_pb2_grpc.QueryServiceServicer):
    def __init__(self, repository: QueryRepository, settings: QuerySettings,
                 signals: CommitSignals, notified: bool) -> None:
        """signals: wakes WatchRun streams; notified: whether commits are notified
        (PostgreSQL) or must be polled (SQLite)."""
        self._repo = repository
        self._settings = settings
        secret = settings.page_token_secret.get_secret_value().encode()
        self._tokens = {method: PageTokens(secret, method, key)
                        for method, key in PAGE_KEYS.items()}
        self._resume = ResumeTokens(secret)
        self._signals = signals
        self._idle_s = settings.watch_resync_s if notified else settings.watch_poll_s

    def _limits(self, requested: int) -> PageLimits:
        return PageLimits(resolve_page_size(requested, self._settings.page_size_default,
                                            self._settings.page_size_max),
                          self._settings.max_response_bytes)

    async def ListRuns(self, request: query_pb2.ListRunsRequest,
                       context: grpc.aio.ServicerContext) -> query_pb2.ListRunsResponse:
        filters = RunFilter(request.name_contains, request.model_contains, request.state,
                            _run_kind_filter(request.kind))
        fingerprint = asdict(filters)
        limits, tokens = self._limits(request.page_size), self._tokens["ListRuns"]
        after = tokens.decode(request.page_token, fingerprint)
        rows = await self._repo.list_runs(current_user(), filters, after, limits.rows + 1)
        response = query_pb2.ListRunsResponse()
        fill_page(response, "runs", rows, limits, _add_run,
                  lambda last: tokens.encode(fingerprint, (last.create_time, last.id)))
        return response

    async def GetRun(self, request: query_pb2.GetRunRequest,
                     context: grpc.aio.ServicerContext) -> common_pb2.Run:
        return run_to_proto(await self._repo.get_run(current_user(),
                                                     parse_run_id(request.run_id)))

    async def ListPredictions(self, request: query_pb2.ListPredictionsRequest,
                              context: grpc.aio.ServicerContext
                              ) -> query_pb2.ListPredictionsResponse:
        run_id, filters = parse_run_id(request.run_id), _prediction_filter(request)
        limits, tokens = self._limits(request.page_size), self._tokens["ListPredictions"]
        fingerprint = {"run_id": str(run_id), **asdict(filters)}
        after = tokens.decode(request.page_token, fingerprint)
        rows = await self._repo.list_predictions(current_user(), run_id, filters, after,
                                                 limits.rows + 1)
        response = query_pb2.ListPredictionsResponse()
        fill_page(response, "predictions", rows, limits, add_prediction,
                  lambda last: tokens.encode(fingerprint, (last.step, last.sample_index)))
        return response

    async def ListEpochs(self, request: query_pb2.ListEpochsRequest,
                         context: grpc.aio.ServicerContext) -> query_pb2.ListEpochsResponse:
        run_id = parse_run_id(request.run_id)
        limits, tokens = self._limits(request.page_size), self._tokens["ListEpochs"]
        filters = {"run_id": str(run_id)}
        after = tokens.decode(request.page_token, filters)
        rows = await self._repo.list_epochs(current_user(), run_id,
                                            None if after is None else after[0], limits.rows + 1)
        response = query_pb2.ListEpochsResponse()
        fill_page(response, "epochs", rows, limits, _add_epoch,
                  lambda last: tokens.encode(filters, (last.epoch,)))
        return response

    async def CompareSample(self, request: query_pb2.CompareSampleRequest,
                            context: grpc.aio.ServicerContext
                            ) -> query_pb2.CompareSampleResponse:
        run_id = parse_run_id(request.run_id)
        _check_non_negative("sample_index", request.sample_index)
        limits, tokens = self._limits(request.page_size), self._tokens["CompareSample"]
        filters = {"run_id": str(run_id), "sample_index": request.sample_index}
        after = tokens.decode(request.page_token, filters)
        page = await self._repo.sample_page(current_user(), run_id, request.sample_index,
                                            None if after is None else after[0],
                                            limits.rows + 1)
        response = query_pb2.CompareSampleResponse(
            run_id=str(run_id), sample_index=request.sample_index, prompt=page.first.prompt,
            ground_truth=page.first.ground_truth)
        fill_page(response, "predictions", page.rows, limits, _sample_adder(page.judged),
                  lambda last: tokens.encode(filters, (last.step,)))
        return response

    async def ListJudgments(self, request: query_pb2.ListJudgmentsRequest,
                            context: grpc.aio.ServicerContext
                            ) -> query_pb2.ListJudgmentsResponse:
        run_id = parse_run_id(request.run_id)
        filters = _judgment_filter(request)
        limits, tokens = self._limits(request.page_size), self._tokens["ListJudgments"]
        fingerprint = {"run_id": str(run_id), "epoch": filters.epoch,
                       "criterion": filters.criterion, "judge_type": filters.judge_type}
        after = tokens.decode(request.page_token, fingerprint)
        rows = await self._repo.list_judgments(current_user(), run_id, filters, after,
                                               limits.rows + 1)
        response, run_text = query_pb2.ListJudgmentsResponse(), str(run_id)
        fill_page(response, "judgments", rows, limits,
                  lambda target, row: add_judgment(target, row, run_text),
                  lambda last: tokens.encode(fingerprint, (
                      last.step, last.sample_index, last.criterion, last.judge_type,
                      last.judge_model)))
        return response

    async def GetRunSummary(self, request: query_pb2.GetRunSummaryRequest,
                            context: grpc.aio.ServicerContext) -> query_pb2.RunSummary:
        user, run_id = current_user(), parse_run_id(request.run_id)
        summary = await self._repo.run_summary(user, run_id,
                                               self._settings.summary_max_failures,
                                               self._settings.agreement_key_chunk)
        summary.pairwise.extend(await self._repo.pairwise(user, run_id,
                                                          self._settings.confidence_level))
        return summary

    async def ListJudgmentRevisions(self, request: query_pb2.ListJudgmentRevisionsRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> query_pb2.ListJudgmentRevisionsResponse:
        """Bounded without paging: the judge keeps at most max_human_revisions per author."""
        run_id = parse_run_id(request.run_id)
        _check_non_negative("step", request.step)
        _check_non_negative("sample_index", request.sample_index)
        if not request.criterion:
            raise InvalidArgument([FieldViolation("criterion", "required")])
        rows = await self._repo.judgment_revisions(current_user(), run_id, request.step,
                                                   request.sample_index, request.criterion)
        return query_pb2.ListJudgmentRevisionsResponse(
            revisions=[revision_to_proto(r) for r in rows])

    async def ListMetrics(self, request: query_pb2.ListMetricsRequest,
                          context: grpc.aio.ServicerContext) -> query_pb2.ListMetricsResponse:
        """Not paged: every series is downsampled to its point budget (services.query.metrics)."""
        return await self._repo.list_metrics(current_user(), self._metrics_query(request))

    def _metrics_query(self, request: query_pb2.ListMetricsRequest) -> MetricsQuery:
        cfg = self._settings
        run_id = parse_run_id(request.run_id)
        start = request.start_step if request.HasField("start_step") else None
        end = request.end_step if request.HasField("end_step") else None
        _check_non_negative("start_step", start)
        _check_non_negative("end_step", end)
        violations = []
        if request.max_points < 0:
            violations.append(FieldViolation("max_points", f"must be >= 0, got "
                                             f"{request.max_points}"))
        if start is not None and end is not None and end < start:
            violations.append(FieldViolation("end_step", f"must be >= start_step ({start})"))
        names = tuple(sorted(set(request.names)))
        if len(names) > cfg.metrics_max_series:
            violations.append(FieldViolation("names", f"{len(names)} names exceed the maximum "
                                             f"of {cfg.metrics_max_series} series"))
        if violations:
            raise InvalidArgument(violations)
        points = min(request.max_points or cfg.metrics_points_default, cfg.metrics_points_max)
        return MetricsQuery(run_id, names, points, cfg.metrics_max_points_total,
                            cfg.metrics_max_series, start, end)

    async def WatchRun(self, request: query_pb2.WatchRunRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[query_pb2.WatchRunEvent]:
        """Server stream (services.query.watch): each event carries its resume token."""
        run_id, user = parse_run_id(request.run_id), current_user()
        cursor = self._resume.decode(run_id, request.resume_token)
        if self._signals.watching >= self._settings.watch_max_streams:
            raise ResourceExhausted(
                f"this query service already serves {self._settings.watch_max_streams} "
                "WatchRun streams; retry later", {"limit": "watch_max_streams"})
        cfg = self._settings

        async def read(current):
            return await self._repo.watch_read(user, run_id, current, cfg.watch_metric_points,
                                               cfg.metrics_max_series)
        with self._signals.subscribe(str(run_id)) as wake:
            async for event in watch_events(read, wake, cursor, cfg, self._idle_s):
                event.resume_token = self._resume.encode(run_id, cursor)
                yield event

    async def CompareRuns(self, request: query_pb2.CompareRunsRequest,
                          context: grpc.aio.ServicerContext) -> query_pb2.CompareRunsResponse:
        """Reads both sides (services.query.compare), then computes the deltas and bootstrap
        intervals in a worker thread so the event loop keeps serving."""
        cfg = self._settings
        query = compare_query(request, cfg.compare_max_changes_default,
                              cfg.compare_max_changes_max)
        sides = await self._repo.compare_sides(current_user(), query, cfg.compare_max_samples)
        bootstrap = Bootstrap(cfg.compare_bootstrap_resamples, cfg.compare_seed,
                              cfg.confidence_level)
        response = await asyncio.to_thread(build_response, sides, bootstrap, query.max_changes)
        response.pairwise.extend(await self._repo.pairwise(
            current_user(), uuid.UUID(response.run_id), cfg.confidence_level,
            epoch=response.epoch, baseline_run_id=uuid.UUID(response.baseline_run_id),
            baseline_epoch=response.baseline_epoch))
        return response
