"""The public client API from loops other than transformers.Trainer: the examples (a plain
PyTorch loop and an accelerate loop, tiny models from a config) against a real writer, read
back through the writer's database and the real query service; Run's own guarantees
(finish state, row and metric checks, exactly once under kill -9 of the writer)."""

import math
import sqlite3
import uuid

import grpc
import pytest

from epochlens.v1 import common_pb2, query_pb2, query_pb2_grpc
from examples import accelerate_loop, plain_loop
from examples.batches import toy_setup
from tests.trainer.conftest import QueryProcess, free_port
from trainer_client import GenerationResult, PredictionsConfig, Run, sync

SAMPLES = 4
EPOCHS = 2
STEPS_PER_EPOCH = 4  # 32 training rows, batches of 8


def client_config(tmp_path, **overrides) -> PredictionsConfig:
    values = {"sample_count": SAMPLES, "max_new_tokens": 6, "generation_batch_size": 4,
              "spool_dir": tmp_path / "spool", "backoff_base_s": 0.05, "backoff_max_s": 0.5,
              "flush_timeout_s": 30.0, "create_run_wait_s": 5.0, "_env_file": None}
    values.update(overrides)
    return PredictionsConfig(**values)


def stored_metrics(writer, run_id: str) -> list[tuple[int, str, float]]:
    """(step, name, value) of one run, from the writer's database."""
    with sqlite3.connect(writer.data_dir / "writer.db") as db:
        rows = db.execute("SELECT run_id, step, name, value FROM metrics").fetchall()
    wanted = uuid.UUID(run_id)
    return sorted(r[1:] for r in rows if uuid.UUID(str(r[0])) == wanted)


def listed_metrics(query: QueryProcess, token: str, run_id: str) -> dict[str, list]:
    """name -> [(step, value)] through QueryService.ListMetrics."""
    with grpc.insecure_channel(query.address) as channel:
        reply = query_pb2_grpc.QueryServiceStub(channel).ListMetrics(
            query_pb2.ListMetricsRequest(run_id=run_id),
            metadata=(("authorization", f"Bearer {token}"),))
    assert not reply.omitted_names
    return {s.name: [(p.step, p.value) for p in s.points] for s in reply.series}


@pytest.fixture
def query(writer):
    process = QueryProcess(writer.data_dir)
    yield process
    process.kill()


def assert_passes_stored(writer, run_id: str) -> None:
    """Exactly SAMPLES predictions per epoch, at each epoch's last step."""
    rows = writer.predictions(run_id)
    assert [(e, s, i) for e, s, i, _ in rows] == [
        (epoch, epoch * STEPS_PER_EPOCH, index) for epoch in range(1, EPOCHS + 1)
        for index in range(SAMPLES)]


def test_plain_pytorch_loop_example(tmp_path, writer, token, query):
    model, tokenizer, train_rows, eval_rows = toy_setup()
    run, losses = plain_loop.train(model, tokenizer, train_rows, eval_rows,
                                   writer=writer.address, token=token,
                                   config=client_config(tmp_path), epochs=EPOCHS)
    assert run.report.complete and run.report.finished
    assert run.report.inserted == EPOCHS * SAMPLES
    assert writer.runs("plain-loop")[-1] == (run.run_id, common_pb2.RUN_STATE_SUCCEEDED)
    assert_passes_stored(writer, run.run_id)
    steps = range(1, EPOCHS * STEPS_PER_EPOCH + 1)
    listed = listed_metrics(query, token, run.run_id)
    assert listed["loss"] == [(s, losses[s]) for s in steps]
    assert listed["learning_rate"] == [(s, 5e-3) for s in steps]
    assert [s for s, _ in listed["exact_match"]] == [4, 8]
    assert all(0.0 <= v <= 1.0 for _, v in listed["exact_match"])
    assert len(stored_metrics(writer, run.run_id)) == 2 * len(steps) + EPOCHS
    assert run.report.metrics_inserted == 2 * len(steps) + EPOCHS


def test_accelerate_loop_example(tmp_path, writer, token, query):
    model, tokenizer, train_rows, eval_rows = toy_setup()
    run, losses = accelerate_loop.train(model, tokenizer, train_rows, eval_rows,
                                        writer=writer.address, token=token,
                                        config=client_config(tmp_path), epochs=EPOCHS)
    assert run.report.complete and run.report.inserted == EPOCHS * SAMPLES
    assert writer.runs("accelerate-loop")[-1] == (run.run_id,
                                                   common_pb2.RUN_STATE_SUCCEEDED)
    assert_passes_stored(writer, run.run_id)
    assert listed_metrics(query, token, run.run_id) == {
        "loss": [(s, losses[s]) for s in range(1, EPOCHS * STEPS_PER_EPOCH + 1)]}


