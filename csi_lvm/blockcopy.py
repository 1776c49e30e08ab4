"""The only code that copies data between block devices.

A thick snapshot, restore or clone is a block-for-block copy of one LV into a
new one. Nothing here knows about LVM or CSI: callers hand in device nodes
they have already checked (a point-in-time view of the source, and a target
at least as large) and get back what was done.

The copy is correct for any starting content of the target: when it returns,
the first ``source_bytes`` of the target equal the source and the rest of the
target reads as zeros (extents an earlier LV used may hold its old data, and
it must never show through). Each chunk of the source is read; a chunk holding
data is written. A run of all-zero chunks is never written as zeros where the
device can do better: it is first handed to the device as one "punch hole"
request (``fallocate``, which the kernel turns into a write-zeroes or unmap
that guarantees zeros and never falls back to writing them); where the device
cannot, the target is read and only chunks that do not already read as zero
are written. Sparse or freshly provisioned storage thus never gets zeros it
already has, and a redo after an interruption costs reads, not writes.

I/O bypasses the page cache (``O_DIRECT`` with page-aligned buffers, 4 MiB
chunks) where the device allows it, and the target is flushed before the copy
counts as done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from csi_lvm.errors import Internal

CHUNK_BYTES = 4 << 20  # one default LVM extent; a multiple of any sector size
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class CopyError(Internal):
    """Reading or writing a device failed."""


class SourceInUse(CopyError):
    """The source of an exclusive copy is mounted or held by someone else."""


@dataclass(frozen=True)
class CopyStats:
    copied_bytes: int  # chunks holding data, written
    punched_bytes: int  # all-zero runs the device zeroed itself (write-zeroes / unmap)
    zeroed_bytes: int  # all-zero chunks the target did not read as zero, written
    skipped_bytes: int  # all-zero chunks the target already read as zero
    seconds: float


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.fallocate64
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return function


_fallocate = _libc_fallocate()


def punch_zeros(fd: int, offset: int, length: int) -> bool:
    """Make ``length`` bytes at ``offset`` read as zeros without writing them,
    if the device (or file) can; False when it cannot."""
    if _fallocate is None:
        return False
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY, errno.ENODEV, errno.ENOSYS):
        return False
    raise OSError(error, os.strerror(error))


def _open(path: str, flags: int, direct: bool) -> int:
    """The device opened, with O_DIRECT when asked for and the device allows it."""
    flags |= os.O_CLOEXEC
    o_direct = getattr(os, "O_DIRECT", 0)
    if direct and o_direct:
        try:
            return os.open(path, flags | o_direct)
        except OSError:
            pass  # some devices refuse O_DIRECT: fall back to buffered I/O
    return os.open(path, flags)


def _device_bytes(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _read_full(fd: int, buffer: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(buffer):
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count == 0:
            raise CopyError(f"{path} ended at byte {offset + done}, before the data to copy")
        done += count


def _write_full(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        done += os.pwritev(fd, [buffer[done:]], offset + done)


def _all_zero(buffer: memoryview, zeros: bytearray) -> bool:
    # A bytearray compares with any buffer by memcmp: far faster than a loop.
    return (zeros if len(buffer) == len(zeros) else bytearray(len(buffer))) == buffer


class _Copy:
    def __init__(
        self, source_fd: int, target_fd: int, target: str, chunk_bytes: int, offload: bool
    ) -> None:
        self.source_fd, self.target_fd, self.target = source_fd, target_fd, target
        self.chunk_bytes = chunk_bytes
        self.offload = offload
        # Anonymous maps are page-aligned, as O_DIRECT requires, and start zeroed.
        self.maps = [mmap.mmap(-1, chunk_bytes) for _ in range(3)]
        self.data, self.old, self.zeros = (memoryview(m) for m in self.maps)
        self.zero_bytes = bytearray(chunk_bytes)
        self.copied = self.punched = self.zeroed = self.skipped = 0

    def close(self) -> None:
        for view in (self.data, self.old, self.zeros):
            view.release()
        for buffer in self.maps:
            buffer.close()

    def read_source(self, offset: int, length: int, readable: int, path: str) -> bool:
        """Read a chunk (zeros past ``readable``); True when it holds data."""
        if readable:
            _read_full(self.source_fd, self.data[:readable], offset, path)
        self.data[readable:length] = self.zeros[readable:length]
        return not _all_zero(self.data[:length], self.zero_bytes)

    def write_data(self, offset: int, length: int) -> None:
        _write_full(self.target_fd, self.data[:length], offset)
        self.copied += length

    def zero_run(self, start: int, end: int) -> None:
        """Make the target read zeros from ``start`` to ``end``."""
        if start >= end:
            return
        if self.offload:
            if punch_zeros(self.target_fd, start, end - start):
                self.punched += end - start
                return
            self.offload = False  # the device cannot: compare from now on
        offset = start
        while offset < end:
            length = min(self.chunk_bytes, end - offset)
            _read_full(self.target_fd, self.old[:length], offset, self.target)
            if _all_zero(self.old[:length], self.zero_bytes):
                self.skipped += length
            else:
                _write_full(self.target_fd, self.zeros[:length], offset)
                self.zeroed += length
            offset += length


def zero_device(
    target: str, target_bytes: int, chunk_bytes: int = CHUNK_BYTES, offload: bool = True
) -> CopyStats:
    """Make the first ``target_bytes`` of ``target`` read as zeros, by the
    fastest means the device offers: one request to zero the range itself
    (write-zeroes, or an unmap that guarantees zeros), else reading it and
    writing zeros only where it does not read zeros already."""
    if target_bytes < 0 or chunk_bytes <= 0 or chunk_bytes % mmap.PAGESIZE:
        raise CopyError(
            f"cannot zero {target_bytes} bytes of {target} in {chunk_bytes}-byte chunks"
        )
    started = time.monotonic()
    direct = target_bytes % mmap.PAGESIZE == 0
    try:
        target_fd = _open(target, os.O_RDWR, direct)
    except OSError as exc:
        raise CopyError(f"cannot open {target} for writing: {exc.strerror}") from exc
    try:
        if _device_bytes(target_fd) < target_bytes:
            raise CopyError(f"{target} has fewer than {target_bytes} bytes")
        zeroing = _Copy(-1, target_fd, target, chunk_bytes, offload)
        try:
            zeroing.zero_run(0, target_bytes)
            os.fsync(target_fd)
        except OSError as exc:
            raise CopyError(f"zeroing {target} failed: {exc.strerror}") from exc
        finally:
            zeroing.close()
    finally:
        os.close(target_fd)
    return CopyStats(
        0, zeroing.punched, zeroing.zeroed, zeroing.skipped, time.monotonic() - started
    )


def copy_device(
    source: str,
    target: str,
    source_bytes: int,
    target_bytes: int,
    chunk_bytes: int = CHUNK_BYTES,
    offload: bool = True,
    source_exclusive: bool = False,
) -> CopyStats:
    """Make ``target`` hold the first ``source_bytes`` of ``source`` followed
    by zeros up to ``target_bytes``. ``offload=False`` never asks the device to
    zero ranges itself. ``source_exclusive`` holds the source's exclusive
    claim (O_EXCL) while it copies: nothing can mount it meanwhile, and
    SourceInUse when something has it mounted or claimed already."""
    if not 0 <= source_bytes <= target_bytes:
        raise CopyError(
            f"cannot copy {source_bytes} bytes of {source} into {target_bytes} bytes of {target}"
        )
    if chunk_bytes <= 0 or chunk_bytes % mmap.PAGESIZE:
        raise CopyError(f"chunk size {chunk_bytes} is not a multiple of the page size")
    # Direct I/O needs every transfer aligned; LV sizes are whole extents.
    direct = source_bytes % mmap.PAGESIZE == 0 and target_bytes % mmap.PAGESIZE == 0
    started = time.monotonic()
    offset = 0
    try:
        source_fd = _open(source, os.O_RDONLY | (os.O_EXCL if source_exclusive else 0), direct)
    except OSError as exc:
        if source_exclusive and exc.errno == errno.EBUSY:
            raise SourceInUse(f"{source} is mounted or claimed by another user") from exc
        raise CopyError(f"cannot open {source} for reading: {exc.strerror}") from exc
    try:
        try:
            target_fd = _open(target, os.O_RDWR, direct)
        except OSError as exc:
            raise CopyError(f"cannot open {target} for writing: {exc.strerror}") from exc
        copy = _Copy(source_fd, target_fd, target, chunk_bytes, offload)
        try:
            for fd, path, wanted in ((source_fd, source, source_bytes),
                                     (target_fd, target, target_bytes)):  # fmt: skip
                size = _device_bytes(fd)
                if size < wanted:
                    raise CopyError(f"{path} has {size} bytes, {wanted} needed")
            zeros_from = 0  # start of the run of all-zero chunks not yet handled
            while offset < target_bytes:
                length = min(chunk_bytes, target_bytes - offset)
                readable = max(0, min(length, source_bytes - offset))
                if readable and copy.read_source(offset, length, readable, source):
                    copy.zero_run(zeros_from, offset)
                    copy.write_data(offset, length)
                    zeros_from = offset + length
                elif not readable:  # past the source: the rest is one run of zeros
                    offset = target_bytes
                    break
                offset += length
            copy.zero_run(zeros_from, target_bytes)
            os.fsync(target_fd)
        except OSError as exc:
            raise CopyError(
                f"copying {source} to {target} failed near byte {offset}: {exc.strerror}"
            ) from exc
        finally:
            copy.close()
            os.close(target_fd)
    finally:
        os.close(source_fd)
    return CopyStats(
        copy.copied, copy.punched, copy.zeroed, copy.skipped, time.monotonic() - started
    )


# ---- ranges sent between nodes (csi_lvm.peer_source, csi_lvm.peer_copy)

# One message of a cross-node copy: gRPC's cost per message is large enough
# that 1 MiB pieces streamed at half the rate of 4 MiB ones (measured over
# mutual TLS on loopback); the peers' channels take messages of up to 16 MiB.
PIECE_BYTES = 4 << 20
AHEAD = 2  # pieces read before the sender asks for them

Item = TypeVar("Item")


def read_ranges(
    device: str, ranges: Iterable[tuple[int, int]], piece_bytes: int = PIECE_BYTES
) -> Iterator[tuple[int, bytes]]:
    """The data of ``device`` in each ``(offset, length)`` range, in pieces of
    at most ``piece_bytes`` at their offsets."""
    try:
        fd = _open(device, os.O_RDONLY, direct=False)
    except OSError as exc:
        raise CopyError(f"cannot open {device} for reading: {exc.strerror}") from exc
    try:
        for start, length in ranges:
            offset, end = start, start + length
            while offset < end:
                size = min(piece_bytes, end - offset)
                try:
                    data = os.pread(fd, size, offset)
                except OSError as exc:
                    raise CopyError(
                        f"reading {device} at byte {offset} failed: {exc.strerror}"
                    ) from exc
                if len(data) != size:
                    raise CopyError(f"{device} ended at byte {offset + len(data)}, inside its data")
                yield offset, data
                offset += size
            # The source is read once: keep it from crowding the page cache.
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_ahead(items: Iterator[Item], depth: int = AHEAD) -> Generator[Item, None, None]:
    """``items``, produced on a thread of their own up to ``depth`` ahead of
    the consumer, so that reading a device overlaps sending what was read
    (gRPC's server sends one message at a time and asks for the next only
    when it has gone). An error of ``items`` is raised where the consumer
    would have got the item; a consumer that stops early stops the thread,
    which closes ``items`` (its ``finally`` runs)."""
    ready: queue.Queue[tuple[bool, Item | BaseException | None]] = queue.Queue(depth)
    stopped = threading.Event()

    def offer(entry: tuple[bool, Item | BaseException | None]) -> bool:
        while not stopped.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((True, item)):
                    return
            offer((False, None))
        except BaseException as error:  # handed to the consumer
            offer((False, error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name="read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            more, entry = ready.get()
            if not more:
                if isinstance(entry, BaseException):
                    raise entry
                return
            yield entry  # type: ignore[misc]
    finally:
        stopped.set()
        producer.join()


class RangeWriter:
    """Writes pieces at their offsets into a device of at least ``size_bytes``;
    ``flush`` makes what was written durable (a resumable copy records its
    progress only after it)."""

    def __init__(self, device: str, size_bytes: int) -> None:
        self.device = device
        try:
            self.fd = _open(device, os.O_RDWR, direct=False)
        except OSError as exc:
            raise CopyError(f"cannot open {device} for writing: {exc.strerror}") from exc
        try:
            size = _device_bytes(self.fd)
        except OSError:
            os.close(self.fd)
            raise
        if size < size_bytes:
            os.close(self.fd)
            raise CopyError(f"{device} has {size} bytes, {size_bytes} needed")
        self.size_bytes = size_bytes
        self.written = 0

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size_bytes:
            raise CopyError(
                f"a piece of {len(data)} bytes at {offset} does not fit the {self.size_bytes} "
                f"bytes of {self.device}"
            )
        try:
            _write_full(self.fd, memoryview(data), offset)
        except OSError as exc:
            raise CopyError(
                f"writing {self.device} at byte {offset} failed: {exc.strerror}"
            ) from exc
        self.written += len(data)

    def flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise CopyError(f"flushing {self.device} failed: {exc.strerror}") from exc

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> RangeWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
