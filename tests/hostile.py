"""Hostile CSI requests for every RPC, as hypothesis strategies, and the rule
every answer must keep: a proper gRPC status with a message, never UNKNOWN or
INTERNAL (which would mean an unhandled case). Used on the host by the unit
suite (no LVM needed) and in the VM by the stress suite (real LVM, with a
hand-made LV and mount that must come out untouched)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from hypothesis import strategies as st

from csi_lvm.csi import csi_pb2
from tests.testbed import NODE_ID, CsiClient

Mode = csi_pb2.VolumeCapability.AccessMode
IMPROPER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

HOSTILE_NAMES = st.one_of(
    st.sampled_from(
        ["", "a/b", "../../etc/passwd", "..", ".", "x\x00y", "名前-ボリューム", "-", " ",
         "a" * 10_000, "pvc-" + "9" * 124, "vg0/root", "$(reboot)", "csi-root", "root"]
    ),
    st.text(max_size=40),
)  # fmt: skip

SIZES = st.one_of(
    st.sampled_from([-1, 0, 1, 4095, 1 << 20, 1 << 62, (1 << 63) - 1, -(1 << 63)]),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
)

# An int32 (the SnapshotMetadata service's max_results).
MAX_RESULTS = st.one_of(
    st.sampled_from([-1, 0, 1, (1 << 31) - 1, -(1 << 31)]),
    st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1),
)

PARAMETERS = st.one_of(
    st.sampled_from(
        [{}, {"deviceClass": "nope"}, {"deviceClass": ""}, {"deviceClass": "../thin"},
         {"deviceClass": "thin", "fsType": "ntfs"}, {"unknown": "x"},
         {"deviceClass": "thin", "csi.storage.k8s.io/pvc/name": "x" * 300},
         {"deviceClass": "thick\x00"}]
    ),
    st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=3),
)  # fmt: skip


def hostile_ids(handmade_lv: str) -> st.SearchStrategy[str]:
    """Ids that are malformed, of another node or class, or that name an LV
    the driver did not make."""
    return st.one_of(
        st.sampled_from(
            ["", "x", "::", ":::", "a:b:c:d", "\x00", f"{NODE_ID}:thin:{handmade_lv}",
             f"{NODE_ID}:thick:{handmade_lv}", f"{NODE_ID}:thin:../../{handmade_lv}",
             f"{NODE_ID}:nope:csi-a", "other-node:thin:csi-pvc-1", f"{NODE_ID}:thin:csi-",
             f"{NODE_ID}:thin:" + "a" * 300, f"{NODE_ID}:thin:csi-missing",
             f"{NODE_ID}:thin:snap-missing", f"{NODE_ID}:thin:pool0", f"{NODE_ID}:thick:-x"]
        ),
        st.text(max_size=60),
    )  # fmt: skip


def capabilities() -> st.SearchStrategy[list[csi_pb2.VolumeCapability]]:
    modes = st.sampled_from([*list(Mode.Mode.values()), 99])
    mount = st.builds(
        lambda fs, flags, mode: csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs, mount_flags=flags),
            access_mode=Mode(mode=mode),
        ),
        st.sampled_from(["", "ext4", "xfs", "ntfs", "ext4; rm -rf /", "../xfs", "tmpfs"]),
        st.lists(st.sampled_from(["ro", "bind", "remount", "nodev", "x" * 500, ""]), max_size=2),
        modes,
    )
    block = st.builds(
        lambda mode: csi_pb2.VolumeCapability(
            block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode)
        ),
        modes,
    )
    empty = st.just(csi_pb2.VolumeCapability())
    return st.lists(st.one_of(mount, block, empty), max_size=2)


@dataclass(frozen=True)
class Call:
    service: str
    method: str
    request: Any

    def __repr__(self) -> str:  # hypothesis prints this for a failing example
        return f"{self.service}.{self.method}({str(self.request)[:2000]!r})"


def hostile_calls(paths: Sequence[str], handmade_lv: str) -> st.SearchStrategy[Call]:
    """Any RPC with generated, mostly hostile, fields. ``paths`` are paths worth
    aiming at on this machine (a hand-made mount, a symlink to it, ...)."""
    ids = hostile_ids(handmade_lv)
    path = st.one_of(
        st.sampled_from(["", "relative/dir", "/", "/..", "/tmp/../etc", "/tmp/x\x00y",
                         "/nonexistent/deep/dir", "/" + "a" * 5000, *paths]),
        st.text(max_size=30),
    )  # fmt: skip
    capacity = st.builds(
        lambda r, lim: csi_pb2.CapacityRange(required_bytes=r, limit_bytes=lim), SIZES, SIZES
    )
    content = st.one_of(
        st.none(),
        st.builds(
            lambda i: csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=i)
            ),
            ids,
        ),
        st.builds(
            lambda i: csi_pb2.VolumeContentSource(
                volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=i)
            ),
            ids,
        ),
    )

    def create(name: str, cap: Any, caps: list[Any], params: Any, source: Any) -> Call:
        request = csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=cap, volume_capabilities=caps, parameters=params
        )
        if source is not None:
            request.volume_content_source.CopyFrom(source)
        return Call("controller", "CreateVolume", request)

    one_cap = capabilities().map(lambda caps: caps[0] if caps else csi_pb2.VolumeCapability())
    return st.one_of(
        st.builds(create, HOSTILE_NAMES, capacity, capabilities(), PARAMETERS, content),
        st.builds(
            lambda i: Call("controller", "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=i)),
            ids,
        ),
        st.builds(
            lambda n, i, p: Call(
                "controller",
                "CreateSnapshot",
                csi_pb2.CreateSnapshotRequest(name=n, source_volume_id=i, parameters=p),
            ),
            HOSTILE_NAMES,
            ids,
            PARAMETERS,
        ),
        st.builds(
            lambda i: Call(
                "controller", "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=i)
            ),
            ids,
        ),
        st.builds(
            lambda i, caps, p: Call(
                "controller",
                "ValidateVolumeCapabilities",
                csi_pb2.ValidateVolumeCapabilitiesRequest(
                    volume_id=i, volume_capabilities=caps, parameters=p
                ),
            ),
            ids,
            capabilities(),
            PARAMETERS,
        ),
        st.builds(
            lambda m, t: Call(
                "controller",
                "ListVolumes",
                csi_pb2.ListVolumesRequest(max_entries=m, starting_token=t),
            ),
            st.integers(-(1 << 31), (1 << 31) - 1),
            ids,
        ),
        st.builds(
            lambda m, t, i, s: Call(
                "controller",
                "ListSnapshots",
                csi_pb2.ListSnapshotsRequest(
                    max_entries=m, starting_token=t, snapshot_id=i, source_volume_id=s
                ),
            ),
            st.integers(-(1 << 31), (1 << 31) - 1),
            ids,
            ids,
            ids,
        ),
        st.builds(
            lambda i: Call(
                "controller",
                "ControllerGetVolume",
                csi_pb2.ControllerGetVolumeRequest(volume_id=i),
            ),
            ids,
        ),
        st.builds(
            lambda p, caps: Call(
                "controller",
                "GetCapacity",
                csi_pb2.GetCapacityRequest(parameters=p, volume_capabilities=caps),
            ),
            PARAMETERS,
            capabilities(),
        ),
        st.builds(
            lambda i: Call(
                "controller",
                "ControllerPublishVolume",
                csi_pb2.ControllerPublishVolumeRequest(volume_id=i, node_id=NODE_ID),
            ),
            ids,
        ),
        st.builds(
            lambda i, s, c: Call(
                "node",
                "NodeStageVolume",
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=i, staging_target_path=s, volume_capability=c
                ),
            ),
            ids,
            path,
            one_cap,
        ),
        st.builds(
            lambda i, s: Call(
                "node",
                "NodeUnstageVolume",
                csi_pb2.NodeUnstageVolumeRequest(volume_id=i, staging_target_path=s),
            ),
            ids,
            path,
        ),
        st.builds(
            lambda i, s, t, c, ro: Call(
                "node",
                "NodePublishVolume",
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=i,
                    staging_target_path=s,
                    target_path=t,
                    volume_capability=c,
                    readonly=ro,
                ),
            ),
            ids,
            path,
            path,
            one_cap,
            st.booleans(),
        ),
        st.builds(
            lambda i, t: Call(
                "node",
                "NodeUnpublishVolume",
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=i, target_path=t),
            ),
            ids,
            path,
        ),
        st.builds(
            lambda i, p: Call(
                "node",
                "NodeGetVolumeStats",
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=i, volume_path=p),
            ),
            ids,
            path,
        ),
        st.builds(
            lambda i, p, cap: Call(
                "node",
                "NodeExpandVolume",
                csi_pb2.NodeExpandVolumeRequest(volume_id=i, volume_path=p, capacity_range=cap),
            ),
            ids,
            path,
            capacity,
        ),
        st.builds(
            lambda i, offset, most: Call(
                "snapshot_metadata",
                "GetMetadataAllocated",
                csi_pb2.GetMetadataAllocatedRequest(
                    snapshot_id=i, starting_offset=offset, max_results=most
                ),
            ),
            ids,
            SIZES,
            MAX_RESULTS,
        ),
        st.builds(
            lambda base, target, offset, most: Call(
                "snapshot_metadata",
                "GetMetadataDelta",
                csi_pb2.GetMetadataDeltaRequest(
                    base_snapshot_id=base,
                    target_snapshot_id=target,
                    starting_offset=offset,
                    max_results=most,
                ),
            ),
            ids,
            ids,
            SIZES,
            MAX_RESULTS,
        ),
    )


def answer(client: CsiClient, call: Call) -> tuple[grpc.StatusCode, Any]:
    """Send the call; the status code and the answer (or the error's message).
    Fails the test on an improper status or an error without a message."""
    stub = getattr(client, call.service)
    try:
        response = getattr(stub, call.method)(call.request, timeout=120)
        if call.service == "snapshot_metadata":  # a stream: its messages, or its error
            response = list(response)
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        assert code not in IMPROPER, f"{call}: {code.name}: {details}"
        assert details.strip(), f"{call}: {code.name} without a message"
        return code, details
    return grpc.StatusCode.OK, response
