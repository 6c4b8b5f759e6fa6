"""`epochlens keys ...` and `epochlens login`: per-user API keys (AuthService on the writer,
EPOCHLENS_CLI_WRITER_ADDRESS).

* `keys create [--name N] [--expires-days D]` prints the new key once (only its hash is
  kept); `keys list` the caller's keys that are not revoked; `keys revoke ID` revokes one.
  They act for the CLI's caller: --token / EPOCHLENS_CLI_TOKEN, else the API key already
  stored, else a token minted from EPOCHLENS_AUTH_JWT_SECRET. The first key therefore comes
  from an operator-issued token, the next ones from a token obtained with a key.
* `login [--key K]` checks the key by exchanging it for a token, then stores it in the
  credentials file (mode 0600; EPOCHLENS_CREDENTIALS_FILE, default
  ~/.config/epochlens/credentials), where the CLI and the trainer client find it.
"""

import json

import grpc
import typer

from epochlens.v1 import auth_pb2, auth_pb2_grpc
from services.cli.client import CliError, ServiceClient, cli_tls
from services.cli.config import CliSettings
from services.cli.context import cli_context, one_line_errors
from trainer_client.credentials import (
    ApiKeyCredentials,
    CredentialsError,
    CredentialSettings,
    write_api_key,
)

app = typer.Typer(help="Create, list and revoke your API keys (see also `epochlens login`).",
                  no_args_is_help=True)


class KeysClient(ServiceClient):
    """Blocking calls to the AuthService at settings.writer_address."""

    service = "writer service"

    def __init__(self, settings: CliSettings, token: str | None = None) -> None:
        super().__init__(settings, settings.writer_address, token)
        self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)

    def create(self, name: str, expire_days: int) -> auth_pb2.CreateApiKeyResponse:
        request = auth_pb2.CreateApiKeyRequest(name=name, expire_days=expire_days)
        return self.call(self._stub.CreateApiKey, request, "API key")

    def list(self) -> list[auth_pb2.ApiKey]:
        return list(self.call(self._stub.ListApiKeys, auth_pb2.ListApiKeysRequest(),
                              "API keys").api_keys)

    def revoke(self, key_id: str) -> auth_pb2.ApiKey:
        return self.call(self._stub.RevokeApiKey, auth_pb2.RevokeApiKeyRequest(id=key_id),
                         f"API key {key_id}")


def _time(value, when_unset: str) -> str:
    return value.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if value.seconds else when_unset


def _as_dict(key: auth_pb2.ApiKey) -> dict:
    return {"id": key.id, "name": key.name, "prefix": key.prefix,
            "create_time": _time(key.create_time, ""),
            "expire_time": _time(key.expire_time, ""),
            "last_used_time": _time(key.last_used_time, "")}


@one_line_errors
def create(ctx: typer.Context,
           name: str = typer.Option("", "--name", help="Name to recognise the key by."),
           expires_days: int = typer.Option(0, "--expires-days", min=0,
                                            help="Days until it expires; 0: never.")) -> None:
    """Create an API key and print it (shown once: store it with `epochlens login`)."""
    with KeysClient(cli_context(ctx).settings) as client:
        reply = client.create(name, expires_days)
    key = reply.api_key
    typer.echo(f"created API key {key.id} ({key.prefix}...) for {key.user_id}, expires "
               f"{_time(key.expire_time, 'never')}")
    typer.echo("the key (shown once, only its hash is kept):")
    typer.echo(reply.secret)


@one_line_errors
def list_keys(ctx: typer.Context,
              as_json: bool = typer.Option(False, "--json", help="Print JSON lines.")) -> None:
    """List your API keys that are not revoked, newest first."""
    with KeysClient(cli_context(ctx).settings) as client:
        keys = client.list()
    if as_json:
        for key in keys:
            typer.echo(json.dumps(_as_dict(key)))
        return
    if not keys:
        typer.echo("no API keys")
        return
    typer.echo(f"{'id':36}  {'prefix':15}  {'expires':19}  {'last used':19}  name")
    for key in keys:
        typer.echo(f"{key.id:36}  {key.prefix + '...':15}  {_time(key.expire_time, 'never'):19}"
                   f"  {_time(key.last_used_time, 'never'):19}  {key.name}")


@one_line_errors
def revoke(ctx: typer.Context,
           key_id: str = typer.Argument(..., metavar="ID", help="Key id (`keys list`).")) -> None:
    """Revoke one of your API keys: it can no longer be exchanged for tokens."""
    with KeysClient(cli_context(ctx).settings) as client:
        key = client.revoke(key_id)
    typer.echo(f"revoked API key {key.id} ({key.prefix}...) at {_time(key.revoke_time, '')}")


@one_line_errors
def login(ctx: typer.Context,
          key: str | None = typer.Option(None, "--key", help="The API key; unset: asked for "
                                         "(not echoed).")) -> None:
    """Store an API key for the CLI and the trainer client, after checking it."""
    settings = cli_context(ctx).settings
    api_key = (key or typer.prompt("API key", hide_input=True)).strip()
    credential_settings = CredentialSettings()
    credentials = ApiKeyCredentials(api_key, settings.writer_address, credential_settings,
                                    cli_tls(settings))
    try:
        credentials.token()
    except CredentialsError as exc:
        retryable = exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        raise CliError(f"API key not stored: {exc}", 1 if retryable else 2) from None
    path = credential_settings.credentials_file()
    try:
        write_api_key(path, api_key)
    except OSError as exc:
        raise CliError(f"cannot write the credentials file {path}: {exc}") from None
    typer.echo(f"logged in as {credentials.user_id}: API key {api_key[:12]}... stored in {path}")


app.command("create")(create)
app.command("list")(list_keys)
app.command("revoke")(revoke)
