"""EvaluationService.Evaluate on the real stack (writer, judge and query servers on PostgreSQL
and on SQLite), the judge configured with an endpoint that is the fake OpenAI wire server
(tests.judge.fake_llm.EchoLlmServer): rows with responses stored and judged by the rules,
missing responses generated through the judge and stored, a repeated call generating
nothing twice, failures reported with the run left open, finish, the ListRuns kind filter,
bad input, NUL replacement, and user isolation."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from epochlens.v1 import (
    common_pb2,
    evaluation_pb2,
    evaluation_pb2_grpc,
    judge_pb2,
    query_pb2,
    query_pb2_grpc,
    writer_pb2_grpc,
)
from services.common.auth import mint_token
from services.common.config import AuthSettings
from services.common.convert import dict_to_struct
from services.common.server import RunningServer
from services.judge.config import JudgeSettings
from services.judge.server import start as start_judge
from services.query.config import QuerySettings
from services.query.server import start as start_query
from services.writer.config import MigrateSettings, WriterSettings
from services.writer.migrate import migrate
from services.writer.server import start as start_writer
from tests.conftest import (
    JUDGE_ROLE,
    PAGE_SECRET,
    READER_ROLE,
    WRITER_ROLE,
    migrated_database,
    pg_url,
)
from tests.helpers import create_run, field_violations, rich_status
from tests.judge.fake_llm import ECHO_PREFIX, EchoLlmServer, unauthorized

ENDPOINT, MODEL, ENDPOINT_KEY = "local", "m1", "key-of-the-local-endpoint"
CHUNK, MAX_ROWS = 2, 40
RULES_PER_ROW = 5  # the default rule criteria of a prediction with a ground truth
EVALUATION, TRAINING = common_pb2.RUN_KIND_EVALUATION, common_pb2.RUN_KIND_TRAINING


@dataclass
class EvalStack:
    backend: str
    writer: RunningServer
    judge: RunningServer
    query: RunningServer
    auth: AuthSettings
    echo: EchoLlmServer

    def md(self, user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {mint_token(self.auth, user)}"),)


@pytest.fixture(scope="module")
def echo() -> AsyncIterator[EchoLlmServer]:
    server = EchoLlmServer(input_tokens=7, output_tokens=3).start()
    yield server
    server.stop()


async def _start(backend: str, auth: AuthSettings, database: str | None, sqlite_dir,
                 echo: EchoLlmServer) -> EvalStack:
    common: dict[str, Any] = {"port": 0, "shutdown_grace_s": 0.5, "_env_file": None}
    if sqlite_dir is not None:
        common["sqlite_dir"] = sqlite_dir
    url = (lambda role: pg_url(role, database)) if database else (lambda role: None)
    judge = await start_judge(JudgeSettings(
        database_url=url(JUDGE_ROLE), idle_poll_s=0.05, generation_max_retries=1,
        llm_backoff_base_s=0.05, llm_backoff_max_s=0.1, llm_endpoints={ENDPOINT: {
            "base_url": echo.openai_url, "api_key": ENDPOINT_KEY, "models": [MODEL]}},
        **common), auth)
    writer = await start_writer(WriterSettings(
        database_url=url(WRITER_ROLE), judge_address=judge.address, outbox_poll_s=0.05,
        outbox_backoff_base_s=0.1, outbox_backoff_max_s=1.0, max_batch_size=MAX_ROWS,
        evaluation_generate_chunk=CHUNK, **common), auth)
    query = await start_query(QuerySettings(database_url=url(READER_ROLE),
                                            page_token_secret=PAGE_SECRET, **common), auth)
    return EvalStack(backend, writer, judge, query, auth, echo)


@pytest.fixture(scope="module")
async def evaluation_database() -> AsyncIterator[str]:
    """A database of this module's own: the session stack's outbox dispatcher and judge
    workers would otherwise hand off and judge these tests' rows too."""
    async with migrated_database("evaluation") as name:
        yield name


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
async def estack(request, auth_settings, evaluation_database, tmp_path_factory,
                 echo) -> AsyncIterator[EvalStack]:
    if request.param == "postgres":
        running = await _start("postgres", auth_settings, evaluation_database, None, echo)
    else:
        sqlite_dir = tmp_path_factory.mktemp("evaluation-sqlite")
        await migrate(MigrateSettings(sqlite_dir=sqlite_dir, _env_file=None))
        running = await _start("sqlite", auth_settings, None, sqlite_dir, echo)
    yield running
    await running.writer.stop(0.5)
    await running.query.stop(0.5)
    await running.judge.stop(0.5)


