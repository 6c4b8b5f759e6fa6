"""CompareRuns over real gRPC, on PostgreSQL and SQLite: epochs resolved (defaults, FIRST,
LAST, BEST), samples matched by index within a run and by (prompt, ground truth) across runs
at the latest step of an epoch, exact paired means, pass rates, deltas and counts, people
averaged into one "human" judge, the changed samples in their order, bootstrap intervals
checked against an independent computation (the same resampling in the test, and
scipy.stats.bootstrap), validation, the sample limit, and another user's runs NOT_FOUND.

Judgments are seeded as the database admin into runs whose config turns the judges off
(tests/integration/test_query_judgments.py), so the seeded rows are the only ones.
"""

import grpc
import numpy as np
import pytest
from scipy import stats as scipy_stats

from epochlens.v1 import query_pb2, query_pb2_grpc, writer_pb2
from services.judge.models import judgments_table
from tests.helpers import create_run, field_violations, item, rich_status
from tests.integration.test_query_judgments import (
    HUMAN,
    LLM,
    LLM_MODEL,
    NO_JUDGING,
    RULE,
    insert_rows,
    judgment_row,
    settled,
)
from tests.integration.test_query_safety import own_query

RESAMPLES, SEED, LEVEL = 2000, 0, 0.95  # the stack's query settings (defaults)
# Candidate (epoch 2) and baseline (epoch 1) scores of criterion "chrf" (rules, pass at 4).
FIRST = [2.0, 5.0, 6.0, 3.0, 9.0]
SECOND = [5.0, 5.0, 3.0, 3.5, 10.0]


async def write_run(stack, writer_stub, user: str, items) -> str:
    md = stack.metadata(user)
    run = await create_run(writer_stub, md, config=NO_JUDGING)
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=items), metadata=md)
    await settled(stack, run.id)
    return run.id


def scores(run_id: str, user: str, epoch: int, step: int, values, criterion: str = "chrf",
           judge_type: int = RULE, threshold: float = 4.0, **fields) -> list[dict]:
    return [judgment_row(run_id, user, epoch, step, s, criterion, judge_type, v, threshold,
                         **fields) for s, v in enumerate(values) if v is not None]


async def two_epoch_run(stack, writer_stub, user: str) -> str:
    """5 samples; epoch 1 at steps 5 and 10 (step 5 judged too, and ignored: the latest step
    of an epoch counts), epoch 2 at step 20. chrf: FIRST then SECOND; people on
    helpfulness: sample 0 by alice 6 and bob 8 (mean 7, pass at 7) then alice 9; sample 1 by
    alice 8 then 5."""
    items = [item(step, s, epoch=e) for e, step in ((1, 5), (1, 10), (2, 20)) for s in range(5)]
    run_id = await write_run(stack, writer_stub, user, items)
    rows = (scores(run_id, user, 1, 5, [9.0] * 5) + scores(run_id, user, 1, 10, FIRST)
            + scores(run_id, user, 2, 20, SECOND))
    human = [(1, 10, 0, "alice", 6.0), (1, 10, 0, "bob", 8.0), (2, 20, 0, "alice", 9.0),
             (1, 10, 1, "alice", 8.0), (2, 20, 1, "alice", 5.0)]
    rows += [judgment_row(run_id, user, e, step, s, "helpfulness", HUMAN, v, 7.0,
                          judge_model=who) for e, step, s, who, v in human]
    await insert_rows(stack, judgments_table, rows)
    return run_id


async def compare(query_stub, md, **request) -> query_pb2.CompareRunsResponse:
    return await query_stub.CompareRuns(query_pb2.CompareRunsRequest(**request), metadata=md)


def interval(differences, resamples=RESAMPLES, seed=SEED, level=LEVEL) -> tuple[float, float]:
    """The paired percentile bootstrap, written out again here."""
    d = np.asarray(differences, dtype=float)
    index = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = np.array([d[row].mean() for row in index])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


