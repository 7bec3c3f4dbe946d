#!/usr/bin/env bash
# scripts/peers/run.sh - time one file moved over loopback by ferry and by other
# tools, each against a server this script starts for it on 127.0.0.1.
#
# Usage: scripts/peers/run.sh TOOL...        scripts/peers/run.sh -l (list the tools)
# Output: one line per TOOL on stdout, "TOOL MB/s" (median of PB_RUNS runs; MB =
#   10^6 B; wall clock of the whole command, connection setup included), or
#   "TOOL skipped" (a program it needs is missing, or it needs root) or "TOOL failed"
#   (a run failed, or its copy differs from the source). Details go to stderr and
#   PB_DIR/logs/.
#
# Tools (uploads unless marked down; SSH ones go through one private sshd):
#   ferry-up ferry-down ferry-quic-up ferry-quic-down   ferry's own server, TCP / QUIC
#   ferry-sftp-up ferry-sftp-down                       ferry against the sshd
#   scp scp-down sftp sftp-down rsync-ssh rclone-sftp lftp-sftp
#   rsyncd                 rsync daemon (rsync://)
#   rsyncd-fsync           the same, `rsync --fsync` (rsync >= 3.2.4): fsyncs what it writes
#   socat-file             raw TCP into a file, socat on both ends
#   dd-fsync dd-direct     no network: `dd conv=fsync` (a durable copy) and
#                          `dd oflag=direct conv=fsync` (what the disk takes)
#   iperf3                 memory to memory for PB_IPERF_SECS s (iperf3's own figure)
#
# Environment:
#   PB_DIR (/tmp/peerbench)    source file test-<size>M.bin (made once, reused),
#                              ssh keys, logs
#   PB_DSTDIR (PB_DIR/dst)     where copies land, each as TOOL.bin, deleted after
#                              its tool (/dev/shm/... takes the disk out)
#   PB_SIZE_MIB (1024)  PB_RUNS (3)  PB_VERIFY (1: cmp every copy)  PB_IPERF_SECS (5)
#   FERRY_BIN                  the ferry binary (needed by the ferry-* tools)
#   PB_SSH_PORT (2222)  PB_RSYNCD_PORT (8730)  PB_SOCAT_PORT (5701)
#   PB_IPERF_PORT (5211)  FERRY_UP_PORT (7790)  FERRY_DOWN_PORT (7791)
#   PB_INSTALL (0)             1: apt-get install the missing peer tools first (root)
# Every server is started by this script and stopped by its PID when it exits.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/peers/lib.sh
. "$HERE/lib.sh"

ALL=(ferry-up ferry-down ferry-quic-up ferry-quic-down ferry-sftp-up ferry-sftp-down
  scp scp-down sftp sftp-down rsync-ssh rsyncd rsyncd-fsync rclone-sftp lftp-sftp
  socat-file dd-fsync dd-direct iperf3)
