"""Errors of the client, one class per gRPC status the coordinator answers.

Every class derives from :class:`SagaError`, which carries the status code and
the coordinator's message (it names the offending field for bad input).
"""

from __future__ import annotations

import grpc


class SagaError(Exception):
    """A call to the coordinator failed."""

    #: The gRPC status this error stands for.
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(SagaError):
    """The request's content was refused; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DefinitionError(InvalidArgument):
    """A definition refused before sending (names, step order)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(SagaError):
    """No such saga or definition."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SagaError):
    """The saga id is taken by a start with other content."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SagaError):
    """The saga is not in a state where this applies."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(SagaError):
    """The saga changed concurrently; try again."""

    code = grpc.StatusCode.ABORTED


class Unauthenticated(SagaError):
    """No credential, or one the coordinator does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SagaError):
    """The credential lacks the role the call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(SagaError):
    """A limit was reached (message size, rate); try later or send less."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SagaError):
    """The coordinator or its database cannot be reached right now; retry."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SagaError):
    """The call took longer than its timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(SagaError):
    """A bug on the coordinator's side."""

    code = grpc.StatusCode.INTERNAL


class ProtocolError(SagaError):
    """The coordinator answered something this SDK does not understand."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[SagaError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}


def from_rpc_error(e: grpc.RpcError) -> SagaError:
    """The error class for a failed call's status."""
    # grpc.aio's AioRpcError has code() and details() without being a
    # grpc.Call.
    code_of = getattr(e, "code", None)
    details_of = getattr(e, "details", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details = details_of() if callable(details_of) else str(e)
    cls = _BY_CODE.get(code)
    if cls is None:
        err = SagaError(details or "")
        err.code = code
        return err
    return cls(details or "")
