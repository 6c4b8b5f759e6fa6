"""Real datasets as an ML engineer passes them: TRL's conversational formats, missing values,
empty and streaming datasets, the trainer's eval_dataset, a GenerationConfig, the model name."""

import logging
import re

import datasets
import pytest
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig

from tests.trainer.tiny import build_model, make_trainer, reversal_rows, train_features
from trainer_client import PredictionsCallback, PredictionsConfig, SampleFormatError, Sampler
from trainer_client.generator import Generator


def config(**values) -> PredictionsConfig:
    return PredictionsConfig(_env_file=None, **values)


def conversational(word: str, answer: str | None = None) -> dict:
    return {"prompt": [{"role": "system", "content": "be brief"},
                       {"role": "user", "content": f"reverse {word}"}],
            "completion": [{"role": "assistant",
                            "content": word[::-1] if answer is None else answer}]}


# ----- formats -----

def test_conversational_prompt_completion_renders_the_prompt_turns(tokenizer):
    rows = [conversational("abc"), conversational("fed")]
    for dataset in (rows, datasets.Dataset.from_list(rows)):
        samples = Sampler(dataset, config(sample_count=2), tokenizer).samples
        by_row = {s.row_index: s for s in samples}
        assert by_row[0].prompt == "<|system|>be brief\n<|user|>reverse abc\n<|assistant|>"
        assert by_row[0].ground_truth == "cba" and by_row[0].chat
        assert by_row[1].prompt == "<|system|>be brief\n<|user|>reverse fed\n<|assistant|>"
        assert by_row[1].ground_truth == "def"


def test_messages_and_plain_prompt_completion_still_work(tokenizer):
    chat = {"messages": [{"role": "user", "content": "reverse ab"},
                         {"role": "assistant", "content": "ba"}]}
    sample = Sampler([chat], config(sample_count=1), tokenizer).samples[0]
    assert (sample.prompt, sample.ground_truth) == ("<|user|>reverse ab\n<|assistant|>", "ba")
    plain = Sampler([{"prompt": "reverse ab =", "completion": " ba"}], config(sample_count=1),
                    tokenizer).samples[0]
    assert (plain.prompt, plain.ground_truth, plain.chat) == ("reverse ab =", " ba", False)
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]}
    assert Sampler([parts], config(sample_count=1), tokenizer).samples[0].ground_truth == "yo"


def test_trailing_eos_of_a_ground_truth_is_dropped(tokenizer):
    row = {"prompt": "reverse ab =", "completion": " ba</s>"}
    assert Sampler([row], config(sample_count=1), tokenizer).samples[0].ground_truth == " ba"
    with pytest.raises(SampleFormatError, match=r"^dataset row 0: the ground truth is only "
                       r"the EOS token '</s>'$"):
        Sampler([{"prompt": "x", "completion": "</s>"}], config(sample_count=1), tokenizer)


# ----- refused rows, each naming the row and the field -----

@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": None, "completion": "x"}, "field 'prompt' is missing (None)"),
    ({"prompt": "p", "completion": None}, "field 'completion' is missing (None)"),
    ({"instruction": "i", "input": "", "output": None}, "field 'output' is missing (None)"),
    ({"question": None, "answer": "a"}, "field 'question' is missing (None)"),
    ({"text": None}, "field 'text' is missing (None)"),
    ({"prompt": {"a": 1}, "completion": "x"}, "field 'prompt' is a dict, not text"),
    ({"prompt": " ", "completion": "x"}, "the prompt is empty"),
    ({"prompt": "p", "completion": ""}, "the ground truth is empty"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
     "messages[0] is a user turn without content"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": None},
                   {"role": "assistant", "content": "a"}]},
     "messages[1] is a user turn without content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
     "messages[1] is an assistant turn without content (the ground truth would be empty)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
     "messages[1] is an assistant turn without content (the ground truth would be empty)"),
    ({"messages": [{"role": "assistant", "content": "a"}]},
     "messages: no turn before the assistant answer"),
    ({**conversational("ab"), "completion": [{"role": "assistant", "content": " "}]},
     "completion[0] is an assistant turn without content (the ground truth would be empty)"),
    ({**conversational("ab"), "completion": [{"role": "user", "content": "more"}]},
     "completion has no assistant turn (the ground truth)"),
    ({"prompt": [{"role": "user", "content": ""}], "completion": [
        {"role": "assistant", "content": "a"}]}, "prompt[0] is a user turn without content"),
])
def test_a_bad_row_is_refused_at_construction_with_row_and_field(tokenizer, row, message):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [good, good, row] if "messages" in row else [row]
    index = len(rows) - 1
    expected = f"^dataset row {index}: " + re.escape(message) + "$"
    with pytest.raises(SampleFormatError, match=expected):
        PredictionsCallback(config(sample_count=len(rows)), dataset=rows, tokenizer=tokenizer)
    with pytest.raises(SampleFormatError, match=expected):
        PredictionsCallback(config(sample_count=len(rows)),
                            dataset=datasets.Dataset.from_list(rows))


