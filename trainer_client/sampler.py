"""Draws the fixed prediction sample from a dataset and extracts prompt and ground truth.

Formats recognised (by the columns of a row, first match wins):

- chat: ``messages`` (list of {role, content}); the prompt is every turn before
  the last assistant turn, rendered with the tokenizer's chat template and a
  generation prompt; the ground truth is that last assistant turn.
- ``prompt`` / ``completion``.
- ``instruction`` / ``input`` / ``output`` (``input`` optional), through the
  configured templates.
- ``question`` / ``answer``, through the configured template.
- ``text``: the whole text is the prompt, there is no ground truth.

The draw is made once, reproducibly from the configured seed; sample_index is
the position in the draw and stays the same at every pass.
"""

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trainer_client.config import PredictionsConfig

log = logging.getLogger(__name__)

Formatter = Callable[[Mapping[str, Any]], tuple[str, str | None]]


class SampleFormatError(ValueError):
    """A dataset row matches none of the supported formats."""


@dataclass(frozen=True)
class Sample:
    """One example of the fixed sample: what is generated from and compared against."""

    sample_index: int
    row_index: int
    prompt: str
    ground_truth: str | None
    chat: bool


def detect_format(row: Mapping[str, Any]) -> str:
    """The format name of a row, or SampleFormatError listing what is supported."""
    if isinstance(row.get("messages"), list):
        return "chat"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "instruction"
    if "question" in row and "answer" in row:
        return "question_answer"
    if "text" in row:
        return "text"
    raise SampleFormatError(
        f"unknown dataset format: columns {sorted(row)}; supported: messages (chat), "
        "prompt/completion, instruction/input/output, question/answer, text "
        "(or pass formatter=...)")


class PromptExtractor:
    """Turns a row of a known format into (prompt, ground truth, is_chat)."""

    def __init__(self, config: PredictionsConfig, tokenizer: Any = None,
                 formatter: Formatter | None = None) -> None:
        self._config = config
        self._tokenizer = tokenizer
        self._formatter = formatter

    def extract(self, row: Mapping[str, Any]) -> tuple[str, str | None, bool]:
        if self._formatter is not None:
            prompt, truth = self._formatter(row)
            return prompt, truth, False
        kind = detect_format(row)
        if kind == "chat":
            prompt, truth = self._chat(row["messages"])
            return prompt, truth, True
        if kind == "prompt_completion":
            return _text(row["prompt"]), _text(row["completion"]), False
        if kind == "instruction":
            return self._instruction(row), _text(row["output"]), False
        if kind == "question_answer":
            prompt = self._config.question_template.format(question=_text(row["question"]))
            return prompt, _text(row["answer"]), False
        return _text(row["text"]), None, False

    def _instruction(self, row: Mapping[str, Any]) -> str:
        extra = _text(row.get("input") or "")
        if extra.strip():
            return self._config.instruction_template.format(
                instruction=_text(row["instruction"]), input=extra)
        return self._config.instruction_only_template.format(
            instruction=_text(row["instruction"]))

    def _chat(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
        if self._tokenizer is None or not getattr(self._tokenizer, "chat_template", None):
            raise SampleFormatError("chat rows (messages) need a tokenizer with a chat_template")
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"),
                   default=None)
        history = list(messages) if last is None else list(messages[:last])
        if not history:
            raise SampleFormatError("a chat row needs at least one turn before the answer")
        truth = None if last is None else _text(messages[last].get("content", ""))
        prompt = self._tokenizer.apply_chat_template(history, tokenize=False,
                                                     add_generation_prompt=True)
        return prompt, truth


class Sampler:
    """Picks sample_count rows once (seeded) and keeps their prompts for every pass."""

    def __init__(self, dataset: Any, config: PredictionsConfig, tokenizer: Any = None,
                 formatter: Formatter | None = None) -> None:
        size = len(dataset)
        if size == 0:
            raise SampleFormatError("the prediction dataset is empty")
        count = min(config.sample_count, size)
        if count < config.sample_count:
            log.warning("dataset has %d rows, fewer than sample_count=%d: using all of them",
                        size, config.sample_count)
        rows = random.Random(config.seed).sample(range(size), count)
        extractor = PromptExtractor(config, tokenizer, formatter)
        self.samples: list[Sample] = [
            self._make(index, row_index, dataset[row_index], extractor)
            for index, row_index in enumerate(rows)]

    @staticmethod
    def _make(index: int, row_index: int, row: Mapping[str, Any],
              extractor: PromptExtractor) -> Sample:
        try:
            prompt, truth, chat = extractor.extract(row)
        except SampleFormatError as exc:
            raise SampleFormatError(f"dataset row {row_index}: {exc}") from exc
        if not prompt.strip():
            raise SampleFormatError(f"dataset row {row_index}: the prompt is empty")
        return Sample(index, row_index, prompt, truth, chat)

    def describe(self) -> dict:
        """What to store with the run: which dataset rows the sample indices point to."""
        return {"sample_rows": [s.row_index for s in self.samples]}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)
