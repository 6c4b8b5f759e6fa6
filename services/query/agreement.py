"""Agreement of the rule and LLM judges with people, for GetRunSummary.agreements.

Per criterion with human judgments in the run, and per rule or LLM judge (judge_type,
judge_model) of that criterion: the pairs are the predictions scored by both, one pair per
(person, prediction) (each person's latest revision: the judgments table holds only that);
then percent agreement and Cohen's kappa on pass/fail and Spearman's correlation of the
scores (services.query.stats), kappa and Spearman unset when undefined. Every statement is
filtered by the caller.
"""

import uuid
from collections import defaultdict

import numpy as np
from sqlalchemy import Select, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from epochlens.v1 import judge_pb2
from services.judge.models import judgments_table as J
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


async def run_agreements(conn: AsyncConnection, user_id: str, run_id: uuid.UUID,
                         key_chunk: int) -> list[judge_pb2.JudgeAgreement]:
    """The run's judge-human agreements, ordered by criterion, judge type, judge model;
    empty when no person judged the run. The human judgments are read first (few, and none
    for most runs: then nothing else is read); the rule and LLM judgments of the same
    predictions are then looked up by primary key, `key_chunk` keys per statement, so the
    cost follows the human judgments, whatever the planner thinks of a table being written."""
    humans: dict[tuple[int, int, str], list[tuple[float, bool]]] = defaultdict(list)
    for row in (await conn.execute(_scored(user_id, run_id).where(
            J.c.judge_type == judge_pb2.JUDGE_TYPE_HUMAN))).all():
        humans[(row.step, row.sample_index, row.criterion)].append((row.score, bool(row.passed)))
    grouped: dict[tuple[str, int, str], list] = defaultdict(list)
    keys = sorted(humans)
    for start in range(0, len(keys), key_chunk):
        part = keys[start:start + key_chunk]
        stmt = _scored(user_id, run_id).where(
            J.c.judge_type.in_(MACHINE_JUDGES),
            tuple_(J.c.step, J.c.sample_index, J.c.criterion).in_(part))
        for row in (await conn.execute(stmt)).all():
            for human_score, human_passed in humans[(row.step, row.sample_index, row.criterion)]:
                grouped[(row.criterion, row.judge_type, row.judge_model)].append(
                    (row.score, bool(row.passed), human_score, human_passed))
    return [agreement(*key, pairs) for key, pairs in sorted(grouped.items())]


def _scored(user_id: str, run_id: uuid.UUID) -> Select:
    """The run's scored judgments of the user (the columns agreement needs)."""
    return select(J.c.step, J.c.sample_index, J.c.criterion, J.c.judge_type, J.c.judge_model,
                  J.c.score, J.c.passed).where(J.c.run_id == run_id, J.c.user_id == user_id,
                                               J.c.status == SCORED)
