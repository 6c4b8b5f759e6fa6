"""Request messages from an HTTP request: path variables and query parameters.

A query parameter names a request field by its proto name or its JSON name (`page_size` or
`pageSize`; a dotted path for a nested field). Values are read by the field's type: integers
in decimal, floats, bools as `true`/`false`, enums by name or number, bytes as base64;
a repeated field takes the parameter repeated; a singular field given twice, an unknown
parameter, a parameter that names a path variable or a value of the wrong type is a
400 with one field violation each. An optional field is set only when given.
"""

import base64
import binascii
import re
from collections.abc import Iterable, Mapping

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.web.errors import bad_request
from services.web.httprules import Binding, field_path

_INTEGER = re.compile(r"[+-]?[0-9]+")
_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


class _Invalid(ValueError):
    """A value that does not fit its field; the message is the violation's description."""


def build_request(binding: Binding, path_values: Mapping[str, str],
                  query: Iterable[tuple[str, str]]) -> Message:
    """The request message of `binding`'s method; ApiError (400) listing every violation."""
    message = binding.request_class()
    violations: list[tuple[str, str]] = []
    seen: set[str] = set()
    for index, name in enumerate(binding.path_fields):
        _assign(message, name, path_values[f"p{index}"], seen, violations)
    path_fields = set(binding.path_fields)
    for name, value in query:
        path = field_path(message.DESCRIPTOR, name)
        canonical = ".".join(f.name for f in path) if path is not None else name
        if canonical in path_fields:
            violations.append((name, "is set by the URL path; leave it out of the query"))
            continue
        _assign(message, name, value, seen, violations)
    if violations:
        raise bad_request(f"invalid request parameters for {binding.method.name}", violations)
    return message


def _assign(message: Message, name: str, value: str, seen: set[str],
            violations: list[tuple[str, str]]) -> None:
    path = field_path(message.DESCRIPTOR, name)
    if path is None:
        violations.append((name, f"unknown parameter: {message.DESCRIPTOR.name} has no such "
                                 "field"))
        return
    field = path[-1]
    canonical = ".".join(f.name for f in path)
    if field.message_type is not None:
        violations.append((name, "is a message: give its fields as "
                                 f"{canonical}.<field> parameters"))
        return
    if canonical in seen and not field.is_repeated:
        violations.append((name, "given more than once (it is not a repeated field)"))
        return
    seen.add(canonical)
    try:
        parsed = _parse(field, value)
    except _Invalid as exc:
        violations.append((name, str(exc)))
        return
    parent = message
    for step in path[:-1]:
        parent = getattr(parent, step.name)
    if field.is_repeated:
        getattr(parent, field.name).append(parsed)
    else:
        setattr(parent, field.name, parsed)


def _parse(field: FieldDescriptor, value: str) -> object:
    kind = field.cpp_type
    if kind in _RANGES:
        return _integer(value, *_RANGES[kind])
    if kind in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        try:
            return float(value)
        except ValueError:
            raise _Invalid(f"not a number: {value!r}") from None
    if kind == FieldDescriptor.CPPTYPE_BOOL:
        if value not in ("true", "false"):
            raise _Invalid(f"expected true or false, got {value!r}")
        return value == "true"
    if kind == FieldDescriptor.CPPTYPE_ENUM:
        return _enum(field, value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        try:
            return base64.urlsafe_b64decode(value.replace("+", "-").replace("/", "_")
                                            + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            raise _Invalid("not base64") from None
    return value


def _integer(value: str, low: int, high: int) -> int:
    if not _INTEGER.fullmatch(value):
        raise _Invalid(f"not an integer: {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise _Invalid(f"{number} is out of range [{low}, {high}]")
    return number


def _enum(field: FieldDescriptor, value: str) -> int:
    enum = field.enum_type
    if value in enum.values_by_name:
        return enum.values_by_name[value].number
    if _INTEGER.fullmatch(value) and int(value) in enum.values_by_number:
        return int(value)
    names = ", ".join(enum.values_by_name)
    raise _Invalid(f"not a value of {enum.name}: {value!r} (one of {names}, or its number)")
