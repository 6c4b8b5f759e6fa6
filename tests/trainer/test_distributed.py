"""Several processes for real: torchrun with 2 CPU processes on gloo.

DDP: a real transformers.Trainer with the callback on both ranks; each rank generates
its share, rank 0 alone uploads, and the query service shows exactly one run with
exactly sample_count predictions per pass. FSDP2: generation under ``fully_shard``
gives what an unsharded copy of the gathered weights gives, and the model goes back
to training exactly as it was. Every torchrun gets a hard timeout and is killed
with its whole process group when it passes it.
"""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from epochlens.v1 import common_pb2, query_pb2, query_pb2_grpc
from tests.trainer.conftest import ROOT, QueryProcess, free_port
from tests.trainer.distributed_worker import DDP_EPOCHS, SAMPLE_COUNT
from tests.trainer.tiny import build_model
from trainer_client import distributed
from trainer_client.config import PredictionsConfig
from trainer_client.generator import ZERO3_REFUSED, Generator
from trainer_client.sampler import Sample

TORCHRUN_TIMEOUT_S = 300


def torchrun(mode: str, out: Path, *args: str, env: dict | None = None) -> None:
    """Runs the worker on 2 processes; kills the whole group past TORCHRUN_TIMEOUT_S."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(ROOT / "tests/trainer/distributed_worker.py"), mode, str(out), *args]
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    log_path = out / "torchrun.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=log, stderr=log,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=TORCHRUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"torchrun {mode} passed {TORCHRUN_TIMEOUT_S}s and was killed:\n"
                        + log_path.read_text()[-4000:])
    assert code == 0, log_path.read_text()[-6000:]


def _query_all(address: str, token: str, run_name: str) -> tuple[list, list]:
    """(runs named run_name, every prediction of them) through QueryService."""
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(address) as channel:
        stub = query_pb2_grpc.QueryServiceStub(channel)
        runs = [r for r in stub.ListRuns(query_pb2.ListRunsRequest(page_size=100),
                                         metadata=metadata).runs if r.name == run_name]
        predictions, page = [], ""
        while runs:
            reply = stub.ListPredictions(query_pb2.ListPredictionsRequest(
                run_id=runs[0].id, page_size=100, page_token=page), metadata=metadata)
            predictions += list(reply.predictions)
            page = reply.next_page_token
            if not page:
                break
    return runs, predictions


def test_ddp_two_ranks_each_generate_their_share_and_rank0_uploads_once(
        tmp_path, own_writer, token):
    own_writer.start()
    out = tmp_path / "out"
    out.mkdir()
    torchrun("ddp", out, own_writer.address, env={"EPOCHLENS_TEST_TOKEN": token})

    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    # 5 samples round robin over 2 ranks: 3 and 2 per pass, 2 passes.
    assert (rank0["generated"], rank1["generated"]) == (3 * DDP_EPOCHS, 2 * DDP_EPOCHS)
    assert rank0["failed_samples"] == rank1["failed_samples"] == 0
    assert (rank0["world_size"], rank1["world_size"]) == (2, 2)
    assert rank0["has_client"] and rank0["complete"] and rank0["passes"] == DDP_EPOCHS
    assert not rank1["has_client"] and rank1["passes"] == 0
    assert list((out / "spool").iterdir()) == []

    query = QueryProcess(own_writer.data_dir)
    try:
        runs, predictions = _query_all(query.address, token, "ddp-two-ranks")
    finally:
        query.kill()
    assert [(r.id, r.state) for r in runs] == [(rank0["run_id"],
                                                common_pb2.RUN_STATE_SUCCEEDED)]
    keys = [(p.epoch, p.step, p.sample_index) for p in predictions]
    # 32 rows, 4 per device, 2 ranks: 4 optimizer steps per epoch.
    assert keys == [(e, 4 * e, i) for e in range(1, DDP_EPOCHS + 1) for i in range(SAMPLE_COUNT)]
    assert runs[0].config["trainer"]["world_size"] == 2


def test_fsdp2_generation_matches_the_gathered_weights_and_training_is_unchanged(tmp_path):
    torchrun("fsdp", tmp_path)
    report = json.loads((tmp_path / "fsdp.json").read_text())
    # FSDP2's own settings: the root keeps its parameters after forward, the layers reshard.
    settings = [False, True, True]
    unchanged = {"bit_identical": True, "all_dtensor": True, "train_mode": True,
                 "reshard_after_forward": settings}
    assert len(report["passes"]) == 2  # before any forward, then after a training step
    for one_pass in report["passes"]:
        assert one_pass["state"] == unchanged
        assert [row[0] for row in one_pass["got"]] == list(range(SAMPLE_COUNT))
        assert all(row[2] is None for row in one_pass["got"])
        assert one_pass["got"] == one_pass["expected"]
    # One sample on two ranks: rank 1 has nothing to generate and still takes part.
    assert [row[0] for row in report["single"]["got"]] == [0]
    assert report["single"]["state"] == unchanged
    assert report["same_training"] is True
    assert report["reshard_without_passes"] == settings
    # The callback's own hooks on an FSDP2 model: the speed probe runs on every rank, the
    # pass (3 + 2 samples) lands in rank 0's spool (the writer is unreachable).
    # The probe generates one batch (2 samples) on every rank before the pass.
    assert report["callback"] == {"estimated": True, "generated": [2 + 3, 2 + 2],
                                  "spooled": SAMPLE_COUNT, "train_mode": True,
                                  "all_dtensor": True}
    # Round robin over 2 ranks: 3 + 2 per full pass, twice, then 1 + 0.
    assert report["generated_per_rank"] == [3 + 3 + 1, 2 + 2]


def test_full_parameters_is_a_no_op_without_fsdp(tokenizer):
    model = build_model(tokenizer)
    with distributed.full_parameters(model) as units:
        assert units == 0
    assert distributed.fsdp_units(model) == [] and not distributed.zero3_partitioned(model)


def test_zero3_partitioned_model_is_refused_loudly(tokenizer, caplog):
    model = build_model(tokenizer)
    next(model.parameters()).ds_id = 0  # what DeepSpeed ZeRO-3 puts on every parameter
    generator = Generator(PredictionsConfig(_env_file=None, max_new_tokens=4), tokenizer)
    samples = [Sample(i, i, f"reverse ab{i} =", None, False) for i in range(3)]
    with caplog.at_level(logging.ERROR, logger="trainer_client.generator"):
        results = generator.generate(model, samples, None)
    assert [(r.sample_index, r.prediction, r.error) for r in results] == [
        (i, None, f"RuntimeError: {ZERO3_REFUSED}") for i in range(3)]
    assert generator.counts["refused_passes"] == 1 and generator.counts["generated"] == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"{ZERO3_REFUSED} (3 samples not generated at this pass, 1 passes refused so far)"]
