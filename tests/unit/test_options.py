"""The options the graph and the serve command are made from: a value that
cannot work is refused when they are made, with a message naming its flag."""

from __future__ import annotations

import pytest

from csi_lvm.cli import ServeOptions, build_parser
from csi_lvm.errors import ConfigError
from csi_lvm.kept_view import REFRESH_SECONDS
from csi_lvm.wiring import DEFAULT_DRIVER_NAME, Options


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"driver_name": "Not A Name"}, "--driver-name 'Not A Name' is not a domain-style name"),
        ({"topology_key": "bad key/x/y"}, "--topology-key 'bad key/x/y' is not a valid label key"),
        ({"topology_key": "kubernetes.io/hostname"}, "a label the kubelet sets itself"),
        ({"max_volumes_per_node": -1}, "--max-volumes-per-node must not be negative"),
        ({"lvm_shell_idle_exit": -1.0}, "--lvm-shell-idle-exit must not be negative"),
        ({"refresh_seconds": 0.1}, "--refresh-interval must be between 0.5 and 3600 seconds"),
        ({"refresh_seconds": 3601.0}, "--refresh-interval must be between 0.5 and 3600 seconds"),
    ],
)
def test_options_refuse_what_cannot_work(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Options("node-1", **changes)  # type: ignore[arg-type]
    assert message in str(refused.value)


def test_the_topology_key_defaults_to_the_driver_s_own() -> None:
    assert Options("node-1").node_topology_key == f"topology.{DEFAULT_DRIVER_NAME}/node"
    assert Options("node-1", topology_key="example.com/zone").node_topology_key == (
        "example.com/zone"
    )


def serve_options(*flags: str) -> ServeOptions:
    return ServeOptions.from_args(build_parser().parse_args(["serve", *flags]))


def test_serve_options_keep_the_flags_defaults() -> None:
    options = serve_options("--node-id", "node-1")
    assert options.endpoint == "unix:///csi/csi.sock"
    assert options.config_path == "/etc/csi-lvm/config.yaml"
    assert options.grace_period == 30.0
    assert options.metrics_address == options.peer_listen == ""
    assert options.tls_dir == "/etc/csi-lvm-tls"
    graph = options.graph
    assert (graph.node_id, graph.driver_name) == ("node-1", DEFAULT_DRIVER_NAME)
    assert graph.node_topology_key == f"topology.{DEFAULT_DRIVER_NAME}/node"
    assert graph.lvm_shell and graph.lvm_shell_idle_exit == 60.0
    assert list(graph.lvm_prefix) == [] and graph.lvm_config_overrides == ""
    assert graph.max_volumes_per_node == 0 and graph.refresh_seconds == REFRESH_SECONDS
    assert graph.state_dir == "/csi"  # the socket's directory


def test_serve_options_read_the_flags() -> None:
    options = serve_options(
        "--node-id", "node-1", "--lvm-prefix", "nsenter -t 1 -m", "--no-lvm-shell",
        "--state-dir", "/var/lib/csi-lvm", "--metrics-address", "0.0.0.0:9810",
    )  # fmt: skip
    assert list(options.graph.lvm_prefix) == ["nsenter", "-t", "1", "-m"]
    assert not options.graph.lvm_shell
    assert options.graph.state_dir == "/var/lib/csi-lvm"
    assert options.metrics_address == "0.0.0.0:9810"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--metrics-address", "9810"), "--metrics-address '9810' must be host:port"),
        (("--endpoint", "tcp://0:1"), "endpoint 'tcp://0:1' must be a unix socket"),
        (("--endpoint", "unix://csi.sock"), "endpoint 'unix://csi.sock' must name an absolute"),
        (("--driver-name", "Not A Name"), "--driver-name 'Not A Name' is not a domain-style"),
        (("--lvm-config-overrides", "/nonexistent/lvm.conf"), "cannot read it"),
    ],
)
def test_serve_options_refuse_bad_flags(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        serve_options("--node-id", "node-1", *flags)
    assert message in str(refused.value)
