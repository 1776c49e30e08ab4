"""A kubeconfig naming one API server, with a token, for the unit tests that
point a Kubernetes client somewhere (TLS unchecked: no real server is
behind the https names, and a local plain-HTTP one needs none)."""

from __future__ import annotations

TEMPLATE = """apiVersion: v1
kind: Config
clusters:
  - name: c
    cluster: {{server: "{server}", insecure-skip-tls-verify: true}}
users:
  - name: u
    user: {{token: t}}
contexts:
  - name: x
    context: {{cluster: c, user: u}}
current-context: x
"""


def kubeconfig(server: str) -> str:
    return TEMPLATE.format(server=server)
