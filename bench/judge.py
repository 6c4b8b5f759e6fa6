"""Judge benchmark, rules path: the durable hand-off and the judging queue on PostgreSQL.

On a throwaway database with the real schemas and roles, with the judge service and two
writer services started as subprocesses (one with judging off, one with
EPOCHLENS_WRITER_JUDGE_ADDRESS pointing at the judge), in one run:

  (a) the writer's ingest rate of --rows predictions (StreamPredictions, as bench/ingest.py
      streams them) with judging OFF, then with judging ON (rules only: the run's config has
      no LLM judge), while the dispatcher hands the rows to the judge and the judge judges
      them. Printed: rows/s of each, the ratio ON/OFF and the cost of judging (1 - ratio;
      target: under --target-overhead), and the CPU seconds of the writer and the judge.
      With the default writer settings the dispatcher defers to ingest
      (EPOCHLENS_WRITER_OUTBOX_INGEST_QUIET_S), so what judging costs the ingest itself is
      the outbox row written with each prediction; to measure the hand-off and the judging
      overlapping the ingest instead, pass
      --writer-env EPOCHLENS_WRITER_OUTBOX_INGEST_QUIET_S=0.
  (b) rule judgments per second end to end through the queue for the judged run: from the
      first EnqueueJudging (the earliest judge.tasks.create_time, stamped when the judge
      stores the task) to the last judgment stored (the latest judge.judgments.create_time),
      once judge.judgments holds every expected judgment (predictions x the rule criteria
      that apply: all have a ground truth). Also printed: how long judging trailed the last
      ingest ack.

A CHECKPOINT precedes each ingest phase (--checkpoint). With --rounds N the OFF and ON
phases alternate N times (each ON phase waits for its judgments before the next phase) and
the medians are printed. The exit status is 1 when the run is invalid (rows or judgments
stored differ from what was sent, or judging did not finish within --judge-timeout-s).

Run from the repository root (PostgreSQL at 127.0.0.1:5432, trust auth):
    . .venv/bin/activate && python bench/judge.py
"""

import argparse
import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass

import asyncpg
import grpc
from _stack import (
    Service,
    Stack,
    add_stack_args,
    bench_stack,
    start_service,
    stop_service,
    wait_healthy,
)
from ingest import checkpoint, cpu_seconds, create_run, make_rows, stream_rows

from epochlens.v1 import writer_pb2_grpc
from services.judge.rules import selected_rules
from services.judge.schema import RulesConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--rows", type=int, default=100_000, help="predictions per phase (default %(default)s)")
    add("--rounds", type=int, default=1, help="OFF/ON phase pairs (default %(default)s)")
    add("--batch-size", type=int, default=64,
        help="predictions per stream message (default %(default)s)")
    add("--window", type=int, default=64,
        help="most unacknowledged batches in flight (default %(default)s)")
    add("--samples", type=int, default=1000,
        help="samples per step: sample_index = i %% samples (default %(default)s)")
    add("--steps-per-epoch", type=int, default=20, help="steps per epoch (default %(default)s)")
    add("--prompt-chars", type=int, default=300, help="prompt length (default %(default)s)")
    add("--truth-chars", type=int, default=300, help="ground truth length (default %(default)s)")
    add("--prediction-chars", type=int, default=600,
        help="prediction length (default %(default)s)")
    add("--text-pool", type=int, default=4096,
        help="distinct random texts per field (default %(default)s)")
    add("--seed", type=int, default=1, help="random seed (default %(default)s)")
    add("--rpc-timeout-s", type=float, default=900.0,
        help="deadline of one ingest stream (default %(default)s)")
    add("--checkpoint", action=argparse.BooleanOptionalAction, default=True,
        help="CHECKPOINT before each ingest phase (default on)")
    add("--judge-timeout-s", type=float, default=1800.0,
        help="most time judging may take after the last ack (default %(default)s)")
    add("--poll-s", type=float, default=0.5,
        help="pause between two counts of the judgments (default %(default)s)")
    add("--target-overhead", type=float, default=0.2,
        help="largest share of ingest throughput judging may cost (default %(default)s)")
    add("--writer-env", action="append", default=[], metavar="NAME=VALUE",
        help="extra environment of both writers, e.g. EPOCHLENS_WRITER_OUTBOX_BATCH=1000")
    add("--judge-env", action="append", default=[], metavar="NAME=VALUE",
        help="extra environment of the judge, e.g. EPOCHLENS_JUDGE_RULE_PROCESSES=2")
    add_stack_args(p)
    return p.parse_args()


