"""The pairwise judging workers: asyncio tasks in the judge server, on the loop, leases,
backoff and shutdown of services.judge.queue.JudgeWorkers, over judge.pairwise_tasks.

A batch is claimed (SKIP LOCKED, a lease per task, renewed while it is judged), each task's
two texts are read from the writer's store acting for its user (the candidate; the baseline:
the same sample at the baseline epoch, or the baseline run's prediction with the same prompt
and reference), and each pair is asked twice: order 1 shows (baseline, candidate) as A and B,
order 2 (candidate, baseline). Order 2 is asked only when order 1 gave a usable answer. Both
orders' most cost is reserved from the run's budget (services.judge.llm.budget, shared with
the LLM judges) before order 1, so a pair gets both calls or none; each call is charged
after, and order 2's part goes back when order 1 fails or is unusable; provider errors are
classified and retried as the LLM judges' are (services.judge.llm.errors). A baseline not
stored yet sends the task back with the queue's backoff; on the last attempt the pair is
stored unscored with the reason, as is a pair whose calls were blocked (budget, pause) or
unusable.
"""

import asyncio
import importlib
import logging
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.common.db import user_transaction
from services.judge.config import JudgeSettings
from services.judge.llm.cost import PRICED_PROVIDERS, call_cost, max_call_cost
from services.judge.pairwise import store
from services.judge.pairwise.config import PairwiseConfig
from services.judge.pairwise.models import Outcome
from services.judge.pairwise.prompts import DEFAULT_RUBRIC, PROMPT_VERSION, PairTexts, render
from services.judge.pairwise.store import PairTask, Settled, Text
from services.judge.queue import JudgeWorkers, backoff_s
from services.judge.schema import JudgeConfig
from services.judge.store import TaskState
from services.judge.telemetry import OK, count_llm_call

log = logging.getLogger(__name__)

# Raw answer -> whom it prefers, per order (order 1 shows the baseline as A).
_SIDE = {1: {"A": "baseline", "B": "candidate", "tie": "tie"},
         2: {"A": "candidate", "B": "baseline", "tie": "tie"}}


def pair_outcome(answer_1: str, answer_2: str) -> tuple[Outcome, bool]:
    """(outcome, position_bias) of a pair's two raw answers ("" = no usable answer): both
    orders for the candidate = win, both for the baseline = loss, anything else (a tie, or
    the orders disagree) = tie; position bias = the same position picked twice."""
    if not answer_1 or not answer_2:
        return Outcome.UNSCORED, False
    first, second = _SIDE[1][answer_1], _SIDE[2][answer_2]
    bias = answer_1 == answer_2 and answer_1 != "tie"
    if first == second == "candidate":
        return Outcome.WIN, bias
    if first == second == "baseline":
        return Outcome.LOSS, bias
    return Outcome.TIE, bias


@dataclass(frozen=True)
class Answer:
    """One order's answer ("" when unusable, with the reason) and what its calls cost."""

    preferred: str
    reason: str
    error: str = ""
    transient: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


@dataclass
class _Pair:
    task: PairTask
    config: JudgeConfig
    pairwise: PairwiseConfig
    candidate: Text
    baseline: Text
    baseline_epoch: int


@dataclass
class _RunContext:
    budget: Any  # services.judge.llm.budget.RunBudget
    slots: asyncio.Semaphore


