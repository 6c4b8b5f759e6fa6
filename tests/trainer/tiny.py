"""A tiny causal LM built from config, a tokenizer trained on the spot, and toy datasets.

Nothing is downloaded: the tokenizer is a byte-level BPE trained with the
`tokenizers` library on the toy task's alphabet (a subword tokenizer, unlike the
demo's character-level one), the model a 2-layer Llama with hidden size 32 built
by trainer_client.toy (the demo's model builder). The task is reversing short
strings, so predictions have a checkable ground truth.
"""

import random
import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from trainer_client import toy

LETTERS = "abcdef"
CHAT_TEMPLATE = toy.CHAT_TEMPLATE


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE over the toy alphabet, with pad/bos/eos and a chat template."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [f"reverse {w} = {w[::-1]}" for w in _words(400, random.Random(0))]
    corpus += ["<|user|>", "<|assistant|>", "<|system|>", string.ascii_letters, "question answer"]
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return toy.model_config(tokenizer, hidden_size=32, layers=2, heads=4, mlp_ratio=2)


def build_model(tokenizer: PreTrainedTokenizerFast, cls=LlamaForCausalLM, seed: int = 0):
    return toy.build_model(model_config(tokenizer), seed, cls)


def _words(count: int, rng: random.Random) -> list[str]:
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5))) for _ in range(count)]


def reversal_rows(count: int, seed: int = 1) -> list[dict]:
    """prompt/completion rows of the reversal task."""
    return [{"prompt": f"reverse {w} =", "completion": f" {w[::-1]}"}
            for w in _words(count, random.Random(seed))]


def rows_in_format(fmt: str, count: int, seed: int = 2) -> list[dict]:
    """The reversal task written in one of the supported dataset formats."""
    words = _words(count, random.Random(seed))
    makers = {
        "chat": lambda w: {"messages": [{"role": "user", "content": f"reverse {w}"},
                                        {"role": "assistant", "content": w[::-1]}]},
        "prompt_completion": lambda w: {"prompt": f"reverse {w} =", "completion": w[::-1]},
        "instruction": lambda w: {"instruction": "reverse", "input": w, "output": w[::-1]},
        "question_answer": lambda w: {"question": f"reverse {w}?", "answer": w[::-1]},
        "text": lambda w: {"text": f"reverse {w} = {w[::-1]}"},
    }
    return [makers[fmt](w) for w in words]


def train_features(tokenizer: PreTrainedTokenizerFast, rows: list[dict]) -> list[dict]:
    """Tokenized training examples (prompt + completion + EOS) from prompt/completion rows."""
    return [{"input_ids": tokenizer(r["prompt"] + r["completion"])["input_ids"]
             + [tokenizer.eos_token_id]} for r in rows]


def make_trainer(model, tokenizer, features: list[dict], output_dir, callbacks: list,
                 epochs: float = 2, max_steps: int = -1, batch_size: int = 8, **overrides):
    """A real transformers.Trainer on CPU, quiet and without checkpoints."""
    args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs, max_steps=max_steps,
        per_device_train_batch_size=batch_size, learning_rate=overrides.pop("learning_rate", 5e-3),
        save_strategy="no", report_to=[], logging_strategy="no",
        use_cpu=overrides.pop("use_cpu", True),
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=0,
        **overrides)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return Trainer(model=model, args=args, train_dataset=features, data_collator=collator,
                   processing_class=tokenizer, callbacks=callbacks)
