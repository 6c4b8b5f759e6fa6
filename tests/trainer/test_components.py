"""The parts of the trainer client on their own: config, sampler, epochs, cost, generator,
the streaming client against the real writer, and the distributed gather."""

import logging
import os
import socket

import datasets
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import ValidationError

from tests.trainer.tiny import build_model, reversal_rows, rows_in_format
from trainer_client import (
    GenerationResult,
    Generator,
    PredictionsCallback,
    PredictionsConfig,
    SampleFormatError,
    Sampler,
    epoch_number,
)
from trainer_client import distributed as dist_helpers
from trainer_client.cost import estimate_cost, pass_schedule
from trainer_client.spool import RunRecord, Spool
from trainer_client.streaming import StreamingClient


def config(**values) -> PredictionsConfig:
    return PredictionsConfig(_env_file=None, **values)


# ----- config -----

def test_invalid_config_names_the_field_and_the_limit():
    with pytest.raises(ValidationError, match=r"sample_count=200 exceeds .*max_sample_count=100"):
        config(sample_count=200)
    with pytest.raises(ValidationError, match=r"step_interval=5 is below .*min_step_interval=10"):
        config(frequency="steps", step_interval=5)
    with pytest.raises(ValidationError, match="frequency"):
        config(frequency="hourly")
    with pytest.raises(ValidationError, match="max_new_tokens"):
        config(max_new_tokens=0)
    assert config(sample_count=200, max_sample_count=300).sample_count == 200


def test_config_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("EPOCHLENS_TRAINER_SAMPLE_COUNT", "7")
    monkeypatch.setenv("EPOCHLENS_TRAINER_QUEUE_FULL_POLICY", "block")
    loaded = config()
    assert (loaded.sample_count, loaded.queue_full_policy) == (7, "block")
    assert (loaded.frequency, loaded.max_new_tokens, loaded.max_sample_count) == ("epoch", 256, 100)


def test_every_setting_is_described():
    missing = [name for name, field in PredictionsConfig.model_fields.items()
               if not field.description]
    assert missing == []
    assert "token" not in config(token="secret").public_dict()


# ----- sampler -----

def test_sample_draw_is_reproducible_and_indexed(tokenizer):
    rows = reversal_rows(50)
    first = Sampler(rows, config(sample_count=6), tokenizer).samples
    again = Sampler(datasets.Dataset.from_list(rows), config(sample_count=6), tokenizer).samples
    other = Sampler(rows, config(sample_count=6, seed=7), tokenizer).samples
    assert first == again
    assert [s.sample_index for s in first] == list(range(6))
    assert [s.row_index for s in first] != [s.row_index for s in other]
    assert all(s.prompt == rows[s.row_index]["prompt"] for s in first)


def test_formats_extract_prompt_and_ground_truth(tokenizer):
    cfg = config(sample_count=1)
    chat = Sampler(rows_in_format("chat", 1), cfg, tokenizer).samples[0]
    assert chat.chat and chat.prompt.endswith("<|assistant|>")
    assert chat.ground_truth == rows_in_format("chat", 1)[0]["messages"][-1]["content"]
    row = rows_in_format("instruction", 1)[0]
    with_input = Sampler([row], cfg).samples[0]
    assert with_input.prompt == f"reverse\n\n{row['input']}\n\n"
    without = Sampler([{"instruction": "say hi", "output": "hi"}], cfg).samples[0]
    assert (without.prompt, without.ground_truth) == ("say hi\n\n", "hi")
    question = Sampler([{"question": "2+2?", "answer": 4}], cfg).samples[0]
    assert (question.prompt, question.ground_truth) == ("2+2?\n", "4")
    text = Sampler([{"text": "once upon"}], cfg).samples[0]
    assert (text.prompt, text.ground_truth) == ("once upon", None)


def test_unknown_format_fails_at_construction(tokenizer):
    with pytest.raises(SampleFormatError, match="unknown dataset format.*columns"):
        PredictionsCallback(config(), dataset=[{"foo": 1}], tokenizer=tokenizer)
    with pytest.raises(SampleFormatError, match="unknown dataset format"):
        PredictionsCallback(config(), dataset=[{"foo": 1}])
    with pytest.raises(SampleFormatError, match="chat_template"):
        Sampler(rows_in_format("chat", 2), config(), tokenizer=None)
    custom = Sampler([{"foo": "x"}], config(), formatter=lambda r: (f"q {r['foo']}", "a"))
    assert custom.samples[0].prompt == "q x"


