"""Checks on what clients send the writer. Everything here is pure and fast."""

import json
import uuid
from collections.abc import Sequence
from itertools import chain
from operator import attrgetter

from epochlens.v1 import common_pb2, writer_pb2
from services.common.convert import parse_run_id, struct_to_dict
from services.common.errors import Violations
from services.common.validation import NUL, replace_nul
from services.writer.config import WriterSettings

# The model texts of a prediction, stored with NUL replaced (services.common.validation).
# Its prompt may be empty (the run's sample declared once gives it: services.writer.samples),
# and so may its prediction: a model that stops at once early in training produced exactly
# that, and it is worth seeing.
MODEL_TEXT = ("prompt", "ground_truth", "prediction")
_MODEL_TEXT_OF = attrgetter(*MODEL_TEXT)
# The texts of a declared sample (SampleInput), stored with NUL replaced too.
SAMPLE_TEXT = ("prompt", "ground_truth")
_SAMPLE_TEXT_OF = attrgetter(*SAMPLE_TEXT)
# 9999-12-31T23:59:59Z: the last second a stored timestamp (and Python's datetime) can hold.
MAX_TIMESTAMP_SECONDS = 253402300799


def replace_nul_texts(items: Sequence[common_pb2.PredictionInput],
                      samples: Sequence[writer_pb2.SampleInput] = ()) -> list[str]:
    """Replaces NUL in the model texts of valid items and declared samples, in place; the
    paths it changed. One C-level scan of the batch's texts first: almost every batch has
    none."""
    changed = _replace_in(items, "predictions", MODEL_TEXT, _MODEL_TEXT_OF)
    if samples:
        changed += _replace_in(samples, "samples", SAMPLE_TEXT, _SAMPLE_TEXT_OF)
    return changed


def _replace_in(messages: Sequence, parent: str, names: tuple[str, ...], texts_of
                ) -> list[str]:
    if NUL not in "".join(chain.from_iterable(map(texts_of, messages))):
        return []
    changed = []
    for index, message in enumerate(messages):
        for name in names:
            value = getattr(message, name)
            if NUL in value:
                setattr(message, name, replace_nul(value))
                changed.append(f"{parent}[{index}].{name}")
    return changed


def validate_batch(run_id: str, items: Sequence[common_pb2.PredictionInput],
                   settings: WriterSettings,
                   metrics: Sequence[writer_pb2.MetricInput] | None = None,
                   samples: Sequence[writer_pb2.SampleInput] = ()) -> uuid.UUID:
    """The batch's run id, or InvalidArgument naming every offending item and field.
    Non-finite numbers, NUL in identifiers and out-of-range integers never get here
    (the edge check in services.common.interceptors refused them). Whether the samples
    agree with each other and with the store is checked when the batch is committed
    (services.writer.samples).

    metrics: the batch's metrics on the upload stream (None for WritePredictions); a stream
    batch needs at least one prediction or one metric. samples: the samples it declares (at
    most max_batch_size, like its predictions)."""
    violations = Violations()
    parsed = parse_run_id(run_id, violations=violations)
    if metrics is not None:
        _check_metrics(metrics, settings, violations, required=not items)
    _check_samples(samples, settings, violations)
    if not items:
        if metrics is None:
            violations.add("predictions", "a batch needs at least one prediction")
    elif len(items) > settings.max_batch_size:
        violations.add("predictions", f"{len(items)} predictions exceed the maximum batch size "
                       f"of {settings.max_batch_size}")
    else:
        for index, item in enumerate(items):
            _check_item(item, f"predictions[{index}]", settings.max_text_chars, violations)
    violations.raise_if_any()
    assert parsed is not None
    return parsed


def _check_item(item: common_pb2.PredictionInput, path: str, max_chars: int,
                violations: Violations) -> None:
    if item.epoch < 0:
        violations.add(f"{path}.epoch", f"must be >= 0, got {item.epoch}")
    if item.step < 0:
        violations.add(f"{path}.step", f"must be >= 0, got {item.step}")
    if item.sample_index < 0:
        violations.add(f"{path}.sample_index", f"must be >= 0, got {item.sample_index}")
    if item.generation_time_ms < 0:
        violations.add(f"{path}.generation_time_ms", "must be >= 0")
    _check_sizes(item, MODEL_TEXT, path, max_chars, violations)
    for name in ("prompt_tokens", "completion_tokens"):
        if item.HasField(name) and getattr(item, name) < 0:
            violations.add(f"{path}.{name}", "must be >= 0")


def _check_sizes(message, names: tuple[str, ...], path: str, max_chars: int,
                 violations: Violations) -> None:
    for name in names:
        size = len(getattr(message, name))
        if size > max_chars:
            violations.add(f"{path}.{name}", f"{size} characters exceed the maximum "
                           f"of {max_chars}")


