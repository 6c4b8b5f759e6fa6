"""A toy world to watch a model learn in: a generated task, a tokenizer and a tiny model.

Nothing here is downloaded:

- ToyTask generates prompt/completion rows of a task whose answer can be checked
  exactly (reversing or sorting short strings over a small alphabet), with the
  training and evaluation words disjoint;
- build_tokenizer trains a character-level tokenizer on the spot with the
  `tokenizers` library (WordLevel model over single characters) and wraps it in
  a transformers PreTrainedTokenizerFast with pad/bos/eos and a chat template;
- build_model builds a small LlamaForCausalLM from a config, seeded.

The same rows work with any Hugging Face causal LM: train_features tokenizes them
with whatever tokenizer it is given and masks the prompt out of the loss.
"""

import random
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# Characters every toy tokenizer knows besides the task's own, so that other prompt
# formats (chat template, instruction templates) stay free of <unk>.
EXTRA_CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " \n"
IGNORE_INDEX = -100

ANSWERS: dict[str, Callable[[str], str]] = {
    "reverse": lambda word: word[::-1],
    "sort": lambda word: "".join(sorted(word)),
}


@dataclass(frozen=True)
class ToyTask:
    """Short random words over `alphabet`; the answer is the word reversed or sorted."""

    name: str
    alphabet: str
    min_length: int
    max_length: int

    def __post_init__(self) -> None:
        if self.name not in ANSWERS:
            raise ValueError(f"unknown toy task {self.name!r}; known: {sorted(ANSWERS)}")
        if len(set(self.alphabet)) != len(self.alphabet) or not self.alphabet:
            raise ValueError(f"alphabet {self.alphabet!r} must be non-empty without repeats")
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"word lengths must satisfy 1 <= min_length={self.min_length} "
                             f"<= max_length={self.max_length}")

    @property
    def word_count(self) -> int:
        """How many distinct words the task has."""
        size = len(self.alphabet)
        return sum(size ** n for n in range(self.min_length, self.max_length + 1))

    def answer(self, word: str) -> str:
        return ANSWERS[self.name](word)

    def row(self, word: str) -> dict[str, str]:
        """One prompt/completion row; the completion is the ground truth."""
        return {"prompt": f"{self.name} {word} =", "completion": f" {self.answer(word)}"}

    def distinct_words(self, count: int, seed: int) -> list[str]:
        """`count` different words, drawn reproducibly from `seed`."""
        if count > self.word_count:
            raise ValueError(f"{count} distinct words asked for, but the task has only "
                             f"{self.word_count} (alphabet {self.alphabet!r}, lengths "
                             f"{self.min_length}..{self.max_length})")
        rng, seen = random.Random(seed), {}
        while len(seen) < count:
            length = rng.randint(self.min_length, self.max_length)
            seen.setdefault("".join(rng.choice(self.alphabet) for _ in range(length)))
        return list(seen)

    def split(self, train_size: int, eval_size: int,
              seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """Training rows and evaluation rows, made of disjoint words."""
        words = self.distinct_words(train_size + eval_size, seed)
        rows = [self.row(word) for word in words]
        return rows[:train_size], rows[train_size:]


def build_tokenizer(corpus: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A character-level tokenizer trained on `corpus` plus EXTRA_CHARACTERS."""
    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, BOS, EOS, UNK])
    backend.train_from_iterator([*corpus, EXTRA_CHARACTERS], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS,
                                        pad_token=PAD, unk_token=UNK)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 32, layers: int = 2,
                 heads: int = 4, mlp_ratio: int = 4, max_positions: int = 128) -> LlamaConfig:
    """A small Llama config over the tokenizer's vocabulary (MLP mlp_ratio x hidden_size)."""
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                       intermediate_size=mlp_ratio * hidden_size, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_positions,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)


def build_model(config: LlamaConfig, seed: int = 0, cls: type = LlamaForCausalLM):
    """A freshly initialised model of `cls`; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return cls(config)


def train_features(tokenizer, rows: Sequence[dict[str, str]],
                   mask_prompt: bool = True) -> list[dict[str, list[int]]]:
    """Tokenized prompt + completion + EOS; with mask_prompt the loss sees the completion only.

    The prompt is tokenized exactly as the generator tokenizes it (special tokens
    included), so that training and generation agree on where the answer starts.
    """
    features = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        answer = [*answer, tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * len(prompt) if mask_prompt else list(prompt)
        ids = prompt + answer
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": labels + answer})
    return features
