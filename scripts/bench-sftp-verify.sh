#!/usr/bin/env bash
# bench-sftp-verify.sh - what the default SFTP verification (--verify full:
# every kept and every finished byte proven) costs against --verify tail, on
# the resume of an upload killed with SIGKILL at half way.
#
# Each run: a fresh state dir, `ferry cp` of the file to a private sshd,
# SIGKILL once the remote .part reaches 50 %, then the same `ferry cp` again
# (timed) with the verify level under test. Levels alternate run by run.
#
# Links (PB_LINKS, run in the order given):
#   loopback  ferry talks to sshd on 127.0.0.1 directly.
#   rtt50     a 50 ms round trip. With netem (PB_RTT50=netem, or auto when
#             `tc netem` works): sshd and ferry run inside a network namespace
#             this script creates, whose loopback gets `tc netem delay 25ms`
#             (each direction); the namespace is deleted on exit. Without it
#             (PB_RTT50=relay, or auto when this kernel has no sch_netem):
#             ferry connects to scripts/delay-relay.py, a userspace TCP relay
#             that holds each direction's bytes 25 ms before passing them to
#             sshd. That is latency only: no loss, no bandwidth limit, and TCP
#             itself still sees loopback round trips (only the SSH/SFTP
#             exchanges see 50 ms).
#
# Usage: scripts/bench-sftp-verify.sh     (root: private sshd, netns)
# Environment: PB_SIZE_MIB (default 1024), PB_RUNS or RUNS (default 3),
#   PB_DIR (default /tmp/bench-sftp-verify), PB_LINKS (default loopback; e.g.
#   "loopback rtt50"), NETEM=1 (same as PB_LINKS=rtt50), PB_RTT50 (auto, netem
#   or relay; default auto), PB_SSH_PORT (default 2241), PB_RELAY_PORT
#   (default 2242).
# Prints, per link, each run's resume time and the median per verify level.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZE_MIB=${PB_SIZE_MIB:-1024}
RUNS=${PB_RUNS:-${RUNS:-3}}
DIR=${PB_DIR:-/tmp/bench-sftp-verify}
LINKS=${PB_LINKS:-$([ "${NETEM:-0}" = 1 ] && echo rtt50 || echo loopback)}
RTT50=${PB_RTT50:-auto}
PORT=${PB_SSH_PORT:-2241}
RELAY_PORT=${PB_RELAY_PORT:-2242}
NS=ferry-bench-verify-$$
for l in $LINKS; do
  case $l in loopback | rtt50) ;; *) echo "bench-sftp-verify.sh: PB_LINKS takes loopback and rtt50, not '$l'" >&2; exit 2 ;; esac
done
case $RTT50 in auto | netem | relay) ;; *) echo "bench-sftp-verify.sh: PB_RTT50 is auto, netem or relay, not '$RTT50'" >&2; exit 2 ;; esac

# Everything this script starts is tracked by PID and stopped on exit.
SSHD_PID='' RELAY_PID='' FERRY_PID='' NS_MADE=0
stop_pid() { # stop_pid PID: TERM, wait up to 5 s, then KILL
  local pid=$1
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
stop_link() {
  stop_pid "$FERRY_PID"; FERRY_PID=''
  stop_pid "$RELAY_PID"; RELAY_PID=''
  stop_pid "$SSHD_PID"; SSHD_PID=''
  if [ "$NS_MADE" = 1 ]; then ip netns del "$NS" 2>/dev/null || true; NS_MADE=0; fi
}
trap stop_link EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cargo build --release -p ferry-cli >&2
FERRY=$ROOT/target/release/ferry

mkdir -p "$DIR"
SRC=$DIR/src-${SIZE_MIB}M.bin
if [ "$(stat -c %s "$SRC" 2>/dev/null || echo 0)" != $((SIZE_MIB << 20)) ]; then
  head -c $((SIZE_MIB << 20)) /dev/urandom > "$SRC"
fi
rm -rf "$DIR/ssh"; mkdir -p "$DIR/ssh" /run/sshd
ssh-keygen -q -t ed25519 -N "" -f "$DIR/ssh/hostkey"
ssh-keygen -q -t ed25519 -N "" -f "$DIR/ssh/clientkey"
cp "$DIR/ssh/clientkey.pub" "$DIR/ssh/authorized_keys"
# ferry checks the host key against [127.0.0.1]:PORT for the port it dials:
# sshd's own, and the relay's when the relay is in between.
HOSTKEY=$(cut -d' ' -f1,2 "$DIR/ssh/hostkey.pub")
printf '[127.0.0.1]:%s %s\n' "$PORT" "$HOSTKEY" "$RELAY_PORT" "$HOSTKEY" > "$DIR/known_hosts"
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

IN=()          # prefix that runs a command inside the namespace (empty: none)
DIAL=$PORT     # the port ferry connects to
wait_port() { # wait_port PORT: until something accepts on 127.0.0.1:PORT (in $IN)
  for _ in $(seq 100); do
    "${IN[@]}" bash -c "echo > /dev/tcp/127.0.0.1/$1" 2>/dev/null && return 0; sleep 0.05
  done
  echo "bench-sftp-verify.sh: nothing listens on 127.0.0.1:$1 (see $DIR/*.log)" >&2
  exit 1
}
start_sshd() {
  "${IN[@]}" /usr/sbin/sshd -D -f "$DIR/ssh/sshd_config" -E "$DIR/sshd.log" &
  SSHD_PID=$!   # ip netns exec execs sshd: this is sshd's PID either way
  wait_port "$PORT"
}
# Sets up one link (IN, DIAL, the PIDs) and says what it is in LINK_DESC.
# Not to be called in a subshell: the PIDs must reach stop_link.
LINK_DESC=
start_link() {
  IN=() DIAL=$PORT
  local emu=$RTT50
  case $1 in
    loopback) start_sshd; LINK_DESC="loopback (no added delay)"; return ;;
  esac
  if [ "$emu" != relay ]; then
    ip netns add "$NS"; NS_MADE=1
    ip netns exec "$NS" ip link set lo up
    if ip netns exec "$NS" tc qdisc add dev lo root netem delay 25ms limit 100000 2>/dev/null; then
      IN=(ip netns exec "$NS")
      start_sshd
      LINK_DESC="50 ms RTT via tc netem (25 ms each way) on a private netns loopback"
      return
    fi
    ip netns del "$NS"; NS_MADE=0
    if [ "$emu" = netem ]; then
      echo "bench-sftp-verify.sh: tc netem unavailable here (kernel module sch_netem); use PB_RTT50=relay or auto" >&2
      exit 1
    fi
    echo "bench-sftp-verify.sh: tc netem unavailable (no sch_netem); using scripts/delay-relay.py" >&2
  fi
  start_sshd
  python3 "$ROOT/scripts/delay-relay.py" "$RELAY_PORT" 127.0.0.1 "$PORT" 25 2>"$DIR/relay.log" &
  RELAY_PID=$!
  wait_port "$RELAY_PORT"
  DIAL=$RELAY_PORT
  LINK_DESC="50 ms RTT via a userspace TCP delay relay (scripts/delay-relay.py, 25 ms each way): latency only, no loss, no bandwidth limit"
}

