"""ListMetrics benchmark: one long run's metrics read through the real query service.

Seeds a throwaway PostgreSQL database (real schema, RLS and roles) with one run of
--steps steps x --names metric names (3,000,000 values at the defaults) by COPY as the
superuser, then (VACUUM) ANALYZE, then calls QueryService.ListMetrics over loopback gRPC
and prints, per call type, p50/p99 latency (ms), points returned and response bytes:
  * all names at the service default budget (1000 points per series);
  * one name at --max-points;
  * one name over a window of --window steps (zoomed in: the same budget, finer buckets).

Run from the repository root (PostgreSQL at 127.0.0.1:5432, trust auth):
    . .venv/bin/activate && python bench/metrics.py
"""

import argparse
import asyncio
import json
import math
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from _stack import add_stack_args, bench_stack, percentile, rollup_statements

from epochlens.v1 import common_pb2, query_pb2, query_pb2_grpc
from services.writer.models import ROLLUP_WIDTHS, SCHEMA

RUN_COLUMNS = ("id", "user_id", "name", "model_name", "dataset_name", "config", "state",
               "request_id", "create_time", "finish_time")
METRIC_COLUMNS = ("run_id", "step", "name", "user_id", "value", "epoch", "wall_time",
                  "create_time")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stack_args(p)
    p.add_argument("--steps", type=int, default=1_000_000, help="steps of the run")
    p.add_argument("--names", type=int, default=3, help="metric names per step")
    p.add_argument("--max-points", type=int, default=1000, help="budget of the one-name call")
    p.add_argument("--window", type=int, default=50_000, help="steps of the zoomed call")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per call type")
    p.add_argument("--iterations", type=int, default=20, help="timed calls per call type")
    p.add_argument("--no-vacuum", dest="vacuum", action="store_false",
                   help="ANALYZE only (default: VACUUM ANALYZE)")
    return p.parse_args()


def metric_records(run_id: uuid.UUID, args: argparse.Namespace):
    start = datetime.now(UTC) - timedelta(seconds=args.steps)
    for step in range(args.steps):
        wall = start + timedelta(seconds=step)
        for k in range(args.names):
            yield (run_id, step, f"metric_{k}", args.bench_user,
                   math.exp(-step / args.steps) + 0.01 * math.sin(step * (k + 1)),
                   step / 1000, wall, wall)


async def seed(admin_dsn: str, args: argparse.Namespace) -> tuple[str, float]:
    started = time.perf_counter()
    run_id = uuid.uuid4()
    conn = await asyncpg.connect(admin_dsn)
    try:
        now = datetime.now(UTC)
        await conn.copy_records_to_table("runs", schema_name=SCHEMA, columns=list(RUN_COLUMNS),
                                         records=[(run_id, args.bench_user, "long-run", "m", "d",
                                                   json.dumps({}), common_pb2.RUN_STATE_RUNNING,
                                                   None, now, None)])
        await conn.copy_records_to_table("metrics", schema_name=SCHEMA,
                                         columns=list(METRIC_COLUMNS),
                                         records=metric_records(run_id, args))
        for statement in rollup_statements(SCHEMA, ROLLUP_WIDTHS):  # what the writer keeps
            await conn.execute(statement)
        await conn.execute(f"{'VACUUM ' if args.vacuum else ''}ANALYZE")
    finally:
        await conn.close()
    return str(run_id), time.perf_counter() - started


def measure(stub, metadata, request, args) -> tuple[list[float], int, int]:
    for _ in range(args.warmup):
        stub.ListMetrics(request, metadata=metadata)
    times = []
    for _ in range(args.iterations):
        started = time.perf_counter()
        reply = stub.ListMetrics(request, metadata=metadata)
        times.append((time.perf_counter() - started) * 1000)
    points = sum(len(s.points) for s in reply.series)
    return times, points, reply.ByteSize()


def run_calls(address: str, metadata, run_id: str, args) -> list[tuple]:
    middle = args.steps // 2
    calls = {
        "all names, default budget": query_pb2.ListMetricsRequest(run_id=run_id),
        f"one name, {args.max_points} points": query_pb2.ListMetricsRequest(
            run_id=run_id, names=["metric_0"], max_points=args.max_points),
        f"one name, {args.window}-step window": query_pb2.ListMetricsRequest(
            run_id=run_id, names=["metric_0"], start_step=middle,
            end_step=middle + args.window - 1),
    }
    rows = []
    with grpc.insecure_channel(address) as channel:
        stub = query_pb2_grpc.QueryServiceStub(channel)
        for label, request in calls.items():
            times, points, size = measure(stub, metadata, request, args)
            rows.append((label, percentile(times, 50), percentile(times, 99), points, size))
    return rows


async def main_async(args: argparse.Namespace) -> int:
    async with bench_stack(args, ("query",)) as stack:
        run_id, seed_s = await seed(stack.admin_dsn, args)
        rows = run_calls(stack.services["query"].address, stack.metadata(), run_id, args)
    print(f"seeded {args.steps * args.names} metric values ({args.steps} steps x "
          f"{args.names} names) in {seed_s:.1f} s")
    print(f"{'call':<36} {'p50 ms':>8} {'p99 ms':>8} {'points':>7} {'bytes':>9}")
    for label, p50, p99, points, size in rows:
        print(f"{label:<36} {p50:>8.1f} {p99:>8.1f} {points:>7} {size:>9}")
    return 0


def main() -> None:
    raise SystemExit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
