"""The writer's domain metrics (docs/ARCHITECTURE.md, "Metrics, traces and logs").

Ingest counters are incremented where a commit settles (WriterRepository.commit: every write
path, streams, unary writes and evaluations, goes through it) and where a stream batch is
rejected (WriterServicer._reject). The outbox gauges are read from the database by a
PeriodicGauge every metrics_db_refresh_s while the metrics endpoint is on: one aggregate
over judge_outbox, a table the dispatcher keeps short, and never per scrape.
"""

from datetime import UTC, datetime

from prometheus_client import Counter, Gauge
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.common.telemetry.metrics import PeriodicGauge, metrics_on
from services.writer.config import WriterSettings
from services.writer.models import judge_outbox_table

PREDICTIONS_INGESTED = Counter("epochlens_writer_predictions_ingested",
                               "Predictions stored (new identities only).")
PREDICTION_DUPLICATES = Counter("epochlens_writer_prediction_duplicates",
                                "Predictions received again for an identity already stored "
                                "(replays; not stored twice).")
REJECTED_BATCHES = Counter("epochlens_writer_rejected_batches",
                           "Stream batches rejected (the stream goes on), by error reason.",
                           ["reason"])
OUTBOX_ROWS = Gauge("epochlens_writer_outbox_rows",
                    "Judge outbox rows waiting for the hand-off (as of the last refresh).")
OUTBOX_OLDEST_AGE = Gauge("epochlens_writer_outbox_oldest_age_seconds",
                          "Age of the oldest judge outbox row (0: the outbox is empty).")


def count_commit(inserted: int, duplicates: int) -> None:
    PREDICTIONS_INGESTED.inc(inserted)
    PREDICTION_DUPLICATES.inc(duplicates)


async def refresh_outbox(engine: AsyncEngine) -> None:
    """Sets the outbox gauges from one count/min over judge_outbox."""
    outbox = judge_outbox_table.c
    async with engine.connect() as conn:
        rows, oldest = (await conn.execute(
            select(func.count(), func.min(outbox.create_time)))).one()
    OUTBOX_ROWS.set(rows)
    if oldest is None:
        OUTBOX_OLDEST_AGE.set(0)
        return
    if oldest.tzinfo is None:  # SQLite returns naive UTC
        oldest = oldest.replace(tzinfo=UTC)
    OUTBOX_OLDEST_AGE.set(max((datetime.now(UTC) - oldest).total_seconds(), 0.0))


def outbox_gauge(engine: AsyncEngine, settings: WriterSettings) -> PeriodicGauge | None:
    """The refresher of the outbox gauges; None when there is no outbox or no endpoint."""
    if settings.judge_address is None or not metrics_on(settings):
        return None
    return PeriodicGauge("judge outbox", lambda: refresh_outbox(engine),
                         settings.metrics_db_refresh_s)
