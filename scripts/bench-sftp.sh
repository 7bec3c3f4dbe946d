#!/usr/bin/env bash
# bench-sftp.sh - ferry's SFTP upload and download on loopback beside OpenSSH
# sftp/scp, rclone and lftp (same private sshd, same file, same run, through
# scripts/peers/run.sh), then the bytes re-sent after an upload killed with
# SIGKILL half way.
#
# Usage: scripts/bench-sftp.sh            (needs root for the private sshd)
# Environment: PB_SIZE_MIB (default 1024), PB_RUNS (default 3), PB_DIR,
#   PB_DSTDIR (e.g. /dev/shm/pb to take disk writeback out), PB_SSH_PORT (2232),
#   PB_INSTALL=1 (apt-get install missing peer tools first; never by default).
#   Other work on the machine makes figures noisy (medians help); say so
#   when quoting them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=scripts/peers/lib.sh
. scripts/peers/lib.sh
export PB_DIR=${PB_DIR:-/tmp/peerbench-sftp}
export PB_SIZE_MIB=${PB_SIZE_MIB:-1024}
export PB_RUNS=${PB_RUNS:-3}
export PB_SSH_PORT=${PB_SSH_PORT:-2232}

cargo build --release -p ferry-cli >&2
export FERRY_BIN=$ROOT/target/release/ferry

echo "# loopback, ${PB_SIZE_MIB} MiB, median of ${PB_RUNS}; MB/s (10^6 B/s); $(nproc) cores, machine not idle"
# sftp, scp, rclone-sftp and lftp-sftp are uploads; sftp-down and scp-down are
# OpenSSH's downloads of the same file.
scripts/peers/run.sh ferry-sftp-up sftp scp rclone-sftp lftp-sftp ferry-sftp-down sftp-down scp-down

# Bytes re-sent after SIGKILL at ~half of an upload. run.sh has stopped its
# sshd by now: start one the same way (private config, loopback only).
SSHD_DIR=$PB_DIR/ssh
SRC=$PB_DIR/test-${PB_SIZE_MIB}M.bin
DST=${PB_DSTDIR:-$PB_DIR/dst}/resume.bin
mkdir -p "$(dirname "$DST")"; rm -f "$DST" "$DST.part"
peer_ssh_files "$SSHD_DIR" "$PB_SSH_PORT" 127.0.0.1 peer
/usr/sbin/sshd -D -f "$SSHD_DIR/sshd_config" -E "$PB_DIR/resume_sshd.log" &
SSHD_PID=$!
trap 'kill "$SSHD_PID" 2>/dev/null || true; rm -f "$DST"' EXIT
peer_wait_port "$PB_SSH_PORT" || { echo "bench-sftp.sh: sshd did not start (see $PB_DIR/resume_sshd.log)" >&2; exit 1; }
rm -rf "$PB_DIR/ferry-state" "$PB_DIR/ferry-known-hosts"
ARGS=(cp --no-progress --state-dir "$PB_DIR/ferry-state" -i "$SSHD_DIR/clientkey"
  --known-hosts "$PB_DIR/ferry-known-hosts" --accept-new-host-key)
URL="sftp://root@127.0.0.1:$PB_SSH_PORT/$DST"
# Started directly (not through a function) so $! is ferry's own PID.
"$FERRY_BIN" "${ARGS[@]}" "$SRC" "$URL" >/dev/null 2>&1 &
FERRY_PID=$!
HALF=$((PB_SIZE_MIB * 1024 * 1024 / 2))
while kill -0 "$FERRY_PID" 2>/dev/null; do
  HAVE=$(stat -c %s "$DST.part" 2>/dev/null || echo 0)
  [ "$HAVE" -ge "$HALF" ] && break
  sleep 0.01
done
PART_AT_KILL=$(stat -c %s "$DST.part" 2>/dev/null || echo 0)
kill -9 "$FERRY_PID" 2>/dev/null || true
wait "$FERRY_PID" 2>/dev/null || true
SUMMARY=$("$FERRY_BIN" "${ARGS[@]}" --json "$SRC" "$URL" 2>"$PB_DIR/resume.err" | tail -1) || { cat "$PB_DIR/resume.err" >&2; exit 1; }
cmp "$SRC" "$DST"
echo "resume: killed with .part at $PART_AT_KILL bytes; rerun: $SUMMARY"
