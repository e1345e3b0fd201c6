"""Domain errors and their canonical gRPC codes (AIP-193).

Services raise these; the server's error interceptor turns them into a status with one
`google.rpc.ErrorInfo` (domain `<service>.tally`) and, for bad input, a
`google.rpc.BadRequest` naming every offending field. Anything else becomes INTERNAL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

import grpc

from tally_kit.ids import MERCHANT_ID_PATTERN, is_valid_merchant_id


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class TallyError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason: str = "UNKNOWN"

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(TallyError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], *, reason: str | None = None):
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(f"invalid request: {summary}", reason=reason)
        self.violations = violations


class NotFound(TallyError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(TallyError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(TallyError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(TallyError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class PermissionDenied(TallyError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(TallyError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(TallyError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(TallyError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class RuleViolation(ValueError):
    """A value breaks a domain rule; the message describes the rule, for a field violation."""


T = TypeVar("T")


class Violations:
    """Collects every bad field of a request, then raises one InvalidArgument naming them all."""

    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self._items.append(FieldViolation(field, description))

    def require(self, condition: bool, field: str, description: str) -> bool:
        if not condition:
            self.add(field, description)
        return condition

    def rule(self, field: str, check: Callable[[], T]) -> T | None:
        """The checked value, or None after recording the rule it breaks against `field`."""
        try:
            return check()
        except RuleViolation as error:
            self.add(field, str(error))
            return None

    def merchant_id(self, value: str, field: str = "merchant_id") -> bool:
        """Whether `value` is a well-formed merchant id; records why not."""
        if not value:
            self.add(field, "is required")
            return False
        return self.require(is_valid_merchant_id(value), field, f"must match {MERCHANT_ID_PATTERN.pattern}")

    def uuid(self, field: str, value: str) -> UUID | None:
        """A required id in the canonical form the services hand out (one spelling per resource)."""
        if not value:
            self.add(field, "is required")
            return None
        try:
            parsed: UUID | None = UUID(value)
        except ValueError:
            parsed = None
        if parsed is None or str(parsed) != value.lower():
            self.add(field, "must be a UUID such as 0b6f3c1e-8f0a-4c5e-9a51-2f4f1c9e7d10")
            return None
        return parsed

    def __bool__(self) -> bool:
        return bool(self._items)

    def raise_if_any(self) -> None:
        if self._items:
            raise InvalidArgument(list(self._items))