async def test_same_run_epochs_deltas_counts_and_changes(stack, writer_stub, query_stub):
    md = stack.metadata("cmp")
    run_id = await two_epoch_run(stack, writer_stub, "cmp")
    reply = await compare(query_stub, md, run_id=run_id)
    assert (reply.run_id, reply.epoch, reply.baseline_run_id, reply.baseline_epoch) == (
        run_id, 2, run_id, 1)
    assert (reply.shared_samples, reply.bootstrap_resamples) == (5, RESAMPLES)
    assert reply.confidence_level == pytest.approx(LEVEL)
    chrf, human = reply.deltas
    assert (chrf.criterion, chrf.judge_type, chrf.judge_model, chrf.paired_count) == (
        "chrf", RULE, "rules", 5)
    assert (chrf.baseline_mean, chrf.candidate_mean) == (5.0, 5.3)
    assert chrf.mean_delta == pytest.approx(0.3)
    assert (chrf.baseline_pass_rate, chrf.candidate_pass_rate) == (0.6, 0.6)
    assert chrf.pass_rate_delta == pytest.approx(0.0)
    assert (chrf.improved_count, chrf.regressed_count, chrf.unchanged_count) == (3, 1, 1)
    diff = np.array(SECOND) - np.array(FIRST)
    assert (chrf.mean_delta_low, chrf.mean_delta_high) == pytest.approx(interval(diff))
    flips = np.array([s >= 4 for s in SECOND], float) - np.array([s >= 4 for s in FIRST], float)
    assert (chrf.pass_rate_delta_low, chrf.pass_rate_delta_high) == pytest.approx(
        interval(flips))
    assert chrf.mean_delta_low <= chrf.mean_delta <= chrf.mean_delta_high
    # people: sample 0 mean(6, 8) = 7 (pass) -> 9; sample 1: 8 -> 5 (a regression)
    assert (human.criterion, human.judge_type, human.judge_model, human.paired_count) == (
        "helpfulness", HUMAN, "human", 2)
    assert (human.baseline_mean, human.candidate_mean, human.mean_delta) == (7.5, 7.0, -0.5)
    assert (human.baseline_pass_rate, human.candidate_pass_rate) == (1.0, 0.5)
    changes = [(c.sample_index, c.baseline_sample_index, c.criterion, c.baseline_score,
                c.candidate_score, c.baseline_passed, c.candidate_passed) for c in reply.changes]
    assert changes == [
        (2, 2, "chrf", 6.0, 3.0, True, False),  # regressions, largest change first
        (1, 1, "helpfulness", 8.0, 5.0, True, False),
        (0, 0, "chrf", 2.0, 5.0, False, True),  # improvements
        (0, 0, "helpfulness", 7.0, 9.0, True, True),  # then by |score change|
        (4, 4, "chrf", 9.0, 10.0, True, True),
        (3, 3, "chrf", 3.0, 3.5, False, False)]
    limited = await compare(query_stub, md, run_id=run_id, max_changes=2)
    assert [c.sample_index for c in limited.changes] == [2, 1]


async def test_epoch_choices_and_best(stack, writer_stub, query_stub):
    md = stack.metadata("cmp-best")
    items = [item(e * 10, s, epoch=e) for e in (1, 2, 3) for s in range(2)]
    run_id = await write_run(stack, writer_stub, "cmp-best", items)
    means = {1: [4.0, 4.0], 2: [6.0, 8.0], 3: [7.0, 7.0]}  # 2 and 3 tie at 7: 2 is best
    rows = [r for e, v in means.items() for r in scores(run_id, "cmp-best", e, e * 10, v)]
    rows += scores(run_id, "cmp-best", 1, 10, [9.0, 9.0], criterion="clarity",
                   judge_type=LLM, judge_model=LLM_MODEL)
    await insert_rows(stack, judgments_table, rows)
    best = await compare(query_stub, md, run_id=run_id, epoch=3,
                         baseline_choice=query_pb2.EPOCH_CHOICE_BEST, best_criterion="chrf")
    last = await compare(query_stub, md, run_id=run_id, epoch=1,
                         baseline_choice=query_pb2.EPOCH_CHOICE_LAST)
    named = await compare(query_stub, md, run_id=run_id, epoch=2, baseline_epoch=2)
    by_clarity = await compare(query_stub, md, run_id=run_id,
                               baseline_choice=query_pb2.EPOCH_CHOICE_BEST,
                               best_criterion="clarity")
    assert [(r.epoch, r.baseline_epoch) for r in (best, last, named, by_clarity)] == [
        (3, 2), (1, 3), (2, 2), (3, 1)]
    assert [(d.mean_delta, d.unchanged_count) for d in named.deltas] == [(0.0, 2)]
    assert list(named.changes) == []
    assert [d.criterion for d in by_clarity.deltas] == ["chrf"]  # clarity: epoch 1 only


