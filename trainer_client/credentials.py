"""Credentials of the clients (the trainer's upload and the `epochlens` CLI): a fixed bearer
token, or an API key exchanged for short-lived tokens that are refreshed before they end.

Where the API key comes from, first found wins: the EPOCHLENS_API_KEY environment variable,
then the credentials file `epochlens login` writes (EPOCHLENS_CREDENTIALS_FILE, default
$XDG_CONFIG_HOME/epochlens/credentials, that is ~/.config/epochlens/credentials; an INI file
with `api_key` in section [default], mode 0600).

ApiKeyCredentials exchanges the key (AuthService.ExchangeApiKey on the writer) when it has no
token or when the token is within refresh_margin_s of its end (at most half its lifetime),
so every call gets a token that is still valid; a caller whose token was refused anyway
(a client clock behind the server's) calls invalidate() and asks again. Only grpc and
pydantic-settings are needed: no server package.
"""

import configparser
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from epochlens.v1 import auth_pb2, auth_pb2_grpc
from trainer_client.tls import ClientTLS, open_channel

log = logging.getLogger(__name__)

API_KEY_ENV = "EPOCHLENS_API_KEY"
SECTION = "default"
Metadata = tuple[tuple[str, str], ...]


def default_credentials_file() -> Path:
    """$XDG_CONFIG_HOME/epochlens/credentials (XDG_CONFIG_HOME unset: ~/.config)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "epochlens" / "credentials"


class CredentialSettings(BaseSettings):
    """Where the API key is and how its tokens are refreshed (env prefix
    EPOCHLENS_CREDENTIALS_; the key itself also from EPOCHLENS_API_KEY)."""

    model_config = SettingsConfigDict(env_prefix="EPOCHLENS_CREDENTIALS_", env_file=".env",
                                      extra="ignore", validate_by_name=True)

    api_key: SecretStr | None = Field(
        None, validation_alias=API_KEY_ENV, description="API key (EPOCHLENS_API_KEY); "
        "unset: the one in the credentials file, if any.")
    file: Path | None = Field(
        None, description="Credentials file `epochlens login` writes and the clients read; "
        "unset: $XDG_CONFIG_HOME/epochlens/credentials (~/.config/epochlens/credentials).")
    refresh_margin_s: float = Field(
        60.0, ge=0, description="A token is exchanged again when this close to its end, "
        "seconds (at most half its lifetime).")
    exchange_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of one ExchangeApiKey call, seconds.")

    def credentials_file(self) -> Path:
        return self.file if self.file is not None else default_credentials_file()


class CredentialsError(Exception):
    """The API key could not be read, or could not be exchanged for a token. `code` is the
    exchange's gRPC status (None: the credentials file is at fault)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class Credentials(Protocol):
    """What the clients ask for each call: the authorization metadata."""

    refreshable: bool

    def metadata(self) -> Metadata: ...

    def invalidate(self) -> None: ...


@dataclass
class StaticToken:
    """A bearer token given as is (never refreshed)."""

    token: str
    refreshable: bool = False

    def metadata(self) -> Metadata:
        return (("authorization", f"Bearer {self.token}"),)

    def invalidate(self) -> None:
        """Nothing to refresh: the next call sends the same token."""


class ApiKeyCredentials:
    """Short-lived tokens exchanged for an API key at the writer, refreshed before they end.
    Thread-safe: one exchange at a time, every caller gets the current token."""

    refreshable = True

    def __init__(self, api_key: str, address: str, settings: CredentialSettings,
                 tls: ClientTLS | None = None) -> None:
        """tls: of the channel to the writer at address (None: plaintext)."""
        self._api_key = api_key
        self._address = address
        self._settings = settings
        self._tls = tls
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0  # time.monotonic() after which the token is exchanged again
        self.user_id: str | None = None
        self.exchanges = 0

    def metadata(self) -> Metadata:
        return (("authorization", f"Bearer {self.token()}"),)

    def token(self) -> str:
        """A token that is not within the refresh margin of its end."""
        with self._lock:
            if self._token is None or time.monotonic() >= self._refresh_at:
                self._exchange()
            return self._token  # type: ignore[return-value]

    def invalidate(self) -> None:
        """Drops the token (the server refused it): the next call exchanges the key again."""
        with self._lock:
            self._token = None

    def _exchange(self) -> None:
        request = auth_pb2.ExchangeApiKeyRequest(api_key=self._api_key)
        try:
            with open_channel(self._address, self._tls) as channel:
                reply = auth_pb2_grpc.AuthServiceStub(channel).ExchangeApiKey(
                    request, timeout=self._settings.exchange_timeout_s)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
            raise CredentialsError(f"API key exchange at {self._address} failed with "
                                   f"{code.name}: {details}", code) from None
        lifetime = max(0.0, reply.expire_time.seconds - time.time())
        margin = min(self._settings.refresh_margin_s, lifetime / 2)
        self._token, self.user_id = reply.access_token, reply.user_id
        self._refresh_at = time.monotonic() + lifetime - margin
        self.exchanges += 1
        log.debug("API key exchanged for a token of %s valid %.1fs (exchange %d)",
                  reply.user_id, lifetime, self.exchanges)


def read_api_key(settings: CredentialSettings) -> str | None:
    """The API key from EPOCHLENS_API_KEY, else from the credentials file; None when
    neither has one. A file that exists and cannot be used is a CredentialsError."""
    if settings.api_key is not None and settings.api_key.get_secret_value():
        return settings.api_key.get_secret_value()
    path = settings.credentials_file()
    if not path.exists():
        return None
    parser = configparser.ConfigParser()
    try:
        parser.read_string(path.read_text())
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise CredentialsError(f"cannot read the credentials file {path}: {exc}") from exc
    key = parser.get(SECTION, "api_key", fallback="").strip()
    if not key:
        raise CredentialsError(f"the credentials file {path} has no api_key in [{SECTION}]: "
                               "run `epochlens login` again")
    _warn_if_readable_by_others(path)
    return key


def _warn_if_readable_by_others(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("credentials file %s is readable by other users (mode %o): chmod 600 it",
                    path, stat.S_IMODE(mode))


def write_api_key(path: Path, api_key: str) -> None:
    """Writes the credentials file with mode 0600 (its folder 0700 when created)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    parser = configparser.ConfigParser()
    parser[SECTION] = {"api_key": api_key}
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        parser.write(handle)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


def resolve_credentials(token: "str | Credentials | None", address: str,
                        settings: CredentialSettings | None = None,
                        tls: ClientTLS | None = None) -> "Credentials | None":
    """A given token (or credentials object) as is; else the API key, if one is configured,
    exchanged at `address` (over TLS when tls is given); else None (the calls go without a
    token)."""
    if token is not None and not isinstance(token, str):
        return token
    if token:
        return StaticToken(token)
    settings = settings if settings is not None else CredentialSettings()
    api_key = read_api_key(settings)
    if api_key is None:
        return None
    return ApiKeyCredentials(api_key, address, settings, tls)
