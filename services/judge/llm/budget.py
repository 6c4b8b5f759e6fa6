"""A run's LLM budget and pause state, kept in judge.run_llm_state.

The row is created on the run's first LLM judging with the run's budget (its config's
budget_usd or the service default). Before each paid call the judge checks spent < budget
(and that judging is not paused). A completed call's cost counts in memory at once, before its
concurrency slot is freed, so the next check of this process sees it; it is then written with
the verdict's cache row by the run's one writer task, which takes every charge queued meanwhile
into one transaction (group commit: the run's row is updated by one transaction at a time, not
locked by every call). That UPDATE ... RETURNING also sets budget_exhausted once spent reaches
the budget and brings back what other workers spent. A judgment is returned only after its
charge is committed. Calls already in flight when the budget runs out still complete: the
overshoot is at most the run's concurrency minus one call (per worker process). Ad hoc items
(no run) have an in-memory budget per request.
"""

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from sqlalchemy import Row, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.common.db import user_transaction
from services.judge.llm import cache
from services.judge.llm.providers import ParsedVerdict
from services.judge.models import run_llm_state_table as state_table

log = logging.getLogger(__name__)

STATE_COLUMNS = (state_table.c.budget_usd, state_table.c.spent_usd, state_table.c.input_tokens,
                 state_table.c.output_tokens, state_table.c.budget_exhausted,
                 state_table.c.paused_reason)


@dataclass(frozen=True)
class BudgetState:
    budget_usd: float
    spent_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    budget_exhausted: bool = False
    paused_reason: str | None = None

    def blocked_reason(self) -> str | None:
        """Why no paid call may start now, or None."""
        if self.paused_reason:
            return f"llm judging paused: {self.paused_reason}"
        if self.budget_exhausted or self.spent_usd >= self.budget_usd:
            return (f"budget exhausted (spent ${self.spent_usd:.6f} of "
                    f"${self.budget_usd:.6f})")
        return None

    def plus(self, charges: Sequence["Charge"]) -> "BudgetState":
        spent = self.spent_usd + sum(c.cost_usd for c in charges)
        return replace(self, spent_usd=spent,
                       input_tokens=self.input_tokens + sum(c.input_tokens for c in charges),
                       output_tokens=self.output_tokens + sum(c.output_tokens for c in charges),
                       budget_exhausted=self.budget_exhausted or spent >= self.budget_usd)


@dataclass
class Charge:
    """A paid call waiting to be written: its cost, tokens and verdict to cache."""

    cost_usd: float
    input_tokens: int
    output_tokens: int
    cached: tuple[str, ParsedVerdict] | None
    stored: asyncio.Future[None] = field(repr=False)


