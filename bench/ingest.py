"""Ingest benchmark: predictions streamed through the real writer service.

Measures, on a throwaway PostgreSQL database with the real schema and roles:
  * StreamPredictions end to end over loopback gRPC: N predictions of one run in
    batches of --batch-size, with up to --window batches unacknowledged. Prints
    rows/s (first send to last ack), p50/p99 ack latency per batch (send -> the
    first ack covering its sequence), the CPU seconds of the writer, of this
    client and of the writer's PostgreSQL backends, and the writer's peak RSS
    (VmHWM).
  * That the table then holds exactly N rows (counted as the superuser).
    The stream sends each sample's prompt and ground truth once (--wire samples: in
    the first batch that names the sample, later predictions leave the prompt empty),
    as the trainer client does, or on every prediction as older clients do (--wire
    legacy); --wire both (default) streams the rows twice, into two runs.
  * The raw ceiling: asyncpg COPY (copy_records_to_table) of the same rows, in
    chunks of --copy-chunk, denormalised (every row with its prompt and ground
    truth, as the writer stored them before issue 12) into writer.bench_copy (LIKE
    writer.predictions INCLUDING ALL, with prompt and ground_truth instead of the
    legacy columns: the indexes too; LIKE copies neither the foreign key nor the RLS
    policy), and the ratio end-to-end / COPY (target >= 0.6; issue 12: > 1.0).
  * For reference (--compare-executemany, on by default): SQLAlchemy Core
    executemany INSERT of the same rows into another such table.
  * Bytes on disk per 1M predictions before and after samples were stored once
    (bench/storage.py, --storage-runs runs of --storage-samples x --storage-epochs,
    COPYed; 0 runs: skipped), and what the writer's own tables hold after the streams.

A CHECKPOINT precedes each timed phase (--checkpoint) so that one phase's
dirty pages are not written out during the next. The request messages are
built while streaming (as a trainer would); text is drawn from a pool of
random strings of the configured lengths.

The verdict against the target is printed; the exit status is 1 only when the
run itself is invalid (stored rows != N, or rejected batches).

Run from the repository root (PostgreSQL at 127.0.0.1:5432, trust auth):
    . .venv/bin/activate && python bench/ingest.py
"""

import argparse
import asyncio
import random
import string
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import grpc
import psutil
import sqlalchemy as sa
from _stack import add_stack_args, bench_stack, percentile
from sqlalchemy.ext.asyncio import create_async_engine
from storage import add_shape_args, create_denormalised, mib_per_million, storage_lines, total_bytes

from epochlens.v1 import common_pb2, writer_pb2, writer_pb2_grpc
from services.writer.models import SCHEMA, predictions_table

# Row layout shared by the stream, COPY and executemany paths.
ROW_FIELDS = ("epoch", "step", "sample_index", "prompt", "ground_truth", "prediction",
              "generation_time_ms", "prompt_tokens", "completion_tokens")
COPY_COLUMNS = ("run_id", "user_id", "create_time", *ROW_FIELDS)
TEXT_ALPHABET = string.ascii_lowercase + "      "


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--rows", type=int, default=200_000, help="predictions to ingest (default %(default)s)")
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
    add("--wire", choices=("samples", "legacy", "both"), default="both",
        help="samples: each sample's text sent once; legacy: on every prediction; both "
        "(default %(default)s)")
    add_shape_args(p)
    add_measure_args(p)
    add_stack_args(p)
    return p.parse_args()


def add_measure_args(p: argparse.ArgumentParser) -> None:
    """How the stream and the reference inserts are run."""
    add = p.add_argument
    add("--rpc-timeout-s", type=float, default=600.0,
        help="deadline of the stream (default %(default)s)")
    add("--copy-chunk", type=int, default=5000, help="rows per COPY call (default %(default)s)")
    add("--compare-executemany", action=argparse.BooleanOptionalAction, default=True,
        help="also time SQLAlchemy Core executemany (default on)")
    add("--executemany-chunk", type=int, default=5000,
        help="rows per executemany transaction (default %(default)s)")
    add("--checkpoint", action=argparse.BooleanOptionalAction, default=True,
        help="CHECKPOINT before each timed phase, so one phase's dirty pages are "
        "not flushed during the next (default on)")
    add("--target-ratio", type=float, default=0.6,
        help="end-to-end / COPY ratio the writer should reach (default %(default)s)")


