#!/usr/bin/env bash
# WAN benchmark: the same upload (default 256 MiB) between two network namespaces
# joined by scripts/peers/linkdelay.c (userspace delay + random loss over two tun
# devices, for kernels without netem; compiled here with gcc), ferry beside scp,
# rsync over ssh and iperf3 in the same run.
# A benchmark, not a test: it prints figures and ratios, it never fails on a timing.
#
#   resilience (issue 3): 50 ms RTT with 0 %, 1 % and 5 % loss per direction, and
#       50 ms RTT with the link blackholed for OUTAGE_S seconds once half the file
#       has landed; sender CC = $SENDER_CC; tools $TOOLS_RES.
#   cc (issue 5): 50 ms RTT with 0 %, 1 % and 2 % loss, sender congestion control
#       each of $CCS; tools $TOOLS_CC; prints the ratios against the issue's targets.
#
# The sender's congestion control is the host default of the client's namespace,
# set on its route to the server (`ip route ... congctl CC`): every socket there
# starts with it, as with a host-wide sysctl (which a namespace may only set to
# the host's allowed list), and a program that picks its own after connecting
# keeps its own: ferry picks bbr (FERRY_TCP_CC overrides), QUIC has quinn's.
#
# Usage: scripts/bench-wan.sh [resilience|cc|all]   (default all; root; creates and
#        deletes netns $NS_A (wanA, client, $IP_A 10.79.0.1) and $NS_B (wanB, server,
#        $IP_B 10.79.0.2), joined by tun devices wanAt/wanBt)
# Env:   SIZE_MIB (256)  CAP_S (90: a slower transfer is stopped and scored
#        bytes-landed / time, marked "capped")  RUNS (1: median of RUNS per cell)
#        SENDER_CC (bbr, resilience mode; not CC, which cargo reads as the C compiler)
#        INSTALL (0; 1: apt-get install missing tools first, else their rows say skipped)  CCS ("cubic bbr", cc mode)  OUTAGE_S (20)
#        TOOLS_RES ("ferry scp rsync-ssh")  TOOLS_CC ("iperf3 ferry scp"; add ferry-quic-bbr
#        and ferry-quic-cubic for QUIC with each of quinn's controllers, ferry-sN for
#        ferry with --streams N; plain ferry runs with the default, --streams auto)
#        IPERF_S (10: iperf3 runs for a fixed time)  FERRY_ARGS (extra `ferry cp` options)
#        FERRY_BIN (the ferry binary to run; default this tree's target/release/ferry)
#        RESTART (1: an outage run that fails is rerun once by hand, rsync with
#        --append-verify, scp from scratch)  LOG_DIR (/tmp/ferry-wan-logs: per-run stderr)
#        CONDS_RES, CONDS_CC (space-separated name:one_way_ms:loss_pct[:outage_s] lists)
#        CLIENT_PRELOAD (LD_PRELOAD libraries for the client processes, for experiments)
#
# Columns: time = wall clock incl. process start and handshakes; goodput = file bytes
# landed / time (MB = 10^6 B); wire = bytes the client's tun device transmitted
# (IP+TCP headers, TLS/ssh framing and TCP retransmissions included); tcp-rtx = TCP
# segments retransmitted in the client's netns (/proc/net/snmp RetransSegs, ~1448 B
# each); app re-sent = ferry's payload bytes sent beyond the file size (--json
# bytes_sent - bytes_total), i.e. chunks sent again after a reconnect.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
# shellcheck source=scripts/peers/lib.sh
. scripts/peers/lib.sh
MODE=${1:-${MODE:-all}}
SIZE_MIB=${SIZE_MIB:-256}
CAP_S=${CAP_S:-90}
RUNS=${RUNS:-1}
SENDER_CC=${SENDER_CC:-bbr}
CCS=${CCS:-cubic bbr}
OUTAGE_S=${OUTAGE_S:-20}
TOOLS_RES=${TOOLS_RES:-ferry scp rsync-ssh}
TOOLS_CC=${TOOLS_CC:-iperf3 ferry scp}
IPERF_S=${IPERF_S:-10}
FERRY_ARGS=${FERRY_ARGS:-}
RESTART=${RESTART:-1}
LOG_DIR=${LOG_DIR:-/tmp/ferry-wan-logs}
CLIENT_PRELOAD=${CLIENT_PRELOAD:-}
CONDS_RES=${CONDS_RES:-rtt50-loss0:25:0:0 rtt50-loss1:25:1:0 rtt50-loss5:25:5:0 rtt50-down${OUTAGE_S}s:25:0:$OUTAGE_S}
CONDS_CC=${CONDS_CC:-rtt50-loss0:25:0 rtt50-loss1:25:1 rtt50-loss2:25:2}
# Names and addresses are configurable: other benchmarks on this host may use fbA/fbB.
A=${NS_A:-wanA} B=${NS_B:-wanB} IPA=${IP_A:-10.79.0.1} IPB=${IP_B:-10.79.0.2}
TA=${A}t TB=${B}t
BYTES=$((SIZE_MIB * 1024 * 1024))
case $MODE in resilience | cc | all) ;; *) echo "usage: $0 [resilience|cc|all]" >&2; exit 2 ;; esac
[[ $(id -u) == 0 ]] || { echo "bench-wan.sh: needs root (network namespaces)" >&2; exit 1; }
log() { printf '%s\n' "$*" >&2; }

