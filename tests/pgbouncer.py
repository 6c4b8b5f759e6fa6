"""A private PgBouncer (Debian package `pgbouncer`, `make pgbouncer`) in transaction pooling
mode in front of the test PostgreSQL: its own ini and user list in a temporary folder, a
free loopback port, trust authentication for the test roles. Run as root (CI), it drops to
the `postgres` user (PgBouncer refuses to run as root)."""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import JUDGE_ROLE, PG_ADMIN, PG_HOST, PG_PORT, READER_ROLE, WRITER_ROLE

PGBOUNCER_BINARIES = ("pgbouncer", "/usr/sbin/pgbouncer")
RUN_AS_WHEN_ROOT = "postgres"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05


def pgbouncer_binary() -> str:
    found = next((path for name in PGBOUNCER_BINARIES if (path := shutil.which(name))), None)
    assert found, "pgbouncer is not installed: run `make pgbouncer` (Debian package pgbouncer)"
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pgbouncer_ini(folder: Path, port: int, pool_size: int) -> str:
    """Transaction pooling; after each transaction the server connection forgets the
    statements prepared in it (DEALLOCATE ALL), so uniquely named ones do not pile up."""
    return "\n".join([
        "[databases]", f"* = host={PG_HOST} port={PG_PORT}", "",
        "[pgbouncer]", "listen_addr = 127.0.0.1", f"listen_port = {port}",
        "unix_socket_dir =", "auth_type = trust", f"auth_file = {folder / 'users.txt'}",
        "pool_mode = transaction", f"default_pool_size = {pool_size}",
        "max_client_conn = 1000", "server_reset_query = DEALLOCATE ALL",
        "server_reset_query_always = 1", "ignore_startup_parameters = extra_float_digits", ""])


def _wait_listening(popen: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise AssertionError(f"pgbouncer exited {popen.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=POLL_S).close()
            return
        except OSError:
            time.sleep(POLL_S)
    raise AssertionError(f"pgbouncer did not listen on {port}:\n{log.read_text()}")


@contextmanager
def running_pgbouncer(pool_size: int = 20) -> Iterator[int]:
    """A PgBouncer listening on 127.0.0.1:<port> (yielded) until the block ends."""
    binary = pgbouncer_binary()
    folder = Path(tempfile.mkdtemp(prefix="epochlens-pgbouncer-"))
    folder.chmod(0o755)  # readable by the user it drops to
    port = free_port()
    roles = (PG_ADMIN, WRITER_ROLE, READER_ROLE, JUDGE_ROLE)
    (folder / "users.txt").write_text("".join(f'"{role}" ""\n' for role in roles))
    (folder / "pgbouncer.ini").write_text(pgbouncer_ini(folder, port, pool_size))
    for path in folder.iterdir():
        path.chmod(0o644)
    user = ["-u", RUN_AS_WHEN_ROOT] if os.geteuid() == 0 else []
    log = folder / "stderr.log"
    with log.open("wb") as out:
        popen = subprocess.Popen([binary, *user, str(folder / "pgbouncer.ini")], stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        _wait_listening(popen, port, log)
        yield port
    finally:
        popen.terminate()
        try:
            popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
        shutil.rmtree(folder, ignore_errors=True)


def pgbouncer_url(role: str, database: str, port: int) -> str:
    return f"postgresql+asyncpg://{role}@127.0.0.1:{port}/{database}"
