"""What every query command shares: settings (flags over environment), the
--json switch, and one place that turns CliError into a one-line message."""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer

from services.cli.client import CliError, QueryClient
from services.cli.config import CliSettings


@dataclass
class CliContext:
    """Global options of the `epochlens` command (typer keeps it in ctx.obj)."""

    settings: CliSettings

    def client(self) -> QueryClient:
        return QueryClient(self.settings)


def cli_context(ctx: typer.Context) -> CliContext:
    if not isinstance(ctx.obj, CliContext):
        ctx.obj = CliContext(CliSettings())
    return ctx.obj


def one_line_errors(command: Callable) -> Callable:
    """Runs a command; a CliError is printed as `error: ...` with its exit status."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CliError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
    return wrapper
