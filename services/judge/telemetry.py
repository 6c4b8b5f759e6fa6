"""The judge's domain metrics (docs/ARCHITECTURE.md, "Metrics, traces and logs").

LLM calls and spend are counted where a provider call returns or fails (the LLM judge and
the pairwise judge). The queue gauges are read from the database by a PeriodicGauge every
metrics_db_refresh_s while the metrics endpoint is on, never per scrape: one grouped count of
the queued and running tasks, which the (state, not_before) index answers without reading
the done ones.
"""

from prometheus_client import Counter, Gauge
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.common.telemetry.metrics import PeriodicGauge, metrics_on
from services.judge.config import JudgeSettings
from services.judge.models import tasks_table
from services.judge.store import TaskState

OK = "ok"
LLM_CALLS = Counter("epochlens_judge_llm_calls",
                    "LLM provider calls, by provider and outcome (ok, or the error class: "
                    "retry, rate_limit, pause, fatal).", ["provider", "outcome"])
LLM_SPEND_USD = Counter("epochlens_judge_llm_spend_usd",
                        "What completed LLM calls cost, USD (the configured prices), by "
                        "provider.", ["provider"])
QUEUE_TASKS = Gauge("epochlens_judge_queue_tasks",
                    "Judging tasks waiting (queued) or being judged (running), as of the "
                    "last refresh.", ["state"])
QUEUE_STATES = (TaskState.QUEUED, TaskState.RUNNING)


def count_llm_call(provider: str, outcome: str, cost_usd: float = 0.0) -> None:
    """One provider call: outcome OK with what it cost, or the class of its error."""
    LLM_CALLS.labels(provider, outcome).inc()
    if cost_usd > 0:
        LLM_SPEND_USD.labels(provider).inc(cost_usd)


async def refresh_queue(engine: AsyncEngine) -> None:
    """Sets the queue gauges from one grouped count (a state without tasks reads 0)."""
    tasks = tasks_table.c
    async with engine.connect() as conn:
        counts = dict((await conn.execute(
            select(tasks.state, func.count()).where(tasks.state.in_(QUEUE_STATES))
            .group_by(tasks.state))).all())
    for state in QUEUE_STATES:
        QUEUE_TASKS.labels(state.name.lower()).set(counts.get(state, 0))


def queue_gauge(engine: AsyncEngine, settings: JudgeSettings) -> PeriodicGauge | None:
    """The refresher of the queue gauges; None when the metrics endpoint is off."""
    if not metrics_on(settings):
        return None
    return PeriodicGauge("judge queue", lambda: refresh_queue(engine),
                         settings.metrics_db_refresh_s)
