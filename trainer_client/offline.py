"""Uploads what training left in the spool: the offline mode's second half.

``sync`` (the ``epochlens-sync`` command, see trainer_client.cli) opens every spool file
in the spool folder, creates its run if that never happened (CreateRun with the
spool's request_id, so the run is created exactly once however often sync
runs), streams the batches the writer has not acked, sends the recorded
FinishRun, and deletes each spool once it is fully uploaded. A spool still in
use by a training process is skipped.
"""

import logging
from pathlib import Path

from epochlens.v1 import common_pb2
from trainer_client.config import PredictionsConfig
from trainer_client.spool import Spool, SpoolBusy, list_spools
from trainer_client.streaming import FlushReport, StreamingClient

log = logging.getLogger(__name__)

FINISH_STATES = {"succeeded": common_pb2.RUN_STATE_SUCCEEDED,
                 "failed": common_pb2.RUN_STATE_FAILED,
                 "cancelled": common_pb2.RUN_STATE_CANCELLED}


def sync_spool(path: Path, config: PredictionsConfig, writer: str, token: str | None,
               timeout: float, finish: str | None = None) -> FlushReport:
    """Uploads one spool file; returns what was achieved (raises SpoolBusy when in use)."""
    spool = Spool(path)
    if finish is not None and spool.record().finish_state is None:
        spool.set_finish_state(FINISH_STATES[finish])
    client = StreamingClient(config, spool, writer, token)
    client.start()
    return client.close(timeout)


def sync(spool_dir: Path | None = None, *, config: PredictionsConfig | None = None,
         writer: str | None = None, token: str | None = None, timeout: float | None = None,
         finish: str | None = None) -> list[FlushReport]:
    """Uploads every spool file in spool_dir (default: config.spool_dir)."""
    config = config if config is not None else PredictionsConfig()
    folder = Path(spool_dir) if spool_dir is not None else config.spool_dir
    secret = config.token.get_secret_value() if config.token else None
    reports = []
    for path in list_spools(folder):
        try:
            reports.append(sync_spool(path, config, writer or config.writer_address,
                                      token or secret,
                                      timeout if timeout is not None else config.flush_timeout_s,
                                      finish))
        except SpoolBusy as exc:
            log.warning("skipped: %s", exc)
    return reports
