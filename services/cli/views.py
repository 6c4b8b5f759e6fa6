"""The run views of the `epochlens` command: runs, epochs, predictions, compare,
summary, watch and export. Each is a client of the QueryService (through
services.cli.client.QueryClient); a CliError (service unreachable, token
missing or rejected, run not found) becomes one `error: ...` line on stderr and
a non-zero exit status.

--json on the listings prints JSON and nothing else on stdout: protobuf
messages in the protobuf JSON mapping with the .proto field names (int64 as
numbers, timestamps as RFC 3339 strings), plus the computed fields named in
each command's help.
"""

import enum
import itertools
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from epochlens.v1 import common_pb2, query_pb2
from services.cli import compare_view, render
from services.cli import export as exporting
from services.cli import watch as watching
from services.cli.client import CliError
from services.cli.context import cli_context, one_line_errors
from services.cli.diff import word_diff
from services.cli.fetch import prediction_pages
from services.cli.metrics_view import metrics
from services.cli.pairwise_view import TITLE as PAIRWISE_TITLE
from services.cli.pairwise_view import pairwise_json, pairwise_table
from services.cli.progress import progress_pages, stderr_is_terminal
from services.cli.stats import (
    CriterionSeries,
    EpochCost,
    criteria_series,
    epoch_costs,
    epoch_stats,
    exact_match,
)

RUN = typer.Argument(..., metavar="RUN", help="Run id (see `epochlens runs`).")
JSON = typer.Option(False, "--json", help="Print JSON, and nothing else, on stdout.")
FORMAT = typer.Option(exporting.ExportFormat.jsonl, "--format", help="jsonl or csv.")
OUTPUT = typer.Option(None, "-o", "--output", dir_okay=False,
                      help="File to write (default: stdout).")
EXACT_RULE = ("exact match: the prediction equals the ground truth ignoring case and "
              "surrounding or repeated whitespace (the judge's exact_match rule); rate over "
              "predictions with a ground truth")


class RunKindChoice(enum.StrEnum):
    """`epochlens runs --kind`: which runs to list."""

    training = "training"
    evaluation = "evaluation"


RUN_KINDS = {RunKindChoice.training: common_pb2.RUN_KIND_TRAINING,
             RunKindChoice.evaluation: common_pb2.RUN_KIND_EVALUATION}


KIND = typer.Option(None, "--kind", help="Only training runs or only evaluations (default: "
                    "both).")


def runs(ctx: typer.Context, as_json: bool = JSON, kind: RunKindChoice | None = KIND) -> None:
    """List your runs, newest first."""
    cli = cli_context(ctx)
    with cli.client() as client:
        items = list(client.runs(cli.settings.page_size, RUN_KINDS[kind] if kind else 0))
    if as_json:
        render.print_json([render.message_dict(r) for r in items])
    elif items:
        Console().print(render.runs_table(items))
    else:
        typer.echo("no runs yet")


def epochs(ctx: typer.Context, run_id: str = RUN, as_json: bool = JSON) -> None:
    """List a run's epochs: predictions stored, latest step, first and last write."""
    with cli_context(ctx).client() as client:
        items = client.epochs(run_id)
    if as_json:
        render.print_json([render.message_dict(e) for e in items])
    elif items:
        Console().print(render.epochs_table(items))
    else:
        typer.echo(f"run {run_id} has no predictions yet")


def predictions(
    ctx: typer.Context, run_id: str = RUN,
    epoch: int | None = typer.Option(None, "--epoch", min=0, help="Only this epoch."),
    sample: int | None = typer.Option(None, "--sample", min=0, help="Only this sample index."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Show at most N "
                                     "(default EPOCHLENS_CLI_LIST_LIMIT)."),
    show_all: bool = typer.Option(False, "--all", help="Show every prediction (all pages)."),
    as_json: bool = JSON,
) -> None:
    """List a run's predictions in (step, sample) order, fetched page by page.

    The match column compares each prediction with its ground truth ignoring case and
    surrounding or repeated whitespace; long texts are cut (--json prints them whole).
    """
    settings = cli_context(ctx).settings
    if limit is not None and show_all:
        raise CliError("--limit and --all exclude each other", 2)
    cap = None if show_all else (limit or settings.list_limit)
    page_size = settings.page_size if cap is None else min(settings.page_size, cap + 1)
    with cli_context(ctx).client() as client:
        items = client.predictions(run_id, epoch, sample, page_size)
        shown = list(itertools.islice(items, cap))
        more = cap is not None and next(items, None) is not None
    if as_json:
        render.print_json([render.message_dict(p) for p in shown])
    else:
        Console().print(render.predictions_table(shown, settings.preview_chars))
    if more:
        typer.echo(f"showing the first {cap}; more with --limit N or --all", err=True)


