"""The CLI's client of the QueryService: one channel, the bearer token, page
iteration, and gRPC errors turned into one-line messages (CliError).

Everything the CLI and the HTML report show comes through here; nothing reads
the database directly.
"""

from collections.abc import Callable, Iterator
from typing import Any, Self

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pydantic import ValidationError

from epochlens.v1 import common_pb2, judge_pb2, query_pb2, query_pb2_grpc
from services.cli.config import CliSettings
from services.common.auth import mint_token
from services.common.balancing import balancing_options
from services.common.config import AuthSettings
from trainer_client.credentials import (
    Credentials,
    CredentialsError,
    StaticToken,
    resolve_credentials,
)
from trainer_client.tls import ClientTLS, TLSFileError, open_channel


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit status `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1, retryable: bool = False,
                 reason: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        # The service was unreachable or slow: the same call may succeed later.
        self.retryable = retryable
        # The service's google.rpc.ErrorInfo reason (e.g. EVALUATION_CHANGED), when it sent one.
        self.reason = reason


def resolve_token(settings: CliSettings) -> str:
    """The configured token, or one minted for settings.user from the auth key."""
    if settings.token:
        return settings.token
    try:
        return mint_token(AuthSettings(), settings.user)
    except (ValidationError, ValueError, OSError) as exc:
        raise CliError("no token: set EPOCHLENS_CLI_TOKEN (or pass --token), log in with an "
                       "API key (`epochlens login`, or EPOCHLENS_API_KEY), or configure "
                       "EPOCHLENS_AUTH_JWT_SECRET so one can be minted", 2) from exc


def cli_tls(settings: CliSettings) -> ClientTLS | None:
    """The TLS of the CLI's channels (the tls* settings; None: plaintext). A file that cannot
    be used is a CliError with exit status 2."""
    try:
        return ClientTLS.from_settings(settings)
    except TLSFileError as exc:
        raise CliError(f"TLS (EPOCHLENS_CLI_TLS_*): {exc}", 2) from None


def cli_channel(settings: CliSettings, address: str) -> grpc.Channel:
    """A blocking channel to a service at address, TLS when the tls* settings ask for it."""
    return open_channel(address, cli_tls(settings),
                        [("grpc.max_receive_message_length", settings.max_message_bytes),
                         *balancing_options(settings.lb_policy)])


def resolve_credentials_for(settings: CliSettings) -> Credentials:
    """--token / EPOCHLENS_CLI_TOKEN; else the API key (EPOCHLENS_API_KEY or the file
    `epochlens login` wrote) exchanged at the writer; else a token minted for settings.user."""
    try:
        credentials = resolve_credentials(settings.token, settings.writer_address,
                                          tls=cli_tls(settings))
    except CredentialsError as exc:
        raise CliError(str(exc), 2) from None
    return credentials if credentials is not None else StaticToken(resolve_token(settings))


class ServiceClient:
    """A channel to one service with the bearer token, and its failures as CliErrors."""

    service = "service"

    def __init__(self, settings: CliSettings, address: str, token: str | None = None) -> None:
        self._settings = settings
        self._address = address
        self._credentials = resolve_credentials_for(
            settings if token is None else settings.model_copy(update={"token": token}))
        self._channel = cli_channel(settings, address)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._channel.close()

    def call(self, method: Callable, request: Any, what: str = "") -> Any:
        """One RPC; a failure becomes a CliError naming what was asked for. A token from an
        API key that the service refuses is exchanged again once (a clock behind the
        server's), then the call is made again."""
        try:
            return self._call_once(method, request)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED or not self._credentials.refreshable:
                raise self._error(exc, what) from None
        self._credentials.invalidate()
        try:
            return self._call_once(method, request)
        except grpc.RpcError as exc:
            raise self._error(exc, what) from None

    def _call_once(self, method: Callable, request: Any) -> Any:
        return method(request, metadata=self._metadata(), timeout=self._settings.timeout_s)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        try:
            return self._credentials.metadata()
        except CredentialsError as exc:
            retryable = exc.code in (grpc.StatusCode.UNAVAILABLE,
                                     grpc.StatusCode.DEADLINE_EXCEEDED)
            raise CliError(str(exc), 1 if retryable else 2, retryable=retryable) from None

    def _error(self, exc: grpc.RpcError, what: str) -> CliError:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            return CliError(f"cannot reach the {self.service} at {self._address} "
                            f"(start it with `epochlens up`): {details}", retryable=True)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return CliError(f"token rejected by {self._address}: {details}", 2)
        if code == grpc.StatusCode.NOT_FOUND:
            return CliError(f"{what or 'resource'} not found")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CliError(f"{self._address} did not answer within "
                            f"{self._settings.timeout_s:g}s", retryable=True)
        return CliError(f"{code.name}: {details}", reason=error_reason(exc))


def error_reason(exc: grpc.RpcError) -> str:
    """The ErrorInfo reason in the call's rich status, "" when it carries none."""
    status = rpc_status.from_call(exc) if isinstance(exc, grpc.Call) else None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


class QueryClient(ServiceClient):
    """Blocking calls to the QueryService at settings.query_address."""

    service = "query service"

    def __init__(self, settings: CliSettings, token: str | None = None) -> None:
        super().__init__(settings, settings.query_address, token)
        self._stub = query_pb2_grpc.QueryServiceStub(self._channel)

    def runs(self, page_size: int = 0, kind: int = 0) -> Iterator[common_pb2.Run]:
        """The caller's runs (of one RunKind; 0: every kind), newest first, every page."""
        return self._pages(self._stub.ListRuns,
                           query_pb2.ListRunsRequest(page_size=page_size, kind=kind),
                           "runs", "runs")

    def watch(self, run_id: str, resume_token: str = "") -> Any:
        """The WatchRun call (an iterator of events, with cancel()); no deadline: it lasts
        as long as the run trains. Its failures go through stream_error."""
        return self._stub.WatchRun(query_pb2.WatchRunRequest(
            run_id=run_id, resume_token=resume_token), metadata=self._metadata())

    def stream_error(self, exc: grpc.RpcError, what: str) -> "CliError":
        """The CliError of a failed stream; a stream the server dropped (CANCELLED) may be
        opened again, like an unreachable service."""
        if exc.code() == grpc.StatusCode.CANCELLED:
            return CliError(f"the stream from {self._address} was dropped: {exc.details()}",
                            retryable=True)
        return self._error(exc, what)

    def run(self, run_id: str) -> common_pb2.Run:
        return self.call(self._stub.GetRun, query_pb2.GetRunRequest(run_id=run_id),
                         f"run {run_id}")

    def epochs(self, run_id: str) -> list[query_pb2.EpochSummary]:
        request = query_pb2.ListEpochsRequest(run_id=run_id)
        return list(self._pages(self._stub.ListEpochs, request, "epochs", f"run {run_id}"))

    def predictions(self, run_id: str, epoch: int | None = None, sample: int | None = None,
                    page_size: int = 0) -> Iterator[common_pb2.Prediction]:
        """The run's predictions in (step, sample_index) order, fetched page by page."""
        request = query_pb2.ListPredictionsRequest(run_id=run_id, epoch=epoch,
                                                   sample_index=sample, page_size=page_size)
        return self._pages(self._stub.ListPredictions, request, "predictions", f"run {run_id}")

    def compare(self, run_id: str, sample: int,
                page_size: int = 0) -> query_pb2.CompareSampleResponse:
        """One sample across the run: every page of CompareSample in one response (the
        prompt and ground truth once, every prediction in step order, no page token)."""
        request = query_pb2.CompareSampleRequest(run_id=run_id, sample_index=sample,
                                                 page_size=page_size)
        what = f"sample {sample} of run {run_id}"
        merged = self.call(self._stub.CompareSample, request, what)
        while merged.next_page_token:
            request.page_token = merged.next_page_token
            reply = self.call(self._stub.CompareSample, request, what)
            merged.predictions.extend(reply.predictions)
            merged.next_page_token = reply.next_page_token
        return merged

    def judgments(self, run_id: str, epoch: int | None = None, criterion: str = "",
                  judge_type: int = 0, page_size: int = 0) -> Iterator[judge_pb2.Judgment]:
        """The run's judgments in (step, sample_index, criterion, judge type, judge model)
        order, fetched page by page."""
        request = query_pb2.ListJudgmentsRequest(run_id=run_id, epoch=epoch, criterion=criterion,
                                                 judge_type=judge_type, page_size=page_size)
        return self._pages(self._stub.ListJudgments, request, "judgments", f"run {run_id}")

    def judgment_revisions(self, run_id: str, step: int, sample: int,
                           criterion: str) -> list[query_pb2.JudgmentRevision]:
        """Every revision of the human judgments of one prediction on one criterion."""
        request = query_pb2.ListJudgmentRevisionsRequest(
            run_id=run_id, step=step, sample_index=sample, criterion=criterion)
        return list(self.call(self._stub.ListJudgmentRevisions, request,
                              f"run {run_id}").revisions)

    def metrics(self, run_id: str, names: list[str],
                max_points: int = 0) -> query_pb2.ListMetricsResponse:
        """The run's metric series, downsampled by the service to max_points each."""
        request = query_pb2.ListMetricsRequest(run_id=run_id, names=names,
                                               max_points=max_points)
        return self.call(self._stub.ListMetrics, request, f"run {run_id}")

    def run_summary(self, run_id: str) -> query_pb2.RunSummary:
        """Per epoch and criterion: mean score, pass rate, counts, tokens, cost; the budget."""
        return self.call(self._stub.GetRunSummary, query_pb2.GetRunSummaryRequest(run_id=run_id),
                         f"run {run_id}")

    def compare_runs(self, request: query_pb2.CompareRunsRequest
                     ) -> query_pb2.CompareRunsResponse:
        """Two epochs or runs compared (CompareRuns): deltas, intervals, changed samples."""
        what = (f"run {request.run_id}" if not request.baseline_run_id
                else f"run {request.run_id} or {request.baseline_run_id}")
        return self.call(self._stub.CompareRuns, request, what)

    def _pages(self, method: Callable, request: Any, field: str, what: str) -> Iterator:
        while True:
            reply = self.call(method, request, what)
            yield from getattr(reply, field)
            if not reply.next_page_token:
                return
            request.page_token = reply.next_page_token
