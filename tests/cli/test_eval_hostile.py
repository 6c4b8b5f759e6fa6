"""`epochlens eval` fed hostile or unlucky files, without services: a UTF-8 byte order mark
with CRLF line ends (CSV and JSON lines), a .json file holding one object instead of rows,
CSV cells left empty in a column named like a format, a --judge-config nested too deeply,
odd --fail-under values and --limit below 1 (usage errors, exit 2, before any call)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import eval_data, eval_options
from services.cli.eval_options import OptionError
from services.cli.main import app
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
