"""JudgeService: ad hoc judging, the durable hand-off from the writer, the criteria list, cost
estimates and human judgments. Every method acts for the token's user."""

import base64
import binascii
import dataclasses
import logging
import math
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import grpc

from epochlens.v1 import judge_pb2, judge_pb2_grpc
from services.common.auth import current_user
from services.common.convert import parse_run_id, struct_to_dict, timestamp
from services.common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    JudgingRaised,
    Violations,
)
from services.judge.config import JudgeSettings, validate_judge_config
from services.judge.generation import Generator, validate_generation
from services.judge.human import human_range, service_range
from services.judge.llm.cost import estimate, member_prices
from services.judge.llm.prompts import STANDARD_RUBRICS
from services.judge.pairwise import cost as pairwise_cost
from services.judge.pairwise.config import check_baseline_run
from services.judge.pairwise.store import enqueue as enqueue_pairwise
from services.judge.pairwise.store import resume as resume_pairwise
from services.judge.purge import RunPurger, deleted_run
from services.judge.queue import JudgeWorkers, Judging
from services.judge.rules import RULE_CRITERIA
from services.judge.schema import STANDARD_LLM_CRITERIA, Item, ItemFailure, JudgeConfig, Verdict
from services.judge.store import JudgeStore, human_verdict
from services.judge.stored import require_runs, texts_by_run

log = logging.getLogger(__name__)

_TOKEN_PREFIX = "after:"


def criteria_catalog(settings: JudgeSettings) -> list[judge_pb2.Criterion]:
    """Rule criteria, then the standard LLM criteria, with their default thresholds."""
    thresholds = settings.rule_defaults().thresholds
    rules = [judge_pb2.Criterion(
        name=c.name, judge_type=judge_pb2.JUDGE_TYPE_RULE, description=c.description,
        default_threshold=thresholds[c.name], min_score=0.0, max_score=1.0,
        needs_ground_truth=c.needs_ground_truth) for c in RULE_CRITERIA]
    llm = [judge_pb2.Criterion(
        name=name, judge_type=judge_pb2.JUDGE_TYPE_LLM, description=STANDARD_RUBRICS[name],
        default_threshold=settings.threshold_for(name), min_score=1.0, max_score=10.0,
        needs_ground_truth=False) for name in STANDARD_LLM_CRITERIA]
    return rules + llm


def verdict_to_proto(verdict: Verdict, ref: judge_pb2.PredictionRef | None,
                     epoch: int) -> judge_pb2.Judgment:
    return judge_pb2.Judgment(
        prediction=ref, epoch=epoch, criterion=verdict.criterion,
        judge_type=verdict.judge_type, judge_model=verdict.judge_model, score=verdict.score,
        passed=verdict.passed, threshold=verdict.threshold, reasoning=verdict.reasoning,
        confidence=verdict.confidence, status=verdict.status,
        unscored_reason=verdict.unscored_reason, input_tokens=verdict.input_tokens,
        output_tokens=verdict.output_tokens, cost_usd=verdict.cost_usd,
        prompt_version=verdict.prompt_version)


def row_to_proto(row: Any) -> judge_pb2.Judgment:
    """A Judgment from a row of judge.judgments (attribute access)."""
    ref = judge_pb2.PredictionRef(run_id=str(row.run_id), step=row.step,
                                  sample_index=row.sample_index)
    message = verdict_to_proto(Verdict(
        criterion=row.criterion, judge_type=row.judge_type, judge_model=row.judge_model,
        score=row.score, passed=row.passed, threshold=row.threshold, reasoning=row.reasoning,
        status=row.status, prompt_version=row.prompt_version, confidence=row.confidence,
        unscored_reason=row.unscored_reason, input_tokens=row.input_tokens,
        output_tokens=row.output_tokens, cost_usd=row.cost_usd), ref, row.epoch)
    message.create_time.CopyFrom(timestamp(row.create_time))
    message.revision = row.revision
    return message


