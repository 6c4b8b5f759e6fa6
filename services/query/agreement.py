"""Agreement of the rule and LLM judges with people, for GetRunSummary.agreements.

Per criterion with human judgments in the run, and per rule or LLM judge (judge_type,
judge_model) of that criterion: the pairs are the predictions scored by both, one pair per
(person, prediction) (each person's latest revision: the judgments table holds only that);
then percent agreement and Cohen's kappa on pass/fail and Spearman's correlation of the
scores (services.query.stats), kappa and Spearman unset when undefined. One statement, a
self-join of the run's scored judgments, filtered by the caller.
"""

import uuid
from collections import defaultdict

import numpy as np
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import aliased

from epochlens.v1 import judge_pb2
from services.judge.models import judgments_table
from services.query.stats import cohen_kappa, spearman

SCORED = judge_pb2.JUDGMENT_STATUS_SCORED
MACHINE_JUDGES = (judge_pb2.JUDGE_TYPE_RULE, judge_pb2.JUDGE_TYPE_LLM)


def agreement(criterion: str, judge_type: int, judge_model: str,
              pairs: list[tuple[float, bool, float, bool]]) -> judge_pb2.JudgeAgreement:
    """The JudgeAgreement of one judge from its pairs (judge score, judge verdict, human
    score, human verdict)."""
    values = np.array(pairs, dtype=np.float64).reshape(-1, 4)
    judge_pass, human_pass = values[:, 1] > 0.5, values[:, 3] > 0.5
    out = judge_pb2.JudgeAgreement(
        criterion=criterion, judge_type=judge_type, judge_model=judge_model,
        pairs=len(values), percent_agreement=float(np.mean(judge_pass == human_pass)))
    kappa = cohen_kappa(judge_pass, human_pass)
    if kappa is not None:
        out.cohen_kappa = kappa
    rho = spearman(values[:, 0], values[:, 2])
    if rho is not None:
        out.spearman = rho
    return out


async def run_agreements(conn: AsyncConnection, user_id: str,
                         run_id: uuid.UUID) -> list[judge_pb2.JudgeAgreement]:
    """The run's judge-human agreements, ordered by criterion, judge type, judge model;
    empty when no person judged the run."""
    judge, human = aliased(judgments_table), aliased(judgments_table)
    stmt = (select(judge.c.criterion, judge.c.judge_type, judge.c.judge_model, judge.c.score,
                   judge.c.passed, human.c.score.label("human_score"),
                   human.c.passed.label("human_passed"))
            .join(human, (human.c.run_id == judge.c.run_id) & (human.c.step == judge.c.step)
                  & (human.c.sample_index == judge.c.sample_index)
                  & (human.c.criterion == judge.c.criterion))
            .where(judge.c.run_id == run_id, judge.c.user_id == user_id,
                   human.c.user_id == user_id, judge.c.status == SCORED,
                   human.c.status == SCORED, judge.c.judge_type.in_(MACHINE_JUDGES),
                   human.c.judge_type == judge_pb2.JUDGE_TYPE_HUMAN))
    grouped: dict[tuple[str, int, str], list] = defaultdict(list)
    for row in (await conn.execute(stmt)).all():
        grouped[(row.criterion, row.judge_type, row.judge_model)].append(
            (row.score, bool(row.passed), row.human_score, bool(row.human_passed)))
    return [agreement(*key, pairs) for key, pairs in sorted(grouped.items())]
