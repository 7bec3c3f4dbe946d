#!/usr/bin/env bash
# Many small files: N files of SIZE bytes (default 10,000 x 4 KiB in 100
# directories) uploaded and downloaded on loopback by ferry, rsync over ssh and
# scp -r, each into a fresh destination, median of RUNS. ferry fsyncs what it reports as
# stored (one syncfs per batch); rsync and scp do not fsync at all.
# A benchmark, not a test: it prints figures and ratios and never fails on a timing.
#
# Usage: scripts/bench-small.sh        (root: starts a private sshd on 127.0.0.1:$SSH_PORT)
# Env:   N (10000), SIZE (4096), RUNS (3), SSH_PORT (2231), FERRY_PORT (7792),
#        BASE (/tmp; /dev/shm takes the disk and ext4 inode allocation out of it)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
N=${N:-10000} SIZE=${SIZE:-4096} RUNS=${RUNS:-3}
SSH_PORT=${SSH_PORT:-2231} FERRY_PORT=${FERRY_PORT:-7792}
W=$(mktemp -d "${BASE:-/tmp}/ferry-small.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT

command -v sshd >/dev/null && command -v rsync >/dev/null || {
  apt-get update -qq && apt-get install -y -qq openssh-server openssh-client rsync >/dev/null
}
cargo build --release -q
BIN=$REPO/target/release/ferry

echo "making $N files of $SIZE bytes" >&2
python3 - "$W/src" "$N" "$SIZE" <<'PY'
import os, sys
root, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    d = os.path.join(root, "d%03d" % (i % 100))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%06d" % i), "wb") as f:
        f.write(os.urandom(size))
PY

mkdir -p "$W/ssh" /run/sshd
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
/usr/sbin/sshd -D -f "$W/ssh/sshd_config" -E "$W/ssh/sshd.log" & PIDS+=($!)
SSH="ssh -p $SSH_PORT -i $W/ssh/clientkey -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=error"

mkdir -p "$W/dst"
"$BIN" -q serve --create-root --root "$W/dst" --listen 127.0.0.1:$FERRY_PORT --state-dir "$W/state" --no-auth >/dev/null & PIDS+=($!)
"$BIN" -q serve --create-root --root "$W" --listen 127.0.0.1:$((FERRY_PORT + 1)) --state-dir "$W/state2" --no-auth >/dev/null & PIDS+=($!)
mkdir -p "$W/down"
sleep 0.7

now() { date +%s.%N; }
run() { # direction tool run# -> seconds
  local dir=$1 tool=$2 i=$3 d t0 t1
  sync
  t0=$(now)
  if [[ $dir = up ]]; then
    d="$W/dst/$tool-$i"
    case $tool in
      ferry) "$BIN" cp -q -r --no-progress --state-dir "$W/cstate" "$W/src" "ferry://127.0.0.1:$FERRY_PORT/$tool-$i" ;;
      rsync-ssh) rsync -a -e "$SSH" "$W/src/" "root@127.0.0.1:$d/" ;;
      scp) scp -q -r -P "$SSH_PORT" -i "$W/ssh/clientkey" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=error "$W/src" "root@127.0.0.1:$d" ;;
    esac
  else
    d="$W/down/$tool-$i"
    case $tool in
      ferry) "$BIN" cp -q -r --no-progress --state-dir "$W/cstate" "ferry://127.0.0.1:$((FERRY_PORT + 1))/src" "$d" ;;
      rsync-ssh) rsync -a -e "$SSH" "root@127.0.0.1:$W/src/" "$d/" ;;
      scp) scp -q -r -P "$SSH_PORT" -i "$W/ssh/clientkey" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=error "root@127.0.0.1:$W/src" "$d" ;;
    esac
  fi
  t1=$(now)
  local got; got=$(find "$d" -type f | wc -l)
  [[ $got -eq $N ]] || { echo "$dir $tool run $i: $got of $N files landed" >&2; echo FAIL; return; }
  echo "$t1 - $t0" | bc
}

# Runs are interleaved (ferry, rsync, scp, ferry, ...): ext4 skips inodes
# freed in the last minutes when it allocates new ones, which makes whoever
# runs right after a mass delete slow; interleaving spreads that over all tools.
for dir in up down; do
  declare -A MED=() TS=()
  for i in $(seq 1 "$RUNS"); do
    for tool in ferry rsync-ssh scp; do
      t=$(run "$dir" "$tool" "$i"); TS[$tool]+="$t "
      echo "  $dir $tool run $i: $t s" >&2
    done
  done
  for tool in ferry rsync-ssh scp; do
    MED[$tool]=$(printf '%s\n' ${TS[$tool]} | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  done
  echo
  echo "$N files x $SIZE bytes, loopback $dir""load, seconds (median of $RUNS); ratio = tool / ferry (higher: ferry faster)"
  for tool in ferry rsync-ssh scp; do
    m=${MED[$tool]}
    r=$(awk -v a="$m" -v b="${MED[ferry]}" 'BEGIN { if (a+0>0 && b+0>0) printf "%.2fx", a/b }')
    printf "  %-10s %8.3f s  %8.0f files/s  %s\n" "$tool" "$m" "$(echo "$N / $m" | bc -l)" "$r"
  done
done
