"""Predictor: one safe predictions pass from any training loop (needs torch and transformers).

    predictor = Predictor(eval_rows, tokenizer, config, autocast_dtype=torch.bfloat16)
    ...
    results = predictor.predict(model, step=global_step)   # None on ranks other than 0
    if results is not None:
        run.log_predictions(epoch, global_step, results)
        print(predictor.exact_match_rate(results))

The sample is drawn once at construction (trainer_client.sampler: the same formats and
checks as the callback, a bad row fails here). predict() generates it with
trainer_client.generator.Generator (left-padded batches under the trainer's autocast, eval
mode and no_grad, everything it touches restored); with torch.distributed initialised every
rank generates its shard and rank 0 gets every result (trainer_client.distributed), so every
rank must call it. PredictionsCallback uses this class for its passes.
"""

import logging
import time
from collections import Counter
from typing import Any

from trainer_client import distributed
from trainer_client.config import PredictionsConfig
from trainer_client.generator import Generator
from trainer_client.matching import exact_match_rate
from trainer_client.results import GenerationResult
from trainer_client.sampler import Formatter, Sample, Sampler

log = logging.getLogger(__name__)


class Predictor:
    """Draws the fixed sample once; each predict() is one pass over it."""

    def __init__(self, dataset: Any, tokenizer: Any, config: PredictionsConfig | None = None,
                 *, formatter: Formatter | None = None, autocast_dtype: Any = None) -> None:
        """dataset: rows in a format trainer_client.sampler knows, a SampleDraw made from
        them, or a Sampler already drawn. autocast_dtype: the training precision
        (torch.bfloat16 / torch.float16) generation runs under; None: no autocast (fp32)."""
        self.config = config if config is not None else PredictionsConfig()
        self.sampler = (dataset if isinstance(dataset, Sampler)
                        else Sampler(dataset, self.config, tokenizer, formatter))
        self.generator = Generator(self.config, tokenizer)
        self.autocast_dtype = autocast_dtype
        self.counts: Counter[str] = Counter()
        # Wall seconds of the last pass and of all passes (generation and gathering).
        self.last_pass_s = 0.0
        self.total_s = 0.0

    @property
    def samples(self) -> list[Sample]:
        return self.sampler.samples

    def predict(self, model: Any, step: int = 0) -> list[GenerationResult] | None:
        """One pass: every sample's result in sample_index order on rank 0 (a failed sample
        carries its error, see Generator); None on other ranks. step seeds sampled
        decoding, so a pass is reproducible."""
        started = time.perf_counter()
        results = self.generator.generate(model, distributed.shard(self.samples),
                                          self.autocast_dtype, seed_offset=step)
        gathered = distributed.gather_lists(results)
        self.last_pass_s = time.perf_counter() - started
        self.total_s += self.last_pass_s
        if gathered is None:
            return None
        gathered.sort(key=lambda r: r.sample_index)
        failed = sum(1 for r in gathered if r.error is not None)
        self.counts["passes"] += 1
        self.counts["predictions"] += len(gathered) - failed
        self.counts["failed_samples"] += failed
        return gathered

    @staticmethod
    def exact_match_rate(results: list[GenerationResult]) -> float | None:
        """Share of results with a ground truth whose prediction matches it exactly
        (services/common/matching.py's definition); None when none has a ground truth."""
        return exact_match_rate(results)
