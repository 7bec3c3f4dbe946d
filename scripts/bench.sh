#!/usr/bin/env bash
# Loopback throughput of ferry beside scp, sftp, rsync (ssh and daemon) and raw
# sockets, all in one run of scripts/peers/run.sh (median of PB_RUNS runs).
# A benchmark, not a test: it prints figures and ratios, it never fails on a timing.
#
# Usage: scripts/bench.sh [tool ...]
#   (default: ferry-up ferry-down ferry-quic-up ferry-quic-down scp sftp rsync-ssh rsyncd rclone-sftp socat-file dd-fsync dd-direct iperf3;
#   scripts/peers/run.sh -l lists every tool)
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
# Env:   PB_SIZE_MIB (1024), PB_RUNS (3), PB_DIR (/tmp/peerbench), PB_DSTDIR,
#        PB_INSTALL=1 (apt-get install missing peer tools first; never by default),
#        and the ports of scripts/peers/run.sh. Tools not installed print "skipped".
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export PB_DIR=${PB_DIR:-/tmp/peerbench}
export PB_SIZE_MIB=${PB_SIZE_MIB:-1024}
export PB_RUNS=${PB_RUNS:-3}
TOOLS=("$@")
[[ ${#TOOLS[@]} -gt 0 ]] || TOOLS=(ferry-up ferry-down ferry-quic-up ferry-quic-down scp sftp rsync-ssh rsyncd rclone-sftp socat-file dd-fsync dd-direct iperf3)

cargo build --release -q -p ferry-cli
export FERRY_BIN=$REPO/target/release/ferry

OUT=$(scripts/peers/run.sh "${TOOLS[@]}")
echo
echo "loopback, ${PB_SIZE_MIB} MiB, MB/s (median of ${PB_RUNS}); ratio = ferry-up / tool"
echo "$OUT" | awk '
  { v[$1]=$2; order[n++]=$1 }
  END {
    up=v["ferry-up"]+0
    for (i=0;i<n;i++) { t=order[i]; r=""; if (v[t]+0>0 && up>0 && t!="ferry-up") r=sprintf("%.2fx", up/v[t]);
      printf "  %-14s %10s  %s\n", t, v[t], r }
  }'
