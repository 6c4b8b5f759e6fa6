"""The JSON API's routes, read from the google.api.http annotations of a gRPC service.

The protos are the single source: each method's `option (google.api.http)` names its HTTP
verb and path template (`/v1/runs/{run_id}/samples/{sample_index}`, `/v1/runs/{run_id}:watch`).
A template variable is a field of the request message (a dotted path for a nested field)
and matches one path segment; the other request fields come from the query string
(services.web.params). Only GET bindings without a body are served: the web API is read-only.
"""

import re
from dataclasses import dataclass

from google.api import annotations_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)(=\*)?\}")
_LITERAL = re.compile(r"[A-Za-z0-9_.~:/-]*")


class UnsupportedBinding(ValueError):
    """An annotation this gateway cannot serve (a verb other than GET, a body, `**`)."""


@dataclass(frozen=True)
class Binding:
    """One HTTP route of one gRPC method."""

    method: MethodDescriptor
    template: str
    # The Starlette path of the route ({p0}, {p1}, ... for the template's variables) and
    # the request field each variable fills, in order.
    path: str
    path_fields: tuple[str, ...]

    @property
    def rpc_path(self) -> str:
        """The gRPC method path: /epochlens.v1.QueryService/ListRuns."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def streaming(self) -> bool:
        return self.method.server_streaming

    @property
    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    @property
    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.output_type)


def bindings(service) -> list[Binding]:
    """Every HTTP binding of `service` (a ServiceDescriptor), templates with a verb suffix
    (`:watch`) first: a plain variable also matches `id:watch`, so they must be tried first."""
    found = []
    for method in service.methods:
        if method.client_streaming:
            raise UnsupportedBinding(f"{method.full_name}: client streaming over HTTP")
        options = method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            continue
        rule = options.Extensions[annotations_pb2.http]
        for each in (rule, *rule.additional_bindings):
            found.append(_binding(method, each))
    return sorted(found, key=lambda b: ":" not in b.template.rsplit("/", 1)[-1])


def _binding(method: MethodDescriptor, rule) -> Binding:
    kind = rule.WhichOneof("pattern")
    if kind != "get" or rule.body:
        raise UnsupportedBinding(f"{method.full_name}: only GET without a body is served "
                                 f"(found {kind} with body {rule.body!r})")
    template = rule.get
    fields: list[str] = []

    def placeholder(match: re.Match) -> str:
        _check_path_field(method.input_type, match.group(1), method.full_name)
        fields.append(match.group(1))
        return "{p" + str(len(fields) - 1) + "}"

    path = _VARIABLE.sub(placeholder, template)
    if not path.startswith("/") or not _LITERAL.fullmatch(re.sub(r"\{p\d+\}", "", path)):
        raise UnsupportedBinding(f"{method.full_name}: unsupported path template {template!r}")
    return Binding(method, template, path, tuple(fields))


def field_path(message: Descriptor, dotted: str) -> list[FieldDescriptor] | None:
    """The fields along `dotted` (proto or JSON names), or None when one does not exist or
    a non-final one is not a singular message."""
    path = []
    for index, name in enumerate(dotted.split(".")):
        if message is None:
            return None
        field = message.fields_by_name.get(name) or message.fields_by_camelcase_name.get(name)
        if field is None:
            return None
        path.append(field)
        last = index == len(dotted.split(".")) - 1
        if not last and (field.message_type is None or _repeated(field)):
            return None
        message = field.message_type
    return path


def _check_path_field(message: Descriptor, dotted: str, method: str) -> None:
    path = field_path(message, dotted)
    if path is None or path[-1].message_type is not None or _repeated(path[-1]):
        raise UnsupportedBinding(f"{method}: path variable {dotted!r} is not a singular "
                                 "scalar field of the request")


def _repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated
