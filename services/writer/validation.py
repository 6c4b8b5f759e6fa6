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

# Texts that must not be empty. A prediction may be: a model that stops at once early in
# training produced exactly that, and it is worth seeing.
REQUIRED_TEXT = ("prompt",)
# The model texts of a prediction, stored with NUL replaced (services.common.validation).
MODEL_TEXT = ("prompt", "ground_truth", "prediction")
_MODEL_TEXT_OF = attrgetter(*MODEL_TEXT)
# 9999-12-31T23:59:59Z: the last second a stored timestamp (and Python's datetime) can hold.
MAX_TIMESTAMP_SECONDS = 253402300799


def replace_nul_texts(items: Sequence[common_pb2.PredictionInput]) -> list[str]:
    """Replaces NUL in the model texts of valid items, in place; the paths it changed.
    One C-level scan of the batch's texts first: almost every batch has none."""
    if NUL not in "".join(chain.from_iterable(map(_MODEL_TEXT_OF, items))):
        return []
    changed = []
    for index, item in enumerate(items):
        for name in MODEL_TEXT:
            value = getattr(item, name)
            if NUL in value:
                setattr(item, name, replace_nul(value))
                changed.append(f"predictions[{index}].{name}")
    return changed


def validate_batch(run_id: str, items: Sequence[common_pb2.PredictionInput],
                   settings: WriterSettings,
                   metrics: Sequence[writer_pb2.MetricInput] | None = None) -> uuid.UUID:
    """The batch's run id, or InvalidArgument naming every offending item and field.
    Non-finite numbers, NUL in identifiers and out-of-range integers never get here
    (the edge check in services.common.interceptors refused them).

    metrics: the batch's metrics on the upload stream (None for WritePredictions); a stream
    batch needs at least one prediction or one metric."""
    violations = Violations()
    parsed = parse_run_id(run_id, violations=violations)
    if metrics is not None:
        _check_metrics(metrics, settings, violations, required=not items)
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
    for name in REQUIRED_TEXT:
        if not getattr(item, name):
            violations.add(f"{path}.{name}", "required (empty)")
    for name in ("prompt", "prediction", "ground_truth"):
        size = len(getattr(item, name))
        if size > max_chars:
            violations.add(f"{path}.{name}", f"{size} characters exceed the maximum "
                           f"of {max_chars}")
    for name in ("prompt_tokens", "completion_tokens"):
        if item.HasField(name) and getattr(item, name) < 0:
            violations.add(f"{path}.{name}", "must be >= 0")


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
