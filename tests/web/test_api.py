"""The web service's JSON API over the real stack (uvicorn, gRPC, PostgreSQL): every route
answers what the QueryService answers for the same request (same rows, same page tokens,
same errors with their field violations), query parameters map onto request fields, and
each user sees only their own runs."""

import asyncio
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.message import Message

from epochlens.v1 import (
    common_pb2,
    judge_pb2,
    query_pb2,
    writer_pb2,
    writer_pb2_grpc,
)
from tests.helpers import create_run, grid, item
from tests.integration.test_query_judgments import settled
from tests.web.conftest import bearer, field_violations, grpc_answer

EPOCHS, SAMPLES, METRIC_STEPS = 3, 4, 30


@dataclass
class Seeded:
    user: str
    run_id: str
    finished_id: str
    md: tuple


@pytest.fixture(scope="module")
async def seeded(stack) -> Seeded:
    """User web-alice: a running run (3 epochs x 4 samples, two exact matches in epoch 3,
    loss and lr metrics, judged by the stack's rule judge) and a finished one."""
    md = stack.metadata("web-alice")
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        writer = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        run = await create_run(writer, md, name="web alpha")
        rows = grid(EPOCHS, SAMPLES)
        rows[-4:-2] = [item(30, s, epoch=3, prediction=f"truth {s}") for s in (0, 1)]
        await writer.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=run.id, predictions=rows), metadata=md)
        await writer.WriteMetrics(writer_pb2.WriteMetricsRequest(run_id=run.id, metrics=[
            writer_pb2.MetricInput(step=s, name=name, value=value / s)
            for s in range(1, METRIC_STEPS + 1) for name, value in (("loss", 3.0), ("lr", 0.1))]),
            metadata=md)
        finished = await create_run(writer, md, name="web beta", model_name="other")
        await writer.FinishRun(writer_pb2.FinishRunRequest(
            run_id=finished.id, state=common_pb2.RUN_STATE_SUCCEEDED), metadata=md)
    await settled(stack, run.id)
    return Seeded("web-alice", run.id, finished.id, md)


def cases(s: Seeded) -> dict[str, tuple[str, str, list[tuple[str, str]], Message]]:
    """name -> (method, path, query parameters, the same request as a message)."""
    q, run = query_pb2, s.run_id
    runs, preds = "/v1/runs", f"/v1/runs/{run}/predictions"
    return {
        "runs": ("ListRuns", runs, [("page_size", "1")], q.ListRunsRequest(page_size=1)),
        "runs-filtered": ("ListRuns", runs, [("state", "RUN_STATE_SUCCEEDED"),
                                             ("modelContains", "oth")],
                          q.ListRunsRequest(state=2, model_contains="oth")),
        "runs-state-number": ("ListRuns", runs, [("state", "1"), ("name_contains", "ALPHA")],
                              q.ListRunsRequest(state=1, name_contains="ALPHA")),
        "run": ("GetRun", f"{runs}/{run}", [], q.GetRunRequest(run_id=run)),
        "predictions": ("ListPredictions", preds, [("page_size", "5")],
                        q.ListPredictionsRequest(run_id=run, page_size=5)),
        "predictions-filtered": ("ListPredictions", preds, [("epoch", "2"), ("sampleIndex", "1")],
                                 q.ListPredictionsRequest(run_id=run, epoch=2, sample_index=1)),
        "predictions-epoch-0": ("ListPredictions", preds, [("epoch", "0")],
                                q.ListPredictionsRequest(run_id=run, epoch=0)),
        "predictions-passed": ("ListPredictions", preds, [("criterion", "exact_match"),
                                                          ("passed", "true")],
                               q.ListPredictionsRequest(run_id=run, criterion="exact_match",
                                                        passed=True)),
        "epochs": ("ListEpochs", f"{runs}/{run}/epochs", [("page_size", "2")],
                   q.ListEpochsRequest(run_id=run, page_size=2)),
        "sample": ("CompareSample", f"{runs}/{run}/samples/1", [("page_size", "2")],
                   q.CompareSampleRequest(run_id=run, sample_index=1, page_size=2)),
        "judgments": ("ListJudgments", f"{runs}/{run}/judgments", [("page_size", "7")],
                      q.ListJudgmentsRequest(run_id=run, page_size=7)),
        "judgments-filtered": ("ListJudgments", f"{runs}/{run}/judgments",
                               [("epoch", "3"), ("criterion", "exact_match"),
                                ("judge_type", "JUDGE_TYPE_RULE")],
                               q.ListJudgmentsRequest(run_id=run, epoch=3, criterion="exact_match",
                                                      judge_type=judge_pb2.JUDGE_TYPE_RULE)),
        "summary": ("GetRunSummary", f"{runs}/{run}/summary", [],
                    q.GetRunSummaryRequest(run_id=run)),
        "revisions": ("ListJudgmentRevisions", f"{runs}/{run}/revisions",
                      [("step", "20"), ("sample_index", "1"), ("criterion", "exact_match")],
                      q.ListJudgmentRevisionsRequest(run_id=run, step=20, sample_index=1,
                                                     criterion="exact_match")),
        "metrics": ("ListMetrics", f"{runs}/{run}/metrics",
                    [("names", "loss"), ("names", "lr"), ("max_points", "4")],
                    q.ListMetricsRequest(run_id=run, names=["loss", "lr"], max_points=4)),
        "metrics-range": ("ListMetrics", f"{runs}/{run}/metrics",
                          [("startStep", "5"), ("end_step", "9")],
                          q.ListMetricsRequest(run_id=run, start_step=5, end_step=9)),
        "compare": ("CompareRuns", f"{runs}/{run}:compare",
                    [("baseline_epoch", "1"), ("maxChanges", "3")],
                    q.CompareRunsRequest(run_id=run, baseline_epoch=1, max_changes=3)),
        "compare-best": ("CompareRuns", f"{runs}/{run}:compare",
                         [("epoch", "3"), ("baselineChoice", "EPOCH_CHOICE_BEST"),
                          ("best_criterion", "exact_match")],
                         q.CompareRunsRequest(run_id=run, epoch=3,
                                              baseline_choice=q.EPOCH_CHOICE_BEST,
                                              best_criterion="exact_match")),
    }