def compare(ctx: typer.Context, run_id: str = RUN,
            sample: int | None = typer.Argument(None, metavar="[SAMPLE]", min=0,
                                                help="Sample index: show this sample across "
                                                "the run; without it, compare two epochs or "
                                                "runs."),
            baseline: str | None = typer.Option(None, "--baseline", metavar="RUN",
                                                help="Baseline run (default: RUN itself)."),
            epoch: int | None = typer.Option(None, "--epoch", min=0,
                                             help="Epoch of RUN (default: its last)."),
            baseline_epoch: int | None = typer.Option(None, "--baseline-epoch", min=0,
                                                      help="Epoch of the baseline."),
            best: str | None = typer.Option(None, "--best", metavar="CRITERION",
                                            help="Baseline epoch: the best on CRITERION."),
            first: bool = typer.Option(False, "--first", help="Baseline epoch: its first."),
            last: bool = typer.Option(False, "--last", help="Baseline epoch: its last."),
            max_changes: int = typer.Option(0, "--max-changes", min=0, help="Changed samples "
                                            "to list (0: the service default)."),
            as_json: bool = JSON) -> None:
    """One sample across the run (RUN SAMPLE), or two epochs or runs compared (RUN).

    Without SAMPLE (QueryService.CompareRuns): RUN at --epoch (default: its last) against
    --baseline (default: RUN itself) at --baseline-epoch, or its --best epoch on a
    criterion, its --first or its --last (default: the first epoch of RUN itself, the last
    of another run), on the samples both have (matched by prompt and ground truth across
    runs). A table per criterion and judge: pairs, both means, the mean delta with its
    paired bootstrap confidence interval, both pass rates, the pass-rate delta with its
    interval, and how many samples went up, down or stayed the same; then the changed
    samples, verdict regressions first, then improvements, then the largest score
    changes. --json prints the CompareRunsResponse.

    With SAMPLE: one sample across the run, epoch by epoch, with word diffs.

    The prompt and ground truth once, then each epoch's prediction as a word diff against
    the previous epoch (inserted words green, removed words red and struck through; without
    colour they are written as [-removed-] and {+inserted+}), marked match,
    miss or no truth against the ground truth (exact match: ignoring case and surrounding
    or repeated whitespace). Under each epoch its judgments, one line each: criterion (judge),
    score, pass/fail (or unscored) and the reasoning (or why it is unscored), cut to
    EPOCHLENS_CLI_PREVIEW_CHARS. --json adds "exact_match" to each prediction: true,
    false, or null when there is no ground truth; each prediction's "judgments" are the
    epochlens.v1.Judgment messages.
    """
    cli = cli_context(ctx)
    request = compare_view.compare_request(run_id, baseline, epoch, baseline_epoch, best,
                                           first, last, max_changes)
    if sample is None:
        _compare_runs(cli, request, as_json)
        return
    if request.ListFields() != [(request.DESCRIPTOR.fields_by_name["run_id"], run_id)]:
        raise CliError("the options of a run comparison need RUN without SAMPLE", 2)
    _compare_sample(cli, run_id, sample, as_json)


def _compare_sample(cli, run_id: str, sample: int, as_json: bool) -> None:
    """One sample across the run, epoch by epoch, with word diffs (or --json)."""
    with cli.client() as client:
        reply = client.compare(run_id, sample)
    truth = reply.ground_truth if reply.HasField("ground_truth") else None
    if as_json:
        data = render.message_dict(reply)
        data.pop("next_page_token", None)  # every page is in `reply`: there is no next one
        for entry, p in zip(data["predictions"], reply.predictions, strict=True):
            entry["exact_match"] = exact_match(p.prediction, truth)
        render.print_json(data)
        return
    console = Console()
    console.print(render.compare_header(reply))
    previous = None
    for p in reply.predictions:
        diff = word_diff(previous if previous is not None else p.prediction, p.prediction)
        console.print(render.compare_entry(p, diff, exact_match(p.prediction, truth),
                                           render.has_colour(console),
                                           cli.settings.preview_chars))
        previous = p.prediction
    console.print(render.compare_footer(reply, truth))


