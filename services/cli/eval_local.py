"""Responses from a local Hugging Face model (and PEFT LoRA adapter) for `epochlens eval
--model PATH [--adapter PATH]`, generated in batches by the trainer client's Generator
(left-padded batches, autocast matching the chosen precision, a failing batch retried one
prompt at a time). torch, transformers and peft are imported only here, only when --model
is given."""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.cli.eval_data import EvalRow
from trainer_client.config import PredictionsConfig
from trainer_client.results import GenerationResult
from trainer_client.sampler import Sample

log = logging.getLogger(__name__)

AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


class LocalModelError(RuntimeError):
    """The model, tokenizer or adapter could not be loaded (exit status 2)."""


class LocalGenerator:
    """A loaded model + tokenizer and the trainer client's Generator around them."""

    def __init__(self, model_path: Path, adapter_path: Path | None, batch_size: int,
                 max_new_tokens: int, precision: str, device: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from trainer_client.generator import Generator

        self.device = _device(torch, device)
        self.autocast = _autocast_dtype(torch, precision, self.device)
        # On a GPU the weights are loaded in the autocast precision (half the memory of fp32);
        # on the CPU in fp32.
        weights = self.autocast if self.device.type == "cuda" and self.autocast else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
            model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=weights)
            if adapter_path is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(adapter_path))
        except (OSError, ValueError) as exc:
            raise LocalModelError(f"cannot load {model_path}"
                                  f"{f' with adapter {adapter_path}' if adapter_path else ''}: "
                                  f"{exc}") from None
        self.model = model.to(self.device)
        config = PredictionsConfig(generation_batch_size=batch_size,
                                   max_new_tokens=max_new_tokens)
        self._generator = Generator(config, self.tokenizer)

    def generate(self, rows: Sequence[EvalRow]) -> list[GenerationResult]:
        """One result per row, in order; a failed row has `error` set (never raises)."""
        samples = [Sample(row.index, row.index, self.render(row), row.reference, row.chat)
                   for row in rows]
        return self._generator.generate(self.model, samples, self.autocast)

    def render(self, row: EvalRow) -> str:
        """The prompt text: chat turns through the tokenizer's chat template."""
        if isinstance(row.prompt, str):
            return row.prompt
        if not getattr(self.tokenizer, "chat_template", None):
            raise LocalModelError(f"dataset row {row.index} is a chat row and the tokenizer "
                                  "has no chat_template")
        return self.tokenizer.apply_chat_template(row.prompt, tokenize=False,
                                                  add_generation_prompt=True)

    @property
    def failed(self) -> int:
        return self._generator.counts["failed_samples"]


def _device(torch: Any, wanted: str) -> Any:
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def _autocast_dtype(torch: Any, precision: str, device: Any) -> Any:
    """None (fp32) or the autocast dtype; "auto" is bf16 on a GPU that supports it."""
    if precision == "auto":
        precision = ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported()
                     else "fp32")
    name = AUTOCAST.get(precision)
    return None if name is None else getattr(torch, name)
