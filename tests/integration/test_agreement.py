"""GetRunSummary.agreements over real gRPC, on PostgreSQL and SQLite: per criterion with
human judgments and per rule or LLM judge, the pairs ((person, prediction)), percent
agreement, Cohen's kappa (checked against the formula written out here) and Spearman
(checked against scipy.stats.spearmanr), unset when undefined; the latest revision of a
person's judgment (RecordHumanJudgment) is the one that counts; no people, no rows."""

import uuid

import grpc
import numpy as np
import pytest
from scipy import stats as scipy_stats
from sqlalchemy.ext.asyncio import create_async_engine

from epochlens.v1 import judge_pb2, judge_pb2_grpc, query_pb2
from services.common.db import user_transaction
from services.judge.models import judgments_table
from services.query.agreement import run_agreements
from tests.conftest import READER_ROLE, pg_url
from tests.helpers import item
from tests.integration.test_compare import scores, write_run
from tests.integration.test_query_judgments import HUMAN, LLM, RULE, insert_rows

LLM_SCORES = [8.0, 3.0, 9.0, 6.0, 7.0, 2.0, 7.0, 10.0]
ALICE = [9.0, 4.0, 6.0, 5.0, 8.0, 2.0, 7.0, None]
BOB = [7.0, None, None, None, None, None, None, 3.0]


def kappa(a, b) -> float:
    """Cohen's kappa of two verdict lists, from its definition."""
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    return (observed - chance) / (1 - chance)


async def crafted_run(stack, writer_stub, user: str) -> str:
    run_id = await write_run(stack, writer_stub, user, [item(10, s) for s in range(8)])
    rows = scores(run_id, user, 1, 10, LLM_SCORES, "accuracy", LLM, 7.0)
    rows += scores(run_id, user, 1, 10, [1.0] * 4, "accuracy", RULE, 0.5)  # always passes
    rows += scores(run_id, user, 1, 10, [None] * 5 + [6.0], "accuracy", LLM, 7.0,
                   judge_model="anthropic/claude-test")  # one pair only
    rows += scores(run_id, user, 1, 10, LLM_SCORES, "clarity", LLM, 7.0)  # nobody's
    rows += scores(run_id, user, 1, 10, [0.0] * 3, "accuracy", LLM, 7.0,
                   judge_model="openai/unscored", status=judge_pb2.JUDGMENT_STATUS_UNSCORED)
    for who, marks in (("alice", ALICE), ("bob", BOB)):
        rows += scores(run_id, user, 1, 10, marks, "accuracy", HUMAN, 7.0, judge_model=who)
    await insert_rows(stack, judgments_table, rows)
    return run_id


def expected_pairs(judge: list) -> tuple[list, list]:
    """(judge score, human score) for each (person, prediction) both scored."""
    ours, theirs = [], []
    for marks in (ALICE, BOB):
        for mine, human in zip(judge, marks, strict=False):
            if mine is not None and human is not None:
                ours.append(mine)
                theirs.append(human)
    return ours, theirs


async def summary(query_stub, md, run_id: str) -> query_pb2.RunSummary:
    return await query_stub.GetRunSummary(query_pb2.GetRunSummaryRequest(run_id=run_id),
                                          metadata=md)


async def test_agreement_figures_match_independent_computation(stack, writer_stub, query_stub):
    md = stack.metadata("agree")
    run_id = await crafted_run(stack, writer_stub, "agree")
    got = (await summary(query_stub, md, run_id)).agreements
    assert [(a.criterion, a.judge_type, a.judge_model, a.pairs) for a in got] == [
        ("accuracy", RULE, "rules", 5), ("accuracy", LLM, "anthropic/claude-test", 1),
        ("accuracy", LLM, "openai/gpt-test", 9)]
    rules, single, llm = got
    ours, theirs = expected_pairs(LLM_SCORES)
    verdicts = [s >= 7 for s in ours], [s >= 7 for s in theirs]
    assert llm.percent_agreement == pytest.approx(np.mean(np.equal(*verdicts)))
    assert llm.HasField("cohen_kappa") and llm.cohen_kappa == pytest.approx(kappa(*verdicts))
    rho = scipy_stats.spearmanr(ours, theirs).statistic
    assert llm.HasField("spearman") and llm.spearman == pytest.approx(rho)
    # the rule always passes: kappa is 0 (people vary), Spearman undefined (constant scores)
    _, people = expected_pairs([1.0] * 4)
    assert rules.percent_agreement == pytest.approx(np.mean([h >= 7 for h in people]))
    assert rules.cohen_kappa == pytest.approx(0.0) and not rules.HasField("spearman")
    # one pair: neither statistic is defined
    assert single.percent_agreement == 1.0  # its 6 and alice's 2 both fail
    assert not single.HasField("cohen_kappa") and not single.HasField("spearman")


async def test_latest_revision_counts_and_no_people_no_rows(stack, writer_stub, query_stub):
    user = "agree-rev"
    md = stack.metadata(user)
    run_id = await write_run(stack, writer_stub, user, [item(10, s) for s in range(2)])
    await insert_rows(stack, judgments_table, scores(run_id, user, 1, 10, [8.0, 3.0],
                                                     "accuracy", LLM, 7.0))
    assert list((await summary(query_stub, md, run_id)).agreements) == []
    async with grpc.aio.insecure_channel(stack.judge.address) as channel:
        judge = judge_pb2_grpc.JudgeServiceStub(channel)
        for sample, score in ((0, 2.0), (0, 9.0), (1, 4.0)):
            await judge.RecordHumanJudgment(judge_pb2.RecordHumanJudgmentRequest(
                prediction=judge_pb2.PredictionRef(run_id=run_id, step=10,
                                                    sample_index=sample),
                criterion="accuracy", score=score, threshold=7.0), metadata=md)
    (row,) = (await summary(query_stub, md, run_id)).agreements
    assert (row.pairs, row.percent_agreement, row.cohen_kappa, row.spearman) == (
        2, 1.0, 1.0, 1.0)


async def test_any_key_chunk_gives_the_same_agreements(stack, writer_stub, query_stub):
    """The judge verdicts of the human-judged predictions are looked up in chunks of keys
    (agreement_key_chunk): chunks of 1, 2 and 3 keys give what one statement gives."""
    if stack.backend != "postgres":
        pytest.skip("read directly as the reader role on PostgreSQL")
    md = stack.metadata("agree-chunks")
    run_id = await crafted_run(stack, writer_stub, "agree-chunks")
    served = list((await summary(query_stub, md, run_id)).agreements)
    engine = create_async_engine(pg_url(READER_ROLE, stack.database))
    try:
        for chunk in (1, 2, 3, 1000):
            async with user_transaction(engine, "agree-chunks") as conn:
                got = await run_agreements(conn, "agree-chunks", uuid.UUID(run_id), chunk)
            assert got == served, chunk
        async with user_transaction(engine, "someone-else") as conn:
            assert await run_agreements(conn, "someone-else", uuid.UUID(run_id), 2) == []
    finally:
        await engine.dispose()
