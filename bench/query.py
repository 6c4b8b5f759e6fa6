"""Query benchmark: read latency of the real query service over a large store.

Seeds a throwaway PostgreSQL database (real schema, RLS and roles) with
--runs runs x --epochs epochs x --samples samples predictions (1,000,000 at the
defaults) using asyncpg COPY as the superuser, builds the per-epoch summary
table the writer would have kept, then ANALYZEs it (VACUUM ANALYZE
with --vacuum, the default, so the visibility map is set as autovacuum would
leave it). Then calls QueryService over loopback gRPC with a bearer token,
sequentially, and prints p50/p99 latency (ms) per call against the target
p99 < --target-p99-ms (20 ms):
  * ListPredictions: first page, deep pages (following next_page_token
    --deep-pages pages into a run; the last --deep-tail pages of each walk are
    timed, over --deep-runs runs), filtered by epoch, filtered by sample_index;
  * ListEpochs, CompareSample (every page of one sample), GetRun, ListRuns.
Each call type gets --warmup untimed calls, then --iterations timed ones, on
runs/epochs/samples drawn at random (--seed).

The verdicts are printed; the exit status is not tied to them (a failed call
raises and exits non-zero).

Run from the repository root (PostgreSQL at 127.0.0.1:5432, trust auth):
    . .venv/bin/activate && python bench/query.py
"""

import argparse
import asyncio
import json
import random
import string
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from _stack import add_stack_args, bench_stack, percentile

from epochlens.v1 import common_pb2, query_pb2, query_pb2_grpc
from services.writer.models import SCHEMA

RUN_COLUMNS = ("id", "user_id", "name", "model_name", "dataset_name", "config", "state",
               "request_id", "create_time", "finish_time")
PREDICTION_COLUMNS = ("run_id", "step", "sample_index", "user_id", "epoch", "prompt",
                      "ground_truth", "prediction", "generation_time_ms", "prompt_tokens",
                      "completion_tokens", "create_time")
TEXT_ALPHABET = string.ascii_lowercase + "      "


def parse_args() -> argparse.Namespace:
    return build_parser(__doc__).parse_args()


