"""The web JSON route of CompareRuns (`GET /v1/runs/{run_id}:compare`) driven as a hostile
user: another user's run as the baseline (404 with the body of a missing run but for the id),
epochs out of range or not numbers, a huge max_changes (clamped), runs without shared samples;
never a 5xx."""

import uuid

import grpc

from epochlens.v1 import writer_pb2, writer_pb2_grpc
from tests.helpers import create_run, item
from tests.integration.test_query_judgments import NO_JUDGING, settled
from tests.web.conftest import bearer, field_violations


async def own_run(stack, user: str, **overrides) -> str:
    md = stack.metadata(user)
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        writer = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        run = await create_run(writer, md, config=NO_JUDGING)
        await writer.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=run.id, predictions=[item(1, s, epoch=1, **overrides) for s in range(3)]),
            metadata=md)
    await settled(stack, run.id)
    return run.id


async def test_compare_route_with_hostile_parameters(stack, http):
    me, other = (f"web-cmp-{uuid.uuid4().hex[:6]}" for _ in range(2))
    mine = await own_run(stack, me)
    apart = await own_run(stack, me, prompt="elsewhere")
    theirs = await own_run(stack, other)
    auth, path = bearer(stack, me), f"/v1/runs/{mine}:compare"
    bodies = []
    for baseline in (theirs, str(uuid.uuid4())):
        answer = await http.get(path, params={"baselineRunId": baseline}, headers=auth)
        assert answer.status_code == 404
        bodies.append(answer.text.replace(baseline, "ID"))
    assert bodies[0] == bodies[1]
    for params, field in (({"epoch": str(2**63 - 1)}, "epoch"), ({"epoch": "-1"}, "epoch"),
                          ({"baseline_epoch": "7"}, "baseline_epoch"),
                          ({"baselineChoice": "EPOCH_CHOICE_BEST"}, "best_criterion")):
        answer = await http.get(path, params=params, headers=auth)
        assert answer.status_code == 400, (params, answer.text)
        assert field in [v["field"] for v in field_violations(answer.json())], answer.text
    for params in ({"epoch": "abc"}, {"epoch": "1e3"}, {"maxChanges": "NaN"},
                   {"epoch": str(2**64)}):
        answer = await http.get(path, params=params, headers=auth)
        assert answer.status_code == 400, (params, answer.text)
    huge = await http.get(path, params={"maxChanges": str(2**31 - 1)}, headers=auth)
    assert huge.status_code == 200 and int(huge.json()["sharedSamples"]) == 3
    none = await http.get(path, params={"baselineRunId": apart}, headers=auth)
    assert none.status_code == 200, none.text
    assert int(none.json().get("sharedSamples", 0)) == 0 and not none.json().get("deltas")
