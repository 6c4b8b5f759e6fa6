"""The `epochlens` command line: tokens, health checks, the local stack, a smoke
session, and (services.cli.views, services.cli.report) the views of runs."""

import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epochlens.v1 import common_pb2, query_pb2, query_pb2_grpc, writer_pb2, writer_pb2_grpc
from services.cli import delete, evaluate, judging, keys, report, stack, ui, views
from services.cli.client import cli_channel, cli_tls
from services.cli.config import CliSettings
from services.cli.context import CliContext, cli_context, one_line_errors
from services.common.auth import mint_token
from services.common.config import AuthSettings
from services.common.matching import exact_match
from services.common.startup import StartupError, as_configuration_error, exit_with
from trainer_client.tls import open_channel


class EpochlensApp(typer.Typer):
    """The command line's app: a configuration error in any command (a settings class that
    does not validate) is one line, `configuration error: ...`, and exit status 2."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            error = exc if isinstance(exc, StartupError) else as_configuration_error(exc)
            if error is None:
                raise
            exit_with(error)


app = EpochlensApp(help="epochlens: watch a language model learn.", no_args_is_help=True)


@app.callback()
def main_options(
    ctx: typer.Context,
    query_address: str | None = typer.Option(
        None, "--query-address", help="Query service host:port (env EPOCHLENS_CLI_QUERY_ADDRESS)"),
    token: str | None = typer.Option(
        None, "--token", help="Bearer token (env EPOCHLENS_CLI_TOKEN; unset: minted for "
        "EPOCHLENS_CLI_USER with EPOCHLENS_AUTH_JWT_SECRET)"),
) -> None:
    """epochlens: watch a language model learn."""
    overrides = {k: v for k, v in (("query_address", query_address), ("token", token)) if v}
    ctx.obj = CliContext(CliSettings(**overrides))


@app.command()
def token(user: str = typer.Option(..., "--user", help="User id to put in `sub`."),
          ttl: int | None = typer.Option(None, help="Lifetime in seconds.")) -> None:
    """Print a bearer token for USER, signed with the configured key (for local use)."""
    typer.echo(mint_token(AuthSettings(), user, ttl))


@app.command()
@one_line_errors
def health(ctx: typer.Context,
           address: str | None = typer.Option(None, help="host:port of a gRPC service."),
           url: str | None = typer.Option(None, help="URL of an HTTP health endpoint (the "
                                          "web service's /healthz) instead of --address."),
           service: str = typer.Option("", help="Service name; empty: the whole server."),
           timeout: float = typer.Option(2.0, help="Seconds to wait.")) -> None:
    """Exit 0 when the server reports SERVING (for health checks and scripts); over TLS when
    the EPOCHLENS_CLI_TLS_* settings ask for it."""
    if (address is None) == (url is None):
        typer.echo("error: give one of --address or --url", err=True)
        raise typer.Exit(2)
    settings = cli_context(ctx).settings
    tls = cli_tls(settings)  # a TLS file that cannot be used: one line, exit 2
    if url is not None:
        raise typer.Exit(_http_health(url, timeout, settings.tls_ca_file))
    with open_channel(address, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            typer.echo(f"{address}: {exc.code().name}", err=True)
            raise typer.Exit(1) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    typer.echo(f"{address}: {status}")
    raise typer.Exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)


def _http_health(url: str, timeout: float, ca_file: Path | None) -> int:
    """0 when GET url answers 200; the status line (or why there was none) is printed. An
    https URL's certificate is checked against ca_file when given (else the system's CAs)."""
    context = ssl.create_default_context(cafile=ca_file)
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
            typer.echo(f"{url}: {reply.status}")
            return 0
    except urllib.error.HTTPError as exc:
        typer.echo(f"{url}: {exc.code}", err=True)
    except (urllib.error.URLError, OSError) as exc:
        typer.echo(f"{url}: {getattr(exc, 'reason', exc)}", err=True)
    return 1


@app.command("up")
def stack_up() -> None:
    """Run migrate, then start judge, writer, query and web as local processes (what
    docker-compose runs); refuses the public example secrets of .env.example."""
    try:
        addresses = stack.up(stack.StackSettings())
    except stack.StackError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for name, address in addresses.items():
        typer.echo(f"{name}: serving on {address}")


@app.command("down")
def stack_down() -> None:
    """Stop the processes `epochlens up` started."""
    stopped = stack.down(stack.StackSettings())
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command()
@one_line_errors
def smoke(ctx: typer.Context) -> None:
    """Create a run, write a few epochs of predictions, finish it, and list its epochs."""
    settings = cli_context(ctx).settings
    metadata = (("authorization", f"Bearer {_token(settings)}"),)
    try:
        run_id = _smoke_write(settings, metadata)
        _smoke_read(settings, metadata, run_id)
    except grpc.RpcError as exc:
        typer.echo(f"error: {exc.code().name}: {exc.details()}", err=True)
        raise typer.Exit(1) from None


def _token(settings: CliSettings) -> str:
    return settings.token or mint_token(AuthSettings(), settings.user)


def _smoke_write(settings: CliSettings, metadata) -> str:
    with cli_channel(settings, settings.writer_address) as channel:
        stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        run = stub.CreateRun(writer_pb2.CreateRunRequest(
            name="smoke", model_name="none", dataset_name="smoke"),
            metadata=metadata, timeout=settings.timeout_s)
        typer.echo(f"created run {run.id}")
        for epoch in range(1, settings.smoke_epochs + 1):
            items = [common_pb2.PredictionInput(
                epoch=epoch, step=epoch * 10, sample_index=i, prompt=f"reverse: abc{i}",
                ground_truth=f"{i}cba", prediction=f"{i}cba"[: epoch + 1], generation_time_ms=1.0)
                for i in range(settings.smoke_samples)]
            reply = stub.WritePredictions(writer_pb2.WritePredictionsRequest(
                run_id=run.id, predictions=items), metadata=metadata, timeout=settings.timeout_s)
            typer.echo(f"epoch {epoch}: wrote {reply.inserted_count} predictions")
        stub.FinishRun(writer_pb2.FinishRunRequest(run_id=run.id),
                       metadata=metadata, timeout=settings.timeout_s)
        return run.id


def _smoke_read(settings: CliSettings, metadata, run_id: str) -> None:
    with cli_channel(settings, settings.query_address) as channel:
        stub = query_pb2_grpc.QueryServiceStub(channel)
        _, epochs = _all_pages(stub.ListEpochs, query_pb2.ListEpochsRequest(run_id=run_id),
                               "epochs", metadata, settings.timeout_s)
        typer.echo("epoch  predictions  latest_step")
        for e in epochs:
            typer.echo(f"{e.epoch:>5}  {e.prediction_count:>11}  {e.latest_step:>11}")
        sample, predictions = _all_pages(
            stub.CompareSample, query_pb2.CompareSampleRequest(run_id=run_id, sample_index=0),
            "predictions", metadata, settings.timeout_s)
        typer.echo(f"sample 0: {sample.prompt!r} -> expected {sample.ground_truth!r}")
        for p in predictions:
            truth = sample.ground_truth if sample.HasField("ground_truth") else None
            mark = "exact" if exact_match(p.prediction, truth) else "     "
            typer.echo(f"  epoch {p.epoch} step {p.step}: {p.prediction!r} {mark}")


def _all_pages(method, request, field: str, metadata, timeout: float) -> tuple[Any, list]:
    """The first reply of a paged call and the items of `field` over all its pages."""
    first = reply = method(request, metadata=metadata, timeout=timeout)
    items = list(getattr(reply, field))
    while reply.next_page_token:
        request.page_token = reply.next_page_token
        reply = method(request, metadata=metadata, timeout=timeout)
        items += getattr(reply, field)
    return first, items


app.command("report")(report.report)
views.register(app)
app.add_typer(judging.app, name="judge")
app.add_typer(keys.app, name="keys")
app.command("login")(keys.login)
app.command("ui")(ui.ui)
app.command("eval")(evaluate.register)
app.command("delete")(delete.delete)


if __name__ == "__main__":
    app()
