"""Replicas benchmark: what a second writer and two more judges give on this machine.

Each phase on its own throwaway database (the real schemas and roles), with the services
started as subprocesses, in one run:

  (a) ingest rows/s through the trainer's streaming client (trainer_client.streaming, the
      spool and all), --clients clients each in its own process streaming --rows-per-client
      predictions of its own run, over 1 writer, then over 2 writers (one ipv4: target,
      round_robin: each client's stream goes to the next ready writer). Timed from the
      first client's first submit to the last client's close (everything acked, the run
      finished). Judging off. Printed with the CPU seconds of the writers.
  (b) rule judgments/s with 1 judge, then with 3 judges: one writer (judging on, its
      dispatcher over the judges' ipv4: target) is streamed --judge-rows predictions by
      one client; judging is timed from the first task stored to the last judgment
      stored (the database's timestamps), once every expected judgment is there.

What the figures can show on a 2-core machine: whether a replica adds throughput when the
one process was not using a whole core, and what extra processes cost. They cannot show
scaling: the clients, the services and PostgreSQL all share the same two cores, so a
second writer mostly splits the same CPU (and the clients' own encoding and spooling
compete with it). On a machine with more cores than processes the same script measures
the scaling. The exit status is 1 when a phase stored or judged a different number of
rows than sent.

Run from the repository root (PostgreSQL at 127.0.0.1:5432, trust auth):
    . .venv/bin/activate && python bench/replicas.py
"""

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from _stack import (
    Service,
    add_stack_args,
    create_database,
    drop_database,
    dsn,
    migrate_database,
    start_service,
    stop_service,
    wait_healthy,
)
from ingest import cpu_seconds

from services.common.auth import mint_token
from services.common.config import AuthSettings
from services.judge.rules import selected_rules
from services.judge.schema import RulesConfig
from trainer_client.config import PredictionsConfig
from trainer_client.results import GenerationResult
from trainer_client.spool import RunRecord, Spool
from trainer_client.streaming import StreamingClient


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--clients", type=int, default=4, help="streaming clients (processes) of the ingest "
        "phases (default %(default)s)")
    add("--rows-per-client", type=int, default=5000,
        help="predictions each client streams (default %(default)s)")
    add("--samples", type=int, default=100,
        help="predictions per pass (one submit) (default %(default)s)")
    add("--text-chars", type=int, default=200,
        help="length of each prompt, ground truth and prediction (default %(default)s)")
    add("--judge-rows", type=int, default=4000,
        help="predictions judged per judging phase (default %(default)s)")
    add("--writers", type=int, nargs=2, default=[1, 2], metavar=("A", "B"),
        help="writer counts of the two ingest phases (default %(default)s)")
    add("--judges", type=int, nargs=2, default=[1, 3], metavar=("A", "B"),
        help="judge counts of the two judging phases (default %(default)s)")
    add("--flush-timeout-s", type=float, default=600.0,
        help="longest a client waits for its acks at close (default %(default)s)")
    add("--judge-timeout-s", type=float, default=600.0,
        help="longest wait for a judging phase to finish (default %(default)s)")
    add("--poll-s", type=float, default=0.25,
        help="pause between two counts of the judgments (default %(default)s)")
    add_stack_args(p)
    return p.parse_args()


@dataclass(frozen=True)
class ClientJob:
    """What one streaming client process does."""

    address: str
    token: str
    rows: int
    samples: int
    text_chars: int
    spool_dir: str
    name: str
    flush_timeout_s: float


def stream_client(job: ClientJob) -> tuple[float, float, int, int]:
    """Runs in its own process: streams job.rows predictions; (start, end, inserted,
    duplicates), start and end as wall-clock seconds."""
    config = PredictionsConfig(_env_file=None, spool_dir=Path(job.spool_dir))
    spool = Spool.create(config.spool_dir, RunRecord(os.urandom(8).hex(), job.name, "bench",
                                                     "bench", {}))
    client = StreamingClient(config, spool, job.address, job.token)
    text = "x" * job.text_chars
    client.start()
    start = time.time()
    for step, first in enumerate(range(0, job.rows, job.samples), start=1):
        count = min(job.samples, job.rows - first)
        client.submit(1, step, [GenerationResult(i, text, text, text, 1.0, 1, 1)
                                for i in range(count)])
    client.finish()
    report = client.close(job.flush_timeout_s)
    return start, time.time(), report.inserted, report.duplicates


def run_clients(args: argparse.Namespace, address: str, clients: int, rows: int,
                tag: str) -> tuple[float, int, int]:
    """`clients` streaming clients at once, each in its own process: (seconds from the
    first start to the last end, inserted, duplicates)."""
    token = mint_token(AuthSettings(jwt_algorithm="HS256", jwt_secret=args.jwt_secret),
                       args.bench_user)
    with tempfile.TemporaryDirectory(prefix="epochlens-bench-spool-") as spools:
        jobs = [ClientJob(address, token, rows, args.samples, args.text_chars,
                          f"{spools}/{index}", f"{tag}-{index}", args.flush_timeout_s)
                for index in range(clients)]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=clients, mp_context=context) as pool:
            results = list(pool.map(stream_client, jobs))
    starts, ends, inserted, duplicates = zip(*results, strict=True)
    return max(ends) - min(starts), sum(inserted), sum(duplicates)