# --- tools (bench only; the test suite does not need them)
missing=()
for t in sshd scp rsync iperf3 gcc python3; do command -v "$t" >/dev/null || missing+=("$t"); done
if ((${#missing[@]})) && [[ ${INSTALL:-0} == 1 ]]; then
  log "installing ${missing[*]}"
  apt-get update -qq && apt-get install -y -qq openssh-server openssh-client rsync iperf3 gcc python3 >/dev/null
fi
command -v gcc >/dev/null || { log "bench-wan.sh: needs gcc to build scripts/peers/linkdelay.c (or run with INSTALL=1)"; exit 1; }
# the program a tool's row needs, when it is missing
tool_missing() {
  local p
  case $1 in
    ferry*) return 0 ;;
    scp) set -- scp sshd ;;
    rsync-ssh) set -- rsync ssh sshd ;;
    iperf3) set -- iperf3 python3 ;;
  esac
  for p in "$@"; do command -v "$p" >/dev/null || { echo "$p"; return 0; }; done
}
if [[ -z ${FERRY_BIN:-} ]]; then cargo build --release -q -p ferry-cli; fi
BIN=${FERRY_BIN:-$REPO/target/release/ferry}

for n in $A $B; do
  if ip netns list | grep -qw "^$n"; then log "netns $n exists; remove it first"; exit 1; fi
done
W=$(mktemp -d /tmp/ferry-wan.XXXXXX)
mkdir -p "$LOG_DIR"
PIDS=() FWD= CLIENT=
cleanup() {
  local p
  if [[ -n $CLIENT ]]; then kill "$CLIENT" 2>/dev/null || true; fi
  if [[ -n $FWD ]]; then kill "$FWD" 2>/dev/null || true; fi
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  ip netns del $A 2>/dev/null || true
  ip netns del $B 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

gcc -O2 -Wall -o "$W/linkdelay" scripts/peers/linkdelay.c
head -c $BYTES /dev/urandom >"$W/src.bin"
cat "$W/src.bin" >/dev/null

ip netns add $A
ip netns add $B
ip -n $A link set lo up
ip -n $B link set lo up

# ssh server in B, with its own keys and config; Host "wan" reaches it from A.
mkdir -p "$W/dst"
peer_ssh_files "$W/ssh" 2222 "$IPB" wan

link_up() { # one_way_ms loss_pct: linkdelay makes TA in A and TB in B
  "$W/linkdelay" $A $TA $B $TB "$1" "$2" >"$W/fwd.out" 2>"$W/fwd.err" &
  FWD=$!
  for _ in $(seq 100); do grep -q ready "$W/fwd.out" 2>/dev/null && break; sleep 0.05; done
  grep -q ready "$W/fwd.out" || { log "linkdelay did not start: $(cat "$W/fwd.err")"; exit 1; }
  ip -n $A addr add $IPA peer $IPB dev $TA
  ip -n $B addr add $IPB peer $IPA dev $TB
  ip -n $A link set $TA txqueuelen 5000 up
  ip -n $B link set $TB txqueuelen 5000 up
}
link_down() {
  kill "$FWD"
  wait "$FWD" 2>/dev/null || true
  FWD=
  log "    forwarder: $(tr '\n' ' ' <"$W/fwd.err")"
}
# An outage is a blackhole in both directions somewhere in the middle of the path:
# each end silently discards whatever arrives from the tun device (a policy rule
# "iif TUN blackhole" placed before the local table; ICMP errors die the same way).
# Dropping on the sender's own egress qdisc is *not* equivalent: TCP sees a local
# drop, retries every 0.5 s without RTO backoff and even aborts a connection after
# 15 such probes (~8 s, ETIMEDOUT); this kernel has no netem or tc drop action.
rules_init() { # move the local table's rule from pref 0 to pref 100, in both netns
  local n
  for n in $A $B; do
    ip -n "$n" rule add pref 100 lookup local
    ip -n "$n" rule del pref 0
  done
}
blackhole() {
  ip -n $A rule add pref 10 iif $TA blackhole
  ip -n $B rule add pref 10 iif $TB blackhole
}
restore() {
  ip -n $A rule del pref 10 2>/dev/null || true
  ip -n $B rule del pref 10 2>/dev/null || true
}

start_servers() {
  ip netns exec $B /usr/sbin/sshd -D -f "$W/ssh/sshd_config" -E "$W/ssh/sshd.log" &
  PIDS+=($!)
  ip netns exec $B "$BIN" serve --create-root --root "$W/dst" --listen $IPB:7787 --state-dir "$W/fstate" --no-auth \
    >/dev/null 2>>"$LOG_DIR/ferry-serve.log" &
  PIDS+=($!)
  ip netns exec $B iperf3 -s -B $IPB -p 5201 >/dev/null 2>&1 &
  PIDS+=($!)
  sleep 0.7
}
stop_servers() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=()
}

