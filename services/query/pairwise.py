"""Pairwise judging summaries for the QueryService: per (epoch, baseline run, baseline epoch,
criterion, judge model), the wins, losses, ties, unscored pairs, position-biased pairs and
cost of judge.pairwise_results, with the win rate and its Wilson score interval.

win_rate = (wins + ties / 2) / (wins + losses + ties). The interval is Wilson's for a
proportion with n = wins + losses + ties scored pairs and z the normal quantile of the
confidence level (statistics.NormalDist, no scipy in the services); a tie counts as half a
win in the point estimate and in the interval.
"""

import math
import statistics
import uuid

from sqlalchemy import Integer, case, cast, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from epochlens.v1 import judge_pb2
from services.judge.pairwise.models import Outcome
from services.judge.pairwise.models import pairwise_results_table as R

_GROUP = (R.c.epoch, R.c.baseline_run_id, R.c.baseline_epoch, R.c.criterion, R.c.judge_model)


def _count(outcome: Outcome):
    return func.sum(case((R.c.outcome == int(outcome), 1), else_=0))


def wilson_interval(successes: float, n: int, confidence_level: float) -> tuple[float, float]:
    """Wilson score interval of successes / n at the confidence level; (0, 0) when n = 0."""
    if n <= 0:
        return 0.0, 0.0
    z = statistics.NormalDist().inv_cdf(0.5 + confidence_level / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


async def pairwise_summaries(conn: AsyncConnection, user_id: str, run_id: uuid.UUID,
                             confidence_level: float, epoch: int | None = None,
                             baseline_run_id: uuid.UUID | None = None,
                             baseline_epoch: int | None = None
                             ) -> list[judge_pb2.PairwiseSummary]:
    """The run's pairwise summaries (one SQL aggregate), ordered by epoch, criterion, judge
    model (then baseline); filtered to one candidate epoch, baseline run or baseline epoch
    when given. Only the user's rows are read."""
    stmt = select(*_GROUP, _count(Outcome.WIN).label("wins"),
                  _count(Outcome.LOSS).label("losses"), _count(Outcome.TIE).label("ties"),
                  _count(Outcome.UNSCORED).label("unscored"),
                  func.sum(cast(R.c.position_bias, Integer)).label("biased"),
                  func.sum(R.c.cost_usd).label("cost")).where(
        R.c.run_id == run_id, R.c.user_id == user_id)
    if epoch is not None:
        stmt = stmt.where(R.c.epoch == epoch)
    if baseline_run_id is not None:
        stmt = stmt.where(R.c.baseline_run_id == baseline_run_id)
    if baseline_epoch is not None:
        stmt = stmt.where(R.c.baseline_epoch == baseline_epoch)
    stmt = stmt.group_by(*_GROUP).order_by(R.c.epoch, R.c.criterion, R.c.judge_model,
                                           R.c.baseline_run_id, R.c.baseline_epoch)
    return [_summary(row, confidence_level) for row in await conn.execute(stmt)]


def _summary(row, confidence_level: float) -> judge_pb2.PairwiseSummary:
    wins, losses, ties = int(row.wins or 0), int(row.losses or 0), int(row.ties or 0)
    scored = wins + losses + ties
    successes = wins + ties / 2
    low, high = wilson_interval(successes, scored, confidence_level)
    return judge_pb2.PairwiseSummary(
        epoch=row.epoch, baseline_run_id=str(row.baseline_run_id),
        baseline_epoch=row.baseline_epoch, criterion=row.criterion,
        judge_model=row.judge_model, wins=wins, losses=losses, ties=ties,
        unscored=int(row.unscored or 0), win_rate=successes / scored if scored else 0.0,
        win_rate_low=low, win_rate_high=high, position_bias_pairs=int(row.biased or 0),
        cost_usd=float(row.cost or 0.0))