class RunBudget:
    """Budget and pause state of one run (run_id None: an ad hoc request, memory only)."""

    def __init__(self, engine: AsyncEngine, user_id: str, run_id: uuid.UUID | None,
                 budget_usd: float) -> None:
        self._engine = engine
        self._user_id = user_id
        self.run_id = run_id
        self.state = BudgetState(budget_usd=budget_usd)
        self.write_failures = 0
        self._queued: list[Charge] = []
        self._writing: list[Charge] = []
        self._writer: asyncio.Task[None] | None = None

    async def load(self) -> None:
        """Creates the run's row when missing and reads the current state."""
        if self.run_id is None:
            return
        async with user_transaction(self._engine, self._user_id) as conn:
            await conn.execute(cache.insert_ignoring_duplicates(conn, state_table).values(
                run_id=self.run_id, user_id=self._user_id, budget_usd=self.state.budget_usd,
                spent_usd=0.0, input_tokens=0, output_tokens=0,
                budget_exhausted=self.state.budget_usd <= 0, paused_reason=None,
                update_time=datetime.now(UTC)))
            row = (await conn.execute(select(*STATE_COLUMNS)
                                      .where(state_table.c.run_id == self.run_id))).one()
        self._set_from_db(row, self._writing + self._queued)

    def charge(self, cost_usd: float, input_tokens: int, output_tokens: int,
               cached: tuple[str, ParsedVerdict] | None) -> asyncio.Future[None]:
        """Counts a paid call now and queues it for the run's writer; the future is done once
        the cost (and the verdict's cache row) is committed, or carries the write's error."""
        loop = asyncio.get_running_loop()
        charge = Charge(cost_usd, input_tokens, output_tokens, cached, loop.create_future())
        self.state = self.state.plus([charge])
        self._queued.append(charge)
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_queued())
        return charge.stored

    async def _write_queued(self) -> None:
        while self._queued:
            self._writing, self._queued = self._queued, []
            try:
                row = await self._write(self._writing)
            except Exception as exc:  # handed to every caller waiting on these charges
                self.write_failures += 1
                log.error("LLM spend of run %s not recorded (%d calls, $%.6f): %r "
                          "[write failures: %d]", self.run_id, len(self._writing),
                          sum(c.cost_usd for c in self._writing), exc, self.write_failures)
                for charge in self._writing:
                    if not charge.stored.done():  # its caller may have been cancelled
                        charge.stored.set_exception(exc)
                continue
            finally:
                written, self._writing = self._writing, []
            if row is not None:
                self._set_from_db(row, self._queued)
            for charge in written:
                if not charge.stored.done():
                    charge.stored.set_result(None)

    async def drain(self) -> None:
        """Waits until every queued charge is written (or failed)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.wait({self._writer})

    async def _write(self, charges: list[Charge]) -> Row | None:
        """One transaction: the cache rows, then the run's spend (its row lock is held only
        until the commit right after)."""
        entries = [c.cached for c in charges if c.cached is not None]
        async with user_transaction(self._engine, self._user_id) as conn:
            if entries:
                await cache.store(conn, entries)
            if self.run_id is None:
                return None
            return await self._add_spend(conn, charges)

    async def _add_spend(self, conn: AsyncConnection, charges: list[Charge]) -> Row:
        t = state_table
        cost = sum(c.cost_usd for c in charges)
        row = (await conn.execute(
            update(t).where(t.c.run_id == self.run_id).values(
                spent_usd=t.c.spent_usd + cost,
                input_tokens=t.c.input_tokens + sum(c.input_tokens for c in charges),
                output_tokens=t.c.output_tokens + sum(c.output_tokens for c in charges),
                budget_exhausted=or_(t.c.budget_exhausted,
                                     t.c.spent_usd + cost >= t.c.budget_usd),
                update_time=datetime.now(UTC),
            ).returning(*STATE_COLUMNS))).one_or_none()
        if row is None:
            raise RuntimeError(f"run_llm_state row of run {self.run_id} is missing; "
                               f"cost ${cost:.6f} not recorded")
        if row.budget_exhausted and row.spent_usd - cost < row.budget_usd:
            log.warning("LLM budget of run %s exhausted: spent $%.6f of $%.6f", self.run_id,
                        row.spent_usd, row.budget_usd)
        return row

    def _set_from_db(self, row: Row, unwritten: Sequence[Charge]) -> None:
        """The stored state plus the charges not in it yet."""
        self.state = BudgetState(*row).plus(unwritten)

    async def pause(self, reason: str) -> None:
        """Pauses the run's LLM judging (the first reason is kept) until an operator clears it."""
        self.state = replace(self.state, paused_reason=self.state.paused_reason or reason)
        if self.run_id is None:
            return
        t = state_table
        async with user_transaction(self._engine, self._user_id) as conn:
            row = (await conn.execute(
                update(t).where(t.c.run_id == self.run_id).values(
                    paused_reason=func.coalesce(t.c.paused_reason, reason),
                    update_time=datetime.now(UTC),
                ).returning(*STATE_COLUMNS))).one()
        self._set_from_db(row, self._writing + self._queued)
        log.error("LLM judging of run %s paused: %s", self.run_id, self.state.paused_reason)
