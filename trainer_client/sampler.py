"""Draws the fixed prediction sample from a dataset and extracts prompt and ground truth.

Formats recognised (by the columns of a row, first match wins):

- chat: ``messages`` (list of {role, content}); the prompt is every turn before
  the last assistant turn, rendered with the tokenizer's chat template and a
  generation prompt; the ground truth is that last assistant turn (a
  conversation without an assistant turn is a prompt without ground truth).
- conversational prompt/completion (TRL): ``prompt`` and ``completion`` both
  lists of messages; the prompt turns are rendered with the chat template and a
  generation prompt, the ground truth is the completion's last assistant turn.
- ``prompt`` / ``completion`` (text).
- ``instruction`` / ``input`` / ``output`` (``input`` optional: missing, None or
  blank means no input), through the configured templates.
- ``question`` / ``answer``, through the configured template.
- ``text``: the whole text is the prompt, there is no ground truth.

Every drawn row is checked at construction, and a row that cannot give a real
prompt and ground truth is refused with SampleFormatError naming the dataset
row and the field: a missing (None) or non-text value, an empty prompt or user
turn, an empty ground truth or an assistant turn without content. Numbers are
accepted as text (an answer of 4 is "4"). The tokenizer's EOS text at the end of
a ground truth is dropped (TRL appends it to completions; predictions are
decoded without special tokens).

Datasets: any map-style dataset (a list of dicts, a ``datasets.Dataset``). An
empty one, or a ``DatasetDict`` (pick a split), is refused. A streaming dataset
(``datasets.IterableDataset`` or any iterable without a length) is read once:
its first ``stream_sample_rows`` rows are taken and the sample is drawn from
them, which is logged.

The draw is made once, reproducibly from the configured seed; sample_index is
the position in the draw and stays the same at every pass.
"""

import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from trainer_client.config import PredictionsConfig

log = logging.getLogger(__name__)

Formatter = Callable[[Mapping[str, Any]], tuple[str, str | None]]
Messages = list[Mapping[str, Any]]


class SampleFormatError(ValueError):
    """A dataset (or one of its rows) cannot give prompts and ground truths."""


@dataclass(frozen=True)
class Sample:
    """One example of the fixed sample: what is generated from and compared against."""

    sample_index: int
    row_index: int
    prompt: str
    ground_truth: str | None
    chat: bool


@dataclass(frozen=True)
class ParsedRow:
    """A row's prompt (text, or chat turns still to render) and ground truth, checked."""

    row_index: int
    prompt: str | Messages
    ground_truth: str | None

    @property
    def chat(self) -> bool:
        return not isinstance(self.prompt, str)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, Mapping) and "role" in m for m in value)


def detect_format(row: Mapping[str, Any]) -> str:
    """The format name of a row, or SampleFormatError listing what is supported."""
    if not isinstance(row, Mapping):
        raise SampleFormatError(f"a row is a {type(row).__name__}, not a mapping of columns")
    if isinstance(row.get("messages"), list):
        return "chat"
    if "prompt" in row and "completion" in row:
        if _is_messages(row["prompt"]) or _is_messages(row["completion"]):
            return "conversational_prompt_completion"
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "instruction"
    if "question" in row and "answer" in row:
        return "question_answer"
    if "text" in row:
        return "text"
    raise SampleFormatError(
        f"unknown dataset format: columns {sorted(row)}; supported: messages (chat), "
        "prompt/completion (text or conversational), instruction/input/output, "
        "question/answer, text (or pass formatter=...)")


def field_text(row: Mapping[str, Any], field: str) -> str:
    """The text of a scalar column; None, lists and mappings are refused by name."""
    value = row.get(field)
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(value)
    what = ("missing (None)" if value is None else f"{value}, not text"
            if isinstance(value, float) else f"a {type(value).__name__}, not text")
    raise SampleFormatError(f"field {field!r} is {what}")


