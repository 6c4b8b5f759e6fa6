"""The run views of the `epochlens` command against the real in-process services
(PostgreSQL and SQLite): listings, --json, paging, compare diffs, the summary's
exact-match counts, watch while a run trains, export round trips, and every
error path as one line and an exit status. Judgments (inserted into schema
`judge` directly, see tests/integration/test_query_judgments.py) show in
summary, compare and export.

The servers run on the session event loop of this thread, so each CLI call runs
in a worker thread (asyncio.to_thread) while the loop keeps serving.
"""

import asyncio
import csv
import io
import json
import re
import socket
import uuid

from typer.testing import CliRunner

from epochlens.v1 import common_pb2, judge_pb2, writer_pb2
from services.cli.diff import Segment, plain, word_diff
from services.cli.main import app
from services.cli.render import sparkline
from services.common.auth import mint_token
from services.common.config import AuthSettings
from services.judge.models import judgments_table, run_llm_state_table
from tests.helpers import create_run
from tests.integration.test_query_judgments import (
    HUMAN,
    LLM_MODEL,
    NO_JUDGING,
    insert_rows,
    judgment_row,
    llm_state_row,
    seed_rows,
    settled,
)

EPOCHS, SAMPLES, GRADED = 3, 5, 4  # sample 4 has no ground truth


def predicted(epoch: int, sample: int) -> str:
    """Sample s is answered right from epoch s+1 on (odd samples with trailing whitespace)."""
    if sample >= GRADED:
        return f"free text {epoch}"
    if sample < epoch:
        return f"answer {sample}" + (" \n" if sample % 2 else "")
    return f"guess {epoch} for {sample}"


def seeded_inputs(epochs: int = EPOCHS) -> list[common_pb2.PredictionInput]:
    items = []
    for e in range(1, epochs + 1):
        for s in range(SAMPLES):
            truth = {"ground_truth": f"answer {s}"} if s < GRADED else {}
            items.append(common_pb2.PredictionInput(
                epoch=e, step=e * 10, sample_index=s, prompt=f"prompt {s}", prediction=predicted(
                    e, s), generation_time_ms=1.25 * s, completion_tokens=e + s, **truth))
    return items


async def write(stack, writer_stub, user: str, run_id: str, items) -> None:
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run_id, predictions=items), metadata=stack.metadata(user))


async def seeded(stack, writer_stub, user: str = "viewer") -> str:
    """A run of seeded_inputs() with the rule judges off, once the judge has finished it:
    it has no judgment unless a test inserts some."""
    run = await create_run(writer_stub, stack.metadata(user), name="seeded", config=NO_JUDGING)
    await write(stack, writer_stub, user, run.id, seeded_inputs())
    await settled(stack, run.id)
    return run.id


async def cli(stack, user: str | None, *args: str, **env: str | None):
    """Runs `epochlens ARGS` in a worker thread with the query address and a token."""
    base = {"EPOCHLENS_CLI_QUERY_ADDRESS": stack.query.address, "COLUMNS": "200",
            "NO_COLOR": "1", "FORCE_COLOR": None,
            "EPOCHLENS_CLI_TOKEN": mint_token(stack.auth, user) if user else None}
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env={**base, **env})


def ok(result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result.stdout


def rows(stdout: str, first: str) -> list[list[str]]:
    """Cells (two or more spaces apart) of the table rows whose first cell is `first`."""
    cells = [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines()]
    return [c for c in cells if c[0] == first]


def test_word_diff_marks_removed_and_inserted_words():
    segments = word_diff("the cat sat", "the dog sat down")
    assert "".join(s.text for s in segments if s.op != "delete") == "the dog sat down"
    assert "".join(s.text for s in segments if s.op != "insert") == "the cat sat"
    assert plain(segments) == "the [-cat-]{+dog+} sat{+ down+}"
    assert word_diff("same", "same") == [Segment("equal", "same")]


def test_sparkline_is_ascii_low_to_high():
    assert sparkline([0.0, 0.25, 0.5, 0.75, 1.0, None]) == "_:+#@?"


async def test_runs_lists_own_runs_newest_first(stack, writer_stub):
    user = f"runs-{uuid.uuid4().hex[:6]}"
    ids = [(await create_run(writer_stub, stack.metadata(user), name=f"r{i}")).id
           for i in range(3)]
    await create_run(writer_stub, stack.metadata("someone-else"), name="not-mine")
    listed = json.loads(ok(await cli(stack, user, "runs", "--json")))
    assert [r["id"] for r in listed] == list(reversed(ids))
    assert listed[0]["name"] == "r2" and listed[0]["state"] == "RUN_STATE_RUNNING"
    table = ok(await cli(stack, user, "runs", EPOCHLENS_CLI_PAGE_SIZE="2"))
    assert [r[1] for r in rows(table, ids[0])] == ["r0"]
    assert "not-mine" not in table and table.index(ids[2]) < table.index(ids[0])


async def test_runs_kind_column_and_filter(stack, writer_stub):
    user = f"kinds-{uuid.uuid4().hex[:6]}"
    training = await create_run(writer_stub, stack.metadata(user), name="t-run")
    evaluation = await create_run(writer_stub, stack.metadata(user), name="e-run",
                                  kind=common_pb2.RUN_KIND_EVALUATION)
    table = ok(await cli(stack, user, "runs"))
    assert [r[3] for r in rows(table, training.id)] == ["training"]
    assert [r[3] for r in rows(table, evaluation.id)] == ["evaluation"]
    only = json.loads(ok(await cli(stack, user, "runs", "--kind", "evaluation", "--json")))
    assert [(r["id"], r["kind"]) for r in only] == [(evaluation.id, "RUN_KIND_EVALUATION")]
    only = json.loads(ok(await cli(stack, user, "runs", "--kind", "training", "--json")))
    assert [r["id"] for r in only] == [training.id]


async def test_epochs_table_and_json(stack, writer_stub):
    run_id = await seeded(stack, writer_stub)
    listed = json.loads(ok(await cli(stack, "viewer", "epochs", run_id, "--json")))
    assert [(e["epoch"], e["prediction_count"], e["latest_step"]) for e in listed] == [
        (1, 5, 10), (2, 5, 20), (3, 5, 30)]
    table = ok(await cli(stack, "viewer", "epochs", run_id))
    assert [r[:3] for r in rows(table, "2")] == [["2", "5", "20"]]


async def test_predictions_default_limit_and_filters(stack, writer_stub):
    run_id = await seeded(stack, writer_stub)
    result = await cli(stack, "viewer", "predictions", run_id, EPOCHLENS_CLI_LIST_LIMIT="3")
    assert [r[:4] for r in rows(ok(result), "1")] == [
        ["1", "10", "0", "answer 0"], ["1", "10", "1", "guess 1 for 1"],
        ["1", "10", "2", "guess 1 for 2"]]
    assert [r[5] for r in rows(result.stdout, "1")] == ["[match]", "[miss]", "[miss]"]
    assert result.stderr.strip() == "showing the first 3; more with --limit N or --all"
    one = json.loads(ok(await cli(stack, "viewer", "predictions", run_id, "--epoch", "2",
                                  "--sample", "1", "--json")))
    assert [(p["epoch"], p["sample_index"], p["prediction"]) for p in one] == [
        (2, 1, "answer 1 \n")]


async def test_predictions_all_pages_through_every_page(stack, writer_stub):
    run_id = await seeded(stack, writer_stub)
    result = await cli(stack, "viewer", "predictions", run_id, "--all", "--json",
                       EPOCHLENS_CLI_PAGE_SIZE="2", EPOCHLENS_CLI_LIST_LIMIT="1")
    listed = json.loads(ok(result))
    assert [(p["step"], p["sample_index"]) for p in listed] == [
        (e * 10, s) for e in range(1, EPOCHS + 1) for s in range(SAMPLES)]
    assert result.stderr == ""
    assert "ground_truth" not in listed[4] and listed[3]["ground_truth"] == "answer 3"
    limited = json.loads(ok(await cli(stack, "viewer", "predictions", run_id, "--limit", "7",
                                      "--json", EPOCHLENS_CLI_PAGE_SIZE="2")))
    assert len(limited) == 7


async def test_model_text_is_not_console_markup(stack, writer_stub):
    run = await create_run(writer_stub, stack.metadata("viewer"))
    text = "[bold red]loud[/] [link=x]y[/link]"
    await write(stack, writer_stub, "viewer", run.id, [common_pb2.PredictionInput(
        epoch=1, step=1, sample_index=0, prompt="p", prediction=text)])
    out = ok(await cli(stack, "viewer", "predictions", run.id))
    assert text in out
    assert text in ok(await cli(stack, "viewer", "compare", run.id, "0"))


async def test_compare_shows_prompt_once_and_word_diffs(stack, writer_stub):
    run_id = await seeded(stack, writer_stub)
    out = ok(await cli(stack, "viewer", "compare", run_id, "2"))
    assert out.count("prompt 2") == 1
    assert [line.rstrip() for line in out.splitlines()] == [
        f"run {run_id}  sample 2", "prompt", "  prompt 2", "ground truth", "  answer 2", "",
        "epoch 1  step 10  [miss]", "  guess 1 for 2",
        "epoch 2  step 20  [miss]", "  guess [-1-]{+2+} for 2",
        "epoch 3  step 30  [match]", "  [-guess-]{+answer+} 2[- for 2-]", "",
        "exact match at 1 of 3 epochs, first at epoch 3"]
    data = json.loads(ok(await cli(stack, "viewer", "compare", run_id, "1", "--json")))
    assert (data["prompt"], data["ground_truth"], data["sample_index"]) == (
        "prompt 1", "answer 1", 1)
    assert [(p["epoch"], p["exact_match"]) for p in data["predictions"]] == [
        (1, False), (2, True), (3, True)]
    untruthful = json.loads(ok(await cli(stack, "viewer", "compare", run_id, "4", "--json")))
    assert [p["exact_match"] for p in untruthful["predictions"]] == [None, None, None]


async def test_summary_counts_exact_matches_per_epoch(stack, writer_stub):
    run_id = await seeded(stack, writer_stub)
    data = json.loads(ok(await cli(stack, "viewer", "summary", run_id, "--json",
                                   EPOCHLENS_CLI_EXPORT_PAGE_SIZE="4")))
    assert data["run"]["id"] == run_id and data["sparkline"] == ":+#"
    assert data["epochs"] == [
        {"epoch": e, "prediction_count": SAMPLES, "with_ground_truth": GRADED,
         "exact_match_count": e, "exact_match_rate": e / GRADED, "latest_step": e * 10}
        for e in range(1, EPOCHS + 1)]
    out = ok(await cli(stack, "viewer", "summary", run_id))
    assert [r for e in "123" for r in rows(out, e)] == [
        ["1", "5", "1", "4", "25.0%", "10"], ["2", "5", "2", "4", "50.0%", "20"],
        ["3", "5", "3", "4", "75.0%", "30"]]
    assert "exact-match rate, epoch 1 to 3: :+#  (25.0% -> 75.0%" in out
    assert "score" not in out.lower() and "cost" not in out.lower()


async def test_watch_prints_each_epoch_as_it_lands_and_exits_when_finished(stack, writer_stub):
    user = "watcher"
    run = await create_run(writer_stub, stack.metadata(user), name="training")
    watching = asyncio.ensure_future(cli(stack, user, "watch", run.id,
                                         EPOCHLENS_CLI_WATCH_INTERVAL_S="0.05"))
    items = seeded_inputs()
    for epoch in range(EPOCHS):
        await asyncio.sleep(0.3)
        await write(stack, writer_stub, user, run.id, items[epoch * SAMPLES:(epoch + 1) * SAMPLES])
    await asyncio.sleep(0.3)
    assert not watching.done()
    await writer_stub.FinishRun(writer_pb2.FinishRunRequest(run_id=run.id),
                                metadata=stack.metadata(user))
    out = ok(await asyncio.wait_for(watching, 30))
    assert out.splitlines() == [
        f"watching run {run.id} (training) (Ctrl-C stops)",
        "epoch 1  step 10  5 predictions  exact match 1/4 (25.0%)",
        "epoch 2  step 20  5 predictions  exact match 2/4 (50.0%)",
        "epoch 3  step 30  5 predictions  exact match 3/4 (75.0%)",
        f"run {run.id} succeeded"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_own_query(stack, port: int):
    """A second query service on `port` over the stack's database (stopped and restarted by
    the test to simulate an outage)."""
    from services.query.config import QuerySettings
    from services.query.server import start as start_query
    from tests.conftest import PAGE_SECRET, READER_ROLE, pg_url
    where = ({"database_url": pg_url(READER_ROLE, stack.database)} if stack.database
             else {"sqlite_dir": stack.sqlite_dir})
    return await start_query(QuerySettings(port=port, page_token_secret=PAGE_SECRET,
                                           shutdown_grace_s=0, _env_file=None, **where),
                             stack.auth)


async def test_watch_rides_out_a_query_service_outage(stack, writer_stub):
    user = "watcher-outage"
    run_id = await seeded(stack, writer_stub, user)
    port = free_port()
    server = await start_own_query(stack, port)
    watching = asyncio.ensure_future(cli(
        stack, user, "watch", run_id, EPOCHLENS_CLI_WATCH_INTERVAL_S="0.1",
        EPOCHLENS_CLI_QUERY_ADDRESS=f"127.0.0.1:{port}", EPOCHLENS_CLI_TIMEOUT_S="1"))
    await asyncio.sleep(0.5)
    await server.stop(0)
    await asyncio.sleep(0.6)
    assert not watching.done()
    await writer_stub.FinishRun(writer_pb2.FinishRunRequest(run_id=run_id),
                                metadata=stack.metadata(user))
    server = await start_own_query(stack, port)
    try:
        result = await asyncio.wait_for(watching, 30)
    finally:
        await server.stop(0)
    out = ok(result)
    assert out.splitlines()[-1] == f"run {run_id} succeeded"
    assert "warning: cannot reach the query service" in result.stderr
    assert sum(line.startswith("epoch ") for line in out.splitlines()) == EPOCHS


async def test_watch_gives_up_after_max_failures(stack, writer_stub):
    user = "watcher-gives-up"
    run_id = await seeded(stack, writer_stub, user)
    port = free_port()
    server = await start_own_query(stack, port)
    watching = asyncio.ensure_future(cli(
        stack, user, "watch", run_id, EPOCHLENS_CLI_WATCH_INTERVAL_S="0.05",
        EPOCHLENS_CLI_WATCH_MAX_FAILURES="2", EPOCHLENS_CLI_QUERY_ADDRESS=f"127.0.0.1:{port}",
        EPOCHLENS_CLI_TIMEOUT_S="1"))
    await asyncio.sleep(0.5)
    await server.stop(0)
    result = await asyncio.wait_for(watching, 30)
    assert result.exit_code == 1
    assert result.stderr.count("warning: cannot reach the query service") == 2
    assert result.stderr.splitlines()[-1].startswith("error: cannot reach the query service")


async def test_watch_of_a_finished_run_prints_everything_and_exits(stack, writer_stub):
    run_id = await seeded(stack, writer_stub)
    await writer_stub.FinishRun(writer_pb2.FinishRunRequest(
        run_id=run_id, state=common_pb2.RUN_STATE_FAILED), metadata=stack.metadata("viewer"))
    out = ok(await cli(stack, "viewer", "watch", run_id, "--interval", "5"))
    assert out.splitlines()[1:] == [
        f"epoch {e}  step {e * 10}  5 predictions  exact match {e}/4 ({e * 25:.1f}%)"
        for e in range(1, EPOCHS + 1)] + [f"run {run_id} failed"]


def expected_records(run_id: str, judgments: dict | None = None
                     ) -> dict[tuple[int, int], dict]:
    """The seeded predictions as export writes them; with `judgments` (identity -> list)
    each has its "judgments" list (empty for an identity not in it)."""
    records = {(p.step, p.sample_index): {
        "run_id": run_id, "epoch": p.epoch, "step": p.step, "sample_index": p.sample_index,
        "prompt": p.prompt, "ground_truth": p.ground_truth if p.HasField("ground_truth") else None,
        "prediction": p.prediction, "generation_time_ms": p.generation_time_ms,
        "prompt_tokens": None, "completion_tokens": p.completion_tokens}
        for p in seeded_inputs()}
    if judgments is not None:
        for key, record in records.items():
            record["judgments"] = judgments.get(key, [])
    return records


def keyed(records: list[dict]) -> dict[tuple[int, int], dict]:
    """Records by identity, create_time checked and dropped; fails on a repeated row."""
    out = {}
    for r in records:
        assert r.pop("create_time").endswith("Z")
        out[(r["step"], r["sample_index"])] = r
    assert len(out) == len(records), "a prediction was exported twice"
    return out


async def test_export_jsonl_to_a_file_round_trips_every_row_once(stack, writer_stub, tmp_path):
    run_id = await seeded(stack, writer_stub)
    target = tmp_path / "out.jsonl"
    result = await cli(stack, "viewer", "export", run_id, "--format", "jsonl", "-o", str(target),
                       EPOCHLENS_CLI_EXPORT_PAGE_SIZE="4", EPOCHLENS_CLI_PREFETCH_PAGES="1")
    assert ok(result) == ""
    assert f"exported {EPOCHS * SAMPLES} predictions to {target}" in result.stderr
    assert "exporting" in result.stderr  # the progress bar's final state
    lines = target.read_text(encoding="utf-8").splitlines()
    assert len(lines) == EPOCHS * SAMPLES
    records = [json.loads(line) for line in lines]
    assert [(r["step"], r["sample_index"]) for r in records] == sorted(expected_records(run_id))
    assert keyed(records) == expected_records(run_id, {})
    assert list(tmp_path.iterdir()) == [target]


async def test_export_csv_to_stdout_round_trips_every_row_once(stack, writer_stub):
    run_id = await seeded(stack, writer_stub)
    result = await cli(stack, "viewer", "export", run_id, "--format", "csv",
                       EPOCHLENS_CLI_EXPORT_PAGE_SIZE="2")
    records = list(csv.DictReader(io.StringIO(ok(result), newline="")))
    assert result.stderr == ""
    ints = ("epoch", "step", "sample_index", "completion_tokens")
    for r in records:
        r.update({k: int(r[k]) for k in ints}, generation_time_ms=float(r["generation_time_ms"]))
        r.update({k: r[k] or None for k in ("ground_truth", "prompt_tokens")})
    assert keyed(records) == expected_records(run_id)
    assert records[SAMPLES + 1]["prediction"] == "answer 1 \n"


JUDGED = "judged-viewer"
PAUSED = "openai: 401 invalid api key"


async def judged(stack, writer_stub) -> str:
    """The seeded run with seed_rows() judgments: chrf 0.1 * (epoch + sample), pass at 0.4;
    helpfulness epoch + sample + 4, pass at 7, sample 4's unscored and each billed."""
    run_id = await seeded(stack, writer_stub, JUDGED)
    await insert_rows(stack, judgments_table, seed_rows(run_id, JUDGED, EPOCHS, SAMPLES))
    return run_id


def scores(epochs: list[dict]) -> list[tuple]:
    return [(e["epoch"], round(e["mean_score"], 6), round(e["pass_rate"], 6), e["scored_count"],
             e["unscored_count"]) for e in epochs]


async def test_summary_shows_each_criterions_scores_cost_and_budget(stack, writer_stub):
    run_id = await judged(stack, writer_stub)
    await insert_rows(stack, run_llm_state_table, [llm_state_row(run_id, JUDGED, 0.15, True,
                                                                 PAUSED)])
    data = json.loads(ok(await cli(stack, JUDGED, "summary", run_id, "--json")))
    judges = data["judges"]
    chrf, helpful = judges["criteria"]
    assert [(c["criterion"], c["judge_type"], c["judge_model"], c["scale"], c["sparkline"])
            for c in (chrf, helpful)] == [("chrf", "JUDGE_TYPE_RULE", "rules", 1.0, "-=+"),
                                          ("helpfulness", "JUDGE_TYPE_LLM", LLM_MODEL, 10.0,
                                           "*#%")]
    assert scores(chrf["epochs"]) == [(1, 0.3, 0.4, 5, 0), (2, 0.4, 0.6, 5, 0),
                                      (3, 0.5, 0.8, 5, 0)]
    assert scores(helpful["epochs"]) == [(1, 6.5, 0.5, 4, 1), (2, 7.5, 0.75, 4, 1),
                                         (3, 8.5, 1.0, 4, 1)]
    assert [(c["epoch"], c["input_tokens"], c["output_tokens"], round(c["cost_usd"], 6))
            for c in judges["epochs"]] == [(e, 500, 100, 0.05) for e in (1, 2, 3)]
    assert (round(judges["total_cost_usd"], 6), judges["budget_usd"], judges["budget_exhausted"],
            judges["llm_paused_reason"], judges["pending_predictions"]) == (0.15, 0.15, True,
                                                                            PAUSED, 0)
    assert data["sparkline"] == ":+#" and len(data["epochs"]) == EPOCHS
    out = ok(await cli(stack, JUDGED, "summary", run_id))
    assert rows(out, "chrf") == [["chrf", "rules", str(e), f"{0.1 * (e + 2):.3f}", rate, "5", "0"]
                                 for e, rate in ((1, "40.0%"), (2, "60.0%"), (3, "80.0%"))]
    assert rows(out, "helpfulness") == [
        ["helpfulness", LLM_MODEL, str(e), f"{e + 5.5:.2f}", rate, "4", "1"]
        for e, rate in ((1, "50.0%"), (2, "75.0%"), (3, "100.0%"))]
    assert rows(out, "chrf (rules)") == [["chrf (rules)", "-=+", "0.300 -> 0.500"]]
    assert rows(out, f"helpfulness ({LLM_MODEL})") == [
        [f"helpfulness ({LLM_MODEL})", "*#%", "6.50 -> 8.50"]]
    assert [r for e in "123" for r in rows(out, e) if len(r) == 4] == [
        [e, "500", "100", "$0.0500"] for e in "123"]
    for line in ("judge cost: $0.1500 in total of a $0.1500 budget",
                 "LLM judging: budget exhausted, no further paid calls are made",
                 f"LLM judging paused: {PAUSED}"):
        assert line in out


async def test_compare_shows_each_epochs_judgments(stack, writer_stub):
    run_id = await judged(stack, writer_stub)
    await insert_rows(stack, judgments_table, [judgment_row(
        run_id, JUDGED, 2, 20, 4, "tone", HUMAN, 3.0, 5.0, judge_model="reviewer",
        reasoning="[bold red]not markup[/] " + "x" * 300)])
    out = ok(await cli(stack, JUDGED, "compare", run_id, "4", EPOCHLENS_CLI_PREVIEW_CHARS="40"))
    cells = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]
    shown = [c for c in cells if c[0].startswith(("epoch ", "chrf (", "helpfulness (", "tone ("))]
    expected = []
    for e in range(1, EPOCHS + 1):
        expected += [[f"epoch {e}", f"step {e * 10}", "[no truth]"],
                     ["chrf (rules)", f"{0.1 * (e + 4):.3f}", "pass", f"chrf of {e * 10}/4"],
                     [f"helpfulness ({LLM_MODEL})", "-", "unscored", "reply could not be parsed"]]
        if e == 2:
            expected.append(["tone (reviewer)", "3.00", "fail",
                             "[bold red]not markup[/] " + "x" * 13 + "..."])
    assert shown == expected
    data = json.loads(ok(await cli(stack, JUDGED, "compare", run_id, "4", "--json")))
    assert [[(j["criterion"], j["score"], j["status"], j["prediction"]["step"])
             for j in p["judgments"]] for p in data["predictions"]] == [
        [("chrf", round(0.1 * (e + 4), 3), "JUDGMENT_STATUS_SCORED", e * 10),
         ("helpfulness", 0.0, "JUDGMENT_STATUS_UNSCORED", e * 10)]
        + ([("tone", 3.0, "JUDGMENT_STATUS_SCORED", 20)] if e == 2 else [])
        for e in range(1, EPOCHS + 1)]


def exported_judgment(row: dict) -> dict:
    """A seeded judge.judgments row as export writes it (create_time checked apart)."""
    scored = row["status"] == 1
    return {"criterion": row["criterion"],
            "judge_type": judge_pb2.JudgeType.Name(row["judge_type"]),
            "judge_model": row["judge_model"], "score": row["score"] if scored else None,
            "passed": row["passed"] if scored else None, "threshold": row["threshold"],
            "status": judge_pb2.JudgmentStatus.Name(row["status"]),
            "unscored_reason": row["unscored_reason"], "reasoning": row["reasoning"],
            "confidence": 0.0, "input_tokens": row["input_tokens"],
            "output_tokens": row["output_tokens"], "cost_usd": row["cost_usd"],
            "prompt_version": "v1"}


async def test_export_merges_each_predictions_judgments(stack, writer_stub):
    run_id = await judged(stack, writer_stub)
    reviewer = judgment_row(run_id, JUDGED, 1, 10, 0, "helpfulness", HUMAN, 9.0, 7.0,
                            judge_model="reviewer")
    await insert_rows(stack, judgments_table, [reviewer])
    seeded_rows = sorted(seed_rows(run_id, JUDGED, EPOCHS, SAMPLES) + [reviewer], key=lambda r: (
        r["step"], r["sample_index"], r["criterion"], r["judge_type"], r["judge_model"]))
    by_key: dict[tuple[int, int], list[dict]] = {}
    for row in seeded_rows:
        by_key.setdefault((row["step"], row["sample_index"]), []).append(exported_judgment(row))
    small_pages = {"EPOCHLENS_CLI_EXPORT_PAGE_SIZE": "3", "EPOCHLENS_CLI_PREFETCH_PAGES": "1"}
    records = [json.loads(line) for line in ok(await cli(
        stack, JUDGED, "export", run_id, **small_pages)).splitlines()]
    for record in records:
        for j in record["judgments"]:
            assert j.pop("create_time").endswith("Z")
    assert keyed(records) == expected_records(run_id, by_key)
    result = await cli(stack, JUDGED, "export", run_id, "--format", "csv", **small_pages)
    reader = csv.DictReader(io.StringIO(ok(result), newline=""))
    table = list(reader)
    assert reader.fieldnames[-3:] == ["score:chrf", f"score:helpfulness:{LLM_MODEL}",
                                      "score:helpfulness:reviewer"]
    got = {(int(r["step"]), int(r["sample_index"])): tuple(r[f] for f in reader.fieldnames[-3:])
           for r in table}
    assert got == {(e * 10, s): (str(round(0.1 * (e + s), 3)),
                                 "" if s == SAMPLES - 1 else str(float(e + s + 4)),
                                 "9.0" if (e, s) == (1, 0) else "")
                   for e in range(1, EPOCHS + 1) for s in range(SAMPLES)}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(result, exit_code: int, start: str) -> str:
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    line = result.stderr.rstrip("\n")
    assert "\n" not in line and line.startswith(f"error: {start}"), line
    return line


async def test_unreachable_service_is_one_line_and_exit_1(stack):
    address = f"127.0.0.1:{closed_port()}"
    result = await cli(stack, "viewer", "runs", EPOCHLENS_CLI_QUERY_ADDRESS=address)
    one_error_line(result, 1, f"cannot reach the query service at {address}")
    flag = await cli(stack, "viewer", "--query-address", address, "export", str(uuid.uuid4()))
    one_error_line(flag, 1, f"cannot reach the query service at {address}")


async def test_rejected_token_is_exit_2(stack):
    other = AuthSettings(jwt_secret="another-secret-that-is-at-least-32-bytes", _env_file=None)
    result = await cli(stack, None, "runs", EPOCHLENS_CLI_TOKEN=mint_token(other, "viewer"))
    one_error_line(result, 2, f"token rejected by {stack.query.address}")
    flag = await cli(stack, None, "--token", "not-a-jwt", "epochs", str(uuid.uuid4()))
    one_error_line(flag, 2, "token rejected")


async def test_no_token_and_no_secret_is_exit_2(stack):
    result = await cli(stack, None, "runs", EPOCHLENS_CLI_TOKEN="", EPOCHLENS_AUTH_JWT_SECRET="")
    one_error_line(result, 2, "no token: set EPOCHLENS_CLI_TOKEN")


async def test_unknown_run_is_not_found_for_every_command(stack, writer_stub, tmp_path):
    missing = str(uuid.uuid4())
    for args in (["epochs", missing], ["predictions", missing], ["compare", missing, "0"],
                 ["summary", missing], ["watch", missing], ["export", missing],
                 ["export", missing, "-o", str(tmp_path / "x.csv"), "--format", "csv"]):
        result = await cli(stack, "viewer", *args)
        assert one_error_line(result, 1, "").endswith("not found"), args
    run_id = await seeded(stack, writer_stub)
    one_error_line(await cli(stack, "viewer", "compare", run_id, "9"), 1,
                   f"sample 9 of run {run_id} not found")
    one_error_line(await cli(stack, "someone-else", "summary", run_id), 1,
                   f"run {run_id} not found")
    assert list(tmp_path.iterdir()) == []


async def test_export_to_an_unwritable_path_and_conflicting_options(stack, writer_stub, tmp_path):
    run_id = await seeded(stack, writer_stub)
    target = tmp_path / "missing" / "out.jsonl"
    result = await cli(stack, "viewer", "export", run_id, "-o", str(target))
    one_error_line(result, 1, f"cannot write {target}: No such file or directory")
    both = await cli(stack, "viewer", "predictions", run_id, "--all", "--limit", "3")
    one_error_line(both, 2, "--limit and --all exclude each other")
