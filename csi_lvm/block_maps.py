"""The block maps of thin snapshots: the ranges a snapshot maps, and the
ranges where two snapshots of one volume differ, read from the thin pool's
own metadata (changed block tracking for the SnapshotMetadata service).

Each read takes the pool's metadata snapshot (one per pool: the kernel keeps
no more), runs ``thin_dump`` or ``thin_delta`` on it, spools the merged byte
ranges to a temporary file and lets the metadata snapshot go again, all
before the caller sees the first range: a slow reader never keeps the pool's
metadata snapshot from the next call. Calls on one pool take turns.

Whose metadata snapshot is held: before reserving one, the driver writes a
record of it in its state directory (the plugin's directory on the host,
which outlives restarts), and removes it once it is released. A pool with a
snapshot held and such a record is the driver's, left by a crash, and is
released (at start-up, or by the next call); a pool with one held and no
record belongs to someone else (an admin's ``thin_dump``, a backup tool) and
is left alone, with an error that says how to release it.

Thick classes have no block map: their snapshots are full copies. Only the
reserve and release messages touch a pool's metadata; nothing here writes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from csi_lvm.block_ranges import RangeSpool, merged, scaled
from csi_lvm.config import Config
from csi_lvm.errors import Aborted, FailedPrecondition, Internal, InvalidArgument, NotFound
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.errors import MetadataSnapshotHeld, PoolNotActive, ThinDeviceMissing
from csi_lvm.lvm.names import dm_name
from csi_lvm.lvm.records import LogicalVolume, PoolStatus
from csi_lvm.lvm.thin_metadata import ThinDevice, ThinMetadata
from csi_lvm.volumes import Owned

log = structlog.get_logger("csi_lvm.block_maps")

# How long a call waits for another call's read of the same pool (each holds
# the pool only while the tool reads its metadata, not while ranges stream).
POOL_WAIT_SECONDS = 60.0
# A release in a ``finally`` must not wait on a caller's spent deadline.
RELEASE_SECONDS = 30.0


@dataclass
class BlockMap:
    """Byte ranges of one snapshot (its allocation, or its difference from a
    base), spooled: ``capacity_bytes`` is the snapshot's size."""

    capacity_bytes: int
    chunk_bytes: int
    ranges: RangeSpool

    def close(self) -> None:
        self.ranges.close()


def thin_only(snapshot: Owned) -> None:
    """Refuse a snapshot of a thick class: it is a full copy without a map."""
    if not snapshot.device_class.is_thin:
        raise FailedPrecondition(
            f"snapshot {snapshot.id} is in device class {snapshot.device_class.name!r}, a "
            "thick class: its snapshots are full copies (linear LVs) with no block map, so "
            "csi-lvm's SnapshotMetadata service, which covers thin classes only, cannot "
            "tell which blocks it holds or changed; back it up whole"
        )


