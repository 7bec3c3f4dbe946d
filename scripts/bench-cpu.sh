#!/usr/bin/env bash
# CPU seconds per GiB on each side and peak RSS of each side, for one upload
# of SIZE_MIB (default 4096) on loopback: ferry beside scp and rsync over ssh.
# Client CPU and peak RSS come from /usr/bin/time; the server side is measured
# as the whole machine's CPU time during the copy (/proc/stat) minus the
# client's, which also covers sshd and the remote scp or rsync, and the kernel's
# writeback (which ferry's fsyncs pull into the copy, while the peers leave
# dirty pages to be written after it). So the server processes alone are also
# shown: the ferry server's own CPU time (/proc/PID/stat, fresh server per run)
# against the private sshd's, with the session processes it reaped (sshd and
# the remote scp or rsync: cutime + cstime). ferry's server peak RSS is read
# from its /proc/PID/status (VmHWM).
# A benchmark, not a test: it prints figures and never fails on a timing.
#
# Usage: scripts/bench-cpu.sh       (root: starts a private sshd on 127.0.0.1:$SSH_PORT)
# Env:   SIZE_MIB (4096), SSH_PORT (2232), FERRY_PORT (7793), BASE (/tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SIZE_MIB=${SIZE_MIB:-4096} SSH_PORT=${SSH_PORT:-2232} FERRY_PORT=${FERRY_PORT:-7793}
W=$(mktemp -d "${BASE:-/tmp}/ferry-cpu.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
command -v sshd >/dev/null && command -v rsync >/dev/null || {
  apt-get update -qq && apt-get install -y -qq openssh-server openssh-client rsync >/dev/null
}
[[ -x /usr/bin/time ]] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
cargo build --release -q
BIN=$REPO/target/release/ferry
TCK=$(getconf CLK_TCK)
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom >"$W/src.bin"

mkdir -p "$W/ssh" "$W/dst" /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/hostkey"
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/clientkey"
cp "$W/ssh/clientkey.pub" "$W/ssh/authorized_keys"
cat >"$W/ssh/sshd_config" <<CFG
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $W/ssh/hostkey
PidFile none
AuthorizedKeysFile $W/ssh/authorized_keys
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
CFG
/usr/sbin/sshd -D -f "$W/ssh/sshd_config" -E "$W/ssh/sshd.log" & SSHD=$!; PIDS+=($SSHD)
SSHO="-i $W/ssh/clientkey -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=error"
sleep 0.5

cpu_total() { awk '/^cpu / { print $2+$3+$4+$7+$8 }' /proc/stat; }   # user nice system irq softirq, ticks
# A process's CPU ticks, with those of the children it reaped (utime stime cutime cstime).
proc_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12+$13+$14+$15 }'; }
GIB=$(echo "$SIZE_MIB / 1024" | bc -l)
printf "\n%s MiB upload on loopback: CPU seconds per GiB and peak RSS\n" "$SIZE_MIB"
printf "  %-10s %8s %12s %12s %12s %12s %12s\n" tool wall_s client_s/GiB server_s/GiB srv_proc/GiB client_RSS server_RSS
for tool in ferry scp rsync-ssh; do
  rm -f "$W"/dst/*; sync
  srv_rss=n/a
  if [[ $tool = ferry ]]; then
    rm -rf "$W/state"
    "$BIN" -q serve --create-root --root "$W/dst" --listen 127.0.0.1:$FERRY_PORT --state-dir "$W/state" --no-auth >/dev/null & SP=$!; PIDS+=($SP)
    sleep 0.5
    cmd=("$BIN" cp -q --no-progress --state-dir "$W/cstate-$RANDOM" "$W/src.bin" "ferry://127.0.0.1:$FERRY_PORT/x.bin")
  elif [[ $tool = scp ]]; then
    cmd=(scp -q -P "$SSH_PORT" $SSHO "$W/src.bin" "root@127.0.0.1:$W/dst/x.bin")
  else
    cmd=(rsync -a -e "ssh -p $SSH_PORT $SSHO" "$W/src.bin" "root@127.0.0.1:$W/dst/x.bin")
  fi
  if [[ $tool = ferry ]]; then SRV=$SP; else SRV=$SSHD; fi
  p0=$(proc_ticks $SRV); c0=$(cpu_total); t0=$(date +%s.%N)
  /usr/bin/time -o "$W/time" -f "%U %S %M" "${cmd[@]}"
  t1=$(date +%s.%N); c1=$(cpu_total)
  sleep 0.5   # the session's processes reaped by sshd
  p1=$(proc_ticks $SRV)
  read -r cu cs crss <"$W/time"
  if [[ $tool = ferry ]]; then
    srv_rss="$(awk '/VmHWM/ { printf "%.1fMB", $2/1024 }' /proc/$SP/status)"
    kill $SP; wait $SP 2>/dev/null || true
  fi
  cmp -s "$W/src.bin" "$W/dst/x.bin" || echo "  $tool: destination differs!" >&2
  wall=$(echo "$t1 - $t0" | bc -l)
  client=$(echo "($cu + $cs) / $GIB" | bc -l)
  server=$(echo "(($c1 - $c0) / $TCK - $cu - $cs) / $GIB" | bc -l)
  proc=$(echo "($p1 - $p0) / $TCK / $GIB" | bc -l)
  printf "  %-10s %8.2f %12.2f %12.2f %12.2f %12s %12s\n" "$tool" "$wall" "$client" "$server" "$proc" "$(echo "$crss/1024" | bc)MB" "$srv_rss"
done
