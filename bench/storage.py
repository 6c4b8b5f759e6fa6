"""Storage benchmark (issue 12): bytes on disk per 1M predictions before and after samples
were stored once, and whether hash partitioning of predictions by run id helps.

Runs of --samples samples x --epochs epochs (one step per epoch), --storage-runs of them,
with the texts of bench/ingest.py (prompt --prompt-chars, ground truth --truth-chars,
prediction --prediction-chars, random lowercase text with spaces), COPYed by asyncpg as
the superuser into tables of the real layout (LIKE ... INCLUDING ALL: same columns and
indexes) in a throwaway database:
  * before: the denormalised layout (every prediction with its prompt and ground truth);
  * after: predictions without them, plus one samples row per (run, sample);
  * the after layout again, PARTITION BY HASH (run_id) into --partitions partitions.
Prints pg_total_relation_size (table + indexes + TOAST) per 1M predictions, then, on the
plain and the partitioned after-tables (VACUUM ANALYZEd): a DeleteRun-like DELETE of one
whole run (mean ms over --delete-runs runs) and two reads as the query service does them
(one sample's history, one epoch page of 100 rows: p50 ms over --query-repeats).

Run from the repository root (PostgreSQL at 127.0.0.1:5432, trust auth):
    . .venv/bin/activate && python bench/storage.py
bench/ingest.py runs the byte figures too (storage_lines), in the same run as its ingest.
"""

import argparse
import asyncio
import random
import time
import uuid
from datetime import UTC, datetime

import asyncpg
from _stack import add_stack_args, bench_stack, percentile

from services.writer.models import SCHEMA

TEXT_ALPHABET = "abcdefghijklmnopqrstuvwxyz      "
MILLION = 1_000_000
# Columns COPYed per layout (run_id, user_id, create_time first).
AFTER_COLUMNS = ("run_id", "user_id", "create_time", "epoch", "step", "sample_index",
                 "prediction", "generation_time_ms", "prompt_tokens", "completion_tokens")
BEFORE_COLUMNS = (*AFTER_COLUMNS, "prompt", "ground_truth")
SAMPLE_COLUMNS = ("run_id", "sample_index", "user_id", "prompt", "ground_truth")
_SAMPLE_READ = ("SELECT step, prediction FROM {t} WHERE run_id = $1 AND sample_index = $2 "
                "ORDER BY step")
