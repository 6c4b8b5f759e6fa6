"""`epochlens eval` fed hostile or unlucky files, without services: a UTF-8 byte order mark
with CRLF line ends (CSV and JSON lines), a .json file holding one object instead of rows,
CSV cells left empty in a column named like a format, a --judge-config nested too deeply,
odd --fail-under values and --limit below 1 (usage errors, exit 2, before any call); then
Ctrl-C mid-call (exit 130), and against the real services a changed judge config for the
same evaluation, the report of an evaluation and --compare-to another user's run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from epochlens.v1 import evaluation_pb2
from services.cli import eval_data, eval_options, eval_run
from services.cli.eval_options import OptionError
from services.cli.main import app
from tests.cli.test_views import cli, one_error_line
from trainer_client.config import PredictionsConfig

CONFIG = PredictionsConfig()
BOM = b"\xef\xbb\xbf"


def rows_of(path: Path) -> list[eval_data.EvalRow]:
    return eval_data.parse_rows(eval_data.read_records(path), CONFIG)


def test_csv_with_bom_and_crlf(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(BOM + b"prompt,response,reference\r\nq1,r1,a1\r\n\"q\r\n2\",r2,\r\n")
    rows = rows_of(path)
    assert [(r.index, r.prompt, r.response, r.reference) for r in rows] == [
        (0, "q1", "r1", "a1"), (1, "q\r\n2", "r2", None)]


def test_jsonl_and_json_array_with_bom(tmp_path):
    lines = tmp_path / "d.jsonl"
    lines.write_bytes(BOM + b'{"prompt": "p", "response": "r"}\r\n{"prompt": "p2", '
                      b'"response": "r2"}\r\n')
    assert [(r.prompt, r.response) for r in rows_of(lines)] == [("p", "r"), ("p2", "r2")]
    array = tmp_path / "d.json"
    array.write_bytes(BOM + json.dumps([{"prompt": "p", "response": "r"}]).encode())
    assert [(r.prompt, r.response) for r in rows_of(array)] == [("p", "r")]


def test_json_object_instead_of_rows_is_named(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [{"prompt": "p", "response": "r"}]}, indent=2),
                    encoding="utf-8")
    with pytest.raises(eval_data.DatasetError, match="holds one JSON object .* not rows"):
        rows_of(path)
    path.write_text(json.dumps({"prompt": ["p", "q"], "response": ["r", "s"]}),
                    encoding="utf-8")  # one line: a row, whose response is no text
    with pytest.raises(eval_data.DatasetError, match="row 0: field 'response' is a list"):
        rows_of(path)


def test_one_row_json_lines_file_named_json_still_reads(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"prompt": "p", "response": "r"}\n', encoding="utf-8")
    assert [(r.prompt, r.response) for r in rows_of(path)] == [("p", "r")]


def test_csv_format_column_with_empty_cells(tmp_path):
    """An empty `messages` cell is no chat: the row is read by its other columns."""
    path = tmp_path / "d.csv"
    path.write_text("messages,prompt,completion,response\n,q,c,\n,q2,c2,r2\n",
                    encoding="utf-8")
    rows = rows_of(path)
    assert [(r.prompt, r.reference, r.response) for r in rows] == [
        ("q", "c", None), ("q2", "c2", "r2")]


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_judge_config_nested_too_deeply(tmp_path, depth):
    path = tmp_path / "judge.json"
    path.write_text('{"judge": ' + '{"a": ' * depth + "1" + "}" * (depth + 1),
                    encoding="utf-8")
    with pytest.raises(OptionError, match="nested too deeply"):
        eval_options.judge_config(path, None, [], None, None)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "response": "r"}\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", str(data), "--judge-config", str(path)])
    assert result.exit_code == 2, result.output
    assert "nested too deeply" in result.output


def test_judge_config_that_is_not_json(tmp_path):
    path = tmp_path / "judge.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(OptionError, match="--judge-config"):
        eval_options.judge_config(path, None, [], None, None)


@pytest.mark.parametrize("args, message", [
    (["--fail-under", "chrf=nan"], "must be finite"),
    (["--fail-under", "chrf=inf"], "must be finite"),
    (["--fail-under", "chrf=-inf"], "must be finite"),
    (["--fail-under", "chrf=pass:-0.5"], "between 0 and 1"),
    (["--fail-under", "=0.5"], "CRITERION=VALUE"),
    (["--limit", "0"], "--limit"),
    (["--limit", "-3"], "--limit"),
])
def test_odd_options_are_usage_errors(tmp_path, args, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", str(path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_ctrl_c_keeps_what_was_stored_and_exits_130(tmp_path):
    """SIGINT while the CLI waits on a writer that accepts the connection and never answers
    (the dataset is read, nothing was stored yet): one line, exit status 130."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "response": "r"}\n', encoding="utf-8")
    env = {**os.environ, "EPOCHLENS_CLI_WRITER_ADDRESS": address,
           "EPOCHLENS_CLI_QUERY_ADDRESS": address, "EPOCHLENS_CLI_TOKEN": "t",
           "EPOCHLENS_CLI_TIMEOUT_S": "60", "EPOCHLENS_CLI_EVAL_RPC_TIMEOUT_S": "60",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "services.cli.main", "eval", "d.jsonl"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4.0)  # imports, the dataset read, then the first Evaluate call hangs
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        listener.close()
    assert process.returncode == 130, (out, err)
    assert err.startswith("interrupted: the rows stored so far are kept") and "Traceback" \
        not in err, err