def env_pairs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"expected NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


@dataclass
class Ingest:
    """One timed ingest phase."""

    judging: bool
    run_id: str
    seconds: float
    stored: int
    writer_cpu_s: float
    judge_cpu_s: float
    last_ack_wall: float


@dataclass
class Judged:
    """Judging of one ON phase's run, from the database's own timestamps."""

    judgments: int
    seconds: float
    trailing_s: float
    outbox_drained_s: float
    judge_cpu_s: float


async def fetchval(stack: Stack, query: str, *params):
    conn = await asyncpg.connect(stack.admin_dsn)
    try:
        return await conn.fetchval(query, *params)
    finally:
        await conn.close()


async def ingest(stack: Stack, writer: Service, judging: bool, rows: list[tuple],
                 args: argparse.Namespace) -> Ingest:
    """Streams the rows into a new run through `writer` and times it."""
    judge = stack.services["judge"]
    metadata = stack.metadata()
    async with grpc.aio.insecure_channel(writer.address) as channel:
        stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        run_id = await create_run(stub, metadata)
        await checkpoint(stack.admin_dsn, args.checkpoint)
        writer_before, judge_before = cpu_seconds(writer.process), cpu_seconds(judge.process)
        result = await stream_rows(stub, run_id, rows, args, metadata)
        last_ack_wall = time.time()
        writer_cpu = cpu_seconds(writer.process) - writer_before
        judge_cpu = cpu_seconds(judge.process) - judge_before
    if result.rejections or result.inserted != len(rows):
        raise RuntimeError(f"ingest inserted {result.inserted} of {len(rows)} rows, "
                           f"{result.rejections} batches rejected")
    stored = await fetchval(stack, "SELECT count(*) FROM writer.predictions WHERE run_id = $1",
                            uuid.UUID(run_id))
    return Ingest(judging, run_id, result.seconds, stored, writer_cpu, judge_cpu, last_ack_wall)


async def wait_judged(stack: Stack, phase: Ingest, expected: int,
                      args: argparse.Namespace) -> Judged:
    """Waits until the run has every expected judgment (noting when its outbox emptied);
    times judging from the database's timestamps."""
    run = uuid.UUID(phase.run_id)
    judge = stack.services["judge"]
    judge_before = cpu_seconds(judge.process) - phase.judge_cpu_s
    deadline = time.monotonic() + args.judge_timeout_s
    count, drained_wall = 0, None
    while count < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"judging did not finish in {args.judge_timeout_s}s: "
                               f"{count} of {expected} judgments")
        await asyncio.sleep(args.poll_s)
        if drained_wall is None and not await fetchval(
                stack, "SELECT count(*) FROM writer.judge_outbox WHERE run_id = $1", run):
            drained_wall = time.time()
        count = await fetchval(stack, "SELECT count(*) FROM judge.judgments WHERE run_id = $1",
                               run)
    seconds = await fetchval(stack, """
        SELECT EXTRACT(EPOCH FROM (SELECT max(create_time) FROM judge.judgments
                                   WHERE run_id = $1)
                                - (SELECT min(create_time) FROM judge.tasks WHERE run_id = $1))
        """, run)
    last = await fetchval(stack, "SELECT EXTRACT(EPOCH FROM max(create_time)) "
                          "FROM judge.judgments WHERE run_id = $1", run)
    drained = (drained_wall or time.time()) - phase.last_ack_wall
    return Judged(count, float(seconds), float(last) - phase.last_ack_wall, drained,
                  cpu_seconds(judge.process) - judge_before)


async def start_writer(args: argparse.Namespace, stack: Stack, started: list[Service],
                       judging: bool) -> Service:
    extra = env_pairs(args.writer_env)
    if judging:
        extra["EPOCHLENS_WRITER_JUDGE_ADDRESS"] = stack.services["judge"].address
    writer = start_service(args, "writer", stack.dbname, extra)
    started.append(writer)
    await wait_healthy(args, writer)
    return writer


