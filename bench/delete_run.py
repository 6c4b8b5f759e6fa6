"""DeleteRun benchmark: a run of 1M predictions and 5M judgments deleted through the real
writer and judge services while another user's trainer-like ingest goes on.

On a throwaway PostgreSQL database (real schema, roles and RLS):
  * Seeds, by COPY as the admin (fast setup, not what is measured): the owner's finished
    run, --predictions predictions (with their per-epoch summaries), one judge task per
    prediction, --judgments-per-prediction judgments each, --cache-entries LLM cache
    entries and the run's spend row; then VACUUM ANALYZE.
  * Starts judge (no workers: nothing here is judged) and writer (with the judge address:
    the outbox hands the ingest's predictions to the judge, as in production).
  * Another user streams predictions (StreamPredictions, batches of --batch-size, up to
    --window unacknowledged) for --baseline-s: its rate before the delete.
  * DeleteRun of the owner's run (EPOCHLENS_WRITER_DELETE_CHUNK_ROWS /
    EPOCHLENS_JUDGE_PURGE_CHUNK_ROWS = --chunk-rows) while the ingest goes on: the delete's
    wall time, its counts, and the ingest's rate during it; then the ingest stops.
  * Checks (as the admin) that no row of the run is left in either schema and that the
    ingest's rows are all stored.

Prints the figures; the exit status is 1 when a check fails.

Run from the repository root (PostgreSQL at 127.0.0.1:5432, trust auth):
    . .venv/bin/activate && python bench/delete_run.py
"""

import argparse
import asyncio
import json
import time
import uuid
from datetime import UTC, datetime

import asyncpg
import grpc
from _stack import Stack as BenchStack
from _stack import (
    add_stack_args,
    create_database,
    drop_database,
    migrate_database,
    start_service,
    stop_service,
    wait_healthy,
)

from epochlens.v1 import common_pb2, writer_pb2, writer_pb2_grpc

OWNER, INGESTER = "bench-owner", "bench-ingester"
CRITERIA = ("exact_match", "chrf", "edit_similarity", "length", "structure", "helpfulness",
            "accuracy", "clarity")
PER_RUN_TABLES = ("writer.predictions", "writer.epochs", "writer.judge_outbox", "writer.metrics",
                  "writer.metric_rollups", "judge.tasks", "judge.judgments",
                  "judge.judgment_revisions", "judge.llm_cache", "judge.run_llm_state",
                  "judge.pairwise_tasks", "judge.pairwise_results")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--predictions", type=int, default=1_000_000, help="predictions of the deleted run")
    add("--judgments-per-prediction", type=int, default=5, help="judgments per prediction "
        f"(at most {len(CRITERIA)})")
    add("--cache-entries", type=int, default=20_000, help="LLM cache entries of the run")
    add("--samples", type=int, default=1000, help="samples per epoch of the deleted run")
    add("--copy-chunk", type=int, default=100_000, help="rows per COPY call while seeding")
    add("--chunk-rows", type=int, default=5000, help="delete/purge chunk size of the services")
    add("--pause-s", type=float, default=0.0, help="pause between chunks of the services "
        "(EPOCHLENS_WRITER_DELETE_CHUNK_PAUSE_S, EPOCHLENS_JUDGE_PURGE_CHUNK_PAUSE_S)")
    add("--batch-size", type=int, default=64, help="predictions per ingest batch")
    add("--window", type=int, default=8, help="ingest batches sent ahead of their acks")
    add("--baseline-s", type=float, default=20.0, help="seconds of ingest before the delete")
    add("--delete-timeout-s", type=float, default=1800.0, help="deadline of DeleteRun")
    add_stack_args(p)
    return p.parse_args()


async def copy_rows(dsn: str, table: str, columns: list[str], rows, chunk: int) -> None:
    """COPY of a row generator into schema.table, `chunk` records per call."""
    schema, name = table.split(".")
    conn = await asyncpg.connect(dsn)
    try:
        buffer = []
        for row in rows:
            buffer.append(row)
            if len(buffer) >= chunk:
                await conn.copy_records_to_table(name, schema_name=schema, columns=columns,
                                                 records=buffer)
                buffer = []
        if buffer:
            await conn.copy_records_to_table(name, schema_name=schema, columns=columns,
                                             records=buffer)
    finally:
        await conn.close()


def keys(args: argparse.Namespace):
    """(epoch, step, sample_index) of every prediction of the run."""
    for n in range(args.predictions):
        epoch = n // args.samples + 1
        yield epoch, epoch * 100, n % args.samples


def prediction_rows(args, run_id: uuid.UUID, now: datetime):
    for epoch, step, sample in keys(args):
        yield (run_id, step, sample, OWNER, epoch, f"prompt {sample}", f"truth {sample}",
               f"answer {step}/{sample}", 1.5, 10, 20, now)


