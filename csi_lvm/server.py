"""The gRPC server: one unix socket serving Identity, Controller and Node.

An interceptor wraps every RPC: it logs one JSON line per call (method, ids,
duration, outcome) and turns domain errors into gRPC statuses, so servicers
raise and never pick status codes by hand.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message

from csi_lvm.csi import csi_pb2_grpc
from csi_lvm.errors import ConfigError, status_for
from csi_lvm.metrics import observe_rpc

log = structlog.get_logger("csi_lvm.server")

# Request fields worth a place in the log line; secrets are never among them.
_LOGGED_FIELDS = (
    "name",
    "volume_id",
    "snapshot_id",
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
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def call(request: Message, context: grpc.ServicerContext) -> Message:
            started = time.monotonic()
            code = grpc.StatusCode.OK
            message = ""
            try:
                answer: Message = inner(request, context)
                return answer
            except NotImplementedError:
                # The generated base class answers RPCs csi-lvm does not offer.
                code = grpc.StatusCode.UNIMPLEMENTED
                message = (
                    f"csi-lvm does not offer {method}; its capabilities "
                    "(GetPluginCapabilities, ControllerGetCapabilities, NodeGetCapabilities) "
                    "list what it serves"
                )
                context.abort(code, message)
            except Exception as error:  # every failure leaves as a proper status
                code, message = status_for(error)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("rpc crashed", method=method)
                context.abort(code, message)
            finally:
                elapsed = time.monotonic() - started
                observe_rpc(method, code.name, elapsed)
                quiet = method in _POLLS and code is grpc.StatusCode.OK
                (log.debug if quiet else log.info)(
                    "rpc",
                    method=method,
                    **_request_ids(request),
                    code=code.name,
                    error=message or None,
                    ms=round(elapsed * 1000, 1),
                )

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
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
        controller: csi_pb2_grpc.ControllerServicer,
        node: csi_pb2_grpc.NodeServicer,
        # More threads than a sidecar sends slow calls at once (16 creates
        # waiting on LVM must not keep Probe and the kubelet's calls waiting).
        workers: int = 64,
    ) -> None:
        self.path = socket_path(endpoint)
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
            interceptors=[CallInterceptor()],
            options=[("grpc.so_reuseport", 0)],
        )
        csi_pb2_grpc.add_IdentityServicer_to_server(identity, self.grpc)
        csi_pb2_grpc.add_ControllerServicer_to_server(controller, self.grpc)
        csi_pb2_grpc.add_NodeServicer_to_server(node, self.grpc)
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

    def stop(self, grace: float = 30.0) -> None:
        """Refuse new calls, let running ones finish (up to ``grace`` seconds)."""
        log.info("stopping", grace_seconds=grace)
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
