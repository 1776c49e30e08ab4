"""Formatting a device that is known to read zeros, without zeroing it again.

mkfs.xfs zeroes its whole log (64 MiB or more) with
``fallocate(FALLOC_FL_ZERO_RANGE)``. dm-thin offers no write-zeroes, so the
kernel writes zero pages and the pool maps every block of the log: on a slow
CPU that is most of a first NodeStageVolume. On a thin LV that maps no block,
in a pool that zeroes each block it maps, those blocks read zeros already, as
mke2fs's ``lazy_journal_init`` assumes for ext4.

A seccomp filter answers exactly that call (fallocate with the zero-range bit)
with success, without I/O. Seccomp filters belong to a thread and are inherited
by the processes it starts, so the filter is installed only on the worker
threads of one executor here: the driver's other threads, and every command
they start, never see it. Where the filter cannot be installed (an unknown
CPU, a runtime that forbids seccomp) the function runs unfiltered and the
kernel zeroes as usual: slower, never wrong.
"""

from __future__ import annotations

import ctypes
import platform
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import structlog

log = structlog.get_logger("csi_lvm.zero_range")

T = TypeVar("T")

FALLOC_FL_ZERO_RANGE = 0x10
# (AUDIT_ARCH_* value, fallocate's system call number) per machine.
_ARCHES = {"x86_64": (0xC000003E, 285), "aarch64": (0xC00000B7, 47)}

# Classic BPF, as seccomp runs it (linux/filter.h, linux/seccomp.h).
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
_SECCOMP_RET_ERRNO, _SECCOMP_RET_ALLOW = 0x00050000, 0x7FFF0000
# Offsets in struct seccomp_data: nr, arch, then args[] from 16; the low half
# of args[1] (fallocate's mode) is at 24 on these little-endian machines.
_NR, _ARCH, _MODE = 0, 4, 24
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2

_WORKERS = 2


def filter_instructions(machine: str) -> list[tuple[int, int, int, int]] | None:
    """The filter as (code, jump if true, jump if false, operand), or None for
    a machine whose numbers are not known here. Anything that is not a
    zero-range fallocate of this architecture is allowed, and a zero-range
    fallocate returns 0 (RET_ERRNO with errno 0) without running."""
    numbers = _ARCHES.get(machine)
    if numbers is None:
        return None
    arch, fallocate_nr = numbers
    return [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ_K, 0, 5, arch),  # another ABI (e.g. 32-bit calls): allow
        (_LD_W_ABS, 0, 0, _NR),
        (_JEQ_K, 0, 3, fallocate_nr),
        (_LD_W_ABS, 0, 0, _MODE),
        (_JSET_K, 0, 1, FALLOC_FL_ZERO_RANGE),
        (_RET_K, 0, 0, _SECCOMP_RET_ERRNO | 0),
        (_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
    ]


def filter_program(machine: str) -> bytes | None:
    """The filter as the kernel reads it: struct sock_filter, one per 8 bytes."""
    instructions = filter_instructions(machine)
    if instructions is None:
        return None
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in instructions)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_state = threading.local()


def _install_on_this_thread() -> None:
    """Executor initializer: put the filter on the calling thread only (no
    SECCOMP_FILTER_FLAG_TSYNC). Never raises: a broken initializer would break
    the whole executor, and an unfiltered worker is still correct."""
    _state.filtered = False
    program = filter_program(platform.machine())
    if program is None:
        _state.reason = f"no seccomp filter for machine {platform.machine()!r}"
        return
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    # no_new_privs is also per thread; it lets seccomp work without CAP_SYS_ADMIN.
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _state.reason = f"prctl(PR_SET_NO_NEW_PRIVS) failed: errno {ctypes.get_errno()}"
        return
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        _state.reason = f"prctl(PR_SET_SECCOMP) failed: errno {ctypes.get_errno()}"
        return
    _state.filtered = True


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_warned = False


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=_WORKERS,
                thread_name_prefix="zero-range-skipped",
                initializer=_install_on_this_thread,
            )
        return _executor


def _call_and_report(function: Callable[[], T]) -> tuple[T, bool]:
    global _warned
    filtered = bool(getattr(_state, "filtered", False))
    if not filtered and not _warned:
        _warned = True
        log.warning(
            "zero-range requests will reach the kernel; formatting a blank thin LV takes longer",
            reason=getattr(_state, "reason", "unknown"),
        )
    return function(), filtered


def call_with_zero_range_skipped(function: Callable[[], T]) -> tuple[T, bool]:
    """Call ``function`` on a thread whose child processes have their
    zero-range fallocates answered without I/O. Only for commands aimed at a
    device that reads zeros wherever they would zero. The flag says whether the
    filter was in place; when it was not, the call ran as usual."""
    return _pool().submit(_call_and_report, function).result()
