"""The pure parts of copies across nodes: the holder's leases (what a copy
may still read is not deleted), who counts as a plugin, the progress a
target records on its LV, and the flags. (The copies themselves, between two
plugins over mutual TLS on real LVM, are in tests/lvm.)"""

from __future__ import annotations

import threading
import time

import pytest

from csi_lvm import lifecycle
from csi_lvm.cli import ServeOptions
from csi_lvm.config import DeviceClass
from csi_lvm.errors import ConfigError, FailedPrecondition
from csi_lvm.ids import ObjectId, Tag
from csi_lvm.lvm.records import LogicalVolume, LvAttr
from csi_lvm.peer_source import Leases, caller_is_plugin
from csi_lvm.peers import _label_selector
from csi_lvm.volumes import Owned
from csi_lvm.wiring import Options
from tests.unit.test_options import serve_options

SOURCE = "node-a:thin:snap-backup"
TARGET = "node-b:thin:csi-restore"


def snapshot(tags: tuple[str, ...] = (), source: str = "") -> Owned:
    lv = LogicalVolume(
        name="snap-backup", vg_name="vg0", uuid="u", size_bytes=1 << 30, attr=LvAttr("Vwi---tz-k"),
        pool="pool0", origin="", tags=tags, data_percent=None, metadata_percent=None,
        path="", dm_path="", created="",
    )  # fmt: skip
    object_id = ObjectId.parse(SOURCE)
    assert object_id is not None
    return Owned(object_id, lv, DeviceClass("thin", "vg0", "pool0"), {Tag.SOURCE: source})


def test_a_source_being_read_is_not_deleted_until_released() -> None:
    leases = Leases()
    leases.check_deletable(snapshot())
    leases.renew(SOURCE, TARGET)
    with pytest.raises(FailedPrecondition) as refused:
        leases.check_deletable(snapshot())
    assert f"being copied to another node (into {TARGET})" in str(refused.value)
    leases.release(SOURCE, TARGET)
    leases.check_deletable(snapshot())


def test_a_lease_lapses_without_calls_but_never_under_a_stream() -> None:
    leases = Leases(seconds=0.0)
    leases.renew(SOURCE, TARGET, streaming=1)
    time.sleep(0.01)
    assert leases.readers(SOURCE) == [TARGET]  # a stream is reading
    leases.renew(SOURCE, TARGET, streaming=-1)
    time.sleep(0.01)
    assert leases.readers(SOURCE) == []


def test_a_release_stops_the_stream_and_waits_for_it() -> None:
    leases = Leases()
    leases.renew(SOURCE, TARGET, streaming=1)
    assert not leases.stopped(SOURCE, TARGET)
    ended: list[float] = []

    def stream() -> None:
        while not leases.stopped(SOURCE, TARGET):
            time.sleep(0.01)
        time.sleep(0.05)
        ended.append(time.monotonic())
        leases.renew(SOURCE, TARGET, streaming=-1)

    reader = threading.Thread(target=stream)
    reader.start()
    leases.release(SOURCE, TARGET)
    released = time.monotonic()
    reader.join()
    assert ended and ended[0] <= released
    assert leases.readers(SOURCE) == []
    # The stream's end after its release leaves no lease behind.
    leases.renew(SOURCE, TARGET, streaming=-1)
    assert leases.readers(SOURCE) == []


class Context:
    def __init__(self, properties: dict[str, list[bytes]]) -> None:
        self.properties = properties

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.properties


@pytest.mark.parametrize(
    ("properties", "plugin"),
    [
        ({"x509_subject_alternative_name": [b"csi-lvm-plugin"]}, True),
        ({"x509_common_name": [b"csi-lvm-plugin"]}, True),
        ({"x509_subject_alternative_name": [b"csi-lvm-forwarder"]}, False),
        ({"x509_common_name": [b"csi-lvm-plugin-not"]}, False),
        ({}, False),
    ],
)
def test_only_a_plugin_s_certificate_counts_as_a_plugin(
    properties: dict[str, list[bytes]], plugin: bool
) -> None:
    assert caller_is_plugin(Context(properties)) is plugin  # type: ignore[arg-type]


def test_a_target_records_how_far_its_copy_is_durable() -> None:
    fresh = snapshot(("csi-lvm/copying",), source=SOURCE).lv
    assert lifecycle.copied_bytes(fresh) == 0 and lifecycle.copy_rate(fresh) == 0
    assert lifecycle.copy_point(fresh) == ""
    going = snapshot(("csi-lvm/copying", "csi-lvm/copied=8388608", "csi-lvm/copy-rate=1000",
                      "csi-lvm/copy-point=Xy12-ab"))  # fmt: skip
    assert lifecycle.copied_bytes(going.lv) == 8 << 20
    assert lifecycle.copy_rate(going.lv) == 1000
    assert lifecycle.copy_point(going.lv) == "Xy12-ab"


def test_a_copy_from_another_node_is_told_from_a_local_one() -> None:
    assert lifecycle.copied_from_another_node(snapshot(source="node-b:thin:csi-origin"))
    assert not lifecycle.copied_from_another_node(snapshot(source="csi-origin"))
    assert not lifecycle.copied_from_another_node(snapshot())


def test_the_plugin_selector_is_key_value_terms() -> None:
    assert _label_selector("app.kubernetes.io/name=csi-lvm, tier = node") == {
        "app.kubernetes.io/name": "csi-lvm",
        "tier": "node",
    }
    with pytest.raises(ConfigError, match="each term must be key=value"):
        _label_selector("app.kubernetes.io/name")


def serve(*flags: str) -> ServeOptions:
    return serve_options("--node-id", "n", *flags)


def test_the_peer_port_flags() -> None:
    assert serve().copies_across_nodes and serve().graph.copy_checkpoint_bytes == 256 << 20
    assert serve("--snapshot-metadata-listen", "0.0.0.0:9811").peer_port == 9811  # earlier name
    options = serve("--peer-listen", "[::]:9900", "--copies-across-nodes", "off",
                    "--copy-checkpoint-mib", "8")  # fmt: skip
    assert options.peer_port == 9900 and not options.copies_across_nodes
    assert options.graph.copy_checkpoint_bytes == 8 << 20
    with pytest.raises(ConfigError, match="--peer-listen 'nowhere' must be host:port"):
        serve("--peer-listen", "nowhere")
    with pytest.raises(ConfigError, match="--copy-checkpoint-mib must be at least 1"):
        Options("n", copy_checkpoint_bytes=0)