@pytest.mark.parametrize("case", list(cases(Seeded("", "RUN", "RUN", ()))))
async def test_route_answers_what_grpc_answers_page_by_page(case, stack, seeded, http):
    method, path, params, request = cases(seeded)[case]
    pages = 0
    while True:
        expected = await grpc_answer(stack, method, request, seeded.md)
        answer = await http.get(path, params=params, headers=bearer(stack, seeded.user))
        assert (answer.status_code, answer.json()) == expected
        assert answer.status_code == 200, expected
        pages += 1
        token = expected[1].get("nextPageToken", "")
        if not token:
            break
        params = [(k, v) for k, v in params if k != "page_token"] + [("page_token", token)]
        request.page_token = token
    expected_pages = {"runs": 2, "predictions": 3, "epochs": 2, "sample": 2, "judgments": None}
    if expected_pages.get(case):
        assert pages == expected_pages[case]
    if case == "judgments":
        assert pages > 1


async def test_rows_are_the_seeded_rows(stack, seeded, http):
    """Spot check of the mapping itself: lowerCamelCase names, int64 as strings, enums by
    name, zero values printed, optional fields only when set."""
    auth = bearer(stack, seeded.user)
    run = (await http.get(f"/v1/runs/{seeded.run_id}", headers=auth)).json()
    assert (run["id"], run["name"], run["modelName"], run["state"]) == (
        seeded.run_id, "web alpha", "tiny", "RUN_STATE_RUNNING")
    body = (await http.get(f"/v1/runs/{seeded.run_id}/predictions",
                           params={"epoch": "3", "sample_index": "0"}, headers=auth)).json()
    (row,) = body["predictions"]
    assert (row["epoch"], row["step"], row["sampleIndex"], row["prediction"]) == (
        "3", "30", "0", "truth 0")
    assert body["nextPageToken"] == ""
    assert "completionTokens" not in row and row["groundTruth"] == "truth 0"
    passed = (await http.get(f"/v1/runs/{seeded.run_id}/predictions",
                             params={"criterion": "exact_match", "passed": "true"},
                             headers=auth)).json()
    assert [(p["step"], p["sampleIndex"]) for p in passed["predictions"]] == [("30", "0"),
                                                                              ("30", "1")]