DST=$DIR/dst.bin
HALF=$((SIZE_MIB << 19))
args() {
  echo cp --no-progress --state-dir "$DIR/state" -i "$DIR/ssh/clientkey" \
    --known-hosts "$DIR/known_hosts" --retry-max-attempts 1
}

# One run: kill at half, then time the resume with --verify $1. Sets SECS.
SECS=
run() {
  local verify=$1 url="sftp://root@127.0.0.1:$DIAL/$DST"
  rm -rf "$DIR/state" "$DST" "$DST.part"
  # Started directly so that $! is ferry's (or ip netns exec's, which execs it) PID.
  # shellcheck disable=SC2046 # args() is a word list on purpose
  "${IN[@]}" "$FERRY" $(args) --verify tail "$SRC" "$url" >/dev/null 2>"$DIR/err" &
  FERRY_PID=$!
  while kill -0 "$FERRY_PID" 2>/dev/null; do
    [ "$(stat -c %s "$DST.part" 2>/dev/null || echo 0)" -ge "$HALF" ] && break
    sleep 0.01
  done
  kill -9 "$FERRY_PID" 2>/dev/null || true
  wait "$FERRY_PID" 2>/dev/null || true
  FERRY_PID=''
  [ "$(stat -c %s "$DST.part" 2>/dev/null || echo 0)" -ge "$HALF" ] ||
    { echo "bench-sftp-verify.sh: first copy ended before half way:" >&2; cat "$DIR/err" >&2; exit 1; }
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  # shellcheck disable=SC2046
  "${IN[@]}" "$FERRY" $(args) --json --verify "$verify" "$SRC" "$url" >"$DIR/out" 2>"$DIR/err" &
  FERRY_PID=$!
  wait "$FERRY_PID" || rc=$?
  t1=$(date +%s.%N)
  FERRY_PID=''
  [ "$rc" = 0 ] || { echo "bench-sftp-verify.sh: resume failed (exit $rc):" >&2; cat "$DIR/err" >&2; exit 1; }
  cmp "$SRC" "$DST"
  SECS=$(echo "$t1 - $t0" | bc)
  local last
  last=$(tail -1 "$DIR/out")
  echo "  $verify: $SECS s  $(echo "$last" | grep -o '"bytes_resumed":[0-9]*' || true) $(echo "$last" | grep -o '"outcome":"[a-z_]*"[^}]*"verified_by":"[a-z0-9-]*"' || true)" >&2
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

REPORT=()
for link in $LINKS; do
  start_link "$link"
  desc=$LINK_DESC
  echo "# $link: $desc" >&2
  full=() tail=()
  for _ in $(seq "$RUNS"); do
    run full; full+=("$SECS")
    run tail; tail+=("$SECS")
  done
  stop_link
  REPORT+=("# resume of a ${SIZE_MIB} MiB upload killed at 50 %, $desc; median of $RUNS; $(nproc) cores, shared machine"
    "full (default): $(printf '%s\n' "${full[@]}" | median) s   [${full[*]}]"
    "tail:           $(printf '%s\n' "${tail[@]}" | median) s   [${tail[*]}]")
done
printf '%s\n' "${REPORT[@]}"
