"""Which epochs CompareRuns compares: the candidate's (named, else its last) and the
baseline's (named, else the request's EpochChoice: FIRST for the same run and LAST for another
run when unspecified; BEST = the epoch with the highest mean score on best_criterion over the
judgments of each sample's latest prediction in the epoch, the highest mean among that
criterion's judges, the earliest of equals)."""

import uuid
from typing import TYPE_CHECKING

from sqlalchemy import and_, case, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from epochlens.v1 import judge_pb2, query_pb2
from services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from services.judge.models import judgments_table as J
from services.writer.models import epochs_table as E
from services.writer.models import live_run
from services.writer.models import prediction_texts as P
from services.writer.models import runs_table as R

if TYPE_CHECKING:
    from services.query.compare import CompareQuery


async def _epochs(conn: AsyncConnection, user_id: str, run_id: uuid.UUID,
                  field: str) -> list[int]:
    """The run's epochs, ascending; NOT_FOUND for another's (or no) run, FAILED_PRECONDITION
    for a run without predictions."""
    owned = await conn.scalar(select(R.c.id).where(R.c.id == run_id, R.c.user_id == user_id,
                                                   live_run()))
    if owned is None:
        raise NotFound(f"run {run_id} not found", {"run_id": str(run_id)})
    epochs = list((await conn.execute(select(E.c.epoch).where(
        E.c.run_id == run_id, E.c.user_id == user_id).order_by(E.c.epoch))).scalars())
    if not epochs:
        raise FailedPrecondition(f"run {run_id} has no predictions to compare",
                                 {"field": field, "run_id": str(run_id)})
    return epochs


def _named(epochs: list[int], epoch: int, run_id: uuid.UUID, field: str) -> int:
    if epoch not in epochs:
        raise InvalidArgument([FieldViolation(
            field, f"run {run_id} has no predictions at epoch {epoch} (its epochs: "
            f"{epochs[0]}..{epochs[-1]}, {len(epochs)} in all)")])
    return epoch


async def best_epoch(conn: AsyncConnection, user_id: str, run_id: uuid.UUID,
                     criterion: str) -> int:
    """The epoch with the highest mean score on `criterion` (scored judgments of each
    sample's latest prediction in the epoch, the ones a comparison pairs; people count as
    one judge, each other judge on its own; the highest mean among them), earliest of
    equals; INVALID_ARGUMENT when the run has no scored judgment on it."""
    latest = (select(P.c.epoch, P.c.sample_index, func.max(P.c.step).label("step"))
              .where(P.c.run_id == run_id, P.c.user_id == user_id)
              .group_by(P.c.epoch, P.c.sample_index).subquery())
    model = case((J.c.judge_type == judge_pb2.JUDGE_TYPE_HUMAN, "human"),
                 else_=J.c.judge_model)
    stmt = (select(J.c.epoch, func.avg(J.c.score).label("mean"))
            .join(latest, and_(J.c.epoch == latest.c.epoch,
                               J.c.sample_index == latest.c.sample_index,
                               J.c.step == latest.c.step))
            .where(J.c.run_id == run_id, J.c.user_id == user_id, J.c.criterion == criterion,
                   J.c.status == judge_pb2.JUDGMENT_STATUS_SCORED)
            .group_by(J.c.epoch, J.c.judge_type, model))
    best: dict[int, float] = {}
    for row in (await conn.execute(stmt)).all():
        best[row.epoch] = max(best.get(row.epoch, float("-inf")), float(row.mean))
    if not best:
        raise InvalidArgument([FieldViolation(
            "best_criterion", f"run {run_id} has no scored judgment on {criterion[:64]!r}")])
    top = max(best.values())
    return min(epoch for epoch, mean in best.items() if mean == top)


async def resolve_epochs(conn: AsyncConnection, user_id: str,
                         query: "CompareQuery") -> tuple[int, int]:
    """(candidate epoch, baseline epoch); both runs checked for the caller first."""
    epochs = await _epochs(conn, user_id, query.run_id, "run_id")
    same = query.baseline_run_id == query.run_id
    baseline = epochs if same else await _epochs(conn, user_id, query.baseline_run_id,
                                                 "baseline_run_id")
    epoch = (epochs[-1] if query.epoch is None
             else _named(epochs, query.epoch, query.run_id, "epoch"))
    if query.baseline_epoch is not None:
        return epoch, _named(baseline, query.baseline_epoch, query.baseline_run_id,
                             "baseline_epoch")
    choice = query.choice or (query_pb2.EPOCH_CHOICE_FIRST if same
                              else query_pb2.EPOCH_CHOICE_LAST)
    if choice == query_pb2.EPOCH_CHOICE_BEST:
        return epoch, await best_epoch(conn, user_id, query.baseline_run_id,
                                       query.best_criterion)
    return epoch, baseline[0] if choice == query_pb2.EPOCH_CHOICE_FIRST else baseline[-1]
