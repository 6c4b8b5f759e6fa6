"""`epochlens metrics RUN` against the real in-process services (PostgreSQL and SQLite)."""

import json

from epochlens.v1 import writer_pb2
from tests.cli.test_views import cli, ok, rows
from tests.helpers import create_run


async def seeded_run(stack, writer_stub) -> str:
    md = stack.metadata("carol")
    run = await create_run(writer_stub, md, name="with-metrics")
    metrics = [writer_pb2.MetricInput(step=s, name="loss", value=10.0 - s) for s in range(1, 11)]
    metrics += [writer_pb2.MetricInput(step=10, name="eval_accuracy", value=0.75)]
    await writer_stub.WriteMetrics(writer_pb2.WriteMetricsRequest(run_id=run.id,
                                                                  metrics=metrics), metadata=md)
    return run.id


async def test_metrics_lists_each_series(stack, writer_stub):
    run_id = await seeded_run(stack, writer_stub)
    out = ok(await cli(stack, "carol", "metrics", run_id))
    assert rows(out, "loss") == [["loss", "10", "1-10", "9", "0", "0", "9", "@%#*+=-:._"]]
    assert rows(out, "eval_accuracy") == [["eval_accuracy", "1", "10-10", "0.75", "0.75",
                                           "0.75", "0.75", "+"]]


async def test_metrics_json_downsampled_and_filtered(stack, writer_stub):
    run_id = await seeded_run(stack, writer_stub)
    out = ok(await cli(stack, "carol", "metrics", run_id, "--name", "loss", "--max-points",
                       "5", "--json"))
    (series,) = json.loads(out)
    assert (series["name"], series["stored_count"], series["downsampled"]) == ("loss", 10, True)
    assert [p["step"] for p in series["points"]] == [2, 4, 6, 8, 10]
    assert [p["count"] for p in series["points"]] == [2] * 5


async def test_metrics_of_another_users_run_is_one_error_line(stack, writer_stub):
    run_id = await seeded_run(stack, writer_stub)
    result = await cli(stack, "dave", "metrics", run_id)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: run {run_id} not found"
