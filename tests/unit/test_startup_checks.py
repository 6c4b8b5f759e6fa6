"""Start-up checks, in process: a busy port is refused, configuration errors name their
environment variables, one folder setting for the embedded store, schemas at their migration
head, and the public example secrets."""

import importlib.util
import socket
import sqlite3
from pathlib import Path

import pytest
import yaml
from pydantic_settings import BaseSettings

from services.cli.stack import StackSettings, refuse_example_secrets
from services.common.config import EXAMPLE_SECRETS, AuthSettings
from services.common.schema_check import script_heads
from services.common.server import PortInUse, create_server, port_in_use
from services.common.startup import (
    ConfigurationError,
    StartupError,
    example_secrets_in_use,
    load_settings,
)
from services.judge.config import JudgeSettings
from services.judge.server import start as start_judge
from services.query.config import QuerySettings
from services.query.server import start as start_query
from services.writer.config import MigrateSettings, WriterSettings
from services.writer.migrate import migrate
from services.writer.server import start as start_writer
from tests.conftest import JWT_SECRET, PAGE_SECRET

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No EPOCHLENS_ variable in the environment and a working directory without .env."""
    for name in [n for n in __import__("os").environ if n.startswith("EPOCHLENS_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def auth() -> AuthSettings:
    return AuthSettings(jwt_secret=JWT_SECRET, _env_file=None)


# ---- the port ----

async def test_a_second_server_on_a_busy_port_is_refused_with_a_clear_error():
    settings = WriterSettings(port=0, _env_file=None)
    first = await create_server(settings, auth(), lambda server: None, [])
    released = []

    async def on_failure() -> None:
        released.append(True)

    try:
        busy = WriterSettings(port=first.port, _env_file=None)
        with pytest.raises(PortInUse) as refused:
            await create_server(busy, auth(), lambda server: None, [], on_failure=on_failure)
    finally:
        await first.stop(0)
    assert str(refused.value) == f"port {first.port} on 127.0.0.1 is already in use"
    assert released == [True]


def test_port_probe_sees_a_listener_and_ignores_port_zero():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", 0)


# ---- configuration errors ----

def test_missing_secrets_are_one_configuration_error_naming_the_variables(clean_env):
    with pytest.raises(ConfigurationError) as error:
        load_settings(QuerySettings, AuthSettings)
    assert str(error.value) == (
        "configuration error: EPOCHLENS_QUERY_PAGE_TOKEN_SECRET: field required; "
        "EPOCHLENS_AUTH_JWT_SECRET is required when jwt_algorithm is HS256")
    assert error.value.exit_code == 2


def test_invalid_values_name_their_variable_never_the_value(clean_env):
    clean_env.setenv("EPOCHLENS_WRITER_PORT", "not-a-port-secret")
    clean_env.setenv("EPOCHLENS_JUDGE_RULE_THRESHOLDS", "{broken")
    with pytest.raises(ConfigurationError) as error:
        load_settings(WriterSettings, JudgeSettings)
    message = str(error.value)
    assert message.startswith("configuration error: EPOCHLENS_WRITER_PORT: input should be "
                              "a valid integer")
    assert "EPOCHLENS_JUDGE_RULE_THRESHOLDS: not a valid JSON value" in message
    assert "not-a-port-secret" not in message and "\n" not in message


# ---- one folder for the embedded store ----

def test_one_sqlite_dir_setting_for_every_service(clean_env, tmp_path):
    clean_env.setenv("EPOCHLENS_SQLITE_DIR", str(tmp_path / "store"))
    clean_env.setenv("EPOCHLENS_AUTH_JWT_SECRET", JWT_SECRET)
    clean_env.setenv("EPOCHLENS_QUERY_PAGE_TOKEN_SECRET", PAGE_SECRET)
    loaded = load_settings(MigrateSettings, WriterSettings, QuerySettings, JudgeSettings)
    assert {settings.sqlite_dir for settings in loaded} == {tmp_path / "store"}


@pytest.mark.parametrize("where", ["environment", ".env"])
def test_a_retired_per_service_sqlite_dir_is_a_configuration_error(clean_env, tmp_path, where):
    if where == "environment":
        clean_env.setenv("EPOCHLENS_WRITER_SQLITE_DIR", "elsewhere")
    else:
        (tmp_path / ".env").write_text("EPOCHLENS_QUERY_SQLITE_DIR=elsewhere\n")
    with pytest.raises(ConfigurationError, match=r"_SQLITE_DIR is no longer read: set "
                       r"EPOCHLENS_SQLITE_DIR instead"):
        load_settings(MigrateSettings)
    clean_env.setenv("EPOCHLENS_SQLITE_DIR", "elsewhere")  # the same folder: nothing to say
    assert load_settings(MigrateSettings)[0].sqlite_dir == Path("elsewhere")


# ---- schemas at their migration head ----

def store(path: Path) -> dict:
    return {"port": 0, "sqlite_dir": path, "shutdown_grace_s": 0, "_env_file": None}


async def start_each(path: Path) -> None:
    """Starts and stops writer, query and judge on the store at `path`."""
    for running in (await start_writer(WriterSettings(**store(path)), auth()),
                    await start_query(QuerySettings(page_token_secret=PAGE_SECRET,
                                                    **store(path)), auth()),
                    await start_judge(JudgeSettings(worker_count=0, **store(path)), auth())):
        await running.stop(0)


@pytest.fixture
async def migrated(tmp_path) -> Path:
    await migrate(MigrateSettings(sqlite_dir=tmp_path, _env_file=None))
    await start_each(tmp_path)
    return tmp_path


def set_revision(path: Path, schema: str, revision: str) -> None:
    with sqlite3.connect(path / f"{schema}.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (revision,))


async def test_services_refuse_an_unmigrated_store(tmp_path):
    writer_head = script_heads("writer")[0]
    with pytest.raises(StartupError) as writer:
        await start_writer(WriterSettings(**store(tmp_path)), auth())
    assert str(writer.value) == (f"schema writer is not migrated (it has no revision), code "
                                 f"needs {writer_head}: run `epochlens-migrate`")
    with pytest.raises(StartupError, match="schema judge is not migrated"):
        await start_judge(JudgeSettings(**store(tmp_path)), auth())
    with pytest.raises(StartupError, match="schema writer is not migrated"):
        await start_query(QuerySettings(page_token_secret=PAGE_SECRET, **store(tmp_path)),
                          auth())


async def test_a_schema_behind_its_head_is_refused_naming_the_command(migrated):
    set_revision(migrated, "writer", "0001")
    head = script_heads("writer")[0]
    expected = f"schema writer is at revision 0001, code needs {head}: run `epochlens-migrate`"
    with pytest.raises(StartupError) as writer:
        await start_writer(WriterSettings(**store(migrated)), auth())
    assert str(writer.value) == expected
    with pytest.raises(StartupError) as query:
        await start_query(QuerySettings(page_token_secret=PAGE_SECRET, **store(migrated)),
                          auth())
    assert str(query.value) == expected


async def test_query_checks_the_judge_schema_too_and_unknown_revisions_are_named(migrated):
    set_revision(migrated, "judge", "9999")
    for start, settings in ((start_query, QuerySettings(page_token_secret=PAGE_SECRET,
                                                        **store(migrated))),
                            (start_judge, JudgeSettings(**store(migrated)))):
        with pytest.raises(StartupError, match=r"schema judge is at revision 9999, which this "
                           r"code does not know \(code needs \w+\)"):
            await start(settings, auth())


# ---- the public example secrets ----

def test_example_secrets_match_env_example_and_are_not_compose_defaults():
    example = (ROOT / ".env.example").read_text()
    for name, value in EXAMPLE_SECRETS.items():
        assert f"\n{name}={value}\n" in example
        assert value not in (ROOT / "docker-compose.yml").read_text()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert ":?" in compose["x-auth"]["EPOCHLENS_AUTH_JWT_SECRET"]


def test_epochlens_up_refuses_example_secrets_unless_allowed():
    loaded: tuple[BaseSettings, ...] = (
        AuthSettings(jwt_secret=EXAMPLE_SECRETS["EPOCHLENS_AUTH_JWT_SECRET"], _env_file=None),
        QuerySettings(page_token_secret=EXAMPLE_SECRETS["EPOCHLENS_QUERY_PAGE_TOKEN_SECRET"],
                      _env_file=None))
    assert example_secrets_in_use(loaded) == list(EXAMPLE_SECRETS)
    with pytest.raises(ConfigurationError, match="EPOCHLENS_AUTH_JWT_SECRET: the public "
                       "example value of .env.example; EPOCHLENS_QUERY_PAGE_TOKEN_SECRET"):
        refuse_example_secrets(StackSettings(_env_file=None), loaded)
    refuse_example_secrets(StackSettings(allow_example_secrets=True, _env_file=None), loaded)
    assert example_secrets_in_use((auth(),)) == []


def make_env_script():
    spec = importlib.util.spec_from_file_location("make_env", ROOT / "scripts" / "make_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_env_writes_fresh_secrets_and_keeps_everything_else(tmp_path):
    script = make_env_script()
    assert set(script.SECRET_SETTINGS) == set(EXAMPLE_SECRETS)
    target = tmp_path / ".env"
    assert script.main([str(ROOT / ".env.example"), str(target)]) == 0
    example = (ROOT / ".env.example").read_text().splitlines()
    written = target.read_text().splitlines()
    changed = [(a, b) for a, b in zip(example, written, strict=True) if a != b]
    assert sorted(line.split("=")[0] for line, _ in changed) == sorted(EXAMPLE_SECRETS)
    for _, line in changed:
        assert len(line.split("=", 1)[1]) >= 64 and line.split("=", 1)[1] not in \
            EXAMPLE_SECRETS.values()
    assert target.stat().st_mode & 0o077 == 0
    assert script.main([str(ROOT / ".env.example"), str(target)]) == 1  # never overwrites
