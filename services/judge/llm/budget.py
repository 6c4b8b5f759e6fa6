"""A run's LLM budget and pause state, kept in judge.run_llm_state.

The row is created on the run's first LLM judging with the run's budget (its config's
budget_usd or the service default). Spending never exceeds the budget: before each paid call
the judge reserves the most that call may cost (services.judge.llm.cost.max_call_cost) in the
run's row, granted only while spent + reserved + this call <= budget, across every worker and
replica (the run's reserver task takes the reservations queued meanwhile into one transaction:
one conditional UPDATE when all fit, else the row locked and each granted in order). A judge
reserves lease_calls calls' worth at once (its lease) and hands it to its own calls without a
round trip; the lease's unspent rest goes back once none of its calls is in flight. A call
that does not fit is not made: while it does not fit only because
of calls in flight it waits for them to settle; once spent + this call exceeds the budget the
run's budget is exhausted (budget_exhausted, the summary says so). A completed call is settled
(its reservation released, its actual cost added) with the verdict's cache row by the run's
one writer task, which takes every settlement queued meanwhile into one transaction (group
commit); a judgment is returned only after its charge is committed. A reservation whose judge
died mid-call is counted as spent at its full amount once reserved_until passes (the call may
have been billed); reserved_until is the run's latest, so while other calls keep reserving it
stays reserved, still held against the budget. Ad hoc items (no run) have an in-memory budget
per request.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import Row, case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.common.db import user_transaction
from services.judge.llm import cache
from services.judge.models import run_llm_state_table as state_table
from services.judge.purge import purged_among

log = logging.getLogger(__name__)

STATE_COLUMNS = (state_table.c.budget_usd, state_table.c.spent_usd, state_table.c.input_tokens,
                 state_table.c.output_tokens, state_table.c.budget_exhausted,
                 state_table.c.paused_reason, state_table.c.reserved_usd)
# Reserved dollars below this are float residue of settled reservations, not calls in flight.
USD_EPSILON = 1e-12


@dataclass(frozen=True)
class BudgetState:
    budget_usd: float
    spent_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    budget_exhausted: bool = False
    paused_reason: str | None = None
    reserved_usd: float = 0.0

    def blocked_reason(self) -> str | None:
        """Why no paid call may start now, or None."""
        if self.paused_reason:
            return f"llm judging paused: {self.paused_reason}"
        if self.budget_exhausted or self.spent_usd >= self.budget_usd:
            return (f"budget exhausted (spent ${self.spent_usd:.6f} of "
                    f"${self.budget_usd:.6f})")
        return None

    def fits(self, amount_usd: float) -> bool:
        """Whether a call that may cost `amount_usd` fits beside what is spent and reserved."""
        return self.spent_usd + self.reserved_usd + amount_usd <= self.budget_usd

    def plus(self, charges: Sequence["Charge"]) -> "BudgetState":
        """This state with `charges` settled: their cost spent, their reservations released."""
        spent = self.spent_usd + sum(c.cost_usd for c in charges)
        reserved = self.reserved_usd - sum(c.reserved_usd for c in charges)
        return replace(self, spent_usd=spent, reserved_usd=max(reserved, 0.0),
                       input_tokens=self.input_tokens + sum(c.input_tokens for c in charges),
                       output_tokens=self.output_tokens + sum(c.output_tokens for c in charges),
                       budget_exhausted=self.budget_exhausted or spent >= self.budget_usd)


@dataclass
class Charge:
    """A call's settlement waiting to be written: its cost, tokens, verdict to cache and the
    reservation it releases."""

    cost_usd: float
    input_tokens: int
    output_tokens: int
    cached: cache.Entry | None
    reserved_usd: float
    stored: asyncio.Future[None] = field(repr=False)


@dataclass
class _Wanted:
    """A reservation waiting for the run's reserver task: its amount, and whether granted."""

    amount_usd: float
    granted: asyncio.Future[bool] = field(repr=False)


def _retrieved(future: asyncio.Future[None]) -> None:
    """Marks a background write's error as seen (_write_queued logged it)."""
    if not future.cancelled():
        future.exception()


