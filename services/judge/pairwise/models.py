"""Tables of pairwise judging in schema `judge` (migrations 0004, 0005): the queue of pairs to
judge and their results. Both carry the owner's user_id under row-level security on PostgreSQL;
the judge role's workers claim every user's pairwise tasks (policy pairwise_tasks_worker,
services.judge.migrate)."""

import uuid
from datetime import datetime
from enum import IntEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    SmallInteger,
    Text,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from services.judge.models import JsonType, JudgeBase


class Outcome(IntEnum):
    """pairwise_results.outcome, from the candidate's side."""

    WIN = 1
    LOSS = 2
    TIE = 3
    UNSCORED = 4


class PairwiseTaskRow(JudgeBase):
    """One candidate prediction waiting for its pairwise judging. Identity = the candidate's:
    a repeated enqueue never adds a second task."""

    __tablename__ = "pairwise_tasks"

    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sample_index: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    epoch: Mapped[int] = mapped_column(BigInteger)
    # The run the baseline comes from (this run for per-epoch judging).
    baseline_run_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    # Its epoch; NULL: resolved when judged (the baseline run's last epoch).
    baseline_epoch: Mapped[int | None] = mapped_column(BigInteger)
    # The run's judge config (judge section) at enqueue time.
    config: Mapped[dict[str, Any]] = mapped_column(JsonType)
    # services.judge.store.TaskState value.
    state: Mapped[int] = mapped_column(SmallInteger)
    attempts: Mapped[int] = mapped_column(Integer)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Order 1's usable answer once it is charged (migration 0005), and the baseline
    # prediction it was asked against: a claim after the worker died asks only order 2.
    # NULL: order 1 not answered yet (or the pair's result is stored).
    order1_answer: Mapped[str | None] = mapped_column(Text)
    order1_reason: Mapped[str | None] = mapped_column(Text)
    order1_input_tokens: Mapped[int | None] = mapped_column(Integer)
    order1_output_tokens: Mapped[int | None] = mapped_column(Integer)
    order1_cost_usd: Mapped[float | None] = mapped_column(Float)
    order1_baseline_step: Mapped[int | None] = mapped_column(BigInteger)
    order1_baseline_sample_index: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (Index(None, "state", "not_before"),)


class PairwiseResultRow(JudgeBase):
    """The outcome of one pair: the candidate prediction against its baseline, both orders'
    raw answers. The primary key makes a second result of the same pair impossible."""

    __tablename__ = "pairwise_results"

    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sample_index: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    criterion: Mapped[str] = mapped_column(Text, primary_key=True)
    judge_model: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    epoch: Mapped[int] = mapped_column(BigInteger)
    baseline_run_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    # -1: no baseline epoch could be resolved (the baseline run has no predictions).
    baseline_epoch: Mapped[int] = mapped_column(BigInteger)
    # The baseline prediction (NULL when none was found).
    baseline_step: Mapped[int | None] = mapped_column(BigInteger)
    baseline_sample_index: Mapped[int | None] = mapped_column(BigInteger)
    # Outcome value.
    outcome: Mapped[int] = mapped_column(SmallInteger)
    # Raw answers: order 1 shows (baseline, candidate) as A and B, order 2 (candidate,
    # baseline); "A", "B", "tie", or "" when that order has no usable answer.
    answer_1: Mapped[str] = mapped_column(Text)
    answer_2: Mapped[str] = mapped_column(Text)
    reason_1: Mapped[str] = mapped_column(Text)
    reason_2: Mapped[str] = mapped_column(Text)
    # Both raw answers picked the same position (A twice or B twice).
    position_bias: Mapped[bool] = mapped_column(Boolean)
    unscored_reason: Mapped[str] = mapped_column(Text)
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[float] = mapped_column(Float)
    prompt_version: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index(None, "run_id", "epoch", "criterion"),)


pairwise_tasks_table = PairwiseTaskRow.__table__
pairwise_results_table = PairwiseResultRow.__table__
