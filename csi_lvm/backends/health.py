"""What is wrong with a volume, or with a device class's storage on this
node, as findings: a status, a CamelCase reason and a message that says
what an admin does about it. The node's health RPCs send them as they are;
the volume condition (for kubelets before those RPCs), ``csi-lvm status``
and the metrics say the same. Pure decisions over LVM's records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from csi_lvm.backends.admission import ClassSpace
from csi_lvm.backends.asks import Condition
from csi_lvm.lvm.records import LogicalVolume, LvAttr, RaidState, VolumeGroup

# A volume's (CSI's VolumeHealthErrorType names).
DEGRADED, INACCESSIBLE = "DEGRADED", "INACCESSIBLE"
# A device class's storage (CSI's StorageHealthErrorType names).
STORAGE_DEGRADED, STORAGE_UNREACHABLE = "STORAGE_DEGRADED", "STORAGE_UNREACHABLE"


@dataclass(frozen=True)
class Finding:
    status: str
    reason: str
    message: str


def raid_repair(name: str, health: str) -> str:
    """What an admin does about a RAID LV LVM reports unwell: its images
    are LVM's to rebuild, and the driver never does it unasked."""
    if health == "m":
        return f"lvchange --syncaction repair {name} rewrites the differing blocks"
    return (
        f"I/O goes on with the images left; when the device is back, lvchange --refresh "
        f"{name}; when it is gone, add a PV and run lvconvert --repair {name}"
    )


# lv_attr's health character: the finding it makes, for RAID LVs and others.
_HEALTH = {
    "p": ("PhysicalVolumeMissing", "a physical volume under it is missing"),
    "r": ("RaidImageFailed", "a RAID image failed and needs refresh or repair"),
    "m": ("RaidMismatches", "its RAID images hold different data"),
    "F": ("ThinPoolFailed", "its thin pool has failed"),
    "D": ("ThinPoolOutOfData", "its thin pool is out of data space: writes fail"),
    "M": ("ThinPoolMetadataReadOnly", "its thin pool's metadata is read-only"),
    "X": ("HealthUnknown", "LVM cannot tell its health"),
}


def lv_findings(lv: LogicalVolume, raid: RaidState | None) -> list[Finding]:
    """The findings of an LV from its record, and (RAID) its fresher state."""
    attr: LvAttr = raid.attr if raid is not None and raid.attr.raw else lv.attr
    name = lv.full_name
    findings = []
    health = attr.health
    if health in _HEALTH:
        reason, text = _HEALTH[health]
        if attr.is_raid and health in "prm":
            findings.append(
                Finding(DEGRADED, reason, f"LV {name}: {text} ({raid_repair(name, health)})")
            )
        elif health == "m":
            findings.append(Finding(DEGRADED, reason, f"LV {name}: {text}"))
        else:  # no copy left to read from: the data is not reachable
            findings.append(Finding(INACCESSIBLE, reason, f"LV {name}: {text}"))
    elif attr.problem is not None:
        findings.append(Finding(INACCESSIBLE, "DeviceUnusable", f"LV {name}: {attr.problem}"))
    if raid is not None and raid.syncing:
        done = f"{raid.sync_percent:.1f}% done" if raid.sync_percent is not None else "starting"
        findings.append(
            Finding(
                DEGRADED,
                "RaidResyncing",
                f"LV {name}: its RAID images are being brought in sync ({done}); until then "
                "it has fewer good copies than its layout keeps",
            )
        )
    if raid is not None and raid.integrity_mismatches:
        findings.append(
            Finding(
                DEGRADED,
                "IntegrityMismatches",
                f"LV {name}: {raid.integrity_mismatches} blocks failed their integrity "
                "checksum and were read from another image; the device under it may be "
                "failing: check its PVs (smartctl), and replace the one that errs "
                f"(lvconvert --replace)",
            )
        )
    return findings


def volume_findings(
    lv: LogicalVolume,
    raid: RaidState | None,
    unready: str | None,
    storage_problem: str | None,
    device_class: str,
    group: VolumeGroup | None,
) -> list[Finding]:
    """A volume's findings: its LV's, its lifecycle's, its class's storage's."""
    findings = lv_findings(lv, raid)
    if unready is not None:
        message = f"LV {lv.full_name}: {unready}"
        findings.append(Finding(INACCESSIBLE, "VolumeNotReady", message))
    if storage_problem is not None:
        message = f"device class {device_class}: {storage_problem}"
        findings.append(Finding(DEGRADED, "DeviceClassTrouble", message))
    if group is not None and group.partial and not lv.attr.is_raid:
        findings.append(
            Finding(
                DEGRADED,
                "PhysicalVolumeMissing",
                f"volume group {lv.vg_name} is missing a physical volume; LV {lv.full_name} "
                "has no other copy, so any of its extents there are unreadable",
            )
        )
    return merged(findings)


def condition_of(findings: list[Finding]) -> Condition:
    """The findings as CSI 1.12's one volume condition."""
    if not findings:
        return Condition(False, "healthy")
    return Condition(True, "; ".join(finding.message for finding in findings))


def class_findings(
    device_class: str, space: ClassSpace, group: VolumeGroup | None, warning: str | None
) -> list[Finding]:
    """The findings of a device class's storage on this node."""
    findings = []
    where = f"device class {device_class}"
    if space.missing is not None:
        findings.append(Finding(STORAGE_UNREACHABLE, "StorageMissing", f"{where}: {space.missing}"))
    if group is not None and group.partial:
        findings.append(
            Finding(
                STORAGE_DEGRADED,
                "PhysicalVolumeMissing",
                f"{where}: volume group {group.name} is missing {group.missing_pvs or 'a'} "
                "physical volume(s): RAID volumes run on their other images, others fail; "
                "bring the device back, or vgreduce --removemissing once it is gone for good",
            )
        )
    for reason, problem in (
        ("ThinPoolNeedsRepair", space.needs_repair),
        ("MetadataAreaFull", space.metadata_full),
        ("ThinPoolNearlyFull", space.full),
        ("MetadataAreaLow", warning),
    ):
        if problem is not None:
            findings.append(Finding(STORAGE_DEGRADED, reason, f"{where}: {problem}"))
    return findings


def merged(findings: Iterable[Finding]) -> list[Finding]:
    """One finding per status and reason (the spec's rule), their messages
    joined, in the order they first appear."""
    by_key: dict[tuple[str, str], Finding] = {}
    for finding in findings:
        key = (finding.status, finding.reason)
        earlier = by_key.get(key)
        if earlier is None:
            by_key[key] = finding
        elif finding.message not in earlier.message:
            by_key[key] = Finding(key[0], key[1], f"{earlier.message}; {finding.message}")
    return list(by_key.values())