async def test_another_run_matched_by_prompt_and_reference(stack, writer_stub, query_stub):
    md = stack.metadata("cmp-x")
    candidate = await two_epoch_run(stack, writer_stub, "cmp-x")
    # baseline: samples 0..4 of the candidate in reverse order, one with another reference,
    # and one prompt the candidate does not have; its last epoch (2) is the default.
    keyed = [(4, "prompt 0", "truth 0"), (3, "prompt 1", "truth 1"),
             (2, "prompt 2", "other truth"), (1, "prompt 3", "truth 3"),
             (0, "prompt 4", "truth 4"), (5, "prompt 9", "truth 9")]
    items = [item(e * 7, s, epoch=e, prompt=p, ground_truth=t) for e in (1, 2)
             for s, p, t in keyed]
    baseline = await write_run(stack, writer_stub, "cmp-x", items)
    base_scores = {4: 1.0, 3: 5.0, 2: 6.0, 1: 3.0, 0: 9.0, 5: 2.0}
    await insert_rows(stack, judgments_table, scores(
        baseline, "cmp-x", 2, 14, [base_scores[s] for s in range(6)]))
    reply = await compare(query_stub, md, run_id=candidate, baseline_run_id=baseline)
    assert (reply.epoch, reply.baseline_run_id, reply.baseline_epoch, reply.shared_samples) == (
        2, baseline, 2, 4)
    (chrf,) = reply.deltas
    assert chrf.paired_count == 4  # candidate samples 0, 1, 3, 4 (2 has another reference)
    assert (chrf.baseline_mean, chrf.candidate_mean) == ((1 + 5 + 3 + 9) / 4,
                                                         (5 + 5 + 3.5 + 10) / 4)
    assert (chrf.improved_count, chrf.regressed_count, chrf.unchanged_count) == (3, 0, 1)
    pairs = sorted((c.sample_index, c.baseline_sample_index) for c in reply.changes)
    assert pairs == [(0, 4), (3, 1), (4, 0)]


async def test_intervals_agree_with_scipy_bootstrap(stack, writer_stub, query_stub):
    md = stack.metadata("cmp-ci")
    n = 40
    rng = np.random.default_rng(7)
    first, second = rng.integers(0, 11, n).astype(float), rng.integers(2, 11, n).astype(float)
    items = [item(e * 10, s, epoch=e) for e in (1, 2) for s in range(n)]
    run_id = await write_run(stack, writer_stub, "cmp-ci", items)
    await insert_rows(stack, judgments_table, scores(run_id, "cmp-ci", 1, 10, first)
                      + scores(run_id, "cmp-ci", 2, 20, second))
    (delta,) = (await compare(query_stub, md, run_id=run_id)).deltas
    diff = second - first
    assert delta.mean_delta == pytest.approx(diff.mean())
    assert (delta.mean_delta_low, delta.mean_delta_high) == pytest.approx(interval(diff))
    theirs = scipy_stats.bootstrap((second, first), lambda a, b: np.mean(a - b), paired=True,
                                   vectorized=False, n_resamples=9999, confidence_level=LEVEL,
                                   method="percentile", rng=np.random.default_rng(1))
    spread = diff.std() / np.sqrt(n)
    assert delta.mean_delta_low == pytest.approx(theirs.confidence_interval.low, abs=spread / 4)
    assert delta.mean_delta_high == pytest.approx(theirs.confidence_interval.high,
                                                  abs=spread / 4)
    assert delta.mean_delta_low < delta.mean_delta < delta.mean_delta_high


async def invalid(call) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return field_violations(rich_status(err.value))


async def test_bad_requests_name_the_field(stack, writer_stub, query_stub):
    md = stack.metadata("cmp-bad")
    run_id = await two_epoch_run(stack, writer_stub, "cmp-bad")
    cases = [({"run_id": "nope"}, "run_id"), ({"run_id": ""}, "run_id"),
             ({"run_id": run_id, "baseline_run_id": "x"}, "baseline_run_id"),
             ({"run_id": run_id, "epoch": -1}, "epoch"),
             ({"run_id": run_id, "baseline_epoch": -2}, "baseline_epoch"),
             ({"run_id": run_id, "max_changes": -1}, "max_changes"),
             ({"run_id": run_id, "baseline_choice": query_pb2.EPOCH_CHOICE_BEST},
              "best_criterion"),
             ({"run_id": run_id, "epoch": 7}, "epoch"),
             ({"run_id": run_id, "baseline_epoch": 3}, "baseline_epoch"),
             ({"run_id": run_id, "baseline_choice": query_pb2.EPOCH_CHOICE_BEST,
               "best_criterion": "nothing"}, "best_criterion")]
    for request, field in cases:
        violations = await invalid(compare(query_stub, md, **request))
        assert field in violations, (request, violations)


async def test_another_users_run_on_either_side_is_not_found(stack, writer_stub, query_stub):
    mine = await two_epoch_run(stack, writer_stub, "cmp-owner")
    theirs = await two_epoch_run(stack, writer_stub, "cmp-other")
    md = stack.metadata("cmp-owner")
    for request in ({"run_id": theirs}, {"run_id": mine, "baseline_run_id": theirs},
                    {"run_id": theirs, "baseline_run_id": mine}):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await compare(query_stub, md, **request)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_empty_run_and_sample_limit_are_failed_preconditions(stack, writer_stub):
    md = stack.metadata("cmp-limit")
    empty = await create_run(writer_stub, md)
    run_id = await two_epoch_run(stack, writer_stub, "cmp-limit")
    server = await own_query(stack, compare_max_samples=4)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = query_pb2_grpc.QueryServiceStub(channel)
            for request in ({"run_id": empty.id}, {"run_id": run_id}):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await compare(stub, md, **request)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "compare_max_samples" in err.value.details()
    finally:
        await server.stop(0)
