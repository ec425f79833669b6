#!/bin/sh
# Runs the diskferry daemon under the transfer benchmark's server contract
# (BENCH_* variables; see the harness README, "Plugging in a server").
# DISKFERRY_DIRECT=1 opens images with O_DIRECT; DISKFERRY_MAX_WRITERS=N
# lets N connections write a file image at once.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
tls=false; [ "$BENCH_TLS" = 1 ] && tls=true
direct=false; [ "${DISKFERRY_DIRECT:-0}" = 1 ] && direct=true
max_writers=${DISKFERRY_MAX_WRITERS:-1}
cat >"$BENCH_WORKDIR/diskferry.toml" <<CONF
[daemon]
state_dir = "$BENCH_WORKDIR"
[remote]
host = "$BENCH_HOST"
port = $BENCH_PORT
[tls]
enable = $tls
cert_file = "$BENCH_CERT_FILE"
key_file = "$BENCH_KEY_FILE"
ca_file = "$BENCH_CA_FILE"
[local]
enable = true
socket = "$BENCH_LOCAL_SOCKET"
[control]
transport = "unix"
socket = "$BENCH_CONTROL_SOCKET"
[backend_file]
direct = $direct
max_writers = $max_writers
CONF
exec "${DISKFERRY_VENV:-$root/.venv}/bin/diskferry" serve --config "$BENCH_WORKDIR/diskferry.toml"
