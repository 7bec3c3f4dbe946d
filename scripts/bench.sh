#!/usr/bin/env bash
# Loopback throughput of ferry beside scp, sftp, rsync (ssh and daemon) and raw
# sockets, all in one run of ../shared/bench/peers.sh (median of PB_RUNS runs).
# A benchmark, not a test: it prints figures and ratios, it never fails on a timing.
#
# Usage: scripts/bench.sh [tool ...]
#   (default: ferry-up ferry-down ferry-quic-up ferry-quic-down scp sftp rsync-ssh rsyncd rclone-sftp socat-file dd-fsync dd-direct iperf3)
#   dd-fsync and dd-direct are no transfers: `dd conv=fsync` of the file into the
#   destination directory (through the page cache, then one fsync: a plain durable
#   copy), and the same with `oflag=direct` (4 MiB writes bypassing the page cache,
#   one at a time: what the disk itself takes). ferry writes received chunks
#   O_DIRECT, up to four at once, and fsyncs; the peers do neither, so on disk
#   these show what durability costs (PB_DSTDIR=/dev/shm/... takes the disk out
#   of every figure).
#   rsyncd-fsync (not in the default list) is the rsync daemon told to fsync
#   what it writes (`rsync --fsync`, rsync >= 3.2.4): the daemon held to
#   ferry's durability.
# Env:   PB_SIZE_MIB (1024), PB_RUNS (3), PB_DIR (/tmp/peerbench), PEERS (path to peers.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PEERS=${PEERS:-$REPO/../shared/bench/peers.sh}
[[ -f $PEERS ]] || { echo "bench.sh: peers.sh not found at $PEERS (set PEERS=)" >&2; exit 1; }
export PB_DIR=${PB_DIR:-/tmp/peerbench}
export PB_SIZE_MIB=${PB_SIZE_MIB:-1024}
DSTDIR=${PB_DSTDIR:-$PB_DIR/dst}
TOOLS=("$@")
[[ ${#TOOLS[@]} -gt 0 ]] || TOOLS=(ferry-up ferry-down ferry-quic-up ferry-quic-down scp sftp rsync-ssh rsyncd rclone-sftp socat-file dd-fsync dd-direct iperf3)

# Peer tools (bench only; the test suite does not need them).
missing=()
for t in rsync scp sshd socat nc iperf3 rclone; do command -v "$t" >/dev/null || missing+=("$t"); done
if [[ ${#missing[@]} -gt 0 && $(id -u) = 0 ]]; then
  apt-get update -qq && apt-get install -y -qq rsync openssh-server openssh-client socat netcat-openbsd iperf3 rclone >/dev/null
fi

cargo build --release -q
BIN=$REPO/target/release/ferry
mkdir -p "$PB_DIR" "$DSTDIR" "$PB_DIR/ferry-src"
SRC=$PB_DIR/test-${PB_SIZE_MIB}M.bin
if [[ ! -f $SRC ]]; then
  echo "making $SRC" >&2
  head -c $((PB_SIZE_MIB * 1024 * 1024)) /dev/urandom >"$SRC"
fi
ln -f "$SRC" "$PB_DIR/ferry-src/src.bin"
STATE=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$STATE"; }
trap cleanup EXIT

UP_PORT=${FERRY_UP_PORT:-7790}
DOWN_PORT=${FERRY_DOWN_PORT:-7791}
"$BIN" -q serve --create-root --root "$DSTDIR" --listen 127.0.0.1:$UP_PORT --state-dir "$STATE/up" --no-auth >/dev/null & PIDS+=($!)
"$BIN" -q serve --create-root --root "$PB_DIR/ferry-src" --listen 127.0.0.1:$DOWN_PORT --state-dir "$STATE/down" --no-auth >/dev/null & PIDS+=($!)
RSYNCD_FSYNC_PORT=${RSYNCD_FSYNC_PORT:-8731}
if printf '%s\n' "${TOOLS[@]}" | grep -qx rsyncd-fsync; then
  cat >"$STATE/rsyncd.conf" <<EOF
use chroot = no
[dst]
  path = $DSTDIR
  read only = no
  uid = root
  gid = root
EOF
  rsync --daemon --no-detach --address=127.0.0.1 --port="$RSYNCD_FSYNC_PORT" --config="$STATE/rsyncd.conf" & PIDS+=($!)
fi
sleep 0.5

export PB_EXTRA="ferry-up=$BIN cp -q --no-progress --state-dir $STATE/c1 \"\$SRC\" ferry://127.0.0.1:$UP_PORT/ferry-up.bin
ferry-down=$BIN cp -q --no-progress --state-dir $STATE/c2 ferry://127.0.0.1:$DOWN_PORT/src.bin \"\$DST\"
ferry-quic-up=$BIN cp -q --no-progress --state-dir $STATE/c3 \"\$SRC\" ferry+quic://127.0.0.1:$UP_PORT/ferry-quic-up.bin
ferry-quic-down=$BIN cp -q --no-progress --state-dir $STATE/c4 ferry+quic://127.0.0.1:$DOWN_PORT/src.bin \"\$DST\"
dd-fsync=dd if=\"\$SRC\" of=\"\$DST\" bs=4M conv=fsync status=none
dd-direct=dd if=\"\$SRC\" of=\"\$DST\" bs=4M oflag=direct conv=fsync status=none
rsyncd-fsync=rsync -W --fsync \"\$SRC\" rsync://127.0.0.1:$RSYNCD_FSYNC_PORT/dst/rsyncd-fsync.bin"

OUT=$(bash "$PEERS" "${TOOLS[@]}")
echo
echo "loopback, ${PB_SIZE_MIB} MiB, MB/s (median of ${PB_RUNS:-3}); ratio = ferry-up / tool"
echo "$OUT" | awk '
  { v[$1]=$2; order[n++]=$1 }
  END {
    up=v["ferry-up"]+0
    for (i=0;i<n;i++) { t=order[i]; r=""; if (v[t]+0>0 && up>0 && t!="ferry-up") r=sprintf("%.2fx", up/v[t]);
      printf "  %-14s %10s  %s\n", t, v[t], r }
  }'