def task_rows(args, run_id: uuid.UUID, now: datetime):
    for epoch, step, sample in keys(args):
        yield (run_id, step, sample, OWNER, epoch, f"prompt {sample}", f"truth {sample}",
               f"answer {step}/{sample}", "{}", 3, 1, None, now, None, now, now)


def judgment_rows(args, run_id: uuid.UUID, now: datetime):
    criteria = CRITERIA[:args.judgments_per_prediction]
    for epoch, step, sample in keys(args):
        for criterion in criteria:
            yield (run_id, step, sample, criterion, 1, "rules", OWNER, epoch, 0.5, True, 0.4,
                   "", 0.0, 1, "", 0, 0, 0.0, "v1", now, 1)


def cache_rows(args, run_id: uuid.UUID, now: datetime):
    for n, (_, step, sample) in enumerate(keys(args)):
        if n >= args.cache_entries:
            return
        yield (f"{run_id}-{n}", OWNER, '{"score": 7.0}', run_id, step, sample, 10, 2, 0.001,
               now)


async def seed(dsn: str, args: argparse.Namespace) -> uuid.UUID:
    """The owner's finished run and its rows, by COPY; returns its id."""
    run_id, now = uuid.uuid4(), datetime.now(UTC)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO writer.runs (id, user_id, name, model_name, dataset_name, config, "
            "state, kind, create_time, finish_time) VALUES ($1, $2, 'big', 'm', 'd', '{}', "
            "$3, 1, $4, $4)", run_id, OWNER, common_pb2.RUN_STATE_SUCCEEDED, now)
        await conn.execute(
            "INSERT INTO judge.run_llm_state (run_id, user_id, budget_usd, spent_usd, "
            "input_tokens, output_tokens, budget_exhausted, update_time) VALUES "
            "($1, $2, 5, 1, 10, 2, false, $3)", run_id, OWNER, now)
    finally:
        await conn.close()
    chunk = args.copy_chunk
    await asyncio.gather(
        copy_rows(dsn, "writer.predictions", [
            "run_id", "step", "sample_index", "user_id", "epoch", "prompt", "ground_truth",
            "prediction", "generation_time_ms", "prompt_tokens", "completion_tokens",
            "create_time"], prediction_rows(args, run_id, now), chunk),
        copy_rows(dsn, "judge.tasks", [
            "run_id", "step", "sample_index", "user_id", "epoch", "prompt", "ground_truth",
            "prediction", "config", "state", "attempts", "lease_until", "not_before",
            "last_error", "create_time", "update_time"], task_rows(args, run_id, now), chunk),
        copy_rows(dsn, "judge.judgments", [
            "run_id", "step", "sample_index", "criterion", "judge_type", "judge_model",
            "user_id", "epoch", "score", "passed", "threshold", "reasoning", "confidence",
            "status", "unscored_reason", "input_tokens", "output_tokens", "cost_usd",
            "prompt_version", "create_time", "revision"], judgment_rows(args, run_id, now),
            chunk),
        copy_rows(dsn, "judge.llm_cache", [
            "key", "user_id", "verdict", "run_id", "step", "sample_index", "input_tokens",
            "output_tokens", "cost_usd", "create_time"], cache_rows(args, run_id, now), chunk))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO writer.epochs (run_id, epoch, user_id, prediction_count, latest_step, "
            "first_create_time, last_create_time) SELECT run_id, epoch, min(user_id), count(*), "
            "max(step), min(create_time), max(create_time) FROM writer.predictions "
            "GROUP BY run_id, epoch")
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return run_id


class Ingest:
    """Another user's trainer-like upload: one stream, batches of --batch-size, at most
    --window unacknowledged; records (time, rows inserted) per ack."""

    def __init__(self, args: argparse.Namespace, stub, metadata, run_id: str) -> None:
        self._args, self._stub, self._metadata, self._run_id = args, stub, metadata, run_id
        self._stop = asyncio.Event()
        self._credit = asyncio.Semaphore(args.window)
        self.acks: list[tuple[float, int]] = []
        self.sent = 0

    async def _requests(self):
        sequence = 0
        while not self._stop.is_set():
            await self._credit.acquire()
            sequence += 1
            self.sent += self._args.batch_size
            yield writer_pb2.StreamPredictionsRequest(
                sequence=sequence, run_id=self._run_id, predictions=[
                    common_pb2.PredictionInput(
                        epoch=1, step=sequence, sample_index=i, prompt=f"q {i}",
                        ground_truth=f"t {i}", prediction=f"a {sequence}/{i}",
                        generation_time_ms=1.0) for i in range(self._args.batch_size)])

    async def run(self) -> None:
        acked = 0
        async for reply in self._stub.StreamPredictions(self._requests(),
                                                        metadata=self._metadata):
            self.acks.append((time.monotonic(), reply.inserted_count))
            for _ in range(reply.acked_sequence - acked):
                self._credit.release()
            acked = reply.acked_sequence

    def stop(self) -> None:
        self._stop.set()
        self._credit.release()

    def rate(self, start: float, end: float) -> float:
        rows = sum(n for t, n in self.acks if start <= t < end)
        return rows / (end - start)