def build_parser(description: str) -> argparse.ArgumentParser:
    """The options of the seeded store, its measurement and the stack (bench/web.py adds
    its own to them)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--runs", type=int, default=50, help="runs to seed (default %(default)s)")
    add("--epochs", type=int, default=20, help="epochs per run (default %(default)s)")
    add("--samples", type=int, default=1000, help="samples per epoch (default %(default)s)")
    add("--step-stride", type=int, default=10, help="step = epoch * stride (default %(default)s)")
    add("--prompt-chars", type=int, default=100, help="prompt length (default %(default)s)")
    add("--truth-chars", type=int, default=100, help="ground truth length (default %(default)s)")
    add("--prediction-chars", type=int, default=200,
        help="prediction length (default %(default)s)")
    add("--text-pool", type=int, default=4096,
        help="distinct random texts per field (default %(default)s)")
    add("--seed-connections", type=int, default=2,
        help="parallel COPY connections while seeding (default %(default)s)")
    add_measure_args(p)
    add_stack_args(p)
    return p


def add_measure_args(p: argparse.ArgumentParser) -> None:
    """How the seeded store is prepared and called."""
    add = p.add_argument
    add("--vacuum", action=argparse.BooleanOptionalAction, default=True,
        help="VACUUM ANALYZE after seeding instead of ANALYZE only (default on)")
    add("--page-size", type=int, default=50, help="page_size of list calls (default %(default)s)")
    add("--iterations", type=int, default=300,
        help="timed calls per call type (default %(default)s)")
    add("--warmup", type=int, default=30,
        help="untimed calls per call type first (default %(default)s)")
    add("--deep-pages", type=int, default=400, help="pages walked into a run (default %(default)s)")
    add("--deep-tail", type=int, default=50,
        help="last pages of a walk that are timed (default %(default)s)")
    add("--deep-runs", type=int, default=3, help="runs walked (default %(default)s)")
    add("--rpc-timeout-s", type=float, default=10.0,
        help="deadline of each call (default %(default)s)")
    add("--target-p99-ms", type=float, default=20.0, help="p99 target (default %(default)s)")
    add("--seed", type=int, default=1, help="random seed (default %(default)s)")


def text_pool(rng: random.Random, count: int, chars: int) -> list[str]:
    return ["".join(rng.choices(TEXT_ALPHABET, k=chars)).strip() or "x" for _ in range(count)]


def run_records(args: argparse.Namespace) -> list[tuple]:
    """The runs, one second apart, newest last (ListRuns returns them newest first)."""
    start = datetime.now(UTC) - timedelta(seconds=args.runs)
    return [(uuid.uuid4(), args.bench_user, f"bench-run-{i}", "bench-model", "bench-data",
             json.dumps({"run": i}), common_pb2.RUN_STATE_SUCCEEDED, None,
             start + timedelta(seconds=i), start + timedelta(seconds=i, milliseconds=500))
            for i in range(args.runs)]


def prediction_records(args, run_id: uuid.UUID, pools: tuple, rng: random.Random):
    """One run's predictions in PREDICTION_COLUMNS order (a generator)."""
    prompts, truths, outputs = pools
    now = datetime.now(UTC)
    for epoch in range(args.epochs):
        step = epoch * args.step_stride
        for sample in range(args.samples):
            text = sample % args.text_pool
            yield (run_id, step, sample, args.bench_user, epoch, prompts[text], truths[text],
                   outputs[rng.randrange(args.text_pool)], rng.uniform(1.0, 500.0),
                   args.prompt_chars // 4, args.prediction_chars // 4, now)


# The seeded rows carry their prompt and ground truth (PREDICTION_COLUMNS); the writer
# stores each sample's once (issue 12). They are COPYed into a staging table, then split.
_STAGE = "bench_stage"
_STAGE_DDL = f"""
CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (run_id uuid, step bigint, sample_index bigint,
    user_id text, epoch bigint, prompt text, ground_truth text, prediction text,
    generation_time_ms float8, prompt_tokens int, completion_tokens int, create_time timestamptz)
"""
_STAGE_SPLIT = f"""
INSERT INTO {SCHEMA}.samples (run_id, sample_index, user_id, prompt, ground_truth)
SELECT DISTINCT ON (run_id, sample_index) run_id, sample_index, user_id, prompt, ground_truth
FROM {_STAGE} ORDER BY run_id, sample_index, step ON CONFLICT DO NOTHING;
INSERT INTO {SCHEMA}.predictions (run_id, step, sample_index, user_id, epoch, prediction,
    generation_time_ms, prompt_tokens, completion_tokens, create_time)
SELECT run_id, step, sample_index, user_id, epoch, prediction, generation_time_ms,
    prompt_tokens, completion_tokens, create_time FROM {_STAGE};
TRUNCATE {_STAGE};
"""


async def copy_predictions(conn: asyncpg.Connection, records) -> None:
    """Stores prediction records in PREDICTION_COLUMNS order as the writer does: each
    (run, sample) prompt and ground truth once in samples, the rest in predictions."""
    await conn.execute(_STAGE_DDL)
    await conn.copy_records_to_table(_STAGE, columns=list(PREDICTION_COLUMNS), records=records)
    await conn.execute(_STAGE_SPLIT)


async def copy_runs_predictions(admin_dsn: str, args, run_ids: list[uuid.UUID], pools,
                                seed: int) -> None:
    conn = await asyncpg.connect(admin_dsn)
    rng = random.Random(seed)
    try:
        for run_id in run_ids:
            await copy_predictions(conn, prediction_records(args, run_id, pools, rng))
    finally:
        await conn.close()


# COPY bypasses the writer, so the per-epoch summary it keeps is built here the same way.
EPOCH_SUMMARY_SQL = f"""
INSERT INTO {SCHEMA}.epochs (run_id, epoch, user_id, prediction_count, latest_step,
    first_create_time, last_create_time)
SELECT run_id, epoch, min(user_id), count(*), max(step), min(create_time), max(create_time)
FROM {SCHEMA}.predictions GROUP BY run_id, epoch
"""


async def seed_database(admin_dsn: str, args: argparse.Namespace) -> tuple[list[str], float]:
    """Runs and predictions by COPY, then (VACUUM) ANALYZE. Returns run ids and seconds."""
    start = time.perf_counter()
    rng = random.Random(args.seed)
    pools = tuple(text_pool(rng, args.text_pool, n)
                  for n in (args.prompt_chars, args.truth_chars, args.prediction_chars))
    runs = run_records(args)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.copy_records_to_table("runs", schema_name=SCHEMA, columns=list(RUN_COLUMNS),
                                         records=runs)
        ids = [run[0] for run in runs]
        parts = [ids[k::args.seed_connections] for k in range(args.seed_connections)]
        await asyncio.gather(*(copy_runs_predictions(admin_dsn, args, part, pools, args.seed + k)
                               for k, part in enumerate(parts)))
        await conn.execute(EPOCH_SUMMARY_SQL)
        await conn.execute(f"{'VACUUM ' if args.vacuum else ''}ANALYZE")
        stored = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.predictions")
    finally:
        await conn.close()
    if stored != args.runs * args.epochs * args.samples:
        raise RuntimeError(f"seeded {stored} predictions, expected "
                           f"{args.runs * args.epochs * args.samples}")
    return [str(i) for i in ids], time.perf_counter() - start


def timed(call: Callable[[], int]) -> tuple[float, int]:
    """Milliseconds one call took, and the number of items it returned."""
    start = time.perf_counter()
    count = call()
    return (time.perf_counter() - start) * 1000, count


def call_types(stub, metadata, runs: list[str], args) -> dict[str, Callable]:
    """Each call type: a function of the random generator that makes one call."""
    q, size, md, t = query_pb2, args.page_size, metadata, args.rpc_timeout_s

    def predictions(rng, **filters) -> int:
        return len(stub.ListPredictions(q.ListPredictionsRequest(
            run_id=rng.choice(runs), page_size=size, **filters), metadata=md, timeout=t)
            .predictions)

    def sample(rng) -> int:
        """Every page of CompareSample for one sample: its whole history."""
        request = q.CompareSampleRequest(run_id=rng.choice(runs),
                                         sample_index=rng.randrange(args.samples), page_size=size)
        count = 0
        while True:
            reply = stub.CompareSample(request, metadata=md, timeout=t)
            count += len(reply.predictions)
            if not reply.next_page_token:
                return count
            request.page_token = reply.next_page_token

    return {
        "ListPredictions first page": lambda rng: predictions(rng),
        "ListPredictions epoch filter": lambda rng: predictions(
            rng, epoch=rng.randrange(args.epochs)),
        "ListPredictions sample filter": lambda rng: predictions(
            rng, sample_index=rng.randrange(args.samples)),
        "ListEpochs": lambda rng: len(stub.ListEpochs(q.ListEpochsRequest(
            run_id=rng.choice(runs), page_size=size), metadata=md, timeout=t).epochs),
        "CompareSample": sample,
        "GetRun": lambda rng: int(bool(stub.GetRun(q.GetRunRequest(
            run_id=rng.choice(runs)), metadata=md, timeout=t).id)),
        "ListRuns": lambda rng: len(stub.ListRuns(q.ListRunsRequest(
            page_size=size), metadata=md, timeout=t).runs),
    }


def measure(call: Callable, rng: random.Random, args) -> tuple[list[float], list[int]]:
    for _ in range(args.warmup):
        call(rng)
    samples = [timed(lambda: call(rng)) for _ in range(args.iterations)]
    return [ms for ms, _ in samples], [count for _, count in samples]


def walk_pages(stub, metadata, run_id: str, args) -> tuple[list[float], list[int]]:
    """Follows next_page_token for --deep-pages pages; times every page."""
    token, times, counts = "", [], []
    for page in range(args.deep_pages):
        request = query_pb2.ListPredictionsRequest(run_id=run_id, page_size=args.page_size,
                                                   page_token=token)
        start = time.perf_counter()
        reply = stub.ListPredictions(request, metadata=metadata, timeout=args.rpc_timeout_s)
        times.append((time.perf_counter() - start) * 1000)
        counts.append(len(reply.predictions))
        token = reply.next_page_token
        if not token and page + 1 < args.deep_pages:
            raise RuntimeError(f"run {run_id} ended after {page + 1} pages")
    return times, counts


def deep_pages(stub, metadata, runs: list[str], rng: random.Random, args):
    """The last --deep-tail pages of --deep-runs walks (page numbers for the label)."""
    times: list[float] = []
    counts: list[int] = []
    for run_id in rng.sample(runs, args.deep_runs):
        walk_times, walk_counts = walk_pages(stub, metadata, run_id, args)
        times += walk_times[-args.deep_tail:]
        counts += walk_counts[-args.deep_tail:]
    return times, counts


def run_queries(address: str, metadata, runs: list[str], args) -> list[tuple]:
    """(name, calls, mean items per call, p50 ms, p99 ms) per call type."""
    rng = random.Random(args.seed)
    results = []
    with grpc.insecure_channel(address) as channel:
        stub = query_pb2_grpc.QueryServiceStub(channel)
        for name, call in call_types(stub, metadata, runs, args).items():
            results.append((name, *measure(call, rng, args)))
            if name == "ListPredictions first page":
                first = args.deep_pages - args.deep_tail + 1
                results.append((f"ListPredictions pages {first}-{args.deep_pages}",
                                *deep_pages(stub, metadata, runs, rng, args)))
    empty = [name for name, _, counts in results if not all(counts)]
    if empty:
        raise RuntimeError(f"calls that returned nothing (the timing would be meaningless): "
                           f"{', '.join(empty)}")
    return [(name, len(ms), sum(counts) / len(counts), percentile(ms, 50), percentile(ms, 99))
            for name, ms, counts in results]


def report(args, seeded: int, seed_s: float, rows: list[tuple]) -> None:
    print(f"seeded {seeded:,} predictions ({args.runs} runs x {args.epochs} epochs x "
          f"{args.samples} samples) in {seed_s:.1f} s; page_size {args.page_size}")
    target = f"p99 < {args.target_p99_ms:g} ms"
    width = max(len(r[0]) for r in rows)
    print(f"{'call':<{width}}  {'calls':>5}  {'items':>6}  {'p50 ms':>7}  {'p99 ms':>7}  {target}")
    print("-" * (width + 50))
    for name, calls, items, p50, p99 in rows:
        verdict = "PASS" if p99 < args.target_p99_ms else "FAIL"
        print(f"{name:<{width}}  {calls:>5}  {items:>6.1f}  {p50:>7.2f}  {p99:>7.2f}  {verdict}")


async def main_async(args: argparse.Namespace) -> int:
    async with bench_stack(args, ("query",)) as stack:
        runs, seed_s = await seed_database(stack.admin_dsn, args)
        rows = run_queries(stack.services["query"].address, stack.metadata(), runs, args)
    report(args, args.runs * args.epochs * args.samples, seed_s, rows)
    return 0


def main() -> None:
    raise SystemExit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
