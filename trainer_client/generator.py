"""Batched, left-padded generation that is safe to run from inside a training loop.

What the GPU measurements in DESIGN.md decided:

- generate runs inside ``torch.autocast(device_type, dtype=<the trainer's bf16
  or fp16>)``; PEFT models cast the TRL way (LoRA layers bf16, norms fp32) fail
  on every sample without it, and disabling autocast does not help;
- prompts are generated in left-padded batches (3x to 30x faster than one by one);
- everything touched is restored afterwards: train/eval mode, gradient
  checkpointing flags, ``config.use_cache``, the tokenizer's padding and
  truncation sides and pad token, and the global RNG state.

Under FSDP2 the parameters are gathered once per pass and generation then runs
with no collective (trainer_client.distributed.full_parameters); DeepSpeed ZeRO-3
is refused with an ERROR (untested here, and it would deadlock).

A batch that raises is retried one prompt at a time so that a single bad sample
cannot take the others down; a sample that still fails is logged at ERROR with
its context and counted. Nothing here raises into the training loop.
"""

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from trainer_client import distributed
from trainer_client.config import PredictionsConfig
from trainer_client.results import GenerationResult
from trainer_client.sampler import Sample

log = logging.getLogger(__name__)

ZERO3_REFUSED = ("DeepSpeed ZeRO-3 partitions this model's parameters; predictions under "
                 "ZeRO-3 are not supported (see docs/ARCHITECTURE.md, trainer side)")


def trainer_autocast_dtype(args: Any) -> torch.dtype | None:
    """The autocast dtype matching TrainingArguments (bf16 / fp16), None for fp32."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return None


def model_device(model: Any) -> torch.device:
    """Where the model's inputs go (its first parameter's device when it has no .device)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def dtype_summary(model: Any) -> str:
    """Parameter dtypes with their counts, e.g. 'torch.bfloat16:120, torch.float32:41'."""
    counts = Counter(str(p.dtype) for p in model.parameters())
    return ", ".join(f"{name}:{count}" for name, count in sorted(counts.items()))


