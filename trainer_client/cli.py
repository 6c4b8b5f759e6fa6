"""The ``epochlens-sync`` command (also ``python -m trainer_client.cli``).

Uploads what training left in the spool folder; see trainer_client.offline.
"""

import logging
from pathlib import Path
from typing import Annotated

import typer

from trainer_client.offline import FINISH_STATES, sync

app = typer.Typer(help="Upload predictions left in the epochlens spool.", add_completion=False)


@app.command()
def main_command(
        spool_dir: Annotated[Path | None, typer.Option(
            help="Spool folder; default EPOCHLENS_TRAINER_SPOOL_DIR.")] = None,
        writer: Annotated[str | None, typer.Option(
            help="Writer host:port; default EPOCHLENS_TRAINER_WRITER_ADDRESS.")] = None,
        token: Annotated[str | None, typer.Option(
            envvar="EPOCHLENS_TRAINER_TOKEN", help="Bearer token for the writer.")] = None,
        timeout: Annotated[float | None, typer.Option(
            help="Seconds to wait per spool; default EPOCHLENS_TRAINER_FLUSH_TIMEOUT_S.")] = None,
        finish: Annotated[str | None, typer.Option(
            help="Finish runs whose training never recorded an end state: succeeded, failed "
            "or cancelled.")] = None) -> None:
    """Upload every spool file; exit 1 when anything is left un-uploaded."""
    if finish is not None and finish not in FINISH_STATES:
        raise typer.BadParameter(f"--finish must be one of {sorted(FINISH_STATES)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    reports = sync(spool_dir, writer=writer, token=token, timeout=timeout, finish=finish)
    for report in reports:
        typer.echo(report.describe())
    if not reports:
        typer.echo("nothing to sync")
    raise typer.Exit(0 if all(r.complete for r in reports) else 1)


def main() -> None:
    """Console entry point (epochlens-sync)."""
    app()


if __name__ == "__main__":
    main()
