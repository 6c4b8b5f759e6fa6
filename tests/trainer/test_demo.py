"""The `make demo` session on a reduced config, against the real stack (`epochlens up`).

The stack runs as processes, as `make demo` starts it, but on free ports with its
SQLite store, pid files and the demo's spool in a temporary folder that is also
the working directory (so a developer's .env does not leak in). What was stored
is checked in the database itself, independently of the demo's own read-back.
The run is read back by the `epochlens` CLI with its default identity, through the
commands the demo prints; a stack that was up before the demo is still up after it,
and one the demo started itself is stopped again.
"""

import json
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from services.cli import stack
from tests.trainer.conftest import JWT_SECRET, free_port
from trainer_client import toy
from trainer_client.demo import DemoSettings, answers, main

SAMPLES = 8
EPOCHS = 3
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\S+)\s+(\d+)/(\d+)\s+'")
TOTAL = re.compile(r"^exact matches: (\d+)/(\d+) at epoch 0 -> (\d+)/(\d+) at epoch (\d+)$")


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory):
    """The stack started by `epochlens up` (judge, writer, query, web) on free ports, with
    everything under one temporary folder."""
    root = tmp_path_factory.mktemp("demo")
    env = {"EPOCHLENS_AUTH_JWT_SECRET": JWT_SECRET,
           "EPOCHLENS_QUERY_PAGE_TOKEN_SECRET": "demo-test-page-token-secret",
           "EPOCHLENS_WRITER_PORT": str(free_port()), "EPOCHLENS_QUERY_PORT": str(free_port()),
           "EPOCHLENS_JUDGE_PORT": str(free_port()), "EPOCHLENS_JUDGE_SHUTDOWN_GRACE_S": "0.5",
           "EPOCHLENS_WEB_PORT": str(free_port()), "EPOCHLENS_WEB_SHUTDOWN_GRACE_S": "0.5",
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


def epochlens(*command: str) -> str:
    """The CLI in its own process, as `make demo` runs it (the services outlive it); its
    standard output."""
    done = subprocess.run([sys.executable, "-m", "services.cli.main", *command],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"epochlens {command}: {done.stdout}{done.stderr}"
    return done.stdout


def printed_command(lines: list[str], verb: str) -> str:
    """The one `... epochlens VERB ...` command line of the demo's closing lines."""
    found = [line.strip() for line in lines if re.search(rf"epochlens {verb}\b", line)]
    assert len(found) == 1, lines
    return found[0]


def run_as_printed(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """A printed command line through the shell, with this process's environment."""
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ})


def stack_pids() -> dict[str, int]:
    return stack.running(stack.StackSettings())


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
    before = stack_pids()
    assert main(reduced(run_name="demo-test")) == 0
    assert stack_pids() == before and sorted(before) == ["judge", "query", "web", "writer"]
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
    assert lines[0].startswith("demo: using the services already up (writer 127.0.0.1:")
    assert lines[0].endswith("); they stay up")
    assert not any(line.startswith("demo: stopped") or "make up" in line for line in lines)


def test_the_demo_run_is_the_clis_with_its_default_identity(demo_stack, capsys, monkeypatch):
    """No EPOCHLENS_CLI_USER, no EPOCHLENS_DEMO_USER: `epochlens runs` lists the run, and the
    commands the demo prints end to end (summary, report) work as printed."""
    monkeypatch.delenv("EPOCHLENS_CLI_USER", raising=False)
    monkeypatch.delenv("EPOCHLENS_DEMO_USER", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no venv on PATH: the demo prints its path
    assert main(reduced(run_name="demo-identity", epochs=1)) == 0
    lines = capsys.readouterr().out.splitlines()
    run_id = re.fullmatch(r"look at run ([0-9a-f-]{36}):", lines[-4]).group(1)
    query = f"127.0.0.1:{os.environ['EPOCHLENS_QUERY_PORT']}"
    monkeypatch.setenv("EPOCHLENS_CLI_QUERY_ADDRESS", query)
    runs = json.loads(epochlens("runs", "--json"))
    assert [(r["id"], r["name"], r["user_id"]) for r in runs if r["name"] == "demo-identity"] \
        == [(run_id, "demo-identity", "local")]

    monkeypatch.delenv("EPOCHLENS_CLI_QUERY_ADDRESS")
    summary = printed_command(lines, "summary")
    prefix = f"EPOCHLENS_CLI_QUERY_ADDRESS={query} {Path(sys.executable).parent / 'epochlens'}"
    assert summary == f"{prefix} summary {run_id}"
    done = run_as_printed(summary, demo_stack)
    assert done.returncode == 0, done.stderr
    assert "demo-identity" in done.stdout and "not found" not in done.stderr
    report = printed_command(lines, "report")
    assert report == f"{prefix} report {run_id} -o report.html"
    done = run_as_printed(report, demo_stack)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote report.html (")
    assert (demo_stack / "report.html").stat().st_size > 10_000
    assert printed_command(lines, "ui") == f"{prefix} ui"


def test_a_demo_user_other_than_the_clis_is_said_in_the_printed_commands(demo_stack, capsys):
    assert main(reduced(run_name="demo-other-user", epochs=1, user="someone else")) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = printed_command(lines, "summary")
    assert summary.startswith("EPOCHLENS_CLI_USER='someone else' EPOCHLENS_CLI_QUERY_ADDRESS=")
    done = run_as_printed(summary, demo_stack)
    assert done.returncode == 0, done.stderr
    assert "demo-other-user" in done.stdout


def test_demo_starts_the_services_when_none_is_up_and_stops_them(demo_stack, tmp_path,
                                                                 monkeypatch, capsys):
    """Its own ports, pid files and store: the demo's stack comes and goes, the one that was
    up before (demo_stack) is left alone."""
    others = stack_pids()
    ports = {name: free_port() for name in ("WRITER", "QUERY", "JUDGE", "WEB")}
    for name, port in ports.items():
        monkeypatch.setenv(f"EPOCHLENS_{name}_PORT", str(port))
    monkeypatch.setenv("EPOCHLENS_STACK_STATE_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("EPOCHLENS_SQLITE_DIR", str(tmp_path / "db"))
    assert main(reduced(run_name="demo-own-stack", epochs=1)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("demo: starting the services (as `epochlens up` does); they are "
                        "stopped when the demo ends")
    stopped = [line for line in lines if line.startswith("demo: stopped")]
    assert len(stopped) == 1
    assert stopped[0].startswith("demo: stopped the services it started (judge, writer, "
                                 "query, web)")
    assert any(line.strip().startswith("make up ") for line in lines)
    assert stack_pids() == {}
    assert not answers(f"127.0.0.1:{ports['WRITER']}", 1.0)
    assert not answers(f"127.0.0.1:{ports['QUERY']}", 1.0)
    _, by_epoch = stored(tmp_path, "demo-own-stack")
    assert sorted(by_epoch) == [0, 1]
    monkeypatch.undo()
    assert stack_pids() == others


def test_half_a_stack_is_refused_with_nothing_started_or_stopped(demo_stack, monkeypatch,
                                                                 capsys):
    """The writer answers, the query service (another port) does not: no training, and the
    running stack keeps its processes."""
    before = stack_pids()
    writer = f"127.0.0.1:{os.environ['EPOCHLENS_WRITER_PORT']}"
    closed = free_port()
    monkeypatch.setenv("EPOCHLENS_QUERY_PORT", str(closed))
    assert main(reduced(run_name="demo-half")) == 1
    out = capsys.readouterr().out
    assert (f"demo failed: the writer at {writer} answers but the query service at "
            f"127.0.0.1:{closed} does not: the demo starts the services only when none is up"
            in out)
    assert "demo: starting" not in out and "demo: stopped" not in out
    assert stack_pids() == before


def test_silent_services_with_live_pid_files_are_refused(demo_stack, monkeypatch, capsys):
    """Nothing answers where the settings say, but `epochlens up` processes are alive: the
    demo neither starts a second stack nor stops theirs."""
    before = stack_pids()
    monkeypatch.setenv("EPOCHLENS_WRITER_PORT", str(free_port()))
    monkeypatch.setenv("EPOCHLENS_QUERY_PORT", str(free_port()))
    assert main(reduced(run_name="demo-silent")) == 1
    out = capsys.readouterr().out
    assert "`epochlens up` processes are running (judge, writer, query" in out
    assert "nothing was started" in out and "demo: stopped" not in out
    assert stack_pids() == before


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
    assert "demo: starting" not in out
    assert not (tmp_path / ".epochlens").exists()


def test_epochlens_up_on_a_running_stack_starts_nothing(demo_stack):
    """`epochlens up` again: refused, naming what runs, and the running stack untouched."""
    before = stack_pids()
    done = subprocess.run([sys.executable, "-m", "services.cli.main", "up"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("error: already running: judge (pid ")
    assert done.stderr.rstrip().endswith("nothing was started (`epochlens down` stops them)")
    assert stack_pids() == before