def test_none_in_a_datasets_dataset_is_refused_not_stored_as_text(tokenizer):
    dataset = datasets.Dataset.from_list([{"prompt": "a", "completion": "x"},
                                          {"prompt": "b", "completion": None}])
    with pytest.raises(SampleFormatError,
                       match=r"^dataset row 1: field 'completion' is missing \(None\)$"):
        PredictionsCallback(config(sample_count=2), dataset=dataset, tokenizer=tokenizer)


def test_numbers_are_text():
    sample = Sampler([{"question": "2+2?", "answer": 4}], config(sample_count=1)).samples[0]
    assert (sample.prompt, sample.ground_truth) == ("2+2?\n", "4")


# ----- datasets that are not a list of good rows -----

def test_empty_dataset_and_dataset_dict_are_refused(tokenizer):
    for empty in ([], datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}]).select([])):
        with pytest.raises(SampleFormatError, match=r"^the prediction dataset is empty$"):
            PredictionsCallback(config(), dataset=empty, tokenizer=tokenizer)
    splits = datasets.DatasetDict({"test": datasets.Dataset.from_list(reversal_rows(3)),
                                   "train": datasets.Dataset.from_list(reversal_rows(3))})
    with pytest.raises(SampleFormatError, match=r"^the dataset is a DatasetDict with keys "
                       r"\['test', 'train'\]: pass one split, e.g. dataset\['test'\]$"):
        PredictionsCallback(config(), dataset=splits)
    with pytest.raises(SampleFormatError, match=r"^a int is not a dataset"):
        PredictionsCallback(config(), dataset=3)


def test_streaming_dataset_draws_from_its_first_rows(tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="trainer_client")
    rows = reversal_rows(50)
    stream = datasets.Dataset.from_list(rows).to_iterable_dataset()
    cfg = config(sample_count=4, stream_sample_rows=10)
    callback = PredictionsCallback(cfg, dataset=stream, tokenizer=tokenizer)
    mapped = Sampler(rows[:10], cfg, tokenizer).samples
    assert callback.sampler.samples == mapped
    assert all(s.row_index < 10 for s in mapped)
    assert callback.sampler.describe() == {"sample_rows": [s.row_index for s in mapped],
                                           "streamed": True}
    assert ("streaming dataset (IterableDataset): drawing the 4-row sample from its first 10 "
            "rows (stream_sample_rows=10)") in caplog.text
    generator_rows = iter(rows[:3])
    drawn = Sampler(generator_rows, cfg, tokenizer).samples
    assert sorted(s.row_index for s in drawn) == [0, 1, 2]
    with pytest.raises(SampleFormatError, match=r"^the prediction dataset is empty \(the "
                       r"stream gave no rows\)$"):
        Sampler(iter([]), cfg, tokenizer)


# ----- defaults: eval_dataset, GenerationConfig, model name -----

