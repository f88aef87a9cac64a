#!/bin/sh
# Make the CurveZMQ keys that kustomization.yaml turns into the three Secrets:
#
#   keys/daemon/       the daemon's keyring          -> Secret augserve-daemon-keys
#   keys/worker.keys   a worker bundle               -> Secret augserve-worker-keys
#   keys/client.keys   a client (trainer) bundle     -> Secret augserve-client-keys
#
# Usage: sh docker/k8s/make-keys.sh [KEYS_DIR]    (default: keys/ beside this script; git-ignored)
# Needs `augserve` on PATH (pip install ., or run this script in the augserve:cpu image, see
# docker/README.md). Existing keys are kept: run it again after `augserve keys create --force
# --keys-dir KEYS_DIR/daemon` to re-export the bundles. Every file holds SECRET key material.
set -eu
keys=${1:-$(dirname "$0")/keys}
umask 077
augserve keys create --keys-dir "$keys/daemon"
augserve keys export --keys-dir "$keys/daemon" --role worker --out "$keys/worker.keys"
augserve keys export --keys-dir "$keys/daemon" --role client --out "$keys/client.keys"
echo "keys in $keys: now kubectl apply -k $(dirname "$0")"