def test_epoch_number_rounds_float_noise():
    assert [epoch_number(e) for e in (None, 0.0, 0.25, 1.0, 1.0000000001, 1.9999999999, 2.5)] \
        == [0, 0, 1, 1, 1, 2, 3]


# ----- cost -----

def test_cost_estimate_schedule():
    steps = config(frequency="steps", step_interval=10, predict_at_start=True)
    assert pass_schedule(steps, max_steps=95, num_epochs=3) == (pytest.approx(10 / 3), 10)
    cfg = config(sample_count=20, generation_batch_size=8, max_new_tokens=100)
    estimate = estimate_cost(cfg, 10.0, "given", 20, 2, max_steps=40, num_epochs=4)
    assert estimate.seconds_per_pass == pytest.approx(2 * 100 * 10.0 / 1000)
    assert (estimate.passes_total, estimate.seconds_total) == (4, pytest.approx(8.0))


# ----- generator -----

class _Spy(torch.nn.Module):
    """Records the model state generation sees (as a forward pre-hook)."""

    def __init__(self, model):
        super().__init__()
        self.seen = []
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        flags = {m.gradient_checkpointing for m in module.modules()
                 if hasattr(m, "gradient_checkpointing")}
        self.seen.append((module.training, flags, kwargs.get("use_cache")))


def test_generator_restores_model_and_tokenizer(tokenizer):
    model = build_model(tokenizer)
    model.activation_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    spy = _Spy(model)
    tokenizer.pad_token_id  # noqa: B018 (the session tokenizer has one)
    samples = Sampler(reversal_rows(6), config(sample_count=6), tokenizer).samples
    generator = Generator(config(max_new_tokens=3, generation_batch_size=4), tokenizer)
    results = generator.generate(model, samples, torch.bfloat16)
    assert all(r.error is None and r.prediction for r in results)
    assert spy.seen and all(s == (False, {False}, True) for s in spy.seen)
    assert model.training and model.config.use_cache is False
    assert model.model.layers[0].gradient_checkpointing is True
    assert (tokenizer.padding_side, tokenizer.truncation_side) == ("right", "right")


def test_batched_generation_matches_one_by_one_and_decodes_only_new_tokens(tokenizer):
    model = build_model(tokenizer, seed=3)
    samples = Sampler(reversal_rows(10, seed=5), config(sample_count=5), tokenizer).samples
    batched = Generator(config(max_new_tokens=5, generation_batch_size=5), tokenizer)
    single = Generator(config(max_new_tokens=5, generation_batch_size=1), tokenizer)
    together = batched.generate(model, samples, None)
    alone = single.generate(model, samples, None)
    assert [r.prediction for r in together] == [r.prediction for r in alone]
    first = samples[0]
    encoded = tokenizer(first.prompt, return_tensors="pt")
    with torch.no_grad():
        full = model.generate(**encoded, max_new_tokens=5, do_sample=False)
    new_ids = full[0, encoded["input_ids"].shape[1]:].tolist()
    if tokenizer.eos_token_id in new_ids:
        new_ids = new_ids[:new_ids.index(tokenizer.eos_token_id)]
    assert together[0].prediction == tokenizer.decode(new_ids, skip_special_tokens=True)
    assert together[0].prompt_tokens == encoded["input_ids"].shape[1]


def test_sampled_generation_is_seeded_and_leaves_the_training_rng_alone(tokenizer):
    model = build_model(tokenizer)
    samples = Sampler(reversal_rows(4), config(sample_count=4), tokenizer).samples
    generator = Generator(config(greedy=False, temperature=1.5, max_new_tokens=6), tokenizer)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = [r.prediction for r in generator.generate(model, samples, None, seed_offset=4)]
    assert torch.rand(1) == expected_next
    second = [r.prediction for r in generator.generate(model, samples, None, seed_offset=4)]
    assert first == second


# ----- streaming client against the real writer -----

def _results(count: int, prediction: str = "p") -> list[GenerationResult]:
    return [GenerationResult(i, f"prompt {i}", f"truth {i}", prediction, 1.0, 3, 1)
            for i in range(count)]


