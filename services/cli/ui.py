"""`epochlens ui`: a one-time sign-in link to the web UI for the CLI's own token.

The CLI asks the web service (POST /auth/links, `Authorization: Bearer <token>`) for a link
that signs the browser in once with that token; the web service checks the token with the
query service first. The link is printed and, unless --no-browser, opened in the browser.
"""

import json
import urllib.error
import urllib.request
import webbrowser

import typer

from services.cli.client import CliError, resolve_credentials_for
from services.cli.context import cli_context, one_line_errors


@one_line_errors
def ui(ctx: typer.Context,
       no_browser: bool = typer.Option(False, "--no-browser",
                                       help="Print the link only; do not open a browser.")
       ) -> None:
    """Open the web UI, signed in with your token (a one-time link, valid for minutes)."""
    settings = cli_context(ctx).settings
    ((_, authorization),) = resolve_credentials_for(settings).metadata()
    link = settings.web_url.rstrip("/") + _link_path(settings.web_url, authorization,
                                                     settings.timeout_s)
    typer.echo("Sign-in link (works once):", err=True)
    typer.echo(link)
    if not no_browser and not webbrowser.open(link):
        typer.echo("no browser found: open the link above yourself", err=True)


def _link_path(web_url: str, authorization: str, timeout_s: float) -> str:
    request = urllib.request.Request(f"{web_url.rstrip('/')}/auth/links", method="POST",
                                     headers={"Authorization": authorization,
                                              "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return json.load(reply)["link"]
    except urllib.error.HTTPError as exc:
        raise CliError(_refusal(exc), 2 if exc.code == 401 else 1) from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach the web service at {web_url} (start it with `epochlens "
                       f"up`): {reason}") from None


def _refusal(exc: urllib.error.HTTPError) -> str:
    try:
        message = json.load(exc).get("message", "")
    except (ValueError, AttributeError):
        message = ""
    if exc.code == 401:
        return f"token rejected: {message}"
    return f"the web service refused the sign-in link ({exc.code}): {message}"
