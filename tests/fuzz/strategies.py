"""Hypothesis strategies that build arbitrary protobuf requests from their descriptors.

Strings draw from all of Unicode (NUL included; lone surrogates cannot be encoded by
any protobuf client, so they reach a server only as invalid UTF-8, which `raw_mutations`
produces), integers from the full range of their type with the edges weighted in,
doubles include NaN and +/-inf, Structs are nested up to past protobuf's own limit, and
repeated fields are sometimes long. Fields named like ids draw from ids that exist too
(`known_ids`), so ownership checks are exercised, not just parsing. Sample indices and
prompts also draw from a few shared values, so a batch's declared samples (SampleInput) and
its predictions name the same samples, with the same or other text, or rely on a sample with
an empty prompt: the store-once paths of the writer are exercised, not only parsing.
"""

import math

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_EDGE_INTS = (0, 1, -1, 5, 2**31 - 1, -2**31, 2**53, 2**53 + 1, 2**63 - 1, -2**63)
_EDGE_TEXT = ("", "\x00", "a\x00b", " ", "\ufffd", "x" * 5000, "[" * 3000, "(a+)+$")
_MAX_STRUCT_DEPTH = 36  # past protobuf's parse limit (about 33 Struct levels)
# Shared values of sample_index and prompt (see the module docstring).
_SHARED_SAMPLE_INDICES = (0, 1, 2)
_SHARED_PROMPTS = ("", "p", "q")


def texts() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=40), st.sampled_from(_EDGE_TEXT))


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in _EDGE_INTS if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def doubles() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 0.5]),
                     st.floats(allow_nan=True, allow_infinity=True))


def json_values() -> st.SearchStrategy:
    leaves = st.one_of(st.none(), st.booleans(), doubles(), texts())
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(texts(), inner, max_size=4)),
        max_leaves=12)


def _deep(depth: int) -> dict:
    node: dict = {"leaf": 1.0}
    for _ in range(depth - 1):
        node = {"a": node}
    return node


def _struct_from(value: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    for key, item in value.items():
        _set_value(struct.fields[key], item)
    return struct


def _set_value(target: struct_pb2.Value, item) -> None:
    """Struct.update() refuses NaN in some runtimes; this sets every kind by hand."""
    if item is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(item, bool):
        target.bool_value = item
    elif isinstance(item, float | int):
        target.number_value = float(item)
    elif isinstance(item, str):
        target.string_value = item
    elif isinstance(item, dict):
        target.struct_value.CopyFrom(_struct_from(item))
    else:
        target.list_value.SetInParent()
        for element in item:
            _set_value(target.list_value.values.add(), element)


def structs(config_sections: list[dict]) -> st.SearchStrategy[struct_pb2.Struct]:
    """Arbitrary Structs, deep chains, and mutations of realistic run configs."""
    arbitrary = st.dictionaries(texts(), json_values(), max_size=5)
    deep = st.integers(1, _MAX_STRUCT_DEPTH).map(_deep)
    realistic = st.sampled_from(config_sections) if config_sections else arbitrary
    return st.one_of(arbitrary, deep, realistic).map(_struct_from)


class MessageStrategies:
    """Builds and caches one strategy per message type."""

    def __init__(self, known_ids: list[str], config_sections: list[dict]) -> None:
        self._known_ids = known_ids
        self._config_sections = config_sections
        self._cache: dict[str, st.SearchStrategy] = {}

    def for_message(self, descriptor: Descriptor) -> st.SearchStrategy[Message]:
        name = descriptor.full_name
        if name not in self._cache:
            self._cache[name] = st.deferred(lambda: self._build(descriptor))
        return self._cache[name]

    def _build(self, descriptor: Descriptor) -> st.SearchStrategy[Message]:
        cls = GetMessageClass(descriptor)
        if descriptor.full_name == "google.protobuf.Struct":
            return structs(self._config_sections)
        fields = {f.name: self._field(f) for f in descriptor.fields}
        return st.fixed_dictionaries({}, optional=fields).map(
            lambda values: _assemble(cls, descriptor, values))

    def _field(self, field: FieldDescriptor) -> st.SearchStrategy:
        single = self._scalar(field)
        if field.is_repeated:
            small, huge = st.lists(single, max_size=3), st.lists(single, min_size=1000,
                                                                 max_size=1200)
            return st.integers(0, 19).flatmap(lambda n: huge if n == 0 else small)
        return single

    def _scalar(self, field: FieldDescriptor) -> st.SearchStrategy:
        kind = field.type
        if field.name == "sample_index":
            return st.one_of(st.sampled_from(_SHARED_SAMPLE_INDICES), integers(*_INT_RANGES[kind]))
        if field.name == "prompt" and kind == FieldDescriptor.TYPE_STRING:
            return st.one_of(st.sampled_from(_SHARED_PROMPTS), texts())
        if kind == FieldDescriptor.TYPE_STRING:
            if field.name.endswith("run_id") and self._known_ids:
                return st.one_of(st.sampled_from(self._known_ids), texts())
            return texts()
        if kind in _INT_RANGES:
            return integers(*_INT_RANGES[kind])
        if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return doubles() if kind == FieldDescriptor.TYPE_DOUBLE else st.floats(width=32)
        if kind == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind == FieldDescriptor.TYPE_ENUM:
            known = [v.number for v in field.enum_type.values]
            return st.one_of(st.sampled_from(known), integers(-2**31, 2**31 - 1))
        if kind == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=64)
        return self.for_message(field.message_type)


def _assemble(cls, descriptor: Descriptor, values: dict) -> Message:
    message = cls()
    for name, value in values.items():
        field = descriptor.fields_by_name[name]
        target = getattr(message, name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.CopyFrom(value)
        elif field.is_repeated:
            target.extend(value)
        else:
            setattr(message, name, value)
    return message


def raw_mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """Bytes near a valid message: a byte flipped to 0xff, cut short, or junk appended."""
    def flip(index: int) -> bytes:
        index %= max(len(seed), 1)
        return seed[:index] + b"\xff" + seed[index + 1:]
    return st.one_of(st.integers(0, 10_000).map(flip),
                     st.integers(0, max(len(seed) - 1, 0)).map(lambda n: seed[:n]),
                     st.binary(min_size=1, max_size=64).map(lambda junk: seed + junk))
