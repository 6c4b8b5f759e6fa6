"""Reading the dataset of `epochlens eval`: rows, their identity, and the request id.

DATASET is a .jsonl / .json file, a .csv file (an empty cell is a missing value), or a
directory written by `datasets.Dataset.save_to_disk`. Every row is converted by the trainer client's
PromptExtractor (messages, prompt/completion, instruction/input/output,
question/answer, text; see trainer_client.sampler), so the CLI accepts exactly what a
training run's predictions accept. A row that also has a `response` column already holds
the response to judge: its prompt and reference come from the same conversion, or, when the
rest of the row is no known format, from its `prompt` and optional `reference` columns.

Rows are indexed by their position in the dataset (the stored sample_index).
"""

import csv
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer_client.config import PredictionsConfig
from trainer_client.sampler import (
    Messages,
    PromptExtractor,
    SampleFormatError,
    detect_format,
    field_text,
)

RESPONSE_COLUMN = "response"
REFERENCE_COLUMN = "reference"


class DatasetError(ValueError):
    """The dataset cannot be read, or one of its rows cannot give a prompt."""


@dataclass(frozen=True)
class EvalRow:
    """One dataset row: its prompt (text, or chat turns a tokenizer renders), the
    reference answer and, when the row carries one, the response to judge."""

    index: int
    prompt: str | Messages
    reference: str | None
    response: str | None

    @property
    def chat(self) -> bool:
        return not isinstance(self.prompt, str)


def read_records(path: Path) -> Sequence[Mapping[str, Any]]:
    """The raw rows of a .jsonl / .json / .csv file or a saved `datasets` directory."""
    if path.is_dir():
        return _read_hf_dir(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # utf-8-sig: a byte order mark (as spreadsheet programs write) is not part of the
        # first column's name
        with path.open(newline="", encoding="utf-8-sig") as handle:
            # CSV has no null: an empty cell is a missing value (no response, no input)
            return [{k: (None if v == "" else v) for k, v in row.items()}
                    for row in csv.DictReader(handle)]
    if suffix in (".jsonl", ".json"):
        return _read_json(path)
    raise DatasetError(f"{path}: unknown dataset type {suffix!r}; give a .jsonl, .json or "
                       ".csv file or a directory written by datasets.Dataset.save_to_disk")


def _read_json(path: Path) -> list[Mapping[str, Any]]:
    """A JSON array of rows, or JSON lines (one row per line; also what a .json file written
    by datasets' to_json holds). A byte order mark is skipped; a file that is one JSON object
    spread over several lines is a DatasetError saying so."""
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return list(_json_value(text, str(path)))
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1)
             if line.strip()]
    if stripped.startswith("{"):
        _refuse_one_object(text, len(lines), path)
    return [_json_value(line, f"{path}, line {number}") for number, line in lines]


def _refuse_one_object(text: str, line_count: int, path: Path) -> None:
    """DatasetError when the whole file is one JSON object spread over several lines (a
    one-line object is a row of JSON lines)."""
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return  # not one document: JSON lines (a bad line is named when it is read)
    if not isinstance(document, dict):
        return
    if line_count > 1:
        keys = sorted(document)[:10]
        raise DatasetError(f"{path}: holds one JSON object (keys {keys}), not rows: give a "
                           "JSON array of row objects or one row object per line (JSON lines)")


def _json_value(text: str, where: str) -> Any:
    """One JSON document; invalid or too deeply nested JSON is a DatasetError naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON: {exc}") from None
    except RecursionError:
        raise DatasetError(f"{where}: JSON nested too deeply to read") from None


def _read_hf_dir(path: Path) -> Sequence[Mapping[str, Any]]:
    import datasets  # heavy: only for directories

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DatasetError(f"{path}: not a directory written by save_to_disk: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        raise DatasetError(f"{path} holds the splits {sorted(loaded)}: give the directory of "
                           "one split")
    return loaded


def parse_rows(records: Sequence[Mapping[str, Any]], config: PredictionsConfig,
               limit: int | None = None) -> list[EvalRow]:
    """EvalRows of the first `limit` records (all when None); DatasetError names the row."""
    if len(records) == 0:
        raise DatasetError("the dataset is empty")
    extractor = PromptExtractor(config)
    count = len(records) if limit is None else min(limit, len(records))
    try:
        return [_parse_one(extractor, index, records[index]) for index in range(count)]
    except SampleFormatError as exc:
        raise DatasetError(str(exc)) from None


def _parse_one(extractor: PromptExtractor, index: int, record: Mapping[str, Any]) -> EvalRow:
    if not isinstance(record, Mapping):
        raise SampleFormatError(f"dataset row {index}: a {type(record).__name__}, not a "
                                "mapping of columns")
    if record.get(RESPONSE_COLUMN) is None:
        parsed = extractor.parse(index, record)
        return EvalRow(index, parsed.prompt, parsed.ground_truth, None)
    try:
        response = field_text(record, RESPONSE_COLUMN)
    except SampleFormatError as exc:
        raise SampleFormatError(f"dataset row {index}: {exc}") from None
    rest = {k: v for k, v in record.items() if k != RESPONSE_COLUMN and v is not None}
    if not _known_format(rest):
        return _prompt_reference_row(index, rest, response)
    parsed = extractor.parse(index, rest)
    return EvalRow(index, parsed.prompt, parsed.ground_truth, response)


def _known_format(record: Mapping[str, Any]) -> bool:
    try:
        detect_format(record)
    except SampleFormatError:
        return False
    return True


def _prompt_reference_row(index: int, record: Mapping[str, Any], response: str) -> EvalRow:
    """A prompt/response/reference row (reference optional)."""
    if "prompt" not in record:
        raise SampleFormatError(f"dataset row {index}: a row with a response needs a "
                                f"'prompt' column (columns: {sorted(record)})")
    try:
        prompt = field_text(record, "prompt")
        reference = (None if record.get(REFERENCE_COLUMN) in (None, "")
                     else field_text(record, REFERENCE_COLUMN))
    except SampleFormatError as exc:
        raise SampleFormatError(f"dataset row {index}: {exc}") from None
    if not prompt.strip():
        raise SampleFormatError(f"dataset row {index}: the prompt is empty")
    return EvalRow(index, prompt, reference, response)


def content_hash(path: Path, chunk_bytes: int) -> str:
    """sha256 of the dataset's bytes (every file of a directory, by relative path)."""
    digest = hashlib.sha256()
    for name, file in _files_of(path):
        digest.update(name.encode() + b"\0")
        with file.open("rb") as handle:
            while block := handle.read(chunk_bytes):
                digest.update(block)
    return digest.hexdigest()


def _files_of(path: Path) -> Iterator[tuple[str, Path]]:
    if path.is_file():
        yield path.name, path
        return
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        yield file.relative_to(path).as_posix(), file


def request_id(dataset_hash: str, source: str, run_name: str) -> str:
    """The evaluation's identity: the same dataset, model (or endpoint) and run name give the
    same id, so running the same command again continues the same run."""
    key = json.dumps([dataset_hash, source, run_name])
    return "eval-" + hashlib.sha256(key.encode()).hexdigest()[:32]
