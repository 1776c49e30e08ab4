"""An in-memory LVM: the verbs of ``csi_lvm.lvm.commands.Lvm`` that the
driver uses, over a model of volume groups, thin pools and LVs kept in this
process, so the servicers' logic (idempotency, paging, reservations, repairs,
the error table) is tested on the host in seconds.

It stands in for LVM's bookkeeping only: nothing here has a device, so what
touches the kernel (device-mapper, mounts, filesystems, copies) is tested on
the real thing. ``tests/contract`` runs the same cases against this model and
against real LVM in the VM; a behaviour the model gets wrong fails there.

What the model keeps, as LVM does: sizes rounded up to whole extents; a VG's
free space; a thin pool's blocks, shared between a thin LV and its snapshots
and freed with the last LV that maps them; classic snapshots that take COW
space and go with their origin; activation and the activation-skip flag; an
open device that refuses removal; the VG's sequence number; the change
journal. LVM's refusals are raised as the errors its messages classify as.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.errors import LvmAlreadyExists, LvmError, LvmInUse, LvmNoSpace, LvmNotFound
from csi_lvm.lvm.names import check_lv_names, check_name, dm_name, tag_args
from csi_lvm.lvm.records import LogicalVolume, LvAttr, PoolFill, VolumeGroup
from csi_lvm.lvm.runner import Runner

MiB = 1 << 20
SECTOR = 512
# What LVM's defaults give a loop-backed VG and a pool of its size: 4 MiB
# extents, 64 KiB pool chunks, a pool metadata LV (and its spare) of 4 MiB.
EXTENT_BYTES = 4 * MiB
CHUNK_BYTES = 64 << 10
POOL_METADATA_BYTES = 4 * MiB
# Room in a VG's metadata area, and what each LV's record takes of it.
METADATA_AREA_BYTES = 1020 * 1024
LV_RECORD_BYTES = 800


@dataclass(eq=False)
class _Blocks:
    """Pool blocks written once and mapped by every LV that shares them."""

    size: int


@dataclass(eq=False)
class _Lv:
    name: str
    size: int
    tags: list[str]
    kind: str  # "pool", "thin", "linear", "cow"
    pool: str = ""
    origin: str = ""
    active: bool = True
    skip_activation: bool = False
    thin_id: int | None = None
    blocks: list[_Blocks] = field(default_factory=list)
    uuid: str = field(default_factory=lambda: uuid.uuid4().hex[:32])
    created: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S %z"))


@dataclass(eq=False)
class _Vg:
    name: str
    size: int
    lvs: dict[str, _Lv] = field(default_factory=dict)
    seqno: int = 1
    next_thin_id: int = 1

    def used(self) -> int:
        taken = 0
        for lv in self.lvs.values():
            if lv.kind == "pool":
                taken += lv.size + 2 * POOL_METADATA_BYTES  # metadata and its spare
            elif lv.kind in ("linear", "cow"):
                taken += lv.size
        return taken

    @property
    def free(self) -> int:
        return self.size - self.used()


class MemoryLvm(Lvm):
    """The verbs over an in-memory model. ``add_volume_group`` and
    ``add_thin_pool`` set the stage as an admin's vgcreate and lvcreate
    would; ``write`` is a tenant's write into a thin LV; ``open`` holds an
    LV's device open; ``refuse_next`` makes the next call of a verb fail as
    LVM would, for the error table's tests."""

    def __init__(self) -> None:
        super().__init__(Runner(binary="lvm-in-memory"))
        self._vgs: dict[str, _Vg] = {}
        self._lock = threading.RLock()
        self._open: dict[tuple[str, str], int] = {}
        self._refusals: dict[str, list[LvmError]] = {}

    # ---- the stage an admin sets

    def add_volume_group(self, name: str, size_bytes: int) -> None:
        check_name(name, "volume group")
        with self._lock:
            self._vgs[name] = _Vg(name, _whole_extents(size_bytes - MiB, down=True))

    def add_thin_pool(self, volume_group: str, name: str, size_bytes: int) -> None:
        with self._lock:
            vg = self._vg(volume_group)
            size = _whole_extents(size_bytes)
            self._check_room(vg, size + 2 * POOL_METADATA_BYTES)
            vg.lvs[name] = _Lv(name, size, [], "pool")
            vg.seqno += 1

    # ---- what tenants and tests do beside the driver

    def write(self, volume_group: str, name: str, nbytes: int) -> None:
        """A tenant writes ``nbytes`` into new places of a thin LV: its pool
        maps that many new bytes (in whole chunks), never more than the LV holds."""
        with self._lock:
            vg = self._vg(volume_group)
            lv = self._lv(vg, name)
            if lv.kind != "thin" or not lv.active:
                raise LvmError(f"{volume_group}/{name} is not an active thin LV")
            mapped = sum(blocks.size for blocks in lv.blocks)
            size = min(-(-nbytes // CHUNK_BYTES) * CHUNK_BYTES, lv.size - mapped)
            pool = vg.lvs[lv.pool]
            if _pool_used(vg, pool) + size > pool.size:
                raise OSError(28, f"thin pool {volume_group}/{lv.pool} is out of data space")
            lv.blocks.append(_Blocks(size))

    @contextlib.contextmanager
    def open(self, volume_group: str, name: str) -> Iterator[None]:
        """The LV's device held open (mounted, or read by a copy) meanwhile."""
        key = (volume_group, name)
        with self._lock:
            self._lv(self._vg(volume_group), name)
            self._open[key] = self._open.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._open[key] -= 1

    def refuse_next(self, verb: str, error: LvmError) -> None:
        """The next call of ``verb`` (a method name: ``create_thin_volume``)
        fails with ``error`` once the change has started, as LVM's would."""
        with self._lock:
            self._refusals.setdefault(verb, []).append(error)

    # ---- reads

    def list_lvs(
        self, volume_groups: Iterable[str], timeout: float | None = None
    ) -> list[LogicalVolume]:
        return self.scan(volume_groups, timeout)[0]

    def scan(
        self, volume_groups: Iterable[str], timeout: float | None = None
    ) -> tuple[list[LogicalVolume], list[VolumeGroup]]:
        groups = sorted(set(volume_groups))
        for group in groups:
            check_name(group, "volume group")
        with self._lock:
            vgs = [self._vg(group) for group in groups]
            return (
                [self._record(vg, lv) for vg in vgs for lv in _sorted(vg)],
                [self._vg_record(vg) for vg in vgs],
            )

    def thin_pools(
        self, volume_groups: Iterable[str], timeout: float | None = None
    ) -> tuple[list[LogicalVolume], list[VolumeGroup]]:
        lvs, vgs = self.scan(volume_groups, timeout)
        return [lv for lv in lvs if lv.attr.is_thin_pool], vgs

    def find_lv(
        self, volume_group: str, name: str, timeout: float | None = None
    ) -> LogicalVolume | None:
        check_lv_names(volume_group, name)
        with self._lock:
            vg = self._vg(volume_group)
            lv = vg.lvs.get(name)
            return None if lv is None else self._record(vg, lv)

    def thin_lvs(
        self, volume_group: str, names: Iterable[str], timeout: float | None = None
    ) -> dict[str, LogicalVolume]:
        wanted = sorted(set(names))
        check_lv_names(volume_group, *wanted)
        with self._lock:
            vg = self._vg(volume_group)
            return {n: self._record(vg, vg.lvs[n], thin=True) for n in wanted if n in vg.lvs}

    def snapshots_of(
        self, volume_group: str, origin: str, timeout: float | None = None
    ) -> list[LogicalVolume]:
        check_lv_names(volume_group, origin)
        with self._lock:
            vg = self._vg(volume_group)
            return [self._record(vg, lv) for lv in _sorted(vg) if lv.origin == origin]

    def find_lvs_named(self, name: str, timeout: float | None = None) -> list[LogicalVolume]:
        check_name(name, "logical volume")
        with self._lock:
            return [
                self._record(vg, vg.lvs[name])
                for vg in sorted(self._vgs.values(), key=lambda vg: vg.name)
                if name in vg.lvs
            ]

    def list_vgs(
        self, names: Iterable[str] = (), timeout: float | None = None
    ) -> list[VolumeGroup]:
        groups = sorted(set(names))
        for group in groups:
            check_name(group, "volume group")
        with self._lock:
            return [
                self._vg_record(vg)
                for name, vg in sorted(self._vgs.items())
                if not groups or name in groups
            ]

    def thin_mapped_sectors(self, lv: LogicalVolume, timeout: float | None = None) -> int | None:
        with self._lock:
            vg = self._vgs.get(lv.vg_name)
            found = None if vg is None else vg.lvs.get(lv.name)
            if found is None or found.kind != "thin" or not found.active:
                return None
            return sum(blocks.size for blocks in found.blocks) // SECTOR

    def pool_fill(
        self, volume_group: str, pool: str, timeout: float | None = None
    ) -> PoolFill | None:
        check_lv_names(volume_group, pool)
        with self._lock:
            vg = self._vgs.get(volume_group)
            found = None if vg is None else vg.lvs.get(pool)
            if vg is None or found is None or found.kind != "pool":
                return None
            data = 100.0 * _pool_used(vg, found) / found.size
            mode = "out_of_data_space" if data >= 100.0 else "rw"
            return PoolFill(data, _metadata_percent(vg, found), mode, False)

    def version(self, timeout: float | None = None) -> str:
        return "LVM version: in-memory model (tests/memory_lvm.py)"

    def run(self, args: Sequence[str], timeout: float | None = None) -> str:
        raise LvmError(f"the in-memory LVM runs no command line ({' '.join(args)})")

    # ---- writes

    def create_thin_volume(
        self,
        volume_group: str,
        pool: str,
        name: str,
        size_bytes: int,
        tags: Sequence[str],
        timeout: float | None = None,
    ) -> None:
        check_name(pool, "thin pool")
        check_lv_names(volume_group, name)
        tag_args(tags)
        with self._changing("create_thin_volume", [(volume_group, name)]):
            vg = self._vg(volume_group)
            self._check_new(vg, name)
            if vg.lvs.get(pool) is None or vg.lvs[pool].kind != "pool":
                raise LvmNotFound(f'Failed to find logical volume "{volume_group}/{pool}"')
            lv = _Lv(name, _whole_extents(size_bytes), list(tags), "thin", pool=pool)
            lv.thin_id = _next_thin_id(vg)
            vg.lvs[name] = lv

    def create_linear_volume(
        self,
        volume_group: str,
        name: str,
        size_bytes: int,
        tags: Sequence[str],
        timeout: float | None = None,
    ) -> None:
        check_lv_names(volume_group, name)
        tag_args(tags)
        with self._changing("create_linear_volume", [(volume_group, name)]):
            vg = self._vg(volume_group)
            self._check_new(vg, name)
            size = _whole_extents(size_bytes)
            self._check_room(vg, size)
            vg.lvs[name] = _Lv(name, size, list(tags), "linear")

    def create_thin_snapshot(
        self,
        volume_group: str,
        origin: str,
        name: str,
        tags: Sequence[str],
        *,
        active: bool,
        timeout: float | None = None,
    ) -> None:
        check_lv_names(volume_group, origin, name)
        tag_args(tags)
        touches = [(volume_group, name), (volume_group, origin)]
        with self._changing("create_thin_snapshot", touches):
            vg = self._vg(volume_group)
            source = self._lv(vg, origin)
            self._check_new(vg, name)
            if source.kind != "thin":
                raise LvmError(f"lvcreate: {volume_group}/{origin} is not a thin volume")
            vg.lvs[name] = _Lv(
                name, source.size, list(tags), "thin", pool=source.pool, origin=origin,
                active=active, skip_activation=not active, thin_id=_next_thin_id(vg),
                blocks=list(source.blocks),
            )  # fmt: skip

    def create_cow_snapshot(
        self,
        volume_group: str,
        origin: str,
        name: str,
        size_bytes: int,
        chunk_bytes: int,
        tags: Sequence[str],
        timeout: float | None = None,
    ) -> None:
        check_lv_names(volume_group, origin, name)
        tag_args(tags)
        touches = [(volume_group, name), (volume_group, origin)]
        with self._changing("create_cow_snapshot", touches):
            vg = self._vg(volume_group)
            source = self._lv(vg, origin)
            self._check_new(vg, name)
            if source.kind != "linear":
                raise LvmError(f"lvcreate: {volume_group}/{origin} cannot take a COW snapshot")
            size = _whole_extents(size_bytes)
            self._check_room(vg, size)
            vg.lvs[name] = _Lv(name, size, list(tags), "cow", origin=origin)

    def remove(self, volume_group: str, name: str, timeout: float | None = None) -> None:
        check_lv_names(volume_group, name)
        with self._changing("remove", [(volume_group, name)], removing=True):
            vg = self._vg(volume_group)
            lv = self._lv(vg, name)
            going = [lv]
            if lv.kind == "linear":  # its COW snapshots go with it
                going += [other for other in vg.lvs.values() if other.origin == name]
            for each in going:
                if self._open.get((volume_group, each.name)):
                    raise LvmInUse(f"Logical volume {volume_group}/{each.name} in use.")
            for each in going:
                del vg.lvs[each.name]
            for other in vg.lvs.values():  # a thin snapshot outlives its origin
                if other.kind == "thin" and other.origin == name:
                    other.origin = ""

    def activate(self, volume_group: str, name: str, timeout: float | None = None) -> None:
        check_lv_names(volume_group, name)
        with self._changing("activate", [(volume_group, name)]):
            self._lv(self._vg(volume_group), name).active = True

    def extend(
        self, volume_group: str, name: str, size_bytes: int, timeout: float | None = None
    ) -> None:
        check_lv_names(volume_group, name)
        with self._changing("extend", [(volume_group, name)]):
            vg = self._vg(volume_group)
            lv = self._lv(vg, name)
            size = _whole_extents(size_bytes)
            if size <= lv.size:
                raise LvmError(
                    f"New size ({size // EXTENT_BYTES} extents) matches existing size "
                    f"({lv.size // EXTENT_BYTES} extents)."
                    if size == lv.size
                    else f"New size given ({size // EXTENT_BYTES} extents) not larger than "
                    f"existing size ({lv.size // EXTENT_BYTES} extents)"
                )
            if lv.kind in ("linear", "cow"):
                self._check_room(vg, size - lv.size)
            lv.size = size

    def delete_tag(
        self, volume_group: str, name: str, tag: str, timeout: float | None = None
    ) -> None:
        check_lv_names(volume_group, name)
        tag_args([tag], "--deltag")
        with self._changing("delete_tag", [(volume_group, name)]):
            lv = self._lv(self._vg(volume_group), name)
            lv.tags = [each for each in lv.tags if each != tag]

    def change_tags(
        self,
        volume_group: str,
        name: str,
        add: Sequence[str],
        delete: Sequence[str],
        timeout: float | None = None,
    ) -> None:
        check_lv_names(volume_group, name)
        tag_args(delete, "--deltag")
        tag_args(add)
        with self._changing("change_tags", [(volume_group, name)]):
            lv = self._lv(self._vg(volume_group), name)
            kept = [each for each in lv.tags if each not in delete or each in add]
            lv.tags = kept + [each for each in add if each not in kept]

    # ---- the model

    @contextlib.contextmanager
    def _changing(
        self, verb: str, touches: Sequence[tuple[str, str]], removing: bool = False
    ) -> Iterator[None]:
        """A change as ``Lvm.change`` makes one: journalled at its start and
        end; the VG's sequence number goes up when it is done."""
        self.journal.changed(touches)
        done = False
        try:
            with self._lock:
                refusals = self._refusals.get(verb)
                if refusals:
                    raise refusals.pop(0)
                yield
                for volume_group, _ in touches[:1]:
                    self._vgs[volume_group].seqno += 1
            done = True
        finally:
            self.journal.changed(touches, removed=done and removing)

    def _vg(self, name: str) -> _Vg:
        vg = self._vgs.get(name)
        if vg is None:
            raise LvmNotFound(f'Volume group "{name}" not found')
        return vg

    @staticmethod
    def _lv(vg: _Vg, name: str) -> _Lv:
        lv = vg.lvs.get(name)
        if lv is None:
            raise LvmNotFound(f'Failed to find logical volume "{vg.name}/{name}"')
        return lv

    @staticmethod
    def _check_new(vg: _Vg, name: str) -> None:
        if name in vg.lvs:
            raise LvmAlreadyExists(f'Logical Volume "{name}" already exists in volume group')

    @staticmethod
    def _check_room(vg: _Vg, size: int) -> None:
        if size > vg.free:
            raise LvmNoSpace(
                f'Volume group "{vg.name}" has insufficient free space '
                f"({vg.free // EXTENT_BYTES} extents): {size // EXTENT_BYTES} required."
            )

    def _record(self, vg: _Vg, lv: _Lv, thin: bool = False) -> LogicalVolume:
        is_open = bool(self._open.get((vg.name, lv.name)))
        if lv.kind == "pool":
            in_use = any(o.kind == "thin" and o.active for o in vg.lvs.values())
            attr = f"twi-a{'o' if in_use else '-'}tz--"
            data: float | None = round(100.0 * _pool_used(vg, lv) / lv.size, 2)
            metadata: float | None = round(_metadata_percent(vg, lv), 2)
        elif lv.kind == "thin":
            state = "a" if lv.active else "-"
            attr = f"Vwi-{state}{'o' if is_open else '-'}tz-{'k' if lv.skip_activation else '-'}"
            mapped = sum(blocks.size for blocks in lv.blocks)
            data = round(100.0 * mapped / lv.size, 2) if lv.active else None
            metadata = None
        elif lv.kind == "cow":
            attr, data, metadata = f"swi-a{'o' if is_open else '-'}s---", 0.0, None
        else:
            origin = any(o.origin == lv.name for o in vg.lvs.values())
            kind, target = ("o", "s") if origin else ("-", "-")
            attr, data, metadata = f"{kind}wi-a{'o' if is_open else '-'}{target}---", None, None
        record = LogicalVolume(
            name=lv.name,
            vg_name=vg.name,
            uuid=lv.uuid,
            size_bytes=lv.size,
            attr=LvAttr(attr),
            pool=lv.pool,
            origin=lv.origin,
            tags=tuple(sorted(lv.tags)),
            data_percent=data,
            metadata_percent=metadata,
            path=f"/dev/{vg.name}/{lv.name}" if lv.active else "",
            dm_path=f"/dev/mapper/{dm_name(vg.name, lv.name)}",
            created=lv.created,
        )
        if not thin:
            return record
        chunk = CHUNK_BYTES if lv.kind == "pool" else 0
        return dataclasses.replace(record, thin_id=lv.thin_id, chunk_bytes=chunk)

    @staticmethod
    def _vg_record(vg: _Vg) -> VolumeGroup:
        return VolumeGroup(
            name=vg.name,
            size_bytes=vg.size,
            free_bytes=vg.free,
            extent_bytes=EXTENT_BYTES,
            attr="wz--n-",
            missing_pvs=0,
            metadata_area_bytes=METADATA_AREA_BYTES,
            metadata_free_bytes=METADATA_AREA_BYTES - LV_RECORD_BYTES * (len(vg.lvs) + 3),
            seqno=vg.seqno,
        )


def _whole_extents(size: int, down: bool = False) -> int:
    extents = size // EXTENT_BYTES if down else -(-size // EXTENT_BYTES)
    return extents * EXTENT_BYTES


def _sorted(vg: _Vg) -> list[_Lv]:
    return [vg.lvs[name] for name in sorted(vg.lvs)]


def _next_thin_id(vg: _Vg) -> int:
    thin_id = vg.next_thin_id
    vg.next_thin_id += 1
    return thin_id


def _pool_used(vg: _Vg, pool: _Lv) -> int:
    """The pool's mapped bytes: each set of blocks once, however many LVs
    share it, while any LV still maps it."""
    seen: dict[int, _Blocks] = {}
    for lv in vg.lvs.values():
        if lv.kind == "thin" and lv.pool == pool.name:
            for blocks in lv.blocks:
                seen[id(blocks)] = blocks
    return sum(blocks.size for blocks in seen.values())


def _metadata_percent(vg: _Vg, pool: _Lv) -> float:
    """A few pages of the pool's metadata per thin LV and per mapped MiB."""
    thin = sum(1 for lv in vg.lvs.values() if lv.kind == "thin" and lv.pool == pool.name)
    pages = 16 + 2 * thin + _pool_used(vg, pool) // MiB
    return min(100.0, 100.0 * pages * 4096 / POOL_METADATA_BYTES)
