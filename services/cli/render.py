"""How the run views look: rich tables and texts, the ASCII sparkline, and
the JSON the --json switch prints.

Model text is always put into rich.text.Text objects, never into console
markup, so a prediction containing "[bold]" or "[/]" prints as it is.
"""

import json
import sys
from collections.abc import Iterable
from datetime import UTC

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from rich import box
from rich.console import Console, Group
from rich.padding import Padding
from rich.table import Column, Table
from rich.text import Text

from epochlens.v1 import common_pb2, judge_pb2, query_pb2
from services.cli.diff import Segment, plain
from services.cli.stats import (
    CriterionSeries,
    EpochCost,
    EpochStats,
    exact_match,
    format_score,
    normalized,
)
from services.common.convert import integral_numbers

STRUCT = "google.protobuf.Struct"
SPARK_LEVELS = "_.:-=+*#%@"
DIFF_STYLES = {"equal": "", "delete": "red strike", "insert": "green"}
MATCH_MARKS = {True: ("[match]", "bold green"), False: ("[miss]", "bold red"),
               None: ("[no truth]", "dim")}


def message_dict(message: Message) -> dict:
    """A message as JSON-ready data: proto field names, int64 as numbers, zeros kept, and
    the whole numbers of its Structs (run configs) as ints."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True,
                                     unquote_int64_if_possible=True)
    return _struct_ints(message, data)


def _struct_ints(message: Message, data: dict) -> dict:
    for field in message.DESCRIPTOR.fields:
        kind = field.message_type
        if kind is None or kind.GetOptions().map_entry or field.name not in data:
            continue
        if kind.full_name == STRUCT:
            data[field.name] = integral_numbers(data[field.name])
        elif field.is_repeated:
            for item, item_data in zip(getattr(message, field.name), data[field.name],
                                       strict=True):
                _struct_ints(item, item_data)
        else:
            _struct_ints(getattr(message, field.name), data[field.name])
    return data


def print_json(data: object) -> None:
    """The one thing a --json command writes to stdout."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def when(ts: timestamp_pb2.Timestamp, layout: str = "%Y-%m-%d %H:%M:%S") -> str:
    return ts.ToDatetime(tzinfo=UTC).strftime(layout)


def state_name(state: int) -> str:
    return common_pb2.RunState.Name(state).removeprefix("RUN_STATE_").lower()


def kind_name(kind: int) -> str:
    """training or evaluation (a run stored before kinds existed reads as training)."""
    if kind == common_pb2.RUN_KIND_UNSPECIFIED:
        kind = common_pb2.RUN_KIND_TRAINING
    return common_pb2.RunKind.Name(kind).removeprefix("RUN_KIND_").lower()


def preview(text: str, limit: int) -> Text:
    """One line of at most `limit` characters (newlines shown as \\n)."""
    flat = text.replace("\r", "").replace("\n", "\\n")
    return Text(flat if len(flat) <= limit else flat[: limit - 3] + "...")


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def sparkline(rates: Iterable[float | None]) -> str:
    """One ASCII character per value in [0, 1], low to high: _.:-=+*#%@ ('?' for None)."""
    top = len(SPARK_LEVELS) - 1
    return "".join("?" if r is None else SPARK_LEVELS[int(r * top + 0.5)] for r in rates)


def new_table(*columns: Column | str) -> Table:
    """A table without vertical rules: narrower, and rows copy as plain text."""
    return Table(*columns, box=box.SIMPLE_HEAD, header_style="bold")


def runs_table(runs: Iterable[common_pb2.Run]) -> Table:
    """Ids and times never wrap (ids are copied into other commands); finish times are in
    --json only, so that the table fits 80 columns."""
    table = new_table(
        Column("id", no_wrap=True), Column("name", overflow="fold", min_width=8),
        Column("state", no_wrap=True), Column("kind", no_wrap=True),
        Column("created (UTC)", no_wrap=True),
        Column("model", overflow="fold"), Column("dataset", overflow="fold"))
    for run in runs:
        table.add_row(run.id, Text(run.name), state_name(run.state), kind_name(run.kind),
                      when(run.create_time, "%Y-%m-%d %H:%M"), Text(run.model_name),
                      Text(run.dataset_name))
    return table


def epochs_table(epochs: Iterable[query_pb2.EpochSummary]) -> Table:
    table = new_table("epoch", "predictions", "latest step",
                      Column("first write (UTC)", no_wrap=True),
                      Column("last write (UTC)", no_wrap=True))
    for e in epochs:
        table.add_row(str(e.epoch), str(e.prediction_count), str(e.latest_step),
                      when(e.first_create_time), when(e.last_create_time))
    return table


def predictions_table(predictions: Iterable[common_pb2.Prediction], limit: int) -> Table:
    table = new_table("epoch", "step", "sample", "prediction", "ground truth", "match")
    for p in predictions:
        truth = p.ground_truth if p.HasField("ground_truth") else None
        table.add_row(str(p.epoch), str(p.step), str(p.sample_index), preview(p.prediction, limit),
                      preview(truth, limit) if truth is not None else Text("-"),
                      match_mark(exact_match(p.prediction, truth)))
    return table


