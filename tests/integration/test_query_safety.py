"""QueryService safety over real gRPC, on PostgreSQL and SQLite: page tokens bound to the
caller, the method and the filters, and strictly typed (a token another user replays,
or one re-signed with the real secret around a wrong-typed key, is INVALID_ARGUMENT on
page_token, never INTERNAL); pages bounded by bytes as well as rows (fewer rows and a
next_page_token), for ListPredictions, CompareSample, ListRuns and ListJudgments, with a
small byte budget on a second query service over the same database, and once at the
real defaults with predictions at the writer's longest text.

Page tokens are forged the way an attacker holding the secret would: a genuine token's
JSON payload {"k": key, "f": fingerprint} with another key, signed again (HMAC-SHA256 cut
to 16 bytes, services.query.pagination).
"""

import base64
import hashlib
import hmac
import json
import uuid

import grpc
import pytest

from epochlens.v1 import query_pb2, query_pb2_grpc, writer_pb2
from services.judge.models import judgments_table
from services.query.config import QuerySettings
from services.query.server import start as start_query
from services.writer.config import WriterSettings
from tests.conftest import PAGE_SECRET, READER_ROLE, pg_url
from tests.helpers import create_run, field_violations, item, rich_status
from tests.integration.test_query_judgments import (
    NO_JUDGING,
    RULE,
    insert_rows,
    judgment_row,
    seed_rows,
    settled,
)

# The small service's byte budget and gRPC message limit: a page of the long runs below
# without the budget would not fit a message, as 49 MB would not fit 16 MiB.
SMALL_BUDGET, SMALL_MESSAGE = 32 * 1024, 64 * 1024
# ListMetrics limits whose largest response (80 B a point, 560 B a series) fits SMALL_BUDGET.
SMALL_METRICS = {"metrics_max_points_total": 300, "metrics_max_series": 4}
# Characters of each long text: a row is this many bytes plus about a hundred, so three
# rows and a page token fit SMALL_BUDGET and four do not.
LONG = 10_000
STEPS, SAMPLES = 20, 2
RUN_ID = "12345678-1234-5678-1234-567812345678"
TIME = "2024-01-02T03:04:05.000006+00:00"
# Per method, keys of the wrong shape or type (the genuine ones are in PAGE_KEYS of
# services.query.servicer), each re-signed with the real secret.
WRONG_KEYS = {
    "ListRuns": [[5, RUN_ID], [TIME, [RUN_ID]], [TIME], [TIME, RUN_ID, 1], [None, None],
                 ["2024-01-02T03:04:05", RUN_ID], ["not a time", RUN_ID], [TIME, "not a uuid"]],
    "ListPredictions": [["10", 0], [10, [0]], [10], [10, 0, 1], [2**63, 0], [10.5, 0],
                        [True, 0]],
    "ListEpochs": [["1"], [], [{"epoch": 1}], [1.0], [-(2**63) - 1]],
    "CompareSample": [["10"], [[10]], [], [None], [10, 0]],
    "ListJudgments": [[10, 0, 5, 1, "rules"], [10, 0, "chrf", "1", "rules"],
                      [10, 0, "chrf", 1], [10, 0, "chrf", 1, "a\x00"],
                      [10, 0, "\ud800", 1, "rules"]],
}


async def own_query(stack, **settings):
    """A second query service over the stack's database, with other settings."""
    where = ({"database_url": pg_url(READER_ROLE, stack.database)} if stack.database
             else {"sqlite_dir": stack.sqlite_dir})
    return await start_query(QuerySettings(port=0, page_token_secret=PAGE_SECRET,
                                           shutdown_grace_s=0, _env_file=None, **where,
                                           **settings), stack.auth)


@pytest.fixture
async def small_query(stack):
    """A query service whose pages stop at SMALL_BUDGET bytes, sending SMALL_MESSAGE at most."""
    server = await own_query(stack, max_response_bytes=SMALL_BUDGET,
                             max_message_bytes=SMALL_MESSAGE, **SMALL_METRICS)
    yield server
    await server.stop(0)