def test_run_left_by_an_exception_is_failed_and_keeps_what_was_logged(tmp_path, writer,
                                                                       token):
    with pytest.raises(RuntimeError, match="diverged"):
        with Run("run-that-fails", model_name="m", config=client_config(tmp_path),
                 writer=writer.address, token=token) as run:
            run.log_metrics(1, {"loss": 2.0})
            run.log_predictions(1, 1, [{"sample_index": 0, "prompt": "p", "prediction": "x",
                                        "ground_truth": "x"}])
            raise RuntimeError("loss diverged")
    assert writer.runs("run-that-fails") == [(run.run_id, common_pb2.RUN_STATE_FAILED)]
    assert stored_metrics(writer, run.run_id) == [(1, "loss", 2.0)]
    assert [p[:3] for p in writer.predictions(run.run_id)] == [(1, 1, 0)]


def test_run_checks_what_it_is_given(tmp_path, writer, token, caplog):
    with Run("checked", model_name="m", config=client_config(tmp_path),
             writer=writer.address, token=token) as run:
        for bad in ([{"prompt": "p", "prediction": "x"}],
                    [{"sample_index": 0, "prompt": "p", "prediction": "x", "typo": 1}],
                    [{"sample_index": 0, "prompt": "", "prediction": "x"}], ["text"]):
            with pytest.raises(ValueError):
                run.log_predictions(1, 1, bad)
        for name, value in (("", 1.0), ("x" * 129, 1.0)):
            with pytest.raises(ValueError):
                run.log_metrics(1, {name: value})
        with pytest.raises(TypeError):
            run.log_metrics(1, {"loss": "0.5"})
        with pytest.raises(ValueError):
            run.log_metrics(-1, {"loss": 0.5})
        run.log_metrics(2, {"loss": math.nan, "lr": 0.1, "gnorm": math.inf})
        run.log_predictions(1, 2, [GenerationResult(3, "p", None, "y", 1.0)])
    assert run.report.complete
    assert stored_metrics(writer, run.run_id) == [(2, "lr", 0.1)]
    assert [p[:3] for p in writer.predictions(run.run_id)] == [(1, 2, 3)]
    assert "2 metrics not sent, their values are not finite" in caplog.text
    with pytest.raises(RuntimeError, match="not started"):
        run.log_metrics(3, {"loss": 1.0})


def test_run_is_exactly_once_under_kill_of_the_writer(tmp_path, own_writer, token):
    """The writer is killed with SIGKILL twice while a loop logs; every metric and every
    prediction is stored exactly once, in one run, once it is back."""
    own_writer.start()
    steps, samples = 300, 3
    config = client_config(tmp_path, stream_batch_metrics=7, max_in_flight_batches=4,
                           flush_timeout_s=60.0)
    with Run("killed", model_name="m", config=config, writer=own_writer.address,
             token=token) as run:
        for step in range(1, steps + 1):
            run.log_metrics(step, {"loss": 1.0 / step, "lr": 0.001})
            if step % 50 == 0:
                run.log_predictions(step // 50, step, [
                    {"sample_index": i, "prompt": f"p{i}", "prediction": f"{step}/{i}"}
                    for i in range(samples)])
            if step in (100, 200):
                own_writer.kill()
                own_writer.start()
    report = run.report
    assert report.complete and report.finished, report.describe()
    assert run.upload_counts["connection_errors"] >= 2
    assert own_writer.runs("killed") == [(run.run_id, common_pb2.RUN_STATE_SUCCEEDED)]
    assert stored_metrics(own_writer, run.run_id) == sorted(
        [(s, "loss", 1.0 / s) for s in range(1, steps + 1)]
        + [(s, "lr", 0.001) for s in range(1, steps + 1)])
    assert len(own_writer.predictions(run.run_id)) == (steps // 50) * samples


def test_run_with_the_writer_away_is_uploaded_once_by_sync(tmp_path, writer, token):
    """Metrics and predictions of a run whose writer never answered wait in the spool;
    `epochlens-sync` creates the run and uploads them, once however often it runs."""
    config = client_config(tmp_path, flush_timeout_s=0.5, create_run_wait_s=0.2)
    with Run("offline-loop", model_name="m", config=config,
             writer=f"127.0.0.1:{free_port()}", token=token) as run:
        for step in range(1, 4):
            run.log_metrics(step, {"loss": float(step)})
        run.log_predictions(1, 3, [{"sample_index": 0, "prompt": "p", "prediction": "x"}])
    assert (run.report.run_id, run.report.pending_metrics, run.report.pending_predictions) == (
        None, 3, 1)
    upload = PredictionsConfig(_env_file=None, flush_timeout_s=20.0)
    [report] = sync(tmp_path / "spool", config=upload, writer=writer.address, token=token)
    assert report.complete and report.finished and report.metrics_inserted == 3
    assert sync(tmp_path / "spool", config=upload, writer=writer.address, token=token) == []
    [(run_id, state)] = writer.runs("offline-loop")
    assert state == common_pb2.RUN_STATE_SUCCEEDED
    assert stored_metrics(writer, run_id) == [(1, "loss", 1.0), (2, "loss", 2.0),
                                              (3, "loss", 3.0)]
    assert [p[:3] for p in writer.predictions(run_id)] == [(1, 3, 0)]
