"""The views another node's copy reads of this node's volumes: one per
target, ``<target LV>.view``, tagged with the driver and the target's id,
made at the copy's first read by the class's ``Backend.make_view`` (a thin
snapshot, or a classic COW snapshot in a thick class) and kept until the
target says the copy has ended (``csi_lvm.peer_source``)."""

from __future__ import annotations

import structlog

from csi_lvm.backends.base import Backend
from csi_lvm.errors import Aborted, FailedPrecondition, refused_create
from csi_lvm.ids import ObjectId, Tag, decode_tags, encode_tags, view_name_for
from csi_lvm.lvm.errors import LvmError
from csi_lvm.lvm.records import LogicalVolume
from csi_lvm.volumes import Owned

log = structlog.get_logger("csi_lvm.backends.views")


class PeerViews:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.lvm = backend.lvm
        self.inventory = backend.inventory

    def view_for(self, source: Owned, target_id: str, timeout: float | None) -> LogicalVolume:
        """The view of the volume ``source`` that the copy into another node's
        volume ``target_id`` reads: ``<target LV>.view``, made at its first
        read and kept until ``drop_view_for``. An LV of that name that is not
        the driver's view for that target is refused, never used."""
        target = ObjectId.parse(target_id)
        assert target is not None  # the caller checked it
        group, name = source.lv.vg_name, view_name_for(target.lv_name)
        view = self.lvm.find_lv(group, name, timeout)
        if view is not None and not self._is_view_for(view, target_id):
            raise FailedPrecondition(
                f"volume group {group} has an LV named {name} that is not csi-lvm's view "
                f"for {target_id}; it needs that name: rename or remove it"
            )
        if view is None:
            tags = encode_tags({Tag.DRIVER: self.inventory.driver_name, Tag.VIEW_FOR: target_id})
            extent = self.inventory.view(timeout).vgs[group].extent_bytes
            try:
                self.backend.make_view(source, name, tags, extent)
            except LvmError as exc:
                raise refused_create(
                    exc,
                    f"node {self.backend.node_id} cannot make the view of {source.id} to copy it",
                ) from exc
            view = self.lvm.find_lv(group, name, timeout)
            if view is None:
                raise Aborted(f"the view {group}/{name} vanished as it was made; retry")
            log.info("view for a copy to another node made", source=str(source.id),
                     target=target_id, view=view.full_name)  # fmt: skip
        return view

    def drop_view_for(self, source: Owned, target_id: str) -> None:
        """Remove the view ``view_for`` made, if it is there."""
        target = ObjectId.parse(target_id)
        if target is None:
            return
        view = self.lvm.find_lv(source.lv.vg_name, view_name_for(target.lv_name))
        if view is not None and self._is_view_for(view, target_id):
            self.lvm.remove(view.vg_name, view.name)
            log.info("view for a copy to another node removed", view=view.full_name)

    def _is_view_for(self, view: LogicalVolume, target_id: str) -> bool:
        tags = decode_tags(view.tags)
        return (
            tags.get(Tag.DRIVER) == self.inventory.driver_name
            and tags.get(Tag.VIEW_FOR) == target_id
        )