class _Queue:
    """The store functions in the shape JudgeWorkers drives (claim, leases, settle)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def claim(self, limit: int, lease_s: float) -> list[PairTask]:
        return await store.claim(self.engine, limit, lease_s)

    async def extend_leases(self, tasks: Sequence[PairTask], lease_s: float) -> int:
        return await store.extend_leases(self.engine, tasks, lease_s)

    async def settle(self, user_id: str, settled: Sequence[Settled]) -> int:
        return await store.settle(self.engine, user_id, settled)


class PairwiseWorkers(JudgeWorkers):
    """`pairwise_worker_count` workers over judge.pairwise_tasks; start() with the server,
    stop() with it (then close())."""

    def __init__(self, settings: JudgeSettings, engine: AsyncEngine) -> None:
        super().__init__(settings, _Queue(engine), None)  # type: ignore[arg-type]
        self._engine = engine
        self._providers: Any = None
        self._clients: Any = None
        self._budget_class: Any = None
        self._runs: OrderedDict[tuple[str, uuid.UUID], _RunContext] = OrderedDict()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(index), name=f"pairwise-worker-{index}")
                       for index in range(self._settings.pairwise_worker_count)]

    async def close(self) -> None:
        """After stop(): waits for spending still being written, closes the SDK clients."""
        for ctx in list(self._runs.values()):
            await ctx.budget.drain()
        if self._clients is not None:
            await self._clients.aclose()

    async def claim(self) -> list[PairTask]:  # type: ignore[override]
        return await self._store.claim(self._settings.pairwise_claim_batch,
                                       self._settings.lease_s)

    async def judge(self, tasks: Sequence[PairTask]) -> list[Settled]:  # type: ignore[override]
        """One Settled per task: its result (done), or back to the queue / failed."""
        ready: list[Settled] = []
        pairs: list[_Pair] = []
        per_user: dict[str, list[PairTask]] = defaultdict(list)
        for task in tasks:
            per_user[task.user_id].append(task)
        for user_id, own in per_user.items():
            for item in await self._prepare(user_id, own):
                (pairs if isinstance(item, _Pair) else ready).append(item)
        if pairs:
            await self._load_providers()
            ready += await asyncio.gather(*(self._isolated(pair) for pair in pairs))
        return ready

    async def _load_providers(self) -> None:
        if self._providers is None:
            # Imported on first use, in a thread: the provider SDKs take seconds to load.
            module = await asyncio.to_thread(importlib.import_module,
                                             "services.judge.pairwise.providers")
            budget = await asyncio.to_thread(importlib.import_module,
                                             "services.judge.llm.budget")
            self._budget_class = budget.RunBudget
            self._providers = module
            self._clients = self._clients or module.ProviderClients(self._settings)

    async def _prepare(self, user_id: str, tasks: list[PairTask]) -> list[Settled | _Pair]:
        """Each task's pair (both texts read acting for the user), or why there is none."""
        out: list[Settled | _Pair] = []
        last_epochs: dict[uuid.UUID, int | None] = {}
        async with user_transaction(self._engine, user_id) as conn:
            for task in tasks:
                config = self._parse(task)
                if isinstance(config, Settled):
                    out.append(config)
                    continue
                epoch = task.baseline_epoch
                if epoch is None:
                    if task.baseline_run_id not in last_epochs:
                        last_epochs[task.baseline_run_id] = await store.last_epoch(
                            conn, user_id, task.baseline_run_id)
                    epoch = last_epochs[task.baseline_run_id]
                out.append(await self._pair(conn, task, config, epoch))
        return out

    def _parse(self, task: PairTask) -> JudgeConfig | Settled:
        if task.attempts > self._settings.max_attempts:
            return self._failed(task, f"lease expired on all {task.attempts - 1} attempts "
                                "(the worker died or stalled while judging)")
        try:
            config = JudgeConfig.model_validate(task.config)
        except ValidationError as exc:
            return self._failed(task, f"stored judge config does not parse: {exc}")
        if config.pairwise is None:
            return self._failed(task, "stored judge config has no pairwise section")
        return config

    async def _pair(self, conn: Any, task: PairTask, config: JudgeConfig,
                    epoch: int | None) -> Settled | _Pair:
        pairwise = config.pairwise
        assert pairwise is not None
        candidate = await store.candidate(conn, task)
        if candidate is None:
            return self._unscored(task, pairwise, epoch, "the candidate prediction is not "
                                  "stored by the writer")
        found = None if epoch is None else await store.baseline(conn, task, epoch, candidate)
        if found is not None:
            return _Pair(task, config, pairwise, candidate, found, epoch)
        what = (f"no baseline response at epoch {epoch} of run {task.baseline_run_id}"
                if epoch is not None else f"baseline run {task.baseline_run_id} has no "
                "predictions")
        if task.attempts < self._settings.max_attempts:
            return self._later(task, f"{what} yet", self._settings.retry_backoff_base_s)
        return self._unscored(task, pairwise, epoch, f"{what} after {task.attempts} attempts")

    async def _isolated(self, pair: _Pair) -> Settled:
        """_judge_pair; an exception sends the task back (or fails it), alone."""
        try:
            return await self._judge_pair(pair)
        except Exception as exc:  # noqa: BLE001 - one pair's error must not fail the batch
            self.counts["item_errors"] += 1
            log.exception("pairwise judging of %s raised (pair errors so far %d)",
                          pair.task.where, self.counts["item_errors"])
            return self._later(pair.task, f"{type(exc).__name__}: {exc}",
                               self._settings.retry_backoff_base_s)

    async def _judge_pair(self, pair: _Pair) -> Settled:
        pairwise, task = pair.pairwise, pair.task
        problem = self._config_problem(pairwise)
        if problem is not None:
            return self._unscored(task, pairwise, pair.baseline_epoch, problem, pair.baseline)
        ctx = await self._context(task, pair.config)
        texts = PairTexts(pair.candidate.prompt, pair.candidate.ground_truth,
                          pair.baseline.prediction, pair.candidate.prediction)
        async with ctx.slots:  # one pair at a time per slot: its orders one after the other
            answers = await self._ask_both(ctx, pair, texts)
        transient = next((a for a in answers if a.transient), None)
        if transient is not None and task.attempts < self._settings.max_attempts:
            return self._later(task, transient.error, self._settings.llm_transient_retry_base_s)
        return Settled(task, self._result(pair, answers), TaskState.DONE)

    def _config_problem(self, pairwise: PairwiseConfig) -> str | None:
        if not self._settings.llm_enabled(pairwise.provider, pairwise.endpoint):
            return (f"pairwise judging is off: provider {pairwise.provider} (endpoint "
                    f"{pairwise.endpoint}) is not configured on this judge")
        if (self._settings.price_for(pairwise.provider, pairwise.model) is None
                and pairwise.provider in PRICED_PROVIDERS):
            return (f"pairwise judging is off: no price configured for {pairwise.judge_model} "
                    "(EPOCHLENS_JUDGE_LLM_PRICES)")
        return None

    async def _context(self, task: PairTask, config: JudgeConfig) -> _RunContext:
        """The run's budget (the judge.llm section's budget_usd, else the default) and its
        pairwise concurrency slots, kept for the llm_tracked_runs most recent runs."""
        s, key = self._settings, (task.user_id, task.run_id)
        ctx = self._runs.pop(key, None)
        if ctx is None:
            llm = config.llm
            budget = (llm.budget_usd if llm is not None and llm.budget_usd is not None
                      else s.llm_default_budget_usd)
            wanted = llm.concurrency if llm is not None and llm.concurrency else None
            ceiling = min(wanted or s.llm_default_concurrency, s.llm_max_concurrency)
            ctx = _RunContext(self._budget_class(
                self._engine, task.user_id, task.run_id, budget,
                s.llm_request_timeout_s + s.llm_reservation_grace_s, s.llm_budget_poll_s,
                s.llm_reserve_lease_calls, s.llm_reservation_grace_s),
                asyncio.Semaphore(ceiling))
        self._runs[key] = ctx
        while len(self._runs) > s.llm_tracked_runs:
            self._runs.popitem(last=False)
        await ctx.budget.load()
        return ctx

    def _retries(self, config: JudgeConfig) -> int:
        s = self._settings
        wanted = config.llm.max_retries if config.llm is not None else None
        return min(s.llm_max_retries if wanted is None else wanted, s.llm_max_retries_ceiling)

    async def _ask_both(self, ctx: _RunContext, pair: _Pair, texts: PairTexts) -> list[Answer]:
        """Order 1's answer, then order 2's when order 1 is usable. Both orders' most cost is
        reserved together before order 1, so a pair gets both calls or none (never order 1
        paid and the pair unscored because order 2 no longer fits the budget); order 2's part
        goes back when order 1 fails or is unusable. Order 1's usable answer is kept on the
        task once charged: a task claimed again after its worker died reuses it and asks (and
        reserves) only order 2."""
        p = pair.pairwise
        price = self._settings.price_for(p.provider, p.model)
        prompts = [render(p.criterion, p.rubric or DEFAULT_RUBRIC, texts, order)
                   for order in (1, 2)]
        most = [max_call_cost(self._settings, price, prompt) for prompt in prompts]
        first = self._kept_first(pair)
        if first is not None:  # paid by an earlier attempt: only order 2 is asked
            return [first, await self._ask(ctx, pair, prompts[1], 2, most[1], 0.0, held=False)]
        first = await self._ask(ctx, pair, prompts[0], 1, most[0], most[1], held=False)
        if not first.preferred:
            return [first]
        await self._keep_first(pair, first)
        return [first, await self._ask(ctx, pair, prompts[1], 2, most[1], 0.0, held=True)]

    def _kept_first(self, pair: _Pair) -> Answer | None:
        """Order 1's answer kept on the task by an earlier attempt, when it was asked against
        the baseline this pair has now."""
        kept = pair.task.first
        if kept is None:
            return None
        if (kept.baseline_step, kept.baseline_sample_index) != (pair.baseline.step,
                                                                pair.baseline.sample_index):
            self.counts["order1_stale"] += 1
            log.warning("pairwise task %s: order 1's kept answer was asked against baseline "
                        "%d/%d, the baseline is now %d/%d: both orders are asked [stale: %d]",
                        pair.task.where, kept.baseline_step, kept.baseline_sample_index,
                        pair.baseline.step, pair.baseline.sample_index,
                        self.counts["order1_stale"])
            return None
        self.counts["order1_reused"] += 1
        return Answer(kept.preferred, kept.reason, "", False, kept.input_tokens,
                      kept.output_tokens, kept.cost_usd)

    async def _keep_first(self, pair: _Pair, first: Answer) -> None:
        """Writes order 1's charged answer on the task, so a claim after this worker dies
        asks only order 2; a failed write costs only that (logged and counted)."""
        kept = store.FirstAnswer(first.preferred, first.reason, first.input_tokens,
                                 first.output_tokens, first.cost_usd, pair.baseline.step,
                                 pair.baseline.sample_index)
        try:
            written = await store.keep_first(self._engine, pair.task, kept)
        except Exception as exc:  # noqa: BLE001 - order 2 is still asked; only a retry re-pays
            self.counts["order1_keep_errors"] += 1
            log.error("pairwise task %s: order 1's answer not kept (a retry would ask it "
                      "again): %r [keep errors: %d]", pair.task.where, exc,
                      self.counts["order1_keep_errors"])
            return
        if not written:
            self.counts["order1_claim_lost"] += 1
            log.warning("pairwise task %s: order 1's answer not kept, the claim (attempt %d) "
                        "passed to another worker [claims lost: %d]", pair.task.where,
                        pair.task.attempts, self.counts["order1_claim_lost"])

    async def _ask(self, ctx: _RunContext, pair: _Pair, prompt: Any, order: int, most: float,
                   ahead: float, held: bool) -> Answer:
        """One order's answer: the call, retried as its error's class allows. ahead: the
        later order's most cost, reserved with this call's (kept for it when this answer is
        usable); held: this call's reservation is already taken (until a failed attempt gives
        it back)."""
        from services.judge.llm.errors import (  # loads the SDKs: after _load_providers
            ErrorKind,
            retry_wait,
        )
        p = pair.pairwise
        price = self._settings.price_for(p.provider, p.model)
        retries, attempt = self._retries(pair.config), 0
        while True:
            result = await self._call(ctx, p, prompt, price, most, ahead, held)
            held = False
            if isinstance(result, Answer):
                return result
            self.counts[f"error_{result.kind.value}"] += 1
            log.warning("pairwise call for %s (order %d, attempt %d) failed: %s [%s: %d so far]",
                        pair.task.where, order, attempt + 1, result.message,
                        f"error_{result.kind.value}", self.counts[f"error_{result.kind.value}"])
            if result.kind is ErrorKind.PAUSE:
                await ctx.budget.pause(result.message)
                return Answer("", "", f"llm judging paused: {result.message}")
            if result.kind is ErrorKind.FATAL or attempt >= retries:
                return Answer("", "", f"gave up: {result.message}",
                              transient=result.kind is not ErrorKind.FATAL)
            await asyncio.sleep(retry_wait(self._settings, result, attempt))
            attempt += 1

    async def _call(self, ctx: _RunContext, p: PairwiseConfig, prompt: Any, price: Any,
                    most: float, ahead: float, held: bool) -> Answer | Any:
        """One paid call (in the pair's concurrency slot), its most cost (and ahead, the later
        order's) reserved first unless held: its Answer, or the classified CallError (the
        reservation given back). An unusable answer gives ahead back."""
        from services.judge.llm.errors import SDK_ERRORS, classify
        if held:
            await self._renew_held(ctx)
        blocked = None if held else await ctx.budget.reserve(most + ahead)
        if blocked is not None:
            self.counts["unscored_blocked"] += 1
            return Answer("", "", blocked)
        try:
            self.counts["calls"] += 1
            reply = await self._providers.call(self._clients, self._settings, p.provider,
                                               p.endpoint, p.model, prompt)
        except SDK_ERRORS as exc:
            ctx.budget.release(most + ahead)
            error = classify(p.provider, exc)
            count_llm_call(p.provider, error.kind.value)
            return error
        cost = call_cost(price, reply.input_tokens, reply.output_tokens)
        count_llm_call(p.provider, OK, cost)
        await ctx.budget.charge(cost, reply.input_tokens, reply.output_tokens, None, most)
        if reply.preferred is None:
            if ahead > 0:
                ctx.budget.release(ahead)
            self.counts["unparseable"] += 1
            log.warning("pairwise answer unusable (%s) [unparseable: %d so far]", reply.error,
                        self.counts["unparseable"])
        return Answer(reply.preferred or "", reply.reason,
                      "" if reply.preferred else f"unparseable reply: {reply.error}",
                      False, reply.input_tokens, reply.output_tokens, cost)

    async def _renew_held(self, ctx: _RunContext) -> None:
        """Keeps order 2's reservation (taken with order 1's) from expiring during its call; a
        failed write is logged and counted (the reservation may then be counted as spent
        once it expires: the run's spend is overstated, never exceeded)."""
        try:
            await ctx.budget.renew_held()
        except Exception as exc:  # noqa: BLE001 - the call is still made on its reservation
            self.counts["renew_errors"] += 1
            log.error("pairwise: renewing the budget reservation of run %s failed: %r "
                      "[renew errors: %d]", ctx.budget.run_id, exc, self.counts["renew_errors"])

    def _result(self, pair: _Pair, answers: list[Answer]) -> dict[str, Any]:
        first = answers[0]
        second = answers[1] if len(answers) > 1 else Answer("", "", "")
        outcome, bias = pair_outcome(first.preferred, second.preferred)
        reason = next((f"order {n}: {a.error}" for n, a in enumerate(answers, 1) if a.error),
                      "")
        row = self._row(pair.task, pair.pairwise, pair.baseline_epoch, pair.baseline)
        row.update(outcome=int(outcome), answer_1=first.preferred, answer_2=second.preferred,
                   reason_1=first.reason, reason_2=second.reason, position_bias=bias,
                   unscored_reason=reason if outcome is Outcome.UNSCORED else "",
                   input_tokens=sum(a.input_tokens for a in answers),
                   output_tokens=sum(a.output_tokens for a in answers),
                   cost_usd=sum(a.cost_usd for a in answers))
        self.counts[outcome.name.lower()] += 1
        return row

    @staticmethod
    def _row(task: PairTask, pairwise: PairwiseConfig, epoch: int | None,
             baseline: Text | None) -> dict[str, Any]:
        return {"run_id": task.run_id, "step": task.step, "sample_index": task.sample_index,
                "criterion": pairwise.criterion, "judge_model": pairwise.judge_model,
                "user_id": task.user_id, "epoch": task.epoch,
                "baseline_run_id": task.baseline_run_id,
                "baseline_epoch": -1 if epoch is None else epoch,
                "baseline_step": baseline.step if baseline else None,
                "baseline_sample_index": baseline.sample_index if baseline else None,
                "outcome": int(Outcome.UNSCORED), "answer_1": "", "answer_2": "",
                "reason_1": "", "reason_2": "", "position_bias": False,
                "unscored_reason": "", "input_tokens": 0, "output_tokens": 0,
                "cost_usd": 0.0, "prompt_version": PROMPT_VERSION}

    def _unscored(self, task: PairTask, pairwise: PairwiseConfig, epoch: int | None,
                  reason: str, baseline: Text | None = None) -> Settled:
        self.counts["unscored"] += 1
        log.warning("pairwise judging of %s unscored: %s [unscored: %d so far]", task.where,
                    reason, self.counts["unscored"])
        row = self._row(task, pairwise, epoch, baseline)
        row["unscored_reason"] = reason
        return Settled(task, row, TaskState.DONE)

    def _later(self, task: PairTask, error: str, base_s: float) -> Settled:
        """Back to the queue after a backoff, or failed once the attempts are spent."""
        if task.attempts >= self._settings.max_attempts:
            return self._failed(task, error)
        delay = backoff_s(task.attempts, base_s, self._settings.retry_backoff_max_s)
        self.counts["retried"] += 1
        log.warning("pairwise task %s goes back to the queue (attempt %d/%d, retry in %.1fs, "
                    "retries so far %d): %s", task.where, task.attempts,
                    self._settings.max_attempts, delay, self.counts["retried"], error)
        return Settled(task, None, TaskState.QUEUED, error, delay)

    def _failed(self, task: PairTask, error: str) -> Settled:
        self.counts["failed"] += 1
        log.error("pairwise task %s failed (failed so far %d): %s", task.where,
                  self.counts["failed"], error)
        return Settled(task, None, TaskState.FAILED, error)
