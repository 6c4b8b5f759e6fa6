"""Examples an ML engineer runs: TRL SFTTrainer with a LoRA adapter (peft) and the callback on
conversational prompt/completion data, and a run config read back through the real writer
and query services with its integers intact."""

import random
from pathlib import Path

import datasets
import pytest
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from services.cli.render import message_dict
from services.common.convert import struct_to_dict
from tests.trainer.conftest import QueryProcess
from tests.trainer.tiny import _words, build_model, build_tokenizer
from trainer_client import PredictionsCallback, PredictionsConfig

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = 4
EPOCHS = 2
SYSTEM = "reverse the word"


@pytest.fixture
def query(writer):
    process = QueryProcess(writer.data_dir)
    yield process
    process.kill()


def conversational_rows(count: int, seed: int) -> list[dict]:
    return [conversational_rows_for(word) for word in _words(count, random.Random(seed))]


def predictions_config(tmp_path, **overrides) -> PredictionsConfig:
    values = {"sample_count": SAMPLES, "max_new_tokens": 6, "generation_batch_size": 4,
              "spool_dir": tmp_path / "spool", "backoff_base_s": 0.05, "backoff_max_s": 0.5,
              "flush_timeout_s": 20.0, "create_run_wait_s": 5.0, "measure_speed": False,
              "_env_file": None}
    return PredictionsConfig(**{**values, **overrides})


def sft_trainer(tmp_path, name: str) -> SFTTrainer:
    """SFTTrainer with a LoRA adapter on the tiny Llama; the same seed every time."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0)
    model.config._name_or_path = "tiny/llama-sft"
    args = SFTConfig(output_dir=str(tmp_path / name), num_train_epochs=EPOCHS,
                     per_device_train_batch_size=8, learning_rate=5e-3, save_strategy="no",
                     report_to=[], logging_strategy="epoch", use_cpu=True, seed=0,
                     disable_tqdm=True, max_length=64, dataloader_num_workers=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=args, processing_class=tokenizer, peft_config=lora,
                      train_dataset=datasets.Dataset.from_list(conversational_rows(32, 1)),
                      eval_dataset=datasets.Dataset.from_list(conversational_rows(12, 2)))


def test_sft_trainer_lora_predictions_per_epoch_and_same_loss(tmp_path, writer, token, query):
    plain = sft_trainer(tmp_path, "plain")
    plain_loss = plain.train().training_loss

    trainer = sft_trainer(tmp_path, "with-callback")
    callback = PredictionsCallback(predictions_config(tmp_path), writer=writer.address,
                                   token=token, run_name="sft-lora").attach(trainer)
    loss = trainer.train().training_loss

    assert loss == plain_loss
    # The trainer's own log entries (loss and TRL's entropy / token accuracy) are the same,
    # and the callback's per-pass numbers sit in entries of their own.
    own = [e for e in trainer.state.log_history if "epochlens/predictions" not in e]
    plain_own = plain.state.log_history
    assert [(e["loss"], e["mean_token_accuracy"], e["entropy"], e["step"])
            for e in own if "loss" in e] == [
        (e["loss"], e["mean_token_accuracy"], e["entropy"], e["step"])
        for e in plain_own if "loss" in e]
    assert len([e for e in own if "loss" in e]) == EPOCHS
    passes = [e for e in trainer.state.log_history if "epochlens/predictions" in e]
    assert [(e["epochlens/predictions"], e["epochlens/failed_samples"], e["step"])
            for e in passes] == [(SAMPLES, 0, 4), (SAMPLES, 0, 8)]
    assert all("entropy" not in e for e in passes)
    report = callback.last_report
    assert report.complete and report.inserted == EPOCHS * SAMPLES
    run, predictions = query.run_and_predictions(token, report.run_id)
    assert run.model_name == "tiny/llama-sft"
    assert sorted((p.epoch, p.sample_index) for p in predictions) == [
        (e, i) for e in range(1, EPOCHS + 1) for i in range(SAMPLES)]
    eval_rows = conversational_rows(12, 2)
    for p in predictions:
        row = eval_rows[callback.sampler.samples[p.sample_index].row_index]
        word = row["prompt"][1]["content"]
        assert p.prompt == f"<|system|>{SYSTEM}\n<|user|>{word}\n<|assistant|>"
        assert p.ground_truth == word[::-1]
    assert callback.counts["failed_samples"] == 0


def test_run_config_integers_stay_integers_through_writer_and_query(tmp_path, writer, token,
                                                                    query):
    trainer = sft_trainer(tmp_path, "ints")
    run_config = {"batch": 8, "layers": [2, 4], "lr": 0.5, "nested": {"rank": 4, "scale": 1.5},
                  "big": 2**53, "bigger": 2**60}
    callback = PredictionsCallback(predictions_config(tmp_path, sample_count=2),
                                   writer=writer.address, token=token, run_name="int-config",
                                   run_config=run_config).attach(trainer)
    trainer.args.max_steps = 1
    trainer.train()
    run_id = callback.last_report.run_id

    stored = writer.run_config(run_id)
    run, _ = query.run_and_predictions(token, run_id)
    for config in (stored, struct_to_dict(run.config), message_dict(run)["config"]):
        assert {k: config[k] for k in ("batch", "layers", "lr", "nested", "big")} == {
            "batch": 8, "layers": [2, 4], "lr": 0.5, "nested": {"rank": 4, "scale": 1.5},
            "big": 2**53}
        assert [type(config[k]) for k in ("batch", "lr", "big", "bigger")] == [
            int, float, int, float]
        assert type(config["layers"][0]) is int and type(config["nested"]["rank"]) is int
        assert config["bigger"] == float(2**60)
        predictions = config["predictions"]
        assert (predictions["sample_count"], predictions["max_new_tokens"]) == (2, 6)
        assert type(predictions["sample_count"]) is int
        assert config["trainer"]["max_steps"] == 1 and type(config["trainer"]["max_steps"]) is int
        assert config["trainer"]["world_size"] == 1


def trl_rows(fmt: str, words: list[str]) -> list[dict]:
    """The reversal task in one of TRL's dataset formats."""
    makers = {
        "conversational_prompt_completion": lambda w: conversational_rows_for(w),
        "messages": lambda w: {"messages": [{"role": "user", "content": w},
                                            {"role": "assistant", "content": w[::-1]}]},
        "prompt_completion": lambda w: {"prompt": f"reverse {w} =", "completion": w[::-1]},
    }
    return [makers[fmt](w) for w in words]


