#!/bin/sh
# The certificates of csi-lvm's mutual-TLS port, as manifests to apply:
#
#   deploy/kubernetes/tls.sh DIR | kubectl apply -f -
#   deploy/kubernetes/tls.sh --snapshot-metadata DIR > csi-lvm-tls.yaml   # with
#       components/snapshot-metadata; then kubectl apply -f csi-lvm-tls.yaml
#   deploy/kubernetes/tls.sh --group-snapshots DIR > csi-lvm-tls.yaml     # with
#       components/group-snapshots (both options together for both components)
#
# Every plugin serves a port (9811, the DaemonSet's --peer-listen) over mutual
# TLS: the plugins of other nodes read its snapshots and volumes there to make
# volumes from them on their own node (a restore or a clone onto another
# node), the forwarder of components/snapshot-metadata asks it for changed
# blocks, and the forwarder of components/group-snapshots has it cut group
# snapshots. Only holders of a certificate of the plugins' authority get
# through, and only a certificate that names csi-lvm-plugin may read volumes.
#
# DIR keeps the certificate authorities (made on the first run, kept after):
#   forwarding-ca.{crt,key}  the plugins' authority: the plugins' certificate
#                            and the forwarder's come from it
#   service-ca.{crt,key}     (--snapshot-metadata) the sidecar's certificate;
#                            backup tools get service-ca.crt from the CR's caCert
# and the manifests name what each side needs (each Secret of type
# kubernetes.io/tls, with ca.crt beside tls.crt and tls.key):
#   Secret csi-lvm-plugin-tls             every plugin mounts it (daemonset.yaml,
#       /etc/csi-lvm-tls): client and server, naming csi-lvm-plugin (plugins
#       are reached at pod IPs, which no certificate names). Without it the
#       plugins run without the port: copies across nodes are off, and a
#       volume whose source is on another node is refused, naming that node.
# With --snapshot-metadata, also:
#   Secret csi-lvm-forwarding-tls         the forwarder mounts it: its own
#       certificate, client only, naming csi-lvm-forwarder, from the plugins'
#       authority: the plugins answer it SnapshotMetadata and refuse it their
#       volumes
#   Secret csi-lvm-snapshot-metadata-tls  the sidecar mounts it: naming its
#       Service, for backup tools
#   SnapshotMetadataService <driver>      address, caCert, audience
# With --group-snapshots, also:
#   Secret csi-lvm-group-snapshots-tls    the group forwarder mounts it: its
#       own certificate, client only, naming csi-lvm-group-snapshots, from the
#       plugins' authority: the only certificate the plugins let cut and
#       delete group snapshots on their port
#
# Renewal: run it again with the same DIR (and option) and apply. New
# certificates of the same authorities; mounted Secrets are updated by the
# kubelet within its sync period, and the plugins, the forwarder and the
# sidecar take them up without a restart. (A plugin that started before its
# Secret existed runs without the port: restart it once.) A new authority:
# keep the old DIR's *-ca.crt, run with a new DIR, and put the old certificate
# after the new one in ca.crt (each Secret) and caCert (the CR) until every
# side has its new certificate. Settings, from the environment: NAMESPACE,
# SERVICE, PORT, DRIVER, AUDIENCE, DAYS (below).
set -eu

NAMESPACE=${NAMESPACE:-csi-lvm}
SERVICE=${SERVICE:-csi-lvm-snapshot-metadata}
PORT=${PORT:-50051}
DRIVER=${DRIVER:-lvm.csi-lvm.io}
AUDIENCE=${AUDIENCE:-$DRIVER}
DAYS=${DAYS:-365}

usage() {
    cat >&2 <<EOF
usage: $0 [--snapshot-metadata] [--group-snapshots] DIR > manifests.yaml
  DIR keeps the authorities' keys: keep it, and run again with it to renew.
  Prints the Secret csi-lvm-plugin-tls (copies across nodes); with
  --snapshot-metadata also the forwarder's and the sidecar's Secrets and the
  SnapshotMetadataService CR (components/snapshot-metadata); with
  --group-snapshots also the group forwarder's Secret
  (components/group-snapshots).
EOF
    exit 2
}

snapshot_metadata=no
group_snapshots=no
while [ $# -gt 1 ]; do
    case $1 in
        --snapshot-metadata) snapshot_metadata=yes ;;
        --group-snapshots) group_snapshots=yes ;;
        *) usage ;;
    esac
    shift
done
[ $# -eq 1 ] || usage
case $1 in -*) usage ;; esac
dir=$1
mkdir -p "$dir"
chmod 700 "$dir"
umask 077

quiet() { "$@" 2>"$dir/openssl.log" || { cat "$dir/openssl.log" >&2; exit 1; }; }

authority() {  # name, common name
    [ -s "$dir/$1.key" ] && [ -s "$dir/$1.crt" ] && return 0
    quiet openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$dir/$1.key" -out "$dir/$1.crt" -days 3650 -subj "/CN=$2" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}

issue() {  # authority, leaf name, common name, subjectAltName, extendedKeyUsage
    printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$4" "$5" \
        > "$dir/$2.ext"
    quiet openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$dir/$2.key" -out "$dir/$2.csr" -subj "/CN=$3"
    quiet openssl x509 -req -in "$dir/$2.csr" -CA "$dir/$1.crt" -CAkey "$dir/$1.key" \
        -CAcreateserial -days "$DAYS" -extfile "$dir/$2.ext" -out "$dir/$2.crt"
    rm -f "$dir/$2.csr" "$dir/$2.ext" "$dir/openssl.log"
}

b64() { base64 < "$1" | tr -d '\n'; }

secret() {  # name, authority, leaf
    cat <<YAML
---
apiVersion: v1
kind: Secret
metadata:
  name: $1
  namespace: $NAMESPACE
type: kubernetes.io/tls
data:
  ca.crt: $(b64 "$dir/$2.crt")
  tls.crt: $(b64 "$dir/$3.crt")
  tls.key: $(b64 "$dir/$3.key")
YAML
}

authority forwarding-ca "csi-lvm forwarding CA"
issue forwarding-ca plugin csi-lvm-plugin DNS:csi-lvm-plugin serverAuth,clientAuth
secret csi-lvm-plugin-tls forwarding-ca plugin
if [ "$group_snapshots" = yes ]; then
    issue forwarding-ca group-snapshots csi-lvm-group-snapshots DNS:csi-lvm-group-snapshots \
        clientAuth
    secret csi-lvm-group-snapshots-tls forwarding-ca group-snapshots
fi
[ "$snapshot_metadata" = yes ] || exit 0

authority service-ca "csi-lvm snapshot metadata CA"
issue forwarding-ca forwarder csi-lvm-forwarder DNS:csi-lvm-forwarder clientAuth
host=$SERVICE.$NAMESPACE
issue service-ca service "$host" \
    "DNS:$host,DNS:$host.svc,DNS:$host.svc.cluster.local" serverAuth

secret csi-lvm-forwarding-tls forwarding-ca forwarder
secret csi-lvm-snapshot-metadata-tls service-ca service
cat <<YAML
---
apiVersion: cbt.storage.k8s.io/v1beta1
kind: SnapshotMetadataService
metadata:
  name: $DRIVER
spec:
  address: $host:$PORT
  caCert: $(b64 "$dir/service-ca.crt")
  audience: $AUDIENCE
YAML
