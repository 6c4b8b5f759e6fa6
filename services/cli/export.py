"""`epochlens export`: every prediction of a run as JSON Lines or CSV.

Streams page by page (services.cli.fetch prefetches the next page while the
current one is written), so memory does not grow with the run. One record per
prediction with the fields of epochlens.v1.Prediction, in ListPredictions
order (step, then sample_index):

* jsonl: one JSON object per line; an unset optional field (ground_truth,
  prompt_tokens, completion_tokens) is null; create_time is RFC 3339 (UTC).
* csv: a header row with the field names, then one row per prediction; an
  unset optional field is an empty cell (so in CSV an empty ground truth and
  no ground truth look the same; jsonl keeps them apart).

Written to a file, the data goes to FILE.partial first and is renamed to FILE
once complete, so a failed export never leaves a truncated FILE behind.
"""

import contextlib
import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import IO

import typer

from epochlens.v1 import common_pb2
from services.cli.client import CliError

FIELDS = ("run_id", "epoch", "step", "sample_index", "prompt", "ground_truth", "prediction",
          "generation_time_ms", "prompt_tokens", "completion_tokens", "create_time")


class ExportFormat(StrEnum):
    """Formats `epochlens export --format` writes."""

    jsonl = "jsonl"
    csv = "csv"


def record(p: common_pb2.Prediction) -> tuple:
    """A prediction's fields in FIELDS order; unset optional fields are None."""
    has = p.HasField
    return (p.run_id, p.epoch, p.step, p.sample_index, p.prompt,
            p.ground_truth if has("ground_truth") else None, p.prediction,
            p.generation_time_ms, p.prompt_tokens if has("prompt_tokens") else None,
            p.completion_tokens if has("completion_tokens") else None,
            p.create_time.ToJsonString() if has("create_time") else None)


def jsonl_writer(out: IO[str]) -> Callable[[list[common_pb2.Prediction]], None]:
    """A function that writes one page of predictions as JSON lines."""
    encode = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode

    def write(page: list[common_pb2.Prediction]) -> None:
        out.write("".join(encode(dict(zip(FIELDS, record(p), strict=True))) + "\n"
                          for p in page))
    return write


def csv_writer(out: IO[str]) -> Callable[[list[common_pb2.Prediction]], None]:
    """A function that writes one page of predictions as CSV rows (header first)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)

    def write(page: list[common_pb2.Prediction]) -> None:
        writer.writerows(map(record, page))
    return write


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


def write_pages(pages: Iterable[list[common_pb2.Prediction]], out: IO[str],
                fmt: ExportFormat) -> int:
    """Writes every page in the format. Returns the number of predictions written."""
    write, total = WRITERS[fmt](out), 0
    for page in pages:
        write(page)
        total += len(page)
    return total
