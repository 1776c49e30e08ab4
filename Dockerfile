# The csi-lvm plugin image: the csi_lvm package in a virtualenv on Debian
# bookworm with LVM, thin-provisioning-tools and the filesystem tools the
# driver runs. It is the plugin container of deploy/kubernetes/daemonset.yaml.
#
#   docker build --network host -t csi-lvm:0.1.0 .
#
# Two stages: the first makes the virtualenv (python3-venv is needed only
# there; pip and setuptools are removed from the venv before it is copied),
# the second has only the Python runtime, the venv and the tools.

FROM debian:bookworm-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/csi-lvm
# README.m[d]: the readme goes in when there is one (pyproject names it);
# the pattern lets the build go on without it.
COPY pyproject.toml README.m[d] /src/
COPY csi_lvm /src/csi_lvm
# Behind a TLS-inspecting proxy, pass its CA certificates (PEM text) with
#   --build-arg EXTRA_CA_CERTS="$(cat /usr/local/share/ca-certificates/*.crt)"
# pip in this stage (and its build-isolation subprocess, hence PIP_CERT)
# trusts them beside its own bundle; the final stage never
# sees them.
ARG EXTRA_CA_CERTS=""
RUN bundle=$(/opt/csi-lvm/bin/python -m pip._vendor.certifi) \
    && if [ -n "$EXTRA_CA_CERTS" ]; then \
        { cat "$bundle"; printf '%s\n' "$EXTRA_CA_CERTS"; } > /tmp/ca.pem && bundle=/tmp/ca.pem; \
    fi \
    && PIP_CERT="$bundle" /opt/csi-lvm/bin/pip install --no-cache-dir --disable-pip-version-check /src \
    && /opt/csi-lvm/bin/pip uninstall -y --disable-pip-version-check setuptools pip \
    && rm -f /tmp/ca.pem

FROM debian:bookworm-slim
# kmod is left out on purpose: kernel modules (dm-thin-pool, dm-snapshot)
# belong to the host and are loaded there; the container has no /lib/modules.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 lvm2 thin-provisioning-tools e2fsprogs xfsprogs btrfs-progs util-linux mount cryptsetup-bin \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
    && mkdir -p /run/lock/lvm /run/lvm /run/cryptsetup /csi /etc/csi-lvm
# The container's LVM settings: its own lvmlocal.conf where the host's /etc/lvm
# is not mounted, and the overrides the DaemonSet gives every command on top of
# the host's configuration (--lvm-config-overrides) where it is.
COPY deploy/image/lvmlocal.conf /etc/lvm/lvmlocal.conf
COPY deploy/image/lvmlocal.conf /usr/share/csi-lvm/lvm-container.conf
COPY --from=build /opt/csi-lvm /opt/csi-lvm
ENV PATH=/opt/csi-lvm/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LVM_SUPPRESS_FD_WARNINGS=1
ENTRYPOINT ["csi-lvm"]
CMD ["serve", "--endpoint", "unix:///csi/csi.sock", "--config", "/etc/csi-lvm/config.yaml"]