def check_items(items: Sequence[judge_pb2.JudgeItem], settings: JudgeSettings,
                run_id: uuid.UUID | None, violations: Violations) -> list[Item]:
    """The items as Items (run_id None unless run_id is given, which every item's prediction
    must name); problems go to `violations` as `items[i].field`."""
    if not items:
        violations.add("items", "at least one item is required")
    elif len(items) > settings.max_items:
        violations.add("items", f"{len(items)} items exceed the maximum of {settings.max_items}")
        return []
    out = []
    for index, item in enumerate(items):
        path = f"items[{index}]"
        if item.epoch < 0:
            violations.add(f"{path}.epoch", f"must be >= 0, got {item.epoch}")
        if not item.prompt:
            violations.add(f"{path}.prompt", "required (empty)")
        for name in ("prompt", "prediction_text", "ground_truth"):
            size = len(getattr(item, name))
            if size > settings.max_text_chars:
                violations.add(f"{path}.{name}", f"{size} characters exceed the maximum of "
                               f"{settings.max_text_chars}")
        if run_id is not None:
            _check_ref(item, path, run_id, violations)
        out.append(Item(run_id=run_id, step=item.prediction.step,
                        sample_index=item.prediction.sample_index, epoch=item.epoch,
                        prompt=item.prompt, prediction=item.prediction_text,
                        ground_truth=item.ground_truth if item.HasField("ground_truth")
                        else None))
    return out


def _check_ref(item: judge_pb2.JudgeItem, path: str, run_id: uuid.UUID,
               violations: Violations) -> None:
    if not item.HasField("prediction"):
        violations.add(f"{path}.prediction", "required: the stored prediction this item is")
        return
    ref = item.prediction
    if _uuid_or_none(ref.run_id) != run_id:
        violations.add(f"{path}.prediction.run_id", f"must equal run_id {run_id}")
    for name in ("step", "sample_index"):
        if getattr(ref, name) < 0:
            violations.add(f"{path}.prediction.{name}", f"must be >= 0, got {getattr(ref, name)}")


def _config(settings: JudgeSettings, request: Any, violations: Violations) -> JudgeConfig | None:
    """The request's judge config; its violations are added to the others."""
    try:
        return validate_judge_config(settings, struct_to_dict(request.config))
    except InvalidArgument as exc:
        violations.items.extend(exc.violations)
        return None


def resolve_page_size(requested: int, settings: JudgeSettings) -> int:
    if requested < 0:
        raise InvalidArgument([FieldViolation("page_size", f"must be >= 0, got {requested}")])
    return min(requested or settings.page_size_default, settings.page_size_max)


def _page_start(token: str, names: list[str]) -> int:
    """Index of the first criterion after the one a page token names (0 without a token)."""
    if not token:
        return 0
    try:
        decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument([FieldViolation("page_token", "malformed page token")]) from exc
    name = decoded.removeprefix(_TOKEN_PREFIX)
    if not decoded.startswith(_TOKEN_PREFIX) or name not in names:
        raise InvalidArgument([FieldViolation("page_token", "not a page token of ListCriteria")])
    return names.index(name) + 1


def _page_token(name: str) -> str:
    return base64.urlsafe_b64encode(f"{_TOKEN_PREFIX}{name}".encode()).decode().rstrip("=")


def _check_range(name: str, value: float, low: float, high: float,
                 violations: Violations, why: str = "") -> None:
    """A violation unless `value` is a finite number within low..high (`why`: appended to
    the range in the description, saying where it comes from)."""
    if not math.isfinite(value):
        violations.add(name, f"must be a finite number, got {value}")
    elif not low <= value <= high:
        violations.add(name, f"must be within {_num(low)}..{_num(high)}{why}, "
                             f"got {_num(value)}")


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_warnings(settings: JudgeSettings, config: JudgeConfig) -> list[str]:
    """What this judge does differently from what a valid config asks; a paid model without
    a configured price is refused (InvalidArgument config.llm.model, as EstimateCost does)."""
    llm = config.llm
    if llm is None:
        return []
    if not llm.panel and not settings.llm_judging_on(config):
        return [f"config.llm: provider {llm.provider} is not configured on this judge (no API "
                "key or endpoint): LLM judging is off, rule judges only"]
    member_prices(settings, llm)
    return [f"config.llm.panel[{index}]: provider {member.provider} is not configured on "
            "this judge (no API key or endpoint): its judgments will be unscored"
            for index, member in enumerate(llm.panel or [])
            if not settings.llm_enabled(member.provider, member.endpoint)]


