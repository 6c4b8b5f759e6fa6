"""People judge a custom criterion on its own scale, over real gRPC servers (writer, judge with
the fake LLM server as its "local" endpoint, query) on PostgreSQL and SQLite: a run whose
judge config defines `quality` as a criterion object on 0..100 takes a human 85 with
threshold 60 and refuses 101 (INVALID_ARGUMENT naming `score`) and a threshold outside the
scale (naming `threshold`); a standard criterion of the same run keeps the service range
0..10; another user gets the same answers as for an unknown run; and GetRunSummary's
agreement of the LLM judge's 0..100 scores with the person's is checked against
scipy.stats.spearmanr and Cohen's kappa written out. Also services.judge.human on its own:
which stored entries count as a criterion object, and a stored object the judge would refuse
falls back to the service range with a WARNING."""

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from pydantic import ValidationError
from scipy import stats as scipy_stats
from sqlalchemy import update

from epochlens.v1 import (
    judge_pb2,
    judge_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    writer_pb2,
    writer_pb2_grpc,
)
from services.common.auth import mint_token
from services.common.convert import dict_to_struct
from services.common.server import RunningServer
from services.judge.config import JudgeSettings
from services.judge.human import custom_scale, human_range
from services.judge.schema import CustomCriterion
from services.judge.server import start as start_judge
from services.query.config import QuerySettings
from services.query.server import start as start_query
from services.writer.config import MigrateSettings, WriterSettings
from services.writer.migrate import migrate
from services.writer.models import runs_table
from services.writer.server import start as start_writer
from tests.conftest import (
    JUDGE_ROLE,
    PAGE_SECRET,
    READER_ROLE,
    WRITER_ROLE,
    migrated_database,
    pg_url,
)
from tests.helpers import create_run, field_violations, item, rich_status
from tests.integration.test_agreement import kappa
from tests.integration.test_handoff import wait_until
from tests.judge.fake_llm import FakeLlmServer

MODEL = "local-judge"
JUDGE_MODEL = f"openai_compatible/{MODEL}"
LLM, HUMAN = judge_pb2.JUDGE_TYPE_LLM, judge_pb2.JUDGE_TYPE_HUMAN
QUALITY = {"name": "quality", "rubric": "How good is the answer? 100: perfect; 0: useless.",
           "scale_min": 0, "scale_max": 100, "threshold": 60}
JUDGE_SECTION = {"rules": {"enabled": False},
                 "llm": {"provider": "openai_compatible", "endpoint": "local", "model": MODEL,
                         "max_retries": 0, "criteria": [QUALITY, "accuracy"]}}
# The LLM judge's quality score of each sample (a tie: average ranks), and the person's.
LLM_QUALITY = [90, 35, 70, 70, 100, 10]
HUMAN_QUALITY = [85.0, 40.0, 60.0, 50.0, 95.0, 20.0]
OUT_OF_SCALE = " (the scale of criterion 'quality' in the run's judge config)"


