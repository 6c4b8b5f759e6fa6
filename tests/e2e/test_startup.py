"""Start-up failures of the real entry points, as an operator meets them: each is one line on
stderr with a non-zero exit status and no traceback. Configuration errors (exit 2) name the
environment variable; a busy port, an unmigrated store or a schema behind its head (exit 1)
name the service and what to do. Plus the migrate step's grants that let each PostgreSQL
role read the revision of every schema it uses."""

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from services.common.config import EXAMPLE_SECRETS
from services.common.health import wait_until_serving
from services.common.schema_check import script_heads
from services.common.startup import StartupError
from services.query.config import QuerySettings
from services.query.server import start as start_query
from tests.conftest import (
    JWT_SECRET,
    PAGE_SECRET,
    PG_ADMIN,
    PG_HOST,
    PG_PORT,
    READER_ROLE,
    migrated_database,
    pg_url,
)
from tests.e2e.test_stack import free_port

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 30


def bare_env(**values: str) -> dict[str, str]:
    """The environment without any EPOCHLENS_ variable, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPOCHLENS_")}
    return {**env, **values}


def one_line_failure(args: list[str], env: dict[str, str], cwd: Path,
                     exit_code: int) -> str:
    """Runs a command that must fail at start-up; returns its last stderr line after checking
    the exit status and that nothing looks like a traceback."""
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=START_TIMEOUT_S)
    assert done.returncode == exit_code, f"{args}: {done.returncode}\n{done.stderr}"
    assert "Traceback" not in done.stderr and done.stdout == "", done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("command", "names"), [
    (["epochlens-writer"], ["EPOCHLENS_AUTH_JWT_SECRET"]),
    (["epochlens-judge"], ["EPOCHLENS_AUTH_JWT_SECRET"]),
    (["epochlens-query"], ["EPOCHLENS_QUERY_PAGE_TOKEN_SECRET: field required",
                           "EPOCHLENS_AUTH_JWT_SECRET"]),
    (["epochlens", "up"], ["EPOCHLENS_QUERY_PAGE_TOKEN_SECRET: field required",
                           "EPOCHLENS_AUTH_JWT_SECRET"]),
    (["epochlens", "token", "--user", "someone"], ["EPOCHLENS_AUTH_JWT_SECRET"]),
])
def test_no_env_file_is_one_configuration_error_line(tmp_path, command, names):
    line = one_line_failure([str(BIN / command[0]), *command[1:]], bare_env(), tmp_path, 2)
    assert line.startswith("configuration error: ")
    for name in names:
        assert name in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing migrated or started


def test_migrate_with_an_invalid_setting_is_one_configuration_error_line(tmp_path):
    env = bare_env(EPOCHLENS_MIGRATE_DB_POOL_SIZE="zero")
    line = one_line_failure([str(BIN / "epochlens-migrate")], env, tmp_path, 2)
    assert line.startswith("configuration error: EPOCHLENS_MIGRATE_DB_POOL_SIZE: input should "
                           "be a valid integer")


def test_epochlens_up_refuses_the_public_example_secrets(tmp_path):
    # The state dir is a file: code that went on to start services would stop right there.
    (tmp_path / "state").write_text("")
    env = bare_env(**EXAMPLE_SECRETS, EPOCHLENS_SQLITE_DIR=str(tmp_path / "db"),
                   EPOCHLENS_STACK_STATE_DIR=str(tmp_path / "state"))
    line = one_line_failure([str(BIN / "epochlens"), "up"], env, tmp_path, 2)
    assert line.startswith("configuration error: EPOCHLENS_AUTH_JWT_SECRET: the public example "
                           "value of .env.example; EPOCHLENS_QUERY_PAGE_TOKEN_SECRET")
    assert "EPOCHLENS_STACK_ALLOW_EXAMPLE_SECRETS=true" in line
    assert not (tmp_path / "db").exists()


def test_writer_on_an_unmigrated_store_refuses_to_start(tmp_path):
    env = bare_env(EPOCHLENS_AUTH_JWT_SECRET=JWT_SECRET, EPOCHLENS_SQLITE_DIR=str(tmp_path),
                   EPOCHLENS_WRITER_PORT=str(free_port()))
    line = one_line_failure([str(BIN / "epochlens-writer")], env, tmp_path, 1)
    assert line == (f"writer: schema writer is not migrated (it has no revision), code needs "
                    f"{script_heads('writer')[0]}: run `epochlens-migrate`")


def test_a_second_writer_on_the_same_port_exits_with_one_line(tmp_path):
    port = free_port()
    env = bare_env(EPOCHLENS_AUTH_JWT_SECRET=EXAMPLE_SECRETS["EPOCHLENS_AUTH_JWT_SECRET"],
                   EPOCHLENS_SQLITE_DIR=str(tmp_path / "db"), EPOCHLENS_WRITER_PORT=str(port),
                   EPOCHLENS_WRITER_SHUTDOWN_GRACE_S="0")
    subprocess.run([str(BIN / "epochlens-migrate")], env=env, cwd=tmp_path, check=True,
                   capture_output=True, timeout=START_TIMEOUT_S)
    with (tmp_path / "first.log").open("wb") as log:
        first = subprocess.Popen([str(BIN / "epochlens-writer")], env=env, cwd=tmp_path,
                                 stdout=log, stderr=log)
    try:
        assert wait_until_serving(f"127.0.0.1:{port}", START_TIMEOUT_S, 0.1,
                                  lambda: first.poll() is None)
        line = one_line_failure([str(BIN / "epochlens-writer")], env, tmp_path, 1)
        assert line == f"writer: port {port} on 127.0.0.1 is already in use"
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(timeout=START_TIMEOUT_S)
    log_text = (tmp_path / "first.log").read_text()
    assert "WARNING services.common.server: EPOCHLENS_AUTH_JWT_SECRET is the public example " \
        "value" in log_text


@pytest.fixture
async def fresh_pg_database():
    """A new database migrated by the migrate step; dropped afterwards."""
    async with migrated_database("startup") as name:
        yield name


async def test_query_role_reads_both_revisions_and_refuses_a_schema_behind(fresh_pg_database,
                                                                         auth_settings):
    settings = QuerySettings(port=0, database_url=pg_url(READER_ROLE, fresh_pg_database),
                             page_token_secret=PAGE_SECRET, _env_file=None)
    running = await start_query(settings, auth_settings)  # the reader may read both versions
    await running.stop(0)
    admin = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_ADMIN,
                                  database=fresh_pg_database)
    try:
        await admin.execute("UPDATE writer.alembic_version SET version_num = '0001'")
    finally:
        await admin.close()
    with pytest.raises(StartupError) as refused:
        await start_query(settings, auth_settings)
    assert str(refused.value) == (f"schema writer is at revision 0001, code needs "
                                  f"{script_heads('writer')[0]}: run `epochlens-migrate`")
