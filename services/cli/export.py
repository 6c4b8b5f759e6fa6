"""`epochlens export`: every prediction of a run, with its judgments, as JSON
Lines or CSV.

Streams page by page (services.cli.fetch prefetches the next page while the
current one is written), so memory does not grow with the run. One record per
prediction with the fields of epochlens.v1.Prediction, in ListPredictions
order (step, then sample_index). Its judgments come from ListJudgments, which
lists them in the same order, fetched page by page alongside and merged in, so
only the current prediction's judgments are held:

* jsonl: one JSON object per line; an unset optional field (ground_truth,
  prompt_tokens, completion_tokens) is null; create_time is RFC 3339 (UTC);
  "judgments" is a list (empty when none) of objects with the fields of
  epochlens.v1.Judgment but the prediction reference and epoch (the record's
  own), enums by name, score and passed null when the judgment is unscored.
* csv: a header row with the field names, then one row per prediction; an
  unset optional field is an empty cell (so in CSV an empty ground truth and
  no ground truth look the same; jsonl keeps them apart). Then one column per
  criterion the run had when the export started (GetRunSummary, read first so
  the header is known before streaming): "score:<criterion>", or
  "score:<criterion>:<judge model>" when two judges score the same criterion;
  the cell is the score, empty when the prediction has no scored judgment of it.

A judgment whose prediction is not in the export (written after the export
passed its place) is not exported.

Written to a file, the data goes to FILE.partial first and is renamed to FILE
once complete, so a failed export never leaves a truncated FILE behind.
"""

import contextlib
import csv
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO

import typer

from epochlens.v1 import common_pb2, judge_pb2, query_pb2
from services.cli.client import CliError, QueryClient
from services.cli.config import CliSettings
from services.cli.fetch import prefetched

FIELDS = ("run_id", "epoch", "step", "sample_index", "prompt", "ground_truth", "prediction",
          "generation_time_ms", "prompt_tokens", "completion_tokens", "create_time")


class ExportFormat(StrEnum):
    """Formats `epochlens export --format` writes."""

    jsonl = "jsonl"
    csv = "csv"


def finite_or_none(value: float) -> float | None:
    """None for NaN and +/-inf (stored before the writer refused them): JSON has no such
    numbers, and an export must stay valid JSON."""
    return value if math.isfinite(value) else None


def record(p: common_pb2.Prediction) -> tuple:
    """A prediction's fields in FIELDS order; unset optional fields are None."""
    has = p.HasField
    return (p.run_id, p.epoch, p.step, p.sample_index, p.prompt,
            p.ground_truth if has("ground_truth") else None, p.prediction,
            finite_or_none(p.generation_time_ms),
            p.prompt_tokens if has("prompt_tokens") else None,
            p.completion_tokens if has("completion_tokens") else None,
            p.create_time.ToJsonString() if has("create_time") else None)


Judged = tuple[common_pb2.Prediction, list[judge_pb2.Judgment]]


@dataclass(frozen=True)
class ScoreColumn:
    """A CSV column of one criterion's scores."""

    criterion: str
    judge_type: int
    judge_model: str
    header: str


def score_columns(summary: query_pb2.RunSummary) -> list[ScoreColumn]:
    """One column per (criterion, judge type, judge model) of the summary, sorted."""
    keys = sorted({(r.criterion, r.judge_type, r.judge_model) for r in summary.rows})
    shared = {c for c, _, _ in keys if sum(k[0] == c for k in keys) > 1}
    return [ScoreColumn(c, t, m, f"score:{c}:{m}" if c in shared else f"score:{c}")
            for c, t, m in keys]


def judgment_record(j: judge_pb2.Judgment) -> dict:
    """A judgment as jsonl writes it (score and passed None when unscored)."""
    scored = j.status == judge_pb2.JUDGMENT_STATUS_SCORED
    return {"criterion": j.criterion, "judge_type": judge_pb2.JudgeType.Name(j.judge_type),
            "judge_model": j.judge_model,
            "score": finite_or_none(j.score) if scored else None,
            "passed": j.passed if scored else None, "threshold": finite_or_none(j.threshold),
            "status": judge_pb2.JudgmentStatus.Name(j.status),
            "unscored_reason": j.unscored_reason, "reasoning": j.reasoning,
            "confidence": finite_or_none(j.confidence), "input_tokens": j.input_tokens,
            "output_tokens": j.output_tokens, "cost_usd": finite_or_none(j.cost_usd),
            "prompt_version": j.prompt_version,
            "create_time": j.create_time.ToJsonString() if j.HasField("create_time") else None}


