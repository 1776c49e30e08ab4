"""Prometheus metrics: RPC counts and latencies, and per device class space,
thin pool usage, object counts and availability.

A scrape reads the driver's kept LVM report (``Inventory.current``: read
again after the driver's own changes and every refresh interval for others'),
so scrapers never add an LVM report each.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from csi_lvm.backends import Backends
from csi_lvm.ids import Kind

log = structlog.get_logger("csi_lvm.metrics")

REGISTRY = CollectorRegistry()
RPCS = Counter(
    "csi_lvm_rpcs", "CSI calls served, by method and gRPC status code.",
    ["method", "code"], registry=REGISTRY,
)  # fmt: skip
RPC_SECONDS = Histogram(
    "csi_lvm_rpc_duration_seconds", "Time to serve a CSI call, by method.",
    ["method"], registry=REGISTRY,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)  # fmt: skip

PEER_COPY_BYTES = Counter(
    "csi_lvm_peer_copy_bytes",
    "Data bytes of snapshots and volumes copied between nodes (restores and clones "
    "across nodes), by direction: sent by the holder, received and written by the target.",
    ["direction"], registry=REGISTRY,
)  # fmt: skip


def observe_rpc(method: str, code: str, seconds: float) -> None:
    RPCS.labels(method, code).inc()
    RPC_SECONDS.labels(method).observe(seconds)


class DeviceClassCollector(Collector):
    """Space and counts per device class, from one LVM report per scrape."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends
        self.inventory = backends.inventory

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["device_class"]
        size = GaugeMetricFamily(
            "csi_lvm_device_class_size_bytes",
            "Capacity of the class: VG size, or thin pool size x overprovisionRatio.",
            labels=labels,
        )
        available = GaugeMetricFamily(
            "csi_lvm_device_class_available_bytes", "Room left for new volumes.", labels=labels
        )
        data = GaugeMetricFamily(
            "csi_lvm_thin_pool_data_usage_ratio", "Thin pool data in use (0-1).", labels=labels
        )
        metadata = GaugeMetricFamily(
            "csi_lvm_thin_pool_metadata_usage_ratio",
            "Thin pool metadata in use (0-1).",
            labels=labels,
        )
        full = GaugeMetricFamily(
            "csi_lvm_device_class_full",
            "1 when the class takes no new volumes (thin pool past fullThresholdPercent "
            "or out of space), else 0.",
            labels=labels,
        )
        missing = GaugeMetricFamily(
            "csi_lvm_device_class_missing",
            "1 when the class's volume group or thin pool is not on this node (the class "
            "takes no volumes here), else 0. Classes the config gives to other nodes only "
            "are not listed.",
            labels=labels,
        )
        metadata_free = GaugeMetricFamily(
            "csi_lvm_volume_group_metadata_free_bytes",
            "Room left in the metadata area of the class's volume group, where LVM records "
            "every LV; a full area takes no new volumes.",
            labels=labels,
        )
        metadata_area = GaugeMetricFamily(
            "csi_lvm_volume_group_metadata_area_bytes",
            "Size of the metadata area of the class's volume group.",
            labels=labels,
        )
        trouble = GaugeMetricFamily(
            "csi_lvm_device_class_trouble",
            "1 for each problem of the class's storage on this node (the findings "
            "NodeGetStorageHealth reports, by status and reason).",
            labels=[*labels, "status", "reason"],
        )
        unhealthy = GaugeMetricFamily(
            "csi_lvm_volumes_unhealthy",
            "Volumes with a problem, by the reason NodeGetVolumeHealth gives (as the last "
            "scan shows them; a RAID volume's sync is read only when asked of it).",
            labels=[*labels, "status", "reason"],
        )
        volumes = GaugeMetricFamily("csi_lvm_volumes", "Volumes csi-lvm owns.", labels=labels)
        snapshots = GaugeMetricFamily("csi_lvm_snapshots", "Snapshots csi-lvm owns.", labels=labels)
        try:
            scan = self.inventory.current(timeout=30)
        except Exception as error:  # a scrape must never crash the server
            log.warning("metrics scan failed", error=str(error))
            return
        counts = self.inventory.counts(scan)
        for backend in self.backends:
            if not backend.offered_here:
                continue
            device_class = backend.device_class
            name = [device_class.name]
            space = backend.space(scan)
            missing.add_metric(name, 0 if space.missing is None else 1)
            size.add_metric(name, space.total_bytes)
            available.add_metric(name, space.available_bytes)
            full.add_metric(name, 0 if space.full is None else 1)
            group = scan.vgs.get(device_class.volume_group)
            if group is not None and group.metadata_area_bytes > 0:
                metadata_free.add_metric(name, group.metadata_free_bytes)
                metadata_area.add_metric(name, group.metadata_area_bytes)
            if device_class.thin_pool is not None:
                pool = scan.lv(device_class.volume_group, device_class.thin_pool)
                if pool is not None:
                    data.add_metric(name, (pool.data_percent or 0.0) / 100)
                    metadata.add_metric(name, (pool.metadata_percent or 0.0) / 100)
            for finding in backend.storage_health(scan, live=False):
                trouble.add_metric([*name, finding.status, finding.reason], 1)
            volumes.add_metric(name, counts.get((device_class.name, Kind.VOLUME), 0))
            snapshots.add_metric(name, counts.get((device_class.name, Kind.SNAPSHOT), 0))
        by_reason: collections.Counter[tuple[str, str, str]] = collections.Counter()
        for owned in self.inventory.owned(Kind.VOLUME, scan):
            backend = self.backends.of(owned.device_class)
            for finding in backend.findings(owned, scan):
                by_reason[(backend.name, finding.status, finding.reason)] += 1
        for key, count in sorted(by_reason.items()):
            unhealthy.add_metric(list(key), count)
        yield from (size, available, full, missing, data, metadata, volumes, snapshots)
        yield from (trouble, unhealthy)
        yield from (metadata_free, metadata_area)


def serve_metrics(address: str, backends: Backends) -> None:
    """Expose /metrics on ``host:port``."""
    host, _, port = address.rpartition(":")
    REGISTRY.register(DeviceClassCollector(backends))
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=REGISTRY)  # noqa: S104
    log.info("metrics", address=address)
