"""What a device class can do, as one interface; ``thin`` and ``thick``
implement it.

A backend admits new objects into its class (``admission``: the class open,
the size in whole extents, the room held while the object is made) and
makes its LVs (blank, from a snapshot or volume, a snapshot), finishes the
ones a crash interrupted, grows and deletes them, and knows what its LVs hold
before anything is written. LVM's refusals leave it as the driver's errors
(``csi_lvm.errors`` picks their status), so the servicers never see LVM's own
errors. It never sees a CSI request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import structlog

from csi_lvm import crypt, lifecycle
from csi_lvm.backends import health
from csi_lvm.backends.admission import (
    ClassSpace,
    NoRoom,
    RepairPause,
    Reservations,
    metadata_full,
    metadata_low,
)
from csi_lvm.backends.asks import Ask, Condition, Contents, NewLv
from csi_lvm.backends.health import Finding
from csi_lvm.block_maps import BlockMap, BlockMaps
from csi_lvm.config import DeviceClass
from csi_lvm.errors import (
    Aborted,
    FailedPrecondition,
    OutOfRange,
    ResourceExhausted,
    refused,
    refused_create,
    refused_growth,
)
from csi_lvm.ids import Kind
from csi_lvm.lifecycle import Lifecycle
from csi_lvm.lvm.errors import (
    LvmAlreadyExists,
    LvmError,
    LvmInUse,
    LvmMetadataFull,
    LvmNoSpace,
    LvmPoolNeedsRepair,
)
from csi_lvm.lvm.records import LogicalVolume, RaidState, VolumeGroup
from csi_lvm.validation import SizeRange, choose_size
from csi_lvm.volumes import Inventory, Owned, Scan

log = structlog.get_logger("csi_lvm.backends")

# Runs the cutting of a group's snapshots while the sources' writes are held.
Hold = Callable[[Callable[[], None]], None]


class Backend(ABC):
    """One device class's storage."""

    # Whether making an LV writes all of it (time in proportion to its size).
    slow_to_make = False

    def __init__(self, device_class: DeviceClass, inventory: Inventory, states: Lifecycle):
        self.device_class = device_class
        self.inventory = inventory
        self.lvm = inventory.lvm
        self.states = states
        self.repair_pause = RepairPause()
        self.reservations = Reservations()

    @property
    def name(self) -> str:
        return self.device_class.name

    @property
    def node_id(self) -> str:
        return self.inventory.node_id

    @property
    def offered_here(self) -> bool:
        """Whether the config puts this class on this node at all."""
        return self.device_class.on_node(self.inventory.node_id)

    # ---- room

    def space(self, scan: Scan, *, live: bool = False) -> ClassSpace:
        """The class's capacity, use and room, from one scan; ``live`` also
        reads what the kernel knows now and the scan may not (a thin pool's
        fill, which tenants' writes change without telling anyone)."""
        missing = self.missing(scan)
        group = scan.vgs.get(self.device_class.volume_group)
        if missing is not None:
            return ClassSpace(0, self._extent_bytes(scan), 0, 0, missing=missing)
        assert group is not None  # else it would be missing
        space = self._space(group, scan, live)
        if (kept := min(self.device_class.spare_bytes, space.available_bytes)) > 0:
            space = dataclasses.replace(
                space, available_bytes=space.available_bytes - kept, spare_bytes=kept
            )
        if (full := metadata_full(group)) is not None:
            space = dataclasses.replace(space, available_bytes=0, metadata_full=full)
        if (needs_repair := self.needs_repair()) is None:
            return space
        return dataclasses.replace(space, available_bytes=0, needs_repair=needs_repair)

    @abstractmethod
    def _space(self, group: VolumeGroup, scan: Scan, live: bool) -> ClassSpace:
        """The space of a class whose storage is present."""

    def missing(self, scan: Scan) -> str | None:
        """What of the class's storage this node lacks, with the config line
        that names it; None when all is there."""
        device_class = self.device_class
        if not self.offered_here:
            return (
                f"device class {device_class.name} is not on node {self.node_id}: the config gives "
                f"it to nodes {', '.join(device_class.nodes)} only"
            )
        if device_class.volume_group not in scan.vgs:
            return (
                f"volume group {device_class.volume_group!r} of device class "
                f"{device_class.name} does not exist on node {self.node_id} "
                f"({self.inventory.config.source} line {device_class.volume_group_line})"
            )
        return None

    def needs_repair(self) -> str | None:
        return self.repair_pause.reason()

    def room_for_volume(self, size: int, source: Owned | None, extent_bytes: int) -> int:
        """Room a new ``size``-byte volume takes, blank or made from ``source``."""
        return size

    @abstractmethod
    def room_for_snapshot(self, source: Owned, extent_bytes: int) -> int:
        """Room a snapshot of ``source`` takes."""

    # ---- admission

    @contextmanager
    def _admitted(
        self, ask: Ask, source: Owned | None, scan: Scan, *, snapshot: bool = False
    ) -> Iterator[NewLv]:
        """Admit ``ask`` (a snapshot of ``source`` when ``snapshot``) into the
        class, or refuse it: RESOURCE_EXHAUSTED wherever another node could
        serve the call, so that the provisioner reschedules the PVC. Inside,
        the LV to make; its room is held against concurrent creates until it
        is made, and LVM's refusals leave as driver errors."""
        space = self.space(scan, live=True)
        self._check_open(space)
        extent = space.extent_bytes
        if snapshot and source is not None:
            size, needed = source.size_bytes, self.room_for_snapshot(source, extent)
        else:
            least = max(ask.minimum, source.size_bytes if source is not None else 0)
            size = choose_size(ask.wanted, extent, least)
            needed = self.room_for_volume(size, source, extent)
        new = NewLv(ask.lv_name, size, ask.tags, ask.timeout, extent)
        try:
            with self.reservations.holding(needed, space.available_bytes, scan.started):
                yield new
        except NoRoom as exc:
            during = (
                f" ({size} for the copy, the rest for the temporary snapshot it reads)"
                if needed > size
                else ""
            )
            spare = (
                f"; {space.spare_bytes} more are the class's spare, kept for the growth of "
                "its volumes"
                if space.spare_bytes
                else ""
            )
            raise ResourceExhausted(
                f"device class {self.name} on node {self.node_id} has {exc.available} bytes "
                f"available, {needed} requested{during}{spare}"
            ) from None
        except LvmError as exc:
            raise refused_create(exc, self._create_refusal(exc, ask, size)) from exc

    def _check_open(self, space: ClassSpace) -> None:
        """Refuse any new object in a class that takes none here now (its
        storage is missing or needs repair, its pool is past the threshold)."""
        refusal = space.refusal
        if refusal is None:
            return
        if space.full is not None:
            log.warning("device class full", device_class=self.name, reason=refusal)
        raise ResourceExhausted(
            f"device class {self.name} on node {self.node_id} takes no new volumes: {refusal}"
        )

    def _create_refusal(self, error: LvmError, ask: Ask, size: int) -> str:
        """What a create refused by LVM could not do (the status is the table's)."""
        where = f"device class {self.name} on node {self.node_id}"
        if isinstance(error, LvmPoolNeedsRepair):
            self.repair_pause.note(str(error))
            log.warning("device class needs repair", device_class=self.name, error=str(error))
            return f"{where} takes no new volumes until an admin repairs it"
        if isinstance(error, LvmNoSpace):
            return f"{where} has no room for {size} bytes"
        if isinstance(error, LvmMetadataFull):
            return f"{where} cannot record another LV"
        if isinstance(error, LvmAlreadyExists):
            return f"{ask.what} appeared while being created; retry"
        return f"{where} could not make {ask.what}"

    # ---- making

    def make_blank(self, ask: Ask, scan: Scan) -> int:
        """A new blank volume; its size, in whole extents (exactly what
        lvcreate made, so no report is read back)."""
        with self._admitted(ask, None, scan) as new:
            self._create_blank(new)
        return new.size

    def make_from(self, ask: Ask, source: Owned, scan: Scan) -> Owned:
        """A new volume holding the data of the snapshot or volume ``source``."""
        with self._admitted(ask, source, scan) as new:
            return self._create_from(new, source)

    def make_snapshot(self, ask: Ask, source: Owned, scan: Scan) -> Owned:
        """A snapshot of the volume ``source`` as it is now."""
        with self._admitted(ask, source, scan, snapshot=True) as new:
            return self._snapshot(new, source)

    @abstractmethod
    def make_snapshots_at_once(
        self, members: Sequence[tuple[Ask, Owned]], scan: Scan, hold: Hold
    ) -> list[Owned]:
        """Snapshots of several volumes of this class, all as of one instant:
        ``hold(cut)`` runs ``cut`` while it holds the sources' writes."""

    def finish(
        self,
        existing: Owned,
        source: Owned | None,
        wanted: SizeRange,
        scan: Scan,
        timeout: float | None,
    ) -> Owned:
        """An object a create of the same name made before: as it is when it
        is done, else finished (see ``csi_lvm.lifecycle``), grown to
        ``wanted`` where a restore stopped before its extend."""
        extent = self._extent_bytes(scan)
        size = existing.size_bytes
        if size < wanted.required:
            size = choose_size(wanted, extent, minimum=size)
        new = NewLv(existing.lv.name, size, (), timeout, extent)
        try:
            return self._resume(existing, source, new)
        except LvmError as exc:
            where = f"device class {self.name} on node {self.node_id}"
            raise refused_create(exc, f"{where} could not finish {existing.kind.value} "
                                      f"{existing.name}") from exc  # fmt: skip

    def _extent_bytes(self, scan: Scan) -> int:
        """The unit of the class's sizes: an extent in every stripe."""
        group = scan.vgs.get(self.device_class.volume_group)
        return group.extent_bytes * self.device_class.layout.stripes if group is not None else 0

    @abstractmethod
    def _create_blank(self, new: NewLv) -> None:
        """A new LV of exactly ``new.size`` bytes that reads no earlier
        tenant's data where a filesystem would look."""

    @abstractmethod
    def _create_from(self, new: NewLv, source: Owned) -> Owned:
        """A new volume of at least ``new.size`` bytes holding ``source``'s data."""

    @abstractmethod
    def _snapshot(self, new: NewLv, source: Owned) -> Owned:
        """A snapshot of the volume ``source`` as it is now (``new.size`` is
        the source's)."""

    @abstractmethod
    def _resume(self, existing: Owned, source: Owned | None, new: NewLv) -> Owned:
        """Finish making ``new`` from ``source`` where an interrupted
        ``_create_from`` or ``_snapshot`` left ``existing``. An object that
        is done comes back as it is."""

    # ---- growing

    def grow(self, owned: Owned, wanted: SizeRange, scan: Scan, timeout: float | None) -> int:
        """Grow the volume to the size ``wanted`` gives (whole extents, never
        smaller than it is); that size. OUT_OF_RANGE when the class has no
        room for it."""
        space = self.space(scan, live=True)
        size = choose_size(wanted, space.extent_bytes, minimum=owned.size_bytes)
        if size <= owned.size_bytes:
            return size
        growth = self.room_for_volume(size - owned.size_bytes, None, 0)
        try:
            with self.reservations.holding(growth, space.room_for_growth, scan.started):
                self.lvm.extend(owned.lv.vg_name, owned.lv.name, size, timeout)
        except NoRoom as exc:
            raise OutOfRange(
                f"device class {self.name} has {exc.available} bytes of room; growing to "
                f"{size} needs {growth}"
            ) from None
        except LvmError as exc:
            raise refused_growth(
                exc, f"device class {self.name} cannot grow the volume to {size} bytes"
            ) from exc
        return size

    def convert_layout(self, owned: Owned, kind: str, timeout: float | None) -> None:
        raise FailedPrecondition(f"device class {self.name} cannot change a volume's layout")

    # ---- removing

    def delete(self, owned: Owned, timeout: float | None) -> None:
        """Remove the object, unless something still uses it: FAILED_PRECONDITION
        saying what."""
        if self.held_open(owned, timeout):
            if owned.kind is Kind.VOLUME:
                raise FailedPrecondition(
                    f"volume {owned.id} is still in use on node {self.node_id} (its device "
                    "is open); unpublish and unstage it first"
                )
            raise FailedPrecondition(
                f"snapshot {owned.id} is being read (a restore from it is copying); retry "
                "when the restore has finished"
            )
        try:
            if owned.encrypted:
                self._crypto_erase(owned, timeout)
            self.remove(owned, timeout)
        except LvmError as exc:
            doing = f"{owned.kind.value} {owned.id} could not be removed from node {self.node_id}"
            if isinstance(exc, LvmInUse):
                doing = (
                    f"{owned.kind.value} {owned.id} is in use on node {self.node_id}: it is "
                    "open, or a copy (a thick snapshot, restore or clone) is reading it; retry "
                    "when that has finished"
                )
            raise refused(exc, doing) from exc

    def _crypto_erase(self, owned: Owned, timeout: float | None) -> None:
        """Destroy the LUKS2 keyslots before the LV goes: its blocks, wherever
        they are reused, are noise without the volume key. A repeat after a
        crash erases what is left of the header again."""
        device = self.inventory.activated(owned.lv, timeout).device
        if crypt.is_luks(device):
            started = time.monotonic()
            crypt.erase(device)
            seconds = round(time.monotonic() - started, 2)
            log.info("keys destroyed", lv=owned.lv.full_name, seconds=seconds)

    def held_open(self, owned: Owned, timeout: float | None) -> bool:
        """Whether the LV's device stays open. udev opens a device for a moment
        after a writer closes it (to probe it again), so an open device is
        looked at a few more times, for about a second, before the answer is
        yes; LVM's own deactivation retries for the same reason."""
        if not owned.lv.attr.device_open:
            return False
        for _ in range(4):
            time.sleep(0.25)
            lv = self.lvm.find_lv(owned.lv.vg_name, owned.lv.name, timeout)
            if lv is None or not lv.attr.device_open:
                return False
        return True

    def remove(self, owned: Owned, timeout: float | None) -> None:
        if owned.lv.attr.is_cow_origin:
            self._refuse_foreign_snapshots(owned, timeout)
        self.lvm.remove(owned.lv.vg_name, owned.lv.name, timeout)

    def _refuse_foreign_snapshots(self, owned: Owned, timeout: float | None) -> None:
        """``lvremove`` of an origin removes its classic snapshots with it: one
        an admin made by hand (``lvcreate -s``) is not the driver's to remove."""
        foreign = [
            lv.full_name
            for lv in self.lvm.snapshots_of(owned.lv.vg_name, owned.lv.name, timeout)
            if lv.attr.is_cow_snapshot and not self.inventory.is_own_view(lv)
        ]
        if foreign:
            raise FailedPrecondition(
                f"{owned.kind.value} {owned.id} has snapshots that csi-lvm did not make "
                f"({', '.join(foreign)}); removing the LV would remove them too: remove or "
                "merge them first (lvremove, lvconvert --merge)"
            )

    # ---- copies across nodes: csi_lvm.peer_source reads, csi_lvm.peer_copy writes

    @abstractmethod
    def make_view(self, source: Owned, name: str, tags: Sequence[str], extent_bytes: int) -> None:
        """``name``: a point-in-time view of the volume ``source``."""

    def view_intact(self, view: LogicalVolume) -> bool:
        return True  # whether the view still shows its point in time

    @abstractmethod
    def data_ranges(self, point: Owned, maps: BlockMaps, timeout: float | None) -> BlockMap:
        """The ranges of a snapshot or view that hold data (the rest reads zeros)."""

    @abstractmethod
    def _create_for_copy(self, new: NewLv) -> None:
        """A new LV of ``new.size`` bytes, tagged COPYING."""

    @abstractmethod
    def prepare_for_copy(self, lv: LogicalVolume) -> None:
        """Before a copy's first byte: ``lv`` reads zeros where nothing is written."""

    def make_for_copy(self, ask: Ask, source_bytes: int, scan: Scan) -> Owned:
        """A volume for a copy, admitted before any byte moves, COPYING till whole."""
        ask = dataclasses.replace(ask, minimum=max(ask.minimum, source_bytes))
        with self._admitted(ask, None, scan) as new:
            self._create_for_copy(new)
            return self._made(new.name, new.timeout)

    # ---- contents and health

    def contents(self, lv: LogicalVolume) -> Contents:
        """What the LV is known to hold before a first stage: nothing known."""
        return Contents(blank=False, reads_zeros=False)

    def warning(self, scan: Scan) -> str | None:
        """Something about present storage an admin must hear of at start-up
        and from ``doctor`` (it still takes volumes)."""
        group = scan.vgs.get(self.device_class.volume_group)
        return None if group is None else metadata_low(group)

    def storage_problem(self, scan: Scan) -> str | None:
        """A problem of the class's storage itself that makes its objects
        abnormal (a thin pool out of room or in need of repair, say)."""
        return self.needs_repair()

    def condition(self, owned: Owned, scan: Scan) -> Condition:
        """The volume's health as one condition, from the scan alone (the
        kubelet asks it of every volume every minute)."""
        return health.condition_of(self.findings(owned, scan, None))

    def volume_health(self, owned: Owned, scan: Scan, timeout: float | None) -> list[Finding]:
        """What is wrong with the volume now (nothing: an empty list). A RAID
        LV's state is read afresh; the rest comes from the scan."""
        lv = owned.lv
        raid = self.lvm.raid_state(lv.vg_name, lv.name, timeout) if lv.attr.is_raid else None
        return self.findings(owned, scan, raid)

    def findings(self, owned: Owned, scan: Scan, raid: RaidState | None = None) -> list[Finding]:
        """The volume's findings from the scan (and a RAID state read apart)."""
        unready = lifecycle.unready_problem(owned)
        group = scan.vgs.get(owned.lv.vg_name)
        problem = self.storage_problem(scan)
        return health.volume_findings(owned.lv, raid, unready, problem, self.name, group)

    def storage_health(self, scan: Scan, *, live: bool = True) -> list[Finding]:
        """What is wrong with the class's storage on this node (nothing, on a
        node the config does not give the class to)."""
        if not self.offered_here:
            return []
        group = scan.vgs.get(self.device_class.volume_group)
        space = self.space(scan, live=live)
        warning = self.warning(scan) if space.missing is None else None
        return health.class_findings(self.name, space, group, warning)

    # ---- for the implementations

    @contextmanager
    def _removed_on_failure(self, name: str) -> Iterator[None]:
        """Around what a create does after its lvcreate: when that fails, the
        LV it made is removed before the failure is answered. The provisioner
        may send the PVC to another node on the answer, and nothing would ever
        delete an LV left here (a crash, which answers nothing, leaves its
        state for the retry instead: see ``csi_lvm.lifecycle``)."""
        try:
            yield
        except Exception:
            with contextlib.suppress(Exception):  # the failure is the answer
                self._remove_unfinished(name)
            raise

    def _remove_unfinished(self, name: str) -> None:
        lv = self.lvm.find_lv(self.device_class.volume_group, name)
        owned = None if lv is None else self.inventory.adopt(lv, self.device_class)
        if owned is not None:
            log.warning("removing what a failed create made", lv=owned.lv.full_name)
            self.lvm.remove(owned.lv.vg_name, owned.lv.name)

    def _made(self, lv_name: str, timeout: float | None) -> Owned:
        """The LV just made: a report of it alone (one of the whole VG would
        cost in proportion to the volumes the node has)."""
        lv = self.lvm.find_lv(self.device_class.volume_group, lv_name, timeout)
        owned = None if lv is None else self.inventory.adopt(lv, self.device_class)
        if owned is None:
            raise Aborted(
                f"LV {self.device_class.volume_group}/{lv_name} vanished while being made; retry"
            )
        return owned