def jsonl_writer(out: IO[str], columns: list[ScoreColumn]
                 ) -> Callable[[list[Judged]], None]:
    """A function that writes one page of predictions as JSON lines."""
    encode = json.JSONEncoder(ensure_ascii=False, check_circular=False, allow_nan=False).encode

    def write(page: list[Judged]) -> None:
        out.write("".join(encode({**dict(zip(FIELDS, record(p), strict=True)),
                                  "judgments": [judgment_record(j) for j in judged]}) + "\n"
                          for p, judged in page))
    return write


def _scores(judged: list[judge_pb2.Judgment], columns: list[ScoreColumn]) -> list:
    found = {(j.criterion, j.judge_type, j.judge_model): j.score for j in judged
             if j.status == judge_pb2.JUDGMENT_STATUS_SCORED}
    return [found.get((c.criterion, c.judge_type, c.judge_model)) for c in columns]


def csv_writer(out: IO[str], columns: list[ScoreColumn]) -> Callable[[list[Judged]], None]:
    """A function that writes one page of predictions as CSV rows (header first)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS + tuple(c.header for c in columns))

    def write(page: list[Judged]) -> None:
        writer.writerows(record(p) + tuple(_scores(judged, columns)) for p, judged in page)
    return write


class JudgmentMerger:
    """Hands out the judgments of each prediction from a stream in ListJudgments order,
    holding only the next one; judgments of predictions not asked for are passed over."""

    def __init__(self, judgments: Iterator[judge_pb2.Judgment]) -> None:
        self._judgments = judgments
        self._next = next(judgments, None)

    def take(self, step: int, sample_index: int) -> list[judge_pb2.Judgment]:
        found, key = [], (step, sample_index)
        while self._next is not None:
            ref = self._next.prediction
            if (ref.step, ref.sample_index) > key:
                break
            if (ref.step, ref.sample_index) == key:
                found.append(self._next)
            self._next = next(self._judgments, None)
        return found


def with_judgments(pages: Iterable[list[common_pb2.Prediction]],
                   judgments: Iterator[judge_pb2.Judgment]) -> Iterator[list[Judged]]:
    """The pages of predictions, each prediction paired with its judgments. Both streams
    are in (step, sample_index) order; the judgment stream is closed at the end."""
    try:
        merger = JudgmentMerger(judgments)
        for page in pages:
            yield [(p, merger.take(p.step, p.sample_index)) for p in page]
    finally:
        close = getattr(judgments, "close", None)
        if close is not None:
            close()


def judgment_stream(client: QueryClient, settings: CliSettings, run_id: str,
                    page_size: int) -> Iterator[judge_pb2.Judgment]:
    """Every judgment of the run in ListJudgments order, pages prefetched in a thread."""
    pages = prefetched(client.judgments(run_id, page_size=page_size), page_size,
                       settings.prefetch_pages, settings.prefetch_poll_s)
    try:
        for page in pages:
            yield from page
    finally:
        pages.close()


WRITERS = {ExportFormat.jsonl: jsonl_writer, ExportFormat.csv: csv_writer}


@contextlib.contextmanager
def output(path: Path | None, buffer_bytes: int) -> Iterator[IO[str]]:
    """stdout, or FILE.partial renamed to FILE when the block completes. A file that
    cannot be written is a CliError; a reader that closes stdout early (`| head`) ends
    the export quietly with status 141 (128 + SIGPIPE), as a shell pipeline expects."""
    if path is None:
        with _stdout() as out:
            yield out
        return
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8", newline="", buffering=buffer_bytes) as out:
            yield out
        os.replace(partial, path)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def _stdout() -> Iterator[IO[str]]:
    try:
        yield sys.stdout
        sys.stdout.flush()
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None


def write_pages(pages: Iterable[list[Judged]], out: IO[str], fmt: ExportFormat,
                columns: list[ScoreColumn]) -> int:
    """Writes every page in the format. Returns the number of predictions written."""
    write, total = WRITERS[fmt](out, columns), 0
    for page in pages:
        write(page)
        total += len(page)
    return total
