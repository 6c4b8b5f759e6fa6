"""LLM-as-judge: one call per (sampled item, criterion), cached, rate- and budget-limited.

judge_items() picks the items by sample_rate (deterministic by prediction identity, so the same
samples are judged at every epoch), answers what it can from the user's own cache (0 tokens, 0
cost; the cost billed for that very prediction when its judgments were never stored), and calls
the provider for the rest under the run's concurrency limit and budget (each call's most cost
reserved before it is made, services.judge.llm.budget). Errors are
classified before any retry (services.judge.llm.errors); after the retries the run's on_error
decides: skip -> an unscored verdict with the reason; retry -> retried up to the service's
retry ceiling, then fail; fail -> LlmJudgingFailed (raised once every started call has settled,
so no spending goes unrecorded). For queued tasks (defer_transient) a transient error (5xx,
429, network) that outlasts the in-call retries raises RetryLater instead, once every call has
settled: the queue tries the task again minutes later, and on_error applies on its last
attempt (what was scored meanwhile is cached, so the next attempt does not pay for it again).
A job that raises anything else fails its own item only: ItemsFailed, once every call settled.
"""

import asyncio
import hashlib
import logging
import re
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from epochlens.v1 import judge_pb2
from services.judge.llm import cache, providers
from services.judge.llm.budget import RunBudget
from services.judge.llm.cost import (
    PRICED_PROVIDERS,
    call_cost,
    max_call_cost,
    missing_price_message,
)
from services.judge.llm.errors import (
    SDK_ERRORS,
    CallError,
    ErrorKind,
    LlmJudgingFailed,
    backoff_wait,
    classify,
)
from services.judge.llm.limiter import AimdLimiter
from services.judge.llm.panel import combine_panel, threshold_of
from services.judge.llm.prompts import CriterionSpec, RenderedPrompt, render, specs_of
from services.judge.llm.providers import ParsedVerdict, ProviderClients, Reply
from services.judge.llm.settings import LlmSettings, ModelPrice
from services.judge.schema import Item, ItemsFailed, LlmJudgeConfig, RetryLater, Verdict
from services.judge.telemetry import OK, count_llm_call

log = logging.getLogger(__name__)

SAMPLE_SPACE = 2**64
# Errors that may pass by themselves: a queued task is tried again later (RetryLater).
TRANSIENT_KINDS = frozenset({ErrorKind.RETRY, ErrorKind.RATE_LIMIT})
# The class of an unscored reason is its text before the first ':' or '(' (for the logs).
REASON_CLASS = re.compile(r"[:(]")


