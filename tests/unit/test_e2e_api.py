"""e2e/api.py reads objects as the API serves them: a new node's CSINode
says ``"drivers": null`` until a plugin registers, which lightkube's typed
model refuses. A local HTTP server plays the API (the cluster tier runs the
real one)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import pytest
from lightkube.core import decoders
from lightkube.resources.storage_v1 import CSINode

from e2e.api import Api
from tests.unit.kubeconfig import kubeconfig

NEW_NODE = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "CSINode",
    "metadata": {"name": "e2e-node", "resourceVersion": "7"},
    "spec": {"drivers": None},
}


class FakeApi(BaseHTTPRequestHandler):
    """Answers the one CSINode and the list of CSINodes; 404 otherwise."""

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/apis/storage.k8s.io/v1/csinodes/e2e-node":
            body: dict[str, object] = NEW_NODE
        elif path == "/apis/storage.k8s.io/v1/csinodes":
            body = {"apiVersion": "storage.k8s.io/v1", "kind": "CSINodeList",
                    "metadata": {"resourceVersion": "7"}, "items": [NEW_NODE]}  # fmt: skip
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    address = f"http://127.0.0.1:{server.server_address[1]}"
    config = tmp_path / "kubeconfig"
    config.write_text(kubeconfig(address))
    unused = tmp_path / "unused"
    try:
        yield Api(config, address, (unused, unused, unused))
    finally:
        server.shutdown()
        server.server_close()


def test_the_typed_model_refuses_what_the_api_serves() -> None:
    """Why the untyped read exists; the day lightkube accepts the null, it may go."""
    with pytest.raises(msgspec.ValidationError, match="drivers"):
        decoders.decode_object(json.dumps(NEW_NODE).encode(), CSINode)


def test_an_object_comes_back_as_the_json_served(api: Api) -> None:
    assert api.get("csinode", "e2e-node") == NEW_NODE


def test_a_list_comes_back_as_the_json_served(api: Api) -> None:
    assert api.get("csinodes", namespace=None) == {"items": [NEW_NODE]}
