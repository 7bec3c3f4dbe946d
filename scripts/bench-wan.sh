#!/usr/bin/env bash
# WAN benchmark: a 256 MiB upload between two network namespaces joined by
# ../shared/bench/tundelay.c (userspace delay + random loss; this kernel has no
# netem), beside scp and rsync over ssh in the same run. Conditions: 50 ms RTT
# with 0 %, 1 % and 5 % loss per direction, and 50 ms RTT with the link down for
# 20 s in the middle of the transfer. Prints completion time, goodput and, for
# ferry, the bytes re-sent. A benchmark, not a test: it never judges a timing.
#
# Usage: scripts/bench-wan.sh            (root; creates and deletes netns fbA, fbB)
# Env:   CONDS (name:one_way_ms:loss_pct:outage_s ..., default 50 ms RTT with 0/1/5 % loss
#        and a 20 s outage), SIZE_MIB (256), CAP_S (120: a slower transfer is stopped and scored
#        bytes-landed / time), TOOLS ("ferry scp rsync-ssh"; iperf3 also works), SENDER_CC (bbr|cubic: the sending process's TCP congestion control)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
BENCH=${BENCH:-$REPO/../shared/bench}
SIZE_MIB=${SIZE_MIB:-256}
CAP_S=${CAP_S:-120}
TOOLS=${TOOLS:-ferry scp rsync-ssh}
SENDER_CC=${SENDER_CC:-bbr}
A=fbA B=fbB IPA=10.78.0.1 IPB=10.78.0.2
W=$(mktemp -d /tmp/ferry-wan.XXXXXX)
BYTES=$((SIZE_MIB * 1024 * 1024))
PIDS=() FWD=

command -v sshd >/dev/null && command -v rsync >/dev/null && command -v iperf3 >/dev/null || {
  apt-get update -qq && apt-get install -y -qq openssh-server openssh-client rsync iperf3 >/dev/null
}
cargo build --release -q
BIN=$REPO/target/release/ferry
gcc -O2 -o "$W/tundelay" "$BENCH/tundelay.c"
gcc -O2 -shared -fPIC -o "$W/setcc.so" "$BENCH/setcc.c" -ldl
head -c $BYTES /dev/urandom >"$W/src.bin"

cleanup() {
  [[ -n $FWD ]] && kill "$FWD" 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  ip netns del $A 2>/dev/null || true
  ip netns del $B 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
for n in $A $B; do
  if ip netns list | grep -qw "^$n"; then echo "netns $n exists; remove it first" >&2; trap - EXIT; exit 1; fi
done
ip netns add $A; ip netns add $B
ip -n $A link set lo up; ip -n $B link set lo up

# ssh server in B, with its own keys and config.
mkdir -p "$W/ssh" "$W/dst" /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/hostkey"; ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/clientkey"
cp "$W/ssh/clientkey.pub" "$W/ssh/authorized_keys"
printf '%s\n' "Port 2222" "ListenAddress $IPB" "HostKey $W/ssh/hostkey" "PidFile none" \
  "AuthorizedKeysFile $W/ssh/authorized_keys" "PermitRootLogin prohibit-password" "PasswordAuthentication no" \
  "KbdInteractiveAuthentication no" "UsePAM no" "StrictModes no" "UseDNS no" "Subsystem sftp internal-sftp" \
  "LogLevel ERROR" >"$W/ssh/sshd_config"
printf '%s\n' "Host wan" "  HostName $IPB" "  Port 2222" "  User root" "  IdentityFile $W/ssh/clientkey" \
  "  IdentitiesOnly yes" "  StrictHostKeyChecking no" "  UserKnownHostsFile /dev/null" "  BatchMode yes" \
  "  LogLevel ERROR" >"$W/ssh/ssh_config"

link_up() { # one_way_ms loss_pct
  "$W/tundelay" fbtA fbtB "$1" "$2" >"$W/fwd.out" 2>"$W/fwd.err" & FWD=$!
  for _ in $(seq 50); do grep -q ready "$W/fwd.out" 2>/dev/null && break; sleep 0.05; done
  ip link set fbtA netns $A; ip link set fbtB netns $B
  ip -n $A addr add $IPA peer $IPB dev fbtA; ip -n $B addr add $IPB peer $IPA dev fbtB
  ip -n $A link set fbtA txqueuelen 5000 up; ip -n $B link set fbtB txqueuelen 5000 up
}
link_down() { kill "$FWD"; wait "$FWD" 2>/dev/null || true; FWD=; }

start_servers() {
  ip netns exec $B /usr/sbin/sshd -D -f "$W/ssh/sshd_config" -E "$W/ssh/sshd.log" & PIDS+=($!)
  ip netns exec $B "$BIN" -q serve --root "$W/dst" --listen $IPB:7787 --state-dir "$W/fstate" --no-auth >/dev/null & PIDS+=($!)
  if [[ " $TOOLS " == *" iperf3 "* ]]; then
    ip netns exec $B iperf3 -s -B $IPB -p 5299 >/dev/null 2>&1 & PIDS+=($!)
  fi
  sleep 0.7
}
stop_servers() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; PIDS=(); }

