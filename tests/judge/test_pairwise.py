"""Pairwise judging (judge.pairwise) on the real stack: writer -> outbox -> judge -> query,
on PostgreSQL (row-level security on, each service as its own role) and on SQLite, with the
real OpenAI SDK against the local fake server of tests/judge/fake_llm.py.

The fake judge here is POSITION-BIASED: shown two responses of equal quality it always
answers "A" (the first shown); otherwise it picks the truly better one. Asked in one order
only, equal pairs would count as losses (baseline shown first) or as wins (candidate first);
asked in both orders they are ties, flagged as position-biased. The tests assert the stored
outcomes per pair, the counts and the win rate with its Wilson interval computed here with
scipy, the budget stop, config errors with their field paths, isolation between users, and
that a repeated enqueue or a worker killed mid-batch never judges a pair twice.
"""

import asyncio
import json
import math
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from scipy import stats
from sqlalchemy import text

from epochlens.v1 import (
    common_pb2,
    judge_pb2,
    judge_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    writer_pb2,
    writer_pb2_grpc,
)
from services.common.auth import mint_token
from services.common.convert import dict_to_struct
from services.common.migrations import alembic_config
from services.common.server import RunningServer
from services.judge.llm.budget import RunBudget
from services.judge.llm.settings import ModelPrice
from services.judge.models import JudgeBase
from services.judge.pairwise import store as pairwise_store
from services.judge.pairwise.models import Outcome
from services.judge.pairwise.worker import PairwiseWorkers, pair_outcome
from services.judge.schema import Item, JudgeConfig
from services.judge.server import start as start_judge
from services.judge.store import TaskState
from services.query.config import QuerySettings
from services.query.pairwise import wilson_interval
from services.query.server import start as start_query
from services.writer.config import WriterSettings
from services.writer.server import start as start_writer
from tests.cli.test_views import cli, ok, rows
from tests.conftest import PAGE_SECRET, READER_ROLE, WRITER_ROLE, pg_url
from tests.helpers import field_violations, rich_status
from tests.judge.conftest import JudgeDb
from tests.judge.fake_llm import FakeLlmServer, Recorded, Reply, server_error

ALICE, BOB = "alice", "bob"
MODEL = "judge-model"
# Fake usage: 500 input tokens at $2/Mtok + 100 output tokens at $10/Mtok = $0.002 per call.
PRICE = ModelPrice(input_per_mtok=2.0, output_per_mtok=10.0)
CALL_COST = 0.002
LEVEL = 0.95
SECTION = re.compile(r"<response_(a|b)>\n(.*?)\n</response_\1>", re.DOTALL)
QUALITY = re.compile(r"\[q=(\d+)\]")
PAIRWISE = {"provider": "openai", "model": MODEL}


class BiasedJudge(FakeLlmServer):
    """Answers pairwise prompts by the [q=N] marker of each response: the higher wins; equal
    quality: always "A", the first shown (position bias)."""

    def default_reply(self, record: Recorded) -> Reply:
        shown = dict(SECTION.findall(record.text))
        first, second = (int(QUALITY.search(shown[k]).group(1)) for k in ("a", "b"))
        preferred = "A" if first >= second else "B"
        return Reply(verdict={"preferred": preferred, "reason": f"{first} vs {second}"})

    def pairwise_calls(self) -> int:
        return sum(1 for r in self.requests if "<response_a>" in r.text)


@dataclass
class World:
    db: JudgeDb
    fake: BiasedJudge
    auth: Any
    judge: RunningServer
    writer: RunningServer
    query: RunningServer
    channels: list[grpc.aio.Channel]

    def md(self, user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {mint_token(self.auth, user)}"),)

    def _stub(self, server: RunningServer, cls: Any) -> Any:
        self.channels.append(grpc.aio.insecure_channel(server.address))
        return cls(self.channels[-1])

    @property
    def writer_stub(self) -> writer_pb2_grpc.PredictionWriterServiceStub:
        return self._stub(self.writer, writer_pb2_grpc.PredictionWriterServiceStub)

    @property
    def judge_stub(self) -> judge_pb2_grpc.JudgeServiceStub:
        return self._stub(self.judge, judge_pb2_grpc.JudgeServiceStub)

    @property
    def query_stub(self) -> query_pb2_grpc.QueryServiceStub:
        return self._stub(self.query, query_pb2_grpc.QueryServiceStub)

    def run_key(self, run_id: str) -> Any:
        return uuid.UUID(run_id) if self.db.backend == "postgres" else uuid.UUID(run_id).hex


def judge_settings(db: JudgeDb, fake: FakeLlmServer, **overrides: Any) -> Any:
    values = {"worker_count": 1, "pairwise_worker_count": 1, "idle_poll_s": 0.05,
              "retry_backoff_base_s": 0.1, "retry_backoff_max_s": 0.3,
              "llm_transient_retry_base_s": 0.1, "max_attempts": 3,
              "openai_api_key": "operator-openai-key", "openai_base_url": fake.openai_url,
              "anthropic_api_key": "operator-anthropic-key",
              "anthropic_base_url": fake.anthropic_url,
              "llm_endpoints": {"local": {"base_url": fake.openai_url}},
              "llm_prices": {MODEL: PRICE}, "llm_backoff_base_s": 0.01,
              "llm_backoff_max_s": 0.05, "llm_request_timeout_s": 5.0,
              "llm_default_budget_usd": 100.0, **overrides}
    return db.settings(**values)


@pytest.fixture
async def world(judge_db: JudgeDb, auth_settings) -> AsyncIterator[World]:
    """Judge (its OpenAI provider the biased fake), writer (handing off to that judge) and
    query servers on judge_db; the pairwise tables emptied first."""
    async with judge_db.admin.begin() as conn:
        for table in ("pairwise_results", "pairwise_tasks"):
            await conn.exec_driver_sql(f"DELETE FROM judge.{table}")
    fake = BiasedJudge().start()
    common: dict[str, Any] = {"port": 0, "shutdown_grace_s": 0.5, "_env_file": None}
    if judge_db.database is None:
        common["sqlite_dir"] = judge_db.sqlite_dir
    url = (lambda role: pg_url(role, judge_db.database)) if judge_db.database else (
        lambda role: None)
    judge = await start_judge(judge_settings(judge_db, fake), auth_settings)
    writer = await start_writer(WriterSettings(
        database_url=url(WRITER_ROLE), judge_address=judge.address, outbox_poll_s=0.05,
        outbox_backoff_base_s=0.1, outbox_backoff_max_s=1.0, **common), auth_settings)
    query = await start_query(QuerySettings(database_url=url(READER_ROLE),
                                            page_token_secret=PAGE_SECRET, **common),
                              auth_settings)
    world = World(judge_db, fake, auth_settings, judge, writer, query, [])
    try:
        yield world
    finally:
        for channel in world.channels:
            await channel.close()
        for server in (writer, query, judge):
            await server.stop(0.5)
        fake.stop()


def prediction(epoch: int, sample: int, quality: int, prompt: str | None = None,
               step: int | None = None) -> common_pb2.PredictionInput:
    return common_pb2.PredictionInput(
        epoch=epoch, step=epoch * 10 if step is None else step, sample_index=sample,
        prompt=prompt or f"question {sample}", ground_truth=f"answer {sample}",
        prediction=f"response of epoch {epoch} to {sample} [q={quality}]",
        generation_time_ms=1.0)


async def create_run(world: World, user: str, judge: dict[str, Any], name: str = "run") -> str:
    run = await world.writer_stub.CreateRun(writer_pb2.CreateRunRequest(
        name=name, model_name="m", dataset_name="d",
        config=dict_to_struct({"judge": judge})), metadata=world.md(user))
    return run.id


async def write(world: World, user: str, run_id: str,
                predictions: list[common_pb2.PredictionInput]) -> None:
    await world.writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run_id, predictions=predictions), metadata=world.md(user))