landed() { find "$W/dst" -type f -printf '%b\n' 2>/dev/null | awk '{s+=$1*512} END{print s+0}'; }
tx_bytes() { ip netns exec $A cat /sys/class/net/$TA/statistics/tx_bytes; }
retrans() { ip netns exec $A awk '/^Tcp:/{ if (!h) { for (i=1;i<=NF;i++) if ($i=="RetransSegs") c=i; h=1 } else print $c }' /proc/net/snmp; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.2f", b-a}'; }
# The client namespace's default congestion control towards the server.
set_cc() { ip -n $A route replace $IPB dev $TA proto kernel scope link src $IPA congctl "$1"; }
ge() { awk -v a="$1" -v b="$2" 'BEGIN{exit !(a>=b)}'; }
cc_seen() { ip netns exec $A ss -tinH dst $IPB 2>/dev/null | grep -oE '\b(cubic|bbr|reno)\b' | sort -u | tr '\n' ' ' || true; }

# One transfer. Sets: SECS GOOD STATUS WIRE RTX APP CCS_SEEN
NRUN=0
run() { # tool cc outage_s label
  local tool=$1 cc=$2 outage=$3 label=$4 cmd=() name
  NRUN=$((NRUN + 1))
  name=$tool-$NRUN
  rm -rf "${W:?}/dst" "$W/cstate"
  mkdir -p "$W/dst"
  sync
  local dst=$W/dst/$name.bin errf=$LOG_DIR/$label-$name.err
  case $tool in
    ferry)
      # shellcheck disable=SC2206  # FERRY_ARGS is a list of options
      cmd=("$BIN" cp --no-progress --json --state-dir "$W/cstate" $FERRY_ARGS "$W/src.bin" "ferry://$IPB:7787/$name.bin") ;;
    ferry-s[0-9]*)
      # A fixed number of connections for the file (--streams N); plain
      # `ferry` uses the default, --streams auto.
      # shellcheck disable=SC2206
      cmd=("$BIN" cp --no-progress --json --state-dir "$W/cstate" --streams "${tool#ferry-s}" $FERRY_ARGS "$W/src.bin" "ferry://$IPB:7787/$name.bin") ;;
    ferry-quic-bbr | ferry-quic-cubic)
      # QUIC's congestion control is ferry's own (quinn), not the kernel's: the
      # sender cc column does not apply to these rows.
      # shellcheck disable=SC2206
      cmd=(env FERRY_QUIC_CC="${tool#ferry-quic-}" "$BIN" cp --no-progress --json --state-dir "$W/cstate" $FERRY_ARGS "$W/src.bin" "ferry+quic://$IPB:7787/$name.bin") ;;
    scp) cmd=(scp -q -F "$W/ssh/ssh_config" "$W/src.bin" "wan:$dst") ;;
    rsync-ssh) cmd=(rsync -W --partial -e "ssh -F $W/ssh/ssh_config" "$W/src.bin" "wan:$dst") ;;
    iperf3) cmd=(iperf3 -c $IPB -p 5201 -t "$IPERF_S" -J) ;;
    *) log "unknown tool $tool"; return 1 ;;
  esac
  # phase: 0 before the outage, 1 link down since $down, 2 link back
  local s=$EPOCHREALTIME p phase=0 down=0 rc=0 capped=0 restarts=0 tx0 rt0 sz
  tx0=$(tx_bytes)
  rt0=$(retrans)
  CCS_SEEN=
  set_cc "$cc"
  local envs=()
  [[ -n $CLIENT_PRELOAD ]] && envs=("LD_PRELOAD=$CLIENT_PRELOAD")
  while :; do
    ip netns exec $A env "${envs[@]}" "${cmd[@]}" >"$W/out" 2>>"$errf" &
    p=$!
    CLIENT=$p
    while kill -0 "$p" 2>/dev/null; do
      if [[ -z $CCS_SEEN ]] && ge "$(elapsed "$s")" 0.3; then CCS_SEEN=$(cc_seen); fi
      if ((outage > 0 && phase == 0)) && (($(landed) > BYTES / 2)); then
        down=$EPOCHREALTIME
        phase=1
        blackhole
        log "    link blackholed at $(elapsed "$s")s with $(landed) bytes landed"
      fi
      if ((phase == 1)) && ge "$(elapsed "$down")" "$outage"; then
        restore
        phase=2
        log "    link back at $(elapsed "$s")s with $(landed) bytes landed"
      fi
      if ge "$(elapsed "$s")" "$CAP_S"; then capped=1; kill "$p" 2>/dev/null || true; break; fi
      sleep 0.05
    done
    rc=0
    wait "$p" 2>/dev/null || rc=$?
    CLIENT=
    ((capped)) && break
    # the outage ended the transfer: restart it once by hand, as a user would
    if ((rc != 0 && outage > 0 && RESTART && restarts == 0)) && [[ $tool != iperf3 ]]; then
      restarts=1
      log "    $tool failed (exit $rc) at $(elapsed "$s")s; $(landed) bytes landed; restarting by hand"
      echo "--- restart" >>"$errf"
      if ((phase == 1)); then
        while ! ge "$(elapsed "$down")" "$outage"; do sleep 0.1; done
        restore
        phase=2
        log "    link back at $(elapsed "$s")s"
      fi
      [[ $tool == rsync-ssh ]] && cmd=(rsync -W --partial --append-verify -e "ssh -F $W/ssh/ssh_config" "$W/src.bin" "wan:$dst")
      continue
    fi
    break
  done
  ((phase == 1)) && restore
  SECS=$(elapsed "$s")
  WIRE=$(($(tx_bytes) - tx0))
  RTX=$(($(retrans) - rt0))
  APP=-
  if [[ $tool == iperf3 ]]; then
    if ((rc == 0)); then
      read -r GOOD sz < <(python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["end"]; r=e["sum_received"]; print("%.2f %d" % (r["bits_per_second"]/8e6, r["bytes"]))' "$W/out")
      STATUS="ok (${IPERF_S}s, $((sz / 1048576)) MiB)"
      SECS=$IPERF_S
    else GOOD=0; STATUS="failed (exit $rc)"; fi
    return 0
  fi
  sz=$(landed)
  GOOD=$(awk -v b="$sz" -v t="$SECS" 'BEGIN{printf "%.2f", b/t/1e6}')
  if ((capped)); then STATUS="capped, $((sz / 1048576)) MiB landed"
  elif ((rc != 0)); then STATUS="failed (exit $rc), $((sz / 1048576)) MiB landed"
  elif cmp -s "$W/src.bin" "$dst"; then STATUS=ok
  else STATUS="exit 0 but destination differs"; fi
  ((restarts)) && STATUS="$STATUS; failed once, restarted by hand"
  if [[ $tool == ferry* && -s $W/out ]]; then
    APP=$(tail -1 "$W/out" | python3 -c 'import json,sys; j=json.load(sys.stdin); x=j["bytes_sent"]-j["bytes_total"]; print("%.1fMiB/%dretr" % (x/2**20, j["retries"]))' 2>/dev/null || echo "?")
  fi
  return 0
}