def is_sampled(item: Item, sample_rate: float) -> bool:
    """Whether sample_rate picks this prediction: sha256 of "run_id:sample_index" mapped to
    [0, 1) < rate, so a sample is picked at every epoch or never. Ad hoc items always are."""
    if item.run_id is None or sample_rate >= 1.0:
        return True
    digest = hashlib.sha256(f"{item.run_id}:{item.sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / SAMPLE_SPACE < sample_rate


def _member_results(results: Sequence[list[tuple[Item, Verdict]] | BaseException]
                    ) -> tuple[list[list[tuple[Item, Verdict]]], dict[int, str]]:
    """The panel members' verdicts and the items any of them failed (ItemsFailed); raises the
    first LlmJudgingFailed of a member, else its first RetryLater, else any other error."""
    judged: list[list[tuple[Item, Verdict]]] = []
    failures: dict[int, str] = {}
    for result in results:
        if isinstance(result, ItemsFailed):
            failures.update((k, v) for k, v in result.failures.items() if k not in failures)
            judged.append(result.judged)
        elif not isinstance(result, BaseException):
            judged.append(result)
    for kind in (LlmJudgingFailed, RetryLater, BaseException):
        raised = [r for r in results if isinstance(r, kind) and not isinstance(r, ItemsFailed)]
        if raised:
            raise raised[0]
    return judged, failures


@dataclass(frozen=True)
class _Job:
    item: Item
    spec: CriterionSpec
    key: str
    position: int  # of the item in the judge_items() call

    @property
    def criterion(self) -> str:
        return self.spec.name

    @property
    def rubric(self) -> str | None:
        return self.spec.rubric


@dataclass
class _RunContext:
    limiter: AimdLimiter
    budget: RunBudget


@dataclass
class _Request:
    """What the jobs of one judge_items() call share."""

    config: LlmJudgeConfig
    price: ModelPrice | None
    retries: int
    failure: str | None = None
    # Transient errors that outlast the in-call retries defer the items (RetryLater) instead
    # of applying on_error; `deferred` holds the first such error.
    defer_transient: bool = False
    deferred: str | None = None
    # Items whose judging raised: position -> why (only those items fail; ItemsFailed).
    item_errors: dict[int, str] = field(default_factory=dict)

    def blocked_reason(self, ctx: _RunContext) -> str | None:
        if self.failure is not None:
            return f"not judged: another judgment of this batch failed ({self.failure})"
        return ctx.budget.state.blocked_reason()


class LlmJudge:
    """Judges items with the LLM a run's config names. One instance per process."""

    def __init__(self, settings: LlmSettings, engine: AsyncEngine) -> None:
        self._settings = settings
        self._engine = engine
        self._clients = ProviderClients(settings)
        self._runs: OrderedDict[tuple[str, uuid.UUID], _RunContext] = OrderedDict()
        self.counters: Counter[str] = Counter()

    async def aclose(self) -> None:
        """Waits for spending still being written, then closes the SDK clients."""
        for ctx in list(self._runs.values()):
            await ctx.budget.drain()
        await self._clients.aclose()

    def concurrency(self, user_id: str, run_id: uuid.UUID) -> int | None:
        """The run's current concurrency limit (lowered by 429s), None if not tracked."""
        ctx = self._runs.get((user_id, run_id))
        return ctx.limiter.limit if ctx is not None else None

    async def judge(self, user_id: str, items: Sequence[Item],
                    config: LlmJudgeConfig) -> list[Verdict]:
        """Verdicts of the sampled items, item by item (in `items` order), criteria in
        specs_of(config) order (a panel: each member's, then the combined one, per
        criterion). Use judge_items() to get each verdict's item."""
        return [verdict for _, verdict in await self.judge_items(user_id, items, config)]

    async def judge_items(self, user_id: str, items: Sequence[Item], config: LlmJudgeConfig,
                          defer_transient: bool = False) -> list[tuple[Item, Verdict]]:
        """defer_transient: raise RetryLater (once every call settled) when a call still
        failed with a transient error after its retries, instead of applying on_error. A
        panel config runs every member (judge_single) and adds the combined verdicts."""
        if config.panel:
            return await self._judge_panel(user_id, items, config, defer_transient)
        return await self.judge_single(user_id, items, config, defer_transient)

    async def _judge_panel(self, user_id: str, items: Sequence[Item], config: LlmJudgeConfig,
                           defer_transient: bool) -> list[tuple[Item, Verdict]]:
        """Every member judges every item (concurrently, sharing the run's concurrency limit
        and budget); raises, once all members settled, the first LlmJudgingFailed, else the
        first RetryLater, else ItemsFailed for the items any member failed."""
        members = config.members()
        results = await asyncio.gather(*(
            self.judge_single(user_id, items, member, defer_transient) for member in members),
            return_exceptions=True)
        judged, failures = _member_results(results)
        combined = combine_panel(self._settings, config, items, judged, failures)
        unscored = sum(1 for _, v in combined if v.judge_model == config.judge_model
                       and v.status == judge_pb2.JUDGMENT_STATUS_UNSCORED)
        if unscored:
            runs = sorted({str(item.run_id) for item in items})
            self._count("panel_unscored", unscored, f"{unscored} combined {config.judge_model} "
                        f"verdicts unscored: fewer than llm_panel_min_scored_share of the "
                        f"{len(members)} members scored (runs {', '.join(runs)})")
        if failures:
            raise ItemsFailed(failures, combined)
        return combined

    async def judge_single(self, user_id: str, items: Sequence[Item], config: LlmJudgeConfig,
                           defer_transient: bool = False) -> list[tuple[Item, Verdict]]:
        """judge_items() of one judge (provider, model): no panel."""
        jobs = self._jobs(user_id, items, config)
        if not jobs:
            return []
        problem = self._config_problem(config)
        if problem is not None:
            self._count("unscored_config", len(jobs), f"{problem} ({len(jobs)} verdicts)")
            return [(job.item, self._unscored(config, job.spec, problem)) for job in jobs]
        request = _Request(config, self._settings.price_for(config.provider, config.model),
                           self._retries(config), defer_transient=defer_transient)
        cached = await cache.lookup(self._engine, user_id, [j.key for j in jobs if j.rubric])
        contexts = await self._contexts(user_id, config, jobs)
        verdicts = await asyncio.gather(*(
            self._isolated_job(request, contexts[job.item.run_id], job, cached)
            for job in jobs))
        if request.deferred is not None and request.failure is None:
            raise RetryLater(request.deferred)
        self._log_unscored(jobs, verdicts)
        if request.failure is not None:
            raise LlmJudgingFailed(request.failure)
        judged = [(job.item, verdict) for job, verdict in zip(jobs, verdicts, strict=True)]
        if request.item_errors:
            raise ItemsFailed(request.item_errors, [
                pair for job, pair in zip(jobs, judged, strict=True)
                if job.position not in request.item_errors])
        return judged

    def _log_unscored(self, jobs: list[_Job], verdicts: Sequence[Verdict]) -> None:
        """One line per batch with unscored verdicts: how many, and why (reason classes)."""
        reasons = Counter(REASON_CLASS.split(v.unscored_reason, maxsplit=1)[0].strip()
                          for v in verdicts if v.status == judge_pb2.JUDGMENT_STATUS_UNSCORED)
        if not reasons:
            return
        self.counters["unscored"] += sum(reasons.values())
        runs = sorted({str(job.item.run_id) for job in jobs})
        log.warning("%d of %d LLM verdicts unscored (runs %s): %s [unscored: %d so far]",
                    sum(reasons.values()), len(verdicts), ", ".join(runs), dict(reasons),
                    self.counters["unscored"])

    def _jobs(self, user_id: str, items: Sequence[Item], config: LlmJudgeConfig) -> list[_Job]:
        url = self._settings.endpoint_url(config.provider, config.endpoint)
        specs = specs_of(config)
        jobs = []
        for position, item in enumerate(items):
            if not is_sampled(item, config.sample_rate):
                continue
            for spec in specs:
                jobs.append(_Job(item, spec, self._key(user_id, config, url, spec, item),
                                 position))
        return jobs

    def _key(self, user_id: str, config: LlmJudgeConfig, url: str | None, spec: CriterionSpec,
             item: Item) -> str:
        """The cache key of one (item, criterion); "" for an unknown criterion."""
        if spec.rubric is None:
            return ""
        own = (spec.scale_min, spec.scale_max, spec.threshold) if spec.threshold is not None \
            else None
        return cache.cache_key(user_id, config, url, self._settings.prompt_version_for(spec),
                               spec.name, spec.rubric, item, own)

    def _config_problem(self, config: LlmJudgeConfig) -> str | None:
        if not self._settings.llm_enabled(config.provider, config.endpoint):
            if config.provider == "openai_compatible":
                return (f"llm judging is off: no endpoint {config.endpoint!r} is configured "
                        "here (EPOCHLENS_JUDGE_LLM_ENDPOINTS)")
            return (f"llm judging is off: no API key configured for provider {config.provider} "
                    f"(EPOCHLENS_JUDGE_{config.provider.upper()}_API_KEY)")
        price = self._settings.price_for(config.provider, config.model)
        if price is None and config.provider in PRICED_PROVIDERS:
            return f"llm judging is off: {missing_price_message(config)}"
        return None

    def _retries(self, config: LlmJudgeConfig) -> int:
        ceiling = self._settings.llm_max_retries_ceiling
        if config.on_error == "retry":
            return ceiling
        wanted = self._settings.llm_max_retries if config.max_retries is None \
            else config.max_retries
        return min(wanted, ceiling)

    async def _contexts(self, user_id: str, config: LlmJudgeConfig,
                        jobs: list[_Job]) -> dict[uuid.UUID | None, _RunContext]:
        contexts: dict[uuid.UUID | None, _RunContext] = {}
        for run_id in dict.fromkeys(job.item.run_id for job in jobs):
            ctx = self._run_context(user_id, run_id, config)
            await ctx.budget.load()
            contexts[run_id] = ctx
        return contexts

    def _run_context(self, user_id: str, run_id: uuid.UUID | None,
                     config: LlmJudgeConfig) -> _RunContext:
        if run_id is None:
            return self._new_context(user_id, None, config)
        key = (user_id, run_id)
        ctx = self._runs.pop(key, None) or self._new_context(user_id, run_id, config)
        self._runs[key] = ctx
        while len(self._runs) > self._settings.llm_tracked_runs:
            self._runs.popitem(last=False)
        return ctx

    def _new_context(self, user_id: str, run_id: uuid.UUID | None,
                     config: LlmJudgeConfig) -> _RunContext:
        s = self._settings
        ceiling = min(config.concurrency or s.llm_default_concurrency, s.llm_max_concurrency)
        budget = s.llm_default_budget_usd if config.budget_usd is None else config.budget_usd
        hold_s = s.llm_request_timeout_s + s.llm_reservation_grace_s
        return _RunContext(AimdLimiter(ceiling, s.llm_concurrency_increase_after),
                           RunBudget(self._engine, user_id, run_id, budget, hold_s,
                                     s.llm_budget_poll_s, s.llm_reserve_lease_calls,
                                     s.llm_reservation_grace_s))

    async def _isolated_job(self, request: _Request, ctx: _RunContext, job: _Job,
                            cached: dict[str, cache.Entry]) -> Verdict:
        """_judge_job; an exception fails the job's item only (request.item_errors)."""
        try:
            return await self._judge_job(request, ctx, job, cached)
        except Exception as exc:  # noqa: BLE001 - one item's error must not fail the batch
            reason = f"LLM judging raised {type(exc).__name__}: {exc}"
            request.item_errors.setdefault(job.position, reason)
            self.counters["item_errors"] += 1
            log.error("%s (run %s, prediction %d/%d, criterion %s) [item errors: %d so far]",
                      reason, job.item.run_id, job.item.step, job.item.sample_index,
                      job.criterion, self.counters["item_errors"], exc_info=exc)
            return self._unscored(request.config, job.spec, reason)

    async def _judge_job(self, request: _Request, ctx: _RunContext, job: _Job,
                         cached: dict[str, cache.Entry]) -> Verdict:
        config = request.config
        if job.rubric is None:
            reason = (f"unknown criterion {job.criterion!r}: not a standard criterion and no "
                      "rubric in custom_criteria")
            self._count("unscored_unknown_criterion", 1, reason)
            return self._unscored(config, job.spec, reason)
        hit = cached.get(job.key)
        if hit is not None:
            self.counters["cache_hits"] += 1
            # The call made for this very prediction (its judgments were never stored: a
            # crash, a re-claim) keeps what it billed; a hit for any other costs nothing.
            usage = ((hit.input_tokens, hit.output_tokens, hit.cost_usd)
                     if hit.paid_for(job.item) else (0, 0, 0.0))
            return self._scored(config, job.spec, hit.verdict, *usage)
        return await self._paid(request, ctx, job)

    async def _paid(self, request: _Request, ctx: _RunContext, job: _Job) -> Verdict:
        """Calls the provider, retrying as the error's class allows."""
        spec = job.spec
        prompt = render(self._settings.prompt_version_for(spec), spec.name, spec.rubric or "",
                        job.item, spec.scale if spec.own_scale else None)
        most = max_call_cost(self._settings, request.price, prompt)
        error: CallError | None = None
        attempt = 0
        while attempt <= request.retries:
            if (blocked := request.blocked_reason(ctx)) is not None:
                return self._blocked(request.config, job, blocked)
            outcome, generation = await self._in_slot(request, ctx, job, prompt, most)
            if outcome is None:
                continue  # a 429 lowered the limit while this call reserved: queue again
            if isinstance(outcome, Verdict):
                return outcome
            if isinstance(outcome, CallError):
                error = outcome
                if not await self._after_error(ctx, job, error, generation, attempt, request):
                    break
                attempt += 1
                continue
            verdict, stored = outcome
            await stored  # the cost and the cache row are committed before the verdict returns
            return verdict
        return self._give_up(request, job, error)

    async def _in_slot(self, request: _Request, ctx: _RunContext, job: _Job,
                       prompt: RenderedPrompt, most: float
                       ) -> tuple[Verdict | CallError | tuple[Verdict, Awaitable[None]] | None,
                                  int]:
        """In one concurrency slot: the reservation of the call's most cost, then the call.
        Returns (a blocked verdict, the call's outcome, or None when a 429 lowered the limit
        while the reservation was made: the slot is given back), and the slot's generation."""
        async with ctx.limiter.slot() as generation:
            blocked = request.blocked_reason(ctx) or await ctx.budget.reserve(most)
            if blocked is not None:
                return self._blocked(request.config, job, blocked), generation
            if ctx.limiter.generation != generation:
                ctx.budget.release(most)
                return None, generation
            return await self._attempt(request, ctx, job, prompt, most), generation

    async def _attempt(self, request: _Request, ctx: _RunContext, job: _Job,
                       prompt: RenderedPrompt,
                       reserved: float) -> CallError | tuple[Verdict, Awaitable[None]]:
        """One call (its most cost `reserved` from the budget), inside the run's concurrency
        slot; a completed call is settled before the slot is freed, so the next reservation
        sees its cost. A call that failed gives its reservation back (nothing billed); one
        that raised anything else keeps it until it expires (it may have been billed)."""
        try:
            self.counters["calls"] += 1
            reply = await providers.call(self._clients, self._settings, request.config, prompt,
                                         job.spec.scale)
        except SDK_ERRORS as exc:
            ctx.budget.release(reserved)
            error = classify(request.config.provider, exc)
            count_llm_call(request.config.provider, error.kind.value)
            return error
        ctx.limiter.on_success()
        return self._settle(request, ctx, job, reply, reserved)

    async def _after_error(self, ctx: _RunContext, job: _Job, error: CallError,
                           generation: int, attempt: int, request: _Request) -> bool:
        """Handles a failed call; True when another attempt may follow."""
        self._count(f"error_{error.kind.value}", 1,
                    f"LLM call failed (run {job.item.run_id}, criterion {job.criterion}, "
                    f"attempt {attempt + 1}): {error.message}")
        if error.kind is ErrorKind.PAUSE:
            await ctx.budget.pause(error.message)
            return False
        if error.kind is ErrorKind.FATAL or attempt >= request.retries:
            return False
        wait = None
        if error.kind is ErrorKind.RATE_LIMIT:
            if error.retry_after_s is not None:
                wait = min(error.retry_after_s, self._settings.llm_retry_after_max_s)
            ctx.limiter.on_rate_limited(generation, wait)
        if wait is None:
            await asyncio.sleep(backoff_wait(self._settings, attempt))
        return True

    def _give_up(self, request: _Request, job: _Job, error: CallError | None) -> Verdict:
        config = request.config
        message = error.message if error is not None else "no attempt made"
        if error is not None and error.kind is ErrorKind.PAUSE:
            return self._unscored(config, job.spec, f"llm judging paused: {message}")
        reason = f"gave up: {message}"
        if request.defer_transient and error is not None and error.kind in TRANSIENT_KINDS:
            request.deferred = request.deferred or f"{job.criterion}: {message}"
            self._count("deferred_transient", 1, f"{reason} (run {job.item.run_id}, criterion "
                                                  f"{job.criterion}); tried again later")
            return self._unscored(config, job.spec, reason)
        fatal = error is not None and error.kind is ErrorKind.FATAL
        if config.on_error == "skip" or (fatal and config.on_error == "retry"):
            self._count("unscored_gave_up", 1, f"{reason} (run {job.item.run_id}, criterion "
                                                  f"{job.criterion}, on_error {config.on_error})")
            return self._unscored(config, job.spec, reason)
        request.failure = request.failure or f"{job.criterion}: {message}"
        self._count("failed", 1, f"LLM judging failed (run {job.item.run_id}, on_error "
                                 f"{config.on_error}): {message}")
        return self._unscored(config, job.spec, reason)

    def _settle(self, request: _Request, ctx: _RunContext, job: _Job, reply: Reply,
                reserved: float) -> tuple[Verdict, Awaitable[None]]:
        """The verdict of a completed call, and its charge (cost, tokens, cache row carrying
        what it billed, reservation released) queued."""
        cost = call_cost(request.price, reply.input_tokens, reply.output_tokens)
        count_llm_call(request.config.provider, OK, cost)
        if cost > reserved:
            self._count("reservation_exceeded", 1, f"LLM call cost ${cost:.6f}, above the "
                        f"${reserved:.6f} reserved for it (run {job.item.run_id}): raise "
                        "llm_reserve_overhead_tokens")
        item = job.item
        entry = None if reply.verdict is None else cache.Entry(
            job.key, reply.verdict, item.run_id, item.step, item.sample_index,
            reply.input_tokens, reply.output_tokens, cost)
        stored = ctx.budget.charge(cost, reply.input_tokens, reply.output_tokens, entry,
                                   reserved)
        usage = (reply.input_tokens, reply.output_tokens, cost)
        if reply.verdict is None:
            reason = f"unparseable reply: {reply.parse_error}"
            self._count("unscored_unparseable", 1,
                        f"{reason} (run {job.item.run_id}, criterion {job.criterion})")
            return self._unscored(request.config, job.spec, reason, *usage), stored
        return self._scored(request.config, job.spec, reply.verdict, *usage), stored

    def _blocked(self, config: LlmJudgeConfig, job: _Job, reason: str) -> Verdict:
        self.counters["unscored_blocked"] += 1
        return self._unscored(config, job.spec, reason)

    def _scored(self, config: LlmJudgeConfig, spec: CriterionSpec, verdict: ParsedVerdict,
                input_tokens: int, output_tokens: int, cost_usd: float) -> Verdict:
        threshold = threshold_of(self._settings, config, spec)
        return Verdict(
            criterion=spec.name, judge_type=judge_pb2.JUDGE_TYPE_LLM,
            judge_model=config.judge_model, score=verdict.score,
            passed=verdict.score >= threshold, threshold=threshold, reasoning=verdict.reasoning,
            status=judge_pb2.JUDGMENT_STATUS_SCORED,
            prompt_version=self._settings.prompt_version_for(spec),
            confidence=verdict.confidence, input_tokens=input_tokens,
            output_tokens=output_tokens, cost_usd=cost_usd)

    def _unscored(self, config: LlmJudgeConfig, spec: CriterionSpec, reason: str,
                  input_tokens: int = 0, output_tokens: int = 0,
                  cost_usd: float = 0.0) -> Verdict:
        return Verdict.unscored(
            spec.name, judge_pb2.JUDGE_TYPE_LLM, config.judge_model,
            threshold_of(self._settings, config, spec), reason,
            self._settings.prompt_version_for(spec), input_tokens=input_tokens,
            output_tokens=output_tokens, cost_usd=cost_usd)

    def _count(self, counter: str, n: int, message: str) -> None:
        self.counters[counter] += n
        log.warning("%s [%s: %d so far]", message, counter, self.counters[counter])
