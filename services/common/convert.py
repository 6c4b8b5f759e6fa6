"""Conversions between stored rows and protobuf messages shared by the services."""

import uuid
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from epochlens.v1 import common_pb2
from services.common.errors import Violations

# The largest integer a double holds exactly (2**53); past it a float stays a float.
MAX_EXACT_INT = 2**53


def utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(utc(value))
    return ts


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a dict, its whole numbers as ints (see integral_numbers)."""
    return integral_numbers(json_format.MessageToDict(value))


def integral_numbers(value: Any) -> Any:
    """`value` with every whole float (up to 2**53 in size) turned back into an int.

    A Struct has one number type, a double, so a run config's integers arrive as floats
    (4 -> 4.0). Every reader that builds a dict from a Struct undoes that here; the price
    is that a whole float meant as a float (1.0) reads back as 1, which compares equal.
    """
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_EXACT_INT:
        return int(value)
    if isinstance(value, dict):
        return {key: integral_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [integral_numbers(item) for item in value]
    return value


def dict_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def run_to_proto(row: Any) -> common_pb2.Run:
    """A Run message from a row of writer.runs (attribute access)."""
    return common_pb2.Run(
        id=str(row.id), user_id=row.user_id, name=row.name, model_name=row.model_name,
        dataset_name=row.dataset_name, config=dict_to_struct(row.config),
        state=row.state, kind=row.kind, create_time=timestamp(row.create_time),
        finish_time=timestamp(row.finish_time),
    )


def parse_run_id(value: str, field: str = "run_id",
                 violations: Violations | None = None) -> uuid.UUID | None:
    """The UUID in `value`; a malformed one is a field violation (raised unless collected)."""
    own = violations is None
    collected = violations if violations is not None else Violations()
    parsed = None
    if not value:
        collected.add(field, "required")
    else:
        try:
            parsed = uuid.UUID(value)
        except ValueError:
            collected.add(field, f"not a run id (expected a UUID): {value[:64]!r}")
    if own:
        collected.raise_if_any()
    return parsed
