"""The gRPC server: one unix socket serving Identity, Controller, Node and
SnapshotMetadata.

An interceptor wraps every RPC: it logs one JSON line per call (method, ids,
duration, outcome) and turns domain errors into gRPC statuses, so servicers
raise and never pick status codes by hand. A streaming call is logged when
its stream ends, and an error raised while it streams ends the stream with
the error's status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message

from csi_lvm.csi import csi_pb2_grpc
from csi_lvm.errors import ConfigError, status_for
from csi_lvm.metrics import observe_rpc
from csi_lvm.peer import peer_pb2_grpc
from csi_lvm.peers import PING_MS

log = structlog.get_logger("csi_lvm.server")

# Request fields worth a place in the log line; secrets are never among them.
_LOGGED_FIELDS = (
    "name",
    "volume_id",
    "snapshot_id",
    "base_snapshot_id",
    "target_snapshot_id",
    "source_volume_id",
    "staging_target_path",
    "target_path",
    "volume_path",
)


# Calls the kubelet, the sidecars and the liveness probe repeat all day (stats
# of every mounted volume each minute): logged at debug when they succeed, so
# a node with many volumes does not log a line per volume per minute.
_POLLS = frozenset(
    {
        "Probe",
        "GetPluginInfo",
        "GetPluginCapabilities",
        "NodeGetInfo",
        "NodeGetCapabilities",
        "NodeGetVolumeStats",
        "ControllerGetCapabilities",
        "GetCapacity",
    }
)


def _request_ids(request: Message) -> dict[str, str]:
    ids = {}
    for field in _LOGGED_FIELDS:
        value = getattr(request, field, "")
        if isinstance(value, str) and value:
            ids[field] = value[:256]
    return ids


class CallInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    @staticmethod
    def _unary(
        method: str, inner: Callable[[Any, grpc.ServicerContext], Any]
    ) -> Callable[[Message, grpc.ServicerContext], Message]:
        def call(request: Message, context: grpc.ServicerContext) -> Message:
            outcome = _Outcome(method, request)
            try:
                answer: Message = inner(request, context)
                return answer
            except Exception as error:  # every failure leaves as a proper status
                outcome.failed(error, context)
                raise  # not reached: abort raises
            finally:
                outcome.log()

        return call

    @staticmethod
    def _streaming(
        method: str, inner: Callable[[Any, grpc.ServicerContext], Any]
    ) -> Callable[[Message, grpc.ServicerContext], Iterator[Message]]:
        def call(request: Message, context: grpc.ServicerContext) -> Iterator[Message]:
            outcome = _Outcome(method, request)
            try:
                answers: Iterator[Message] = inner(request, context)
                for answer in answers:
                    outcome.messages += 1
                    yield answer
            except Exception as error:
                outcome.failed(error, context)
            finally:
                outcome.log()

        return call


class _Outcome:
    """One call's status, timing and log line."""

    def __init__(self, method: str, request: Message) -> None:
        self.method = method
        self.request = request
        self.started = time.monotonic()
        self.code = grpc.StatusCode.OK
        self.message = ""
        self.messages = 0  # of a streaming answer

    def failed(self, error: Exception, context: grpc.ServicerContext) -> None:
        """End the call with the error's status (``abort`` raises)."""
        if isinstance(error, NotImplementedError):
            # The generated base class answers RPCs csi-lvm does not offer.
            self.code = grpc.StatusCode.UNIMPLEMENTED
            self.message = (
                f"csi-lvm does not offer {self.method}; its capabilities "
                "(GetPluginCapabilities, ControllerGetCapabilities, NodeGetCapabilities) "
                "list what it serves"
            )
        else:
            self.code, self.message = status_for(error)
            if self.code is grpc.StatusCode.INTERNAL:
                log.error("rpc crashed", method=self.method, exc_info=error)
        context.abort(self.code, self.message)

    def log(self) -> None:
        elapsed = time.monotonic() - self.started
        observe_rpc(self.method, self.code.name, elapsed)
        quiet = self.method in _POLLS and self.code is grpc.StatusCode.OK
        (log.debug if quiet else log.info)(
            "rpc",
            method=self.method,
            **_request_ids(self.request),
            code=self.code.name,
            error=self.message or None,
            **({"messages": self.messages} if self.messages else {}),
            ms=round(elapsed * 1000, 1),
        )


def socket_path(endpoint: str) -> str:
    if not endpoint.startswith("unix://"):
        raise ConfigError(f"endpoint {endpoint!r} must be a unix socket: unix:///path/csi.sock")
    path = endpoint[len("unix://") :]
    if not path.startswith("/"):
        raise ConfigError(f"endpoint {endpoint!r} must name an absolute path")
    return path