class _GenerationMode:
    """Puts model and tokenizer in generation state and restores every change on exit."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._saved: dict[str, Any] = {}
        self._checkpointed: list[Any] = []

    def __enter__(self) -> "_GenerationMode":
        model, tok = self._model, self._tokenizer
        self._saved = {"modes": [(m, m.training) for m in model.modules()],
                       "padding_side": tok.padding_side,
                       "truncation_side": tok.truncation_side, "pad_token": tok.pad_token}
        config = getattr(model, "config", None)
        self._saved["use_cache"] = getattr(config, "use_cache", None)
        self._checkpointed = [m for m in model.modules()
                              if getattr(m, "gradient_checkpointing", False) is True]
        for module in self._checkpointed:
            module.gradient_checkpointing = False
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = True
        model.eval()
        tok.padding_side, tok.truncation_side = "left", "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return self

    def __exit__(self, *exc_info: object) -> None:
        model, tok, saved = self._model, self._tokenizer, self._saved
        for module, training in saved["modes"]:
            module.training = training
        for module in self._checkpointed:
            module.gradient_checkpointing = True
        config = getattr(model, "config", None)
        if saved["use_cache"] is not None:
            config.use_cache = saved["use_cache"]
        tok.padding_side, tok.truncation_side = saved["padding_side"], saved["truncation_side"]
        if saved["pad_token"] is None:
            tok.pad_token = None


class Generator:
    """Generates predictions for samples; counts what failed instead of raising."""

    def __init__(self, config: PredictionsConfig, tokenizer: Any) -> None:
        self._config = config
        self._tokenizer = tokenizer
        self.counts: Counter[str] = Counter()
        self._stop_ids: frozenset[int] = frozenset()

    @property
    def batch_size(self) -> int:
        return self._config.generation_batch_size

    def generate(self, model: Any, samples: Sequence[Sample], autocast_dtype: torch.dtype | None,
                 seed_offset: int = 0, max_new_tokens: int | None = None
                 ) -> list[GenerationResult]:
        """One result per sample, in order. Never raises (failures are in result.error).

        Under FSDP2 this is a collective: every rank calls it at every pass, also a rank
        with no samples, because the parameters are gathered once for the pass
        (distributed.full_parameters) and generation then runs without collectives.
        """
        if distributed.zero3_partitioned(model):
            return self._refuse_zero3(samples)
        try:
            with distributed.full_parameters(model):
                if not samples:
                    return []
                return self._generate_all(model, samples, autocast_dtype, seed_offset,
                                          max_new_tokens or self._config.max_new_tokens)
        except Exception as exc:  # setup or restore failed: every sample of this pass fails
            self.counts["failed_passes"] += 1
            log.error("predictions pass failed outside generation (%d samples lost at this "
                      "pass, %d passes failed so far): %s: %s", len(samples),
                      self.counts["failed_passes"], type(exc).__name__, exc, exc_info=True)
            return [_failed(s, exc) for s in samples]

    def _refuse_zero3(self, samples: Sequence[Sample]) -> list[GenerationResult]:
        """DeepSpeed ZeRO-3 is untested here and its forward passes are collectives that
        would deadlock on uneven generation: every sample fails with the reason, loudly."""
        self.counts["refused_passes"] += 1
        reason = RuntimeError(ZERO3_REFUSED)
        log.error("%s (%d samples not generated at this pass, %d passes refused so far)",
                  ZERO3_REFUSED, len(samples), self.counts["refused_passes"])
        return [_failed(s, reason) for s in samples]

    def _generate_all(self, model: Any, samples: Sequence[Sample],
                      autocast_dtype: torch.dtype | None, seed_offset: int,
                      max_new_tokens: int) -> list[GenerationResult]:
        device = model_device(model)
        self._stop_ids = _stop_token_ids(model, self._tokenizer)
        results: list[GenerationResult] = []
        with _GenerationMode(model, self._tokenizer), _forked_rng(device), torch.no_grad():
            torch.manual_seed(self._config.seed + seed_offset)
            with _autocast(device, autocast_dtype):
                for start in range(0, len(samples), self._config.generation_batch_size):
                    batch = samples[start:start + self._config.generation_batch_size]
                    results.extend(self._run_batch(model, batch, device, max_new_tokens))
        return results

    def _run_batch(self, model: Any, batch: Sequence[Sample], device: torch.device,
                   max_new_tokens: int) -> list[GenerationResult]:
        try:
            return self._generate_batch(model, batch, device, max_new_tokens)
        except Exception as exc:
            if len(batch) == 1:
                return [self._fail(model, batch[0], device, exc)]
            self.counts["batches_retried"] += 1
            log.warning("a generation batch of %d samples failed (%s: %s); retrying one by "
                        "one", len(batch), type(exc).__name__, exc)
        results = []
        for sample in batch:
            try:
                results.extend(self._generate_batch(model, [sample], device, max_new_tokens))
            except Exception as exc:
                results.append(self._fail(model, sample, device, exc))
        return results

    def _generate_batch(self, model: Any, batch: Sequence[Sample], device: torch.device,
                        max_new_tokens: int) -> list[GenerationResult]:
        started = time.perf_counter()
        encoded = self._encode(batch, device)
        output = model.generate(input_ids=encoded["input_ids"],
                                attention_mask=encoded["attention_mask"],
                                **self._generation_kwargs(max_new_tokens))
        elapsed_ms = (time.perf_counter() - started) * 1000.0 / len(batch)
        width = encoded["input_ids"].shape[1]
        prompt_lengths = encoded["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, sample in enumerate(batch):
            text, count = self._decode(output[row, width:])
            self.counts["generated"] += 1
            results.append(GenerationResult(sample.sample_index, sample.prompt,
                                            sample.ground_truth, text, elapsed_ms,
                                            int(prompt_lengths[row]), count))
        return results

    def _encode(self, batch: Sequence[Sample], device: torch.device) -> dict:
        texts = [s.prompt for s in batch]
        special = not batch[0].chat
        encoded = self._tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                  max_length=self._config.max_prompt_tokens,
                                  add_special_tokens=special)
        return {key: value.to(device) for key, value in encoded.items()}

    def _generation_kwargs(self, max_new_tokens: int) -> dict:
        cfg = self._config
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "use_cache": True,
                                  "pad_token_id": self._tokenizer.pad_token_id,
                                  "eos_token_id": sorted(self._stop_ids),
                                  "do_sample": not cfg.greedy,
                                  # Generation is local to each rank (under FSDP2 on
                                  # parameters gathered for the pass): no lockstep.
                                  "synced_gpus": False}
        if not cfg.greedy:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
            if cfg.top_k is not None:
                kwargs["top_k"] = cfg.top_k
        if cfg.repetition_penalty is not None:
            kwargs["repetition_penalty"] = cfg.repetition_penalty
        return kwargs

    def _decode(self, new_ids: torch.Tensor) -> tuple[str, int]:
        """Text of the new tokens up to the first stop token, and how many tokens that was.

        A model that stops at once yields "" (the writer accepts empty predictions).
        """
        ids = new_ids.tolist()
        end = next((i for i, token in enumerate(ids) if token in self._stop_ids), len(ids))
        return self._tokenizer.decode(ids[:end], skip_special_tokens=True), end

    def _fail(self, model: Any, sample: Sample, device: torch.device,
              exc: Exception) -> GenerationResult:
        self.counts["failed_samples"] += 1
        log.error(
            "generation failed for sample_index=%d (failed samples so far: %d): "
            "model dtype=%s, parameter dtypes=[%s], device=%s, autocast enabled=%s dtype=%s, "
            "exception=%s: %s", sample.sample_index, self.counts["failed_samples"],
            getattr(model, "dtype", "unknown"), dtype_summary(model), device,
            torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type),
            type(exc).__name__, exc, exc_info=True)
        return _failed(sample, exc)


def _stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokenizer's EOS plus every EOS of the model's generation config (chat models
    often end a turn with a token of their own, such as <|eot_id|>)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [*ids, tokenizer.eos_token_id]
    return frozenset(int(i) for i in ids if i is not None)


def _failed(sample: Sample, exc: Exception) -> GenerationResult:
    return GenerationResult(sample.sample_index, sample.prompt, sample.ground_truth, None, 0.0,
                            error=f"{type(exc).__name__}: {exc}")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """Seeded sampling must not move the training RNG: fork it and restore it after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        yield
