"""What an admin sees: the metrics endpoint after a scripted workload, and
``csi-lvm status`` on the live volume group."""

from __future__ import annotations

import re
import urllib.request

import grpc

from csi_lvm.admin import doctor as run_doctor
from csi_lvm.admin import node_status, status_text
from csi_lvm.config import load_config
from csi_lvm.csi import csi_pb2
from csi_lvm.lvm.commands import Lvm
from csi_lvm.wiring import Options, build
from tests.lvm.conftest import SMALL_CLASS, metrics_port
from tests.lvm.helpers import MiB, create, create_request, delete
from tests.testbed import DRIVER_NAME, NODE_ID, CsiClient, Driver


def scrape() -> str:
    """This worker's driver's metrics (each xdist worker runs its own driver)."""
    url = f"http://127.0.0.1:{metrics_port()}/metrics"
    with urllib.request.urlopen(url, timeout=60) as response:
        return str(response.read().decode())


def sample(text: str, metric: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == f"{metric}{{{wanted}}}" or (not labels and name == metric):
            return float(value)
    return 0.0


def test_metrics_count_a_scripted_workload(csi: CsiClient, name: str) -> None:
    before = scrape()
    volumes = [create(csi, f"{name}-{i}", 8 * MiB) for i in range(2)]
    try:
        csi.controller.CreateVolume(create_request(name, device_class="gold"))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    during = scrape()
    for volume in volumes:
        delete(csi, volume.volume_id)
    after = scrape()
    count = "csi_lvm_rpcs_total"
    assert (
        sample(after, count, method="CreateVolume", code="OK")
        - sample(before, count, method="CreateVolume", code="OK")
        == 2
    )
    assert (
        sample(after, count, method="CreateVolume", code="INVALID_ARGUMENT")
        - sample(before, count, method="CreateVolume", code="INVALID_ARGUMENT")
        == 1
    )
    assert (
        sample(after, count, method="DeleteVolume", code="OK")
        - sample(before, count, method="DeleteVolume", code="OK")
        == 2
    )
    assert sample(after, "csi_lvm_rpc_duration_seconds_count", method="CreateVolume") >= 3
    assert (
        sample(during, "csi_lvm_volumes", device_class="thin")
        == sample(after, "csi_lvm_volumes", device_class="thin") + 2
    )
    assert (
        sample(during, "csi_lvm_device_class_available_bytes", device_class="thin")
        == sample(after, "csi_lvm_device_class_available_bytes", device_class="thin") - 16 * MiB
    )
    assert 0 <= sample(after, "csi_lvm_thin_pool_data_usage_ratio", device_class="thin") < 1
    assert re.search(r'^csi_lvm_device_class_size_bytes\{device_class="thick"\} \d', after, re.M)


def test_status_lists_classes_and_owned_objects(csi: CsiClient, driver: Driver, name: str) -> None:
    volume = create(csi, name, 8 * MiB)
    snap = csi.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=f"{name}-s", source_volume_id=volume.volume_id)).snapshot  # fmt: skip
    graph = build(load_config(driver.config), Options(NODE_ID, DRIVER_NAME))
    classes = {c.name: c for c in node_status(graph.backends)}
    assert set(classes) == {"thin", "thick", SMALL_CLASS}
    objects = {o.name: o for o in classes["thin"].objects}
    assert objects[name].size_bytes == 8 * MiB and not objects[name].abnormal
    assert (
        objects[f"{name}-s"].kind == "snapshot" and objects[f"{name}-s"].source == volume.volume_id
    )
    assert classes["thin"].data_percent is not None
    text = status_text(list(classes.values()))
    assert name in text and "thin pool" in text
    assert "root" not in {o.lv.split("/")[1] for c in classes.values() for o in c.objects}
    csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    delete(csi, volume.volume_id)


def test_doctor_passes_on_a_node_that_has_everything(driver: Driver) -> None:
    checks = run_doctor(load_config(driver.config), Lvm(), str(driver.workdir), NODE_ID)
    failed = [f"{c.what}: {c.fix}" for c in checks if not c.ok]
    assert not failed
    wanted = {"kernel device-mapper", "kernel module dm_thin_pool", "kernel module dm_snapshot"}
    assert wanted <= {c.what for c in checks}
    assert sum(c.what.startswith("device class") for c in checks) == 3
