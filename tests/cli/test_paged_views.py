"""The `epochlens` views of a run whose pages stop at the query service's byte budget
(PostgreSQL and SQLite): export, compare, summary and report read every page and show
every prediction once, as they do for small runs.

The query service here has a 32 KiB budget and a 64 KiB message limit, and the CLI accepts
64 KiB messages: 40 predictions of 10,000 characters (400 KB) need several pages, as a
large run needs several under the real 16 MiB limit.
"""

import json
import re

import pytest

from services.judge.models import judgments_table
from tests.cli.test_views import cli, ok
from tests.integration.test_query_judgments import RULE, insert_rows, judgment_row
from tests.integration.test_query_safety import (
    SAMPLES,
    SMALL_BUDGET,
    SMALL_MESSAGE,
    SMALL_METRICS,
    STEPS,
    long_run,
    long_text,
    own_query,
)

USER = "paged-viewer"


@pytest.fixture
async def small_env(stack):
    """CLI environment for a query service with small pages (and a CLI with small messages)."""
    server = await own_query(stack, max_response_bytes=SMALL_BUDGET,
                             max_message_bytes=SMALL_MESSAGE, **SMALL_METRICS)
    yield {"EPOCHLENS_CLI_QUERY_ADDRESS": server.address,
           "EPOCHLENS_CLI_MAX_MESSAGE_BYTES": str(SMALL_MESSAGE)}
    await server.stop(0)


async def judged_long_run(stack, writer_stub) -> str:
    """long_run() with one chrf judgment per prediction of sample 0."""
    run_id = await long_run(stack, writer_stub, USER)
    await insert_rows(stack, judgments_table, [
        judgment_row(run_id, USER, step, step, 0, "chrf", RULE, 0.5, 0.4)
        for step in range(1, STEPS + 1)])
    return run_id


EVERY_KEY = [(step, s) for step in range(1, STEPS + 1) for s in range(SAMPLES)]


async def test_export_reads_every_page_once(stack, writer_stub, small_env, tmp_path):
    run_id = await judged_long_run(stack, writer_stub)
    records = [json.loads(line) for line in ok(await cli(
        stack, USER, "export", run_id, **small_env)).splitlines()]
    assert [(r["step"], r["sample_index"]) for r in records] == EVERY_KEY
    assert all(r["prediction"] == long_text(r["step"], r["sample_index"]) for r in records)
    assert [len(r["judgments"]) for r in records] == [1, 0] * STEPS
    target = tmp_path / "long.csv"
    result = await cli(stack, USER, "export", run_id, "--format", "csv", "-o", str(target),
                       **small_env)
    assert f"exported {STEPS * SAMPLES} predictions to {target}" in result.stderr
    assert target.read_text().count("step 7 sample 1 x") == 1


async def test_compare_reads_every_page(stack, writer_stub, small_env):
    run_id = await judged_long_run(stack, writer_stub)
    data = json.loads(ok(await cli(stack, USER, "compare", run_id, "0", "--json",
                                   **small_env)))
    assert (data["prompt"], data["ground_truth"]) == ("prompt 0", "truth 0")
    assert "next_page_token" not in data
    assert [(p["step"], p["prediction"], [j["criterion"] for j in p["judgments"]])
            for p in data["predictions"]] == [
        (step, long_text(step, 0), ["chrf"]) for step in range(1, STEPS + 1)]
    shown = ok(await cli(stack, USER, "compare", run_id, "1", **small_env))
    assert re.findall(r"^epoch (\d+) ", shown, flags=re.MULTILINE) == [
        str(step) for step in range(1, STEPS + 1)]
    assert f"exact match at 0 of {STEPS} epochs" in shown


async def test_summary_and_report_count_every_prediction(stack, writer_stub, small_env,
                                                         tmp_path):
    run_id = await judged_long_run(stack, writer_stub)
    summary = json.loads(ok(await cli(stack, USER, "summary", run_id, "--json", **small_env)))
    assert [(e["epoch"], e["prediction_count"]) for e in summary["epochs"]] == [
        (step, SAMPLES) for step in range(1, STEPS + 1)]
    target = tmp_path / "long.html"
    result = await cli(stack, USER, "report", run_id, "-o", str(target), **small_env)
    assert f"{STEPS} epochs, {SAMPLES} samples, {STEPS * SAMPLES} predictions" in ok(result)
    block = re.search(r'<script type="application/json" id="report-data">(.*?)</script>',
                      target.read_text(), flags=re.DOTALL)
    payload = json.loads(block.group(1))
    assert [[p["step"] for p in s["predictions"]] for s in payload["samples"]] == [
        list(range(1, STEPS + 1))] * SAMPLES
    assert all(p["text"] == long_text(p["step"], s["index"])
               for s in payload["samples"] for p in s["predictions"])
