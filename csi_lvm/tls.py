"""Mutual TLS between csi-lvm's components: the node plugins, and the
forwarders of the cluster's SnapshotMetadata and group snapshot calls.

The files are a Kubernetes TLS Secret's, mounted as a directory: ``tls.crt``
and ``tls.key`` (this component's certificate and key) and ``ca.crt`` (the
certificate authority both sides' certificates come from). Only a holder of a
certificate from that authority gets through, either way. The server side
reads them again whenever they change (a rotated Secret shows in the mounted
directory within the kubelet's sync period), so rotation needs no restart;
clients read them for each new connection.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from csi_lvm.errors import ConfigError

# The name every node plugin's certificate carries (its subject alternative
# name): a plugin is reached at its pod's address, which no certificate names.
PLUGIN_SERVER_NAME = "csi-lvm-plugin"
# The name of the group snapshot forwarder's certificate: the only caller a
# plugin lets cut or delete group snapshots over its port.
GROUP_FORWARDER_NAME = "csi-lvm-group-snapshots"
FILES = ("ca.crt", "tls.crt", "tls.key")


def caller_named(context: grpc.ServicerContext, name: str) -> bool:
    """Whether the caller's certificate names ``name`` (as its subject
    alternative name or its common name)."""
    auth = context.auth_context()
    wanted = name.encode()
    # gRPC gives each property as a list of values (its type stub says bytes).
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        values: object = auth.get(key, [])
        if isinstance(values, list) and wanted in values:
            return True
    return False


@dataclass(frozen=True)
class TlsFiles:
    directory: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """The authority's certificate, this side's certificate and key."""
        try:
            ca, cert, key = (Path(self.directory, name).read_bytes() for name in FILES)
        except OSError as exc:
            raise ConfigError(
                f"TLS directory {self.directory}: {exc.strerror} ({exc.filename}); it needs "
                f"{', '.join(FILES)} (a kubernetes.io/tls Secret with ca.crt)"
            ) from exc
        return ca, cert, key

    def stamp(self) -> tuple[float, ...]:
        stamps = []
        for name in FILES:
            try:
                stamps.append(Path(self.directory, name).stat().st_mtime)
            except OSError:
                stamps.append(0.0)
        return tuple(stamps)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials that require a client certificate from the authority, and
    take up rotated files at the next connection."""
    lock = threading.Lock()
    seen = [files.stamp()]

    def configuration() -> grpc.ServerCertificateConfiguration:
        ca, cert, key = files.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        with lock:
            now = files.stamp()
            if now == seen[0]:
                return None
            try:
                fresh = configuration()
            except ConfigError:
                return None  # mid-rotation: keep the last good files
            seen[0] = now
            return fresh

    # gRPC takes None from the fetcher as "unchanged"; its type stub says otherwise.
    return grpc.dynamic_ssl_server_credentials(
        configuration(),
        fetch,  # type: ignore[arg-type]
        require_client_authentication=True,
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