async def test_another_judge_config_for_the_same_evaluation_is_a_usage_error(stack, tmp_path):
    who = f"cli-eval-{uuid.uuid4().hex[:6]}"
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "response": "r", "reference": "r"}\n', encoding="utf-8")
    writer = {"EPOCHLENS_CLI_WRITER_ADDRESS": stack.writer.address}
    first = await cli(stack, who, "eval", str(path), "--criteria", "exact_match", "--json",
                      **writer)
    assert first.exit_code == 0, (first.stdout, first.stderr)
    run_id = json.loads(first.stdout)["run_id"]
    again = await cli(stack, who, "eval", str(path), "--criteria", "chrf", **writer)
    line = one_error_line(again, 2, "FAILED_PRECONDITION")
    assert run_id in line and "give another --name" in line
    other = await cli(stack, who, "eval", str(path), "--criteria", "chrf", "--name", "chrf",
                      "--json", **writer)
    assert other.exit_code == 0 and json.loads(other.stdout)["run_id"] != run_id
    # the report of the evaluation says what kind of run it is
    report = tmp_path / "r.html"
    assert (await cli(stack, who, "report", run_id, "-o", str(report))).exit_code == 0
    assert '"kind":"evaluation"' in report.read_text(encoding="ascii")
    # and another user's run to compare it to is not found, like a missing one
    theirs = json.loads((await cli(stack, "cli-eval-other", "eval", str(path), "--json",
                                   **writer)).stdout)["run_id"]
    missing = tmp_path / "m.html"
    line = one_error_line(await cli(stack, who, "report", run_id, "-o", str(missing),
                                    "--compare-to", theirs), 1, "")
    assert line == f"error: run {run_id} or {theirs} not found" and not missing.exists()


def test_sized_batches_keep_order_and_size():
    rows = [evaluation_pb2.EvaluationRow(index=i, prompt="p" * size, response="r")
            for i, size in enumerate([10, 5000, 10, 10, 9000, 10])]
    batches = eval_run.sized_batches(rows, 6000)
    assert [[r.index for r in b] for b in batches] == [[0, 1, 2, 3], [4], [5]]
    assert all(sum(r.ByteSize() + eval_run.ROW_FRAMING_BYTES for r in b) <= 6000
               for b in batches if len(b) > 1)
    assert eval_run.sized_batches([], 6000) == []


async def test_a_chunk_of_long_rows_above_the_grpc_limit_is_stored(stack, tmp_path):
    """80 rows whose three texts are 30000 three-byte characters each: one chunk of 100 rows
    is 21.6 MB, above the writer's 16 MiB message limit; every row is stored."""
    who = f"cli-eval-long-{uuid.uuid4().hex[:6]}"
    text = "\u4e2d" * 30_000
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i} {text}", "response": text,
                                        "reference": text}) + "\n" for i in range(80)),
                    encoding="utf-8")
    result = await cli(stack, who, "eval", str(path), "--criteria", "exact_match", "--json",
                       EPOCHLENS_CLI_WRITER_ADDRESS=stack.writer.address)
    assert result.exit_code == 0, (result.stdout, result.stderr[-2000:])
    data = json.loads(result.stdout)
    assert (data["rows"], data["inserted"]) == (80, 80), data


@pytest.mark.parametrize("text, expected", [
    ("a=b=0.5", eval_options.Threshold("a=b", "mean", 0.5)),
    ("tone (1-5), polite=pass:0.25", eval_options.Threshold("tone (1-5), polite", "pass_rate",
                                                            0.25)),
    ("\u00e9t\u00e9=-1", eval_options.Threshold("\u00e9t\u00e9", "mean", -1.0)),
])
def test_fail_under_criterion_with_odd_characters(text, expected):
    assert eval_options.parse_threshold(text) == expected


async def test_a_row_the_writer_refuses_is_named_by_its_dataset_row(stack, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": "x" * 40_000 if i == 150 else f"p{i}",
                                        "response": "r"}) + "\n" for i in range(250)),
                    encoding="utf-8")
    result = await cli(stack, f"cli-eval-big-{uuid.uuid4().hex[:6]}", "eval", str(path),
                       "--criteria", "exact_match",
                       EPOCHLENS_CLI_WRITER_ADDRESS=stack.writer.address)
    line = one_error_line(result, 1, "INVALID_ARGUMENT")
    assert "rows[50].prompt (dataset row 150): 40000 characters exceed" in line, line
