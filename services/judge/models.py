"""Tables of schema `judge`: the task queue, judgments (and the revisions of human ones), the
LLM cache, per-run LLM state."""

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Text,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA = "judge"

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}

JsonType = JSON().with_variant(JSONB(), "postgresql")


class JudgeBase(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA, naming_convention=NAMING_CONVENTION)


class TaskRow(JudgeBase):
    """One prediction waiting to be judged (or judged). Identity = the prediction's."""

    __tablename__ = "tasks"

    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sample_index: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    epoch: Mapped[int] = mapped_column(BigInteger)
    prompt: Mapped[str] = mapped_column(Text)
    ground_truth: Mapped[str | None] = mapped_column(Text)
    prediction: Mapped[str] = mapped_column(Text)
    # The run's judge config (the "judge" section of its config) as given at enqueue time.
    config: Mapped[dict[str, Any]] = mapped_column(JsonType)
    # TaskState value (services/judge/queue.py): queued, running, done, failed.
    state: Mapped[int] = mapped_column(SmallInteger)
    attempts: Mapped[int] = mapped_column(Integer)
    # A running task whose lease passed is claimed again (its worker died).
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Not claimed before this time (backoff after a failed attempt).
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index(None, "state", "not_before"),)


class JudgmentRow(JudgeBase):
    """One criterion's verdict on one prediction; the primary key makes a second one impossible."""

    __tablename__ = "judgments"

    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sample_index: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    criterion: Mapped[str] = mapped_column(Text, primary_key=True)
    judge_type: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    judge_model: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    epoch: Mapped[int] = mapped_column(BigInteger)
    score: Mapped[float] = mapped_column(Float)
    passed: Mapped[bool] = mapped_column(Boolean)
    threshold: Mapped[float] = mapped_column(Float)
    reasoning: Mapped[str] = mapped_column(Text)
    confidence: Mapped[float] = mapped_column(Float)
    # JudgmentStatus value (epochlens.v1.JudgmentStatus): scored or unscored.
    status: Mapped[int] = mapped_column(SmallInteger)
    unscored_reason: Mapped[str] = mapped_column(Text)
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[float] = mapped_column(Float)
    prompt_version: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # 1; a human judgment's latest revision number (every revision is in judgment_revisions).
    revision: Mapped[int] = mapped_column(Integer, server_default=text("1"))

    __table_args__ = (
        Index(None, "run_id", "epoch", "criterion"),
        Index(None, "run_id", "sample_index", "step"),
    )


class LlmCacheRow(JudgeBase):
    """A parsed LLM verdict of one user keyed by sha256(user, provider, endpoint URL, model,
    prompt version, criterion, inputs), with what its call billed and the prediction it was
    made for (run_id NULL: an ad hoc item)."""

    __tablename__ = "llm_cache"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    verdict: Mapped[dict[str, Any]] = mapped_column(JsonType)
    run_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    step: Mapped[int] = mapped_column(BigInteger)
    sample_index: Mapped[int] = mapped_column(BigInteger)
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[float] = mapped_column(Float)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RunLlmStateRow(JudgeBase):
    """LLM spending and status of one run: budget, what was spent, why judging paused."""

    __tablename__ = "run_llm_state"

    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    budget_usd: Mapped[float] = mapped_column(Float)
    spent_usd: Mapped[float] = mapped_column(Float)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    budget_exhausted: Mapped[bool] = mapped_column(Boolean)
    paused_reason: Mapped[str | None] = mapped_column(Text)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Estimated most cost of the paid calls in flight (reserved before each call, settled
    # after), and when the last of them must have settled: spent + reserved <= budget.
    reserved_usd: Mapped[float] = mapped_column(Float, server_default=text("0"))
    reserved_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JudgmentRevisionRow(JudgeBase):
    """One revision of a person's judgment (RecordHumanJudgment). Every revision is kept;
    judgments holds the latest, the one that counts. author = the token's user (judge_model
    of the judgment); user_id = the prediction's owner (row-level security)."""

    __tablename__ = "judgment_revisions"

    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sample_index: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    criterion: Mapped[str] = mapped_column(Text, primary_key=True)
    author: Mapped[str] = mapped_column(Text, primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    epoch: Mapped[int] = mapped_column(BigInteger)
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    passed: Mapped[bool] = mapped_column(Boolean)
    reasoning: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PurgedRunRow(JudgeBase):
    """A run whose judge rows PurgeRun removed (migration 0006): late hand-offs of it are
    dropped, and judgments of it are never stored again (services.judge.purge)."""

    __tablename__ = "purged_runs"

    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    purge_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


tasks_table = TaskRow.__table__
judgments_table = JudgmentRow.__table__
llm_cache_table = LlmCacheRow.__table__
run_llm_state_table = RunLlmStateRow.__table__
judgment_revisions_table = JudgmentRevisionRow.__table__
purged_runs_table = PurgedRunRow.__table__
