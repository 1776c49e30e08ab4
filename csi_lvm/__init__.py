"""csi-lvm: a CSI driver that turns a node's LVM volume groups into Kubernetes volumes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("csi-lvm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
