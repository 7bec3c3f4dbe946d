#!/usr/bin/env bash
# bench-sftp-verify.sh - what the default SFTP verification (--verify full:
# every kept and every finished byte proven) costs against --verify tail, on
# the resume of an upload killed with SIGKILL at half way.
#
# Each run: a fresh state dir, `ferry cp` of the file to a private sshd,
# SIGKILL once the remote .part reaches 50 %, then the same `ferry cp` again
# (timed) with the verify level under test. Levels alternate run by run.
# With NETEM=1 the same runs go through a 50 ms round trip: sshd and ferry
# run inside a network namespace this script creates, whose loopback gets
# `tc netem delay 25ms` (each direction); the namespace is deleted on exit.
#
# Usage: scripts/bench-sftp-verify.sh     (root: private sshd, netns)
# Environment: PB_SIZE_MIB (default 1024), PB_RUNS (default 3), PB_DIR
#   (default /tmp/bench-sftp-verify), NETEM (0 or 1, default 0).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZE_MIB=${PB_SIZE_MIB:-1024}
RUNS=${PB_RUNS:-3}
DIR=${PB_DIR:-/tmp/bench-sftp-verify}
NETEM=${NETEM:-0}
PORT=${PB_SSH_PORT:-2241}
NS=ferry-bench-verify-$$

cargo build --release -p ferry-cli >&2
FERRY=$ROOT/target/release/ferry

mkdir -p "$DIR"
SRC=$DIR/src-${SIZE_MIB}M.bin
[ -f "$SRC" ] && [ "$(stat -c %s "$SRC")" = $((SIZE_MIB << 20)) ] ||
  head -c $((SIZE_MIB << 20)) /dev/urandom > "$SRC"
rm -rf "$DIR/ssh"; mkdir -p "$DIR/ssh" /run/sshd
ssh-keygen -q -t ed25519 -N "" -f "$DIR/ssh/hostkey"
ssh-keygen -q -t ed25519 -N "" -f "$DIR/ssh/clientkey"
cp "$DIR/ssh/clientkey.pub" "$DIR/ssh/authorized_keys"
SFTP_SERVER=internal-sftp
for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server; do [ -x "$p" ] && SFTP_SERVER=$p && break; done
cat > "$DIR/ssh/sshd_config" <<CFG
Port $PORT
ListenAddress 127.0.0.1
HostKey $DIR/ssh/hostkey
PidFile none
AuthorizedKeysFile $DIR/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
Subsystem sftp $SFTP_SERVER
CFG

IN=()   # prefix that runs a command inside the namespace (empty: no netem)
SSHD_PID=
cleanup() {
  [ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2>/dev/null || true
  [ "$NETEM" = 1 ] && ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT
if [ "$NETEM" = 1 ]; then
  ip netns add "$NS"
  ip netns exec "$NS" ip link set lo up
  ip netns exec "$NS" tc qdisc add dev lo root netem delay 25ms limit 100000 || {
    echo "bench-sftp-verify.sh: tc netem unavailable here (kernel module sch_netem); run without NETEM=1" >&2
    exit 1
  }
  IN=(ip netns exec "$NS")
fi
"${IN[@]}" /usr/sbin/sshd -D -f "$DIR/ssh/sshd_config" -E "$DIR/sshd.log" &
SSHD_PID=$!
for _ in $(seq 100); do
  "${IN[@]}" bash -c "echo > /dev/tcp/127.0.0.1/$PORT" 2>/dev/null && break; sleep 0.05
done

DST=$DIR/dst.bin
URL="sftp://root@127.0.0.1:$PORT/$DST"
HALF=$((SIZE_MIB << 19))
args() {
  echo cp --no-progress --state-dir "$DIR/state" -i "$DIR/ssh/clientkey" \
    --known-hosts "$DIR/known_hosts" --accept-new-host-key --retry-max-attempts 1
}

# One run: kill at half, then time the resume with --verify $1. Prints seconds.
run() {
  local verify=$1
  rm -rf "$DIR/state" "$DST" "$DST.part" "$DIR/known_hosts"
  # Started directly so that $! is ferry's (or ip netns exec's, which execs it) PID.
  "${IN[@]}" "$FERRY" $(args) --verify tail "$SRC" "$URL" >/dev/null 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    [ "$(stat -c %s "$DST.part" 2>/dev/null || echo 0)" -ge "$HALF" ] && break
    sleep 0.01
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local t0 t1 out
  t0=$(date +%s.%N)
  out=$("${IN[@]}" "$FERRY" $(args) --json --verify "$verify" "$SRC" "$URL" 2>"$DIR/err") ||
    { cat "$DIR/err" >&2; exit 1; }
  t1=$(date +%s.%N)
  cmp "$SRC" "$DST"
  echo "$verify: $(echo "$out" | tail -1 | grep -o '"outcome":"[a-z_]*"[^}]*"verified_by":"[a-z0-9-]*"')" >&2
  echo "$t1 - $t0" | bc
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

full=(); tail=()
for i in $(seq "$RUNS"); do
  full+=("$(run full)")
  tail+=("$(run tail)")
done
link=$([ "$NETEM" = 1 ] && echo "50 ms RTT (netem on a private netns loopback)" || echo loopback)
echo "# resume of a ${SIZE_MIB} MiB upload killed at 50 %, $link, median of $RUNS; $(nproc) cores, shared machine"
echo "full (default): $(printf '%s\n' "${full[@]}" | median) s   [${full[*]}]"
echo "tail:           $(printf '%s\n' "${tail[@]}" | median) s   [${tail[*]}]"
