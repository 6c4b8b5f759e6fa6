"""`epochlens report RUN -o report.html`: one self-contained HTML file that shows
a run evolving across epochs (services.cli.report_page is the page itself).

Everything comes from the QueryService: GetRun, ListEpochs (for the size of the
progress bar), GetRunSummary (the judge scores per epoch and criterion), and
ListPredictions page by page with ListJudgments merged in (both in step,
sample_index order; see services.cli.export), with a progress bar on stderr.
The page receives one JSON object:

* run: id, name, user, model, dataset, config (an object), state, kind (training or
  evaluation), created,
  finished and duration (times as "YYYY-MM-DD HH:MM:SS UTC"; null when unset);
* epochs: per epoch its predictions, exact matches among those that have a
  ground truth (with_truth), the exact-match rate (null without any), the latest
  step and the first and last write time, all computed from the predictions in
  the file so every part of the page agrees; and from GetRunSummary `judges`,
  per criterion id its mean score and pass rate over scored judgments (null
  when none is scored) and counts, and `judge_cost` (tokens and US dollars);
* judges: `criteria` (id "c0", "c1", ...: criterion, type rule/llm/human,
  model, scale, label), the run's total judge cost, budget, whether it is
  exhausted, why LLM judging paused (empty if not) and the predictions still
  waiting for the judge;
* charts: one chart per kind of number, each {id, title, unit ("rate": 0..1
  shown as %, or "score"), max (the top of its axis), series}: the exact-match
  rate alone (the headline); the judges' mean scores, one chart per score scale
  (rule criteria 0..1, LLM and human criteria 1..10); their pass rates. A series
  is {id, label, color (an index: the exact-match rate 0, criterion ck k + 1, so
  a criterion has one colour in every chart), values: one per epoch, null where
  there is none};
* samples: per sample index its prompt and ground truth (from its first
  prediction, as CompareSample does) and its predictions in step order: epoch,
  step, text, exact (services.common.matching: equal ignoring case and surrounding
  or repeated whitespace; null without a ground truth), ms (generation time), tokens
  (completion tokens, null when not counted) and judgments (criterion, type,
  model, score and passed (null when unscored), threshold, reasoning,
  unscored_reason);
* totals and the time the file was generated;
* agreements: per criterion people judged and rule or LLM judge (criterion, type, model),
  pairs, agreement on pass/fail (0..1), kappa and spearman (null where undefined);
* comparison (with --compare-to, else null): CompareRuns of the run's last epoch against
  the baseline: run, epoch, baseline_run, baseline_epoch, shared, level, resamples, deltas
  (criterion, type, model, pairs, both means, mean_delta with mean_low..mean_high, both
  pass rates, pass_delta with pass_low..pass_high, improved, regressed, unchanged) and
  changes (sample, baseline_sample, criterion, type, model, both scores and verdicts).
"""

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from epochlens.v1 import common_pb2, judge_pb2, query_pb2
from services.cli.client import CliError, QueryClient
from services.cli.config import CliSettings
from services.cli.context import cli_context, one_line_errors
from services.cli.export import judgment_stream, with_judgments
from services.cli.fetch import prefetched
from services.cli.pairwise_view import pairwise_json
from services.cli.render import kind_name
from services.cli.report_page import render_page
from services.cli.stats import (
    CriterionSeries,
    criteria_series,
    epoch_costs,
    exact_match,
    judge_type_name,
)
from services.common.convert import struct_to_dict

TimeKey = tuple[int, int]
TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"
DEFAULT_OUTPUT = Path("report.html")
TYPE_NAMES = {"rule": "rule", "llm": "LLM", "human": "human"}  # judge types in chart titles


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
            "dataset": run.dataset_name, "config": struct_to_dict(run.config),
            "state": state_name(run.state), "kind": kind_name(run.kind),
            "created": format_time(created), "finished": format_time(finished),
            "duration": duration}


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


def mean_charts(series: list[CriterionSeries], numbers: list[int]) -> list[dict]:
    """The criteria's mean scores per epoch, one chart per score scale, on its own axis."""
    charts = []
    for scale in sorted({s.scale for s in series}):
        members = [(k, s) for k, s in enumerate(series) if s.scale == scale]
        types = sorted({TYPE_NAMES.get(name, name) for name in
                        (judge_type_name(s.judge_type) for _, s in members)})
        charts.append({
            "id": f"mean-{scale:g}", "unit": "score", "max": scale,
            "title": f"Mean judge score per epoch: {' and '.join(types)} criteria, "
                     f"0 to {scale:g}",
            "series": [{"id": f"mean:c{k}", "label": f"{s.label} mean score", "color": k + 1,
                        "values": [s.mean(e) for e in numbers]} for k, s in members]})
    return charts


def chart_list(epochs: list[dict], series: list[CriterionSeries]) -> list[dict]:
    """One chart per kind of number: the exact-match rate alone, the judges' mean scores
    (per scale) and their pass rates (see the module docstring)."""
    numbers = [row["epoch"] for row in epochs]
    charts = []
    if any(row["with_truth"] for row in epochs):
        charts.append({"id": "exact", "unit": "rate", "max": 1.0,
                       "title": "Exact-match rate per epoch",
                       "series": [{"id": "exact_match", "label": "exact-match rate",
                                   "color": 0, "values": [row["rate"] for row in epochs]}]})
    charts += mean_charts(series, numbers)
    if series:
        charts.append({"id": "pass", "unit": "rate", "max": 1.0,
                       "title": "Judge pass rate per epoch (over scored judgments)",
                       "series": [{"id": f"pass:c{k}", "label": f"{s.label} pass rate",
                                   "color": k + 1,
                                   "values": [s.pass_rate(e) for e in numbers]}
                                  for k, s in enumerate(series)]})
    return charts


def judgment_entry(j: judge_pb2.Judgment) -> dict:
    """A judgment as the sample explorer shows it."""
    scored = j.status == judge_pb2.JUDGMENT_STATUS_SCORED
    return {"criterion": j.criterion, "type": judge_type_name(j.judge_type),
            "model": j.judge_model, "score": j.score if scored else None,
            "passed": j.passed if scored else None, "threshold": j.threshold,
            "reasoning": j.reasoning, "unscored_reason": "" if scored else j.unscored_reason}


def judges_payload(summary: query_pb2.RunSummary, series: list[CriterionSeries]) -> dict:
    criteria = [{"id": f"c{k}", "criterion": s.criterion, "type": judge_type_name(s.judge_type),
                 "model": s.judge_model, "scale": s.scale, "label": s.label}
                for k, s in enumerate(series)]
    return {"criteria": criteria, "total_cost_usd": summary.total_cost_usd,
            "budget_usd": summary.budget_usd, "budget_exhausted": summary.budget_exhausted,
            "paused_reason": summary.llm_paused_reason,
            "pending": summary.pending_predictions}


def add_judge_columns(row: dict, series: list[CriterionSeries], costs: dict) -> dict:
    """The epoch row with each criterion's mean and pass rate, and the judge cost."""
    epoch = row["epoch"]
    row["judges"] = {f"c{k}": {"mean": s.mean(epoch), "pass": s.pass_rate(epoch),
                               "scored": s.by_epoch[epoch].scored_count,
                               "unscored": s.by_epoch[epoch].unscored_count}
                     for k, s in enumerate(series) if epoch in s.by_epoch}
    cost = costs.get(epoch)
    row["judge_cost"] = cost.as_dict() if cost is not None else None
    return row


class ReportCollector:
    """Folds the stream of predictions (with their judgments) into the report's epochs
    and samples; the run's judge summary gives the per-criterion columns."""

    def __init__(self, summary: query_pb2.RunSummary | None = None) -> None:
        self.summary = summary if summary is not None else query_pb2.RunSummary()
        self.epochs: dict[int, EpochTally] = {}
        self.samples: dict[int, dict] = {}
        self.count = 0

    def add(self, p: common_pb2.Prediction, judgments: list[judge_pb2.Judgment]) -> None:
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
            "tokens": p.completion_tokens if p.HasField("completion_tokens") else None,
            "judgments": [judgment_entry(j) for j in judgments]})
        tally = self.epochs.get(p.epoch) or self.epochs.setdefault(p.epoch, EpochTally(p.epoch))
        tally.add(p.step, exact, (p.create_time.seconds, p.create_time.nanos))
        self.count += 1

    def payload(self) -> dict:
        series = criteria_series(self.summary)
        costs = {c.epoch: c for c in epoch_costs(self.summary)}
        epochs = [add_judge_columns(self.epochs[e].row(), series, costs)
                  for e in sorted(self.epochs)]
        return {"epochs": epochs, "charts": chart_list(epochs, series),
                "judges": judges_payload(self.summary, series),
                "pairwise": pairwise_json(self.summary.pairwise),
                "samples": [self.samples[i] for i in sorted(self.samples)],
                "totals": {"predictions": self.count, "samples": len(self.samples),
                           "epochs": len(epochs)}}


def _optional(message, name: str) -> float | None:
    return getattr(message, name) if message.HasField(name) else None