async def test_errors_are_the_grpc_errors(stack, seeded, http):
    auth, run = bearer(stack, seeded.user), seeded.run_id
    first = (await http.get(f"/v1/runs/{run}/predictions", params={"page_size": "2"},
                            headers=auth)).json()
    token = first["nextPageToken"]
    for params, request in (
        ({"page_token": token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")},
         query_pb2.ListPredictionsRequest(run_id=run, page_token=token[:-3] + (
             "AAA" if token[-3:] != "AAA" else "BBB"))),
        ({"page_token": token, "epoch": "1"},
         query_pb2.ListPredictionsRequest(run_id=run, page_token=token, epoch=1)),
        ({"page_size": "-1"}, query_pb2.ListPredictionsRequest(run_id=run, page_size=-1)),
    ):
        expected = await grpc_answer(stack, "ListPredictions", request, seeded.md)
        answer = await http.get(f"/v1/runs/{run}/predictions", params=params, headers=auth)
        assert (answer.status_code, answer.json()) == expected
        assert answer.status_code == 400
        assert [v["field"] for v in field_violations(answer.json())] == [
            "page_size" if "page_size" in params else "page_token"]


async def test_another_users_run_is_not_found(stack, seeded, http):
    other = stack.metadata("web-bob")
    for path, method, request in (
        (f"/v1/runs/{seeded.run_id}", "GetRun", query_pb2.GetRunRequest(run_id=seeded.run_id)),
        (f"/v1/runs/{seeded.run_id}/predictions", "ListPredictions",
         query_pb2.ListPredictionsRequest(run_id=seeded.run_id)),
        (f"/v1/runs/{seeded.run_id}/samples/0", "CompareSample",
         query_pb2.CompareSampleRequest(run_id=seeded.run_id, sample_index=0)),
    ):
        expected = await grpc_answer(stack, method, request, other)
        answer = await http.get(path, headers=bearer(stack, "web-bob"))
        assert (answer.status_code, answer.json()) == expected
        assert answer.status_code == 404
    listed = (await http.get("/v1/runs", headers=bearer(stack, "web-bob"))).json()
    assert seeded.run_id not in [r["id"] for r in listed.get("runs", [])]


async def test_no_token_or_a_bad_one_is_401(stack, seeded, http):
    path = f"/v1/runs/{seeded.run_id}"
    missing = await http.get(path)
    assert missing.status_code == 401
    assert missing.json()["code"] == 16 and missing.json()["message"].startswith("not signed in")
    scheme = await http.get(path, headers={"Authorization": "Basic abc"})
    assert (scheme.status_code, scheme.json()["code"]) == (401, 16)
    forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    expected = await grpc_answer(stack, "GetRun", query_pb2.GetRunRequest(run_id=seeded.run_id),
                                 (("authorization", f"Bearer {forged}"),))
    answer = await http.get(path, headers={"Authorization": f"Bearer {forged}"})
    assert (answer.status_code, answer.json()) == expected
    assert answer.status_code == 401


@pytest.mark.parametrize(("params", "violations"), [
    ({"colour": "red"}, [("colour", "unknown parameter: ListPredictionsRequest has no such "
                                    "field")]),
    ({"epoch": "two"}, [("epoch", "not an integer: 'two'")]),
    ({"page_size": "2147483648"}, [("page_size", "2147483648 is out of range "
                                                 "[-2147483648, 2147483647]")]),
    ({"passed": "yes", "criterion": "x"}, [("passed", "expected true or false, got 'yes'")]),
    ({"run_id": "x"}, [("run_id", "is set by the URL path; leave it out of the query")]),
    ([("epoch", "1"), ("epoch", "2")], [("epoch", "given more than once (it is not a "
                                                  "repeated field)")]),
])
async def test_bad_parameters_are_400_with_field_violations(params, violations, stack, seeded,
                                                            http):
    answer = await http.get(f"/v1/runs/{seeded.run_id}/predictions", params=params,
                            headers=bearer(stack, seeded.user))
    assert answer.status_code == 400
    body = answer.json()
    assert (body["code"], body["message"]) == (
        3, "invalid request parameters for ListPredictions")
    assert [(v["field"], v["description"]) for v in field_violations(body)] == violations


async def test_bad_enum_and_path_value_are_400(stack, seeded, http):
    auth = bearer(stack, seeded.user)
    bad_enum = (await http.get("/v1/runs", params={"state": "DONE"}, headers=auth)).json()
    (violation,) = field_violations(bad_enum)
    assert violation["field"] == "state"
    assert violation["description"].startswith("not a value of RunState: 'DONE' (one of "
                                                "RUN_STATE_UNSPECIFIED, RUN_STATE_RUNNING")
    bad_path = await http.get(f"/v1/runs/{seeded.run_id}/samples/first", headers=auth)
    assert bad_path.status_code == 400
    assert field_violations(bad_path.json()) == [
        {"field": "sample_index", "description": "not an integer: 'first'"}]


async def test_unknown_api_path_is_a_json_404(stack, http):
    answer = await http.get("/v1/nothing/here", headers=bearer(stack, "web-alice"))
    assert (answer.status_code, answer.json()) == (
        404, {"code": 5, "message": "no API route GET /v1/nothing/here"})


async def test_security_headers_on_api_answers_and_errors(stack, seeded, http):
    for answer in (await http.get("/v1/runs", headers=bearer(stack, seeded.user)),
                   await http.get("/v1/runs"), await http.get("/v1/nothing")):
        assert answer.headers["content-security-policy"] == (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["cache-control"] == "no-store"


async def test_concurrent_calls_of_two_users_stay_apart(stack, seeded, http):
    """Many requests at once on the one channel: each gets its own caller's answer."""
    async def runs_of(user: str) -> list[str]:
        body = (await http.get("/v1/runs", headers=bearer(stack, user))).json()
        return sorted(r["id"] for r in body.get("runs", []))

    answers = await asyncio.gather(*(runs_of(u) for u in ["web-alice", "web-nobody"] * 10))
    assert answers[0::2] == [sorted([seeded.run_id, seeded.finished_id])] * 10
    assert answers[1::2] == [[]] * 10