@dataclass
class Phase:
    """One timed phase: label, replicas, seconds, work done and CPU seconds."""

    label: str
    replicas: int
    seconds: float
    done: int
    expected: int
    service_cpu_s: float

    @property
    def rate(self) -> float:
        return self.done / self.seconds


async def start_all(args: argparse.Namespace, kind: str, dbname: str, count: int,
                    started: list[Service], extra: dict[str, str] | None = None) -> list[Service]:
    services = [start_service(args, kind, dbname, extra) for _ in range(count)]
    started.extend(services)
    for service in services:
        await wait_healthy(args, service)
    return services


def target(services: list[Service]) -> str:
    return "ipv4:" + ",".join(service.address for service in services)


async def ingest_phase(args: argparse.Namespace, writers: int) -> Phase:
    dbname, started = await create_database(args), []
    try:
        await migrate_database(args, dbname)
        services = await start_all(args, "writer", dbname, writers, started)
        before = sum(cpu_seconds(s.process) for s in services)
        seconds, inserted, _ = await asyncio.to_thread(
            run_clients, args, target(services), args.clients, args.rows_per_client,
            f"ingest-{writers}")
        cpu = sum(cpu_seconds(s.process) for s in services) - before
        stored = await count(args, dbname, "SELECT count(*) FROM writer.predictions")
        expected = args.clients * args.rows_per_client
        return Phase(f"ingest rows/s, {writers} writer(s)", writers, seconds,
                     min(inserted, stored), expected, cpu)
    finally:
        for service in started:
            stop_service(args, service)
        await drop_database(args, dbname)


async def count(args: argparse.Namespace, dbname: str, query: str) -> float:
    conn = await asyncpg.connect(dsn(args, args.pg_admin_user, dbname))
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


JUDGING_SECONDS = """SELECT EXTRACT(EPOCH FROM (SELECT max(create_time) FROM judge.judgments)
                                           - (SELECT min(create_time) FROM judge.tasks))"""


async def judge_phase(args: argparse.Namespace, judges: int, criteria: int) -> Phase:
    dbname, started = await create_database(args), []
    expected = args.judge_rows * criteria
    try:
        await migrate_database(args, dbname)
        judge_services = await start_all(args, "judge", dbname, judges, started)
        extra = {"EPOCHLENS_WRITER_JUDGE_ADDRESS": target(judge_services)}
        [writer] = await start_all(args, "writer", dbname, 1, started, extra)
        before = sum(cpu_seconds(s.process) for s in judge_services)
        await asyncio.to_thread(run_clients, args, writer.address, 1, args.judge_rows,
                                f"judge-{judges}")
        judged = await wait_judged(args, dbname, expected)
        seconds = await count(args, dbname, JUDGING_SECONDS)
        cpu = sum(cpu_seconds(s.process) for s in judge_services) - before
        return Phase(f"rule judgments/s, {judges} judge(s)", judges, float(seconds), judged,
                     expected, cpu)
    finally:
        for service in started:
            stop_service(args, service)
        await drop_database(args, dbname)


async def wait_judged(args: argparse.Namespace, dbname: str, expected: int) -> int:
    deadline = time.monotonic() + args.judge_timeout_s
    judged = 0
    while judged < expected and time.monotonic() < deadline:
        await asyncio.sleep(args.poll_s)
        judged = await count(args, dbname, "SELECT count(*) FROM judge.judgments")
    return judged


def report(phases: list[Phase]) -> None:
    print(f"CPU cores on this machine: {os.cpu_count()} (clients, services and PostgreSQL "
          "share them)")
    header = f"{'phase':<32} {'replicas':>8} {'done':>8} {'seconds':>8} {'rate/s':>9} " \
             f"{'service CPU s':>13}"
    print(header)
    print("-" * len(header))
    for p in phases:
        print(f"{p.label:<32} {p.replicas:>8} {p.done:>8} {p.seconds:>8.2f} {p.rate:>9,.0f} "
              f"{p.service_cpu_s:>13.2f}")
    for first, second in ((phases[0], phases[1]), (phases[2], phases[3])):
        print(f"{second.label} / {first.label}: {second.rate / first.rate:.2f}x")


async def main_async(args: argparse.Namespace) -> int:
    criteria = len(selected_rules(RulesConfig()))
    phases = [await ingest_phase(args, writers) for writers in args.writers]
    phases += [await judge_phase(args, judges, criteria) for judges in args.judges]
    report(phases)
    return 0 if all(p.done == p.expected for p in phases) else 1


def main() -> None:
    raise SystemExit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
