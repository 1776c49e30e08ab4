"""Domain errors and the one table that maps them, and LVM's errors, to gRPC
status codes.

The driver's layers raise these; the LVM layer raises errors of its own kind
(``csi_lvm.lvm.errors``). Only the server's interceptor turns either into a
gRPC status, through ``status_for``, so a servicer never picks a status code
by hand for a failure that some lower layer already classified.
"""

from __future__ import annotations

import grpc

from csi_lvm.lvm import errors as lvm


class DriverError(Exception):
    """A failure the caller can act on; its message says what to do."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(DriverError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DriverError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DriverError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(DriverError):
    """Another operation on the same object is in flight; the caller retries."""

    code = grpc.StatusCode.ABORTED


class OutOfRange(DriverError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(DriverError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(DriverError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(DriverError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(DriverError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(DriverError):
    code = grpc.StatusCode.INTERNAL


class ConfigError(Exception):
    """The configuration file is unusable; start-up stops with this message."""


# What each of LVM's refusals means to a caller that did not translate it.
# Subclasses come first: the first match wins.
_LVM_CODES: tuple[tuple[type[lvm.LvmError], grpc.StatusCode], ...] = (
    (lvm.LvmNotFound, grpc.StatusCode.NOT_FOUND),
    (lvm.LvmAlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (lvm.LvmNoSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (lvm.LvmMetadataFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (lvm.LvmInUse, grpc.StatusCode.FAILED_PRECONDITION),
    (lvm.LvmPoolNeedsRepair, grpc.StatusCode.FAILED_PRECONDITION),
    # Retried on this node by the sidecars (non-final), which is right for a
    # check that met a busy device; the message says what to do if it lasts.
    (lvm.LvmPoolCheckFailed, grpc.StatusCode.UNAVAILABLE),
    (lvm.LvmToolMissing, grpc.StatusCode.FAILED_PRECONDITION),
    (lvm.LvmTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (lvm.LvmBadName, grpc.StatusCode.INVALID_ARGUMENT),
    (lvm.LvmError, grpc.StatusCode.INTERNAL),
)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for any exception an RPC handler let escape.

    Unclassified exceptions become INTERNAL (never UNKNOWN) with their type
    named, so a bug still yields an answer an operator can search for.
    """
    if isinstance(error, DriverError):
        return error.code, str(error)
    for kind, code in _LVM_CODES:
        if isinstance(error, kind):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}): {error}"


class Relayed(DriverError):
    """Another csi-lvm's answer to a forwarded call, passed on as it came."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