@dataclass
class Services:
    writer: RunningServer
    judge: RunningServer
    query: RunningServer
    auth: object
    fake: FakeLlmServer

    def md(self, user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {mint_token(self.auth, user)}"),)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLlmServer]:
    server = FakeLlmServer().start()
    yield server
    server.stop()


async def _start(auth, fake: FakeLlmServer, database: str | None, sqlite_dir) -> Services:
    common = {"port": 0, "shutdown_grace_s": 0.5, "_env_file": None}
    if sqlite_dir is not None:
        common["sqlite_dir"] = sqlite_dir
    judge = await start_judge(JudgeSettings(
        database_url=pg_url(JUDGE_ROLE, database) if database else None, idle_poll_s=0.05,
        llm_endpoints={"local": {"base_url": fake.openai_url}}, **common), auth)
    writer = await start_writer(WriterSettings(
        database_url=pg_url(WRITER_ROLE, database) if database else None,
        judge_address=judge.address, outbox_poll_s=0.05, outbox_backoff_base_s=0.1,
        outbox_backoff_max_s=1.0, **common), auth)
    query = await start_query(QuerySettings(
        database_url=pg_url(READER_ROLE, database) if database else None,
        page_token_secret=PAGE_SECRET, **common), auth)
    return Services(writer, judge, query, auth, fake)


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
async def services(request, auth_settings, fake, tmp_path_factory) -> AsyncIterator[Services]:
    """Writer, judge (endpoint "local": the fake LLM server) and query of this module's own,
    on a fresh PostgreSQL database or a fresh SQLite directory."""
    if request.param == "postgres":
        async with migrated_database("human_scale") as name:
            running = await _start(auth_settings, fake, name, None)
            yield running
            await _stop(running)
    else:
        sqlite_dir = tmp_path_factory.mktemp("human_scale")
        await migrate(MigrateSettings(sqlite_dir=sqlite_dir, _env_file=None))
        running = await _start(auth_settings, fake, None, sqlite_dir)
        yield running
        await _stop(running)


async def _stop(running: Services) -> None:
    for server in (running.writer, running.query, running.judge):
        await server.stop(0.5)


async def llm_judged_run(services: Services, user: str) -> str:
    """A run of `user` with QUALITY (0..100) and accuracy judged by the fake LLM: sample i
    written (and judged) once the fake answers LLM_QUALITY[i] for quality, 8 for accuracy."""
    md = services.md(user)
    async with grpc.aio.insecure_channel(services.writer.address) as channel:
        writer = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        run = await create_run(writer, md, config=dict_to_struct({"judge": JUDGE_SECTION}))
        for sample, score in enumerate(LLM_QUALITY):
            services.fake.model_scores = {MODEL: {"quality": score, "accuracy": 8}}
            await writer.WritePredictions(writer_pb2.WritePredictionsRequest(
                run_id=run.id, predictions=[item(10, sample)]), metadata=md)
            await wait_until(lambda n=sample + 1: _llm_count(services, md, run.id, n),
                             f"LLM judgments of sample {sample}", 30.0)
    return run.id


async def _llm_count(services: Services, md, run_id: str, wanted: int) -> bool:
    """Whether the run has `wanted` predictions judged by the LLM on both criteria."""
    got = await _judgments(services, md, run_id, LLM)
    return len(got) == 2 * wanted


async def _judgments(services: Services, md, run_id: str,
                     judge_type: int) -> list[judge_pb2.Judgment]:
    async with grpc.aio.insecure_channel(services.query.address) as channel:
        reply = await query_pb2_grpc.QueryServiceStub(channel).ListJudgments(
            query_pb2.ListJudgmentsRequest(run_id=run_id, judge_type=judge_type,
                                           page_size=100), metadata=md)
    return list(reply.judgments)


def human(run_id: str, sample: int, criterion: str, score: float,
          threshold: float) -> judge_pb2.RecordHumanJudgmentRequest:
    return judge_pb2.RecordHumanJudgmentRequest(
        prediction=judge_pb2.PredictionRef(run_id=run_id, step=10, sample_index=sample),
        criterion=criterion, score=score, threshold=threshold, reasoning=f"{criterion} read")


async def refused(stub, request, md) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RecordHumanJudgment(request, metadata=md)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return field_violations(rich_status(caught.value))


async def test_a_custom_criterion_is_judged_by_people_on_its_own_scale(services):
    user = f"scale-{uuid.uuid4().hex[:6]}"
    md = services.md(user)
    run_id = await llm_judged_run(services, user)
    async with grpc.aio.insecure_channel(services.judge.address) as channel:
        judge = judge_pb2_grpc.JudgeServiceStub(channel)
        stored = await judge.RecordHumanJudgment(human(run_id, 0, "quality", 85, 60),
                                                 metadata=md)
        assert await refused(judge, human(run_id, 1, "quality", 101, 60), md) == {
            "score": f"must be within 0..100{OUT_OF_SCALE}, got 101"}
        assert await refused(judge, human(run_id, 1, "quality", 50, 101), md) == {
            "threshold": f"must be within 0..100{OUT_OF_SCALE}, got 101"}
        assert await refused(judge, human(run_id, 1, "quality", -1, -0.5), md) == {
            "score": f"must be within 0..100{OUT_OF_SCALE}, got -1",
            "threshold": f"must be within 0..100{OUT_OF_SCALE}, got -0.5"}
        # a standard criterion of the same run (and a name the config does not define):
        # the service range
        for criterion in ("accuracy", "tone"):
            assert await refused(judge, human(run_id, 0, criterion, 85, 60), md) == {
                "score": "must be within 0..10, got 85", "threshold":
                "must be within 0..10, got 60"}
        standard = await judge.RecordHumanJudgment(human(run_id, 0, "accuracy", 7, 7),
                                                   metadata=md)
    assert (stored.score, stored.threshold, stored.passed, stored.judge_model) == (
        85.0, 60.0, True, user)
    assert (standard.score, standard.threshold, standard.passed) == (7.0, 7.0, True)
    rows = await _judgments(services, md, run_id, HUMAN)
    assert sorted((j.prediction.sample_index, j.criterion, j.score, j.threshold, j.passed,
                   j.revision) for j in rows) == [(0, "accuracy", 7.0, 7.0, True, 1),
                                                  (0, "quality", 85.0, 60.0, True, 1)]


async def test_another_user_learns_nothing_from_the_scale(services):
    """Another user's run: the service range applies (as for an unknown run), and an
    in-range judgment is NOT_FOUND; nothing is stored."""
    owner = f"owner-{uuid.uuid4().hex[:6]}"
    run_id = await llm_judged_run(services, owner)
    other = services.md(f"{owner}-other")
    async with grpc.aio.insecure_channel(services.judge.address) as channel:
        judge = judge_pb2_grpc.JudgeServiceStub(channel)
        theirs = await refused(judge, human(run_id, 0, "quality", 85, 60), other)
        unknown = await refused(judge, human(str(uuid.uuid4()), 0, "quality", 85, 60), other)
        assert theirs == unknown == {"score": "must be within 0..10, got 85",
                                     "threshold": "must be within 0..10, got 60"}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await judge.RecordHumanJudgment(human(run_id, 0, "quality", 5, 6), metadata=other)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert await _judgments(services, services.md(owner), run_id, HUMAN) == []


async def test_agreement_on_a_custom_scale_matches_scipy(services):
    user = f"agree-scale-{uuid.uuid4().hex[:6]}"
    md = services.md(user)
    run_id = await llm_judged_run(services, user)
    llm_rows = [j for j in await _judgments(services, md, run_id, LLM)
                if j.criterion == "quality"]
    assert sorted((j.prediction.sample_index, j.score, j.threshold, j.judge_model)
                  for j in llm_rows) == [(s, float(score), 60.0, JUDGE_MODEL)
                                         for s, score in enumerate(LLM_QUALITY)]
    async with grpc.aio.insecure_channel(services.judge.address) as channel:
        judge = judge_pb2_grpc.JudgeServiceStub(channel)
        for sample, score in enumerate(HUMAN_QUALITY):
            await judge.RecordHumanJudgment(human(run_id, sample, "quality", score, 60),
                                            metadata=md)
    async with grpc.aio.insecure_channel(services.query.address) as channel:
        summary = await query_pb2_grpc.QueryServiceStub(channel).GetRunSummary(
            query_pb2.GetRunSummaryRequest(run_id=run_id), metadata=md)
    (row,) = summary.agreements
    assert (row.criterion, row.judge_type, row.judge_model, row.pairs) == (
        "quality", LLM, JUDGE_MODEL, len(LLM_QUALITY))
    rho = scipy_stats.spearmanr(LLM_QUALITY, HUMAN_QUALITY).statistic
    assert row.HasField("spearman") and row.spearman == pytest.approx(rho)
    ours, theirs = [s >= 60 for s in LLM_QUALITY], [s >= 60 for s in HUMAN_QUALITY]
    assert row.percent_agreement == pytest.approx(np.mean(np.equal(ours, theirs)))
    assert row.HasField("cohen_kappa") and row.cohen_kappa == pytest.approx(kappa(ours, theirs))


def test_custom_scale_reads_only_a_criterion_object_of_the_stored_section():
    """What custom_scale finds in a stored judge section: the object of that name; nothing
    for a name, a section without llm.criteria or of another shape; ValidationError for an
    object that is not a valid criterion (human_range then logs and uses the service
    range)."""
    assert custom_scale(JUDGE_SECTION, "quality") == CustomCriterion.model_validate(QUALITY)
    for section in (JUDGE_SECTION, None, [], {"llm": None}, {"llm": {"criteria": "quality"}},
                    {"llm": {"custom_criteria": {"quality": "rubric"}}}):
        assert custom_scale(section, "accuracy") is None
        assert custom_scale(section, "tone") is None
    with pytest.raises(ValidationError):
        custom_scale({"llm": {"criteria": [{"name": "quality", "scale_max": "x"}]}}, "quality")


async def test_an_unreadable_stored_criterion_object_falls_back_to_the_service_range(
        judge_db, caplog):
    """A run stored with a criterion object the judge would refuse (scale_min above
    scale_max, or not an object it can read: a run stored through a writer that did not
    check its judge config) is judged on the service range, with a WARNING naming the run
    and the criterion; nothing of another user's run is read."""
    settings = judge_db.settings()
    user = f"odd-{uuid.uuid4().hex[:6]}"
    engine = judge_db.engine()
    try:
        for entry in ({**QUALITY, "scale_min": 100, "scale_max": 0},
                      {**QUALITY, "scale_max": "x"}):
            run_id = await judge_db.create_run(user)
            async with judge_db.admin.begin() as conn:
                await conn.execute(update(runs_table).where(runs_table.c.id == run_id).values(
                    config={"judge": {"llm": {"criteria": [entry]}}}))
            with caplog.at_level(logging.WARNING, logger="services.judge.human"):
                scale = await human_range(settings, engine, user, run_id, "quality")
            assert (scale.low, scale.high, scale.source) == (0.0, 10.0, "")
            assert f"run {run_id}: criterion object 'quality'" in caplog.text
            caplog.clear()
        good = await judge_db.create_run(user)
        async with judge_db.admin.begin() as conn:
            await conn.execute(update(runs_table).where(runs_table.c.id == good).values(
                config={"judge": JUDGE_SECTION}))
        mine = await human_range(settings, engine, user, good, "quality")
        theirs = await human_range(settings, engine, f"{user}-other", good, "quality")
    finally:
        await engine.dispose()
    assert (mine.low, mine.high, mine.source) == (0.0, 100.0, OUT_OF_SCALE)
    assert (theirs.low, theirs.high, theirs.source) == (0.0, 10.0, "")