class PoolReservations:
    """The pools' metadata snapshots: reserved for one call at a time per
    pool, released in every case, with a record on disk while held."""

    def __init__(self, tools: ThinMetadata, state_dir: str) -> None:
        self.tools = tools
        self.state_dir = Path(state_dir)
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}

    def _lock(self, volume_group: str, pool: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((volume_group, pool), threading.Lock())

    def record_path(self, volume_group: str, pool: str) -> Path:
        return self.state_dir / f"metadata-snapshot.{dm_name(volume_group, pool)}.json"

    def _record(self, volume_group: str, pool: str) -> dict[str, object] | None:
        try:
            found = json.loads(self.record_path(volume_group, pool).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable, but there: still ours
        return found if isinstance(found, dict) else {}

    def _write_record(self, volume_group: str, pool: str, held_root: int | None) -> None:
        path = self.record_path(volume_group, pool)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "pool": f"{volume_group}/{pool}",
            "held_root": held_root,
            "pid": os.getpid(),
            "since": time.time(),
        }
        partial = path.with_suffix(".partial")
        with open(partial, "w") as out:
            json.dump(record, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)

    def _forget(self, volume_group: str, pool: str) -> None:
        self.record_path(volume_group, pool).unlink(missing_ok=True)

    def _is_ours(self, volume_group: str, pool: str, status: PoolStatus) -> bool:
        """Whether the pool's held metadata snapshot is one the driver took:
        its record is there, and names that snapshot (or was written just
        before the reservation, when the block was not known yet)."""
        record = self._record(volume_group, pool)
        if record is None:
            return False
        root = record.get("held_root")
        return root is None or root == status.held_root

    def theirs(self, volume_group: str, pool: str, status: PoolStatus) -> FailedPrecondition:
        return FailedPrecondition(
            f"thin pool {volume_group}/{pool} has a metadata snapshot reserved by something "
            f"other than csi-lvm (block {status.held_root}); the kernel keeps one per pool, so "
            "csi-lvm leaves it alone. Once whatever took it is done, release it with: "
            f"dmsetup message {status.device} 0 release_metadata_snap"
        )

    @contextlib.contextmanager
    def held(self, volume_group: str, pool: str, timeout: float | None) -> Iterator[None]:
        """The pool's metadata snapshot, reserved for the body and released
        after it, whatever happens."""
        wait = POOL_WAIT_SECONDS if timeout is None else min(timeout, POOL_WAIT_SECONDS)
        lock = self._lock(volume_group, pool)
        if not lock.acquire(timeout=wait):
            raise Aborted(
                f"another call is reading thin pool {volume_group}/{pool}'s metadata; retry"
            )
        try:
            status = self._status(volume_group, pool, timeout)
            if status.held_root is not None:
                if not self._is_ours(volume_group, pool, status):
                    raise self.theirs(volume_group, pool, status)
                log.warning("releasing csi-lvm's stale metadata snapshot", pool=pool)
                self.tools.release(status, RELEASE_SECONDS)
            self._write_record(volume_group, pool, None)
            try:
                self.tools.reserve(status, timeout)
            except MetadataSnapshotHeld as exc:
                self._forget(volume_group, pool)
                now = self._status(volume_group, pool, timeout)
                raise self.theirs(volume_group, pool, now) from exc
            except BaseException:
                self._forget(volume_group, pool)
                raise
            try:
                held = self._status(volume_group, pool, timeout).held_root
                self._write_record(volume_group, pool, held)
                yield
            finally:
                self._release(volume_group, pool, status)
        finally:
            lock.release()

    def _status(self, volume_group: str, pool: str, timeout: float | None) -> PoolStatus:
        try:
            return self.tools.pool_status(volume_group, pool, timeout)
        except PoolNotActive as exc:
            raise FailedPrecondition(str(exc)) from exc

    def _release(self, volume_group: str, pool: str, status: PoolStatus) -> None:
        """Let the metadata snapshot go; a failure keeps the record, so the
        next call or start-up releases it (the call's own error stands)."""
        try:
            self.tools.release(status, RELEASE_SECONDS)
        except Exception as error:
            log.error(
                "releasing a metadata snapshot failed; the next call or a restart retries",
                pool=f"{volume_group}/{pool}",
                error=str(error),
            )
            return
        self._forget(volume_group, pool)

    def release_stale(self, pools: list[tuple[str, str]]) -> None:
        """At start-up: release the metadata snapshots a crash of the driver
        left reserved, and only those (see the module's docstring)."""
        for volume_group, pool in pools:
            if self._record(volume_group, pool) is None:
                continue
            try:
                status = self.tools.pool_status(volume_group, pool)
                if status.held_root is None:
                    log.info("no metadata snapshot held", pool=f"{volume_group}/{pool}")
                elif self._is_ours(volume_group, pool, status):
                    self.tools.release(status)
                    log.warning(
                        "released the metadata snapshot an earlier run of csi-lvm left reserved",
                        pool=f"{volume_group}/{pool}",
                    )
                else:
                    log.warning(
                        "a metadata snapshot reserved by someone else; left alone",
                        pool=f"{volume_group}/{pool}",
                    )
                self._forget(volume_group, pool)
            except Exception as error:  # the record stays: the next call retries
                log.warning(
                    "could not check for a stale metadata snapshot",
                    pool=f"{volume_group}/{pool}",
                    error=str(error),
                )


class BlockMaps:
    """Allocated and changed ranges of thin snapshots."""

    def __init__(self, lvm: Lvm, reservations: PoolReservations) -> None:
        self.lvm = lvm
        self.reservations = reservations
        self.tools = reservations.tools
        # Spools go to the state directory: on the host and writable where the
        # container's own filesystem may not be (their files are unlinked).
        self.spool_dir = str(reservations.state_dir)

    @staticmethod
    def thin_pools(config: Config) -> list[tuple[str, str]]:
        return sorted({(c.volume_group, c.thin_pool) for c in config.device_classes if c.thin_pool})

    def _thin_lvs(
        self, snapshots: list[Owned], timeout: float | None
    ) -> tuple[LogicalVolume, list[int]]:
        """The pool's record and each snapshot's thin device id."""
        device_class = snapshots[0].device_class
        group, pool = device_class.volume_group, device_class.thin_pool
        assert pool is not None  # thin_only passed
        found = self.lvm.thin_lvs(group, [pool, *(s.lv.name for s in snapshots)], timeout)
        ids = []
        for snapshot in snapshots:
            lv = found.get(snapshot.lv.name)
            if lv is None:
                raise NotFound(f"snapshot {snapshot.id} does not exist (it was just deleted)")
            if lv.thin_id is None:
                raise Internal(f"LVM reports no thin device id for {lv.full_name}")
            ids.append(lv.thin_id)
        if pool not in found:
            raise FailedPrecondition(f"thin pool {group}/{pool} is missing")
        return found[pool], ids

    def allocated(self, snapshot: Owned, timeout: float | None) -> BlockMap:
        """The ranges ``snapshot`` maps, in the pool's chunks, merged."""
        thin_only(snapshot)
        pool, (dev_id,) = self._thin_lvs([snapshot], timeout)
        os.makedirs(self.spool_dir, exist_ok=True)
        spool = RangeSpool(self.spool_dir)
        try:
            with self.reservations.held(pool.vg_name, pool.name, timeout):
                metadata = self.tools.metadata_node(pool.vg_name, pool.name, timeout)
                try:
                    with self.tools.mapped(metadata, dev_id, timeout) as listing:
                        chunk = _chunk(pool, listing.chunk_bytes)
                        spool.write(scaled(merged(listing.mappings()), chunk, snapshot.size_bytes))
                        present = listing.devices_seen > 0
                except ThinDeviceMissing:
                    present = False
            if not present:
                raise NotFound(f"snapshot {snapshot.id} does not exist (it was just deleted)")
            return BlockMap(snapshot.size_bytes, chunk, spool)
        except BaseException:
            spool.close()
            raise

    def delta(self, base: Owned, target: Owned, timeout: float | None) -> BlockMap:
        """The ranges where ``target`` differs from ``base`` (two snapshots of
        one volume, the base taken first), merged."""
        thin_only(target)
        thin_only(base)
        pool, (base_id, target_id) = self._thin_lvs([base, target], timeout)
        os.makedirs(self.spool_dir, exist_ok=True)
        spool = RangeSpool(self.spool_dir)
        try:
            with self.reservations.held(pool.vg_name, pool.name, timeout):
                metadata = self.tools.metadata_node(pool.vg_name, pool.name, timeout)
                devices = self._devices(metadata, {base_id, target_id}, timeout)
                for snapshot, dev_id in ((base, base_id), (target, target_id)):
                    if dev_id not in devices:
                        raise NotFound(f"snapshot {snapshot.id} does not exist (just deleted)")
                if _later(devices[base_id], devices[target_id]):
                    raise InvalidArgument(
                        f"base snapshot {base.id} was taken after target snapshot {target.id}; "
                        "the target must be the later snapshot: swap them"
                    )
                try:
                    with self.tools.delta(metadata, base_id, target_id, timeout) as listing:
                        chunk = _chunk(pool, listing.chunk_bytes)
                        spool.write(scaled(merged(listing.differences()), chunk, target.size_bytes))
                except ThinDeviceMissing as exc:
                    raise NotFound(f"a snapshot was deleted during the call: {exc}") from exc
            return BlockMap(target.size_bytes, chunk, spool)
        except BaseException:
            spool.close()
            raise

    def _devices(
        self, metadata: str, wanted: set[int], timeout: float | None
    ) -> dict[int, ThinDevice]:
        with self.tools.device_details(metadata, timeout) as listing:
            return {d.dev_id: d for d in listing.devices() if d.dev_id in wanted}


def _later(first: ThinDevice, second: ThinDevice) -> bool:
    """Whether ``first`` was made after ``second``: the pool's clock, which
    every snapshot advances, and the device ids LVM hands out in rising order
    for snapshots made within one tick."""
    return (first.creation_time, first.dev_id) > (second.creation_time, second.dev_id)


def _chunk(pool: LogicalVolume, listed_bytes: int) -> int:
    """The pool's chunk, as its metadata states it (the unit of every number
    in the listing); LVM's report must agree."""
    if pool.chunk_bytes and pool.chunk_bytes != listed_bytes:
        raise Internal(
            f"thin pool {pool.full_name}: LVM reports chunks of {pool.chunk_bytes} bytes, its "
            f"metadata {listed_bytes}"
        )
    return listed_bytes
