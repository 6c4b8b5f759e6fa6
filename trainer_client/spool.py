"""The durable spool: one SQLite file per training run, holding what the writer has not acked.

Every batch is written here before it is sent and deleted when the writer acks
it, so a crash of the training process or a writer that never comes back loses
nothing: ``epochlens-sync`` uploads what is left. The file also holds the run's
creation request with its idempotency key (request_id), so a run that could not
be created at train begin is created exactly once later, and the finish state
to send once everything is uploaded.

The row id of a batch (AUTOINCREMENT: never reused, always increasing) is its
stream sequence number. A batch holds predictions (a serialized WritePredictionsRequest) or
training metrics (a serialized WriteMetricsRequest), as its ``kind`` says; both go up the
same stream in sequence order. Spool files written before metrics existed get the column
(every batch of theirs holds predictions) when opened. A batch the writer rejects moves to
the ``rejected`` table, where it stays for inspection; a spool file with rejected batches is
kept.

One process owns a spool at a time (an exclusive lock on ``<file>.lock``).
"""

import fcntl
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SPOOL_SUFFIX = ".spool.sqlite"
PREDICTIONS = "predictions"
METRICS = "metrics"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS run (id INTEGER PRIMARY KEY CHECK (id = 1), "
    "request_id TEXT NOT NULL, name TEXT NOT NULL, model_name TEXT NOT NULL, "
    "dataset_name TEXT NOT NULL, config_json TEXT NOT NULL, run_id TEXT, "
    "finish_state INTEGER, finished INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS batches (sequence INTEGER PRIMARY KEY AUTOINCREMENT, "
    "payload BLOB NOT NULL, count INTEGER NOT NULL, created_at REAL NOT NULL, "
    f"kind TEXT NOT NULL DEFAULT '{PREDICTIONS}')",
    "CREATE TABLE IF NOT EXISTS rejected (sequence INTEGER PRIMARY KEY, payload BLOB NOT NULL, "
    "count INTEGER NOT NULL, code TEXT NOT NULL, message TEXT NOT NULL, "
    f"rejected_at REAL NOT NULL, kind TEXT NOT NULL DEFAULT '{PREDICTIONS}')",
)


class SpoolBusy(RuntimeError):
    """Another process holds this spool file."""


@dataclass
class RunRecord:
    """The CreateRun request kept in the spool, and what became of it."""

    request_id: str
    name: str
    model_name: str
    dataset_name: str
    config: dict
    run_id: str | None = None
    finish_state: int | None = None
    finished: bool = False


class Spool:
    """A spool file; thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_file = _take_lock(self.path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        for statement in _SCHEMA:
            self._db.execute(statement)
        for table in ("batches", "rejected"):
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if "kind" not in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN kind TEXT NOT NULL "
                                 f"DEFAULT '{PREDICTIONS}'")

    @classmethod
    def create(cls, spool_dir: Path, record: RunRecord) -> "Spool":
        """A new spool for a run that is about to start."""
        spool_dir = Path(spool_dir)
        spool_dir.mkdir(parents=True, exist_ok=True)
        spool = cls(spool_dir / f"{record.request_id}{SPOOL_SUFFIX}")
        with spool._lock:
            spool._db.execute(
                "INSERT INTO run (id, request_id, name, model_name, dataset_name, config_json, "
                "created_at) VALUES (1, ?, ?, ?, ?, ?, ?)",
                (record.request_id, record.name, record.model_name, record.dataset_name,
                 json.dumps(record.config), time.time()))
        return spool

    def record(self) -> RunRecord:
        with self._lock:
            row = self._db.execute(
                "SELECT request_id, name, model_name, dataset_name, config_json, run_id, "
                "finish_state, finished FROM run WHERE id = 1").fetchone()
        if row is None:
            raise ValueError(f"{self.path} holds no run record: not a spool file")
        return RunRecord(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6],
                         bool(row[7]))

    def set_run_id(self, run_id: str) -> None:
        self._update("UPDATE run SET run_id = ? WHERE id = 1", (run_id,))

    def set_finish_state(self, state: int) -> None:
        self._update("UPDATE run SET finish_state = ? WHERE id = 1", (state,))

    def mark_finished(self) -> None:
        self._update("UPDATE run SET finished = 1 WHERE id = 1", ())

    def append(self, payload: bytes, count: int, kind: str = PREDICTIONS) -> int:
        """Stores a batch of `count` predictions or metrics; returns its sequence number."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO batches (payload, count, created_at, kind) VALUES (?, ?, ?, ?)",
                (payload, count, time.time(), kind))
            return int(cursor.lastrowid)

    def pending(self, after: int, limit: int) -> list[tuple[int, bytes, str]]:
        """Up to limit (sequence, payload, kind) with a sequence above `after`, in order."""
        with self._lock:
            return self._db.execute(
                "SELECT sequence, payload, kind FROM batches WHERE sequence > ? "
                "ORDER BY sequence LIMIT ?", (after, limit)).fetchall()

    def pending_counts(self) -> tuple[int, int]:
        """(batches, predictions) not acked yet (batches of either kind)."""
        return self._counts("batches", PREDICTIONS)

    def pending_metrics(self) -> int:
        """Metrics not acked yet."""
        return self._counts("batches", METRICS)[1]

    def rejected_counts(self) -> tuple[int, int]:
        """(batches, predictions) the writer refused (batches of either kind)."""
        return self._counts("rejected", PREDICTIONS)

    def rejected_metrics(self) -> int:
        """Metrics the writer refused."""
        return self._counts("rejected", METRICS)[1]

    def _counts(self, table: str, kind: str) -> tuple[int, int]:
        """(batches of any kind, items of batches of `kind`) in `table`."""
        with self._lock:
            row = self._db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(CASE WHEN kind = ? THEN count END), 0) "
                f"FROM {table}", (kind,))
            batches, items = row.fetchone()
        return int(batches), int(items)

    def settle(self, acked: int, rejections: dict[int, tuple[str, str]]) -> None:
        """Drops batches up to `acked`; rejected ones move to the rejected table."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            for sequence, (code, message) in rejections.items():
                self._db.execute(
                    "INSERT OR REPLACE INTO rejected (sequence, payload, count, code, message, "
                    "rejected_at, kind) SELECT sequence, payload, count, ?, ?, ?, kind "
                    "FROM batches WHERE sequence = ?", (code, message, time.time(), sequence))
            self._db.execute("DELETE FROM batches WHERE sequence <= ?", (acked,))
            self._db.execute("COMMIT")

    def is_done(self) -> bool:
        """True when the run is created and finished and nothing waits for an ack."""
        record = self.record()
        return record.finished and self.pending_counts()[0] == 0

    def close(self, delete: bool = False) -> None:
        """Closes the file; deletes it (and its lock) when asked."""
        with self._lock:
            self._db.close()
        if delete:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        lock_path = Path(f"{self.path}.lock")
        if delete:
            lock_path.unlink(missing_ok=True)
        self._lock_file.close()

    def _update(self, statement: str, params: tuple) -> None:
        with self._lock:
            self._db.execute(statement, params)


def list_spools(spool_dir: Path) -> list[Path]:
    """Spool files in a folder, oldest first."""
    spool_dir = Path(spool_dir)
    if not spool_dir.is_dir():
        return []
    return sorted(spool_dir.glob(f"*{SPOOL_SUFFIX}"), key=lambda p: p.stat().st_mtime)


def _take_lock(path: Path):
    lock_file = open(f"{path}.lock", "a+")  # noqa: SIM115 (held for the spool's lifetime)
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        lock_file.close()
        raise SpoolBusy(f"{path} is in use by another process (pid in {path}.lock)") from exc
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(str(os.getpid()))
    lock_file.flush()
    return lock_file
