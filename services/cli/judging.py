"""`epochlens judge ...`: acting on a run's judging.

* `judge resume RUN [--rejudge-unscored] [--rejudge-failed]`: JudgeService.ResumeJudging at
  EPOCHLENS_CLI_JUDGE_ADDRESS. Clears the run's paused LLM judging (say, after a bad API key
  was fixed); --rejudge-unscored also deletes the run's unscored LLM judgments and queues
  their predictions again, --rejudge-failed queues the predictions the judge gave up on.
* `judge history RUN --step S --sample I --criterion C`: every revision of the human
  judgments of one prediction on one criterion (QueryService.ListJudgmentRevisions): who
  recorded what, and when.

Errors are one `error: ...` line with a non-zero status, as for the other commands.
"""

import typer
from rich.console import Console
from rich.table import Column
from rich.text import Text

from epochlens.v1 import judge_pb2, judge_pb2_grpc, query_pb2
from services.cli import render
from services.cli.client import ServiceClient
from services.cli.config import CliSettings
from services.cli.context import cli_context, one_line_errors

RUN = typer.Argument(..., metavar="RUN", help="Run id (see `epochlens runs`).")

app = typer.Typer(help="Act on a run's judging: resume it, see how human judgments changed.",
                  no_args_is_help=True)


class JudgeClient(ServiceClient):
    """Blocking calls to the JudgeService at settings.judge_address."""

    service = "judge service"

    def __init__(self, settings: CliSettings, token: str | None = None) -> None:
        super().__init__(settings, settings.judge_address, token)
        self._stub = judge_pb2_grpc.JudgeServiceStub(self._channel)

    def resume(self, run_id: str, rejudge_unscored: bool,
               rejudge_failed: bool) -> judge_pb2.ResumeJudgingResponse:
        request = judge_pb2.ResumeJudgingRequest(run_id=run_id, rejudge_unscored=rejudge_unscored,
                                                 rejudge_failed=rejudge_failed)
        return self.call(self._stub.ResumeJudging, request, f"judging of run {run_id}")


def resume(ctx: typer.Context, run_id: str = RUN,
           rejudge_unscored: bool = typer.Option(
               False, "--rejudge-unscored", help="Also judge again the run's unscored LLM "
               "judgments (paused, budget spent, provider errors)."),
           rejudge_failed: bool = typer.Option(
               False, "--rejudge-failed", help="Also judge again the predictions the judge "
               "gave up on.")) -> None:
    """Resume a run's judging: clear its paused LLM judging, optionally judge again.

    The judge service is EPOCHLENS_CLI_JUDGE_ADDRESS. Prints why LLM judging was paused (if
    it was), the unscored judgments deleted and the predictions queued again; another user's
    run is not found.
    """
    with JudgeClient(cli_context(ctx).settings) as client:
        reply = client.resume(run_id, rejudge_unscored, rejudge_failed)
    if reply.cleared_paused_reason:
        typer.echo(f"LLM judging of run {run_id} resumed (it was paused: "
                   f"{reply.cleared_paused_reason})")
    else:
        typer.echo(f"LLM judging of run {run_id} was not paused")
    if rejudge_unscored:
        typer.echo(f"{reply.deleted_unscored} unscored LLM judgments deleted, to be judged again")
    typer.echo(f"{reply.requeued_predictions} predictions queued for the judge again")


def history(ctx: typer.Context, run_id: str = RUN,
            step: int = typer.Option(..., "--step", min=0, help="Step of the prediction."),
            sample: int = typer.Option(..., "--sample", min=0, help="Its sample index."),
            criterion: str = typer.Option(..., "--criterion", help="Criterion name."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON, and nothing else, "
                                         "on stdout.")) -> None:
    """Show how the human judgments of one prediction on one criterion changed.

    Every revision, oldest first: revision, author, time, score, threshold, pass/fail,
    reasoning (the latest revision is the one that counts). --json prints the
    epochlens.v1.JudgmentRevision messages.
    """
    cli = cli_context(ctx)
    with cli.client() as client:
        revisions = client.judgment_revisions(run_id, step, sample, criterion)
    if as_json:
        render.print_json([render.message_dict(r) for r in revisions])
    elif revisions:
        Console().print(revisions_table(revisions, cli.settings.preview_chars))
    else:
        typer.echo(f"no human judgment of run {run_id} step {step} sample {sample} on "
                   f"{criterion!r}")


def revisions_table(revisions: list[query_pb2.JudgmentRevision], limit: int):
    table = render.new_table("revision", Column("author", overflow="fold"),
                             Column("recorded (UTC)", no_wrap=True), "score", "threshold",
                             "verdict", "reasoning")
    for r in revisions:
        verdict = Text("pass", "bold green") if r.passed else Text("fail", "bold red")
        table.add_row(str(r.revision), Text(r.author), render.when(r.create_time),
                      f"{r.score:g}", f"{r.threshold:g}", verdict,
                      render.preview(r.reasoning, limit))
    return table


app.command("resume")(one_line_errors(resume))
app.command("history")(one_line_errors(history))
