"""The judging queue's workers, and the judging they do.

Workers are asyncio tasks inside the judge server. Each claims up to `claim_batch` tasks
(JudgeStore.claim: SKIP LOCKED on PostgreSQL, a lease per task), judges them (rules in a
thread or worker processes; the LLM judge when the task's config turns it on and a key is
configured; the text judged is the prediction as the writer stores it, read acting for the
task's user), and settles them per user in one transaction: every verdict stored (a second
judgment of the same prediction, criterion, judge type and model is skipped by the primary
key), the task marked done. Every task is judged in isolation: one whose rules raise fails at
once, alone, with its reason (the other tasks of the batch, whoever's, are judged as usual).
A task whose LLM judging raised goes back to the queue with an
exponential backoff with jitter, or is marked failed after `max_attempts` (logged at ERROR,
counted). LLM provider errors that may pass by themselves (5xx, 429, network) and outlast the
in-call retries send the task back too, after `llm_transient_retry_base_s` (minutes), and the
run's on_error applies only on the last attempt. A worker that dies keeps its tasks only until
their lease passes.
"""

import asyncio
import importlib
import logging
import math
import multiprocessing
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.judge.config import JudgeSettings
from services.judge.rules import judge_items
from services.judge.schema import (
    Item,
    ItemFailure,
    ItemsFailed,
    JudgeConfig,
    RetryLater,
    RulesConfig,
    Verdict,
)
from services.judge.store import JudgeStore, Outcome, Task, TaskState
from services.judge.stored import StoredText, texts_by_run

log = logging.getLogger(__name__)

__all__ = ["Judging", "JudgeWorkers", "TaskState", "backoff_s"]

_WARNED_RUNS_MAX = 10_000


def backoff_s(attempts: int, base_s: float, max_s: float) -> float:
    """Delay before attempt `attempts + 1`: base * 2^(attempts-1), capped, times a random
    factor in [0.5, 1) so tasks that failed together do not come back together."""
    exponent = min(max(attempts - 1, 0), 30)
    return min(max_s, base_s * 2 ** exponent) * (0.5 + random.random() / 2)


class Judging:
    """Rule judges (in a thread, or in `rule_processes` spawned processes) and the LLM judge
    (services.judge.llm.judge.LlmJudge, created on first use) behind one interface."""

    def __init__(self, settings: JudgeSettings, engine: AsyncEngine) -> None:
        self._settings = settings
        self._engine = engine
        self._defaults = settings.rule_defaults()
        self._pool: ProcessPoolExecutor | None = None
        if settings.rule_processes:
            self._pool = ProcessPoolExecutor(settings.rule_processes,
                                             mp_context=multiprocessing.get_context("spawn"))
        self._llm_judge: Any = None
        self._warned_runs: set[Any] = set()

    async def rules(self, items: Sequence[Item],
                    configs: Sequence[RulesConfig]) -> list[list[Verdict] | ItemFailure]:
        """Rule verdicts per item (items[i] judged with configs[i]); an item whose judging
        raised gets an ItemFailure, the others their verdicts."""
        if not items:
            return []
        if self._pool is None:
            return await asyncio.to_thread(judge_items, items, configs, self._defaults)
        size = math.ceil(len(items) / self._settings.rule_processes)
        loop = asyncio.get_running_loop()
        chunks = await asyncio.gather(*(
            loop.run_in_executor(self._pool, judge_items, items[i:i + size],
                                 configs[i:i + size], self._defaults)
            for i in range(0, len(items), size)))
        return [verdicts for chunk in chunks for verdicts in chunk]

    def llm_on(self, config: JudgeConfig, run_id: Any = None) -> bool:
        """Whether the LLM judge runs for this config; a config that asks for it while its
        provider has no key here is logged once per run."""
        if config.llm is None:
            return False
        if self._settings.llm_judging_on(config):
            return True
        if run_id not in self._warned_runs:
            if len(self._warned_runs) >= _WARNED_RUNS_MAX:
                self._warned_runs.clear()
            self._warned_runs.add(run_id)
            log.warning("%s asks for LLM judging with provider %s but no key (or base URL) "
                        "is configured for it: LLM judging is off, rule judges only",
                        f"run {run_id}" if run_id else "an ad hoc JudgePredictions call",
                        config.llm.provider)
        return False

    async def llm(self, user_id: str, items: Sequence[Item], config: JudgeConfig,
                  defer_transient: bool = False) -> list[list[Verdict] | ItemFailure]:
        """LLM verdicts per item (none for items sample_rate leaves out; an ItemFailure for an
        item whose judging raised). May raise LlmJudgingFailed (on_error=fail), and RetryLater
        when defer_transient is set."""
        if self._llm_judge is None:
            # Imported on first use, in a thread: it loads the provider SDKs (seconds), which
            # a judge that only runs rules never needs, and the event loop keeps serving.
            module = await asyncio.to_thread(importlib.import_module, "services.judge.llm.judge")
            self._llm_judge = self._llm_judge or module.LlmJudge(self._settings, self._engine)
        assert config.llm is not None
        position = {id(item): index for index, item in enumerate(items)}
        out: list[list[Verdict]] = [[] for _ in items]
        try:
            judged = await self._llm_judge.judge_items(user_id, items, config.llm,
                                                       defer_transient)
            failures: dict[int, str] = {}
        except ItemsFailed as exc:
            judged, failures = exc.judged, exc.failures
        for item, verdict in judged:
            out[position[id(item)]].append(verdict)
        return [ItemFailure(failures[index]) if index in failures else verdicts
                for index, verdicts in enumerate(out)]

    async def close(self) -> None:
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown, True, cancel_futures=True)
        if self._llm_judge is not None:
            await self._llm_judge.aclose()