def text_pool(rng: random.Random, count: int, chars: int) -> list[str]:
    return ["".join(rng.choices(TEXT_ALPHABET, k=chars)).strip() or "x" for _ in range(count)]


def make_rows(args: argparse.Namespace) -> list[tuple]:
    """N prediction tuples in ROW_FIELDS order; (step, sample_index) is unique."""
    rng = random.Random(args.seed)
    prompts = text_pool(rng, args.text_pool, args.prompt_chars)
    truths = text_pool(rng, args.text_pool, args.truth_chars)
    outputs = text_pool(rng, args.text_pool, args.prediction_chars)
    rows = []
    for i in range(args.rows):
        step, sample = divmod(i, args.samples)
        text_index = sample % args.text_pool
        rows.append((step // args.steps_per_epoch, step, sample, prompts[text_index],
                     truths[text_index], outputs[rng.randrange(args.text_pool)],
                     rng.uniform(1.0, 500.0), args.prompt_chars // 4,
                     args.prediction_chars // 4))
    return rows


def to_input(row: tuple) -> common_pb2.PredictionInput:
    return common_pb2.PredictionInput(**dict(zip(ROW_FIELDS, row, strict=True)))


@dataclass
class Window:
    """Flow control and ack latency bookkeeping of one stream."""

    size: int
    acked: int = 0
    sent_at: dict[int, float] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    first_send: float | None = None
    last_ack: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_room(self, sequence: int) -> None:
        while sequence - self.acked > self.size:
            self.changed.clear()
            await self.changed.wait()

    def mark_sent(self, sequence: int) -> None:
        now = time.perf_counter()
        self.sent_at[sequence] = now
        if self.first_send is None:
            self.first_send = now

    def on_ack(self, acked: int) -> None:
        now = time.perf_counter()
        for sequence in range(self.acked + 1, acked + 1):
            self.latencies_ms.append((now - self.sent_at.pop(sequence)) * 1000)
        self.acked, self.last_ack = max(self.acked, acked), now
        self.changed.set()


def declare_once(items: list[common_pb2.PredictionInput], declared: set[int]
                 ) -> list[writer_pb2.SampleInput]:
    """The samples of `items` not declared yet (now declared); empties every prompt."""
    samples = []
    for item in items:
        if item.sample_index not in declared:
            declared.add(item.sample_index)
            samples.append(writer_pb2.SampleInput(sample_index=item.sample_index,
                                                  prompt=item.prompt,
                                                  ground_truth=item.ground_truth))
        item.prompt = ""
        item.ClearField("ground_truth")
    return samples


async def requests(run_id: str, rows: list[tuple], batch_size: int, window: Window,
                   once: bool):
    """The send side: one message per batch, never more than window.size unacknowledged.
    once: each sample's text in the first batch that names it only."""
    declared: set[int] = set()
    for sequence, start in enumerate(range(0, len(rows), batch_size), 1):
        await window.wait_room(sequence)
        items = [to_input(r) for r in rows[start:start + batch_size]]
        samples = declare_once(items, declared) if once else []
        request = writer_pb2.StreamPredictionsRequest(
            sequence=sequence, run_id=run_id, predictions=items, samples=samples)
        window.mark_sent(sequence)
        yield request


@dataclass
class StreamResult:
    window: Window
    inserted: int = 0
    duplicates: int = 0
    rejections: int = 0
    writer_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    backend_cpu_s: float = 0.0

    @property
    def seconds(self) -> float:
        return self.window.last_ack - self.window.first_send


async def stream_rows(stub, run_id: str, rows: list[tuple], args, metadata, once: bool
                      ) -> StreamResult:
    """The read side: every ack settles all batches with a sequence <= acked_sequence."""
    result = StreamResult(Window(args.window))
    call = stub.StreamPredictions(requests(run_id, rows, args.batch_size, result.window, once),
                                  metadata=metadata, timeout=args.rpc_timeout_s)
    async for response in call:
        result.window.on_ack(response.acked_sequence)
        result.inserted += response.inserted_count
        result.duplicates += response.duplicate_count
        result.rejections += len(response.rejections)
    if result.window.sent_at:
        raise RuntimeError(f"{len(result.window.sent_at)} batches were never acknowledged")
    return result


async def create_run(stub, metadata) -> str:
    run = await stub.CreateRun(writer_pb2.CreateRunRequest(
        name="bench-ingest", model_name="bench-model", dataset_name="bench-data"),
        metadata=metadata)
    return run.id


def copy_records(rows: list[tuple], run_id: str, user_id: str) -> list[tuple]:
    """The rows in COPY_COLUMNS order, as the writer would store them."""
    run_uuid, now = uuid.UUID(run_id), datetime.now(UTC)
    return [(run_uuid, user_id, now, *row) for row in rows]


async def copy_rate(admin_dsn: str, records: list[tuple], chunk: int) -> float:
    """Rows/s of asyncpg COPY into a denormalised copy of writer.predictions."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await create_denormalised(conn, "bench_copy")
        start = time.perf_counter()
        for offset in range(0, len(records), chunk):
            await conn.copy_records_to_table("bench_copy", schema_name=SCHEMA,
                                             records=records[offset:offset + chunk],
                                             columns=list(COPY_COLUMNS))
        seconds = time.perf_counter() - start
        copied = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.bench_copy")
    finally:
        await conn.close()
    if copied != len(records):
        raise RuntimeError(f"COPY stored {copied} rows, expected {len(records)}")
    return len(records) / seconds


async def executemany_rate(admin_dsn: str, admin_url: str, records: list[tuple],
                           chunk: int) -> float:
    """Rows/s of SQLAlchemy Core insert(table) with a list of parameter dicts, into a
    denormalised table like COPY's."""
    table = sa.Table("bench_executemany", sa.MetaData(schema=SCHEMA),
                     *(sa.Column(c.name, c.type) for c in predictions_table.columns
                       if c.name in COPY_COLUMNS),
                     sa.Column("prompt", sa.Text()), sa.Column("ground_truth", sa.Text()))
    params = [dict(zip(COPY_COLUMNS, record, strict=True)) for record in records]
    conn = await asyncpg.connect(admin_dsn)
    try:
        await create_denormalised(conn, "bench_executemany")
    finally:
        await conn.close()
    engine = create_async_engine(admin_url)
    try:
        start = time.perf_counter()
        for offset in range(0, len(params), chunk):
            async with engine.begin() as conn:
                await conn.execute(sa.insert(table), params[offset:offset + chunk])
        seconds = time.perf_counter() - start
    finally:
        await engine.dispose()
    return len(params) / seconds


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def backend_cpu_seconds(admin_dsn: str, dbname: str) -> float:
    """CPU seconds of the PostgreSQL backends serving the writer (opened for this bench)."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        pids = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1 "
                                "AND application_name = 'epochlens-writer'", dbname)
    finally:
        await conn.close()
    return sum(cpu_seconds(psutil.Process(row["pid"])) for row in pids)


async def checkpoint(admin_dsn: str, enabled: bool) -> None:
    if not enabled:
        return
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def count_predictions(admin_dsn: str, run_id: str) -> int:
    conn = await asyncpg.connect(admin_dsn)
    try:
        return await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.predictions "
                                   "WHERE run_id = $1", uuid.UUID(run_id))
    finally:
        await conn.close()


async def writer_bytes(admin_dsn: str) -> tuple[int, int]:
    """(bytes of writer.predictions + writer.samples, predictions stored)."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        size = await total_bytes(conn, "predictions", "samples")
        return size, await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.predictions")
    finally:
        await conn.close()


async def run_stream(stack, rows: list[tuple], args, once: bool
                     ) -> tuple[str, StreamResult, float]:
    """CreateRun + the timed stream; returns the run id, the result and writer peak RSS."""
    writer = stack.services["writer"]
    metadata = stack.metadata()
    async with grpc.aio.insecure_channel(writer.address) as channel:
        stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        run_id = await create_run(stub, metadata)
        await checkpoint(stack.admin_dsn, args.checkpoint)
        client, cpu_before = psutil.Process(), cpu_seconds(writer.process)
        client_before = cpu_seconds(client)
        backend_before = await backend_cpu_seconds(stack.admin_dsn, stack.dbname)
        result = await stream_rows(stub, run_id, rows, args, metadata, once)
        result.writer_cpu_s = cpu_seconds(writer.process) - cpu_before
        result.client_cpu_s = cpu_seconds(client) - client_before
        result.backend_cpu_s = (await backend_cpu_seconds(stack.admin_dsn, stack.dbname)
                                - backend_before)
    return run_id, result, writer.peak_rss_mib()


def cpu_share(seconds: float, wall: float) -> str:
    return f"{seconds:.2f}  ({100 * seconds / wall:.0f}% of one core)"


def stream_lines(args, result: StreamResult, rss: float) -> list[tuple[str, str]]:
    latencies = result.window.latencies_ms
    return [
        ("rows (batch size / window)", f"{args.rows} ({args.batch_size} / {args.window})"),
        ("stream end-to-end rows/s", f"{args.rows / result.seconds:,.0f}  "
         f"({result.seconds:.2f} s)"),
        ("ack latency p50 ms", f"{percentile(latencies, 50):.1f}"),
        ("ack latency p99 ms", f"{percentile(latencies, 99):.1f}"),
        ("acks: inserted / duplicates / rejected batches",
         f"{result.inserted} / {result.duplicates} / {result.rejections}"),
        ("writer CPU s (user+system) during the stream",
         cpu_share(result.writer_cpu_s, result.seconds)),
        ("bench client CPU s during the stream", cpu_share(result.client_cpu_s, result.seconds)),
        ("writer's postgres backends CPU s during the stream",
         cpu_share(result.backend_cpu_s, result.seconds)),
        ("writer peak RSS MiB (VmHWM)", f"{rss:.1f}"),
    ]


def stream_report(args, wire: str, result: StreamResult, rss: float, stored: int,
                  copy: float) -> list[tuple[str, str]]:
    ratio = args.rows / result.seconds / copy
    return [(f"[{wire} wire] {name}", value) for name, value in stream_lines(args, result, rss)
            + [("rows in db", f"{stored} ({'OK' if stored == args.rows else 'MISMATCH'})"),
               (f"end-to-end / COPY of denormalised rows (target >= {args.target_ratio})",
                f"{ratio:.2f}  {'PASS' if ratio >= args.target_ratio else 'FAIL'}")]]


def print_lines(lines: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in lines)
    print(f"{'metric':<{width}}  value")
    print("-" * (width + 30))
    for name, value in lines:
        print(f"{name:<{width}}  {value}")


async def main_async(args: argparse.Namespace) -> int:
    rows = make_rows(args)
    wires = ("samples", "legacy") if args.wire == "both" else (args.wire,)
    streams = []
    async with bench_stack(args, ("writer",)) as stack:
        for wire in wires:
            run_id, result, rss = await run_stream(stack, rows, args, wire == "samples")
            streams.append((wire, result, rss, await count_predictions(stack.admin_dsn, run_id)))
        size, stored_total = await writer_bytes(stack.admin_dsn)
        records = copy_records(rows, run_id, args.bench_user)
        await checkpoint(stack.admin_dsn, args.checkpoint)
        copy = await copy_rate(stack.admin_dsn, records, args.copy_chunk)
        await checkpoint(stack.admin_dsn, args.checkpoint and args.compare_executemany)
        many = (await executemany_rate(stack.admin_dsn, stack.admin_url, records,
                                       args.executemany_chunk)
                if args.compare_executemany else None)
        storage = (await storage_lines(stack.admin_dsn, args, args.bench_user, False)
                   if args.storage_runs else [])
    lines = [(f"asyncpg COPY of denormalised rows, rows/s (chunk {args.copy_chunk})",
              f"{copy:,.0f}")]
    for wire, result, rss, stored in streams:
        lines += stream_report(args, wire, result, rss, stored, copy)
    if many is not None:
        lines.append((f"SQLAlchemy executemany rows/s (chunk {args.executemany_chunk})",
                      f"{many:,.0f}  ({many / copy:.2f} of COPY)"))
    lines.append((f"writer's predictions + samples after the streams ({args.samples} samples "
                  "per run), per 1M predictions", mib_per_million(size, stored_total)))
    print_lines(lines + storage)
    valid = all(stored == args.rows and result.rejections == 0
                for _, result, _, stored in streams)
    return 0 if valid else 1


def main() -> None:
    raise SystemExit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
