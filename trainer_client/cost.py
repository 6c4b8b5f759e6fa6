"""Cost estimate of the predictions: generation wall time per epoch and for the whole run.

The estimate is deliberately an upper bound: every pass is assumed to decode
max_new_tokens token steps for each generation batch (a batch stops earlier only
when all of its prompts reached EOS). The decoding speed is either given
(decode_ms_per_step) or measured at train begin by a short probe generation.
"""

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from trainer_client.config import PredictionsConfig
from trainer_client.generator import Generator
from trainer_client.sampler import Sample


class CostCeilingExceeded(RuntimeError):
    """The estimated generation time passes the configured ceiling."""


@dataclass
class CostEstimate:
    """Expected generation time, from the decoding speed and the pass schedule."""

    ms_per_step: float
    speed_source: str
    seconds_per_pass: float
    passes_per_epoch: float
    passes_total: int
    seconds_per_epoch: float
    seconds_total: float

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"predictions cost estimate: {self.passes_total} passes "
                f"({self.passes_per_epoch:.2f} per epoch), {self.seconds_per_pass:.1f}s per "
                f"pass, {self.seconds_per_epoch:.1f}s per epoch, {self.seconds_total:.1f}s for "
                f"the run (decoding {self.ms_per_step:.1f} ms per token step, "
                f"{self.speed_source}; an upper bound: every prompt decodes max_new_tokens)")


def pass_schedule(config: PredictionsConfig, max_steps: int,
                  num_epochs: float) -> tuple[float, int]:
    """(passes per epoch, passes in the whole run) for the configured frequency."""
    epochs = num_epochs if num_epochs > 0 else 1.0
    if config.frequency == "epoch":
        total = math.ceil(num_epochs)
    else:
        total = max_steps // config.step_interval
    total += 1 if config.predict_at_start else 0
    return total / epochs, total


def estimate_cost(config: PredictionsConfig, ms_per_step: float, speed_source: str,
                  sample_count: int, world_size: int, max_steps: int,
                  num_epochs: float) -> CostEstimate:
    """The estimate for sample_count prompts split over world_size ranks."""
    per_rank = math.ceil(sample_count / max(world_size, 1))
    batches = math.ceil(per_rank / config.generation_batch_size)
    seconds_per_pass = batches * config.max_new_tokens * ms_per_step / 1000.0
    per_epoch, total = pass_schedule(config, max_steps, num_epochs)
    return CostEstimate(ms_per_step, speed_source, seconds_per_pass, per_epoch, total,
                        seconds_per_pass * per_epoch, seconds_per_pass * total)


def measure_ms_per_step(generator: Generator, model: Any, samples: list[Sample],
                        autocast_dtype: torch.dtype | None, probe_tokens: int) -> float:
    """Milliseconds per token step of one full generation batch (probe run, timed)."""
    batch = samples[:generator.batch_size]
    started = time.perf_counter()
    results = generator.generate(model, batch, autocast_dtype, max_new_tokens=probe_tokens)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    produced = [r.completion_tokens for r in results if r.completion_tokens is not None]
    steps = min(probe_tokens, max(produced) + 1) if produced else probe_tokens
    return elapsed_ms / max(steps, 1)


def check_ceiling(config: PredictionsConfig, estimate: CostEstimate) -> str | None:
    """A warning to log when past cost_warn_s; raises CostCeilingExceeded past the ceiling."""
    ceiling = config.cost_ceiling_s
    if ceiling is not None and estimate.seconds_total > ceiling:
        raise CostCeilingExceeded(
            f"estimated predictions time {estimate.seconds_total:.1f}s exceeds "
            f"cost_ceiling_s={ceiling:.1f}s; lower sample_count, max_new_tokens or the pass "
            "frequency, or raise EPOCHLENS_TRAINER_COST_CEILING_S")
    if estimate.seconds_total > config.cost_warn_s:
        return (f"estimated predictions time {estimate.seconds_total:.1f}s passes "
                f"cost_warn_s={config.cost_warn_s:.1f}s")
    return None