def _content_text(turn: Mapping[str, Any]) -> str:
    """The text of a turn's content: a string, or the text parts of a list of parts."""
    content = turn.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content
                       if isinstance(p, Mapping) and p.get("type") == "text")
    return ""


def _check_turns(turns: Any, field: str) -> Messages:
    """Chat turns with a role each and no empty user turn; refused by position otherwise."""
    if not _is_messages(turns):
        raise SampleFormatError(f"field {field!r} is not a non-empty list of messages "
                                "({role, content})")
    for position, turn in enumerate(turns):
        if turn.get("role") == "user" and not _content_text(turn).strip():
            raise SampleFormatError(f"{field}[{position}] is a user turn without content")
    return list(turns)


def _assistant_answer(turns: Messages, field: str, offset: int = 0) -> tuple[int | None, str]:
    """Position and text of the last assistant turn (None, "" when there is none)."""
    last = max((i for i, m in enumerate(turns) if m.get("role") == "assistant"), default=None)
    if last is None:
        return None, ""
    text = _content_text(turns[last])
    if not text.strip():
        raise SampleFormatError(f"{field}[{last + offset}] is an assistant turn without "
                                "content (the ground truth would be empty)")
    return last, text


def _parse_chat(row: Mapping[str, Any]) -> tuple[Messages, str | None]:
    turns = _check_turns(row["messages"], "messages")
    last, truth = _assistant_answer(turns, "messages")
    history = turns if last is None else turns[:last]
    if not history:
        raise SampleFormatError("messages: no turn before the assistant answer")
    return history, (None if last is None else truth)


def _parse_conversational(row: Mapping[str, Any]) -> tuple[Messages, str]:
    prompt = _check_turns(row["prompt"], "prompt")
    completion = _check_turns(row["completion"], "completion")
    last, truth = _assistant_answer(completion, "completion")
    if last is None:
        raise SampleFormatError("completion has no assistant turn (the ground truth)")
    return prompt, truth


class PromptExtractor:
    """Turns a row of a known format into a checked ParsedRow (no tokenizer needed)."""

    def __init__(self, config: PredictionsConfig, formatter: Formatter | None = None) -> None:
        self._config = config
        self._formatter = formatter

    def parse(self, row_index: int, row: Mapping[str, Any]) -> ParsedRow:
        try:
            prompt, truth = self._extract(row)
            if isinstance(prompt, str) and not prompt.strip():
                raise SampleFormatError("the prompt is empty")
            if truth is not None and not truth.strip():
                raise SampleFormatError("the ground truth is empty")
        except SampleFormatError as exc:
            raise SampleFormatError(f"dataset row {row_index}: {exc}") from exc
        return ParsedRow(row_index, prompt, truth)

    def _extract(self, row: Mapping[str, Any]) -> tuple[str | Messages, str | None]:
        if self._formatter is not None:
            prompt, truth = self._formatter(row)
            return field_text({"prompt": prompt}, "prompt"), (
                None if truth is None else field_text({"ground_truth": truth}, "ground_truth"))
        kind = detect_format(row)
        if kind == "chat":
            return _parse_chat(row)
        if kind == "conversational_prompt_completion":
            return _parse_conversational(row)
        if kind == "prompt_completion":
            return field_text(row, "prompt"), field_text(row, "completion")
        if kind == "instruction":
            return self._instruction(row), field_text(row, "output")
        if kind == "question_answer":
            question = field_text(row, "question")
            return self._config.question_template.format(question=question), \
                field_text(row, "answer")
        return field_text(row, "text"), None

    def _instruction(self, row: Mapping[str, Any]) -> str:
        instruction = field_text(row, "instruction")
        extra = row.get("input")
        extra = "" if extra is None else field_text(row, "input")
        if extra.strip():
            return self._config.instruction_template.format(instruction=instruction,
                                                            input=extra)
        return self._config.instruction_only_template.format(instruction=instruction)


def _map_style(dataset: Any) -> bool:
    return hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