if [[ ${1:-} == -l ]]; then printf '%s\n' "${ALL[@]}"; exit 0; fi
(($#)) || { sed -n '3,4p' "$0" | sed 's/^# //' >&2; exit 2; }

PB_DIR=${PB_DIR:-/tmp/peerbench}
DSTDIR=${PB_DSTDIR:-$PB_DIR/dst}
SIZE_MIB=${PB_SIZE_MIB:-1024}
RUNS=${PB_RUNS:-3}
VERIFY=${PB_VERIFY:-1}
IPERF_SECS=${PB_IPERF_SECS:-5}
SSH_PORT=${PB_SSH_PORT:-2222}
RSYNCD_PORT=${PB_RSYNCD_PORT:-8730}
SOCAT_PORT=${PB_SOCAT_PORT:-5701}
IPERF_PORT=${PB_IPERF_PORT:-5211}
UP_PORT=${FERRY_UP_PORT:-7790}
DOWN_PORT=${FERRY_DOWN_PORT:-7791}
BYTES=$((SIZE_MIB * 1024 * 1024))
SRC=$PB_DIR/test-${SIZE_MIB}M.bin
SSH_DIR=$PB_DIR/ssh
SSH_CFG=$SSH_DIR/ssh_config
SSH_KEY=$SSH_DIR/clientkey
LOGS=$PB_DIR/logs

say() { printf '%s\n' "$*" >&2; }

# What each tool runs, which server it needs, and which programs.
needs() { # tool -> programs
  case $1 in
    ferry-*) echo "${FERRY_BIN:-FERRY_BIN}" ;;
    scp | scp-down) echo scp ;;
    sftp | sftp-down) echo sftp ;;
    rsync-ssh) echo "rsync ssh" ;;
    rsyncd | rsyncd-fsync) echo rsync ;;
    rclone-sftp) echo rclone ;;
    lftp-sftp) echo "lftp ssh" ;;
    socat-file) echo socat ;;
    dd-*) echo dd ;;
    iperf3) echo "iperf3 python3" ;;
    *) return 1 ;;
  esac
}
package() { # program -> Debian package
  case $1 in
    scp | sftp | ssh) echo openssh-client ;;
    sshd) echo openssh-server ;;
    *) echo "$1" ;;
  esac
}
uses_sshd() { case $1 in ferry-sftp-* | scp* | sftp* | rsync-ssh | rclone-sftp | lftp-sftp) return 0 ;; esac; return 1; }
have() { if [[ $1 == /* ]]; then [[ -x $1 ]]; else command -v "$1" >/dev/null 2>&1; fi; }
missing_for() { # tool -> first missing program, or nothing
  local p
  for p in $(needs "$1"); do have "$p" || { echo "$p"; return; }; done
  if uses_sshd "$1" && [[ ! -x /usr/sbin/sshd ]]; then echo sshd; fi
}

for t in "$@"; do needs "$t" >/dev/null || { say "run.sh: unknown tool '$t' (see $0 -l)"; exit 2; }; done
if [[ ${PB_INSTALL:-0} == 1 ]]; then
  pkgs=()
  for t in "$@"; do m=$(missing_for "$t"); [[ -n $m && $m != /* ]] && pkgs+=("$(package "$m")"); done
  if ((${#pkgs[@]})); then
    mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
    [[ $(id -u) == 0 ]] || { say "run.sh: PB_INSTALL=1 needs root"; exit 1; }
    say "installing ${pkgs[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
  fi
fi

# --- processes: every server and client is a tracked child, stopped by PID
WORK=$(mktemp -d /tmp/peers-run.XXXXXX)
STARTED=()
stop_all() {
  local p
  for p in "${STARTED[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${STARTED[@]}"; do wait "$p" 2>/dev/null || true; done
  STARTED=()
  rm -rf "$WORK"
}
trap stop_all EXIT
trap 'exit 130' INT TERM
forget() { local p keep=(); for p in "${STARTED[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done; STARTED=("${keep[@]}"); }
serve() { # name port cmd...: starts a server and waits for its port
  local name=$1 port=$2
  shift 2
  peer_port_busy "$port" && { say "  port $port is in use; set the port variable for $name (see $0)"; return 1; }
  "$@" >>"$LOGS/$name.log" 2>&1 &
  STARTED+=($!)
  peer_wait_port "$port" || { say "  $name did not start (see $LOGS/$name.log)"; return 1; }
}

declare -A UP=()
ensure() { # server name: starts it once
  [[ -n ${UP[$1]:-} ]] && return 0
  case $1 in
    sshd)
      [[ $(id -u) == 0 ]] || { say "  the private sshd needs root"; return 1; }
      peer_ssh_files "$SSH_DIR" "$SSH_PORT" 127.0.0.1 peer
      serve sshd "$SSH_PORT" /usr/sbin/sshd -D -f "$SSH_DIR/sshd_config" -E "$LOGS/sshd.log" || return 1
      ssh -F "$SSH_CFG" peer true || { say "  cannot log in to the private sshd (see $LOGS/sshd.log)"; return 1; }
      ;;
    ferry-up)
      serve ferry-up "$UP_PORT" "$FERRY_BIN" -q serve --create-root --root "$DSTDIR" \
        --listen "127.0.0.1:$UP_PORT" --state-dir "$WORK/serve-up" --no-auth || return 1 ;;
    ferry-down)
      mkdir -p "$WORK/down-root"
      ln -f "$SRC" "$WORK/down-root/src.bin" 2>/dev/null || cp "$SRC" "$WORK/down-root/src.bin"
      serve ferry-down "$DOWN_PORT" "$FERRY_BIN" -q serve --root "$WORK/down-root" \
        --listen "127.0.0.1:$DOWN_PORT" --state-dir "$WORK/serve-down" --no-auth || return 1 ;;
    rsyncd)
      printf '%s\n' "use chroot = no" "log file = $LOGS/rsyncd.log" "[dst]" "  path = $DSTDIR" \
        "  read only = no" "  uid = root" "  gid = root" >"$WORK/rsyncd.conf"
      serve rsyncd "$RSYNCD_PORT" rsync --daemon --no-detach --address=127.0.0.1 \
        --port="$RSYNCD_PORT" --config="$WORK/rsyncd.conf" || return 1 ;;
    iperf3)
      serve iperf3 "$IPERF_PORT" iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT" || return 1 ;;
  esac
  UP[$1]=1
}
server_for() {
  case $1 in
    ferry-up | ferry-quic-up) echo ferry-up ;;
    ferry-down | ferry-quic-down) echo ferry-down ;;
    rsyncd | rsyncd-fsync) echo rsyncd ;;
    iperf3) echo iperf3 ;;
    *) uses_sshd "$1" && echo sshd ;;
  esac
  return 0
}

# --- one run: `clock CMD...` times CMD (a tracked child) into RATE (MB/s)
RATE=
clock() {
  local t0 t1 p rc=0
  t0=$EPOCHREALTIME
  "$@" </dev/null >>"$LOGS/$TOOL.log" 2>&1 &
  p=$!
  STARTED+=("$p")
  wait "$p" || rc=$?
  t1=$EPOCHREALTIME
  forget "$p"
  ((rc == 0)) || { say "  $TOOL: exit $rc (see $LOGS/$TOOL.log)"; return 1; }
  RATE=$(awk -v b="$BYTES" -v a="$t0" -v z="$t1" 'BEGIN { d = z - a; if (d <= 0) d = 1e-6; printf "%.1f", b / d / 1e6 }')
}
sftp_batch() { printf '%s\n' "$1" >"$WORK/sftp.batch"; echo "$WORK/sftp.batch"; }
socat_run() { # listener into DST, then the sender from SRC; timed until the listener exits
  local l t0 rc=0
  socat -u -b 131072 "TCP-LISTEN:$SOCAT_PORT,bind=127.0.0.1,reuseaddr" "CREATE:$DST" >>"$LOGS/$TOOL.log" 2>&1 &
  l=$!
  STARTED+=("$l")
  peer_wait_port "$SOCAT_PORT" || return 1
  t0=$EPOCHREALTIME
  socat -u -b 131072 "OPEN:$SRC" "TCP:127.0.0.1:$SOCAT_PORT" >>"$LOGS/$TOOL.log" 2>&1 || rc=$?
  wait "$l" || rc=$?
  forget "$l"
  ((rc == 0)) || return 1
  RATE=$(awk -v b="$BYTES" -v a="$t0" -v z="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b / (z - a) / 1e6 }')
}
iperf_run() {
  local json=$WORK/iperf.json
  iperf3 -c 127.0.0.1 -p "$IPERF_PORT" -t "$IPERF_SECS" -J >"$json" 2>>"$LOGS/$TOOL.log" || return 1
  RATE=$(python3 -c 'import json, sys
print("%.1f" % (json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"] / 8e6))' "$json")
}

# one_run: sets RATE, leaves the copy at DST (not for iperf3)
one_run() {
  local sftp_url=sftp://root@127.0.0.1:$SSH_PORT
  # ferry starts from a fresh state dir each run, so nothing is resumed
  rm -rf "$WORK/client"
  local ferry=("${FERRY_BIN:-}" cp -q --no-progress --state-dir "$WORK/client")
  local ferry_ssh=(-i "$SSH_KEY" --known-hosts "$WORK/known_hosts" --accept-new-host-key --retry-max-attempts 1)
  case $TOOL in
    ferry-up) clock "${ferry[@]}" "$SRC" "ferry://127.0.0.1:$UP_PORT/ferry-up.bin" ;;
    ferry-quic-up) clock "${ferry[@]}" "$SRC" "ferry+quic://127.0.0.1:$UP_PORT/ferry-quic-up.bin" ;;
    ferry-down) clock "${ferry[@]}" "ferry://127.0.0.1:$DOWN_PORT/src.bin" "$DST" ;;
    ferry-quic-down) clock "${ferry[@]}" "ferry+quic://127.0.0.1:$DOWN_PORT/src.bin" "$DST" ;;
    ferry-sftp-up) clock "${ferry[@]}" "${ferry_ssh[@]}" "$SRC" "$sftp_url/$DST" ;;
    ferry-sftp-down) clock "${ferry[@]}" "${ferry_ssh[@]}" "$sftp_url/$SRC" "$DST" ;;
    scp) clock scp -q -F "$SSH_CFG" "$SRC" "peer:$DST" ;;
    scp-down) clock scp -q -F "$SSH_CFG" "peer:$SRC" "$DST" ;;
    sftp) clock sftp -q -F "$SSH_CFG" -b "$(sftp_batch "put $SRC $DST")" peer ;;
    sftp-down) clock sftp -q -F "$SSH_CFG" -b "$(sftp_batch "get $SRC $DST")" peer ;;
    rsync-ssh) clock rsync -W -e "ssh -F $SSH_CFG" "$SRC" "peer:$DST" ;;
    rsyncd) clock rsync -W "$SRC" "rsync://127.0.0.1:$RSYNCD_PORT/dst/$TOOL.bin" ;;
    rsyncd-fsync) clock rsync -W --fsync "$SRC" "rsync://127.0.0.1:$RSYNCD_PORT/dst/$TOOL.bin" ;;
    # rclone checks the copy's MD5 on the server after the upload, as ferry verifies.
    rclone-sftp) clock rclone --config "$WORK/rclone.conf" -q --sftp-host 127.0.0.1 --sftp-port "$SSH_PORT" \
      --sftp-user root --sftp-key-file "$SSH_KEY" --sftp-shell-type unix --sftp-md5sum-command md5sum \
      --sftp-sha1sum-command sha1sum copyto "$SRC" ":sftp:$DST" ;;
    lftp-sftp) clock lftp -c "set sftp:connect-program 'ssh -a -x -F $SSH_CFG'; open -u root, sftp://peer; put $SRC -o $DST" ;;
    socat-file) socat_run ;;
    dd-fsync) clock dd if="$SRC" of="$DST" bs=4M conv=fsync status=none ;;
    dd-direct) clock dd if="$SRC" of="$DST" bs=4M oflag=direct conv=fsync status=none ;;
    iperf3) iperf_run ;;
  esac
}
clear_dst() { rm -f -- "$DST" "$DST.part" "$DSTDIR/.$TOOL.bin.ferry.part"; }

# --- main
mkdir -p "$PB_DIR" "$DSTDIR" "$LOGS"
: >"$WORK/rclone.conf"
if [[ ! -f $SRC || $(stat -c %s "$SRC") != "$BYTES" ]]; then
  say "making $SRC ($SIZE_MIB MiB of random bytes)"
  head -c "$BYTES" /dev/urandom >"$SRC.tmp"
  mv "$SRC.tmp" "$SRC"
fi
cat "$SRC" >/dev/null # in the page cache: the figures are of the tools, not of reading the source
say "# $(date -u +%FT%TZ) $(nproc) cpus; ${SIZE_MIB} MiB into $DSTDIR; median of $RUNS; MB/s = 10^6 B/s"
for TOOL in "$@"; do
  DST=$DSTDIR/$TOOL.bin
  m=$(missing_for "$TOOL")
  if [[ -n $m ]]; then
    echo "$TOOL skipped"
    if [[ $m == FERRY_BIN ]]; then say "  $TOOL: skipped, FERRY_BIN (the ferry binary) is not set"
    else say "  $TOOL: skipped, $m is not installed (PB_INSTALL=1 installs it)"; fi
    continue
  fi
  server=$(server_for "$TOOL")
  if [[ -n $server ]] && ! ensure "$server"; then
    # no sshd without root: the SSH tools are skipped, not failed
    if [[ $server == sshd && $(id -u) != 0 ]]; then echo "$TOOL skipped"; else echo "$TOOL failed"; fi
    continue
  fi
  rates=() ok=1
  for ((r = 1; r <= RUNS; r++)); do
    clear_dst
    sync
    if ! one_run; then ok=0; break; fi
    if [[ $TOOL != iperf3 && $VERIFY == 1 ]] && ! cmp -s "$SRC" "$DST"; then
      say "  $TOOL: the copy at $DST differs from the source"
      ok=0
      break
    fi
    rates+=("$RATE")
  done
  clear_dst
  if ((ok)); then
    echo "$TOOL $(peer_median "${rates[@]}")"
    say "  $TOOL: ${rates[*]}"
  else
    echo "$TOOL failed"
  fi
done