@pytest.fixture
async def small_stub(small_query):
    async with grpc.aio.insecure_channel(small_query.address) as channel:
        yield query_pb2_grpc.QueryServiceStub(channel)


def long_text(step: int, sample: int, chars: int = LONG) -> str:
    head = f"step {step} sample {sample} "
    return head + "x" * (chars - len(head))


async def long_run(stack, writer_stub, user: str, steps: int = STEPS, samples: int = SAMPLES,
                   chars: int = LONG) -> str:
    """A run (rule judges off, settled) with one prediction of `chars` characters per step
    1..steps (epoch = step) and sample."""
    md = stack.metadata(user)
    run = await create_run(writer_stub, md, name="long", config=NO_JUDGING)
    items = [item(step, s, epoch=step, prediction=long_text(step, s, chars))
             for step in range(1, steps + 1) for s in range(samples)]
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=items), metadata=md)
    await settled(stack, run.id)
    return run.id


async def every_page(method, request, md) -> list:
    """Every reply of a paged call, following next_page_token to the end."""
    pages = []
    while True:
        pages.append(await method(request, metadata=md))
        if not pages[-1].next_page_token:
            return pages
        request.page_token = pages[-1].next_page_token


def forged(token: str, body: object | None = None, **changes) -> str:
    """`token` with its payload replaced by `body`, or by its own JSON object updated with
    `changes`, signed again with the service's secret."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    if body is None:
        body = {**json.loads(raw[:-16]), **changes}
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    tag = hmac.new(PAGE_SECRET.encode(), payload, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(payload + tag).decode().rstrip("=")


async def invalid_page_token(call) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert list(field_violations(rich_status(err.value))) == ["page_token"]


async def judged_run(stack, writer_stub, user: str) -> str:
    """Three runs of `user`; the last one has grid(3, 4) predictions and seeded judgments."""
    md = stack.metadata(user)
    for name in ("first", "second"):
        await create_run(writer_stub, md, name=name)
    run = await create_run(writer_stub, md, name="judged", config=NO_JUDGING)
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=[item(e * 10, s, epoch=e) for e in (1, 2, 3)
                                    for s in range(4)]), metadata=md)
    await settled(stack, run.id)
    await insert_rows(stack, judgments_table, seed_rows(run.id, user))
    return run.id


def first_pages(query_stub, run_id: str) -> dict:
    """Per paged method, its call and a first-page request of one row."""
    q = query_pb2
    return {
        "ListRuns": (query_stub.ListRuns, q.ListRunsRequest(page_size=1)),
        "ListPredictions": (query_stub.ListPredictions,
                            q.ListPredictionsRequest(run_id=run_id, page_size=1)),
        "ListEpochs": (query_stub.ListEpochs, q.ListEpochsRequest(run_id=run_id, page_size=1)),
        "CompareSample": (query_stub.CompareSample,
                          q.CompareSampleRequest(run_id=run_id, sample_index=0, page_size=1)),
        "ListJudgments": (query_stub.ListJudgments,
                          q.ListJudgmentsRequest(run_id=run_id, page_size=1)),
    }


async def test_another_users_page_token_is_invalid_for_every_method(stack, writer_stub,
                                                                    query_stub):
    owner, other = f"owner-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    run_id = await judged_run(stack, writer_stub, owner)
    await judged_run(stack, writer_stub, other)  # the other user has runs of their own
    for name, (call, request) in first_pages(query_stub, run_id).items():
        first = await call(request, metadata=stack.metadata(owner))
        assert first.next_page_token, name
        request.page_token = first.next_page_token
        second = await call(request, metadata=stack.metadata(owner))
        assert second != first, name
        await invalid_page_token(call(request, metadata=stack.metadata(other)))


async def test_list_runs_token_replayed_by_another_user_skips_nothing(stack, writer_stub,
                                                                      query_stub):
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    for i in range(3):
        await create_run(writer_stub, stack.metadata(alice), name=f"a{i}")
    token = (await query_stub.ListRuns(query_pb2.ListRunsRequest(page_size=1),
                                       metadata=stack.metadata(alice))).next_page_token
    newest = await create_run(writer_stub, stack.metadata(bob), name="b-newest")
    await invalid_page_token(query_stub.ListRuns(query_pb2.ListRunsRequest(
        page_size=1, page_token=token), metadata=stack.metadata(bob)))
    listed = await query_stub.ListRuns(query_pb2.ListRunsRequest(), metadata=stack.metadata(bob))
    assert [r.id for r in listed.runs] == [newest.id]


async def test_resigned_token_with_wrong_typed_key_is_invalid_for_every_method(
        stack, writer_stub, query_stub):
    user = f"forger-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    calls = first_pages(query_stub, await judged_run(stack, writer_stub, user))
    assert set(calls) == set(WRONG_KEYS)
    for name, (call, request) in calls.items():
        token = (await call(request, metadata=md)).next_page_token
        fingerprint = json.loads(base64.urlsafe_b64decode(
            token + "=" * (-len(token) % 4))[:-16])["f"]
        bad = [forged(token, k=key) for key in WRONG_KEYS[name]] + [
            forged(token, {"f": fingerprint}), forged(token, {"k": 1, "f": fingerprint}),
            forged(token, [fingerprint]), forged(token, b"\xff not json")]
        for page_token in bad:
            request.page_token = page_token
            await invalid_page_token(call(request, metadata=md))
        request.page_token = forged(token)  # the genuine content, signed again: accepted
        assert (await call(request, metadata=md)) is not None


async def test_list_predictions_pages_stop_at_the_byte_budget(stack, writer_stub, small_stub):
    user = f"bytes-{uuid.uuid4().hex[:6]}"
    run_id = await long_run(stack, writer_stub, user)
    pages = await every_page(small_stub.ListPredictions, query_pb2.ListPredictionsRequest(
        run_id=run_id, page_size=500), stack.metadata(user))
    assert [len(p.predictions) for p in pages] == [3] * 13 + [1]
    assert all(p.ByteSize() <= SMALL_BUDGET for p in pages)
    got = [(p.step, p.sample_index, p.prediction) for page in pages for p in page.predictions]
    assert got == [(step, s, long_text(step, s)) for step in range(1, STEPS + 1)
                   for s in range(SAMPLES)]
    by_epoch = await every_page(small_stub.ListPredictions, query_pb2.ListPredictionsRequest(
        run_id=run_id, epoch=4, page_size=500), stack.metadata(user))
    assert [[(p.step, p.sample_index) for p in page.predictions] for page in by_epoch] == [
        [(4, 0), (4, 1)]]


async def test_compare_sample_pages_by_rows_and_bytes_with_each_rows_judgments(
        stack, writer_stub, query_stub, small_stub):
    user = f"compare-{uuid.uuid4().hex[:6]}"
    run_id = await long_run(stack, writer_stub, user)
    await insert_rows(stack, judgments_table, [
        judgment_row(run_id, user, step, step, 0, "chrf", RULE, 0.5, 0.4) for step in
        range(1, STEPS + 1)])
    md = stack.metadata(user)
    pages = await every_page(small_stub.CompareSample, query_pb2.CompareSampleRequest(
        run_id=run_id, sample_index=0, page_size=500), md)
    assert [len(p.predictions) for p in pages] == [3] * 6 + [2]
    assert all(p.ByteSize() <= SMALL_BUDGET for p in pages)
    assert {(p.run_id, p.sample_index, p.prompt, p.ground_truth) for p in pages} == {
        (run_id, 0, "prompt 0", "truth 0")}
    got = [(p.epoch, p.step, p.prediction, [(j.criterion, j.prediction.step)
                                            for j in p.judgments])
           for page in pages for p in page.predictions]
    assert got == [(step, step, long_text(step, 0), [("chrf", step)])
                   for step in range(1, STEPS + 1)]
    by_rows = await every_page(query_stub.CompareSample, query_pb2.CompareSampleRequest(
        run_id=run_id, sample_index=1, page_size=7), md)
    assert [[p.step for p in page.predictions] for page in by_rows] == [
        list(range(1, 8)), list(range(8, 15)), list(range(15, 21))]
    assert all(not p.judgments for page in by_rows for p in page.predictions)


async def test_compare_sample_token_and_page_size_are_checked(stack, writer_stub, query_stub):
    user = f"compare-token-{uuid.uuid4().hex[:6]}"
    run_id = await long_run(stack, writer_stub, user, steps=3, chars=10)
    md = stack.metadata(user)
    token = (await query_stub.CompareSample(query_pb2.CompareSampleRequest(
        run_id=run_id, sample_index=0, page_size=1), metadata=md)).next_page_token
    await invalid_page_token(query_stub.CompareSample(query_pb2.CompareSampleRequest(
        run_id=run_id, sample_index=1, page_token=token), metadata=md))
    await invalid_page_token(query_stub.ListEpochs(query_pb2.ListEpochsRequest(
        run_id=run_id, page_token=token), metadata=md))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await query_stub.CompareSample(query_pb2.CompareSampleRequest(
            run_id=run_id, sample_index=0, page_size=-1), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(rich_status(err.value))) == ["page_size"]


async def test_list_runs_and_judgments_pages_stop_at_the_byte_budget(stack, writer_stub,
                                                                     small_stub):
    user = f"big-rows-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    ids = [(await create_run(writer_stub, md, name=f"r{i}", config={
        **NO_JUDGING, "notes": "n" * LONG})).id for i in range(5)]
    runs = await every_page(small_stub.ListRuns, query_pb2.ListRunsRequest(page_size=500), md)
    assert [[r.id for r in page.runs] for page in runs] == [ids[:1:-1], ids[1::-1]]
    run_id = await long_run(stack, writer_stub, user, steps=7, samples=1, chars=10)
    await insert_rows(stack, judgments_table, [judgment_row(
        run_id, user, step, step, 0, "chrf", RULE, 0.5, 0.4, reasoning=long_text(step, 0))
        for step in range(1, 8)])
    judged = await every_page(small_stub.ListJudgments, query_pb2.ListJudgmentsRequest(
        run_id=run_id, page_size=500), md)
    assert [[j.prediction.step for j in page.judgments] for page in judged] == [
        [1, 2, 3], [4, 5, 6], [7]]
    assert all(page.ByteSize() <= SMALL_BUDGET for page in runs + judged)


async def test_real_defaults_page_predictions_at_the_writers_longest_text(stack, writer_stub,
                                                                          query_stub):
    """150 predictions of max_text_chars characters (4.9 MB) at the default budget: page
    one stops short of it, page two has the rest, for ListPredictions and CompareSample."""
    budget = QuerySettings(page_token_secret="x", _env_file=None).max_response_bytes
    chars = WriterSettings(_env_file=None).max_text_chars
    user = f"defaults-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    run_id = await long_run(stack, writer_stub, user, steps=150, samples=1, chars=chars)
    listed = await every_page(query_stub.ListPredictions, query_pb2.ListPredictionsRequest(
        run_id=run_id, page_size=500), md)
    compared = await every_page(query_stub.CompareSample, query_pb2.CompareSampleRequest(
        run_id=run_id, sample_index=0, page_size=500), md)
    for pages, field in ((listed, "predictions"), (compared, "predictions")):
        assert [len(getattr(p, field)) for p in pages] == [127, 23]
        assert all(p.ByteSize() <= budget for p in pages)
        assert [p.step for page in pages for p in getattr(page, field)] == list(range(1, 151))
    assert all(p.prediction == long_text(p.step, 0, chars) for page in compared
               for p in page.predictions)