def summary_table(stats: Iterable[EpochStats]) -> Table:
    table = new_table("epoch", "predictions", "exact", "with truth", "exact rate", "latest step")
    for s in stats:
        table.add_row(str(s.epoch), str(s.prediction_count), str(s.exact_match_count),
                      str(s.with_ground_truth), percent(s.exact_match_rate), str(s.latest_step))
    return table


def diff_text(segments: list[Segment], colour: bool) -> Text:
    """The diff in colour (inserted green, removed red struck through), or, on a
    console without colour, in the [-removed-]{+inserted+} notation."""
    if not colour:
        return Text(plain(segments))
    text = Text()
    for segment in segments:
        text.append(segment.text, DIFF_STYLES[segment.op])
    return text


def match_mark(match: bool | None) -> Text:
    mark, style = MATCH_MARKS[match]
    return Text(mark, style)


def has_colour(console: Console) -> bool:
    return console.color_system is not None and not console.no_color


def indented(text: Text) -> Padding:
    """Two spaces in front of every line of `text` (no padding on the right)."""
    return Padding(text, (0, 0, 0, 2), expand=False)


def run_header(run: common_pb2.Run) -> Text:
    return Text.assemble(("run ", "bold"), run.id, "  ", (run.name, "bold"),
                         f"  model {run.model_name}  dataset {run.dataset_name}  "
                         f"state {state_name(run.state)}")


def compare_header(reply: query_pb2.CompareSampleResponse) -> Group:
    truth = reply.ground_truth if reply.HasField("ground_truth") else None
    return Group(Text(f"run {reply.run_id}  sample {reply.sample_index}", "bold"),
                 Text("prompt", "bold cyan"), indented(Text(reply.prompt)),
                 Text("ground truth", "bold cyan"),
                 indented(Text(truth) if truth is not None else Text("(none)", "dim")),
                 Text(""))


def compare_entry(p: query_pb2.SamplePrediction, diff: list[Segment], match: bool | None,
                  colour: bool, limit: int) -> Group:
    """One epoch of `compare`: a title line with the match mark, the diff indented, then
    its judgments (when it has any), one line each."""
    title = Text.assemble((f"epoch {p.epoch}", "bold"), f"  step {p.step}  ", match_mark(match))
    if not p.judgments:
        return Group(title, indented(diff_text(diff, colour)))
    return Group(title, indented(diff_text(diff, colour)),
                 indented(judgments_table(p.judgments, limit)))


def verdict_mark(j: judge_pb2.Judgment) -> Text:
    if j.status != judge_pb2.JUDGMENT_STATUS_SCORED:
        return Text("unscored", "dim")
    return Text("pass", "bold green") if j.passed else Text("fail", "bold red")


def judgments_table(judgments: Iterable[judge_pb2.Judgment], limit: int) -> Table:
    """Criterion (judge), score, pass/fail/unscored, and the reasoning (or why unscored)
    cut to `limit` characters; no header, no rules."""
    table = Table(box=None, show_header=False, padding=(0, 2, 0, 0), pad_edge=False)
    for j in judgments:
        scored = j.status == judge_pb2.JUDGMENT_STATUS_SCORED
        revised = f" rev {j.revision}" if j.revision > 1 else ""
        table.add_row(Text(f"{j.criterion} ({j.judge_model}{revised})"),
                      format_score(j.score if scored else None, j.judge_type), verdict_mark(j),
                      preview(j.reasoning if scored else j.unscored_reason, limit))
    return table


def compare_footer(reply: query_pb2.CompareSampleResponse, truth: str | None) -> Text:
    if truth is None:
        return Text("\nno ground truth: nothing to match against", "dim")
    hits = [p.epoch for p in reply.predictions if exact_match(p.prediction, truth)]
    first = f", first at epoch {hits[0]}" if hits else ""
    return Text(f"\nexact match at {len(hits)} of {len(reply.predictions)} epochs{first}")


def sparkline_line(stats: list[EpochStats], line: str) -> Text:
    if not stats:
        return Text("no predictions yet", "dim")
    return Text(f"exact-match rate, epoch {stats[0].epoch} to {stats[-1].epoch}: {line}  "
                f"({percent(stats[0].exact_match_rate)} -> {percent(stats[-1].exact_match_rate)}"
                f"; levels {SPARK_LEVELS} low to high)")


def judge_scores_table(series: list[CriterionSeries]) -> Table:
    """Per criterion and epoch: mean score and pass rate over scored judgments, the counts."""
    table = new_table(Column("criterion", overflow="fold"), Column("judge", overflow="fold"),
                      "epoch", "mean", "pass rate", "scored", "unscored")
    for s in series:
        for epoch, row in sorted(s.by_epoch.items()):
            table.add_row(Text(s.criterion), Text(s.judge_model), str(epoch),
                          format_score(s.mean(epoch), s.judge_type),
                          percent(s.pass_rate(epoch)), str(row.scored_count),
                          str(row.unscored_count))
    return table