def _rows_of(dataset: Any, config: PredictionsConfig) -> tuple[Sequence[Any], bool]:
    """Indexable rows of the dataset and whether it was read from a stream."""
    if dataset is None:
        raise SampleFormatError("no prediction dataset (pass dataset=...)")
    if isinstance(dataset, Mapping):
        raise SampleFormatError(f"the dataset is a {type(dataset).__name__} with keys "
                                f"{sorted(map(str, dataset))}: pass one split, e.g. "
                                "dataset['test']")
    if _map_style(dataset):
        return dataset, False
    if not isinstance(dataset, Iterable):
        raise SampleFormatError(f"a {type(dataset).__name__} is not a dataset: pass a list of "
                                "rows, a datasets.Dataset or an IterableDataset")
    rows = list(islice(iter(dataset), config.stream_sample_rows))
    log.info("streaming dataset (%s): drawing the %d-row sample from its first %d rows "
             "(stream_sample_rows=%d)", type(dataset).__name__,
             min(config.sample_count, len(rows)), len(rows), config.stream_sample_rows)
    return rows, True


class SampleDraw:
    """The rows drawn once (seeded) from a dataset, parsed and checked; no tokenizer needed.

    Construction fails with SampleFormatError when the dataset is empty or not a dataset,
    or when a drawn row cannot give a prompt and a ground truth.
    """

    def __init__(self, dataset: Any, config: PredictionsConfig,
                 formatter: Formatter | None = None) -> None:
        rows, streamed = _rows_of(dataset, config)
        size = len(rows)
        if size == 0:
            raise SampleFormatError("the prediction dataset is empty"
                                    + (" (the stream gave no rows)" if streamed else ""))
        count = min(config.sample_count, size)
        if count < config.sample_count:
            log.warning("dataset has %d rows, fewer than sample_count=%d: using all of them",
                        size, config.sample_count)
        chosen = random.Random(config.seed).sample(range(size), count)
        extractor = PromptExtractor(config, formatter)
        self.rows: list[ParsedRow] = [extractor.parse(i, rows[i]) for i in chosen]
        self.streamed = streamed


class Sampler:
    """Picks sample_count rows once (seeded) and keeps their prompts for every pass.

    `dataset` is a dataset or a SampleDraw already made from one (so that a stream is read
    once). Chat prompts are rendered with the tokenizer's chat template here.
    """

    def __init__(self, dataset: Any, config: PredictionsConfig, tokenizer: Any = None,
                 formatter: Formatter | None = None) -> None:
        self.draw = (dataset if isinstance(dataset, SampleDraw)
                     else SampleDraw(dataset, config, formatter))
        eos = getattr(tokenizer, "eos_token", None)
        self.samples: list[Sample] = [
            Sample(index, row.row_index, _render(row, tokenizer), _strip_eos(row, eos), row.chat)
            for index, row in enumerate(self.draw.rows)]

    def describe(self) -> dict:
        """What to store with the run: which dataset rows the sample indices point to."""
        return {"sample_rows": [s.row_index for s in self.samples],
                "streamed": self.draw.streamed}


def _render(row: ParsedRow, tokenizer: Any) -> str:
    if isinstance(row.prompt, str):
        return row.prompt
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise SampleFormatError(f"dataset row {row.row_index}: chat rows need a tokenizer "
                                "with a chat_template")
    return tokenizer.apply_chat_template(row.prompt, tokenize=False, add_generation_prompt=True)


def _strip_eos(row: ParsedRow, eos: str | None) -> str | None:
    """The ground truth without the tokenizer's EOS text at its end (TRL appends it)."""
    text = row.ground_truth
    if text is None or not eos or not text.endswith(eos):
        return text
    text = text[:-len(eos)]
    if not text.strip():
        raise SampleFormatError(f"dataset row {row.row_index}: the ground truth is only the "
                                f"EOS token {eos!r}")
    return text