def _compare_runs(cli, request: query_pb2.CompareRunsRequest, as_json: bool) -> None:
    with cli.client() as client:
        compared = client.compare_runs(request)
    if as_json:
        render.print_json(render.message_dict(compared))
    else:
        Console().print(compare_view.comparison(compared))


def summary(ctx: typer.Context, run_id: str = RUN, as_json: bool = JSON) -> None:
    """Per epoch: predictions, exact-match count and rate, latest step; a sparkline; and,
    when the run has judgments, each criterion's scores per epoch and the judge's cost.

    Exact match: the prediction equals the ground truth after Unicode NFC, ignoring case
    and surrounding or repeated whitespace (the definition of the judge's exact_match
    rule); the rate is over the predictions that have a ground truth. The sparkline is
    ASCII, one character per epoch from _ (0%) to @ (100%).
    Judge criteria (criterion and judge): mean score and pass rate per epoch over the
    scored judgments (unscored ones are counted apart), a sparkline of the mean score
    (rule scores 0-1, LLM and human scores 1-10 drawn as score/10; ? where an epoch has no
    scored judgment), judge tokens and cost per epoch, the run's total cost, whether the
    LLM budget is exhausted or LLM judging paused (and why), the predictions the judge gave
    up on (with each one's reason), and the predictions the writer has not handed to the
    judge yet (with the hand-off's last error); each with the command that resumes it.
    --json prints {"run": the Run, "epochs": one object per epoch with epoch,
    prediction_count, with_ground_truth, exact_match_count, exact_match_rate (null without
    ground truth) and latest_step, "sparkline": the sparkline, "judges": {"criteria": per
    criterion its criterion, judge_type, judge_model, scale, sparkline and epochs (epoch,
    mean_score, pass_rate, scored_count, unscored_count), "epochs": per epoch
    input_tokens, output_tokens and cost_usd, total_cost_usd, budget_usd,
    budget_exhausted, llm_paused_reason, pending_predictions, failed_predictions, failures
    (epoch, step, sample_index, attempts, reason, update_time), handoff_waiting,
    handoff_error, handoff_retry_time (null when none)}, "agreements": the judge-human
    agreements of the run (epochlens.v1.JudgeAgreement; kappa and spearman absent where
    undefined), "pairwise": per candidate epoch, baseline, criterion and judge the
    PairwiseSummary fields}. The agreement table lists, per criterion people judged, each rule
    and LLM judge's pairs with people, agreement on pass/fail, Cohen's kappa and Spearman.
    Pairwise judging (judge.pairwise in the run's config): per candidate epoch, its baseline,
    criterion and judge, wins/losses/ties, unscored pairs, the win rate with its confidence
    interval, the pairs where the judge picked the same position in both orders, and cost.
    """
    cli = cli_context(ctx)
    with cli.client() as client:
        run = client.run(run_id)
        total = sum(e.prediction_count for e in client.epochs(run_id))
        pages = progress_pages(prediction_pages(client, cli.settings, run_id), total,
                               "reading", cli.settings, stderr_is_terminal())
        stats = epoch_stats(pages)
        judged = client.run_summary(run_id)
    line = render.sparkline(s.exact_match_rate for s in stats)
    series, costs = criteria_series(judged), epoch_costs(judged)
    epochs = sorted({s.epoch for s in stats} | {c.epoch for c in costs})
    if as_json:
        render.print_json({"run": render.message_dict(run), "epochs": [s.as_dict() for s in stats],
                           "sparkline": line,
                           "judges": render.judges_json(judged, series, epochs, costs),
                           "agreements": [render.message_dict(a) for a in judged.agreements],
                           "pairwise": pairwise_json(judged.pairwise)})
        return
    console = Console()
    console.print(render.run_header(run))
    console.print(render.summary_table(stats))
    console.print(render.sparkline_line(stats, line))
    console.print(EXACT_RULE, style="dim")
    _print_judges(console, judged, series, epochs, costs, cli.settings.preview_chars)