class RunBudget:
    """Budget and pause state of one run (run_id None: an ad hoc request, memory only)."""

    def __init__(self, engine: AsyncEngine, user_id: str, run_id: uuid.UUID | None,
                 budget_usd: float, hold_s: float, poll_s: float, lease_calls: int = 1,
                 lease_fresh_s: float = 0.0) -> None:
        """hold_s: how long a reservation may stay unsettled before it counts as spent;
        poll_s: longest wait before a reservation that did not fit is tried again;
        lease_calls: calls' worth of budget reserved in the database at once (the lease),
        handed out locally; lease_fresh_s: how long after it is taken a lease may be handed
        out (hold_s less the longest call, so a call from it settles before it expires)."""
        self._engine = engine
        self._user_id = user_id
        self.run_id = run_id
        self.state = BudgetState(budget_usd=budget_usd)
        self.write_failures = 0
        self._hold_s = hold_s
        self._poll_s = poll_s
        self._queued: list[Charge] = []
        self._writing: list[Charge] = []
        self._writer: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()
        self._wanted: list[_Wanted] = []
        self._reserver: asyncio.Task[None] | None = None
        self._lease_calls = lease_calls
        self._lease_fresh_s = lease_fresh_s
        self._lease = 0.0  # reserved in the database by this judge and not spent yet
        self._held = 0.0  # the part of the lease held by calls in flight
        self._lease_fresh_until = 0.0  # monotonic time the lease may be handed out until

    async def load(self) -> None:
        """Creates the run's row when missing and reads the current state."""
        if self.run_id is None:
            return
        async with user_transaction(self._engine, self._user_id) as conn:
            if await purged_among(conn, self._user_id, [self.run_id]):
                return  # deleted (PurgeRun): no spend row is made again; _write stores none
            await conn.execute(cache.insert_ignoring_duplicates(conn, state_table).values(
                run_id=self.run_id, user_id=self._user_id, budget_usd=self.state.budget_usd,
                spent_usd=0.0, input_tokens=0, output_tokens=0,
                budget_exhausted=self.state.budget_usd <= 0, paused_reason=None,
                update_time=datetime.now(UTC), reserved_usd=0.0, reserved_until=None))
            row = (await conn.execute(select(*STATE_COLUMNS)
                                      .where(state_table.c.run_id == self.run_id))).one()
        self._set_from_db(row, self._writing + self._queued)

    async def reserve(self, amount_usd: float) -> str | None:
        """Reserves `amount_usd` for one paid call: None once reserved, else why the call may
        not be made (paused, or the budget cannot hold it). While it does not fit only because
        of calls in flight, waits for one to settle (or poll_s) and tries again. A free call
        (a model without a price) reserves nothing."""
        if amount_usd <= 0:
            return self.state.blocked_reason()
        while True:
            if (reason := self.state.blocked_reason()) is not None:
                return reason
            if self._from_lease(amount_usd) or await self._extend_lease(amount_usd):
                return None
            self._return_idle_lease()
            if (reason := self.state.blocked_reason()) is not None:
                return reason
            if self.state.spent_usd + amount_usd > self.state.budget_usd:
                return await self._exhaust(amount_usd)
            settled = self._settled
            try:
                await asyncio.wait_for(settled.wait(), self._poll_s)
            except TimeoutError:
                pass

    def _from_lease(self, amount_usd: float) -> bool:
        """Takes amount_usd from this judge's lease when it is fresh and holds enough."""
        if (self.run_id is None or time.monotonic() > self._lease_fresh_until
                or self._lease - self._held < amount_usd - USD_EPSILON):
            return False
        self._held += amount_usd
        return True

    async def _extend_lease(self, amount_usd: float) -> bool:
        """Adds lease_calls calls' worth to the lease in the database (only what the lease
        lacks for this call when that does not fit) and takes amount_usd from it; any new
        reservation renews the run's reserved_until, so the whole lease is fresh again."""
        if self.run_id is None:
            return await self._reserve_once(amount_usd)
        granted = True
        while granted:  # calls of this judge may take the lease while this one waits
            lacking = max(amount_usd - (self._lease - self._held), 0.0)
            for wanted in dict.fromkeys((amount_usd * self._lease_calls, lacking)):
                if granted := await self._reserve_once(wanted):
                    self._lease += wanted
                    self._lease_fresh_until = time.monotonic() + self._lease_fresh_s
                    break
            if granted and self._from_lease(amount_usd):
                return True
        return False

    async def renew_held(self) -> None:
        """Before a call made on budget this judge reserved earlier for it (a pair's order 2,
        reserved with order 1): once the lease is no longer fresh (that call might settle
        after the run's reserved_until), pushes reserved_until to hold_s from now, so the
        reservation is not counted as spent while its call may still be made."""
        if (self.run_id is None or self._held <= USD_EPSILON
                or time.monotonic() <= self._lease_fresh_until):
            return
        t, now = state_table, datetime.now(UTC)
        until = now + timedelta(seconds=self._hold_s)
        async with user_transaction(self._engine, self._user_id) as conn:
            await conn.execute(update(t).where(t.c.run_id == self.run_id,
                                               t.c.reserved_usd > 0).values(
                reserved_until=case((t.c.reserved_until > until, t.c.reserved_until),
                                    else_=until), update_time=now))
        self._lease_fresh_until = time.monotonic() + self._lease_fresh_s

    def _return_idle_lease(self) -> None:
        """Gives the lease back to the database when none of this judge's calls holds any of
        it (a lease taken by a call that then did not fit, or its unused rest): other judges
        of the run may need it."""
        if self.run_id is None or self._held > USD_EPSILON or self._lease <= 0:
            return
        lease, self._lease, self._held = self._lease, 0.0, 0.0
        self._give_back(lease)

    def _give_back(self, reserved_usd: float) -> None:
        """Releases reserved_usd of the run's row that no call holds, in the background."""
        self._queue_charge(Charge(0.0, 0, 0, None, reserved_usd,
                                  asyncio.get_running_loop().create_future())
                           ).add_done_callback(_retrieved)

    def _settle_lease(self, cost_usd: float, reserved_usd: float) -> float:
        """A call of reserved_usd settled at cost_usd: what the database's reserved_usd drops
        by (the cost leaves the lease; once no call is in flight the rest goes back too)."""
        if self.run_id is None:
            return reserved_usd
        self._held = max(self._held - reserved_usd, 0.0)
        released = min(cost_usd, self._lease)
        self._lease -= released
        if self._held <= USD_EPSILON:
            released, self._lease, self._held = released + self._lease, 0.0, 0.0
        return released

    def release(self, reserved_usd: float) -> None:
        """Gives back the reservation of a call that billed nothing (it failed); written in
        the background (a write that fails is logged and counted by the writer task)."""
        self.charge(0.0, 0, 0, None, reserved_usd).add_done_callback(_retrieved)

    def charge(self, cost_usd: float, input_tokens: int, output_tokens: int,
               cached: cache.Entry | None, reserved_usd: float) -> asyncio.Future[None]:
        """Settles a paid call in memory now (cost spent, reservation released) and queues it
        for the run's writer; the future is done once the settlement (and the verdict's cache
        row) is committed, or carries the write's error."""
        charge = Charge(cost_usd, input_tokens, output_tokens, cached,
                        self._settle_lease(cost_usd, reserved_usd),
                        asyncio.get_running_loop().create_future())
        return self._queue_charge(charge)

    def _queue_charge(self, charge: "Charge") -> asyncio.Future[None]:
        self.state = self.state.plus([charge])
        self._queued.append(charge)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_queued())
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
                self._wake_waiters()
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
            # Runs deleted while being judged (PurgeRun): their cache and spend stay gone.
            purged = await purged_among(conn, self._user_id,
                                        [self.run_id, *(e.run_id for e in entries)])
            entries = [e for e in entries if e.run_id not in purged]
            if entries:
                await cache.store(conn, self._user_id, entries)
            if self.run_id is None or self.run_id in purged:
                return None
            return await self._add_spend(conn, charges)

    async def _add_spend(self, conn: AsyncConnection, charges: list[Charge]) -> Row:
        t = state_table
        cost = sum(c.cost_usd for c in charges)
        left = t.c.reserved_usd - sum(c.reserved_usd for c in charges)
        row = (await conn.execute(
            update(t).where(t.c.run_id == self.run_id).values(
                spent_usd=t.c.spent_usd + cost,
                reserved_usd=case((left > USD_EPSILON, left), else_=0.0),
                reserved_until=case((left > USD_EPSILON, t.c.reserved_until), else_=None),
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

    def _wake_waiters(self) -> None:
        """Reservations waiting for calls in flight to settle try again."""
        self._settled.set()
        self._settled = asyncio.Event()

    async def _reserve_once(self, amount_usd: float) -> bool:
        """One attempt to reserve; self.state is the run's state after it either way. The
        attempts queued meanwhile go to the database together (group commit, the run's row
        locked once per transaction, as the charges are)."""
        if self.run_id is None:
            if self.state.blocked_reason() is not None or not self.state.fits(amount_usd):
                return False
            self.state = replace(self.state, reserved_usd=self.state.reserved_usd + amount_usd)
            return True
        loop = asyncio.get_running_loop()
        wanted = _Wanted(amount_usd, loop.create_future())
        self._wanted.append(wanted)
        if self._reserver is None or self._reserver.done():
            self._reserver = loop.create_task(self._reserve_queued())
        return await wanted.granted

    async def _reserve_queued(self) -> None:
        while self._wanted:
            batch, self._wanted = self._wanted, []
            try:
                granted = await self._reserve_batch([w.amount_usd for w in batch])
            except Exception as exc:  # handed to every caller waiting on these reservations
                self.write_failures += 1
                log.error("LLM budget reservations of run %s failed (%d calls, none made): "
                          "%r [write failures: %d]", self.run_id, len(batch), exc,
                          self.write_failures)
                for wanted in batch:
                    if not wanted.granted.done():  # its caller may have been cancelled
                        wanted.granted.set_exception(exc)
                continue
            for wanted, ok in zip(batch, granted, strict=True):
                if not wanted.granted.done():
                    wanted.granted.set_result(ok)
                elif ok:  # its caller is gone: give the reservation back to the database
                    self._give_back(wanted.amount_usd)

    async def _reserve_batch(self, amounts: list[float]) -> list[bool]:
        """One transaction: every amount at once when all fit (one conditional UPDATE, the
        usual case); else each in order while it fits."""
        now = datetime.now(UTC)
        async with user_transaction(self._engine, self._user_id) as conn:
            row = await self._reserve_all(conn, sum(amounts), now)
            if row is not None:
                granted = [True] * len(amounts)
            else:
                row, granted = await self._reserve_each(conn, amounts, now)
        self._set_from_db(row[:len(STATE_COLUMNS)], self._writing + self._queued)
        return granted

    async def _reserve_all(self, conn: AsyncConnection, total_usd: float,
                           now: datetime) -> Row | None:
        """The atomic reservation of total_usd: the run's row after it, None when it does not
        fit (or an expired reservation is to be counted first)."""
        t, until = state_table, now + timedelta(seconds=self._hold_s)
        return (await conn.execute(update(t).where(
            t.c.run_id == self.run_id, ~t.c.budget_exhausted, t.c.paused_reason.is_(None),
            t.c.spent_usd + t.c.reserved_usd + total_usd <= t.c.budget_usd,
            or_(t.c.reserved_usd <= 0, t.c.reserved_until.is_(None), t.c.reserved_until >= now),
        ).values(
            reserved_usd=t.c.reserved_usd + total_usd, update_time=now,
            reserved_until=case((t.c.reserved_until > until, t.c.reserved_until), else_=until),
        ).returning(*STATE_COLUMNS))).one_or_none()

    async def _reserve_each(self, conn: AsyncConnection, amounts: list[float],
                            now: datetime) -> tuple[Row | tuple, list[bool]]:
        """The run's row locked (its expired reservations counted as spent), then each amount
        granted, in order, while spent + reserved + it fits."""
        t = state_table
        row = (await conn.execute(update(t).where(t.c.run_id == self.run_id).values(
            update_time=now).returning(*STATE_COLUMNS, t.c.reserved_until))).one()
        spent, reserved, until = self._unexpired(row, now)
        open_ = not row.budget_exhausted and row.paused_reason is None
        granted = []
        for amount in amounts:
            granted.append(open_ and spent + reserved + amount <= row.budget_usd)
            reserved += amount if granted[-1] else 0.0
        if any(granted):
            until = max(until or now, now + timedelta(seconds=self._hold_s))
        if (spent, reserved) == (row.spent_usd, row.reserved_usd):
            return row, granted
        return (await conn.execute(update(t).where(t.c.run_id == self.run_id).values(
            spent_usd=spent, reserved_usd=reserved, reserved_until=until,
            budget_exhausted=row.budget_exhausted or spent >= row.budget_usd,
        ).returning(*STATE_COLUMNS))).one(), granted

    def _unexpired(self, row: Row, now: datetime) -> tuple[float, float, datetime | None]:
        """(spent, reserved, reserved_until) of a locked row, reservations whose judge died
        mid-call (reserved_until passed) counted as spent in full: they may have been billed."""
        until = row.reserved_until
        if until is not None and until.tzinfo is None:  # SQLite keeps no time zone
            until = until.replace(tzinfo=UTC)
        if row.reserved_usd <= 0 or until is None or until >= now:
            return row.spent_usd, row.reserved_usd, until
        log.warning("LLM budget reservations of run %s ($%.6f) were not settled by %s (a judge "
                    "died mid-call?): counted as spent", self.run_id, row.reserved_usd,
                    until.isoformat())
        return row.spent_usd + row.reserved_usd, 0.0, None

    async def _exhaust(self, amount_usd: float) -> str:
        """Marks the run's budget exhausted: what is left cannot hold a call of amount_usd."""
        reason = (f"budget exhausted (spent ${self.state.spent_usd:.6f} of "
                  f"${self.state.budget_usd:.6f}; a call may cost up to ${amount_usd:.6f})")
        self.state = replace(self.state, budget_exhausted=True)
        if self.run_id is None:
            return reason
        t = state_table
        async with user_transaction(self._engine, self._user_id) as conn:
            first = (await conn.execute(update(t).where(
                t.c.run_id == self.run_id, ~t.c.budget_exhausted).values(
                budget_exhausted=True, update_time=datetime.now(UTC)))).rowcount
        if first:
            log.warning("LLM budget of run %s exhausted: %s", self.run_id, reason)
        return reason

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
