"""`epochlens delete RUN_ID [--force] [--yes]`: PredictionWriterService.DeleteRun on the
writer (EPOCHLENS_CLI_WRITER_ADDRESS), acting for the CLI's caller.

It asks before deleting (the deletion cannot be undone); without a terminal it needs --yes
(else exit 2, as `eval` does for paid judging). A RUNNING run is refused unless --force
(which cancels it first). It prints what was removed; a deletion the writer could not finish
(the judge unreachable: exit 1) is resumed by running the command again.
"""

import json

import typer

from epochlens.v1 import writer_pb2, writer_pb2_grpc
from services.cli.client import CliError, ServiceClient
from services.cli.config import CliSettings
from services.cli.context import cli_context, one_line_errors
from services.cli.eval_run import stdin_is_terminal, usage_error

# DeleteRunResponse fields, in the order they are printed, with their labels.
COUNTS = (("prediction_count", "predictions"), ("sample_count", "samples"),
          ("metric_count", "metrics"), ("judge_task_count", "judge tasks"),
          ("judgment_count", "judgments"), ("cache_entry_count", "cache entries"),
          ("spend_record_count", "spend records"))


class DeleteClient(ServiceClient):
    """DeleteRun at settings.writer_address, with its own deadline (delete_timeout_s)."""

    service = "writer service"

    def __init__(self, settings: CliSettings) -> None:
        slow = settings.model_copy(update={"timeout_s": settings.delete_timeout_s})
        super().__init__(slow, settings.writer_address)
        self._stub = writer_pb2_grpc.PredictionWriterServiceStub(self._channel)

    def delete(self, run_id: str, force: bool) -> writer_pb2.DeleteRunResponse:
        request = writer_pb2.DeleteRunRequest(run_id=run_id, force=force)
        try:
            return self.call(self._stub.DeleteRun, request, f"run {run_id}")
        except CliError as exc:
            if exc.reason == "RUN_ACTIVE":
                raise CliError(f"{exc} (pass --force to cancel and delete it)") from None
            raise


@one_line_errors
def delete(ctx: typer.Context,
           run_id: str = typer.Argument(..., metavar="RUN_ID", help="Id of your run."),
           force: bool = typer.Option(False, "--force", help="Delete a RUNNING run too (it is "
                                      "cancelled first; its trainer's later writes fail)."),
           yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask (needed without a "
                                    "terminal)."),
           as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON.")
           ) -> None:
    """Delete one of your runs and everything stored for it, in every service."""
    if not yes:
        if not stdin_is_terminal():
            raise usage_error("deleting a run needs a confirmation: run in a terminal, or "
                              "pass --yes")
        if not typer.confirm(f"Delete run {run_id} and everything stored for it? This "
                             "cannot be undone.", default=False, err=True):
            typer.echo("not deleted", err=True)
            raise typer.Exit(1)
    with DeleteClient(cli_context(ctx).settings) as client:
        reply = client.delete(run_id, force)
    if as_json:
        typer.echo(json.dumps({"run_id": reply.run_id,
                               **{field: getattr(reply, field) for field, _ in COUNTS}}))
        return
    removed = ", ".join(f"{getattr(reply, field)} {label}" for field, label in COUNTS)
    typer.echo(f"deleted run {reply.run_id}: {removed}")
