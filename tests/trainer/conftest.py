"""Fixtures of the trainer-client tests: a real writer service in a subprocess
(so a test can kill and restart it), a bearer token for it, and the tiny model's
tokenizer."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest

from epochlens.v1 import query_pb2, query_pb2_grpc
from services.common.auth import mint_token
from services.common.config import AuthSettings
from services.common.health import wait_until_serving
from tests.trainer.tiny import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
JWT_SECRET = "trainer-tests-secret-at-least-32-characters"
START_TIMEOUT_S = 30.0
HEALTH_POLL_S = 0.1
QUERY_PAGE_SECRET = "trainer-tests-page-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WriterProcess:
    """The writer service on embedded SQLite, as a subprocess on a fixed port."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.env = {**os.environ, "EPOCHLENS_AUTH_JWT_SECRET": JWT_SECRET,
                    "EPOCHLENS_WRITER_PORT": str(self.port),
                    "EPOCHLENS_SQLITE_DIR": str(data_dir),
                    "EPOCHLENS_WRITER_SHUTDOWN_GRACE_S": "0.5"}
        subprocess.run([sys.executable, "-m", "services.writer.migrate"], cwd=ROOT, env=self.env,
                       check=True, capture_output=True)

    def start(self) -> None:
        log = open(self.data_dir / "writer.log", "ab")  # noqa: SIM115 (owned by the process)
        self.process = subprocess.Popen([sys.executable, "-m", "services.writer.server"],
                                        cwd=ROOT, env=self.env, stdout=log, stderr=log)
        log.close()
        self._wait_serving()

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, in-flight streams break."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def _wait_serving(self) -> None:
        alive = lambda: self.process is not None and self.process.poll() is None  # noqa: E731
        if not wait_until_serving(self.address, START_TIMEOUT_S, HEALTH_POLL_S, alive):
            raise AssertionError(f"writer did not start on {self.address}:\n"
                                 + (self.data_dir / "writer.log").read_text())

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.data_dir / "writer.db")

    def predictions(self, run_id: str) -> list[tuple[int, int, int, str]]:
        """(epoch, step, sample_index, prediction) of one run, from the database."""
        with self._db() as db:
            rows = db.execute("SELECT run_id, epoch, step, sample_index, prediction "
                              "FROM predictions").fetchall()
        wanted = uuid.UUID(run_id)
        return sorted(r[1:] for r in rows if uuid.UUID(str(r[0])) == wanted)

    def samples(self, run_id: str) -> list[tuple[int, str, str | None]]:
        """(sample_index, prompt, ground_truth) of one run's stored samples."""
        with self._db() as db:
            rows = db.execute("SELECT run_id, sample_index, prompt, ground_truth "
                              "FROM samples").fetchall()
        wanted = uuid.UUID(run_id)
        return sorted(r[1:] for r in rows if uuid.UUID(str(r[0])) == wanted)

    def run_config(self, run_id: str) -> dict:
        """The stored config of one run."""
        with self._db() as db:
            rows = db.execute("SELECT id, config FROM runs").fetchall()
        wanted = uuid.UUID(run_id)
        (config,) = [json.loads(c) for i, c in rows if uuid.UUID(str(i)) == wanted]
        return config

    def runs(self, name: str) -> list[tuple[str, int]]:
        """(id, state) of every run with this name."""
        with self._db() as db:
            rows = db.execute("SELECT id, state FROM runs WHERE name = ?", (name,)).fetchall()
        return [(str(uuid.UUID(str(r[0]))), r[1]) for r in rows]


@pytest.fixture(scope="session")
def token() -> str:
    return mint_token(AuthSettings(jwt_secret=JWT_SECRET, _env_file=None), "trainer-tests")


@pytest.fixture(scope="session")
def writer(tmp_path_factory):
    """One writer for the tests that do not stop it."""
    process = WriterProcess(tmp_path_factory.mktemp("writer"))
    process.start()
    yield process
    process.kill()


@pytest.fixture
def own_writer(tmp_path):
    """A writer of this test alone (started by the test, killed at the end)."""
    data = tmp_path / "writer"
    data.mkdir()
    process = WriterProcess(data)
    yield process
    process.kill()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


class QueryProcess:
    """The query service on the writer's SQLite files, as a subprocess."""

    def __init__(self, data_dir: Path) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        env = {**os.environ, "EPOCHLENS_AUTH_JWT_SECRET": JWT_SECRET,
               "EPOCHLENS_QUERY_PORT": self.address.rsplit(":", 1)[1],
               "EPOCHLENS_SQLITE_DIR": str(data_dir),
               "EPOCHLENS_QUERY_PAGE_TOKEN_SECRET": QUERY_PAGE_SECRET,
               "EPOCHLENS_QUERY_SHUTDOWN_GRACE_S": "0.5"}
        env.pop("EPOCHLENS_QUERY_DATABASE_URL", None)
        log = open(data_dir / "query.log", "ab")  # noqa: SIM115 (owned by the process)
        self.process = subprocess.Popen([sys.executable, "-m", "services.query.server"],
                                        cwd=ROOT, env=env, stdout=log, stderr=log)
        log.close()
        alive = lambda: self.process.poll() is None  # noqa: E731
        if not wait_until_serving(self.address, START_TIMEOUT_S, 0.1, alive):
            self.kill()
            raise AssertionError("query did not start:\n" + (data_dir / "query.log").read_text())

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def run_and_predictions(self, token: str, run_id: str) -> tuple:
        metadata = (("authorization", f"Bearer {token}"),)
        with grpc.insecure_channel(self.address) as channel:
            stub = query_pb2_grpc.QueryServiceStub(channel)
            run = stub.GetRun(query_pb2.GetRunRequest(run_id=run_id), metadata=metadata)
            reply = stub.ListPredictions(query_pb2.ListPredictionsRequest(
                run_id=run_id, page_size=100), metadata=metadata)
        assert not reply.next_page_token
        return run, list(reply.predictions)
