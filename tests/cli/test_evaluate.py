"""`epochlens eval` without services: reading every dataset format (JSONL, JSON, CSV, a saved
`datasets` directory), the request id, the judge config and --fail-under, and the usage
errors (exit 2) the command gives before it calls anything."""

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from epochlens.v1 import judge_pb2, query_pb2
from services.cli import eval_data, eval_options
from services.cli.eval_options import OptionError, Threshold
from services.cli.main import app
from trainer_client.config import PredictionsConfig

CONFIG = PredictionsConfig()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_of(path: Path, limit: int | None = None) -> list[eval_data.EvalRow]:
    return eval_data.parse_rows(eval_data.read_records(path), CONFIG, limit)


def test_every_sampler_format_and_response_rows(tmp_path):
    records = [
        {"prompt": "2+2=", "completion": "4"},
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"instruction": "Say hi", "output": "hi"},
        {"question": "Capital of France?", "answer": "Paris"},
        {"messages": [{"role": "user", "content": "hello"},
                      {"role": "assistant", "content": "hi there"}]},
        {"prompt": "p", "response": "r", "reference": "ref"},
        {"prompt": "p2", "response": "r2"},
        {"question": "q?", "answer": 7, "response": "7"},
    ]
    rows = rows_of(write_jsonl(tmp_path / "d.jsonl", records))
    assert [r.index for r in rows] == list(range(8))
    assert (rows[0].prompt, rows[0].reference, rows[0].response) == ("2+2=", "4", None)
    assert "Add" in rows[1].prompt and "1 and 2" in rows[1].prompt and rows[1].reference == "3"
    assert "Say hi" in rows[2].prompt and rows[2].reference == "hi"
    assert rows[3].prompt == CONFIG.question_template.format(question="Capital of France?")
    assert rows[4].chat and rows[4].prompt == [{"role": "user", "content": "hello"}]
    assert rows[4].reference == "hi there"
    assert (rows[5].prompt, rows[5].reference, rows[5].response) == ("p", "ref", "r")
    assert (rows[6].prompt, rows[6].reference, rows[6].response) == ("p2", None, "r2")
    assert (rows[7].reference, rows[7].response) == ("7", "7")


def test_json_array_csv_and_limit(tmp_path):
    records = [{"prompt": f"p{i}", "response": f"r{i}", "reference": f"r{i}"} for i in range(5)]
    array = tmp_path / "d.json"
    array.write_text(json.dumps(records), encoding="utf-8")
    table = tmp_path / "d.csv"
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "response", "reference"])
        writer.writeheader()
        writer.writerows(records)
    for path in (array, table):
        rows = rows_of(path, limit=3)
        assert [(r.index, r.prompt, r.response, r.reference) for r in rows] == [
            (i, f"p{i}", f"r{i}", f"r{i}") for i in range(3)]


def test_csv_empty_cells_are_missing_values(tmp_path):
    table = tmp_path / "d.csv"
    table.write_text("prompt,response,reference,completion\nhello,hi,,\n"
                     "2+2=,,,4\n", encoding="utf-8")
    first, second = rows_of(table)
    assert (first.prompt, first.response, first.reference) == ("hello", "hi", None)
    assert (second.prompt, second.response, second.reference) == ("2+2=", None, "4")


def test_saved_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(4)]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    rows = rows_of(tmp_path / "ds")
    assert [r.reference for r in rows] == ["a0", "a1", "a2", "a3"]
    split = datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})
    split.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(eval_data.DatasetError, match="splits"):
        eval_data.read_records(tmp_path / "dd")
    digest = eval_data.content_hash(tmp_path / "ds", 4096)
    assert digest == eval_data.content_hash(tmp_path / "ds", 8192)


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "p"}\n', "unknown dataset format"),
    ('{"prompt": "", "completion": "x"}\n', "row 0: the prompt is empty"),
    ('{"response": "r"}\n', "row 0: a row with a response needs a 'prompt' column"),
    ('{"prompt": "p", "response": ["x"]}\n', "row 0: field 'response' is a list"),
    ('{"prompt": "p", "completion": "c"}\nnot json\n', "line 2: not valid JSON"),
    ('', "the dataset is empty"),
    ('{"prompt": NaN, "response": "r"}\n', "row 0: field 'prompt' is nan, not text"),
    ('{"question": "q", "answer": Infinity}\n', "row 0: field 'answer' is inf, not text"),
    ('{"prompt": "p", "response": "r", "meta": ' + "[" * 5000 + "]" * 5000 + "}\n",
     "line 1: JSON nested too deeply to read"),
    ("[" * 5000 + "]" * 5000, "nested too deeply to read"),
])
def test_bad_rows_are_named(tmp_path, text, message):
    path = tmp_path / "d.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(eval_data.DatasetError, match=message):
        rows_of(path)


def test_unknown_file_type_and_missing_path(tmp_path):
    (tmp_path / "d.txt").write_text("x", encoding="utf-8")
    with pytest.raises(eval_data.DatasetError, match="unknown dataset type"):
        eval_data.read_records(tmp_path / "d.txt")
    with pytest.raises(eval_data.DatasetError, match="no such file"):
        eval_data.read_records(tmp_path / "nothing.jsonl")