def judge_sparklines(series: list[CriterionSeries], epochs: list[int]) -> Group:
    """One line per criterion: its mean score per epoch as a sparkline, first -> last."""
    width = max(len(s.label) for s in series)
    lines = [Text(f"mean score, epoch {epochs[0]} to {epochs[-1]} (levels {SPARK_LEVELS} low to "
                  "high; LLM and human scores drawn as score/10; ? = none scored):")]
    for s in series:
        means = [s.mean(e) for e in epochs]
        known = [m for m in means if m is not None]
        ends = (f"{format_score(known[0], s.judge_type)} -> "
                f"{format_score(known[-1], s.judge_type)}") if known else "-"
        line = criterion_sparkline(s, epochs)
        lines.append(Text(f"  {s.label.ljust(width)}  {line}  {ends}"))
    return Group(*lines)


def usd(value: float) -> str:
    return f"${value:.4f}"


def judge_cost_table(costs: Iterable[EpochCost]) -> Table:
    table = new_table("epoch", "judge input tokens", "judge output tokens", "judge cost")
    for c in costs:
        table.add_row(str(c.epoch), str(c.input_tokens), str(c.output_tokens), usd(c.cost_usd))
    return table


def judge_status(summary: query_pb2.RunSummary, limit: int) -> Group:
    """The run's judge cost and budget (when it has judgments), whether LLM judging stopped
    and why, the predictions still waiting for the judge, those it gave up on (reasons cut
    to `limit` characters) and those the writer has not handed to it, with how to resume."""
    budget = f" of a {usd(summary.budget_usd)} budget" if summary.budget_usd else ""
    lines = [Text(f"judge cost: {usd(summary.total_cost_usd)} in total{budget}")
             ] if summary.rows else []
    if summary.budget_exhausted:
        lines.append(Text("LLM judging: budget exhausted, no further paid calls are made",
                          "bold red"))
    if summary.llm_paused_reason:
        lines.append(Text.assemble(("LLM judging paused: ", "bold red"),
                                   summary.llm_paused_reason))
        lines.append(Text(f"  once fixed: epochlens judge resume {summary.run_id} "
                          "--rejudge-unscored", "dim"))
    if summary.pending_predictions:
        lines.append(Text(f"{summary.pending_predictions} predictions waiting for the judge"))
    return Group(*lines, *failure_lines(summary, limit), *handoff_lines(summary, limit))


def failure_lines(summary: query_pb2.RunSummary, limit: int) -> list[Text]:
    """The predictions the judge gave up on: how many, the first ones with their reason."""
    if not summary.failed_predictions:
        return []
    lines = [Text(f"{summary.failed_predictions} predictions failed judging (the judge gave "
                  "up after its attempts):", "bold red")]
    for f in summary.failures:
        lines.append(Text.assemble(f"  epoch {f.epoch} step {f.step} sample {f.sample_index}"
                                   f", {f.attempts} attempts: ", preview(f.reason, limit)))
    if summary.failed_predictions > len(summary.failures):
        lines.append(Text(f"  ... and {summary.failed_predictions - len(summary.failures)} "
                          "more", "dim"))
    lines.append(Text(f"  judge them again: epochlens judge resume {summary.run_id} "
                      "--rejudge-failed", "dim"))
    return lines


def handoff_lines(summary: query_pb2.RunSummary, limit: int) -> list[Text]:
    """The predictions the writer has not handed to the judge yet, and why."""
    if not summary.handoff_waiting:
        return []
    lines = [Text(f"{summary.handoff_waiting} predictions not handed to the judge yet",
                  "bold red" if summary.handoff_error else "")]
    if summary.handoff_error:
        lines.append(Text.assemble("  the writer's last attempt failed: ",
                                   preview(summary.handoff_error, limit)))
        lines.append(Text(f"  next attempt at {when(summary.handoff_retry_time)} UTC", "dim"))
    return lines


def criterion_sparkline(series: CriterionSeries, epochs: list[int]) -> str:
    return sparkline(normalized(series.mean(e), series.judge_type) for e in epochs)


def judges_json(summary: query_pb2.RunSummary, series: list[CriterionSeries],
                epochs: list[int], costs: list[EpochCost]) -> dict:
    """The "judges" object of `summary --json`."""
    return {"criteria": [s.as_dict(epochs, criterion_sparkline(s, epochs)) for s in series],
            "epochs": [c.as_dict() for c in costs], "total_cost_usd": summary.total_cost_usd,
            "budget_usd": summary.budget_usd, "budget_exhausted": summary.budget_exhausted,
            "llm_paused_reason": summary.llm_paused_reason,
            "pending_predictions": summary.pending_predictions,
            "failed_predictions": summary.failed_predictions,
            "failures": [message_dict(f) for f in summary.failures],
            "handoff_waiting": summary.handoff_waiting, "handoff_error": summary.handoff_error,
            "handoff_retry_time": (summary.handoff_retry_time.ToJsonString()
                                   if summary.HasField("handoff_retry_time") else None)}
