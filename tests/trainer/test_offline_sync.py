"""Writer down for the whole run: everything stays in the spool, and sync uploads it once."""

import subprocess
import sys

from epochlens.v1 import common_pb2
from tests.trainer.conftest import ROOT, free_port
from tests.trainer.test_callback_training import SAMPLES, predictions_config, run_training
from tests.trainer.tiny import reversal_rows
from trainer_client import PredictionsCallback, PredictionsConfig, sync
from trainer_client.spool import Spool, list_spools


def _offline_training(tmp_path, tokenizer, token, run_name: str, epochs: int = 2):
    nowhere = f"127.0.0.1:{free_port()}"
    config = predictions_config(tmp_path, flush_timeout_s=0.5, create_run_wait_s=0.2)
    callback = PredictionsCallback(config, dataset=reversal_rows(8), tokenizer=tokenizer,
                                   writer=nowhere, token=token, run_name=run_name)
    run_training(tmp_path, tokenizer, callback, epochs=epochs)
    return callback.last_report


def test_writer_down_for_the_whole_run_then_sync_uploads_once(tmp_path, tokenizer, writer,
                                                               token):
    report = _offline_training(tmp_path, tokenizer, token, "offline-run")
    assert report.run_id is None and not report.finished
    assert report.pending_predictions == 2 * SAMPLES and report.spool_path
    [path] = list_spools(tmp_path / "spool")
    spool = Spool(path)
    record = spool.record()
    assert record.name == "offline-run" and record.finish_state == common_pb2.RUN_STATE_SUCCEEDED
    # Batches: one of predictions per pass, one of metrics per pass (its epochlens/* numbers)
    # and one for the trainer's train-end log (train_runtime, ..., train_loss: 5 scalars).
    assert spool.pending_counts() == (2 + 3, 2 * SAMPLES)
    assert spool.pending_metrics() == 2 * 4 + 5
    spool.close()

    env = {"EPOCHLENS_TRAINER_TOKEN": token, "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "trainer_client.cli", "--spool-dir",
               str(tmp_path / "spool"), "--writer", writer.address, "--timeout", "20"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{2 * SAMPLES} predictions stored" in done.stdout

    [(run_id, state)] = writer.runs("offline-run")
    assert state == common_pb2.RUN_STATE_SUCCEEDED
    rows = writer.predictions(run_id)
    assert len(rows) == len({(e, s, i) for e, s, i, _ in rows}) == 2 * SAMPLES
    assert list_spools(tmp_path / "spool") == []
    again = sync(tmp_path / "spool", writer=writer.address, token=token)
    assert again == [] and len(writer.predictions(run_id)) == 2 * SAMPLES


def test_sync_twice_after_a_partial_upload_creates_one_run(tmp_path, tokenizer, writer, token):
    """A spool whose run was created by an earlier sync that died before uploading."""
    _offline_training(tmp_path, tokenizer, token, "partial-sync", epochs=1)
    [path] = list_spools(tmp_path / "spool")
    config = PredictionsConfig(_env_file=None, flush_timeout_s=20.0)
    first = sync(tmp_path / "spool", config=config, writer=writer.address, token=token)
    assert first[0].complete and first[0].finished
    assert not path.exists()
    [(run_id, _)] = writer.runs("partial-sync")
    assert len(writer.predictions(run_id)) == SAMPLES


def test_sync_reports_a_bad_token_and_keeps_the_spool(tmp_path, tokenizer, writer, token):
    _offline_training(tmp_path, tokenizer, token, "bad-token", epochs=1)
    config = PredictionsConfig(_env_file=None, flush_timeout_s=5.0)
    [report] = sync(tmp_path / "spool", config=config, writer=writer.address, token="not-a-jwt")
    assert not report.complete and "UNAUTHENTICATED" in report.error
    assert report.pending_predictions == SAMPLES and report.spool_path
    assert writer.runs("bad-token") == []
    [again] = sync(tmp_path / "spool", config=config, writer=writer.address, token=token)
    assert again.complete and len(writer.predictions(again.run_id)) == SAMPLES
