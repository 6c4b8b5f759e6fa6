"""`epochlens compare RUN` without SAMPLE (CompareRuns) and the agreement table of
`epochlens summary`, against the real in-process services (PostgreSQL and SQLite): the
delta table with intervals, the changed samples in order, --json, the epoch options, option
conflicts and another user's run as one error line."""

import json

from tests.cli.test_views import cli, ok, one_error_line, rows
from tests.integration.test_agreement import crafted_run
from tests.integration.test_compare import two_epoch_run


async def test_compare_runs_table_and_changes(stack, writer_stub):
    run_id = await two_epoch_run(stack, writer_stub, "cli-cmp")
    out = ok(await cli(stack, "cli-cmp", "compare", run_id))
    assert f"run {run_id} epoch 2 against epoch 1: 5 shared samples" in out
    assert "95% paired bootstrap, 2000 resamples" in out
    (chrf,) = rows(out, "chrf")
    assert chrf[:6] == ["chrf", "rules", "5", "5.000", "5.300", "+0.300"]
    assert chrf[-3:] == ["3", "1", "1"]
    changes = [line.split()[:3] for line in out.splitlines()
               if line.strip()[:1].isdigit() and ("fail" in line or "pass" in line)]
    assert changes == [["2", "2", "chrf"], ["1", "1", "helpfulness"], ["0", "0", "chrf"],
                       ["0", "0", "helpfulness"], ["4", "4", "chrf"], ["3", "3", "chrf"]]
    assert "regressed" in out and "improved" in out


async def test_compare_runs_json_and_epoch_options(stack, writer_stub):
    run_id = await two_epoch_run(stack, writer_stub, "cli-cmp-json")
    data = json.loads(ok(await cli(stack, "cli-cmp-json", "compare", run_id, "--epoch", "1",
                                   "--last", "--max-changes", "1", "--json")))
    assert (data["epoch"], data["baseline_epoch"], data["shared_samples"]) == (1, 2, 5)
    assert [d["criterion"] for d in data["deltas"]] == ["chrf", "helpfulness"]
    assert data["deltas"][0]["mean_delta"] < 0 and len(data["changes"]) == 1
    same = json.loads(ok(await cli(stack, "cli-cmp-json", "compare", run_id, "--baseline",
                                   run_id, "--baseline-epoch", "2", "--json")))
    assert (same["epoch"], same["baseline_epoch"]) == (2, 2)
    best = json.loads(ok(await cli(stack, "cli-cmp-json", "compare", run_id, "--best", "chrf",
                                   "--json")))
    assert best["baseline_epoch"] == 2  # chrf mean 5.3 at epoch 2, 5.0 at epoch 1


async def test_compare_runs_errors_are_one_line(stack, writer_stub):
    run_id = await two_epoch_run(stack, writer_stub, "cli-cmp-err")
    theirs = await two_epoch_run(stack, writer_stub, "cli-cmp-other")
    one_error_line(await cli(stack, "cli-cmp-err", "compare", run_id, "--first", "--last"), 2,
                   "--first and --last exclude each other")
    one_error_line(await cli(stack, "cli-cmp-err", "compare", run_id, "0", "--first"), 2,
                   "the options of a run comparison need RUN without SAMPLE")
    one_error_line(await cli(stack, "cli-cmp-err", "compare", run_id, "--baseline", theirs), 1,
                   f"run {run_id} or {theirs} not found")
    one_error_line(await cli(stack, "cli-cmp-err", "compare", run_id, "--epoch", "9"), 1,
                   "INVALID_ARGUMENT")


async def test_summary_prints_agreement_table_and_json(stack, writer_stub):
    run_id = await crafted_run(stack, writer_stub, "cli-agree")
    out = ok(await cli(stack, "cli-agree", "summary", run_id))
    assert "agreement of each judge with people" in out
    assert rows(out, "accuracy")[-3:] == [
        ["accuracy", "rule", "rules", "5", "40.0%", "0.000", "-"],
        ["accuracy", "llm", "anthropic/claude-test", "1", "100.0%", "-", "-"],
        ["accuracy", "llm", "openai/gpt-test", "9"] + rows(out, "accuracy")[-1][4:]]
    data = json.loads(ok(await cli(stack, "cli-agree", "summary", run_id, "--json")))
    assert [(a["judge_model"], a["pairs"]) for a in data["agreements"]] == [
        ("rules", 5), ("anthropic/claude-test", 1), ("openai/gpt-test", 9)]
    assert "spearman" not in data["agreements"][0] and "cohen_kappa" in data["agreements"][0]
