"""Start-up failures of every entry point (services, migrate step, command line) as one line.

A StartupError is printed alone on stderr, no traceback, and the process exits with its
exit_code:

* EXIT_CONFIGURATION (2): a configuration error. A setting is missing or invalid, or a
  retired setting is still set; the line names the environment variable:
  `configuration error: EPOCHLENS_QUERY_PAGE_TOKEN_SECRET: field required`.
* EXIT_STARTUP (1): the configuration is valid but the process cannot start: its port is in
  use, its schemas are not at the migration head, the database refused the check.

load_settings() builds settings classes and turns what pydantic reports into a
ConfigurationError that names environment variables (never values: some are secrets).
"""

import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from dotenv import dotenv_values
from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsError

from services.common.config import (
    ENV_FILE,
    EXAMPLE_SECRETS,
    SQLITE_DIR_ENV,
    DatabaseSettings,
)

EXIT_STARTUP = 1
EXIT_CONFIGURATION = 2

# Settings that were replaced: a value left in the environment or .env would be ignored
# silently, so it is a configuration error that names the replacement.
RETIRED_SETTINGS = {f"EPOCHLENS_{service}_SQLITE_DIR": SQLITE_DIR_ENV
                    for service in ("WRITER", "QUERY", "JUDGE", "MIGRATE")}


class StartupError(RuntimeError):
    """The process cannot start; the message is one line saying why and what to do."""

    exit_code = EXIT_STARTUP


class ConfigurationError(StartupError):
    """Settings are missing or invalid; the message names the environment variables."""

    exit_code = EXIT_CONFIGURATION

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("configuration error: " + "; ".join(problems))
        self.problems = list(problems)


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The environment variable of `field` (a field name or its alias) of settings `cls`."""
    aliases = {info.validation_alias for info in cls.model_fields.values()
               if isinstance(info.validation_alias, str)}
    if field in aliases:
        return field
    info = cls.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, str):
        return info.validation_alias
    return f"{cls.model_config.get('env_prefix') or ''}{field}".upper()


def describe(cls: type[BaseSettings] | None, exc: ValidationError | SettingsError) -> list[str]:
    """What is wrong, one entry per problem, each naming its environment variable."""
    if isinstance(exc, SettingsError):
        found = re.search(r'field "([^"]+)"', str(exc))
        if cls is None or found is None:
            return [str(exc)]
        return [f"{env_name(cls, found.group(1))}: not a valid JSON value"]
    problems = []
    for error in exc.errors():
        message = _plain(error["msg"])
        if not error["loc"] or cls is None:
            problems.append(message)
            continue
        first, *rest = (str(part) for part in error["loc"])
        where = env_name(cls, first) + (f"[{'.'.join(rest)}]" if rest else "")
        problems.append(f"{where}: {message}")
    return problems


def _plain(message: str) -> str:
    """pydantic's message without its "Value error, " prefix, starting lower case unless
    it starts with a name ("Field required" -> "field required")."""
    message = message.removeprefix("Value error, ")
    return message[:1].lower() + message[1:] if message[1:2].islower() else message


def load_settings(*classes: type[BaseSettings]) -> list[Any]:
    """One instance of each class, from the environment and .env; every problem found in any
    of them (and any retired setting still set) is one ConfigurationError."""
    problems = retired_settings_in_use()
    loaded = []
    for cls in classes:
        try:
            loaded.append(cls())
        except (ValidationError, SettingsError) as exc:
            problems += describe(cls, exc)
    if problems:
        raise ConfigurationError(problems)
    return loaded


def retired_settings_in_use(env_file: Path = Path(ENV_FILE)) -> list[str]:
    """A problem for each retired setting set (in the environment or in env_file) to another
    value than its replacement has; one with the same value changes nothing."""
    values = {**(dotenv_values(env_file) if env_file.is_file() else {}), **os.environ}
    default = DatabaseSettings.model_fields["sqlite_dir"].default
    problems = []
    for old, new in RETIRED_SETTINGS.items():
        current = Path(values.get(new) or default)
        if values.get(old) is not None and Path(values[old]) != current:
            problems.append(f"{old} is no longer read: set {new} instead (one folder for "
                            f"every service; it is {current})")
    return problems


def settings_class_named(title: str) -> type[BaseSettings] | None:
    """The settings class called `title` (what a ValidationError reports), if it is one."""
    pending, found = list(BaseSettings.__subclasses__()), []
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.__name__ == title:
            found.append(cls)
    return found[0] if len(set(found)) == 1 else None


def as_configuration_error(exc: Exception) -> ConfigurationError | None:
    """A ConfigurationError for a settings class's ValidationError or SettingsError; None for
    any other exception (a ValidationError of a non-settings model stays what it is)."""
    if isinstance(exc, ConfigurationError):
        return exc
    if isinstance(exc, SettingsError):
        return ConfigurationError(describe(None, exc))
    if isinstance(exc, ValidationError):
        cls = settings_class_named(exc.title)
        return ConfigurationError(describe(cls, exc)) if cls is not None else None
    return None


def example_secrets_in_use(settings: Iterable[BaseSettings]) -> list[str]:
    """The environment variables among `settings` whose value is the one .env.example
    publishes (services.common.config.EXAMPLE_SECRETS)."""
    found = []
    for instance in settings:
        cls = type(instance)
        for field in cls.model_fields:
            name = env_name(cls, field)
            value = getattr(instance, field)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if name in EXAMPLE_SECRETS and value == EXAMPLE_SECRETS[name] and name not in found:
                found.append(name)
    return found


def exit_with(exc: StartupError, label: str | None = None) -> NoReturn:
    """Prints the error as one line on stderr (prefixed with `label`, except configuration
    errors, which name their settings) and exits with its exit code."""
    line = str(exc) if label is None or isinstance(exc, ConfigurationError) else f"{label}: {exc}"
    print(" ".join(line.split()), file=sys.stderr, flush=True)
    raise SystemExit(exc.exit_code)