def agreements_payload(summary: query_pb2.RunSummary) -> list[dict]:
    """The run's judge-human agreements (kappa and spearman null where undefined)."""
    return [{"criterion": a.criterion, "type": judge_type_name(a.judge_type),
             "model": a.judge_model, "pairs": a.pairs, "agreement": a.percent_agreement,
             "kappa": _optional(a, "cohen_kappa"), "spearman": _optional(a, "spearman")}
            for a in summary.agreements]


def comparison_payload(reply: query_pb2.CompareRunsResponse) -> dict:
    """A CompareRunsResponse as the page's comparison section shows it."""
    deltas = [{"criterion": d.criterion, "type": judge_type_name(d.judge_type),
               "model": d.judge_model, "pairs": d.paired_count,
               "baseline_mean": d.baseline_mean, "candidate_mean": d.candidate_mean,
               "mean_delta": d.mean_delta, "mean_low": d.mean_delta_low,
               "mean_high": d.mean_delta_high, "baseline_pass": d.baseline_pass_rate,
               "candidate_pass": d.candidate_pass_rate, "pass_delta": d.pass_rate_delta,
               "pass_low": d.pass_rate_delta_low, "pass_high": d.pass_rate_delta_high,
               "improved": d.improved_count, "regressed": d.regressed_count,
               "unchanged": d.unchanged_count} for d in reply.deltas]
    changes = [{"sample": c.sample_index, "baseline_sample": c.baseline_sample_index,
                "criterion": c.criterion, "type": judge_type_name(c.judge_type),
                "model": c.judge_model, "baseline_score": c.baseline_score,
                "candidate_score": c.candidate_score, "baseline_passed": c.baseline_passed,
                "candidate_passed": c.candidate_passed} for c in reply.changes]
    return {"run": reply.run_id, "epoch": reply.epoch, "baseline_run": reply.baseline_run_id,
            "baseline_epoch": reply.baseline_epoch, "shared": reply.shared_samples,
            "level": reply.confidence_level, "resamples": reply.bootstrap_resamples,
            "deltas": deltas, "changes": changes}


def fetch_predictions(client: QueryClient, settings: CliSettings, run_id: str, total: int,
                      collector: ReportCollector) -> None:
    """Every prediction of the run with its judgments into collector, page by page, with a
    bar on stderr. Judgments are fetched only when the run's summary has some."""
    size = settings.report_page_size
    pages = prefetched(client.predictions(run_id, page_size=size), size,
                       settings.prefetch_pages, settings.prefetch_poll_s)
    judgments = (judgment_stream(client, settings, run_id, size) if collector.summary.rows
                 else iter(()))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("fetching predictions", total=total or None)
        for page in with_judgments(pages, judgments):
            for prediction, judged in page:
                collector.add(prediction, judged)
            progress.update(task, completed=collector.count)
        progress.update(task, completed=collector.count, total=max(total, collector.count))


def collect(client: QueryClient, run_id: str, settings: CliSettings,
            compare_to: str | None = None) -> dict:
    """The report's data (see the module docstring); with compare_to, the run's last epoch
    compared with that run (its first epoch when it is the run itself, else its last)."""
    run = client.run(run_id)
    total = sum(e.prediction_count for e in client.epochs(run_id))
    collector = ReportCollector(client.run_summary(run_id))
    comparison = (comparison_payload(client.compare_runs(query_pb2.CompareRunsRequest(
        run_id=run_id, baseline_run_id=compare_to))) if compare_to else None)
    fetch_predictions(client, settings, run_id, total, collector)
    return {"format": 1, "generated": format_time(datetime.now(UTC)), "run": run_summary(run),
            **collector.payload(), "agreements": agreements_payload(collector.summary),
            "comparison": comparison}


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
           = DEFAULT_OUTPUT,
           compare_to: Annotated[str | None, typer.Option(
               "--compare-to", metavar="RUN", help="Add a comparison of RUN's last epoch "
               "with this run (RUN itself: with its first epoch; another run: its last).")]
           = None) -> None:
    """Write a self-contained HTML report of RUN: chart, epochs, the judges' agreement with
    people, a comparison (--compare-to) and a sample explorer."""
    context = cli_context(ctx)
    with context.client() as client:
        payload = collect(client, run, context.settings, compare_to)
    size = write_report(output, payload)
    totals = payload["totals"]
    typer.echo(f"wrote {output} ({size / 1e6:.1f} MB): {totals['epochs']} epochs, "
               f"{totals['samples']} samples, {totals['predictions']} predictions")