ROWS=()
declare -A GP=()
cell() { # label cond cc tool outage
  local label=$1 cond=$2 cc=$3 tool=$4 outage=$5 r vals=() secs=() last miss
  miss=$(tool_missing "$tool")
  if [[ -n $miss ]]; then
    last=$(printf '%-8s %-16s %-6s %-9s %8s %9s %9s %8s %-14s %s' "$label" "$cond" "$cc" "$tool" - - - - - \
      "skipped: $miss is not installed (INSTALL=1 installs it)")
    log "  $last"
    ROWS+=("$last")
    return 0
  fi
  for ((r = 1; r <= RUNS; r++)); do
    run "$tool" "$cc" "$outage" "$label"
    vals+=("$GOOD")
    secs+=("$SECS")
    last=$(printf '%-8s %-16s %-6s %-9s %8s %9s %9s %8s %-14s %s' "$label" "$cond" "$cc" "$tool" "$SECS" "$GOOD" \
      "$(awk -v b="$WIRE" 'BEGIN{printf "%.1f", b/1048576}')" "$RTX" "$APP" "$STATUS")
    log "  $last  [cc seen: ${CCS_SEEN:-none}]"
  done
  if ((RUNS > 1)); then
    last=$(printf '%-8s %-16s %-6s %-9s %8s %9s %s' "$label" "$cond" "$cc" "$tool" "$(median "${secs[@]}")" \
      "$(median "${vals[@]}")" "(median of $RUNS: ${vals[*]}; last run: $WIRE B wire, $RTX rtx, $STATUS)")
  fi
  ROWS+=("$last")
  GP[$label/$cond/$cc/$tool]=$(median "${vals[@]}")
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{ if (NR%2) print a[(NR+1)/2]; else printf "%.2f\n", (a[NR/2]+a[NR/2+1])/2 }'; }

rules_init
T0=$EPOCHREALTIME
log "# $(date -u +%FT%TZ) $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg); ${SIZE_MIB} MiB upload $A -> $B; cap ${CAP_S}s; RUNS=$RUNS"
log "# tcp_wmem $(sysctl -n net.ipv4.tcp_wmem | tr '\t' ' ') / tcp_rmem $(sysctl -n net.ipv4.tcp_rmem | tr '\t' ' ') (client netns: $(ip netns exec $A sysctl -n net.ipv4.tcp_wmem | tr '\t' ' '))"
if [[ $MODE == resilience || $MODE == all ]]; then
  log "== resilience (issue 3): sender CC $SENDER_CC"
  for cond in $CONDS_RES; do
    IFS=: read -r name ow loss outage <<<"$cond"
    log "== $name (one-way ${ow} ms, loss ${loss}% per direction, outage ${outage}s at 50%)"
    link_up "$ow" "$loss"
    start_servers
    for t in $TOOLS_RES; do cell res "$name" "$SENDER_CC" "$t" "$outage"; done
    stop_servers
    link_down
  done
fi
if [[ $MODE == cc || $MODE == all ]]; then
  log "== congestion control (issue 5): CCs $CCS"
  for cond in $CONDS_CC; do
    IFS=: read -r name ow loss <<<"$cond"
    log "== $name (one-way ${ow} ms, loss ${loss}% per direction)"
    link_up "$ow" "$loss"
    start_servers
    for cc in $CCS; do
      for t in $TOOLS_CC; do cell cc "$name" "$cc" "$t" 0; done
    done
    stop_servers
    link_down
  done
fi

echo
echo "# ferry WAN benchmark, $(date -u +%FT%TZ), ${SIZE_MIB} MiB upload, 50 ms RTT (linkdelay), cap ${CAP_S}s, RUNS=$RUNS, run took $(elapsed "$T0")s"
echo "# goodput = file bytes landed / wall time, MB/s = 10^6 B/s; wire = client tun tx MiB; tcp-rtx = retransmitted segments"
echo "# noisy: 2 vCPUs also busy with other compiles; quote ratios from the same run only"
printf '%-8s %-16s %-6s %-9s %8s %9s %9s %8s %-14s %s\n' mode condition cc tool time_s MB/s wire_MiB tcp-rtx "app re-sent" status
printf '%s\n' "${ROWS[@]}"

ratio() { awk -v a="${GP[$1]:-}" -v b="${GP[$2]:-}" 'BEGIN{ if (a == "" || b == "" || b+0 == 0) print "n/a"; else printf "%.2fx", a/b }'; }
if [[ $MODE == cc || $MODE == all ]]; then
  echo
  echo "# issue 5 targets (measured ratios of goodput, same run)"
  for cc in $CCS; do
    echo "rtt50 0% loss, sender $cc: ferry/iperf3 = $(ratio "cc/rtt50-loss0/$cc/ferry" "cc/rtt50-loss0/$cc/iperf3") (target >= 0.9x); ferry/scp = $(ratio "cc/rtt50-loss0/$cc/ferry" "cc/rtt50-loss0/$cc/scp") (target >= 2.5x)"
  done
  echo "rtt50 1% loss: ferry(cubic)/scp(cubic) = $(ratio cc/rtt50-loss1/cubic/ferry cc/rtt50-loss1/cubic/scp) (target >= 20x); ferry(cubic)/iperf3(bbr) = $(ratio cc/rtt50-loss1/cubic/ferry cc/rtt50-loss1/bbr/iperf3) (target >= 0.7x)"
  echo "rtt50 1% loss, both on bbr: ferry/scp = $(ratio cc/rtt50-loss1/bbr/ferry cc/rtt50-loss1/bbr/scp); ferry/iperf3 = $(ratio cc/rtt50-loss1/bbr/ferry cc/rtt50-loss1/bbr/iperf3)"
fi
