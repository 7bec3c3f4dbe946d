#!/usr/bin/env bash
# bench-sftp.sh - ferry's SFTP upload and download on loopback beside OpenSSH
# sftp/scp, rclone and lftp (same private sshd, same file, same run), then the
# bytes re-sent after an upload killed with SIGKILL half way.
#
# Usage: scripts/bench-sftp.sh            (needs root for the private sshd)
# Environment: PB_SIZE_MIB (default 1024), PB_RUNS (default 3), PB_DIR,
#   PB_DSTDIR (e.g. /dev/shm/pb to take disk writeback out), PEERS (path to
#   ../shared/bench/peers.sh). The machine may be shared: figures are medians
#   and still noisy; say so when quoting them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PEERS=${PEERS:-$ROOT/../shared/bench/peers.sh}
[ -x "$PEERS" ] || PEERS=/work/shared/bench/peers.sh
export PB_DIR=${PB_DIR:-/tmp/peerbench-sftp}
export PB_SIZE_MIB=${PB_SIZE_MIB:-1024}
export PB_RUNS=${PB_RUNS:-3}
export PB_SSH_PORT=${PB_SSH_PORT:-2232}

# Peer tools (bench only; the test suite does not need them).
missing=()
for t in sftp scp sshd rclone lftp; do command -v "$t" >/dev/null || missing+=("$t"); done
[[ -x /usr/sbin/sshd ]] || missing+=(sshd)
if [[ ${#missing[@]} -gt 0 && $(id -u) = 0 ]]; then
  echo "# installing ${missing[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client rclone lftp >/dev/null
fi

cargo build --release -p ferry-cli >&2
export FERRY_BIN=$ROOT/target/release/ferry

# Each run starts with a fresh state dir so nothing is resumed.
FERRY_SFTP='rm -rf "$PB_DIR/ferry-state"; "$FERRY_BIN" cp --no-progress --state-dir "$PB_DIR/ferry-state" -i "$SSH_KEY" --known-hosts "$PB_DIR/ferry-known-hosts" --accept-new-host-key --retry-max-attempts 1'
export PB_EXTRA="ferry-sftp-up=$FERRY_SFTP \"\$SRC\" \"sftp://root@127.0.0.1:\$SSH_PORT/\$DST\"
ferry-sftp-down=$FERRY_SFTP \"sftp://root@127.0.0.1:\$SSH_PORT/\$SRC\" \"\$DST\"
sftp-down=echo \"get \$SRC \$DST\" | sftp -q -F \"\$SSH_CFG\" -b - \"\$SSH_HOST\" >/dev/null
scp-down=scp -q -F \"\$SSH_CFG\" \"\$SSH_HOST:\$SRC\" \"\$DST\""

echo "# loopback, ${PB_SIZE_MIB} MiB, median of ${PB_RUNS}; MB/s (10^6 B/s); $(nproc) cores, shared machine"
# peers.sh's sftp, scp, rclone-sftp and lftp-sftp are uploads; sftp-down and
# scp-down are OpenSSH's downloads of the same file.
"$PEERS" ferry-sftp-up sftp scp rclone-sftp lftp-sftp ferry-sftp-down sftp-down scp-down

# Bytes re-sent after SIGKILL at ~half of an upload. peers.sh has stopped its
# sshd by now, so start our own the same way (private config, loopback only).
SSHD_DIR=$PB_DIR/ssh
SRC=$PB_DIR/test-${PB_SIZE_MIB}M.bin
DST=${PB_DSTDIR:-$PB_DIR/dst}/resume.bin
mkdir -p "$(dirname "$DST")"; rm -f "$DST" "$DST.part"
sed "s/^Port .*/Port $PB_SSH_PORT/" "$SSHD_DIR/sshd_config" > "$PB_DIR/resume_sshd_config"
mkdir -p /run/sshd
/usr/sbin/sshd -D -f "$PB_DIR/resume_sshd_config" -E "$PB_DIR/resume_sshd.log" &
SSHD_PID=$!
trap 'kill "$SSHD_PID" 2>/dev/null || true' EXIT
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$PB_SSH_PORT) 2>/dev/null && break; sleep 0.05; done
rm -rf "$PB_DIR/ferry-state"
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
