"""ListMetrics: a run's training metrics, one series per name, downsampled on the server.

A series with more stored values in the requested step range than its point budget is
cut into equal-width step buckets (width = ceil(steps spanned / budget), so at most budget
buckets); each bucket becomes one point: the bucket's last stored value (its step, value,
epoch and wall time) with the bucket's minimum, maximum and count. A chart of a million
steps is then budget points per name, computed by the database (one GROUP BY per series
over the (run_id, name, step) index), and the envelope keeps spikes visible.
"""

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Row, and_, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from epochlens.v1 import query_pb2
from services.common.convert import timestamp
from services.writer.models import metrics_table as M


@dataclass(frozen=True)
class MetricsQuery:
    """What one ListMetrics call asks for, already checked and resolved."""

    run_id: uuid.UUID
    names: tuple[str, ...]  # empty: every name of the run
    max_points: int  # per series, before the total budget
    total_points: int  # budget of the whole response
    max_series: int
    start_step: int | None
    end_step: int | None


@dataclass(frozen=True)
class _Stats:
    name: str
    count: int
    first_step: int
    last_step: int


def _in_range(query: MetricsQuery, user_id: str) -> list:
    conditions = [M.c.run_id == query.run_id, M.c.user_id == user_id]
    if query.names:
        conditions.append(M.c.name.in_(query.names))
    if query.start_step is not None:
        conditions.append(M.c.step >= query.start_step)
    if query.end_step is not None:
        conditions.append(M.c.step <= query.end_step)
    return conditions


async def list_metrics(conn: AsyncConnection, user_id: str,
                       query: MetricsQuery) -> query_pb2.ListMetricsResponse:
    """The response for an owned run (the caller checked ownership)."""
    stats = [_Stats(*row) for row in (await conn.execute(
        select(M.c.name, func.count(), func.min(M.c.step), func.max(M.c.step))
        .where(*_in_range(query, user_id)).group_by(M.c.name).order_by(M.c.name))).all()]
    kept, omitted = stats[:query.max_series], stats[query.max_series:]
    response = query_pb2.ListMetricsResponse(omitted_names=[s.name for s in omitted])
    if not kept:
        return response
    budget = max(1, min(query.max_points, query.total_points // len(kept)))
    for series_stats in kept:
        series = response.series.add(name=series_stats.name,
                                     stored_count=series_stats.count)
        if series_stats.count <= budget:
            series.bucket_steps = 1
            _add_points(series, await _all_points(conn, user_id, query, series_stats.name))
            continue
        width = math.ceil((series_stats.last_step - series_stats.first_step + 1) / budget)
        series.downsampled, series.bucket_steps = True, width
        _add_buckets(series, await _buckets(conn, user_id, query, series_stats, width))
    return response


async def _all_points(conn: AsyncConnection, user_id: str, query: MetricsQuery,
                      name: str) -> Sequence[Row]:
    stmt = (select(M.c.step, M.c.value, M.c.epoch, M.c.wall_time)
            .where(*_in_range(query, user_id), M.c.name == name).order_by(M.c.step))
    return (await conn.execute(stmt)).all()


async def _buckets(conn: AsyncConnection, user_id: str, query: MetricsQuery, stats: _Stats,
                   width: int) -> Sequence[Row]:
    """Per bucket: min, max, count and last step, joined back to the last step's row."""
    bucket = ((M.c.step - stats.first_step) // width).label("bucket")
    agg = (select(bucket, func.min(M.c.value).label("min_value"),
                  func.max(M.c.value).label("max_value"), func.count().label("n"),
                  func.max(M.c.step).label("last_step"))
           .where(*_in_range(query, user_id), M.c.name == stats.name)
           .group_by(bucket).subquery())
    stmt = (select(agg.c.last_step, M.c.value, M.c.epoch, M.c.wall_time, agg.c.min_value,
                   agg.c.max_value, agg.c.n)
            .join_from(agg, M, and_(M.c.run_id == query.run_id, M.c.name == stats.name,
                                    M.c.step == agg.c.last_step))
            .where(M.c.user_id == user_id).order_by(agg.c.last_step))
    return (await conn.execute(stmt)).all()


def _add_points(series: query_pb2.MetricSeries, rows: Sequence[Row]) -> None:
    for step, value, epoch, wall_time in rows:
        series.points.add(step=step, value=value, epoch=epoch, wall_time=timestamp(wall_time),
                          min_value=value, max_value=value, count=1)


def _add_buckets(series: query_pb2.MetricSeries, rows: Sequence[Row]) -> None:
    for step, value, epoch, wall_time, low, high, count in rows:
        series.points.add(step=step, value=value, epoch=epoch, wall_time=timestamp(wall_time),
                          min_value=low, max_value=high, count=count)
