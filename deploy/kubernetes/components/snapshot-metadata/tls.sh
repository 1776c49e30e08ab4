#!/bin/sh
# The certificates of changed block tracking, as manifests to apply:
#
#   ./tls.sh DIR > csi-lvm-tls.yaml && kubectl apply -f csi-lvm-tls.yaml
#
# DIR keeps two certificate authorities (made on the first run, kept after):
#   forwarding-ca.{crt,key}  the forwarder and the plugins: only holders of a
#                            certificate of it reach a plugin's port
#   service-ca.{crt,key}     the sidecar's certificate; backup tools get
#                            service-ca.crt from the CR's caCert
# and the manifests name what each side needs:
#   Secret csi-lvm-forwarding-tls         ca.crt, tls.crt, tls.key: one
#       certificate for client and server use, naming csi-lvm-plugin (plugins
#       are reached at pod IPs, which no certificate names)
#   Secret csi-lvm-snapshot-metadata-tls  the sidecar's, naming its Service
#   SnapshotMetadataService <driver>      address, caCert, audience
#
# Renewal: run it again with the same DIR and apply. New certificates of the
# same authorities; mounted Secrets are updated by the kubelet within its sync
# period, the plugins and the sidecar take them up without a restart. A new
# authority: keep the old DIR's *-ca.crt, run with a new DIR, and put the old
# certificate after the new one in ca.crt (the Secret) and caCert (the CR)
# until every side has its new certificate. Settings, from the environment:
# NAMESPACE, SERVICE, PORT, DRIVER, AUDIENCE, DAYS (below).
set -eu

NAMESPACE=${NAMESPACE:-csi-lvm}
SERVICE=${SERVICE:-csi-lvm-snapshot-metadata}
PORT=${PORT:-50051}
DRIVER=${DRIVER:-lvm.csi-lvm.io}
AUDIENCE=${AUDIENCE:-$DRIVER}
DAYS=${DAYS:-365}

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR > manifests.yaml  (DIR keeps the authorities' keys)" >&2
    exit 2
fi
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
authority service-ca "csi-lvm snapshot metadata CA"
issue forwarding-ca forwarding csi-lvm-plugin DNS:csi-lvm-plugin serverAuth,clientAuth
host=$SERVICE.$NAMESPACE
issue service-ca service "$host" \
    "DNS:$host,DNS:$host.svc,DNS:$host.svc.cluster.local" serverAuth

secret csi-lvm-forwarding-tls forwarding-ca forwarding
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
