"""ControllerModifyVolume on real LVM and a real kernel: IO limits reach the
io.max of the pods that use a volume (and are enforced: a write is measured
with and without one), follow the volume to each new publication, and are
lifted when a publication goes; bad keys and values are refused by name; a
layout a node cannot make is refused before anything changes.

The pods' cgroups are made here as the kubelet's cgroupfs driver makes
them (``kubepods/pod<uid>``), on the VM's cgroup v2 hierarchy."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_lvm import fs
from csi_lvm.csi import csi_pb2
from csi_lvm.ids import Tag, decode_tags
from tests.lvm.helpers import (
    MiB,
    create,
    create_request,
    delete,
    expect_error,
    lv_tags,
    mount_capability,
    publish,
    stage,
    unpublish,
    unstage,
)
from tests.testbed import CsiClient, LoopVolumeGroup, sh

Code = grpc.StatusCode
CGROUP = Path("/sys/fs/cgroup")
WRITE_MIB = 4
LIMIT_BYTES = 1 << 20  # a second per MiB


@pytest.fixture(scope="module")
def kubepods() -> Iterator[Path]:
    """The kubelet's parent of pod cgroups, with the io controller on."""
    if not (CGROUP / "cgroup.controllers").exists():
        subprocess.run(["mount", "-t", "cgroup2", "none", str(CGROUP)], check=True)
    assert "io" in (CGROUP / "cgroup.controllers").read_text().split()
    (CGROUP / "cgroup.subtree_control").write_text("+io")
    parent = CGROUP / "kubepods"
    parent.mkdir(exist_ok=True)
    (parent / "cgroup.subtree_control").write_text("+io")
    yield parent


class Pod:
    """A pod as the kubelet leaves it before publishing: its cgroup and the
    parent of its target path."""

    def __init__(self, kubepods: Path, workdir: Path, volume: str) -> None:
        self.uid = str(uuid.uuid4())
        self.cgroup = kubepods / f"pod{self.uid}"
        self.cgroup.mkdir()
        volumes = workdir / "pods" / self.uid / "volumes" / "kubernetes.io~csi" / volume
        volumes.mkdir(parents=True)
        self.target = str(volumes / "mount")

    def io_max(self) -> list[str]:
        return (self.cgroup / "io.max").read_text().splitlines()

    def write_seconds(self, path: str) -> float:
        """How long the pod takes to write WRITE_MIB MiB past the page cache."""
        started = time.monotonic()
        subprocess.run(
            ["sh", "-c", f'echo $$ > {self.cgroup}/cgroup.procs && exec "$@"', "pod",
             "dd", "if=/dev/zero", f"of={path}", "bs=256k", f"count={WRITE_MIB * 4}",
             "oflag=direct", "conv=fsync"],
            check=True, capture_output=True,
        )  # fmt: skip
        return time.monotonic() - started

    def remove(self) -> None:
        self.cgroup.rmdir()


def modify(csi: CsiClient, volume_id: str, **parameters: str) -> None:
    csi.controller.ControllerModifyVolume(
        csi_pb2.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=parameters)
    )


def io_tag(vg: LoopVolumeGroup, volume_id: str) -> str | None:
    """The volume's IO limits as its LV's tag holds them."""
    return decode_tags(lv_tags(vg.name, volume_id.rsplit(":", 1)[-1])).get(Tag.IO_LIMITS)