async def wait_until(check: Callable[[], Awaitable[bool]], what: str,
                     timeout_s: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def pairs_done(world: World, run_id: str, count: int) -> None:
    key = world.run_key(run_id)

    async def done() -> bool:
        return await world.db.scalar(
            "SELECT count(*) FROM judge.pairwise_tasks WHERE run_id = :r AND state = :s",
            r=key, s=int(TaskState.DONE)) == count
    await wait_until(done, f"{count} pairwise tasks done")


async def results(world: World, run_id: str) -> dict[tuple[int, int], Any]:
    rows = await world.db.rows(
        "SELECT * FROM judge.pairwise_results WHERE run_id = :r", r=world.run_key(run_id))
    return {(row.epoch, row.sample_index): row for row in rows}


def expected_interval(wins: int, losses: int, ties: int) -> tuple[float, float, float]:
    """Win rate and Wilson interval computed here (scipy's normal quantile)."""
    n = wins + losses + ties
    p = (wins + ties / 2) / n
    z = stats.norm.ppf(0.5 + LEVEL / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, centre - half, centre + half


async def summary(world: World, user: str, run_id: str) -> query_pb2.RunSummary:
    return await world.query_stub.GetRunSummary(query_pb2.GetRunSummaryRequest(run_id=run_id),
                                                metadata=world.md(user))


# Epoch 0 (the baseline) has quality 5 everywhere. Epoch 1: 4 better, 2 equal, 2 worse;
# epoch 2: 6 better, 1 equal, 1 worse.
EPOCH_QUALITY = {0: [5] * 8, 1: [7, 7, 7, 7, 5, 5, 3, 3], 2: [9] * 6 + [5, 1]}
EXPECTED = {1: (4, 2, 2), 2: (6, 1, 1)}  # wins, losses, ties (= position-biased pairs)


async def test_epochs_against_epoch_0_cancel_position_bias(world, tmp_path):
    run_id = await create_run(world, ALICE, {"pairwise": PAIRWISE})
    for epoch, qualities in EPOCH_QUALITY.items():
        await write(world, ALICE, run_id, [prediction(epoch, s, q)
                                           for s, q in enumerate(qualities)])
    await pairs_done(world, run_id, 16)
    stored = await results(world, run_id)
    assert len(stored) == 16 and world.fake.pairwise_calls() == 32
    for (epoch, sample), row in stored.items():
        quality, base = EPOCH_QUALITY[epoch][sample], 5
        want = (Outcome.WIN if quality > base else Outcome.LOSS if quality < base
                else Outcome.TIE)
        assert (row.outcome, row.position_bias) == (want, quality == base), (epoch, sample)
        assert (row.baseline_epoch, row.baseline_step, row.baseline_sample_index) == (0, 0,
                                                                                     sample)
        assert row.cost_usd == pytest.approx(2 * CALL_COST)
        if quality == base:  # the bias: "A" in both orders
            assert (row.answer_1, row.answer_2) == ("A", "A")
    got = (await summary(world, ALICE, run_id)).pairwise
    assert [(s.epoch, s.wins, s.losses, s.ties, s.position_bias_pairs, s.unscored)
            for s in got] == [(e, w, lo, t, t, 0) for e, (w, lo, t) in EXPECTED.items()]
    for entry, (wins, losses, ties) in zip(got, EXPECTED.values(), strict=True):
        rate, low, high = expected_interval(wins, losses, ties)
        assert (entry.win_rate, entry.win_rate_low, entry.win_rate_high) == pytest.approx(
            (rate, low, high), abs=1e-9)
        assert (entry.baseline_run_id, entry.baseline_epoch) == (run_id, 0)
        assert (entry.criterion, entry.judge_model) == ("preference", f"openai/{MODEL}")
        assert entry.cost_usd == pytest.approx(2 * CALL_COST * 8)
    # One order alone would be biased: order 1 (baseline shown first) counts the equal pairs
    # as losses, order 2 (candidate first) as wins; the stored outcomes count them as ties.
    epoch_1 = [row for (epoch, _), row in stored.items() if epoch == 1]
    only_first = sum(row.answer_1 == "B" for row in epoch_1) / 8
    only_second = sum(row.answer_2 == "A" for row in epoch_1) / 8
    assert (only_first, only_second, got[0].win_rate) == (0.5, 0.75, 0.625)
    await check_cli_and_report(world, run_id, got, tmp_path)


async def check_cli_and_report(world: World, run_id: str,
                               got: list[judge_pb2.PairwiseSummary], tmp_path) -> None:
    """`epochlens summary` (table and --json) and the HTML report show the same figures."""
    stack = SimpleNamespace(query=world.query, auth=world.auth)
    want = [{"epoch": s.epoch, "wins": s.wins, "losses": s.losses, "ties": s.ties,
             "win_rate": s.win_rate, "win_rate_low": s.win_rate_low,
             "position_bias_pairs": s.position_bias_pairs} for s in got]
    data = json.loads(ok(await cli(stack, ALICE, "summary", run_id, "--json")))
    assert [{k: p[k] for k in want[0]} for p in data["pairwise"]] == want
    table = ok(await cli(stack, ALICE, "summary", run_id))
    first = rows(table, "1")[-1]
    assert first[:5] == ["1", "epoch 0", "preference", f"openai/{MODEL}", "4/2/2"]
    low, high = (f"{100 * v:.1f}%" for v in (got[0].win_rate_low, got[0].win_rate_high))
    assert first[6:8] == [f"62.5% [{low}, {high}]", "2"]
    output = tmp_path / "report.html"
    ok(await cli(stack, ALICE, "report", run_id, "-o", str(output)))
    page = output.read_text()
    embedded = json.loads(page.split('id="report-data">', 1)[1].split("</script>", 1)[0])
    assert [(p["epoch"], p["wins"], p["losses"], p["ties"]) for p in embedded["pairwise"]] == [
        (s.epoch, s.wins, s.losses, s.ties) for s in got]
    assert 'id="pairwise-section"' in page and "renderPairwise" in page


async def test_repeated_enqueue_judges_no_pair_twice(world):
    run_id = await create_run(world, ALICE, {"pairwise": PAIRWISE})
    batch = [prediction(e, s, q) for e in (0, 1) for s, q in enumerate(EPOCH_QUALITY[e])]
    await write(world, ALICE, run_id, batch)
    await pairs_done(world, run_id, 8)
    calls = world.fake.pairwise_calls()
    assert calls == 16
    await write(world, ALICE, run_id, batch)  # a replayed batch: duplicates
    items = [judge_pb2.JudgeItem(
        prediction=judge_pb2.PredictionRef(run_id=run_id, step=p.step,
                                           sample_index=p.sample_index),
        epoch=p.epoch, prompt=p.prompt, ground_truth=p.ground_truth,
        prediction_text=p.prediction) for p in batch]
    again = await world.judge_stub.EnqueueJudging(judge_pb2.EnqueueJudgingRequest(
        run_id=run_id, config=dict_to_struct({"pairwise": PAIRWISE}), items=items),
        metadata=world.md(ALICE))
    assert again.enqueued_count == 0
    await asyncio.sleep(0.5)
    assert world.fake.pairwise_calls() == calls
    assert len(await results(world, run_id)) == 8
    assert await world.db.scalar("SELECT count(*) FROM judge.pairwise_tasks WHERE run_id = :r",
                                 r=world.run_key(run_id)) == 8


async def test_baseline_run_matched_by_prompt_and_reference(world):
    baseline = await create_run(world, ALICE, {}, name="checkpoint A")
    prompts = [f"evaluate {i}" for i in range(6)]
    await write(world, ALICE, baseline, [prediction(0, i, 5, prompt=p)
                                         for i, p in enumerate(prompts)])
    config = {"pairwise": {**PAIRWISE, "baseline_run_id": baseline, "criterion": "quality",
                           "rubric": "Which response is better?"}}
    candidate = await create_run(world, ALICE, config, name="checkpoint B")
    # The candidate holds the same prompts in another order (sample i = prompt 5 - i); its
    # references match because prediction() derives them from the sample index: rebuild them.
    qualities = [8, 8, 5, 2, 8, 5]
    rows = []
    for i, quality in enumerate(qualities):
        source = 5 - i
        row = prediction(0, i, quality, prompt=prompts[source])
        row.ground_truth = f"answer {source}"
        rows.append(row)
    await write(world, ALICE, candidate, rows)
    await pairs_done(world, candidate, 6)
    stored = await results(world, candidate)
    assert {key: (row.baseline_sample_index, row.outcome) for key, row in stored.items()} == {
        (0, i): (5 - i, Outcome.WIN if q > 5 else Outcome.LOSS if q < 5 else Outcome.TIE)
        for i, q in enumerate(qualities)}
    [entry] = (await summary(world, ALICE, candidate)).pairwise
    assert (entry.baseline_run_id, entry.baseline_epoch, entry.criterion) == (baseline, 0,
                                                                               "quality")
    assert (entry.wins, entry.losses, entry.ties, entry.position_bias_pairs) == (3, 1, 2, 2)
    rate, low, high = expected_interval(3, 1, 2)
    assert (entry.win_rate, entry.win_rate_low, entry.win_rate_high) == pytest.approx(
        (rate, low, high), abs=1e-9)
    assert "Which response is better?" in world.fake.requests[0].text


async def test_budget_stops_pairwise_calls(world):
    budget = 0.02
    config = {"llm": {"provider": "openai", "model": MODEL, "criteria": [], "concurrency": 1,
                      "budget_usd": budget}, "pairwise": PAIRWISE}
    run_id = await create_run(world, ALICE, config)
    await write(world, ALICE, run_id, [prediction(e, s, q) for e in (0, 1)
                                       for s, q in enumerate(EPOCH_QUALITY[e])])
    await pairs_done(world, run_id, 8)
    stored = list((await results(world, run_id)).values())
    calls = world.fake.pairwise_calls()
    spent = await world.db.scalar("SELECT spent_usd FROM judge.run_llm_state WHERE run_id = :r",
                                  r=world.run_key(run_id))
    scored = [r for r in stored if r.outcome != Outcome.UNSCORED]
    unscored = [r for r in stored if r.outcome == Outcome.UNSCORED]
    assert 0 < len(scored) < 8 and len(scored) == calls // 2, [
        (r.answer_1, r.answer_2, r.unscored_reason) for r in stored]
    assert spent == pytest.approx(calls * CALL_COST) and spent <= budget
    assert sum(r.cost_usd for r in stored) == pytest.approx(spent)
    assert all("budget exhausted" in r.unscored_reason for r in unscored)
    [entry] = (await summary(world, ALICE, run_id)).pairwise
    assert (entry.wins + entry.losses + entry.ties, entry.unscored) == (len(scored),
                                                                        len(unscored))
    # A larger budget, then ResumeJudging: the unscored pairs (only those) are judged again.
    async with world.db.admin.begin() as conn:
        await conn.execute(text("UPDATE judge.run_llm_state SET budget_usd = 1.0, "
                                "budget_exhausted = false WHERE run_id = :r"),
                           {"r": world.run_key(run_id)})
    resumed = await world.judge_stub.ResumeJudging(judge_pb2.ResumeJudgingRequest(
        run_id=run_id, rejudge_unscored=True), metadata=world.md(ALICE))
    assert (resumed.deleted_unscored, resumed.requeued_predictions) == (len(unscored),
                                                                        len(unscored))
    await wait_until(lambda: _all_scored(world, run_id), "every pair scored")
    assert world.fake.pairwise_calls() == calls + 2 * len(unscored)
    [entry] = (await summary(world, ALICE, run_id)).pairwise
    assert (entry.wins, entry.losses, entry.ties, entry.unscored) == (*EXPECTED[1], 0)


async def _all_scored(world: World, run_id: str) -> bool:
    stored = await results(world, run_id)
    return len(stored) == 8 and all(r.outcome != Outcome.UNSCORED for r in stored.values())


@pytest.mark.parametrize("provider", ["anthropic", "openai_compatible"])
async def test_other_providers_and_unusable_answers(world, provider):
    """Anthropic (forced tool call) and an OpenAI-compatible endpoint; an answer that is not
    exactly {"preferred", "reason"} leaves its pair unscored, never a loss."""
    section = {"provider": provider, "model": MODEL,
               **({"endpoint": "local"} if provider == "openai_compatible" else {})}
    run_id = await create_run(world, ALICE, {"pairwise": section})
    await write(world, ALICE, run_id, [prediction(0, s, 5) for s in range(4)])
    for done, bad in enumerate((Reply(verdict={"preferred": "C", "reason": "neither"}),
                                Reply(text="A is better, clearly.")), 1):
        world.fake.script(bad)
        await write(world, ALICE, run_id, [prediction(1, done - 1, 7)])
        await pairs_done(world, run_id, done)
    await write(world, ALICE, run_id, [prediction(1, 2, 7), prediction(1, 3, 3)])
    await pairs_done(world, run_id, 4)
    stored = await results(world, run_id)
    assert [stored[(1, s)].outcome for s in range(4)] == [Outcome.UNSCORED, Outcome.UNSCORED,
                                                          Outcome.WIN, Outcome.LOSS]
    assert stored[(1, 0)].unscored_reason.startswith("order 1: unparseable reply: preferred")
    assert stored[(1, 1)].unscored_reason.startswith("order 1: unparseable reply: ")
    assert world.fake.pairwise_calls() == 6  # order 2 of an unusable pair is not asked
    paths = {r.path.rstrip("/").rsplit("/", 1)[-1] for r in world.fake.requests}
    assert paths == ({"messages"} if provider == "anthropic" else {"completions"})
    [entry] = (await summary(world, ALICE, run_id)).pairwise
    assert (entry.wins, entry.losses, entry.ties, entry.unscored) == (1, 1, 0, 2)
    # llm_prices names the model alone: every provider's calls are priced, 6 of them.
    assert (entry.judge_model, entry.cost_usd) == (f"{provider}/{MODEL}",
                                                   pytest.approx(6 * CALL_COST))


async def expect_invalid(call: Awaitable) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return field_violations(rich_status(caught.value))


async def test_config_errors_name_their_fields(world):
    bad = {"provider": "other", "model": MODEL, "sample_rate": 2, "baseline_epoch": -1,
           "base_url": "http://evil.example/v1", "colour": "red"}
    violations = await expect_invalid(create_run(world, ALICE, {"pairwise": bad}))
    prefix = "config.judge.pairwise"
    assert {f"{prefix}.{name}" for name in ("provider", "sample_rate", "baseline_epoch",
                                            "base_url", "colour")} <= set(violations)
    checks = {"rubric": ({**PAIRWISE, "rubric": "x" * 5000}, "rubric"),
              "endpoint": ({**PAIRWISE, "endpoint": "local"}, "endpoint"),
              "compatible": ({**PAIRWISE, "provider": "openai_compatible"}, "endpoint"),
              "criterion": ({**PAIRWISE, "criterion": ""}, "criterion"),
              "price": ({**PAIRWISE, "model": "unpriced-model"}, "model")}
    for name, (section, field) in checks.items():
        found = await expect_invalid(world.judge_stub.ValidateJudgeConfig(
            judge_pb2.ValidateJudgeConfigRequest(config=dict_to_struct({"pairwise": section})),
            metadata=world.md(ALICE)))
        assert f"config.pairwise.{field}" in found, (name, found)
    estimate = await world.judge_stub.EstimateCost(judge_pb2.EstimateCostRequest(
        config=dict_to_struct({"pairwise": PAIRWISE}), prediction_count=10,
        average_item_tokens=100), metadata=world.md(ALICE))
    assert (estimate.llm_calls, estimate.judge_model) == (20, f"openai/{MODEL}")
    assert estimate.cost_usd > 0 and estimate.input_tokens > 20 * 200


async def test_another_users_baseline_run_is_refused_like_a_missing_one(world):
    bobs = await create_run(world, BOB, {}, name="bob's")
    await write(world, BOB, bobs, [prediction(0, 0, 5)])
    missing = str(uuid.uuid4())
    for baseline in (bobs, missing):
        violations = await expect_invalid(create_run(world, ALICE, {"pairwise": {
            **PAIRWISE, "baseline_run_id": baseline}}))
        assert violations == {"config.judge.pairwise.baseline_run_id":
                              f"run {baseline} not found"}
    # Enqueued directly (not through CreateRun), the same answer, and nothing queued.
    alices = await create_run(world, ALICE, {})
    violations = await expect_invalid(world.judge_stub.EnqueueJudging(
        judge_pb2.EnqueueJudgingRequest(
            run_id=alices, config=dict_to_struct({"pairwise": {**PAIRWISE,
                                                               "baseline_run_id": bobs}}),
            items=[judge_pb2.JudgeItem(prediction=judge_pb2.PredictionRef(
                run_id=alices, step=0, sample_index=0), epoch=0, prompt="question 0",
                prediction_text="x")]), metadata=world.md(ALICE)))
    assert violations == {"config.pairwise.baseline_run_id": f"run {bobs} not found"}
    assert await world.db.scalar("SELECT count(*) FROM judge.pairwise_tasks") == 0
    # Bob cannot read Alice's pairwise summaries.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await summary(world, BOB, alices)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_missing_baseline_waits_then_is_unscored(world):
    # Baseline epoch 3 never arrives: each task waits (the queue's backoff), then is stored
    # unscored with the reason after max_attempts (3); no call is made.
    run_id = await create_run(world, ALICE, {"pairwise": {**PAIRWISE, "baseline_epoch": 3}})
    await write(world, ALICE, run_id, [prediction(1, s, 5) for s in range(2)])
    await pairs_done(world, run_id, 2)
    stored = list((await results(world, run_id)).values())
    assert [r.outcome for r in stored] == [Outcome.UNSCORED] * 2
    assert all("no baseline response at epoch 3" in r.unscored_reason for r in stored)
    assert world.fake.pairwise_calls() == 0
    attempts = await world.db.rows("SELECT attempts FROM judge.pairwise_tasks WHERE run_id = :r",
                                   r=world.run_key(run_id))
    assert [a for (a,) in attempts] == [3, 3]


async def test_a_worker_killed_mid_batch_judges_each_pair_once(judge_db, auth_settings):
    """A worker that claimed and died (its calls made, nothing stored): after the lease the
    pairs are claimed again (order 1's kept answer reused) and stored once; a second settle
    of the same pair adds nothing."""
    fake = BiasedJudge().start()
    settings = judge_settings(judge_db, fake, pairwise_worker_count=0, lease_s=0.5)
    user, run_id = ALICE, uuid.uuid4()
    async with judge_db.admin.begin() as conn:
        for table in ("pairwise_results", "pairwise_tasks"):
            await conn.exec_driver_sql(f"DELETE FROM judge.{table}")
    qualities = {0: [5, 5, 5, 5], 1: [7, 7, 5, 5]}
    items = [Item(run_id=run_id, step=e * 10, sample_index=s, epoch=e, prompt=f"question {s}",
                  ground_truth=None, prediction=f"r{e} [q={q}]")
             for e in (0, 1) for s, q in enumerate(qualities[e])]
    await judge_db.create_run(user, run_id, items)
    engine = judge_db.engine()
    dead, alive = PairwiseWorkers(settings, engine), PairwiseWorkers(settings, engine)
    try:
        config = {"pairwise": PAIRWISE}
        parsed = JudgeConfig.model_validate(config).pairwise
        assert await pairwise_store.enqueue(engine, user, run_id, items, config, parsed) == 4
        claimed = await dead.claim()
        assert len(claimed) == 4
        settled = await dead.judge(claimed)  # the calls are made; the worker dies here
        await asyncio.sleep(0.6)
        assert await alive.run_once() == 4
        assert await alive.run_once() == 0
        assert await dead._store.settle(user, settled) == 0  # too late: nothing stored
        rows = await judge_db.rows("SELECT outcome FROM judge.pairwise_results")
        assert sorted(o for (o,) in rows) == [Outcome.WIN, Outcome.WIN, Outcome.TIE,
                                              Outcome.TIE]
        # 8 by the dead worker; after it only order 2 of each pair: order 1's answer, charged,
        # was kept on its task.
        assert fake.pairwise_calls() == 12
    finally:
        await dead.close()
        await alive.close()
        await engine.dispose()
        fake.stop()


async def _direct(judge_db: JudgeDb, fake: FakeLlmServer, qualities: dict[int, list[int]],
                  config: dict[str, Any], **overrides: Any) -> tuple[Any, Any, uuid.UUID]:
    """(settings, engine, run_id): a run of ALICE with predictions of `qualities` per epoch,
    its pairwise tasks queued under `config`, for workers driven by hand (none started)."""
    settings = judge_settings(judge_db, fake, pairwise_worker_count=0, **overrides)
    async with judge_db.admin.begin() as conn:
        for table in ("pairwise_results", "pairwise_tasks"):
            await conn.exec_driver_sql(f"DELETE FROM judge.{table}")
    run_id = uuid.uuid4()
    items = [Item(run_id=run_id, step=e * 10, sample_index=s, epoch=e, prompt=f"question {s}",
                  ground_truth=None, prediction=f"r{e} [q={q}]")
             for e, per_sample in qualities.items() for s, q in enumerate(per_sample)]
    await judge_db.create_run(ALICE, run_id, items)
    engine = judge_db.engine()
    parsed = JudgeConfig.model_validate(config).pairwise
    queued = await pairwise_store.enqueue(engine, ALICE, run_id, items, config, parsed)
    assert queued == sum(len(q) for e, q in qualities.items() if e != min(qualities))
    return settings, engine, run_id


async def test_budget_end_never_pays_half_a_pair(judge_db, auth_settings):
    """A budget that holds exactly 3 calls (input free, output priced, so a call's most cost
    is what the fake bills): one pair gets both its calls, the next pairs none (no third
    call at the server), unscored with the budget reason; the budget is not overspent."""
    fake = BiasedJudge().start()
    call_cost = 100 * 10.0 / 1e6  # the fake's 100 output tokens at $10/Mtok
    config = {"llm": {"provider": "openai", "model": MODEL, "criteria": [], "concurrency": 1,
                      "budget_usd": 3 * call_cost}, "pairwise": PAIRWISE}
    settings, engine, run_id = await _direct(
        judge_db, fake, {0: [5, 5, 5], 1: [7, 7, 7]}, config,
        llm_prices={MODEL: ModelPrice(input_per_mtok=0.0, output_per_mtok=10.0)},
        llm_max_output_tokens=100)
    workers = PairwiseWorkers(settings, engine)
    try:
        assert await workers.run_once() == 3
        assert fake.pairwise_calls() == 2
        stored = await judge_db.rows("SELECT outcome, answer_2, unscored_reason, cost_usd "
                                     "FROM judge.pairwise_results ORDER BY outcome")
        assert [r.outcome for r in stored] == [Outcome.WIN] + [Outcome.UNSCORED] * 2
        assert all(r.unscored_reason.startswith("order 1: budget exhausted")
                   for r in stored[1:]), [r.unscored_reason for r in stored]
        assert [r.cost_usd for r in stored] == pytest.approx([2 * call_cost, 0.0, 0.0])
        state = (await judge_db.rows(
            "SELECT spent_usd, reserved_usd, budget_exhausted FROM judge.run_llm_state "
            "WHERE run_id = :r", r=run_id if judge_db.backend == "postgres" else run_id.hex))
        assert [tuple(r) for r in state] == [(pytest.approx(2 * call_cost),
                                              pytest.approx(0.0), True)]
    finally:
        await workers.close()
        await engine.dispose()
        fake.stop()


STALL_S = 2.0


class StallingJudge(BiasedJudge):
    """BiasedJudge whose first order-2 call stalls STALL_S, then is dropped unanswered (a
    worker is killed in it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = False

    def default_reply(self, record: Recorded) -> Reply:
        reply = super().default_reply(record)
        if _order(record) == 2 and not self.stalled:
            self.stalled = True
            return replace(reply, latency_s=STALL_S, drop=True)
        return reply


def _order(record: Recorded) -> int:
    """Which order a pairwise call asks: order 1 shows the baseline (epoch 0) as A."""
    return 1 if dict(SECTION.findall(record.text))["a"].startswith("r0 ") else 2


async def test_a_worker_killed_after_order_1_pays_it_once(judge_db, auth_settings):
    """A worker cancelled while order 2 is in flight: order 1's answer was kept on the task,
    so the claim after the lease asks only order 2, and the stored result is complete (both
    answers, both orders' tokens and cost); the kept answer is dropped once it is stored."""
    fake = StallingJudge().start()
    settings, engine, run_id = await _direct(judge_db, fake, {0: [5], 1: [7]},
                                             {"pairwise": PAIRWISE}, lease_s=0.5)
    key = run_id if judge_db.backend == "postgres" else run_id.hex
    dead, alive = PairwiseWorkers(settings, engine), PairwiseWorkers(settings, engine)
    try:
        claimed = await dead.claim()
        job = asyncio.create_task(dead.judge(claimed))

        async def order_2_asked() -> bool:
            return any(r for r in fake.requests if "<response_a>" in r.text and _order(r) == 2)
        await wait_until(order_2_asked, "order 2 asked")
        kept = await judge_db.rows("SELECT order1_answer, order1_cost_usd, attempts "
                                   "FROM judge.pairwise_tasks WHERE run_id = :r", r=key)
        assert [tuple(r) for r in kept] == [("B", pytest.approx(CALL_COST), 1)]
        job.cancel()  # the worker dies in order 2's call
        assert (await asyncio.gather(job, return_exceptions=True))[0].__class__ is (
            asyncio.CancelledError)
        await asyncio.sleep(0.6)
        assert await alive.run_once() == 1
        asked = sorted(_order(r) for r in fake.requests if "<response_a>" in r.text)
        assert asked == [1, 2, 2]  # order 1 once; order 2 by the dead worker and again
        [row] = await judge_db.rows("SELECT * FROM judge.pairwise_results WHERE run_id = :r",
                                    r=key)
        assert (row.outcome, row.answer_1, row.answer_2, row.reason_1, row.reason_2,
                row.unscored_reason) == (Outcome.WIN, "B", "A", "5 vs 7", "7 vs 5", "")
        assert (row.input_tokens, row.output_tokens, row.cost_usd) == (
            1000, 200, pytest.approx(2 * CALL_COST))
        [task] = await judge_db.rows("SELECT state, attempts, order1_answer, order1_reason, "
                                     "order1_cost_usd FROM judge.pairwise_tasks "
                                     "WHERE run_id = :r", r=key)
        assert tuple(task) == (TaskState.DONE, 2, None, None, None)

        async def all_finished() -> bool:  # the stalled call's server thread is done
            return all(r.finished for r in fake.requests)
        await wait_until(all_finished, "the stalled call to end")
    finally:
        await dead.close()
        await alive.close()
        await engine.dispose()
        fake.stop()


async def test_order_2_retried_later_reuses_order_1(judge_db, auth_settings):
    """Order 2 failing with server errors past its retries sends the task back to the queue;
    the next claim asks only order 2 (order 1 was kept), and the result counts both."""
    fake = BiasedJudge().start()
    settings, engine, run_id = await _direct(judge_db, fake, {0: [5], 1: [3]},
                                             {"pairwise": PAIRWISE}, llm_max_retries=1)
    key = run_id if judge_db.backend == "postgres" else run_id.hex
    workers = PairwiseWorkers(settings, engine)
    try:
        fake.script(Reply(verdict={"preferred": "A", "reason": "5 vs 3"}), server_error(),
                    server_error())
        assert await workers.run_once() == 1
        [task] = await judge_db.rows("SELECT state, order1_answer, order1_reason "
                                     "FROM judge.pairwise_tasks WHERE run_id = :r", r=key)
        assert tuple(task) == (TaskState.QUEUED, "A", "5 vs 3")
        await asyncio.sleep(0.4)  # the transient backoff (llm_transient_retry_base_s)
        assert await workers.run_once() == 1
        assert fake.pairwise_calls() == 4  # order 1 once, order 2 twice failed, once more
        [row] = await judge_db.rows("SELECT * FROM judge.pairwise_results WHERE run_id = :r",
                                    r=key)
        assert (row.outcome, row.answer_1, row.answer_2, row.cost_usd) == (
            Outcome.LOSS, "A", "B", pytest.approx(2 * CALL_COST))
        spent = await judge_db.scalar("SELECT spent_usd FROM judge.run_llm_state "
                                      "WHERE run_id = :r", r=key)
        assert spent == pytest.approx(2 * CALL_COST)
    finally:
        await workers.close()
        await engine.dispose()
        fake.stop()


async def test_held_reservation_is_renewed_once_the_lease_is_stale(judge_db):
    """renew_held (before order 2, on budget reserved with order 1): nothing while the lease
    is fresh; after, the run's reserved_until moves to hold_s from now."""
    run_id = await judge_db.create_run(ALICE)
    key = run_id if judge_db.backend == "postgres" else run_id.hex
    engine = judge_db.engine()
    budget = RunBudget(engine, ALICE, run_id, 1.0, hold_s=5.0, poll_s=0.05, lease_calls=1,
                       lease_fresh_s=0.3)

    async def reserved_until() -> datetime:
        value = await judge_db.scalar("SELECT reserved_until FROM judge.run_llm_state "
                                      "WHERE run_id = :r", r=key)
        value = datetime.fromisoformat(value) if isinstance(value, str) else value
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        await budget.load()
        assert await budget.reserve(0.25) is None
        first = await reserved_until()
        await budget.renew_held()  # fresh: no write
        assert await reserved_until() == first
        await asyncio.sleep(0.5)
        await budget.renew_held()
        assert await reserved_until() >= first + timedelta(seconds=0.4)
        budget.charge(0.1, 1, 1, None, 0.25)
        await budget.drain()
        reserved = await judge_db.scalar("SELECT reserved_usd FROM judge.run_llm_state "
                                         "WHERE run_id = :r", r=key)
        assert reserved == pytest.approx(0.0)
    finally:
        await engine.dispose()


async def test_migration_0005_matches_the_model(judge_db):
    """The pairwise tables as migrated (0004, 0005) are the models'; 0005 goes down and up
    again (PostgreSQL, in a transaction rolled back)."""
    if judge_db.backend != "postgres":
        pytest.skip("compared on PostgreSQL")

    def differences(sync_conn: Any) -> list[Any]:
        context = MigrationContext.configure(sync_conn, opts={"include_schemas": True})
        return [diff for diff in compare_metadata(context, JudgeBase.metadata)
                if "pairwise" in repr(diff)]

    def alembic(sync_conn: Any, action: str, revision: str) -> None:
        cfg = alembic_config("services.judge:migrations")
        cfg.attributes["connection"] = sync_conn
        getattr(command, action)(cfg, revision)
    columns = ("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'judge' "
               "AND table_name = 'pairwise_tasks' AND column_name LIKE 'order1_%'")
    async with judge_db.admin.connect() as conn:
        assert await conn.run_sync(differences) == []
        assert await conn.scalar(text(columns)) == 7
        try:  # one transaction (begun by the reads above), rolled back whatever happens
            await conn.run_sync(alembic, "downgrade", "0004")
            assert await conn.scalar(text(columns)) == 0
            await conn.run_sync(alembic, "upgrade", "head")
            assert await conn.run_sync(differences) == []
        finally:
            await conn.rollback()
    assert await judge_db.scalar(columns) == 7


@pytest.mark.parametrize(("first", "second", "outcome", "bias"), [
    ("B", "A", Outcome.WIN, False), ("A", "B", Outcome.LOSS, False),
    ("A", "A", Outcome.TIE, True), ("B", "B", Outcome.TIE, True),
    ("tie", "tie", Outcome.TIE, False), ("tie", "A", Outcome.TIE, False),
    ("", "A", Outcome.UNSCORED, False), ("B", "", Outcome.UNSCORED, False)])
def test_pair_outcome(first, second, outcome, bias):
    assert pair_outcome(first, second) == (outcome, bias)


def test_wilson_interval_matches_scipy():
    for wins, losses, ties in ((4, 2, 2), (10, 0, 0), (0, 7, 1), (1, 1, 0)):
        rate, low, high = expected_interval(wins, losses, ties)
        assert wilson_interval(wins + ties / 2, wins + losses + ties, LEVEL) == pytest.approx(
            (max(low, 0.0), min(high, 1.0)), abs=1e-12)
    assert wilson_interval(0, 0, LEVEL) == (0.0, 0.0)
