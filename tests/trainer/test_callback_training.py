"""A real transformers.Trainer on the tiny model, with the callback, against a real writer."""

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from epochlens.v1 import common_pb2
from tests.trainer.tiny import (
    build_model,
    make_trainer,
    reversal_rows,
    rows_in_format,
    train_features,
)
from trainer_client import CostCeilingExceeded, PredictionsCallback, PredictionsConfig

SAMPLES = 4


def predictions_config(tmp_path, **overrides) -> PredictionsConfig:
    values = {"sample_count": SAMPLES, "max_new_tokens": 8, "generation_batch_size": 4,
              "spool_dir": tmp_path / "spool", "backoff_base_s": 0.05, "backoff_max_s": 0.5,
              "flush_timeout_s": 20.0, "create_run_wait_s": 5.0, "_env_file": None}
    values.update(overrides)
    return PredictionsConfig(**values)


def run_training(tmp_path, tokenizer, callback, epochs=3, max_steps=-1, model=None,
                 extra_callbacks=(), **trainer_overrides):
    features = train_features(tokenizer, reversal_rows(32))
    model = model if model is not None else build_model(tokenizer)
    trainer = make_trainer(model, tokenizer, features, tmp_path / "out",
                           [*extra_callbacks, callback], epochs=epochs, max_steps=max_steps,
                           **trainer_overrides)
    trainer.train()
    return trainer


def test_every_epoch_lands_with_the_same_sample_indices(tmp_path, tokenizer, writer, token):
    eval_rows = reversal_rows(20, seed=7)
    judge_section = {"rules": {"criteria": ["exact_match"]}}
    callback = PredictionsCallback(predictions_config(tmp_path), dataset=eval_rows,
                                   tokenizer=tokenizer, writer=writer.address, token=token,
                                   run_name="every-epoch", run_config={"judge": judge_section})
    run_training(tmp_path, tokenizer, callback, epochs=3)

    report = callback.last_report
    assert report.complete and report.finished and report.inserted == 3 * SAMPLES
    assert report.spool_path is None and not list((tmp_path / "spool").iterdir())
    rows = writer.predictions(report.run_id)
    by_epoch = {}
    for epoch, _step, index, prediction in rows:
        by_epoch.setdefault(epoch, set()).add(index)
        assert prediction
    assert sorted(by_epoch) == [1, 2, 3]
    assert all(indices == set(range(SAMPLES)) for indices in by_epoch.values())
    assert sorted({(e, s) for e, s, _, _ in rows}) == [(1, 4), (2, 8), (3, 12)]
    assert writer.runs("every-epoch") == [(report.run_id, common_pb2.RUN_STATE_SUCCEEDED)]
    assert callback.counts["failed_samples"] == 0
    stored = writer.run_config(report.run_id)
    assert stored["judge"] == judge_section and stored["predictions"]["sample_count"] == SAMPLES


def test_steps_frequency(tmp_path, tokenizer, writer, token):
    config = predictions_config(tmp_path, frequency="steps", step_interval=3,
                                min_step_interval=2, predict_at_start=True)
    callback = PredictionsCallback(config, dataset=reversal_rows(10, seed=3),
                                   tokenizer=tokenizer, writer=writer.address, token=token)
    run_training(tmp_path, tokenizer, callback, epochs=1, max_steps=7, batch_size=4)
    rows = writer.predictions(callback.last_report.run_id)
    steps = sorted({(epoch, step) for epoch, step, _, _ in rows})
    assert steps == [(0, 0), (1, 3), (1, 6)]
    assert len(rows) == 3 * SAMPLES


def test_model_and_tokenizer_state_restored(tmp_path, tokenizer, writer, token, caplog):
    caplog.set_level(logging.INFO, logger="trainer_client")
    callback = PredictionsCallback(predictions_config(tmp_path), dataset=reversal_rows(8),
                                   tokenizer=tokenizer, writer=writer.address, token=token)
    trainer = run_training(tmp_path, tokenizer, callback, epochs=1,
                           activation_checkpointing=True)
    assert trainer.model.training
    assert trainer.model.model.layers[0].gradient_checkpointing is True
    assert tokenizer.padding_side == "right" and tokenizer.truncation_side == "right"
    assert callback.last_report.inserted == SAMPLES
    assert "predictions cost estimate" in caplog.text or callback.estimate is not None


@pytest.mark.parametrize("fmt", ["chat", "prompt_completion", "instruction", "question_answer",
                                 "text"])
def test_dataset_formats(tmp_path, tokenizer, writer, token, fmt):
    callback = PredictionsCallback(predictions_config(tmp_path), dataset=rows_in_format(fmt, 12),
                                   tokenizer=tokenizer, writer=writer.address, token=token,
                                   run_name=f"format-{fmt}")
    run_training(tmp_path, tokenizer, callback, epochs=1)
    rows = writer.predictions(callback.last_report.run_id)
    assert [(e, i) for e, _, i, _ in rows] == [(1, i) for i in range(SAMPLES)]
    prompts = [s.prompt for s in callback.sampler.samples]
    if fmt == "chat":
        assert all(p.startswith("<|user|>reverse ") and p.endswith("<|assistant|>")
                   for p in prompts)
    truths = [s.ground_truth for s in callback.sampler.samples]
    assert (truths == [None] * SAMPLES) == (fmt == "text")


def cast_like_trl(model):
    """LoRA layers in bf16 and norms in fp32 on a bf16 base (what TRL does for PEFT)."""
    for name, module in model.named_modules():
        if "lora_" in name:
            module.to(torch.bfloat16)
        elif "norm" in name:
            module.to(torch.float32)
    return model


def test_peft_lora_model_cast_the_trl_way(tmp_path, tokenizer, writer, token):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    model = cast_like_trl(get_peft_model(build_model(tokenizer).to(torch.bfloat16), lora))
    probe = tokenizer(["reverse abc ="], return_tensors="pt")
    with torch.no_grad(), pytest.raises(RuntimeError, match="dtype"):
        model.generate(**probe, max_new_tokens=2)  # the known failure, without autocast
    callback = PredictionsCallback(predictions_config(tmp_path), dataset=reversal_rows(8),
                                   tokenizer=tokenizer, writer=writer.address, token=token)
    run_training(tmp_path, tokenizer, callback, epochs=2, model=model, bf16=True)
    assert callback.counts["failed_samples"] == 0
    assert len(writer.predictions(callback.last_report.run_id)) == 2 * SAMPLES
    assert callback.last_report.complete



def test_failing_sample_is_logged_and_counted(tmp_path, tokenizer, writer, token, caplog):
    model = build_model(tokenizer)
    poison = tokenizer.convert_tokens_to_ids("<unk>")
    original = model.forward

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and bool((ids == poison).any()):
            raise RuntimeError("poisoned prompt")
        return original(*args, **kwargs)

    model.forward = forward
    rows = reversal_rows(SAMPLES)
    rows[1] = {"prompt": "reverse <unk> =", "completion": " x"}
    callback = PredictionsCallback(predictions_config(tmp_path), dataset=rows,
                                   tokenizer=tokenizer, writer=writer.address, token=token)
    with caplog.at_level(logging.ERROR, logger="trainer_client"):
        run_training(tmp_path, tokenizer, callback, epochs=2, model=model)
    bad = next(s.sample_index for s in callback.sampler.samples if "<unk>" in s.prompt)
    stored = writer.predictions(callback.last_report.run_id)
    assert sorted({i for _, _, i, _ in stored}) == sorted(set(range(SAMPLES)) - {bad})
    assert len(stored) == 2 * (SAMPLES - 1)
    assert callback.counts["failed_samples"] == 2
    assert callback.generator.counts["failed_samples"] >= 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and all(f"sample_index={bad}" in e for e in errors)
    for needle in ("model dtype=", "parameter dtypes=", "device=cpu", "autocast enabled=",
                   "poisoned prompt"):
        assert needle in errors[0]


def test_cost_ceiling_refuses_to_start(tmp_path, tokenizer, writer, token):
    config = predictions_config(tmp_path, decode_ms_per_step=100.0, cost_ceiling_s=1.0)
    callback = PredictionsCallback(config, dataset=reversal_rows(8), tokenizer=tokenizer,
                                   writer=writer.address, token=token, run_name="too-costly")
    with pytest.raises(CostCeilingExceeded, match="cost_ceiling_s=1.0"):
        run_training(tmp_path, tokenizer, callback, epochs=3)
    assert callback.estimate.passes_total == 3
    assert callback.estimate.seconds_total == pytest.approx(3 * 8 * 100.0 / 1000.0)
    assert writer.runs("too-costly") == []


class _KillWriter(TrainerCallback):
    """Kills the writer at the start of epoch 2 and restarts it after epoch 3's last step."""

    def __init__(self, writer):
        self.writer = writer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if round(state.epoch) == 1:
            self.writer.kill()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 11:
            self.writer.start()


def test_writer_killed_mid_training_and_restarted(tmp_path, tokenizer, own_writer, token):
    own_writer.start()
    callback = PredictionsCallback(predictions_config(tmp_path), dataset=reversal_rows(8),
                                   tokenizer=tokenizer, writer=own_writer.address, token=token,
                                   run_name="killed")
    run_training(tmp_path, tokenizer, callback, epochs=4, extra_callbacks=[_KillWriter(own_writer)])
    report = callback.last_report
    assert report.complete and report.finished, report.describe()
    rows = own_writer.predictions(report.run_id)
    keys = [(e, s, i) for e, s, i, _ in rows]
    assert len(keys) == len(set(keys)) == 4 * SAMPLES
    assert sorted({e for e, _, _ in keys}) == [1, 2, 3, 4]
    # Each sample stored once, although batches declared in streams the kill broke were
    # replayed on new streams (they declare their samples again).
    stored = [i for i, _, _ in own_writer.samples(report.run_id)]
    assert len(stored) == SAMPLES and stored == sorted({i for _, _, i in keys})
    assert callback.client is None and callback.upload_counts["connection_errors"] >= 1
    assert report.inserted <= 4 * SAMPLES <= report.inserted + report.duplicates
    assert own_writer.runs("killed") == [(report.run_id, common_pb2.RUN_STATE_SUCCEEDED)]