def test_request_id_is_deterministic(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "response": "other"}])
    ha, hb = (eval_data.content_hash(p, 4096) for p in (a, b))
    assert ha != hb
    assert eval_data.request_id(ha, "m", "run") == eval_data.request_id(ha, "m", "run")
    ids = {eval_data.request_id(ha, "m", "run"), eval_data.request_id(hb, "m", "run"),
           eval_data.request_id(ha, "m2", "run"), eval_data.request_id(ha, "m", "run2")}
    assert len(ids) == 4


@pytest.mark.parametrize("text, expected", [
    ("chrf=0.5", Threshold("chrf", "mean", 0.5)),
    ("exact_match=pass:0.8", Threshold("exact_match", "pass_rate", 0.8)),
    (" helpfulness =7", Threshold("helpfulness", "mean", 7.0)),
])
def test_parse_threshold(text, expected):
    assert eval_options.parse_threshold(text) == expected


@pytest.mark.parametrize("text", ["chrf", "=0.5", "chrf=abc", "chrf=nan", "chrf=pass:1.5",
                                  "chrf=pass:"])
def test_parse_threshold_refuses(text):
    with pytest.raises(OptionError):
        eval_options.parse_threshold(text)


def test_judge_config_shortcuts(tmp_path):
    assert eval_options.judge_config(None, None, [], None, None) == {}
    section = eval_options.judge_config(None, "openai/gpt-4o-mini",
                                        ["exact_match", "helpfulness"], 2.5, "retry")
    assert section == {"rules": {"criteria": ["exact_match"]},
                       "llm": {"provider": "openai", "model": "gpt-4o-mini",
                               "criteria": ["helpfulness"], "budget_usd": 2.5,
                               "on_error": "retry"}}
    path = tmp_path / "judge.json"
    path.write_text(json.dumps({"judge": {"llm": {"provider": "anthropic", "model": "c",
                                                  "sample_rate": 0.5}}}), encoding="utf-8")
    section = eval_options.judge_config(path, None, [], 1.0, None)
    assert section == {"llm": {"provider": "anthropic", "model": "c", "sample_rate": 0.5,
                               "budget_usd": 1.0}}
    with pytest.raises(OptionError, match="need an LLM judge"):
        eval_options.judge_config(None, None, ["helpfulness"], None, None)
    with pytest.raises(OptionError, match="PROVIDER/MODEL"):
        eval_options.judge_config(None, "gpt-4o", [], None, None)


def summary_with(*rows: tuple[str, str, float, float, int]) -> query_pb2.RunSummary:
    return query_pb2.RunSummary(rows=[query_pb2.CriterionEpochSummary(
        criterion=c, judge_model=m, mean_score=mean, pass_rate=rate, scored_count=n,
        judge_type=judge_pb2.JUDGE_TYPE_LLM) for c, m, mean, rate, n in rows])


def test_thresholds_pool_a_panel_and_refuse_unknown_criteria():
    summary = summary_with(("helpfulness", "openai/a", 8.0, 1.0, 10),
                           ("helpfulness", "anthropic/b", 6.0, 0.5, 30),
                           ("exact_match", "rules", 0.9, 0.9, 40))
    results = eval_options.criterion_results(summary)
    assert results["helpfulness"].mean_score == pytest.approx(6.5)
    assert results["helpfulness"].pass_rate == pytest.approx(0.625)
    assert results["helpfulness"].scored == 40
    outcomes = eval_options.check_thresholds(
        [Threshold("helpfulness", "mean", 6.5), Threshold("exact_match", "pass_rate", 0.95)],
        results)
    assert [o["passed"] for o in outcomes] == [True, False]
    with pytest.raises(OptionError, match="no judgment of: chrf"):
        eval_options.check_thresholds([Threshold("chrf", "mean", 0.1)], results)


@pytest.mark.parametrize("args, message", [
    (["--fail-under", "chrf"], "CRITERION=VALUE"),
    (["--adapter", "x"], "--adapter needs --model"),
    (["--endpoint", "vllm"], "--endpoint and --endpoint-model go together"),
    (["--model", "m", "--endpoint", "e", "--endpoint-model", "x"], "one of --model"),
    (["--on-error", "explode"], "--on-error"),
    (["--criteria", "helpfulness"], "need an LLM judge"),
])
def test_usage_errors_exit_2_before_any_call(tmp_path, args, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    result = CliRunner().invoke(app, ["eval", str(path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_rows_without_responses_need_a_source(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"},
                                              {"prompt": "p2", "completion": "c"}])
    result = CliRunner().invoke(app, ["eval", str(path)])
    assert result.exit_code == 2
    assert "1 rows have no response (first: row 1)" in result.output


def test_chat_rows_need_a_local_model(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    result = CliRunner().invoke(app, ["eval", str(path), "--endpoint", "e",
                                      "--endpoint-model", "m"])
    assert result.exit_code == 2
    assert "chat turns" in result.output
