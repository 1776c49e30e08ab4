"""Where csi-lvm finds the Kubernetes API: $KUBECONFIG first (as kubectl),
then the pod's service account when the kubelet gave the container the API's
address, then ~/.kube/config; no configuration is a ConfigError that says
what to do. (The API itself is exercised by the cluster tier.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from csi_lvm import kube
from csi_lvm.errors import ConfigError
from tests.unit.kubeconfig import kubeconfig


def server_of() -> str:
    return str(kube._config().get().cluster.server)


def test_an_explicit_kubeconfig_wins_over_a_service_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config"
    config.write_text(kubeconfig("https://explicit:6443"))
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert server_of() == "https://explicit:6443"


def test_the_home_config_is_the_last_resort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text(kubeconfig("https://home:6443"))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert server_of() == "https://home:6443"


def test_no_configuration_is_a_config_error_saying_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="set KUBECONFIG"):
        kube.node_labels("node-a", attempts=1)
    with pytest.raises(ConfigError, match="no Kubernetes API is configured"):
        kube.owners("lvm.csi-lvm.io")