def conversational_rows_for(word: str) -> dict:
    return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": word}],
            "completion": [{"role": "assistant", "content": word[::-1]}]}


@pytest.mark.parametrize(("fmt", "prompt"), [
    ("conversational_prompt_completion", f"<|system|>{SYSTEM}\n<|user|>{{w}}\n<|assistant|>"),
    ("messages", "<|user|>{w}\n<|assistant|>"),
    ("prompt_completion", "reverse {w} ="),
])
def test_attach_reads_the_eval_dataset_sft_trainer_prepared(tmp_path, fmt, prompt):
    """SFTTrainer tokenizes its eval_dataset and appends EOS to text completions; the
    callback still finds the original columns and the ground truth without the EOS."""
    words = _words(6, random.Random(5))
    tokenizer = build_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path / fmt), report_to=[], use_cpu=True,
                     max_length=64, save_strategy="no")
    trainer = SFTTrainer(model=build_model(tokenizer), args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(trl_rows(fmt, words)),
                         eval_dataset=datasets.Dataset.from_list(trl_rows(fmt, words)))
    assert "input_ids" in trainer.eval_dataset.column_names
    if fmt == "prompt_completion":
        assert trainer.eval_dataset[0]["completion"] == words[0][::-1] + tokenizer.eos_token
    callback = PredictionsCallback(predictions_config(tmp_path, sample_count=6)).attach(trainer)
    samples = PredictionsCallback(predictions_config(tmp_path, sample_count=6),
                                  dataset=trainer.eval_dataset, tokenizer=tokenizer)
    assert callback._draw.rows == samples._draw.rows
    by_row = {s.row_index: s for s in samples.sampler.samples}
    assert sorted(by_row) == list(range(6))
    assert [(by_row[i].prompt, by_row[i].ground_truth) for i in range(6)] == [
        (prompt.format(w=w), w[::-1]) for w in words]
