"""Service replicas as real processes on one PostgreSQL database, for the replica test and
bench/replicas.py: start any number of writers, judges and queries (`python -m
services.<kind>.server` on free loopback ports, configured by environment only), wait until
they serve, kill or stop them; plus the ipv4: target that names several replicas."""

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from services.common.health import wait_until_serving

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = {"writer": "EPOCHLENS_WRITER_", "judge": "EPOCHLENS_JUDGE_",
            "query": "EPOCHLENS_QUERY_"}
HEALTH_TIMEOUT_S = 60.0
HEALTH_POLL_S = 0.1
STOP_TIMEOUT_S = 10.0
POSTGRES_PORT_DEFAULT = 5432


@dataclass
class Replica:
    """One service process: kind, its address, the process and its log file."""

    kind: str
    address: str
    popen: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> int:
        """kill -9; returns the exit status (-9)."""
        self.popen.send_signal(signal.SIGKILL)
        return self.popen.wait()

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; the exit status."""
        self.terminate()
        if self.popen.returncode is None:
            try:
                return self.popen.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()

    def terminate(self) -> None:
        """SIGTERM without waiting (stop_all stops many at once)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def database_ports(self, pg_port: int = POSTGRES_PORT_DEFAULT) -> set[int]:
        """Local ports of this process's connections to PostgreSQL (pg_stat_activity's
        client_port of its backends)."""
        return {c.laddr.port for c in psutil.Process(self.popen.pid).net_connections("tcp")
                if c.raddr and c.raddr.port == pg_port}


def stop_all(replicas: Sequence[Replica]) -> None:
    """SIGTERM to every replica at once, then waits for each."""
    for replica in replicas:
        replica.terminate()
    for replica in replicas:
        replica.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def target(replicas: Sequence[Replica]) -> str:
    """The gRPC target naming every replica: ipv4:host:port,host:port,..."""
    return "ipv4:" + ",".join(replica.address for replica in replicas)


def base_env(jwt_secret: str) -> dict[str, str]:
    """This environment without any EPOCHLENS_ variable, plus the signing secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPOCHLENS_")}
    return {**env, "EPOCHLENS_AUTH_JWT_SECRET": jwt_secret}


def start_replica(kind: str, database_url: str, env: dict[str, str], settings: dict[str, str],
                  log_dir: Path) -> Replica:
    """Starts one `kind` process; settings are its own (names without the prefix)."""
    prefix, port = PREFIXES[kind], free_port()
    own = {"HOST": "127.0.0.1", "PORT": str(port), "DATABASE_URL": database_url, **settings}
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{kind}-{port}.log"
    with log_path.open("wb") as log_file:
        popen = subprocess.Popen(
            [sys.executable, "-m", f"services.{kind}.server"], cwd=ROOT,
            env={**env, **{prefix + name: value for name, value in own.items()}},
            stdout=log_file, stderr=subprocess.STDOUT)
    return Replica(kind, f"127.0.0.1:{port}", popen, log_path)


def wait_serving(replicas: Sequence[Replica]) -> None:
    """Waits until every replica reports SERVING; a process that exits or stays silent is an
    AssertionError with its log."""
    for replica in replicas:
        if not wait_until_serving(replica.address, HEALTH_TIMEOUT_S, HEALTH_POLL_S,
                                  lambda r=replica: r.popen.poll() is None):
            raise AssertionError(f"{replica.kind} at {replica.address} did not serve "
                                 f"(exit {replica.popen.poll()}):\n{replica.log_tail()}")
