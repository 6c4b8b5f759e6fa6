"""epochlens-sync after a trainer that died: its run is finished as FAILED, or left RUNNING
with the exact command that finishes it.

The trainer is a real process (Trainer + callback against a real writer) killed with
SIGKILL once its first pass is stored, so its spool holds a created run and no finish
record, exactly what a crash leaves.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from epochlens.v1 import common_pb2
from tests.trainer.conftest import ROOT
from trainer_client.spool import Spool, list_spools

SAMPLES = 4
TRAINER_TIMEOUT_S = 180.0
POLL_S = 0.2

TRAINER = """
import sys
from pathlib import Path
from tests.trainer.test_callback_training import predictions_config, run_training
from tests.trainer.tiny import build_tokenizer, reversal_rows
from trainer_client import PredictionsCallback
tmp, writer, token, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
tokenizer = build_tokenizer()
callback = PredictionsCallback(predictions_config(tmp, measure_speed=False),
                               dataset=reversal_rows(8), tokenizer=tokenizer, writer=writer,
                               token=token, run_name=name)
run_training(tmp, tokenizer, callback, epochs=500)
"""


def _train_until_killed(tmp_path, writer, token, name: str) -> str:
    """Starts the trainer, SIGKILLs it once its first pass is stored; returns the run id."""
    process = subprocess.Popen([sys.executable, "-c", TRAINER, str(tmp_path), writer.address,
                                token, name], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.monotonic() + TRAINER_TIMEOUT_S
    try:
        while time.monotonic() < deadline and process.poll() is None:
            runs = writer.runs(name)
            if runs and len(writer.predictions(runs[0][0])) >= SAMPLES:
                break
            time.sleep(POLL_S)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
    if process.returncode != -signal.SIGKILL:
        pytest.fail(f"the trainer ended by itself ({process.returncode}):\n{stderr[-3000:]}")
    [(run_id, state)] = writer.runs(name)
    assert state == common_pb2.RUN_STATE_RUNNING
    return run_id


def _sync(tmp_path, writer, token, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "trainer_client.cli", "--spool-dir", str(tmp_path / "spool"),
               "--writer", writer.address, "--timeout", "20", *options]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "EPOCHLENS_TRAINER_TOKEN": token},
                          capture_output=True, text=True, timeout=120)


def _spool_state(tmp_path) -> tuple[int | None, tuple[int, int]]:
    [path] = list_spools(tmp_path / "spool")
    spool = Spool(path)
    try:
        return spool.record().finish_state, spool.pending_counts()
    finally:
        spool.close()


def test_sync_finishes_the_run_of_a_killed_trainer_as_failed(tmp_path, writer, token):
    run_id = _train_until_killed(tmp_path, writer, token, "killed-trainer")
    assert _spool_state(tmp_path)[0] is None  # no finish record: what a crash leaves

    done = _sync(tmp_path, writer, token)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "it crashed or was killed, so the run is finished as FAILED" in done.stdout
    assert "finished=True" in done.stdout
    assert writer.runs("killed-trainer") == [(run_id, common_pb2.RUN_STATE_FAILED)]
    assert list_spools(tmp_path / "spool") == []
    rows = writer.predictions(run_id)
    assert len(rows) == len({(e, s, i) for e, s, i, _ in rows})
    assert sorted({i for _, _, i, _ in rows}) == list(range(SAMPLES))


def test_sync_leave_running_prints_the_command_that_finishes_it(tmp_path, writer, token):
    run_id = _train_until_killed(tmp_path, writer, token, "killed-kept-running")

    kept = _sync(tmp_path, writer, token, "--leave-running")
    assert kept.returncode == 0, kept.stdout + kept.stderr
    command = (f"epochlens-sync --spool-dir {tmp_path / 'spool'} --finish failed")
    assert f"the run stays RUNNING (--leave-running); finish it with `{command}`" in kept.stdout
    assert writer.runs("killed-kept-running") == [(run_id, common_pb2.RUN_STATE_RUNNING)]
    assert _spool_state(tmp_path) == (None, (0, 0))

    finished = _sync(tmp_path, writer, token, "--finish", "failed")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "run finished as FAILED (--finish failed)" in finished.stdout
    assert writer.runs("killed-kept-running") == [(run_id, common_pb2.RUN_STATE_FAILED)]
    assert list_spools(tmp_path / "spool") == []


def test_finish_and_leave_running_exclude_each_other(tmp_path, writer, token):
    done = _sync(tmp_path, writer, token, "--finish", "failed", "--leave-running")
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr
