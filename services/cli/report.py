"""`epochlens report RUN -o report.html`: one self-contained HTML file that shows
a run evolving across epochs (services.cli.report_page is the page itself).

Everything comes from the QueryService: GetRun, ListEpochs (for the size of the
progress bar) and ListPredictions page by page, with a progress bar on stderr.
The page receives one JSON object:

* run: id, name, user, model, dataset, config (an object), state, created,
  finished and duration (times as "YYYY-MM-DD HH:MM:SS UTC"; null when unset);
* epochs: per epoch its predictions, exact matches among those that have a
  ground truth (with_truth), the exact-match rate (null without any), the latest
  step and the first and last write time, all computed from the predictions in
  the file so every part of the page agrees;
* chart: `rates`, series of values in [0, 1] with one value per epoch (today the
  exact-match rate; a judge criterion adds its mean score and pass rate here),
  and `counts`, the predictions per epoch;
* samples: per sample index its prompt and ground truth (from its first
  prediction, as CompareSample does) and its predictions in step order: epoch,
  step, text, exact (ground truth and prediction equal once whitespace is
  stripped; null without a ground truth), ms (generation time) and tokens
  (completion tokens, null when not counted);
* totals and the time the file was generated.
"""

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from epochlens.v1 import common_pb2
from services.cli.client import CliError, QueryClient
from services.cli.context import cli_context, one_line_errors
from services.cli.report_page import render_page
from services.cli.stats import exact_match

TimeKey = tuple[int, int]
TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"
DEFAULT_OUTPUT = Path("report.html")


def format_time(moment: datetime | TimeKey | None) -> str | None:
    if moment is None:
        return None
    if isinstance(moment, tuple):
        moment = datetime.fromtimestamp(moment[0] + moment[1] / 1e9, UTC)
    return moment.strftime(TIME_FORMAT)


def state_name(state: int) -> str:
    try:
        return common_pb2.RunState.Name(state).removeprefix("RUN_STATE_").lower()
    except ValueError:
        return str(state)


def run_summary(run: common_pb2.Run) -> dict:
    created = run.create_time.ToDatetime(tzinfo=UTC)
    finished = run.finish_time.ToDatetime(tzinfo=UTC) if run.HasField("finish_time") else None
    duration = str(finished - created).split(".")[0] if finished else None
    return {"id": run.id, "name": run.name, "user": run.user_id, "model": run.model_name,
            "dataset": run.dataset_name, "config": MessageToDict(run.config),
            "state": state_name(run.state), "created": format_time(created),
            "finished": format_time(finished), "duration": duration}


@dataclass
class EpochTally:
    """What the report shows about one epoch, accumulated prediction by prediction."""

    epoch: int
    predictions: int = 0
    exact: int = 0
    with_truth: int = 0
    latest_step: int = 0
    first: TimeKey | None = None
    last: TimeKey | None = None

    def add(self, step: int, exact: bool | None, written: TimeKey) -> None:
        self.predictions += 1
        self.latest_step = max(self.latest_step, step)
        if exact is not None:
            self.with_truth += 1
            self.exact += int(exact)
        self.first = written if self.first is None else min(self.first, written)
        self.last = written if self.last is None else max(self.last, written)

    def row(self) -> dict:
        rate = self.exact / self.with_truth if self.with_truth else None
        return {"epoch": self.epoch, "predictions": self.predictions, "exact": self.exact,
                "with_truth": self.with_truth, "rate": rate, "latest_step": self.latest_step,
                "first_write": format_time(self.first), "last_write": format_time(self.last)}


def chart_series(epochs: list[dict]) -> dict:
    """Rate series (one value in [0, 1] or null per epoch) and the prediction counts."""
    rates = []
    if any(row["with_truth"] for row in epochs):
        rates.append({"id": "exact_match", "label": "exact-match rate",
                      "values": [row["rate"] for row in epochs]})
    return {"rates": rates,
            "counts": {"label": "predictions", "values": [row["predictions"] for row in epochs]}}


class ReportCollector:
    """Folds the stream of predictions into the report's epochs and samples."""

    def __init__(self) -> None:
        self.epochs: dict[int, EpochTally] = {}
        self.samples: dict[int, dict] = {}
        self.count = 0

    def add(self, p: common_pb2.Prediction) -> None:
        truth = p.ground_truth if p.HasField("ground_truth") else None
        exact = exact_match(p.prediction, truth)
        sample = self.samples.get(p.sample_index)
        if sample is None:
            sample = self.samples[p.sample_index] = {
                "index": p.sample_index, "prompt": p.prompt, "truth": truth, "predictions": []}
        ms = p.generation_time_ms
        sample["predictions"].append({
            "epoch": p.epoch, "step": p.step, "text": p.prediction, "exact": exact,
            "ms": round(ms, 1) if math.isfinite(ms) else None,
            "tokens": p.completion_tokens if p.HasField("completion_tokens") else None})
        tally = self.epochs.get(p.epoch) or self.epochs.setdefault(p.epoch, EpochTally(p.epoch))
        tally.add(p.step, exact, (p.create_time.seconds, p.create_time.nanos))
        self.count += 1

    def payload(self) -> dict:
        epochs = [self.epochs[e].row() for e in sorted(self.epochs)]
        return {"epochs": epochs, "chart": chart_series(epochs),
                "samples": [self.samples[i] for i in sorted(self.samples)],
                "totals": {"predictions": self.count, "samples": len(self.samples),
                           "epochs": len(epochs)}}


def fetch_predictions(client: QueryClient, run_id: str, page_size: int, total: int,
                      collector: ReportCollector) -> None:
    """Every prediction of the run into collector, page by page, with a bar on stderr."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("fetching predictions", total=total or None)
        for prediction in client.predictions(run_id, page_size=page_size):
            collector.add(prediction)
            if collector.count % page_size == 0:
                progress.update(task, completed=collector.count)
        progress.update(task, completed=collector.count, total=max(total, collector.count))


def collect(client: QueryClient, run_id: str, page_size: int) -> dict:
    """The report's data (see the module docstring)."""
    run = client.run(run_id)
    total = sum(e.prediction_count for e in client.epochs(run_id))
    collector = ReportCollector()
    fetch_predictions(client, run_id, page_size, total, collector)
    return {"format": 1, "generated": format_time(datetime.now(UTC)), "run": run_summary(run),
            **collector.payload()}


def embed_json(payload: dict) -> str:
    """JSON that cannot end or alter the <script> element it sits in: ASCII, no < > &."""
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_report(output: Path, payload: dict) -> int:
    """Writes the page next to output, then renames it into place. Returns its size."""
    page = render_page(f"epochlens: {payload['run']['name'] or payload['run']['id']}",
                       embed_json(payload))
    partial = output.with_name(output.name + ".part")
    try:
        partial.write_text(page, encoding="ascii")
        partial.replace(output)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CliError(f"cannot write {output}: {exc.strerror or exc}") from None
    return len(page)


@one_line_errors
def report(ctx: typer.Context,
           run: str = typer.Argument(..., metavar="RUN", help="Id of the run."),
           output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write.")]
           = DEFAULT_OUTPUT) -> None:
    """Write a self-contained HTML report of RUN: chart, epochs and a sample explorer."""
    context = cli_context(ctx)
    with context.client() as client:
        payload = collect(client, run, context.settings.report_page_size)
    size = write_report(output, payload)
    totals = payload["totals"]
    typer.echo(f"wrote {output} ({size / 1e6:.1f} MB): {totals['epochs']} epochs, "
               f"{totals['samples']} samples, {totals['predictions']} predictions")
