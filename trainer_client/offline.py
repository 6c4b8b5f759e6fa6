"""Uploads what training left in the spool: the offline mode's second half.

``sync`` (the ``epochlens-sync`` command, see trainer_client.cli) opens every spool file
in the spool folder, creates its run if that never happened (CreateRun with the
spool's request_id, so the run is created exactly once however often sync
runs), streams the batches the writer has not acked, sends the recorded
FinishRun, and deletes each spool once it is fully uploaded. A spool still in
use by a training process is skipped. A spool without a recorded end state belongs
to a trainer that died (see _decide_finish): its run is finished as FAILED, or as
--finish says, or left RUNNING with --leave-running and the command to finish it.
"""

import dataclasses
import logging
from pathlib import Path

from epochlens.v1 import common_pb2
from trainer_client.config import PredictionsConfig
from trainer_client.spool import Spool, SpoolBusy, list_spools
from trainer_client.streaming import FlushReport, StreamingClient
from trainer_client.tls import ClientTLS

log = logging.getLogger(__name__)

FINISH_STATES = {"succeeded": common_pb2.RUN_STATE_SUCCEEDED,
                 "failed": common_pb2.RUN_STATE_FAILED,
                 "cancelled": common_pb2.RUN_STATE_CANCELLED}
# The end state of a run whose spool shows that its trainer died (see _decide_finish).
CRASHED = "failed"


def sync_spool(path: Path, config: PredictionsConfig, writer: str, token: str | None,
               timeout: float, finish: str | None = None,
               leave_running: bool = False) -> FlushReport:
    """Uploads one spool file; returns what was achieved (raises SpoolBusy when in use)."""
    spool = Spool(path)
    note = _decide_finish(spool, finish, leave_running)
    client = StreamingClient(config, spool, writer, token)
    client.start()
    report = client.close(timeout)
    if note is None:
        return report
    if not report.finished:
        note += " (once everything is uploaded)"
    log.warning("%s: %s", path, note)
    return dataclasses.replace(report, note=note)


def _decide_finish(spool: Spool, finish: str | None, leave_running: bool) -> str | None:
    """Records the end state to send when the spool has none; returns what was decided.

    The evidence: the spool has no finish record (a trainer records one at train end, also
    when training fails) and no process holds it (Spool() took its lock, and a lock dies
    with its process, kill -9 included). So the process that trained is gone and never
    said how training ended: it crashed or was killed, and the run ends FAILED unless
    --finish says otherwise or --leave-running keeps it open.
    """
    if spool.record().finish_state is not None:
        return None
    if finish is not None:
        spool.set_finish_state(FINISH_STATES[finish])
        return (f"no end state was recorded by training: run finished as {finish.upper()} "
                f"(--finish {finish})")
    if leave_running:
        return ("no end state was recorded by training: the run stays RUNNING "
                f"(--leave-running); finish it with `epochlens-sync --spool-dir "
                f"{spool.path.parent} --finish failed` (or succeeded, cancelled)")
    spool.set_finish_state(FINISH_STATES[CRASHED])
    return ("the training process ended without recording an end state (no finish record "
            "in the spool, no process holding it): it crashed or was killed, so the run is "
            "finished as FAILED; to choose the state yourself, run epochlens-sync with "
            "--finish STATE or --leave-running")


def sync(spool_dir: Path | None = None, *, config: PredictionsConfig | None = None,
         writer: str | None = None, token: str | None = None, timeout: float | None = None,
         finish: str | None = None, leave_running: bool = False) -> list[FlushReport]:
    """Uploads every spool file in spool_dir (default: config.spool_dir). The config's TLS
    files are checked before any spool is touched (TLSFileError)."""
    if finish is not None and leave_running:
        raise ValueError("finish and leave_running exclude each other")
    config = config if config is not None else PredictionsConfig()
    ClientTLS.from_settings(config)
    folder = Path(spool_dir) if spool_dir is not None else config.spool_dir
    secret = config.token.get_secret_value() if config.token else None
    reports = []
    for path in list_spools(folder):
        try:
            reports.append(sync_spool(path, config, writer or config.writer_address,
                                      token or secret,
                                      timeout if timeout is not None else config.flush_timeout_s,
                                      finish, leave_running))
        except SpoolBusy as exc:
            log.warning("skipped: %s", exc)
    return reports