def test_io_limits_reach_the_pods_using_a_volume_and_are_enforced(
    csi: CsiClient, vg: LoopVolumeGroup, workdir: Path, name: str, kubepods: Path
) -> None:
    capability = mount_capability("ext4")
    volume = create(csi, name, 64 * MiB, "thick", capability=capability)
    staging = str(workdir / f"{name}-s")
    stage(csi, volume.volume_id, staging, capability)
    pod = Pod(kubepods, workdir, name)
    publish(csi, volume.volume_id, staging, pod.target, capability)
    device = fs.mounted_device(staging)
    try:
        free = pod.write_seconds(f"{pod.target}/free")
        assert pod.io_max() == []
        modify(csi, volume.volume_id, writeBytesPerSecond=str(LIMIT_BYTES), readIOPS="500")
        assert pod.io_max() == [f"{device} rbps=max wbps={LIMIT_BYTES} riops=500 wiops=max"]
        limited = pod.write_seconds(f"{pod.target}/limited")
        print(f"{WRITE_MIB} MiB written in {free:.2f} s free, {limited:.2f} s at 1 MiB/s: "
              f"{limited / free:.1f} times as long")  # fmt: skip
        # The kernel holds the writes to the limit: never faster than it allows.
        assert limited >= (WRITE_MIB - 1) * MiB / LIMIT_BYTES, (free, limited)
        assert io_tag(vg, volume.volume_id) == f"riops=500,wbps={LIMIT_BYTES}"

        # A change of one limit keeps the other; "max" lifts one.
        modify(csi, volume.volume_id, readIOPS="max", writeIOPS="200")
        modify(csi, volume.volume_id, readIOPS="max", writeIOPS="200")  # a repeat: the same
        assert pod.io_max() == [f"{device} rbps=max wbps={LIMIT_BYTES} riops=max wiops=200"]

        # The pod's publication goes: its limit goes with it.
        unpublish(csi, volume.volume_id, pod.target)
        assert pod.io_max() == []
        # Another pod (a restarted one, or one after a reboot) gets the limits
        # when the volume is published for it.
        second = Pod(kubepods, workdir, name)
        publish(csi, volume.volume_id, staging, second.target, capability)
        assert second.io_max() == [f"{device} rbps=max wbps={LIMIT_BYTES} riops=max wiops=200"]
        unpublish(csi, volume.volume_id, second.target)
        second.remove()
    finally:
        if fs.mount_at(pod.target) is not None:
            unpublish(csi, volume.volume_id, pod.target)
        unstage(csi, volume.volume_id, staging)
        pod.remove()
        delete(csi, volume.volume_id)


def test_a_volume_made_with_a_class_s_parameters_has_them_and_bad_ones_are_refused(
    csi: CsiClient, vg: LoopVolumeGroup, name: str
) -> None:
    made = csi.controller.CreateVolume(
        create_request(name, mutable_parameters={"readBytesPerSecond": "8Mi"})
    ).volume
    assert io_tag(vg, made.volume_id) == f"rbps={8 << 20}"
    for parameters, says in (
        ({"XXX_FakeKey": "XXX_FakeValue"}, "XXX_FakeKey cannot be set"),
        ({"layout": "raid1"}, "layout cannot be set on a volume of device class thin"),
        ({"writeIOPS": "0"}, "must be above 0"),
        ({"readBytesPerSecond": "lots"}, "not a number of bytes per second"),
    ):
        expect_error(
            Code.INVALID_ARGUMENT, csi.controller.ControllerModifyVolume,
            csi_pb2.ControllerModifyVolumeRequest(volume_id=made.volume_id,
                                                  mutable_parameters=parameters),
            says,
        )  # fmt: skip
        expect_error(
            Code.INVALID_ARGUMENT, csi.controller.CreateVolume,
            create_request(f"{name}-bad", mutable_parameters=parameters), says,
        )  # fmt: skip
    assert io_tag(vg, made.volume_id) == f"rbps={8 << 20}"  # unchanged
    expect_error(
        Code.NOT_FOUND, csi.controller.ControllerModifyVolume,
        csi_pb2.ControllerModifyVolumeRequest(volume_id="non-existing-volume-id",
                                              mutable_parameters={"readIOPS": "1"}),
    )  # fmt: skip
    expect_error(
        Code.INVALID_ARGUMENT, csi.controller.ControllerModifyVolume,
        csi_pb2.ControllerModifyVolumeRequest(mutable_parameters={"readIOPS": "1"}), "volume_id",
    )  # fmt: skip
    delete(csi, made.volume_id)


def test_a_layout_this_node_cannot_make_is_refused_and_nothing_changes(
    csi: CsiClient, vg: LoopVolumeGroup, name: str
) -> None:
    volume = create(csi, name, 16 * MiB, "thick")
    lv = volume.volume_id.rsplit(":", 1)[-1]
    expect_error(
        Code.FAILED_PRECONDITION, csi.controller.ControllerModifyVolume,
        csi_pb2.ControllerModifyVolumeRequest(
            volume_id=volume.volume_id,
            mutable_parameters={"layout": "raid1", "writeIOPS": "10"}),
        "cannot be made raid1", "second PV with room",
    )  # fmt: skip
    layout = sh("lvs", "--noheadings", "-o", "lv_layout", f"{vg.name}/{lv}").strip()
    assert layout == "linear"
    assert io_tag(vg, volume.volume_id) is None  # the limit comes after: not set either
    modify(csi, volume.volume_id, layout="linear")  # what it is: nothing to do
    delete(csi, volume.volume_id)
