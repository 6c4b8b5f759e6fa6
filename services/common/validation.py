"""The one edge check every request goes through before a servicer sees it.

`RequestChecker.check(message)` walks a parsed protobuf request by its
descriptor and collects a field violation for every value no service may
accept, whatever the RPC:

* text with a NUL character (U+0000): PostgreSQL cannot store it, and no
  identifier, name, filter or config value needs it. The model texts of a
  prediction are the exception (NUL_REPLACED_FIELDS): a generated NUL is real
  model output, so the writer stores it replaced and says so in its response;
* non-finite numbers (NaN, +/-inf) in double and float fields and in Struct
  values (JSON cannot carry them, and no score, time or setting is infinite);
* integers whose magnitude exceeds `max_abs_integer` (2**53 - 1 by default:
  what a JSON or JavaScript client can represent exactly; every count, step
  and epoch fits far below it, and arithmetic on it cannot overflow a BIGINT);
* enum values the contract does not define;
* Structs nested deeper than `max_struct_depth`, or with NUL in a key.

Per-field rules (a required field, a range that depends on the RPC) stay with
the servicer's own validation; this layer only rejects what is never valid.
A plan of fields per message type is built once and cached, so the check
costs a few attribute reads per message on the ingest path.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.common.errors import Violations

# Texts the writer stores with NUL replaced by REPLACEMENT_CHAR instead of rejecting
# them: what a model generated (and the dataset text it was prompted with) must not be
# lost over one odd character. Full protobuf field names.
NUL_REPLACED_FIELDS = frozenset({
    "epochlens.v1.PredictionInput.prompt",
    "epochlens.v1.PredictionInput.ground_truth",
    "epochlens.v1.PredictionInput.prediction",
    # A run's sample declared once (WritePredictionsRequest.samples and the stream's).
    "epochlens.v1.SampleInput.prompt",
    "epochlens.v1.SampleInput.ground_truth",
    # The same texts of an evaluation row (EvaluationService.Evaluate stores them so).
    "epochlens.v1.EvaluationRow.prompt",
    "epochlens.v1.EvaluationRow.reference",
    "epochlens.v1.EvaluationRow.response",
})
NUL = "\x00"
REPLACEMENT_CHAR = "\ufffd"

_STRUCT = "google.protobuf.Struct"
_VALUE = "google.protobuf.Value"
_LIST_VALUE = "google.protobuf.ListValue"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_KEY_SHOWN_CHARS = 64

_INT_TYPES = frozenset({
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64})
_FLOAT_TYPES = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})


@dataclass(frozen=True)
class EdgeLimits:
    """The bounds of the edge check (from the service's settings)."""

    max_abs_integer: int
    max_struct_depth: int


def replace_nul(text: str) -> str:
    """The text with every NUL replaced by U+FFFD (what the writer stores)."""
    return text.replace(NUL, REPLACEMENT_CHAR)


def key_path(parent: str, key: str) -> str:
    """`parent.key` for identifier-like keys, else `parent["key"]` (ASCII, shortened)."""
    if _IDENTIFIER.match(key):
        return f"{parent}.{key}" if parent else key
    quoted = ascii(key[:_KEY_SHOWN_CHARS])
    return f"{parent}[{quoted}]"


@dataclass(frozen=True)
class _FastPlan:
    """One message type's fields grouped by kind, read with C-level attrgetters."""

    ints: Callable | None
    floats: Callable | None
    strings: Callable | None
    enums: tuple[tuple[str, frozenset[int]], ...]
    messages: tuple[str, ...]
    repeated: bool

    @classmethod
    def of(cls, descriptor: Descriptor) -> "_FastPlan":
        fields = descriptor.fields
        singular = [f for f in fields if not f.is_repeated]

        strings = [f.name for f in singular if f.type == FieldDescriptor.TYPE_STRING
                   and f.full_name not in NUL_REPLACED_FIELDS]
        return cls(
            ints=_tuple_getter([f.name for f in singular if f.type in _INT_TYPES]),
            floats=_tuple_getter([f.name for f in singular if f.type in _FLOAT_TYPES]),
            strings=_tuple_getter(strings),
            enums=tuple((f.name, frozenset(f.enum_type.values_by_number)) for f in singular
                        if f.type == FieldDescriptor.TYPE_ENUM),
            messages=tuple(f.name for f in singular if f.type == FieldDescriptor.TYPE_MESSAGE),
            repeated=any(f.is_repeated for f in fields))

    def ok(self, message: Message, max_abs: int, nested_ok: Callable[[Message], bool],
           plan_of: Callable[[Message], "_FastPlan | None"]) -> bool:
        """False when a value may be bad (the slow walk then says which); repeated fields
        send the message to the slow walk unless all their items pass."""
        if self.ints:
            values = self.ints(message)
            if min(values) < -max_abs or max(values) > max_abs:
                return False
        if self.floats and not all(map(math.isfinite, self.floats(message))):
            return False
        if self.strings and NUL in "".join(self.strings(message)):
            return False
        for name, known in self.enums:
            if getattr(message, name) not in known:
                return False
        if not all(nested_ok(getattr(message, name)) for name in self.messages):
            return False
        return not self.repeated or _repeated_ok(message, max_abs, nested_ok, plan_of)


    @property
    def flat(self) -> bool:
        return not self.messages and not self.repeated

    def all_ok(self, messages, max_abs: int) -> bool:
        """ok() for many messages of a flat type at once, iterating in C (the ingest path:
        one batch's predictions)."""
        if self.ints:
            values = list(chain.from_iterable(map(self.ints, messages)))
            if values and (min(values) < -max_abs or max(values) > max_abs):
                return False
        if self.floats and not all(map(math.isfinite,
                                       chain.from_iterable(map(self.floats, messages)))):
            return False
        if self.strings and any(NUL in text for text in
                                chain.from_iterable(map(self.strings, messages))):
            return False
        for name, known in self.enums:
            if not set(map(attrgetter(name), messages)) <= known:
                return False
        return True


def _tuple_getter(names: list[str]) -> Callable | None:
    """A C-level getter of the named attributes that always returns a tuple."""
    if not names:
        return None
    if len(names) == 1:
        single = attrgetter(names[0])
        return lambda message: (single(message),)
    return attrgetter(*names)


def _repeated_ok(message: Message, max_abs: int, nested_ok: Callable[[Message], bool],
                 plan_of: Callable[[Message], "_FastPlan | None"]) -> bool:
    for field in message.DESCRIPTOR.fields:
        if not field.is_repeated:
            continue
        values = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if not values:
                continue
            plan = plan_of(values[0])
            if plan is not None and plan.flat:
                if not plan.all_ok(values, max_abs):
                    return False
            elif not all(map(nested_ok, values)):
                return False
        elif values:
            return False  # repeated scalars: rare in requests; the slow walk checks them
    return True


class RequestChecker:
    """Checks whole requests against EdgeLimits; raises one InvalidArgument for all."""

    def __init__(self, limits: EdgeLimits) -> None:
        self._limits = limits
        self._plans: dict[str, list[tuple[FieldDescriptor, Callable]]] = {}
        self._fast_plans: dict[type, _FastPlan | None] = {}

    def check(self, message: Message) -> None:
        """Raises InvalidArgument naming every bad field. A fast pass over the values (C-level
        attribute getters) clears valid requests; only a failing one is walked again to
        build the field paths."""
        if self._fast_ok(message):
            return
        violations = Violations()
        self._message(message, "", violations)
        violations.raise_if_any()

    def _fast_ok(self, message: Message) -> bool:
        plan = self._plan_of(message)
        if plan is None:
            return False  # Struct, Value, ListValue: small, depth-dependent, walked in full
        return plan.ok(message, self._limits.max_abs_integer, self._fast_ok, self._plan_of)

    def _plan_of(self, message: Message) -> "_FastPlan | None":
        kind = type(message)
        if kind not in self._fast_plans:
            wellknown = message.DESCRIPTOR.full_name in (_STRUCT, _VALUE, _LIST_VALUE)
            self._fast_plans[kind] = None if wellknown else _FastPlan.of(message.DESCRIPTOR)
        return self._fast_plans[kind]

    def _plan(self, descriptor: Descriptor) -> list[tuple[FieldDescriptor, Callable]]:
        plan = self._plans.get(descriptor.full_name)
        if plan is None:
            plan = [(f, self._checker_for(f)) for f in descriptor.fields]
            plan = [(f, fn) for f, fn in plan if fn is not None]
            self._plans[descriptor.full_name] = plan
        return plan

    def _checker_for(self, field: FieldDescriptor) -> Callable | None:
        if field.type == FieldDescriptor.TYPE_STRING:
            return None if field.full_name in NUL_REPLACED_FIELDS else self._string
        if field.type in _FLOAT_TYPES:
            return self._float
        if field.type in _INT_TYPES:
            return self._integer
        if field.type == FieldDescriptor.TYPE_ENUM:
            return self._enum
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            return self._submessage
        return None

    def _message(self, message: Message, path: str, violations: Violations) -> None:
        name = message.DESCRIPTOR.full_name
        if name == _STRUCT:
            self._struct(message, path, violations, 1)
            return
        if name == _VALUE:
            self._value(message, path, violations, 1)
            return
        if name == _LIST_VALUE:
            self._list(message, path, violations, 1)
            return
        for field, checker in self._plan(message.DESCRIPTOR):
            value = getattr(message, field.name)
            field_path = f"{path}.{field.name}" if path else field.name
            if field.is_repeated:
                for index, item in enumerate(value):
                    checker(field, item, f"{field_path}[{index}]", violations)
            elif field.type != FieldDescriptor.TYPE_MESSAGE or message.HasField(field.name):
                checker(field, value, field_path, violations)

    def _string(self, _field, value: str, path: str, violations: Violations) -> None:
        if NUL in value:
            violations.add(path, "must not contain a NUL character (U+0000)")

    def _float(self, _field, value: float, path: str, violations: Violations) -> None:
        if not math.isfinite(value):
            violations.add(path, f"must be a finite number, got {value}")

    def _integer(self, _field, value: int, path: str, violations: Violations) -> None:
        if abs(value) > self._limits.max_abs_integer:
            violations.add(path, f"{value} is out of range (magnitude at most "
                           f"{self._limits.max_abs_integer})")

    def _enum(self, field: FieldDescriptor, value: int, path: str,
              violations: Violations) -> None:
        if value not in field.enum_type.values_by_number:
            violations.add(path, f"unknown {field.enum_type.name} value {value}")

    def _submessage(self, _field, value: Message, path: str, violations: Violations) -> None:
        self._message(value, path, violations)

    def _struct(self, struct: Message, path: str, violations: Violations, depth: int) -> None:
        if depth > self._limits.max_struct_depth:
            violations.add(path, f"nested deeper than {self._limits.max_struct_depth} levels")
            return
        for key, value in struct.fields.items():
            if NUL in key:
                violations.add(path or "(root)", "a key contains a NUL character (U+0000)")
                continue
            self._value(value, key_path(path, key), violations, depth)

    def _value(self, value: Message, path: str, violations: Violations, depth: int) -> None:
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            self._float(None, value.number_value, path, violations)
        elif kind == "string_value":
            self._string(None, value.string_value, path, violations)
        elif kind == "struct_value":
            self._struct(value.struct_value, path, violations, depth + 1)
        elif kind == "list_value":
            self._list(value.list_value, path, violations, depth + 1)

    def _list(self, values: Message, path: str, violations: Violations, depth: int) -> None:
        if depth > self._limits.max_struct_depth:
            violations.add(path, f"nested deeper than {self._limits.max_struct_depth} levels")
            return
        for index, item in enumerate(values.values):
            self._value(item, f"{path}[{index}]", violations, depth)
