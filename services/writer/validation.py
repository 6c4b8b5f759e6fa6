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
                   settings: WriterSettings) -> uuid.UUID:
    """The batch's run id, or InvalidArgument naming every offending item and field.
    Non-finite numbers, NUL in identifiers and out-of-range integers never get here
    (the edge check in services.common.interceptors refused them)."""
    violations = Violations()
    parsed = parse_run_id(run_id, violations=violations)
    if not items:
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


def validate_create_run(request: writer_pb2.CreateRunRequest,
                        settings: WriterSettings) -> dict:
    """The run config as a dict, or InvalidArgument."""
    violations = Violations()
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
    return config


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