async def left_over(dsn: str, run_id: uuid.UUID) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        found = {"writer.runs": await conn.fetchval(
            "SELECT count(*) FROM writer.runs WHERE id = $1", run_id)}
        for table in PER_RUN_TABLES:
            found[table] = await conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE run_id = $1", run_id)
        return found
    finally:
        await conn.close()


async def measure(args: argparse.Namespace, stack: BenchStack, run_id: uuid.UUID) -> dict:
    async with grpc.aio.insecure_channel(stack.services["writer"].address) as channel:
        stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        target = await stub.CreateRun(writer_pb2.CreateRunRequest(
            name="ingest", model_name="m", dataset_name="d"), metadata=stack.metadata(INGESTER))
        ingest = Ingest(args, stub, stack.metadata(INGESTER), target.id)
        task = asyncio.create_task(ingest.run())
        started = time.monotonic()
        await asyncio.sleep(args.baseline_s)
        delete_start = time.monotonic()
        reply = await stub.DeleteRun(writer_pb2.DeleteRunRequest(run_id=str(run_id)),
                                     metadata=stack.metadata(OWNER),
                                     timeout=args.delete_timeout_s)
        delete_end = time.monotonic()
        ingest.stop()
        await task
    stored = await asyncpg.connect(stack.admin_dsn)
    try:
        ingested = await stored.fetchval(
            "SELECT count(*) FROM writer.predictions WHERE run_id = $1", uuid.UUID(target.id))
    finally:
        await stored.close()
    return {"delete_s": delete_end - delete_start, "reply": reply,
            "before": ingest.rate(started + 2.0, delete_start),
            "during": ingest.rate(delete_start, delete_end),
            "ingested": ingested, "acked": sum(n for _, n in ingest.acks),
            "left": await left_over(stack.admin_dsn, run_id)}


async def main_async(args: argparse.Namespace) -> int:
    dbname = await create_database(args)
    services = {}
    try:
        await migrate_database(args, dbname)
        stack = BenchStack(args, dbname, services)
        seeded = time.monotonic()
        run_id = await seed(stack.admin_dsn, args)
        print(f"seeded {args.predictions} predictions, "
              f"{args.predictions * args.judgments_per_prediction} judgments, "
              f"{min(args.cache_entries, args.predictions)} cache entries by COPY in "
              f"{time.monotonic() - seeded:.1f}s")
        chunk = str(args.chunk_rows)
        services["judge"] = start_service(args, "judge", dbname, {
            "EPOCHLENS_JUDGE_WORKER_COUNT": "0", "EPOCHLENS_JUDGE_PURGE_CHUNK_ROWS": chunk,
            "EPOCHLENS_JUDGE_PURGE_CHUNK_PAUSE_S": str(args.pause_s)})
        services["writer"] = start_service(args, "writer", dbname, {
            "EPOCHLENS_WRITER_JUDGE_ADDRESS": services["judge"].address,
            "EPOCHLENS_WRITER_DELETE_CHUNK_ROWS": chunk,
            "EPOCHLENS_WRITER_DELETE_CHUNK_PAUSE_S": str(args.pause_s),
            "EPOCHLENS_WRITER_DELETE_PURGE_TIMEOUT_S": str(args.delete_timeout_s)})
        for service in services.values():
            await wait_healthy(args, service)
        result = await measure(args, stack, run_id)
    finally:
        for service in services.values():
            stop_service(args, service)
        if not args.keep:
            await drop_database(args, dbname)
    return report(args, result)


def report(args: argparse.Namespace, result: dict) -> int:
    reply = result["reply"]
    counts = {f: getattr(reply, f) for f in ("prediction_count", "metric_count",
                                             "judge_task_count", "judgment_count",
                                             "cache_entry_count", "spend_record_count")}
    print(f"DeleteRun wall time: {result['delete_s']:.1f}s (chunks of {args.chunk_rows} rows, "
          f"pause {args.pause_s:g}s between chunks)")
    print(f"removed: {json.dumps(counts)}")
    print(f"other user's ingest (stream, batches of {args.batch_size}, window {args.window}): "
          f"{result['before']:.0f} rows/s before the delete, {result['during']:.0f} rows/s "
          f"during it ({result['during'] / result['before']:.0%})")
    left = {table: n for table, n in result["left"].items() if n}
    print(f"rows of the deleted run left: {left or 'none'}; ingest rows acked "
          f"{result['acked']}, stored {result['ingested']}")
    ok = not left and result["acked"] == result["ingested"] and (
        reply.prediction_count == args.predictions
        and reply.judgment_count == args.predictions * args.judgments_per_prediction)
    print("checks:", "ok" if ok else "FAILED")
    return 0 if ok else 1


def main() -> None:
    raise SystemExit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