class JudgeWorkers:
    """`worker_count` workers over one JudgeStore; start() with the server, stop() with it."""

    def __init__(self, settings: JudgeSettings, store: JudgeStore, judging: Judging) -> None:
        self._settings = settings
        self._store = store
        self._judging = judging
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.counts: Counter[str] = Counter()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(index), name=f"judge-worker-{index}")
                       for index in range(self._settings.worker_count)]

    def notify(self) -> None:
        """New tasks were enqueued: idle workers look at once."""
        self._wake.set()

    async def stop(self, grace_s: float) -> None:
        """Lets batches in progress settle for grace_s, then cancels; tasks of a cancelled
        batch are claimed again when their lease passes."""
        self._stopping.set()
        self._wake.set()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if pending:
            log.warning("%d judge worker(s) cancelled mid-batch at stop; their tasks return to "
                        "the queue when the lease passes", len(pending))

    async def _run(self, index: int) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                handled = await self.run_once()
                failures = 0
            except Exception:
                failures += 1
                self.counts["loop_errors"] += 1
                pause = backoff_s(failures, self._settings.idle_poll_s,
                                  self._settings.error_backoff_max_s)
                log.exception("judge worker %d: claiming or judging failed (errors so far %d); "
                              "trying again in %.1fs", index, self.counts["loop_errors"], pause)
                await self._idle(pause)
                continue
            if handled == 0:
                await self._idle(self._settings.idle_poll_s)

    async def _idle(self, pause_s: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), pause_s)
        except TimeoutError:
            return
        if not self._stopping.is_set():
            self._wake.clear()

    async def run_once(self) -> int:
        """Claims one batch, judges it (renewing its leases meanwhile) and settles it.
        Returns the number of tasks claimed."""
        tasks = await self.claim()
        if not tasks:
            return 0
        keeper = asyncio.create_task(self._keep_leases(tasks))
        try:
            outcomes = await self.judge(tasks)
        finally:
            keeper.cancel()
        await self.settle(outcomes)
        return len(tasks)

    async def _keep_leases(self, tasks: Sequence[Task]) -> None:
        """Every lease_s / 3, renews the batch's leases; a failed renewal is logged and the
        next one tried (the tasks are claimed again only if the lease passes)."""
        lease_s = self._settings.lease_s
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                renewed = await self._store.extend_leases(tasks, lease_s)
            except Exception:
                self.counts["lease_renewal_errors"] += 1
                log.exception("renewing the leases of %d tasks failed (renewal errors so far "
                              "%d)", len(tasks), self.counts["lease_renewal_errors"])
                continue
            if renewed < len(tasks):
                log.warning("%d of %d leases of a batch being judged had passed and were "
                            "claimed by another worker", len(tasks) - renewed, len(tasks))

    async def claim(self) -> list[Task]:
        return await self._store.claim(self._settings.claim_batch, self._settings.lease_s)

    async def judge(self, tasks: Sequence[Task]) -> list[Outcome]:
        """One outcome per task: done with its verdicts, or a retry/failure with the error.
        Each task is judged in isolation (whoever's tasks share the batch): one whose judging
        raised fails alone, its reason stored. The text judged is the writer's stored one."""
        outcomes, valid, configs = self._screen(tasks)
        valid = await self._with_stored_text(valid)
        try:
            rule_verdicts = await self._judging.rules(
                [t.item() for t in valid], [configs[_key(t)].rules for t in valid])
        except Exception as exc:  # the thread or the process pool failed, not one item
            log.exception("rule judging of %d tasks failed", len(valid))
            return outcomes + [self._unfinished(t, [], _describe(exc)) for t in valid]
        judged: list[tuple[Task, list[Verdict]]] = []
        for task, verdicts in zip(valid, rule_verdicts, strict=True):
            if isinstance(verdicts, ItemFailure):
                outcomes.append(self._rules_failed(task, verdicts.reason))
            else:
                judged.append((task, verdicts))
        llm_results = await self._judge_llm([task for task, _ in judged], configs)
        for task, verdicts in judged:
            outcomes.append(self._outcome(task, verdicts, llm_results.get(_key(task), [])))
        return outcomes

    def _outcome(self, task: Task, verdicts: list[Verdict],
                 extra: list[Verdict] | ItemFailure | BaseException) -> Outcome:
        """A task's outcome from its rule verdicts and its LLM result."""
        if isinstance(extra, ItemFailure):
            return self._unfinished(task, verdicts, extra.reason)
        if isinstance(extra, BaseException):
            return self._unfinished(task, verdicts, _describe(extra),
                                    isinstance(extra, RetryLater))
        return Outcome(task, [*verdicts, *extra], TaskState.DONE)

    def _rules_failed(self, task: Task, reason: str) -> Outcome:
        """A task whose rule judging raised fails at once, alone, its reason stored: rules are
        deterministic, so another attempt would raise again."""
        self.counts["item_errors"] += 1
        self.counts["failed"] += 1
        log.error("judging task %s/%d/%d of user %s raised; the task failed, the rest of its "
                  "batch is judged as usual (item errors so far %d): %s", task.run_id,
                  task.step, task.sample_index, task.user_id, self.counts["item_errors"],
                  reason)
        return Outcome(task, [], TaskState.FAILED, reason)

    async def _with_stored_text(self, tasks: list[Task]) -> list[Task]:
        """The tasks with the text the writer stores for their predictions (read acting for
        each task's user); what a caller sent is judged only for a prediction the writer does
        not store."""
        wanted: dict[str, dict[Any, list[tuple[int, int]]]] = defaultdict(
            lambda: defaultdict(list))
        for task in tasks:
            wanted[task.user_id][task.run_id].append((task.step, task.sample_index))
        stored: dict[tuple, StoredText] = {}
        for user_id, keys in wanted.items():
            for run_id, texts in (await texts_by_run(self._store.engine, user_id,
                                                     keys)).items():
                stored.update(((run_id, *key), text) for key, text in texts.items())
        out = [_with_text(task, stored.get(_key(task))) for task in tasks]
        differed = sum(1 for old, new in zip(tasks, out, strict=True) if old != new)
        if differed:
            self.counts["text_replaced"] += differed
            log.warning("%d of %d tasks were enqueued with text other than the stored "
                        "prediction's; the stored text is judged (so far %d)", differed,
                        len(tasks), self.counts["text_replaced"])
        return out

    def _screen(self, tasks: Sequence[Task]) -> tuple[list[Outcome], list[Task], dict]:
        """Outcomes of tasks that cannot be judged (attempts spent by lease expiries, a
        config that does not parse), the tasks to judge, and every task's parsed config."""
        outcomes: list[Outcome] = []
        valid: list[Task] = []
        configs = self._configs(tasks)
        for task in tasks:
            config = configs[_key(task)]
            if task.attempts > self._settings.max_attempts:
                outcomes.append(self._unfinished(
                    task, [], f"lease expired on all {task.attempts - 1} attempts (the worker "
                    "died or stalled while judging)"))
            elif isinstance(config, str):
                outcomes.append(self._unfinished(task, [], config))
            else:
                valid.append(task)
        return outcomes, valid, configs

    def _configs(self, tasks: Sequence[Task]) -> dict[tuple, JudgeConfig | str]:
        """Each task's parsed judge config, or why it does not parse (parsed once per
        distinct config)."""
        parsed: dict[str, JudgeConfig | str] = {}
        result: dict[tuple, JudgeConfig | str] = {}
        for task in tasks:
            seen = repr(task.config)  # configs read back from one column repr equally
            if seen not in parsed:
                try:
                    parsed[seen] = JudgeConfig.model_validate(task.config)
                except ValidationError as exc:
                    parsed[seen] = f"stored judge config does not parse: {exc}"
            result[_key(task)] = parsed[seen]
        return result

    async def _judge_llm(self, tasks: Sequence[Task], configs: dict[tuple, Any]
                         ) -> dict[tuple, list[Verdict] | ItemFailure | BaseException]:
        """LLM verdicts per task key, one LlmJudge call per (user, LLM config, last attempt or
        not); a call that raises gives its exception to each of its tasks. Transient provider
        errors defer a task (RetryLater) unless this is its last attempt."""
        groups: dict[tuple[str, str, bool], list[Task]] = defaultdict(list)
        for task in tasks:
            config = configs[_key(task)]
            if self._judging.llm_on(config, task.run_id):
                last = task.attempts >= self._settings.max_attempts
                groups[(task.user_id, config.llm.model_dump_json(), last)].append(task)
        keys = list(groups)
        results = await asyncio.gather(*(
            self._judging.llm(user_id, [t.item() for t in groups[(user_id, llm, last)]],
                              configs[_key(groups[(user_id, llm, last)][0])],
                              defer_transient=not last)
            for user_id, llm, last in keys), return_exceptions=True)
        out: dict[tuple, list[Verdict] | ItemFailure | BaseException] = {}
        for group_key, result in zip(keys, results, strict=True):
            group = groups[group_key]
            if isinstance(result, BaseException):
                log.warning("LLM judging of %d tasks of user %s raised %s", len(group),
                            group_key[0], _describe(result))
            for index, task in enumerate(group):
                out[_key(task)] = result if isinstance(result, BaseException) else result[index]
        return out

    def _unfinished(self, task: Task, verdicts: Sequence[Verdict], error: str,
                    transient: bool = False) -> Outcome:
        """Back to the queue after a backoff (llm_transient_retry_base_s for transient LLM
        provider errors, else retry_backoff_base_s), or failed once the attempts are spent."""
        where = f"{task.run_id}/{task.step}/{task.sample_index}"
        if task.attempts < self._settings.max_attempts:
            base = (self._settings.llm_transient_retry_base_s if transient
                    else self._settings.retry_backoff_base_s)
            delay = backoff_s(task.attempts, base, self._settings.retry_backoff_max_s)
            self.counts["retried"] += 1
            log.warning("judging task %s failed on attempt %d/%d, retry in %.1fs (retries so "
                        "far %d): %s", where, task.attempts, self._settings.max_attempts, delay,
                        self.counts["retried"], error)
            return Outcome(task, verdicts, TaskState.QUEUED, error, delay)
        self.counts["failed"] += 1
        log.error("judging task %s failed for good after %d attempts (failed tasks so far "
                  "%d): %s", where, task.attempts, self.counts["failed"], error)
        return Outcome(task, verdicts, TaskState.FAILED, error)

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        """Stores the outcomes, one transaction per user. A user whose transaction fails keeps
        its tasks running until their lease passes; they are then claimed again."""
        per_user: dict[str, list[Outcome]] = defaultdict(list)
        for outcome in outcomes:
            per_user[outcome.task.user_id].append(outcome)
        for user_id, own in per_user.items():
            try:
                stored = await self._store.settle(user_id, own)
            except Exception:
                self.counts["settle_errors"] += 1
                log.exception("storing %d judged tasks of user %s failed (settle errors so far "
                              "%d); they are claimed again after their lease", len(own),
                              user_id, self.counts["settle_errors"])
                continue
            self.counts["judgments"] += stored
            self.counts["done"] += sum(1 for o in own if o.state == TaskState.DONE)


def _key(task: Task) -> tuple:
    return (task.run_id, task.step, task.sample_index)


def _with_text(task: Task, text: StoredText | None) -> Task:
    if text is None:
        return task
    return replace(task, epoch=text.epoch, prompt=text.prompt,
                   ground_truth=text.ground_truth, prediction=text.prediction)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