def _remove_stale_socket(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


class Server:
    def __init__(
        self,
        endpoint: str,
        identity: csi_pb2_grpc.IdentityServicer,
        controller: csi_pb2_grpc.ControllerServicer | None,
        node: csi_pb2_grpc.NodeServicer | None,
        snapshot_metadata: csi_pb2_grpc.SnapshotMetadataServicer | None = None,
        # More threads than a sidecar sends slow calls at once (16 creates
        # waiting on LVM must not keep Probe and the kubelet's calls waiting).
        workers: int = 64,
        # A TCP address and credentials on which the SnapshotMetadata service
        # is served to the cluster's forwarder (csi_lvm.forwarding), and the
        # VolumeSource service to the other nodes' plugins (csi_lvm.peer_source).
        tls_listener: tuple[str, grpc.ServerCredentials] | None = None,
        volume_source: peer_pb2_grpc.VolumeSourceServicer | None = None,
        group_controller: csi_pb2_grpc.GroupControllerServicer | None = None,
        # The GroupController the TLS port offers the cluster's group forwarder.
        tls_group_controller: csi_pb2_grpc.GroupControllerServicer | None = None,
        # The Controller (modifications) the TLS port offers the other plugins.
        tls_controller: csi_pb2_grpc.ControllerServicer | None = None,
    ) -> None:
        self.path = socket_path(endpoint)
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
            interceptors=[CallInterceptor()],
            options=[("grpc.so_reuseport", 0)],
        )
        csi_pb2_grpc.add_IdentityServicer_to_server(identity, self.grpc)
        if controller is not None:
            csi_pb2_grpc.add_ControllerServicer_to_server(controller, self.grpc)
        if node is not None:
            csi_pb2_grpc.add_NodeServicer_to_server(node, self.grpc)
        if group_controller is not None:
            csi_pb2_grpc.add_GroupControllerServicer_to_server(group_controller, self.grpc)
        if snapshot_metadata is not None:
            csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(snapshot_metadata, self.grpc)
        self.tls: grpc.Server | None = None
        self.tls_port = 0
        if tls_listener is not None:
            if snapshot_metadata is None:
                raise ConfigError("a TLS listener serves the SnapshotMetadata service: give it")
            self.tls = grpc.server(
                futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="tls-rpc"),
                interceptors=[CallInterceptor()],
                options=[
                    ("grpc.so_reuseport", 0),
                    # The copies' clients ping an idle stream to notice a lost peer.
                    ("grpc.http2.min_recv_ping_interval_without_data_ms", PING_MS // 2),
                    ("grpc.keepalive_permit_without_calls", 1),
                ],
            )
            csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(snapshot_metadata, self.tls)
            if volume_source is not None:
                peer_pb2_grpc.add_VolumeSourceServicer_to_server(volume_source, self.tls)
            if tls_group_controller is not None:
                csi_pb2_grpc.add_GroupControllerServicer_to_server(tls_group_controller, self.tls)
            if tls_controller is not None:
                csi_pb2_grpc.add_ControllerServicer_to_server(tls_controller, self.tls)
            self._tls_listener = tls_listener
        self._stopping = threading.Event()

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or "/", exist_ok=True)
        _remove_stale_socket(self.path)
        previous = os.umask(0o177)  # the socket is born owner-only: rw-------
        try:
            self.grpc.add_insecure_port(f"unix://{self.path}")
            self.grpc.start()
        finally:
            os.umask(previous)
        os.chmod(self.path, 0o660)
        log.info("serving", socket=self.path)
        if self.tls is not None:
            address, credentials = self._tls_listener
            self.tls_port = self.tls.add_secure_port(address, credentials)
            if self.tls_port == 0:
                raise ConfigError(f"cannot listen on {address} for the forwarder's calls")
            self.tls.start()
            log.info("serving the other csi-lvm components over mutual TLS", address=address)

    def stop(self, grace: float = 30.0) -> None:
        """Refuse new calls, let running ones finish (up to ``grace`` seconds)."""
        log.info("stopping", grace_seconds=grace)
        if self.tls is not None:
            self.tls.stop(grace)
        self.grpc.stop(grace).wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        log.info("stopped")

    def run_until_signalled(self, grace: float = 30.0) -> None:
        def on_signal(signum: int, _frame: Any) -> None:
            log.info("signal", signal=signal.Signals(signum).name)
            self._stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        self._stopping.wait()
        self.stop(grace)
