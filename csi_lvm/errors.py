"""Domain errors and the one table that maps them, and LVM's errors, to gRPC
status codes.

The driver's layers raise these; the LVM layer raises errors of its own kind
(``csi_lvm.lvm.errors``). Only the server's interceptor turns either into a
gRPC status, through ``status_for``; where an LVM refusal means something
particular to the call that met it (a create, a growth), ``refused_create``
and ``refused_growth`` read the same tables here, so no other module picks a
status for one of LVM's refusals.
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


class PermissionDenied(DriverError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(DriverError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DataLoss(DriverError):
    """Data arrived damaged: what it was meant for is discarded, never used."""

    code = grpc.StatusCode.DATA_LOSS


class ConfigError(Exception):
    """The configuration file is unusable; start-up stops with this message."""


class NameTaken(Aborted):
    """A create met an LV of its name that the view it decided from lacked."""


class Vanished(NotFound):
    """A create met an object gone that the view it decided from showed."""


class Refused(DriverError):
    """LVM's refusal, with the status the table below gives it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# What each of LVM's refusals means to a caller. Subclasses come first: the
# first match wins. A class here is a DriverError to raise; a code, a status.
_LVM: tuple[tuple[type[lvm.LvmError], type[DriverError] | grpc.StatusCode], ...] = (
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
# A create that LVM refused. Where another node could serve the call the
# answer is RESOURCE_EXHAUSTED, so that the provisioner reschedules the PVC;
# what the create's view missed is decided again from a report of now.
_CREATING: tuple[tuple[type[lvm.LvmError], type[DriverError] | grpc.StatusCode], ...] = (
    (lvm.LvmAlreadyExists, NameTaken),
    (lvm.LvmNotFound, Vanished),
    (lvm.LvmPoolNeedsRepair, ResourceExhausted),
    *_LVM,
)
# Growing a volume: no room is the range the caller asked being out of reach.
_GROWING: tuple[tuple[type[lvm.LvmError], type[DriverError] | grpc.StatusCode], ...] = (
    (lvm.LvmNoSpace, OutOfRange),
    *_LVM,
)


def _entry(
    error: lvm.LvmError,
    table: tuple[tuple[type[lvm.LvmError], type[DriverError] | grpc.StatusCode], ...],
) -> type[DriverError] | grpc.StatusCode:
    return next(answer for kind, answer in table if isinstance(error, kind))


def _made(answer: type[DriverError] | grpc.StatusCode, message: str) -> DriverError:
    return Refused(answer, message) if isinstance(answer, grpc.StatusCode) else answer(message)


def refused(error: lvm.LvmError, doing: str) -> DriverError:
    """LVM's refusal of ``doing`` (what the call could not do, and what to
    do about it) as the error the table gives it, LVM's words after."""
    return _made(_entry(error, _LVM), f"{doing}: {error}")


def refused_create(error: lvm.LvmError, doing: str) -> DriverError:
    """As ``refused``, for a create of a new volume or snapshot."""
    return _made(_entry(error, _CREATING), f"{doing}: {error}")


def refused_growth(error: lvm.LvmError, doing: str) -> DriverError:
    """As ``refused``, for growing a volume."""
    return _made(_entry(error, _GROWING), f"{doing}: {error}")


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for any exception an RPC handler let escape.

    Unclassified exceptions become INTERNAL (never UNKNOWN) with their type
    named, so a bug still yields an answer an operator can search for.
    """
    if isinstance(error, DriverError):
        return error.code, str(error)
    if isinstance(error, lvm.LvmError):
        answer = _entry(error, _LVM)
        return (answer if isinstance(answer, grpc.StatusCode) else answer.code), str(error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}): {error}"


class Relayed(DriverError):
    """Another csi-lvm's answer to a forwarded call, passed on as it came."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