landed() { find "$W/dst" -type f -printf '%b\n' 2>/dev/null | awk '{s+=$1*512} END{print s+0}'; }
# run TOOL in A, optionally taking the link down for OUTAGE seconds after AT seconds.
run() { # tool outage_s
  rm -rf "${W:?}/dst" "$W/cstate"; mkdir -p "$W/dst"; sync
  local tool=$1 outage=$2 cmd
  case $tool in
    ferry) cmd=("$BIN" cp -q --no-progress --json --stall-timeout 5 --retry-max-attempts 0 --retry-max-delay 2000
                --state-dir "$W/cstate" "$W/src.bin" "ferry://$IPB:7787/out.bin") ;;
    scp) cmd=(scp -q -F "$W/ssh/ssh_config" "$W/src.bin" "wan:$W/dst/out.bin") ;;
    rsync-ssh) cmd=(rsync -W --partial -e "ssh -F $W/ssh/ssh_config" "$W/src.bin" "wan:$W/dst/out.bin") ;;
    iperf3) cmd=(iperf3 -c $IPB -p 5299 -n "$BYTES" -f m) ;;
  esac
  local s=$EPOCHREALTIME p down=0 capped=0
  ip netns exec $A env LD_PRELOAD="$W/setcc.so" PB_TCP_CC=$SENDER_CC "${cmd[@]}" >"$W/out.json" 2>>"$W/errors.log" & p=$!
  while kill -0 "$p" 2>/dev/null; do
    local t; t=$(awk -v a="$s" -v b="$EPOCHREALTIME" 'BEGIN{print b-a}')
    if ((outage > 0 && down == 0)) && (($(landed) > BYTES / 2)); then
      ip -n $A link set fbtA down; down=1; sleep "$outage"; ip -n $A link set fbtA up
      ip -n $A addr add $IPA peer $IPB dev fbtA 2>/dev/null || true
    fi
    if awk -v t="$t" -v c="$CAP_S" 'BEGIN{exit !(t>=c)}'; then kill "$p"; capped=1; break; fi
    sleep 0.05
  done
  wait "$p" 2>/dev/null || true
  local e=$EPOCHREALTIME sz; sz=$(landed)
  local secs; secs=$(awk -v a="$s" -v b="$e" 'BEGIN{printf "%.1f", b-a}')
  local ok=no; cmp -s "$W/src.bin" "$W/dst/out.bin" && ok=yes
  # iperf3 writes nothing to disk: count it whole if it finished, as a lower bound if capped.
  if [[ $tool == iperf3 ]]; then
    sz=0; ok=n/a
    ((capped == 0)) && grep -q "receiver" "$W/out.json" && sz=$BYTES
    ((capped == 1)) && sz=$(awk '/receiver/ { v=$5; u=$6 } END { m = (u=="GBytes") ? 1073741824 : (u=="MBytes") ? 1048576 : (u=="KBytes") ? 1024 : 1; printf "%d", v*m }' "$W/out.json")
  fi
  local extra="-"
  if [[ $tool == ferry && -s $W/out.json ]]; then
    extra=$(tail -1 "$W/out.json" | python3 -c 'import json,sys; j=json.load(sys.stdin); print("%.1f MiB (%.2f%%), %d retries" % ((j["bytes_sent"]-j["bytes_total"])/2**20, (j["bytes_sent"]-j["bytes_total"])*100/j["bytes_total"], j["retries"]))')
  fi
  printf '  %-10s %7ss %8s MB/s  complete=%-3s  re-sent: %s\n' "$tool" "$secs" \
    "$(awk -v b="$sz" -v t="$secs" 'BEGIN{printf "%.2f", b/t/1e6}')" "$ok" "$extra"
}

echo "# ${SIZE_MIB} MiB upload, sender CC=$SENDER_CC, cap ${CAP_S}s; goodput = bytes landed / time"
for cond in ${CONDS:-rtt50:25:0:0 rtt50-loss1:25:1:0 rtt50-loss5:25:5:0 rtt50-down20s:25:0:20}; do
  IFS=: read -r name ow loss outage <<<"$cond"
  echo "== $name (one-way ${ow} ms, loss ${loss}% per direction, outage ${outage}s at 50%)"
  link_up "$ow" "$loss"; start_servers
  for t in $TOOLS; do run "$t" "$outage"; done
  stop_servers; link_down
done