@dataclass
class Clients:
    evaluation: evaluation_pb2_grpc.EvaluationServiceStub
    writer: writer_pb2_grpc.PredictionWriterServiceStub
    query: query_pb2_grpc.QueryServiceStub


@pytest.fixture
async def clients(estack) -> AsyncIterator[Clients]:
    estack.echo.reset()
    async with grpc.aio.insecure_channel(estack.writer.address) as writer, \
            grpc.aio.insecure_channel(estack.query.address) as query:
        yield Clients(evaluation_pb2_grpc.EvaluationServiceStub(writer),
                      writer_pb2_grpc.PredictionWriterServiceStub(writer),
                      query_pb2_grpc.QueryServiceStub(query))


def user() -> str:
    return f"eval-{uuid.uuid4().hex[:8]}"


def row(index: int, response: str | None = None, **fields: Any) -> evaluation_pb2.EvaluationRow:
    values: dict[str, Any] = {"index": index, "prompt": f"question {index}",
                              "reference": f"answer {index}", **fields}
    if response is not None:
        values["response"] = response
    return evaluation_pb2.EvaluationRow(**values)


def request(rows: list[evaluation_pb2.EvaluationRow], request_id: str = "eval-1",
            **fields: Any) -> evaluation_pb2.EvaluateRequest:
    values: dict[str, Any] = {
        "name": "nightly eval", "model_name": "vllm/m1", "dataset_name": "qa.jsonl",
        "request_id": request_id, "rows": rows,
        "generation": judge_pb2.GenerationConfig(endpoint=ENDPOINT, model=MODEL,
                                                 max_new_tokens=64), **fields}
    return evaluation_pb2.EvaluateRequest(**values)


async def evaluate(estack: EvalStack, c: Clients, who: str,
                   req: evaluation_pb2.EvaluateRequest) -> evaluation_pb2.EvaluateResponse:
    return await c.evaluation.Evaluate(req, metadata=estack.md(who))


async def predictions(estack: EvalStack, c: Clients, who: str,
                      run_id: str) -> list[common_pb2.Prediction]:
    reply = await c.query.ListPredictions(query_pb2.ListPredictionsRequest(
        run_id=run_id, page_size=500), metadata=estack.md(who))
    return list(reply.predictions)