def _check_samples(samples: Sequence[writer_pb2.SampleInput], settings: WriterSettings,
                   violations: Violations) -> None:
    if len(samples) > settings.max_batch_size:
        violations.add("samples", f"{len(samples)} samples exceed the maximum batch size "
                       f"of {settings.max_batch_size}")
        return
    for index, sample in enumerate(samples):
        path = f"samples[{index}]"
        if sample.sample_index < 0:
            violations.add(f"{path}.sample_index", f"must be >= 0, got {sample.sample_index}")
        if not sample.prompt:
            violations.add(f"{path}.prompt", "required (empty)")
        _check_sizes(sample, SAMPLE_TEXT, path, settings.max_text_chars, violations)


def validate_metrics(run_id: str, metrics: Sequence[writer_pb2.MetricInput],
                     settings: WriterSettings) -> uuid.UUID:
    """The run id of a WriteMetrics batch, or InvalidArgument naming every offending field."""
    violations = Violations()
    parsed = parse_run_id(run_id, violations=violations)
    _check_metrics(metrics, settings, violations, required=True)
    violations.raise_if_any()
    assert parsed is not None
    return parsed


def _check_metrics(metrics: Sequence[writer_pb2.MetricInput], settings: WriterSettings,
                   violations: Violations, required: bool) -> None:
    if not metrics:
        if required:
            violations.add("metrics", "a batch needs at least one prediction or metric")
        return
    if len(metrics) > settings.max_metrics_batch_size:
        violations.add("metrics", f"{len(metrics)} metrics exceed the maximum batch size of "
                       f"{settings.max_metrics_batch_size}")
        return
    for index, metric in enumerate(metrics):
        _check_metric(metric, f"metrics[{index}]", settings.max_metric_name_chars, violations)


def _check_metric(metric: writer_pb2.MetricInput, path: str, max_chars: int,
                  violations: Violations) -> None:
    """Value finiteness is the edge check's (NaN and +-inf never get here)."""
    if metric.step < 0:
        violations.add(f"{path}.step", f"must be >= 0, got {metric.step}")
    if not metric.name.strip():
        violations.add(f"{path}.name", "required (empty)")
    elif len(metric.name) > max_chars:
        violations.add(f"{path}.name", f"{len(metric.name)} characters exceed the maximum "
                       f"of {max_chars}")
    if metric.HasField("epoch") and metric.epoch < 0:
        violations.add(f"{path}.epoch", f"must be >= 0, got {metric.epoch}")
    if metric.HasField("wall_time"):
        seconds, nanos = metric.wall_time.seconds, metric.wall_time.nanos
        if not (0 <= seconds <= MAX_TIMESTAMP_SECONDS and 0 <= nanos < 1_000_000_000):
            violations.add(f"{path}.wall_time", "must be between 1970-01-01 and "
                           "9999-12-31 (UTC)")


def validate_create_run(request: writer_pb2.CreateRunRequest,
                        settings: WriterSettings) -> tuple[dict, int]:
    """The run config as a dict and the run kind to store, or InvalidArgument."""
    violations = Violations()
    kind = check_run_kind(request.kind, violations)
    for name, required in (("name", True), ("model_name", True), ("dataset_name", False),
                           ("request_id", False)):
        value = getattr(request, name)
        if required and not value.strip():
            violations.add(name, "required (empty)")
        elif len(value) > settings.max_name_chars:
            violations.add(name, f"{len(value)} characters exceed the maximum "
                           f"of {settings.max_name_chars}")
    config = struct_to_dict(request.config)
    size = len(json.dumps(config))
    if size > settings.max_config_bytes:
        violations.add("config", f"{size} bytes exceed the maximum of {settings.max_config_bytes}")
    violations.raise_if_any()
    return config, kind


def check_run_kind(kind: int, violations: Violations, field: str = "kind") -> int:
    """The kind to store: UNSPECIFIED is a training run; an unknown value is a violation."""
    if kind == common_pb2.RUN_KIND_UNSPECIFIED:
        return common_pb2.RUN_KIND_TRAINING
    if kind not in common_pb2.RunKind.values():
        violations.add(field, f"unknown run kind {kind}")
    return kind


def check_finish_state(state: int) -> int:
    """The final state to store; RUNNING is not a final state."""
    if state == common_pb2.RUN_STATE_UNSPECIFIED:
        return common_pb2.RUN_STATE_SUCCEEDED
    if state not in (common_pb2.RUN_STATE_SUCCEEDED, common_pb2.RUN_STATE_FAILED,
                     common_pb2.RUN_STATE_CANCELLED):
        violations = Violations()
        violations.add("state", "must be SUCCEEDED, FAILED or CANCELLED")
        violations.raise_if_any()
    return state