def _or_raise(results: list[list[Verdict] | ItemFailure]) -> list[list[Verdict]]:
    """The verdicts of every item; JudgingRaised (INTERNAL) naming the first item whose
    judging raised (an ad hoc call's items are all the caller's)."""
    verdicts: list[list[Verdict]] = []
    for index, result in enumerate(results):
        if isinstance(result, ItemFailure):
            raise JudgingRaised(f"judging items[{index}] raised: {result.reason}",
                                {"item": str(index)})
        verdicts.append(result)
    return verdicts


def _uuid_or_none(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


class JudgeServicer(judge_pb2_grpc.JudgeServiceServicer):
    def __init__(self, settings: JudgeSettings, store: JudgeStore, judging: Judging,
                 workers: JudgeWorkers, generator: Generator,
                 pairwise: JudgeWorkers | None = None) -> None:
        self._settings = settings
        self._generator = generator
        self._store = store
        self._judging = judging
        self._workers = workers
        self._pairwise = pairwise  # PairwiseWorkers (services.judge.pairwise.worker)
        self._purger = RunPurger(store.engine, settings)
        self._criteria = criteria_catalog(settings)
        self.counts: Counter[str] = Counter()

    async def JudgePredictions(self, request: judge_pb2.JudgePredictionsRequest,
                               context: grpc.aio.ServicerContext
                               ) -> judge_pb2.JudgePredictionsResponse:
        """Rules (and the LLM judge when configured) on the items now; nothing is stored and
        no run's budget is charged (the items are judged as run-less)."""
        violations = Violations()
        config = _config(self._settings, request, violations)
        items = check_items(request.items, self._settings, None, violations)
        violations.raise_if_any()
        assert config is not None
        items = await self._stored_items(request.items, items)
        verdicts = _or_raise(await self._judging.rules(items, [config.rules] * len(items)))
        if self._judging.llm_on(config):
            extra = await self._llm_now(items, config)
            verdicts = [[*own, *more] for own, more in zip(verdicts, extra, strict=True)]
        response = judge_pb2.JudgePredictionsResponse()
        for item, own in zip(request.items, verdicts, strict=True):
            ref = item.prediction if item.HasField("prediction") else None
            response.judgments.extend(verdict_to_proto(v, ref, item.epoch) for v in own)
        return response

    async def _stored_items(self, requested: Sequence[judge_pb2.JudgeItem],
                            items: list[Item]) -> list[Item]:
        """The items, each naming a stored prediction (its ref's run) judged with the text the
        writer stores for it; a ref to a run that is not the caller's is NOT_FOUND."""
        runs = {index: run_id for index, item in enumerate(requested)
                if item.HasField("prediction")
                and (run_id := _uuid_or_none(item.prediction.run_id)) is not None}
        if not runs:
            return items
        user = current_user()
        await require_runs(self._store.engine, user, runs.values())
        keys: dict[uuid.UUID, list[tuple[int, int]]] = {}
        for index, run_id in runs.items():
            keys.setdefault(run_id, []).append((items[index].step, items[index].sample_index))
        texts = await texts_by_run(self._store.engine, user, keys)
        out = list(items)
        for index, run_id in runs.items():
            text = texts[run_id].get((items[index].step, items[index].sample_index))
            if text is not None:
                out[index] = dataclasses.replace(
                    items[index], epoch=text.epoch, prompt=text.prompt,
                    ground_truth=text.ground_truth, prediction=text.prediction)
        return out

    async def _llm_now(self, items: list[Item], config: JudgeConfig) -> list[list[Verdict]]:
        # Imported here: it loads the provider SDKs, only needed once an LLM judge runs.
        from services.judge.llm.errors import LlmJudgingFailed
        try:
            return _or_raise(await self._judging.llm(current_user(), items, config))
        except LlmJudgingFailed as exc:
            raise FailedPrecondition(f"LLM judging failed and the config's on_error is "
                                     f"'fail': {exc}", {"cause": "llm_failed"}) from exc

    async def EnqueueJudging(self, request: judge_pb2.EnqueueJudgingRequest,
                             context: grpc.aio.ServicerContext
                             ) -> judge_pb2.EnqueueJudgingResponse:
        """Stores the items as tasks for the caller (durable before the reply), skipping
        identities already queued. The run must be the caller's (else NOT_FOUND, whether it
        exists or not); a prediction the writer stores is judged with its stored text."""
        violations = Violations()
        run_id = parse_run_id(request.run_id, violations=violations)
        config = _config(self._settings, request, violations)
        items = check_items(request.items, self._settings, run_id, violations)
        violations.raise_if_any()
        assert run_id is not None and config is not None
        if await deleted_run(self._store.engine, current_user(), run_id):
            self.counts["dropped_deleted"] += len(items)
            log.info("EnqueueJudging of run %s of %s dropped: the run is being deleted (%d "
                     "items dropped so far)", run_id, current_user(),
                     self.counts["dropped_deleted"])
            return judge_pb2.EnqueueJudgingResponse(duplicate_count=len(items))
        await require_runs(self._store.engine, current_user(), [run_id])
        await check_baseline_run(self._store.engine, current_user(), config, run_id)
        stored_config = config.model_dump(mode="json", exclude_defaults=True)
        enqueued, duplicates = await self._store.enqueue(
            current_user(), run_id, items, stored_config)
        await self._enqueue_pairwise(run_id, items, config, stored_config)
        self.counts["enqueued"] += enqueued
        self.counts["duplicates"] += duplicates
        if enqueued:
            self._workers.notify()
        return judge_pb2.EnqueueJudgingResponse(enqueued_count=enqueued,
                                                duplicate_count=duplicates)

    async def _enqueue_pairwise(self, run_id: uuid.UUID, items: list[Item], config: JudgeConfig,
                                stored_config: dict[str, Any]) -> None:
        """Queues the pairwise tasks of the items when the config asks for pairwise judging
        and its provider is configured here (else ValidateJudgeConfig warned at CreateRun)."""
        pairwise = config.pairwise
        if pairwise is None:
            return
        if not self._settings.llm_enabled(pairwise.provider, pairwise.endpoint):
            self.counts["pairwise_off"] += len(items)
            log.warning("run %s asks for pairwise judging with provider %s, which is not "
                        "configured on this judge: %d predictions not judged pairwise (so far "
                        "%d)", run_id, pairwise.provider, len(items),
                        self.counts["pairwise_off"])
            return
        queued = await enqueue_pairwise(self._store.engine, current_user(), run_id, items,
                                        stored_config, pairwise)
        self.counts["pairwise_enqueued"] += queued
        if queued and self._pairwise is not None:
            self._pairwise.notify()

    async def ListCriteria(self, request: judge_pb2.ListCriteriaRequest,
                           context: grpc.aio.ServicerContext) -> judge_pb2.ListCriteriaResponse:
        size = resolve_page_size(request.page_size, self._settings)
        names = [c.name for c in self._criteria]
        start = _page_start(request.page_token, names)
        page = self._criteria[start:start + size]
        more = start + size < len(self._criteria)
        return judge_pb2.ListCriteriaResponse(
            criteria=page, next_page_token=_page_token(page[-1].name) if more and page else "")

    async def EstimateCost(self, request: judge_pb2.EstimateCostRequest,
                           context: grpc.aio.ServicerContext) -> judge_pb2.EstimateCostResponse:
        violations = Violations()
        limits = (("prediction_count", self._settings.estimate_max_predictions),
                  ("average_item_tokens", self._settings.estimate_max_item_tokens))
        for name, limit in limits:
            _check_range(name, getattr(request, name), 0, limit, violations)
        config = _config(self._settings, request, violations)
        violations.raise_if_any()
        assert config is not None
        figures = estimate(self._settings, config.llm, request.prediction_count,
                           request.average_item_tokens)
        return judge_pb2.EstimateCostResponse(**pairwise_cost.add_estimate(
            figures, self._settings, config, request.prediction_count,
            request.average_item_tokens))

    async def RecordHumanJudgment(self, request: judge_pb2.RecordHumanJudgmentRequest,
                                  context: grpc.aio.ServicerContext) -> judge_pb2.Judgment:
        """Stores the caller's judgment of a prediction handed to the judge for the caller;
        any other prediction (unknown, or another user's) is NOT_FOUND. Score and threshold
        lie on the criterion's scale when the run's judge config defines it as a criterion
        object, else within the service's human score range (services.judge.human)."""
        user = current_user()
        run_id = await self._check_human(user, request)
        ref = request.prediction
        row = await self._store.record_human(user, run_id, ref.step, ref.sample_index,
                                             human_verdict(user, request.criterion, request.score,
                                                           request.threshold, request.reasoning),
                                             self._settings.max_human_revisions)
        log.info("human judgment by %s of %s/%d/%d on %r stored (revision %d)", user, run_id,
                 ref.step, ref.sample_index, request.criterion, row.revision)
        return row_to_proto(row)

    async def _check_human(self, user: str,
                           request: judge_pb2.RecordHumanJudgmentRequest) -> uuid.UUID:
        violations = Violations()
        if not request.HasField("prediction"):
            violations.add("prediction", "required")
        run_id = parse_run_id(request.prediction.run_id, "prediction.run_id", violations)
        for name in ("step", "sample_index"):
            if getattr(request.prediction, name) < 0:
                violations.add(f"prediction.{name}", "must be >= 0")
        criterion_ok = bool(request.criterion.strip()) and \
            len(request.criterion) <= self._settings.max_name_chars
        if not criterion_ok:
            violations.add("criterion", f"must be 1..{self._settings.max_name_chars} characters")
        scale = (await human_range(self._settings, self._store.engine, user, run_id,
                                   request.criterion)
                 if run_id is not None and criterion_ok else service_range(self._settings))
        for name in ("score", "threshold"):
            _check_range(name, getattr(request, name), scale.low, scale.high, violations,
                         scale.source)
        if len(request.reasoning) > self._settings.max_text_chars:
            violations.add("reasoning", f"exceeds {self._settings.max_text_chars} characters")
        violations.raise_if_any()
        assert run_id is not None
        return run_id

    async def ValidateJudgeConfig(self, request: judge_pb2.ValidateJudgeConfigRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> judge_pb2.ValidateJudgeConfigResponse:
        """The checks of EnqueueJudging (and a price for a paid model): INVALID_ARGUMENT
        naming each bad field under `config`."""
        config = validate_judge_config(self._settings, struct_to_dict(request.config))
        await check_baseline_run(self._store.engine, current_user(), config)
        warnings = config_warnings(self._settings, config)
        warnings += pairwise_cost.pairwise_warnings(self._settings, config)
        return judge_pb2.ValidateJudgeConfigResponse(
            llm_judging=self._settings.llm_judging_on(config), warnings=warnings)

    async def ResumeJudging(self, request: judge_pb2.ResumeJudgingRequest,
                            context: grpc.aio.ServicerContext
                            ) -> judge_pb2.ResumeJudgingResponse:
        """Clears the caller's run's paused LLM judging and queues what is to be judged
        again; another user's run is NOT_FOUND."""
        user, run_id = current_user(), parse_run_id(request.run_id)
        assert run_id is not None
        await require_runs(self._store.engine, user, [run_id])
        done = await self._store.resume(user, run_id, request.rejudge_unscored,
                                        request.rejudge_failed)
        if done.requeued:
            self._workers.notify()
        # Pairwise judging too: its unscored results and failed tasks, counted with the rest.
        pairs_deleted, pairs_requeued = await resume_pairwise(
            self._store.engine, user, run_id, request.rejudge_unscored, request.rejudge_failed)
        if pairs_requeued and self._pairwise is not None:
            self._pairwise.notify()
        done = dataclasses.replace(done, deleted_unscored=done.deleted_unscored + pairs_deleted,
                                   requeued=done.requeued + pairs_requeued)
        log.info("judging of run %s resumed by %s: paused reason cleared %r, %d unscored "
                 "judgments deleted, %d predictions queued again", run_id, user,
                 done.cleared_paused_reason, done.deleted_unscored, done.requeued)
        return judge_pb2.ResumeJudgingResponse(
            cleared_paused_reason=done.cleared_paused_reason,
            deleted_unscored=done.deleted_unscored, requeued_predictions=done.requeued)

    async def PurgeRun(self, request: judge_pb2.PurgeRunRequest,
                       context: grpc.aio.ServicerContext) -> judge_pb2.PurgeRunResponse:
        """Removes the judge's rows of the caller's run that DeleteRun marked
        (services.judge.purge); idempotent."""
        run_id = parse_run_id(request.run_id)
        assert run_id is not None
        return await self._purger.purge(current_user(), run_id)

    async def GenerateResponses(self, request: judge_pb2.GenerateResponsesRequest,
                                context: grpc.aio.ServicerContext
                                ) -> judge_pb2.GenerateResponsesResponse:
        """One response per prompt from the configured endpoint the request names (see
        services.judge.generation); a prompt that failed has `error` set."""
        plan = validate_generation(self._settings, request)
        return await self._generator.generate(current_user(), plan, request.prompts)