async def judgment_count(estack: EvalStack, c: Clients, who: str, run_id: str,
                         expected: int, timeout_s: float = 30.0) -> int:
    """The run's judgment count once it reaches `expected` (or the count at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = await c.query.ListJudgments(query_pb2.ListJudgmentsRequest(
            run_id=run_id, page_size=1000), metadata=estack.md(who))
        count = len(reply.judgments)
        if count >= expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.1)


async def test_rows_with_responses_are_stored_and_judged_by_rules(estack, clients):
    who = user()
    rows = [row(i, response=f"answer {i}" if i % 2 == 0 else "wrong", generation_time_ms=2.5,
                completion_tokens=4) for i in range(4)]
    reply = await evaluate(estack, clients, who, request(rows))
    assert (reply.inserted_count, reply.duplicate_count, reply.generated_count) == (4, 0, 0)
    assert list(reply.failures) == [] and list(reply.nul_replaced_fields) == []
    assert reply.run.kind == EVALUATION and reply.run.state == common_pb2.RUN_STATE_RUNNING
    assert (reply.run.name, reply.run.model_name, reply.run.dataset_name) == (
        "nightly eval", "vllm/m1", "qa.jsonl")
    stored = await predictions(estack, clients, who, reply.run.id)
    assert [(p.epoch, p.step, p.sample_index, p.prediction, p.ground_truth, p.completion_tokens)
            for p in stored] == [(0, 0, i, r.response, f"answer {i}", 4)
                                 for i, r in enumerate(rows)]
    assert await judgment_count(estack, clients, who, reply.run.id,
                                4 * RULES_PER_ROW) == 4 * RULES_PER_ROW
    await asyncio.sleep(0.3)  # judged once: no second round of judgments arrives
    assert await judgment_count(estack, clients, who, reply.run.id, 10**6, 0) == 4 * RULES_PER_ROW
    assert estack.echo.requests == []


async def test_missing_responses_are_generated_once(estack, clients):
    who = user()
    rows = [row(i) for i in range(5)]
    first = await evaluate(estack, clients, who, request(rows))
    assert (first.inserted_count, first.duplicate_count, first.generated_count) == (5, 0, 5)
    seen = estack.echo.requests
    assert len(seen) == 5
    assert {r.headers["authorization"] for r in seen} == {f"Bearer {ENDPOINT_KEY}"}
    assert {(r.body["model"], r.body["max_tokens"]) for r in seen} == {(MODEL, 64)}
    assert sorted(r.body["messages"][-1]["content"] for r in seen) == [
        f"question {i}" for i in range(5)]
    stored = await predictions(estack, clients, who, first.run.id)
    assert [(p.sample_index, p.prediction, p.prompt_tokens, p.completion_tokens)
            for p in stored] == [(i, f"{ECHO_PREFIX}question {i}", 7, 3) for i in range(5)]
    again = await evaluate(estack, clients, who, request(rows + [row(5)]))
    assert again.run.id == first.run.id
    assert (again.inserted_count, again.duplicate_count, again.generated_count) == (1, 5, 1)
    assert len(estack.echo.requests) == 6
    assert estack.echo.requests[-1].body["messages"][-1]["content"] == "question 5"
    assert len(await predictions(estack, clients, who, first.run.id)) == 6


async def test_failed_rows_are_reported_and_the_run_stays_open(estack, clients):
    who = user()
    rows = [row(i) for i in range(3)]
    estack.echo.script(unauthorized())  # never retried
    first = await evaluate(estack, clients, who, request(rows, finish=True))
    assert (first.inserted_count, first.generated_count) == (2, 2)
    assert len(first.failures) == 1 and "authentication" in first.failures[0].reason
    assert first.run.state == common_pb2.RUN_STATE_RUNNING
    failed = first.failures[0].index
    stored = await predictions(estack, clients, who, first.run.id)
    assert sorted(p.sample_index for p in stored) == sorted({0, 1, 2} - {failed})
    second = await evaluate(estack, clients, who, request(rows, finish=True))
    assert (second.inserted_count, second.duplicate_count, second.generated_count) == (1, 2, 1)
    assert list(second.failures) == []
    assert second.run.state == common_pb2.RUN_STATE_SUCCEEDED and second.run.HasField(
        "finish_time")
    assert len(estack.echo.requests) == 4


async def test_finish_without_generation(estack, clients):
    who = user()
    reply = await evaluate(estack, clients, who, request([row(0, response="x")], finish=True))
    assert reply.run.state == common_pb2.RUN_STATE_SUCCEEDED
    got = await clients.query.GetRun(query_pb2.GetRunRequest(run_id=reply.run.id),
                                     metadata=estack.md(who))
    assert got.state == common_pb2.RUN_STATE_SUCCEEDED and got.kind == EVALUATION


async def test_list_runs_filters_by_kind(estack, clients):
    who = user()
    training = await create_run(clients.writer, estack.md(who), name="train")
    assert training.kind == TRAINING
    evals = [(await evaluate(estack, clients, who, request([], request_id=f"r{i}"))).run.id
             for i in range(2)]

    async def listed(kind: int, **fields: Any) -> query_pb2.ListRunsResponse:
        return await clients.query.ListRuns(query_pb2.ListRunsRequest(kind=kind, **fields),
                                            metadata=estack.md(who))

    assert [r.id for r in (await listed(EVALUATION)).runs] == list(reversed(evals))
    assert [r.id for r in (await listed(TRAINING)).runs] == [training.id]
    every = (await listed(common_pb2.RUN_KIND_UNSPECIFIED)).runs
    assert [r.id for r in every] == [*reversed(evals), training.id]
    assert [r.kind for r in every] == [EVALUATION, EVALUATION, TRAINING]
    page = await listed(EVALUATION, page_size=1)
    assert [r.id for r in page.runs] == [evals[1]] and page.next_page_token
    assert [r.id for r in (await listed(EVALUATION, page_token=page.next_page_token)).runs] == [
        evals[0]]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await listed(TRAINING, page_token=page.next_page_token)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(rich_status(caught.value))


BAD = [
    ("duplicate index", {"rows": [row(0, "a"), row(0, "b")]}, "rows[1].index"),
    ("negative index", {"rows": [row(-1, "a")]}, "rows[0].index"),
    ("empty prompt", {"rows": [row(0, "a", prompt="")]}, "rows[0].prompt"),
    ("too many rows", {"rows": [row(i, "a") for i in range(MAX_ROWS + 1)]}, "rows"),
    ("no request id", {"request_id": ""}, "request_id"),
    ("no name", {"name": ""}, "name"),
    ("no model", {"model_name": " "}, "model_name"),
    ("negative time", {"rows": [row(0, "a", generation_time_ms=-1.0)]},
     "rows[0].generation_time_ms"),
    ("no generation", {"generation": None}, "generation"),
    ("temperature", {"generation": judge_pb2.GenerationConfig(
        endpoint=ENDPOINT, model=MODEL, temperature=2.5)}, "generation.temperature"),
    ("bad judge config", {"config": dict_to_struct({"judge": {"llm": {"sample_rate": 2.0}}})},
     "config.judge.llm.sample_rate"),
]


@pytest.mark.parametrize(("case", "fields", "field"), BAD, ids=[b[0] for b in BAD])
async def test_bad_input_is_invalid_argument(estack, clients, case, fields, field):
    fields = dict(fields)
    rows = fields.pop("rows", [row(0)])
    req = request(rows, **{"request_id": f"bad-{uuid.uuid4().hex[:6]}",
                           **{k: v for k, v in fields.items() if v is not None}})
    if "generation" in fields and fields["generation"] is None:
        req.ClearField("generation")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluate(estack, clients, "bad-input", req)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(rich_status(caught.value))
    assert estack.echo.requests == []


@pytest.mark.parametrize(("generation", "field"), [
    ({"endpoint": "elsewhere", "model": MODEL}, "generation.endpoint"),
    ({"endpoint": ENDPOINT, "model": "not-served"}, "generation.model"),
    ({"endpoint": ENDPOINT, "model": MODEL, "max_new_tokens": 10**6},
     "generation.max_new_tokens"),
])
async def test_generation_refused_by_the_judge(estack, clients, generation, field):
    req = request([row(0)], request_id=f"gen-{uuid.uuid4().hex[:6]}",
                  generation=judge_pb2.GenerationConfig(**generation))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluate(estack, clients, user(), req)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(rich_status(caught.value))
    assert estack.echo.requests == []


async def test_nul_is_replaced_and_reported(estack, clients):
    who = user()
    rows = [row(0, response="a\x00b", prompt="q\x00"), row(1, response="fine")]
    reply = await evaluate(estack, clients, who, request(rows))
    assert list(reply.nul_replaced_fields) == ["rows[0].prompt", "rows[0].response"]
    stored = await predictions(estack, clients, who, reply.run.id)
    assert (stored[0].prompt, stored[0].prediction) == ("q\ufffd", "a\ufffdb")


async def test_request_id_of_a_training_run_is_refused(estack, clients):
    who = user()
    await create_run(clients.writer, estack.md(who), name="train", request_id="shared-id")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluate(estack, clients, who, request([row(0, "a")], request_id="shared-id"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_another_users_request_id_is_another_run(estack, clients):
    alice, bob = user(), user()
    mine = await evaluate(estack, clients, alice, request([row(0, "alice says")],
                                                          request_id="same"))
    theirs = await evaluate(estack, clients, bob, request([row(0, "bob says")],
                                                          request_id="same"))
    assert theirs.run.id != mine.run.id and theirs.inserted_count == 1
    assert [p.prediction for p in await predictions(estack, clients, alice, mine.run.id)] == [
        "alice says"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await predictions(estack, clients, bob, mine.run.id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await clients.query.ListRuns(query_pb2.ListRunsRequest(kind=EVALUATION),
                                          metadata=estack.md(bob))
    assert [r.id for r in listed.runs] == [theirs.run.id]
