"""Domain errors and their one mapping to gRPC status codes (AIP-193).

Servicers and repositories raise these; only services.common.interceptors turns
them (and database outages) into a status with google.rpc details.
"""

from dataclasses import dataclass, field

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "epochlens.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: its path (for example `predictions[3].prompt`) and why."""

    field: str
    description: str


class DomainError(Exception):
    """Base of the errors a caller can act on. `reason` is an UPPER_SNAKE ErrorInfo reason."""

    code: int = code_pb2.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata or {}

    def to_status(self) -> status_pb2.Status:
        status = status_pb2.Status(code=self.code, message=self.message)
        _pack(status, error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata))
        return status


class InvalidArgument(DomainError):
    code = code_pb2.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], message: str | None = None) -> None:
        self.violations = violations
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
        super().__init__(message or f"invalid request: {summary}")

    def to_status(self) -> status_pb2.Status:
        status = super().to_status()
        _pack(status, error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in self.violations
        ]))
        return status


class NotFound(DomainError):
    code = code_pb2.NOT_FOUND
    reason = "NOT_FOUND"


class Unauthenticated(DomainError):
    code = code_pb2.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class FailedPrecondition(DomainError):
    code = code_pb2.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


@dataclass
class Violations:
    """Collects field violations; raise_if_any() raises one InvalidArgument for all of them."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.items.append(FieldViolation(field_path, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)


def _pack(status: status_pb2.Status, detail) -> None:
    packed = any_pb2.Any()
    packed.Pack(detail)
    status.details.append(packed)
