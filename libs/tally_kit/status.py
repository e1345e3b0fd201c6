"""TallyError ⇄ gRPC status with `google.rpc` details (AIP-193), shared by server and clients.

A server answers a `TallyError` with its canonical code and a `google.rpc.Status` carrying
one `ErrorInfo` (reason, domain `<service>.tally`, metadata) and, for bad input, one
`BadRequest` naming every offending field. A client turns such a status back into the
matching `TallyError`, so a service can re-raise a callee's NOT_FOUND with its reason intact.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tally_kit.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TallyError,
    Unauthenticated,
    Unavailable,
)

_ERROR_BY_CODE: dict[grpc.StatusCode, type[TallyError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
    )
}


class UpstreamError(TallyError):
    """A callee's error whose code has no TallyError of its own (INTERNAL, DEADLINE_EXCEEDED, ...)."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ):
        super().__init__(message, reason=reason or code.name, metadata=metadata)
        self.code = code


def error_domain(service_name: str) -> str:
    """The ErrorInfo domain of a service, e.g. `ledger.tally`."""
    return f"{service_name}.tally"


def to_grpc_status(error: TallyError, domain: str) -> grpc.Status:
    """The status a server answers `error` with: code, message and `google.rpc` details."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=error.metadata)
    )
    if isinstance(error, InvalidArgument):
        status.details.add().Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.violations
                ]
            )
        )
    return rpc_status.to_status(status)


def error_from_rpc(error: grpc.aio.AioRpcError) -> TallyError:
    """The TallyError matching a callee's failed call, its ErrorInfo reason and metadata preserved."""
    code = error.code()
    message = error.details() or code.name
    info, bad_request = _details_of(error)
    reason = info.reason if info is not None else None
    metadata = dict(info.metadata) if info is not None else None
    if code is grpc.StatusCode.INVALID_ARGUMENT and bad_request is not None:
        violations = [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
        return InvalidArgument(violations, reason=reason)
    error_class = _ERROR_BY_CODE.get(code)
    if error_class is None:
        return UpstreamError(message, code=code, reason=reason, metadata=metadata)
    return error_class(message, reason=reason, metadata=metadata)


def _details_of(
    error: grpc.aio.AioRpcError,
) -> tuple[error_details_pb2.ErrorInfo | None, error_details_pb2.BadRequest | None]:
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        # The status details contradict the call's own code or message: trust neither.
        return None, None
    info: error_details_pb2.ErrorInfo | None = None
    bad_request: error_details_pb2.BadRequest | None = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
    return info, bad_request