def test_attach_uses_the_trainers_eval_dataset(tmp_path, tokenizer):
    eval_rows = reversal_rows(6, seed=11)
    model = build_model(tokenizer)
    trainer = make_trainer(model, tokenizer, train_features(tokenizer, reversal_rows(8)),
                           tmp_path / "out", [])
    trainer.eval_dataset = eval_rows
    callback = PredictionsCallback(config(sample_count=3), tokenizer=tokenizer).attach(trainer)
    assert callback in trainer.callback_handler.callbacks
    assert [s.prompt for s in callback.sampler.samples] == [
        eval_rows[s.row_index]["prompt"] for s in callback.sampler.samples]
    assert callback.attach(trainer) is callback
    assert trainer.callback_handler.callbacks.count(callback) == 1
    trainer.eval_dataset = {"a": eval_rows, "b": eval_rows}
    with pytest.raises(ValueError, match=r"eval_dataset is a dict of \['a', 'b'\]"):
        PredictionsCallback(config()).attach(trainer)
    trainer.eval_dataset = None
    with pytest.raises(ValueError, match="no dataset and the trainer has no eval_dataset"):
        PredictionsCallback(config()).attach(trainer)


def test_no_dataset_at_train_begin_is_a_clear_error(tmp_path, tokenizer):
    model = build_model(tokenizer)
    callback = PredictionsCallback(config(sample_count=2, measure_speed=False))
    trainer = make_trainer(model, tokenizer, train_features(tokenizer, reversal_rows(8)),
                           tmp_path / "out", [callback], epochs=1)
    with pytest.raises(ValueError, match=r"has no dataset: pass dataset=\.\.\., or call "
                       r"callback\.attach\(trainer\)"):
        trainer.train()


def test_generation_config_maps_onto_the_generator(tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="trainer_client")
    gen = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.5, top_p=0.9,
                           top_k=7, repetition_penalty=1.1, eos_token_id=2)
    callback = PredictionsCallback(config(), dataset=reversal_rows(5), generation_config=gen)
    cfg = callback.config
    assert (cfg.max_new_tokens, cfg.greedy, cfg.temperature, cfg.top_p, cfg.top_k,
            cfg.repetition_penalty) == (12, False, 0.5, 0.9, 7, 1.1)
    kwargs = Generator(cfg, tokenizer)._generation_kwargs(cfg.max_new_tokens)
    assert {k: kwargs[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p",
                                   "top_k", "repetition_penalty")} == {
        "max_new_tokens": 12, "do_sample": True, "temperature": 0.5, "top_p": 0.9, "top_k": 7,
        "repetition_penalty": 1.1}
    assert "generation_config: eos_token_id ignored" in caplog.text
    greedy = PredictionsCallback(config(sample_count=2), dataset=reversal_rows(5),
                                 generation_config=GenerationConfig(do_sample=False)).config
    assert (greedy.greedy, greedy.max_new_tokens, greedy.sample_count) == (True, 256, 2)
    with pytest.raises(ValueError, match=r"generation_config sets \['max_length', "
                       r"'num_beams'\], which predictions do not support"):
        PredictionsCallback(config(), dataset=reversal_rows(5),
                            generation_config=GenerationConfig(num_beams=3, max_length=30))
    with pytest.raises(ValueError, match="must be a transformers.GenerationConfig, not a dict"):
        PredictionsCallback(config(), dataset=reversal_rows(5),
                            generation_config={"max_new_tokens": 3})


def test_model_name_comes_from_name_or_path_before_the_class(tokenizer):
    callback = PredictionsCallback(config(), dataset=reversal_rows(5))
    model = build_model(tokenizer)
    assert callback._model_name(model) == "LlamaForCausalLM"
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert callback._model_name(lora) == "LlamaForCausalLM"
    model.config._name_or_path = "org/tiny-llama"
    assert callback._model_name(model) == "org/tiny-llama"
    assert callback._model_name(lora) == "org/tiny-llama"
    named = PredictionsCallback(config(), dataset=reversal_rows(5), model_name="mine")
    assert named._model_name(lora) == "mine"