def _print_judges(console: Console, judged: query_pb2.RunSummary,
                  series: list[CriterionSeries], epochs: list[int],
                  costs: list[EpochCost], limit: int) -> None:
    """The judge part of `summary`: nothing at all for a run without judgments (but a
    stopped LLM judge, failed predictions or predictions waiting for the judge are said)."""
    if series:
        console.print(Text("\njudge scores per epoch (mean and pass rate over scored "
                           "judgments; unscored ones are counted apart)", "bold"))
        console.print(render.judge_scores_table(series))
        console.print(render.judge_sparklines(series, epochs))
        console.print(render.judge_cost_table(costs))
    if judged.agreements:
        console.print(Text("\nagreement of each judge with people (pairs: (person, "
                           "prediction) judged by both; kappa on pass/fail, Spearman on "
                           "scores; - where undefined)", "bold"))
        console.print(compare_view.agreement_table(list(judged.agreements)))
    if judged.pairwise:
        console.print(Text(f"\n{PAIRWISE_TITLE}", "bold"))
        console.print(pairwise_table(judged.pairwise, judged.run_id))
    status = render.judge_status(judged, limit)
    if status.renderables:
        console.print(status)


def watch(ctx: typer.Context, run_id: str = RUN,
          interval: float | None = typer.Option(None, "--interval", min=0.01, help="Seconds "
                                                "without news after which an epoch counts as "
                                                "landed (default "
                                                "EPOCHLENS_CLI_WATCH_INTERVAL_S).")) -> None:
    """Follow a run while it trains; exit 0 once it is no longer running.

    Streams the run's changes (QueryService.WatchRun) and prints each epoch as it lands (a
    later epoch appeared, the run ended, or nothing arrived for --interval seconds) with
    its exact-match rate.
    """
    cli = cli_context(ctx)
    period = interval or cli.settings.watch_interval_s
    with cli.client() as client:
        run = client.run(run_id)
        follower = watching.EpochFollower(client, cli.settings, run_id)
        typer.echo(f"watching run {run.id} ({run.name}) (Ctrl-C stops)")
        try:
            _follow(follower, client, run_id, period, cli.settings.watch_max_failures)
        except KeyboardInterrupt:
            typer.echo("stopped watching", err=True)
            raise typer.Exit(130) from None
    typer.echo(f"run {run_id} {render.state_name(follower.state)}")


def _follow(follower: watching.EpochFollower, client, run_id: str, period: float,
            max_failures: int) -> None:
    """Follows the stream until the run is over. A stream that fails because the service
    is unreachable, slow or dropped it is opened again (from the last event) after
    `period`, up to max_failures times in a row (each one a warning on stderr); any other
    error ends the watch."""
    failures = 0
    while True:
        token = follower.resume_token
        try:
            watching.follow(follower, client, run_id, period, typer.echo)
            return
        except CliError as exc:
            failures = 1 if follower.resume_token != token else failures + 1
            if not exc.retryable or failures > max_failures:
                raise
            typer.echo(f"warning: {exc} (attempt {failures} of {max_failures} failed in a "
                       "row; retrying)", err=True)
        time.sleep(period)


def export(ctx: typer.Context, run_id: str = RUN,
           fmt: exporting.ExportFormat = FORMAT, path: Path | None = OUTPUT) -> None:
    """Stream every prediction of a run, with its judgments, as JSON Lines or CSV, in
    constant memory.

    One record per prediction with the fields of epochlens.v1.Prediction (unset optional
    fields null in jsonl, empty in csv), in (step, sample) order. jsonl adds "judgments",
    a list of the prediction's judgments (score and passed null when unscored); csv adds
    one "score:<criterion>" column per criterion the run has (empty when not scored).
    With -o, a progress bar on stderr, and FILE appears only once complete.
    """
    cli = cli_context(ctx)
    with cli.client() as client:
        total = sum(e.prediction_count for e in client.epochs(run_id))
        judged = client.run_summary(run_id)
        pages = progress_pages(prediction_pages(client, cli.settings, run_id), total,
                               "exporting", cli.settings, path is not None)
        judgments = (exporting.judgment_stream(client, cli.settings, run_id,
                                               cli.settings.export_page_size)
                     if judged.rows else iter(()))
        with exporting.output(path, cli.settings.export_buffer_bytes) as out:
            written = exporting.write_pages(exporting.with_judgments(pages, judgments), out,
                                            fmt, exporting.score_columns(judged))
    if path is not None:
        typer.echo(f"exported {written} predictions to {path}", err=True)


COMMANDS = {"runs": runs, "epochs": epochs, "predictions": predictions, "compare": compare,
            "summary": summary, "watch": watch, "export": export, "metrics": metrics}


def register(app: typer.Typer) -> None:
    """Adds the run views to the `epochlens` command."""
    for name, command in COMMANDS.items():
        app.command(name)(one_line_errors(command))
