"""Tables of schema `writer`: runs, samples, predictions, per-epoch summaries and the judge
outbox."""

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Text,
    UniqueConstraint,
    Uuid,
    and_,
    case,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA = "writer"
# PostgreSQL NOTIFY channel: every transaction that stores predictions or metrics of a run,
# or finishes it, notifies the run's id here once (delivered at commit); the query service
# LISTENs to wake its WatchRun streams. Part of the schema contract, like the table names.
COMMIT_CHANNEL = "epochlens_commits"

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class WriterBase(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA, naming_convention=NAMING_CONVENTION)


class RunRow(WriterBase):
    __tablename__ = "runs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    model_name: Mapped[str] = mapped_column(Text)
    dataset_name: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSON().with_variant(JSONB(), "postgresql"))
    state: Mapped[int] = mapped_column(SmallInteger)
    # epochlens.v1.RunKind; runs stored before kinds existed are training runs (default 1).
    kind: Mapped[int] = mapped_column(SmallInteger, server_default="1")
    request_id: Mapped[str | None] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finish_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set when DeleteRun (or the retention sweep) marked the run for deletion (migration
    # 0008): from then on the run is gone for every reader and writer (see live_run), while
    # its rows are removed in chunks (services.writer.deletion).
    delete_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The deleter that holds the run, and until when (a lease renewed between chunks).
    delete_claim: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    delete_claim_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index(None, "user_id", "create_time", "id"),
        UniqueConstraint("user_id", "request_id"),
        Index(None, "finish_time"),
        Index(None, "delete_time"),
    )


class PredictionRow(WriterBase):
    __tablename__ = "predictions"

    # No foreign key to runs on purpose: the check would run once per row on the hot path.
    # WriterRepository.commit locks the owned runs FOR KEY SHARE once per transaction, which
    # gives the same guarantee (the run cannot vanish while its predictions go in).
    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sample_index: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    epoch: Mapped[int] = mapped_column(BigInteger)
    prediction: Mapped[str] = mapped_column(Text)
    generation_time_ms: Mapped[float] = mapped_column(Float)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The prompt and ground truth are the sample's (SampleRow). These two are set only on rows
    # stored before samples existed (migration 0007) whose text differs from the one their
    # sample keeps (that of the sample's first step); then they are the row's own text
    # (legacy_ground_truth may be NULL: no ground truth). The writer never sets them.
    legacy_prompt: Mapped[str | None] = mapped_column(Text)
    legacy_ground_truth: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index(None, "run_id", "epoch", "step", "sample_index"),
        Index(None, "run_id", "sample_index", "step"),
    )


class SampleRow(WriterBase):
    """The fixed part of one sample of a run, stored once (not once per prediction): its
    prompt and ground truth. Immutable: a different text for a stored sample is refused
    (services.writer.samples)."""

    __tablename__ = "samples"

    # No foreign key to runs, like predictions: the commit locks the owned runs instead.
    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    sample_index: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    prompt: Mapped[str] = mapped_column(Text)
    ground_truth: Mapped[str | None] = mapped_column(Text)


class EpochRow(WriterBase):
    """Per-(run, epoch) summary the writer keeps current in the same transaction as the
    predictions, so ListEpochs costs the same whatever the run's size."""

    __tablename__ = "epochs"

    run_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey(f"{SCHEMA}.runs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    prediction_count: Mapped[int] = mapped_column(BigInteger)
    latest_step: Mapped[int] = mapped_column(BigInteger)
    first_create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class JudgeOutboxRow(WriterBase):
    """A committed prediction not yet handed to the judge service. Written in the same
    transaction (and statement) as the prediction; deleted once EnqueueJudging accepted it."""

    __tablename__ = "judge_outbox"

    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sample_index: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Failed hand-offs so far; the backoff grows with it.
    attempts: Mapped[int] = mapped_column(Integer)
    # Not claimed by the dispatcher before this time.
    next_attempt_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    # W3C traceparent of the request that stored the prediction (NULL: tracing was off).
    traceparent: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index(None, "next_attempt_time"),)


class MetricRow(WriterBase):
    """One training scalar per (run, step, name). Immutable like predictions: the first value
    stored for a key stays (services.writer.repository.MetricWrite)."""

    __tablename__ = "metrics"

    # No foreign key to runs, like predictions: the commit locks the owned runs instead.
    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    value: Mapped[float] = mapped_column(Float(precision=53))
    epoch: Mapped[float | None] = mapped_column(Float(precision=53))
    wall_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index(None, "run_id", "name", "step"),)


# Step widths of the metric rollups (bucket = step // width); migration 0005 has them too.
ROLLUP_WIDTHS = (10, 100, 1000, 10000)


class MetricRollupRow(WriterBase):
    """Per (run, name, width, bucket of steps): count, minimum, maximum and the last point
    of the metric's values in the bucket. Kept by the writer in the transaction that stores
    the values (services.writer.repository.MetricWrite); ListMetrics reads long series
    from it (services.query.metrics)."""

    __tablename__ = "metric_rollups"

    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    width: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    count: Mapped[int] = mapped_column(BigInteger)
    min_value: Mapped[float] = mapped_column(Float(precision=53))
    max_value: Mapped[float] = mapped_column(Float(precision=53))
    last_step: Mapped[int] = mapped_column(BigInteger)
    last_value: Mapped[float] = mapped_column(Float(precision=53))
    last_epoch: Mapped[float | None] = mapped_column(Float(precision=53))
    last_wall_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKeyRow(WriterBase):
    """A user's API key: only its hash (HMAC-SHA-256 with the writer's pepper) and a short
    prefix to recognise it by are stored; ExchangeApiKey trades the key for a token."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    prefix: Mapped[str] = mapped_column(Text)
    key_hash: Mapped[str] = mapped_column(Text, unique=True)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expire_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoke_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index(None, "user_id", "create_time"),)


runs_table = RunRow.__table__
predictions_table = PredictionRow.__table__
epochs_table = EpochRow.__table__
judge_outbox_table = JudgeOutboxRow.__table__
metrics_table = MetricRow.__table__
metric_rollups_table = MetricRollupRow.__table__
api_keys_table = ApiKeyRow.__table__
samples_table = SampleRow.__table__


def _prediction_texts():
    """predictions joined to their samples, with the columns predictions had before samples
    existed (prompt and ground_truth included): what every reader selects from. A LEFT JOIN
    on the samples' primary key: PostgreSQL drops the join from a query that reads neither
    text, and inlines the subquery, so filters on predictions' columns use its indexes."""
    p, s = predictions_table.c, samples_table.c
    own = p.legacy_prompt.is_not(None)
    return (select(p.run_id, p.step, p.sample_index, p.user_id, p.epoch,
                   func.coalesce(p.legacy_prompt, s.prompt).label("prompt"),
                   case((own, p.legacy_ground_truth), else_=s.ground_truth)
                   .label("ground_truth"),
                   p.prediction, p.generation_time_ms, p.prompt_tokens, p.completion_tokens,
                   p.create_time)
            .select_from(predictions_table.outerjoin(samples_table, and_(
                s.run_id == p.run_id, s.sample_index == p.sample_index)))
            .subquery("prediction_texts"))


prediction_texts = _prediction_texts()


def live_run() -> ColumnElement[bool]:
    """The condition every read and write of a run adds: not marked for deletion. A run
    being deleted is NOT_FOUND everywhere at once, long before its last row is removed."""
    return runs_table.c.delete_time.is_(None)