_EPOCH_READ = ("SELECT step, sample_index, prediction FROM {t} WHERE run_id = $1 AND epoch = $2 "
               "ORDER BY step, sample_index LIMIT 100")


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The shape of the stored runs (shared with bench/ingest.py)."""
    add = p.add_argument
    add("--storage-runs", type=int, default=200,
        help="runs stored per layout (default %(default)s: 1M predictions)")
    add("--storage-samples", type=int, default=100,
        help="samples per run (default %(default)s)")
    add("--storage-epochs", type=int, default=50, help="epochs per run (default %(default)s)")
    add("--storage-text-pool", type=int, default=4096,
        help="distinct random prediction texts (default %(default)s)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add_shape_args(p)
    add("--prompt-chars", type=int, default=300, help="prompt length (default %(default)s)")
    add("--truth-chars", type=int, default=300, help="ground truth length (default %(default)s)")
    add("--prediction-chars", type=int, default=600,
        help="prediction length (default %(default)s)")
    add("--partitions", type=int, default=8,
        help="hash partitions of the partitioned layout (default %(default)s)")
    add("--delete-runs", type=int, default=10,
        help="runs deleted per layout (default %(default)s)")
    add("--query-repeats", type=int, default=300,
        help="executions of each read per layout (default %(default)s)")
    add("--seed", type=int, default=1, help="random seed (default %(default)s)")
    add_stack_args(p)
    return p.parse_args()


def _text(rng: random.Random, chars: int) -> str:
    return "".join(rng.choices(TEXT_ALPHABET, k=chars)).strip() or "x"


def run_rows(args, rng: random.Random, outputs: list[str], user: str
             ) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """One run: (after rows, before rows, sample rows) in the COPY column orders."""
    run_id, now = uuid.uuid4(), datetime.now(UTC)
    samples = [(run_id, i, user, _text(rng, args.prompt_chars), _text(rng, args.truth_chars))
               for i in range(args.storage_samples)]
    after, before = [], []
    for epoch in range(1, args.storage_epochs + 1):
        for _, index, _, prompt, truth in samples:
            row = (run_id, user, now, epoch, epoch, index, rng.choice(outputs),
                   rng.uniform(1.0, 500.0), args.prompt_chars // 4, args.prediction_chars // 4)
            after.append(row)
            before.append((*row, prompt, truth))
    return after, before, samples


async def create_denormalised(conn: asyncpg.Connection, name: str) -> None:
    """A table of writer.predictions' layout before samples existed (issue 12): every
    prediction with its prompt and ground truth, the same indexes."""
    await conn.execute(f"""
        CREATE TABLE {SCHEMA}.{name} (LIKE {SCHEMA}.predictions INCLUDING ALL);
        ALTER TABLE {SCHEMA}.{name} DROP COLUMN legacy_prompt,
            DROP COLUMN legacy_ground_truth, ADD COLUMN prompt text NOT NULL,
            ADD COLUMN ground_truth text;""")


async def create_tables(conn: asyncpg.Connection, partitions: int) -> None:
    """bench_before (denormalised), bench_after + bench_samples, and with partitions
    bench_part (hash)."""
    p = f"{SCHEMA}.predictions"
    await create_denormalised(conn, "bench_before")
    await conn.execute(f"""
        CREATE TABLE {SCHEMA}.bench_after (LIKE {p} INCLUDING ALL);
        CREATE TABLE {SCHEMA}.bench_samples (LIKE {SCHEMA}.samples INCLUDING ALL);""")
    if not partitions:
        return
    await conn.execute(f"""
        CREATE TABLE {SCHEMA}.bench_part (LIKE {p} INCLUDING DEFAULTS)
            PARTITION BY HASH (run_id);
        ALTER TABLE {SCHEMA}.bench_part ADD PRIMARY KEY (run_id, step, sample_index);
        CREATE INDEX ON {SCHEMA}.bench_part (run_id, epoch, step, sample_index);
        CREATE INDEX ON {SCHEMA}.bench_part (run_id, sample_index, step);""")
    for n in range(partitions):
        await conn.execute(f"CREATE TABLE {SCHEMA}.bench_part_{n} PARTITION OF "
                           f"{SCHEMA}.bench_part FOR VALUES WITH (MODULUS {partitions}, "
                           f"REMAINDER {n})")


async def fill(conn: asyncpg.Connection, args, user: str, partitions: bool
               ) -> list[uuid.UUID]:
    """COPYs --storage-runs runs into every layout; their ids."""
    rng = random.Random(args.seed)
    outputs = [_text(rng, args.prediction_chars) for _ in range(args.storage_text_pool)]
    run_ids = []
    for _ in range(args.storage_runs):
        after, before, samples = run_rows(args, rng, outputs, user)
        run_ids.append(samples[0][0])
        targets = [("bench_before", before, BEFORE_COLUMNS),
                   ("bench_after", after, AFTER_COLUMNS),
                   ("bench_samples", samples, SAMPLE_COLUMNS)]
        if partitions:
            targets.append(("bench_part", after, AFTER_COLUMNS))
        for table, rows, columns in targets:
            await conn.copy_records_to_table(table, schema_name=SCHEMA, records=rows,
                                             columns=list(columns))
    return run_ids


async def total_bytes(conn: asyncpg.Connection, *tables: str) -> int:
    """pg_total_relation_size summed (a partitioned table: over its partitions)."""
    total = 0
    for table in tables:
        total += await conn.fetchval(
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND (c.relname = $2 OR c.oid IN (SELECT inhrelid "
            "FROM pg_inherits WHERE inhparent = ($1 || '.' || $2)::regclass))",
            SCHEMA, table)
    return int(total)


def mib_per_million(size: int, predictions: int) -> str:
    return f"{size * MILLION / predictions / 2**20:,.1f} MiB"


async def byte_lines(conn: asyncpg.Connection, predictions: int, partitions: bool
                     ) -> list[tuple[str, str]]:
    before = await total_bytes(conn, "bench_before")
    after = await total_bytes(conn, "bench_after")
    samples = await total_bytes(conn, "bench_samples")
    lines = [
        ("bytes per 1M predictions, before (denormalised)", mib_per_million(before, predictions)),
        ("bytes per 1M predictions, after (predictions + samples)",
         f"{mib_per_million(after + samples, predictions)}  ({(after + samples) / before:.2f} "
         f"of before; samples {mib_per_million(samples, predictions)})"),
    ]
    if partitions:
        partitioned = await total_bytes(conn, "bench_part")
        lines.append(("bytes per 1M predictions, after, hash-partitioned predictions + samples",
                      mib_per_million(partitioned + samples, predictions)))
    return lines


async def delete_ms(conn: asyncpg.Connection, table: str, run_ids: list[uuid.UUID]) -> float:
    """Mean ms of DELETE of one whole run (each its own transaction)."""
    start = time.perf_counter()
    for run_id in run_ids:
        await conn.execute(f"DELETE FROM {SCHEMA}.{table} WHERE run_id = $1", run_id)
    return (time.perf_counter() - start) * 1000 / len(run_ids)


async def read_p50_ms(conn: asyncpg.Connection, statement: str, table: str,
                      params: list[tuple]) -> float:
    prepared = await conn.prepare(statement.format(t=f"{SCHEMA}.{table}"))
    times = []
    for values in params:
        start = time.perf_counter()
        await prepared.fetch(*values)
        times.append((time.perf_counter() - start) * 1000)
    return percentile(times, 50)


async def partition_lines(conn: asyncpg.Connection, args, run_ids: list[uuid.UUID]
                          ) -> list[tuple[str, str]]:
    await conn.execute(f"VACUUM ANALYZE {SCHEMA}.bench_after")
    await conn.execute(f"VACUUM ANALYZE {SCHEMA}.bench_part")
    rng = random.Random(args.seed)
    keep = run_ids[args.delete_runs:]
    samples = [(rng.choice(keep), rng.randrange(args.storage_samples))
               for _ in range(args.query_repeats)]
    epochs = [(rng.choice(keep), rng.randrange(1, args.storage_epochs + 1))
              for _ in range(args.query_repeats)]
    lines = []
    for name, statement, params in (("one sample's history", _SAMPLE_READ, samples),
                                    ("one epoch page of 100", _EPOCH_READ, epochs)):
        # Alternated (plain, partitioned, partitioned, plain): neither always goes first.
        order = ("bench_after", "bench_part", "bench_part", "bench_after")
        times = [await read_p50_ms(conn, statement, table, params) for table in order]
        lines.append((f"read {name}, p50 ms: plain / hash-partitioned (two rounds)",
                      f"{times[0]:.3f}, {times[3]:.3f} / {times[1]:.3f}, {times[2]:.3f}"))
    doomed = run_ids[:args.delete_runs]
    part = await delete_ms(conn, "bench_part", doomed)
    plain = await delete_ms(conn, "bench_after", doomed)
    rows = args.storage_samples * args.storage_epochs
    lines.append((f"DELETE one run ({rows} rows), mean ms: plain / hash-partitioned",
                  f"{plain:.1f} / {part:.1f}"))
    return lines


async def storage_lines(admin_dsn: str, args, user: str, partitions: bool
                        ) -> list[tuple[str, str]]:
    """The byte figures (and, with partitions, the partitioning experiment)."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await create_tables(conn, args.partitions if partitions else 0)
        run_ids = await fill(conn, args, user, partitions)
        predictions = len(run_ids) * args.storage_samples * args.storage_epochs
        lines = [("stored runs x samples x epochs", f"{len(run_ids)} x {args.storage_samples} "
                  f"x {args.storage_epochs} = {predictions:,} predictions")]
        lines += await byte_lines(conn, predictions, partitions)
        if partitions:
            lines += await partition_lines(conn, args, run_ids)
    finally:
        await conn.close()
    return lines


def print_lines(lines: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in lines)
    print(f"{'metric':<{width}}  value")
    print("-" * (width + 30))
    for name, value in lines:
        print(f"{name:<{width}}  {value}")


async def main_async(args: argparse.Namespace) -> int:
    async with bench_stack(args, ()) as stack:
        lines = await storage_lines(stack.admin_dsn, args, args.bench_user, partitions=True)
    print_lines(lines)
    return 0


def main() -> None:
    raise SystemExit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