async def run_phases(stack: Stack, rows: list[tuple], expected: int,
                     args: argparse.Namespace) -> tuple[list[Ingest], list[Ingest], list[Judged]]:
    """The judge and both writers run for the whole run; the phases alternate."""
    started: list[Service] = []
    offs, ons, judged = [], [], []
    try:
        judge = start_service(args, "judge", stack.dbname, env_pairs(args.judge_env))
        started.append(judge)
        await wait_healthy(args, judge)
        stack.services["judge"] = judge
        off_writer = await start_writer(args, stack, started, judging=False)
        on_writer = await start_writer(args, stack, started, judging=True)
        for _ in range(args.rounds):
            offs.append(await ingest(stack, off_writer, False, rows, args))
            ons.append(await ingest(stack, on_writer, True, rows, args))
            judged.append(await wait_judged(stack, ons[-1], expected, args))
    finally:
        for service in reversed(started):
            stop_service(args, service)
        stack.services.pop("judge", None)
    return offs, ons, judged


def report(args: argparse.Namespace, offs: list[Ingest], ons: list[Ingest],
           judged: list[Judged], expected: int, criteria: int) -> None:
    def median(values) -> float:
        return statistics.median(list(values))

    off_rate = median(args.rows / p.seconds for p in offs)
    on_rate = median(args.rows / p.seconds for p in ons)
    ratio = on_rate / off_rate
    overhead = 1 - ratio
    verdict = "PASS" if overhead < args.target_overhead else "FAIL"
    jps = median(j.judgments / j.seconds for j in judged)
    lines = [
        ("predictions per phase / rounds", f"{args.rows} / {args.rounds}"),
        ("writer ingest rows/s, judging OFF", f"{off_rate:,.0f}  "
         f"({median(p.seconds for p in offs):.2f} s)"),
        ("writer ingest rows/s, judging ON (rules)", f"{on_rate:,.0f}  "
         f"({median(p.seconds for p in ons):.2f} s)"),
        ("ratio ON / OFF", f"{ratio:.3f}"),
        (f"judging cost to ingest (target < {args.target_overhead:.0%})",
         f"{overhead:.1%}  {verdict}"),
        ("writer CPU s during ingest, OFF / ON", f"{median(p.writer_cpu_s for p in offs):.2f}"
         f" / {median(p.writer_cpu_s for p in ons):.2f}"),
        ("judge CPU s during the ON ingest", f"{median(p.judge_cpu_s for p in ons):.2f}"),
        ("rule criteria per prediction / judgments expected", f"{criteria} / {expected}"),
        ("rule judgments/s end to end (first enqueue -> last judgment)",
         f"{jps:,.0f}  ({median(j.seconds for j in judged):.2f} s, "
         f"{jps / criteria:,.0f} predictions/s)"),
        ("outbox of the run empty after the last ingest ack, s (+- poll)",
         f"{median(j.outbox_drained_s for j in judged):.2f}"),
        ("last judgment after the last ingest ack, s",
         f"{median(j.trailing_s for j in judged):.2f}"),
        ("judge CPU s, ON ingest start -> last judgment",
         f"{median(j.judge_cpu_s for j in judged):.2f}"),
        ("rows stored per phase", ", ".join(str(p.stored) for p in offs + ons)),
    ]
    width = max(len(name) for name, _ in lines)
    print(f"{'metric':<{width}}  value")
    print("-" * (width + 30))
    for name, value in lines:
        print(f"{name:<{width}}  {value}")


async def main_async(args: argparse.Namespace) -> int:
    rows = make_rows(args)
    criteria = len(selected_rules(RulesConfig()))
    expected = args.rows * criteria
    async with bench_stack(args, ()) as stack:
        offs, ons, judged = await run_phases(stack, rows, expected, args)
    report(args, offs, ons, judged, expected, criteria)
    valid = all(p.stored == args.rows for p in offs + ons) and all(
        j.judgments == expected for j in judged)
    return 0 if valid else 1


def main() -> None:
    raise SystemExit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