def _client(tmp_path, writer, token, name, **values):
    cfg = config(spool_dir=tmp_path / "spool", backoff_base_s=0.05, backoff_max_s=0.2,
                 **values)
    spool = Spool.create(cfg.spool_dir, RunRecord(os.urandom(8).hex(), name, "tiny", "toy",
                                                  {"k": 1}))
    client = StreamingClient(cfg, spool, writer.address, token)
    client.start()
    return client


def test_replayed_pass_is_counted_as_duplicates(tmp_path, writer, token):
    client = _client(tmp_path, writer, token, "replays", stream_batch_predictions=2)
    client.submit(1, 10, _results(5))
    client.submit(1, 10, _results(5))
    client.finish()
    report = client.close(20.0)
    assert report.complete and report.finished
    assert (report.inserted, report.duplicates) == (5, 5)
    assert len(writer.predictions(report.run_id)) == 5


def test_rejected_batch_is_logged_and_kept(tmp_path, writer, token, caplog):
    client = _client(tmp_path, writer, token, "rejects", stream_batch_predictions=1,
                     max_text_chars=100_000)
    with caplog.at_level(logging.ERROR, logger="trainer_client"):
        client.submit(1, 5, _results(1) + [GenerationResult(1, "p", None, "x" * 40_000, 1.0)])
        client.finish()
        report = client.close(20.0)
    assert (report.inserted, report.rejected_batches, report.rejected_predictions) == (1, 1, 1)
    assert not report.complete and report.spool_path
    assert "rejected batch" in caplog.text and "INVALID_ARGUMENT" in caplog.text
    assert len(writer.predictions(report.run_id)) == 1


def test_long_texts_are_cut_and_counted(tmp_path, writer, token):
    client = _client(tmp_path, writer, token, "cut", max_text_chars=50)
    client.submit(2, 7, _results(2, prediction="y" * 80))
    client.finish()
    report = client.close(20.0)
    assert report.complete and report.inserted == 2
    assert client._encoder.counts["truncated_texts"] == 2
    assert {len(r[3]) for r in writer.predictions(report.run_id)} == {50}


# ----- distributed gather -----

def _gather_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = dist_helpers.shard(["a"])
        gathered = dist_helpers.gather_lists(mine)
        decided = dist_helpers.broadcast_from_rank0(f"from {rank}")
        queue.put((rank, mine, gathered, decided))
    finally:
        dist.destroy_process_group()


def test_gather_on_rank_zero_with_an_empty_shard():
    assert dist_helpers.gather_lists([1, 2]) == [1, 2] and dist_helpers.rank() == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.start_processes(_gather_worker, args=(2, port, queue), nprocs=2, join=True,
                       start_method="spawn")
    results = sorted(queue.get(timeout=30) for _ in range(2))
    assert results == [(0, ["a"], ["a"], "from 0"), (1, [], None, "from 0")]


def _fill_queue(client) -> None:
    """Fills the upload queue behind the upload thread's back (no wake-up is sent)."""
    while not client._queue.full():
        client._queue.put_nowait((1, 1, _results(1)))


def test_queue_full_spools_directly(tmp_path, writer, token, caplog):
    client = _client(tmp_path, writer, token, "queue-spool", queue_size=2,
                     queue_full_policy="spool")
    _fill_queue(client)
    with caplog.at_level(logging.WARNING, logger="trainer_client"):
        client.submit(1, 2, _results(3))
    assert client.counts["spooled_queue_full"] == 1 and "written to the spool" in caplog.text
    client.finish()
    report = client.close(20.0)
    assert report.complete and len(writer.predictions(report.run_id)) == 4


def test_queue_full_blocks_until_there_is_room(tmp_path, writer, token):
    client = _client(tmp_path, writer, token, "queue-block", queue_size=2,
                     queue_full_policy="block")
    _fill_queue(client)
    client.submit(1, 2, _results(3))
    assert client.counts["blocked_queue_full"] == 1
    client.finish()
    report = client.close(20.0)
    assert report.complete and len(writer.predictions(report.run_id)) == 4


@pytest.mark.parametrize("window", [1, 4])
def test_more_batches_than_the_in_flight_window(tmp_path, writer, token, window):
    """The client sends at most `window` unacked batches, so the writer must ack each
    commit as soon as it is done (not only when more input arrives)."""
    client = _client(tmp_path, writer, token, "window", stream_batch_predictions=1,
                     max_in_flight_batches=window)
    client.submit(1, 3, _results(12))
    client.finish()
    report = client.close(20.0)
    assert report.complete and report.inserted == 12
    assert client.counts["sent_batches"] == 12
