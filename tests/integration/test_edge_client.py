"""The trainer's StreamingClient against the real writer when one batch cannot be stored:
the batch is set aside in the spool's rejected table, reported, and the run goes on."""

import asyncio
import sqlite3
import uuid

import asyncpg
import pytest

from services.common.auth import mint_token
from tests.conftest import PG_ADMIN, PG_HOST, PG_PORT
from tests.integration.test_writer import stored_count
from trainer_client.config import PredictionsConfig
from trainer_client.results import GenerationResult
from trainer_client.spool import RunRecord, Spool
from trainer_client.streaming import StreamingClient

# A PL/pgSQL error (SQLSTATE P0001) is no data error: the writer cannot isolate it, the whole
# stream fails with INTERNAL, and only the client can move the batch aside.
_PG_CRASH_TRIGGER = """
CREATE FUNCTION writer.crash_{tag}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.prompt = '{prompt}' THEN RAISE EXCEPTION 'refused by a test trigger'; END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER crash_{tag} BEFORE INSERT ON writer.samples
  FOR EACH ROW EXECUTE FUNCTION writer.crash_{tag}();
"""


async def _admin(stack, statement: str) -> None:
    if stack.backend == "postgres":
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_ADMIN,
                                     database=stack.database)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()
        return
    with sqlite3.connect(stack.sqlite_dir / "writer.db") as conn:
        conn.execute(statement)


def _results(prompts: list[str]) -> list[GenerationResult]:
    return [GenerationResult(sample_index=i, prompt=p, ground_truth="t", prediction=f"out {i}",
                             generation_time_ms=1.0) for i, p in enumerate(prompts)]


async def _upload(stack, tmp_path, prompts: list[str], **overrides):
    config = PredictionsConfig(_env_file=None, stream_batch_predictions=1,
                               backoff_base_s=0.02, backoff_max_s=0.1, flush_timeout_s=30,
                               **overrides)
    spool = Spool.create(tmp_path, RunRecord(request_id=uuid.uuid4().hex, name="edge",
                                             model_name="tiny", dataset_name="toy", config={}))
    client = StreamingClient(config, spool, stack.writer.address,
                             mint_token(stack.auth, "alice"))
    client.start()
    client.submit(1, 10, _results(prompts))
    client.finish()
    report = await asyncio.to_thread(client.close, 30)
    return client, report


async def test_a_batch_the_database_refuses_is_rejected_alone(stack, tmp_path):
    tag = uuid.uuid4().hex[:8]
    poison = f"poison-{tag}"
    if stack.backend == "postgres":
        await _admin(stack, f"ALTER TABLE writer.samples ADD CONSTRAINT poison_{tag} "
                     f"CHECK (prompt <> '{poison}') NOT VALID")
    else:
        await _admin(stack, f"CREATE TRIGGER poison_{tag} BEFORE INSERT ON samples "
                     f"WHEN NEW.prompt = '{poison}' BEGIN SELECT RAISE(ABORT, 'poison'); END")
    client, report = await _upload(stack, tmp_path, ["a", "b\x00", poison, "d", "e"])
    assert report.finished and report.pending_batches == 0
    assert (report.rejected_batches, report.rejected_predictions) == (1, 1)
    assert report.inserted == 4 and await stored_count(stack, report.run_id) == 4
    assert client.counts["nul_replaced_fields"] == 1
    spool = sqlite3.connect(report.spool_path)
    assert spool.execute("SELECT code FROM rejected").fetchall() == [("INTERNAL",)]


async def test_a_batch_that_breaks_the_stream_is_quarantined_and_the_run_goes_on(stack,
                                                                                  tmp_path):
    if stack.backend != "postgres":
        pytest.skip("a non-data database error is provoked with a PL/pgSQL trigger")
    tag = uuid.uuid4().hex[:8]
    crash = f"crash-{tag}"
    await _admin(stack, _PG_CRASH_TRIGGER.format(tag=tag, prompt=crash))
    client, report = await _upload(stack, tmp_path, ["a", "b", crash, "d", "e", "f"],
                                   poison_batch_attempts=2)
    assert report.finished and report.pending_batches == 0 and report.error is None
    assert (report.rejected_batches, report.rejected_predictions) == (1, 1)
    assert await stored_count(stack, report.run_id) == 5
    assert client.counts["quarantined_batches"] == 1
    spool = sqlite3.connect(report.spool_path)
    [(code, message)] = spool.execute("SELECT code, message FROM rejected").fetchall()
    assert code == "INTERNAL" and "alone" in message
