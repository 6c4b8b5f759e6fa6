"""Turns generation results into writer batches (serialized protobuf, ready for the spool).

Texts longer than the configured maximum are cut to it (logged and counted,
never silently); failed samples carry no prediction and are not sent (the
generator already logged and counted them).
"""

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from epochlens.v1 import common_pb2, writer_pb2
from trainer_client.config import PredictionsConfig
from trainer_client.results import GenerationResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricsItem:
    """One log_metrics call: scalars by name at one step, logged at wall_time (epoch seconds)."""

    step: int
    values: Mapping[str, float]
    epoch: float | None
    wall_time: float


class PayloadEncoder:
    """Encodes one pass's results into batches of at most stream_batch_predictions."""

    def __init__(self, config: PredictionsConfig) -> None:
        self._config = config
        self.counts: Counter[str] = Counter()

    def encode(self, epoch: int, step: int,
               results: Sequence[GenerationResult]) -> list[tuple[bytes, int]]:
        """(serialized WritePredictionsRequest without run_id, prediction count) per batch."""
        items = [self._item(epoch, step, r) for r in results if r.prediction is not None]
        size = self._config.stream_batch_predictions
        batches = []
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            request = writer_pb2.WritePredictionsRequest(predictions=chunk)
            batches.append((request.SerializeToString(), len(chunk)))
        return batches

    def encode_metrics(self, item: MetricsItem) -> list[tuple[bytes, int]]:
        """(serialized WriteMetricsRequest without run_id, metric count) per batch of at most
        stream_batch_metrics. Values that are not finite are left out (the writer refuses
        them with the whole batch): logged with their names and counted."""
        wall = timestamp_pb2.Timestamp()
        wall.FromNanoseconds(int(item.wall_time * 1e9))
        kept, dropped = [], []
        for name, value in item.values.items():
            (kept if math.isfinite(value) else dropped).append((name, value))
        if dropped:
            self.counts["non_finite_metrics"] += len(dropped)
            log.warning("step %d: %d metrics not sent, their values are not finite (%s; %d so "
                        "far)", item.step, len(dropped),
                        ", ".join(f"{n}={v!r}" for n, v in dropped[:5]),
                        self.counts["non_finite_metrics"])
        metrics = [writer_pb2.MetricInput(step=item.step, name=name, value=value,
                                          epoch=item.epoch, wall_time=wall)
                   for name, value in kept]
        size = self._config.stream_batch_metrics
        return [(writer_pb2.WriteMetricsRequest(metrics=metrics[start:start + size])
                 .SerializeToString(), len(metrics[start:start + size]))
                for start in range(0, len(metrics), size)]

    def _item(self, epoch: int, step: int, result: GenerationResult) -> common_pb2.PredictionInput:
        item = common_pb2.PredictionInput(
            epoch=epoch, step=step, sample_index=result.sample_index,
            prompt=self._cut(result.prompt, "prompt", result),
            prediction=self._cut(result.prediction or "", "prediction", result),
            generation_time_ms=self._duration(result))
        if result.ground_truth is not None:
            item.ground_truth = self._cut(result.ground_truth, "ground_truth", result)
        if result.prompt_tokens is not None:
            item.prompt_tokens = result.prompt_tokens
        if result.completion_tokens is not None:
            item.completion_tokens = result.completion_tokens
        return item

    def _duration(self, result: GenerationResult) -> float:
        """The generation time, or 0.0 when it is not a finite non-negative number (which
        the writer would refuse, with the whole batch); logged and counted."""
        value = result.generation_time_ms
        if math.isfinite(value) and value >= 0:
            return value
        self.counts["bad_durations"] += 1
        log.warning("sample_index=%d: generation_time_ms=%r sent as 0.0 (%d so far)",
                    result.sample_index, value, self.counts["bad_durations"])
        return 0.0

    def _cut(self, text: str, field: str, result: GenerationResult) -> str:
        limit = self._config.max_text_chars
        if len(text) <= limit:
            return text
        self.counts["truncated_texts"] += 1
        log.warning("sample_index=%d: %s has %d characters, cut to max_text_chars=%d "
                    "(texts cut so far: %d)", result.sample_index, field, len(text), limit,
                    self.counts["truncated_texts"])
        return text[:limit]
