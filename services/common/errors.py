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

    def to_status(self, max_violations: int | None = None) -> status_pb2.Status:
        """The status with the first max_violations field violations (all when None); the
        ErrorInfo metadata says how many there were in all."""
        shown = self.violations if max_violations is None else self.violations[:max_violations]
        if len(shown) < len(self.violations):
            self.metadata = {**self.metadata, "violation_count": str(len(self.violations))}
        status = super().to_status()
        _pack(status, error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in shown
        ]))
        return status


class NotFound(DomainError):
    code = code_pb2.NOT_FOUND
    reason = "NOT_FOUND"


class Unauthenticated(DomainError):
    code = code_pb2.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class ResourceExhausted(DomainError):
    """The caller used up an allowance (too many failed attempts in a window, too many keys);
    ErrorInfo metadata says which and, where it applies, when to try again."""

    code = code_pb2.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class StorageRefused(DomainError):
    """The database refused well-formed input (a constraint or data error): a server-side
    fault, reported for the one item that caused it."""

    code = code_pb2.INTERNAL
    reason = "STORAGE_REFUSED"


class FailedPrecondition(DomainError):
    code = code_pb2.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class RunActive(FailedPrecondition):
    """DeleteRun of a RUNNING run without `force`: finish it first, or force (which cancels
    it)."""

    reason = "RUN_ACTIVE"


class RunDeleting(FailedPrecondition):
    """CreateRun replayed the request_id of a run that is being deleted (NOT_FOUND would
    mislead: the request names no run)."""

    reason = "RUN_DELETING"


class JudgingRaised(DomainError):
    """Judging one item raised (a defect of the judge on that input), reported for that item
    (ErrorInfo metadata `item`)."""

    code = code_pb2.INTERNAL
    reason = "JUDGING_RAISED"


class Unavailable(DomainError):
    """A service this request needs cannot be reached now; the same request may succeed
    later (clients retry)."""

    code = code_pb2.UNAVAILABLE
    reason = "UNAVAILABLE"


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
