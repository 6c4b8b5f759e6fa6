"""The `make demo` session on a reduced config, against the real stack (`epochlens up`).

The stack runs as processes, as `make demo` starts it, but on free ports with its
SQLite store, pid files and the demo's spool in a temporary folder that is also
the working directory (so a developer's .env does not leak in). What was stored
is checked in the database itself, independently of the demo's own read-back.
"""

import re
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.trainer.conftest import JWT_SECRET, free_port
from trainer_client import toy
from trainer_client.demo import DemoSettings, main

SAMPLES = 8
EPOCHS = 3
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\S+)\s+(\d+)/(\d+)\s+'")
TOTAL = re.compile(r"^exact matches: (\d+)/(\d+) at epoch 0 -> (\d+)/(\d+) at epoch (\d+)$")


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory):
    """writer + query started by `epochlens up` with everything under one temporary folder."""
    root = tmp_path_factory.mktemp("demo")
    env = {"EPOCHLENS_AUTH_JWT_SECRET": JWT_SECRET,
           "EPOCHLENS_QUERY_PAGE_TOKEN_SECRET": "demo-test-page-token-secret",
           "EPOCHLENS_WRITER_PORT": str(free_port()), "EPOCHLENS_QUERY_PORT": str(free_port()),
           "EPOCHLENS_JUDGE_PORT": str(free_port()), "EPOCHLENS_JUDGE_SHUTDOWN_GRACE_S": "0.5",
           "EPOCHLENS_WRITER_SHUTDOWN_GRACE_S": "0.5", "EPOCHLENS_QUERY_SHUTDOWN_GRACE_S": "0.5",
           "EPOCHLENS_STACK_STATE_DIR": str(root / "run"),
           "EPOCHLENS_TRAINER_SPOOL_DIR": str(root / "spool"),
           "EPOCHLENS_SQLITE_DIR": str(root / "db")}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for name, value in env.items():
            patch.setenv(name, value)
        try:
            epochlens("up")
            yield root
        finally:
            epochlens("down")


def epochlens(command: str) -> None:
    """The CLI in its own process, as `make demo` runs it (the services outlive it)."""
    done = subprocess.run([sys.executable, "-m", "services.cli.main", command],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"epochlens {command}: {done.stdout}{done.stderr}"


def reduced(**overrides) -> DemoSettings:
    values = {"epochs": EPOCHS, "sample_count": SAMPLES, "torch_threads": 2, "log_level": "INFO",
              "_env_file": None}
    values.update(overrides)
    return DemoSettings(**values)


def stored(root: Path, run_name: str) -> tuple[str, dict[int, list[int]]]:
    """(model name, epoch -> sorted sample indices) of the one run with this name."""
    with sqlite3.connect(root / "db" / "writer.db") as db:
        runs = db.execute("SELECT id, model_name FROM runs WHERE name = ?",
                          (run_name,)).fetchall()
        assert len(runs) == 1, runs
        wanted = uuid.UUID(str(runs[0][0]))
        rows = db.execute("SELECT run_id, epoch, sample_index FROM predictions").fetchall()
    by_epoch: dict[int, list[int]] = {}
    for run_id, epoch, index in rows:
        if uuid.UUID(str(run_id)) == wanted:
            by_epoch.setdefault(epoch, []).append(index)
    return runs[0][1], {epoch: sorted(indices) for epoch, indices in by_epoch.items()}


def test_demo_stores_every_epoch_and_prints_the_summary(demo_stack, capsys):
    assert main(reduced(run_name="demo-test")) == 0
    model_name, by_epoch = stored(demo_stack, "demo-test")
    assert model_name == "tiny-llama-h64-l2-a4"
    assert sorted(by_epoch) == list(range(EPOCHS + 1))
    assert all(indices == list(range(SAMPLES)) for indices in by_epoch.values())

    lines = capsys.readouterr().out.splitlines()
    rows = [ROW.match(line) for line in lines if ROW.match(line)]
    assert [int(m.group(1)) for m in rows] == list(range(EPOCHS + 1))
    assert all(int(m.group(5)) == SAMPLES for m in rows)
    assert rows[0].group(3) == "-" and all(float(m.group(3)) > 0 for m in rows[1:])
    exact = [int(m.group(4)) for m in rows]
    totals = [TOTAL.match(line) for line in lines if TOTAL.match(line)]
    assert len(totals) == 1
    assert totals[0].groups() == (str(exact[0]), str(SAMPLES), str(exact[-1]), str(SAMPLES),
                                  str(EPOCHS))
    assert exact[-1] > exact[0]
    assert not any(line.startswith("problem:") for line in lines)


def test_demo_trains_a_model_given_by_local_path(demo_stack, tmp_path):
    task = reduced().toy_task()
    rows, _ = task.split(200, 0, seed=5)
    tokenizer = toy.build_tokenizer(r["prompt"] + r["completion"] for r in rows)
    model = toy.build_model(toy.model_config(tokenizer, hidden_size=32), seed=5)
    model.save_pretrained(tmp_path / "local-model")
    tokenizer.save_pretrained(tmp_path / "local-model")

    path = str(tmp_path / "local-model")
    assert main(reduced(model=path, epochs=1, train_size=200, run_name="demo-local")) == 0
    model_name, by_epoch = stored(demo_stack, "demo-local")
    assert model_name == path
    assert by_epoch == {0: list(range(SAMPLES)), 1: list(range(SAMPLES))}


def test_demo_refuses_to_train_without_the_services(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EPOCHLENS_AUTH_JWT_SECRET", JWT_SECRET)
    closed = f"127.0.0.1:{free_port()}"
    settings = reduced(writer_address=closed, query_address=closed, rpc_timeout_s=0.5)
    assert main(settings) == 1
    out = capsys.readouterr().out
    assert f"demo failed: the writer at {closed} is not reachable (" in out
    assert "epochlens up" in out and "exact matches" not in out
    assert not (tmp_path / ".epochlens").exists()
