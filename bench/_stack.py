"""Helpers shared by the benchmarks: a throwaway PostgreSQL database with the
epochlens schema, and the real writer/query services started on it as
subprocesses, exactly as an operator would run them.

bench_stack() creates database <db-prefix>_<pid>_<time>, runs the migrate step
(schema `writer`, RLS policies, login roles), starts the requested services
with their environment, waits until `epochlens health` reports SERVING, and on
exit stops them with SIGTERM and drops the database (unless --keep).
"""

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psutil

from services.common.auth import mint_token
from services.common.config import AuthSettings
from services.writer.config import MigrateSettings
from services.writer.migrate import migrate

REPO_ROOT = Path(__file__).resolve().parent.parent
ROLE_OPTIONS = {"writer": "writer_role", "query": "reader_role", "judge": "judge_role"}
ENV_PREFIXES = {"writer": "EPOCHLENS_WRITER_", "query": "EPOCHLENS_QUERY_",
                "judge": "EPOCHLENS_JUDGE_"}


def add_stack_args(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark shares: where PostgreSQL is and how services are run."""
    g = parser.add_argument_group("stack")
    g.add_argument("--pg-host", default="127.0.0.1", help="PostgreSQL host (default %(default)s)")
    g.add_argument("--pg-port", type=int, default=5432,
                   help="PostgreSQL port (default %(default)s)")
    g.add_argument("--pg-admin-user", default="postgres",
                   help="superuser that creates the database and seeds it (default %(default)s)")
    g.add_argument("--pg-maintenance-db", default="postgres",
                   help="database to connect to for CREATE/DROP DATABASE (default %(default)s)")
    g.add_argument("--db-prefix", default="epochlens_bench",
                   help="prefix of the throwaway database name (default %(default)s)")
    g.add_argument("--keep", action="store_true", help="keep the database at the end")
    add_service_args(parser)


def add_service_args(parser: argparse.ArgumentParser) -> None:
    """Options of the service subprocesses and of the credentials the bench uses."""
    g = parser.add_argument_group("services")
    g.add_argument("--writer-role", default="epochlens_writer",
                   help="login role of the writer service (default %(default)s)")
    g.add_argument("--reader-role", default="epochlens_reader",
                   help="login role of the query service (default %(default)s)")
    g.add_argument("--judge-role", default="epochlens_judge",
                   help="login role of the judge service (default %(default)s)")
    g.add_argument("--jwt-secret", default="bench-only-hs256-secret-0123456789abcdef",
                   help="HS256 secret of the services and the bench (default: a bench value)")
    g.add_argument("--page-token-secret", default="bench-only-page-token-secret",
                   help="page token key of the query service (default: a bench value)")
    g.add_argument("--bench-user", default="bench-user",
                   help="user id (token sub) the bench acts as (default %(default)s)")
    g.add_argument("--service-host", default="127.0.0.1",
                   help="interface the services bind to (default %(default)s)")
    g.add_argument("--service-log-level", default="WARNING",
                   help="log level of the services (default %(default)s)")
    g.add_argument("--log-dir", type=Path, default=REPO_ROOT / "bench" / "results",
                   help="folder of the service logs (default bench/results)")
    g.add_argument("--health-timeout-s", type=float, default=60.0,
                   help="wait for a service to report SERVING (default %(default)s)")
    g.add_argument("--health-poll-s", type=float, default=0.2,
                   help="pause between health checks (default %(default)s)")
    g.add_argument("--stop-timeout-s", type=float, default=20.0,
                   help="wait for a service to exit after SIGTERM (default %(default)s)")


def rollup_statements(schema: str, widths: Sequence[int]) -> list[str]:
    """SQL that builds the metric rollups the writer keeps (schema.metric_rollups) from the
    metrics a benchmark loaded by COPY: aggregates per width, then each bucket's last point
    (the same statements as writer migration 0005's backfill)."""
    metrics, rollups = f"{schema}.metrics", f"{schema}.metric_rollups"
    statements = [
        f"INSERT INTO {rollups} (run_id, name, width, bucket, user_id, count, min_value, "
        f"max_value, last_step, last_value, last_epoch, last_wall_time) "
        f"SELECT run_id, name, {width}, step / {width}, min(user_id), count(*), min(value), "
        f"max(value), max(step), 0, NULL, min(wall_time) FROM {metrics} "
        f"GROUP BY run_id, name, step / {width}" for width in widths]
    last = (f"FROM {metrics} m WHERE m.run_id = {rollups}.run_id AND m.name = {rollups}.name "
            f"AND m.step = {rollups}.last_step")
    statements.append(f"UPDATE {rollups} SET last_value = (SELECT m.value {last}), "
                      f"last_epoch = (SELECT m.epoch {last}), "
                      f"last_wall_time = (SELECT m.wall_time {last})")
    return statements


def free_port(host: str) -> int:
    """A port that was free a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def dsn(args: argparse.Namespace, user: str, dbname: str, driver: str = "postgresql") -> str:
    return f"{driver}://{user}@{args.pg_host}:{args.pg_port}/{dbname}"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size of a live process (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


@dataclass
class Service:
    """A service subprocess: its address, its process and its log file."""

    kind: str
    address: str
    popen: subprocess.Popen
    log_path: Path
    process: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.process = psutil.Process(self.popen.pid)

    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.popen.pid)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Stack:
    """What a benchmark gets: the database, the running services, and credentials."""

    args: argparse.Namespace
    dbname: str
    services: dict[str, Service]

    @property
    def admin_dsn(self) -> str:
        return dsn(self.args, self.args.pg_admin_user, self.dbname)

    @property
    def admin_url(self) -> str:
        return dsn(self.args, self.args.pg_admin_user, self.dbname, "postgresql+asyncpg")

    def metadata(self, user: str | None = None) -> tuple[tuple[str, str], ...]:
        """gRPC metadata carrying a fresh bearer token for `user` (default: the bench user)."""
        settings = AuthSettings(jwt_algorithm="HS256", jwt_secret=self.args.jwt_secret)
        token = mint_token(settings, user or self.args.bench_user)
        return (("authorization", f"Bearer {token}"),)


async def _admin_execute(args: argparse.Namespace, statement: str) -> None:
    conn = await asyncpg.connect(dsn(args, args.pg_admin_user, args.pg_maintenance_db))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def create_database(args: argparse.Namespace) -> str:
    name = f"{args.db_prefix}_{os.getpid()}_{int(time.time())}"
    await _admin_execute(args, f'CREATE DATABASE "{name}"')
    return name


async def drop_database(args: argparse.Namespace, name: str) -> None:
    await _admin_execute(args, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def migrate_database(args: argparse.Namespace, dbname: str) -> None:
    """The real migrate step: schema, tables, RLS policies and the two login roles."""
    await migrate(MigrateSettings(
        database_url=dsn(args, args.pg_admin_user, dbname, "postgresql+asyncpg"),
        writer_role=args.writer_role, reader_role=args.reader_role, judge_role=args.judge_role))


def service_env(args: argparse.Namespace, kind: str, dbname: str, port: int) -> dict[str, str]:
    """The environment a service is configured by (see .env.example)."""
    prefix = ENV_PREFIXES[kind]
    role = getattr(args, ROLE_OPTIONS[kind])
    env = dict(os.environ)
    env.update({
        "EPOCHLENS_AUTH_JWT_ALGORITHM": "HS256",
        "EPOCHLENS_AUTH_JWT_SECRET": args.jwt_secret,
        f"{prefix}HOST": args.service_host,
        f"{prefix}PORT": str(port),
        f"{prefix}DATABASE_URL": dsn(args, role, dbname, "postgresql+asyncpg"),
        f"{prefix}LOG_LEVEL": args.service_log_level,
    })
    if kind == "query":
        env["EPOCHLENS_QUERY_PAGE_TOKEN_SECRET"] = args.page_token_secret
    return env


def start_service(args: argparse.Namespace, kind: str, dbname: str,
                  extra_env: dict[str, str] | None = None) -> Service:
    """Starts `python -m services.<kind>.server` on a free loopback port; extra_env is added
    to its environment (for example the writer's EPOCHLENS_WRITER_JUDGE_ADDRESS)."""
    port = free_port(args.service_host)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.log_dir / f"{dbname}_{kind}_{port}.log"
    with log_path.open("wb") as log_file:
        popen = subprocess.Popen(
            [sys.executable, "-m", f"services.{kind}.server"], cwd=REPO_ROOT,
            env={**service_env(args, kind, dbname, port), **(extra_env or {})}, stdout=log_file,
            stderr=subprocess.STDOUT)
    return Service(kind, f"{args.service_host}:{port}", popen, log_path)


async def wait_healthy(args: argparse.Namespace, service: Service) -> None:
    """Polls `python -m services.cli.main health` until it exits 0."""
    deadline = time.monotonic() + args.health_timeout_s
    command = [sys.executable, "-m", "services.cli.main", "health", "--address", service.address]
    while True:
        check = await asyncio.create_subprocess_exec(
            *command, cwd=REPO_ROOT, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        if await check.wait() == 0:
            return
        if service.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{service.kind} at {service.address} did not become healthy "
                               f"(exit {service.popen.poll()}); log:\n{service.log_tail()}")
        await asyncio.sleep(args.health_poll_s)


def stop_service(args: argparse.Namespace, service: Service) -> int:
    """SIGTERM, then wait (kill after --stop-timeout-s). Returns the exit status."""
    if service.popen.poll() is None:
        service.popen.send_signal(signal.SIGTERM)
        try:
            return service.popen.wait(timeout=args.stop_timeout_s)
        except subprocess.TimeoutExpired:
            service.popen.kill()
    return service.popen.wait()


@contextlib.asynccontextmanager
async def bench_stack(args: argparse.Namespace, kinds: Sequence[str]) -> AsyncIterator[Stack]:
    """A migrated throwaway database with the given services ("writer", "query", "judge")
    running."""
    dbname = await create_database(args)
    services: dict[str, Service] = {}
    try:
        await migrate_database(args, dbname)
        for kind in kinds:
            services[kind] = start_service(args, kind, dbname)
        for service in services.values():
            await wait_healthy(args, service)
        yield Stack(args, dbname, services)
    finally:
        for service in services.values():
            stop_service(args, service)
        if args.keep:
            print(f"kept database {dbname}")
        else:
            await drop_database(args, dbname)
