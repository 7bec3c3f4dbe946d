#!/usr/bin/env bash
# Every benchmark scenario of issue 5 in one run, then one table of the targets:
#   1. loopback 1 GiB upload and download: ferry (TCP and QUIC) beside scp, sftp,
#      rsync over ssh, the rsync daemon, rclone sftp, socat into a file, iperf3
#      (scripts/bench.sh, median of PB_RUNS);
#   2. 256 MiB at 50 ms RTT with 0, 1 and 2 % loss, the sending host on cubic and on
#      bbr: iperf3, ferry over TCP, ferry over QUIC, scp (scripts/bench-wan.sh cc);
#   3. 10,000 files of 4 KiB up and down beside rsync over ssh and scp -r
#      (scripts/bench-small.sh);
#   4. CPU seconds per GiB on each side and peak RSS for a 4 GiB upload beside scp
#      and rsync (scripts/bench-cpu.sh).
# A benchmark, not a test: it prints figures and ratios and never fails on a timing.
# Takes ~25 minutes. Needs root (sshd, network namespaces).
#
# Usage: scripts/bench-all.sh [loopback wan small cpu]   (default: all four)
# Env:   OUT (directory for the raw outputs, default /tmp/ferry-bench-all), and each
#        script's own variables (PB_RUNS, RUNS, SIZE_MIB, ...). Peer tools that are not
#        installed show as "skipped" (their targets as "?"); PB_INSTALL=1 (loopback) and
#        INSTALL=1 (wan) apt-get install them first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ferry-bench-all}
mkdir -p "$OUT"
PARTS=("$@")
[[ ${#PARTS[@]} -gt 0 ]] || PARTS=(loopback wan small cpu)
has() { local p; for p in "${PARTS[@]}"; do [[ $p == "$1" ]] && return 0; done; return 1; }
T0=$(date +%s)

if has loopback; then
  echo "== loopback (scripts/bench.sh)" >&2
  scripts/bench.sh >"$OUT/loopback.txt" 2>"$OUT/loopback.err" || echo "bench.sh failed, see $OUT/loopback.err" >&2
fi
if has wan; then
  echo "== WAN (scripts/bench-wan.sh cc)" >&2
  CCS=${CCS:-cubic bbr} TOOLS_CC=${TOOLS_CC:-iperf3 ferry ferry-quic-bbr scp} \
    scripts/bench-wan.sh cc >"$OUT/wan.txt" 2>"$OUT/wan.err" || echo "bench-wan.sh failed, see $OUT/wan.err" >&2
fi
if has small; then
  echo "== small files (scripts/bench-small.sh)" >&2
  scripts/bench-small.sh >"$OUT/small.txt" 2>"$OUT/small.err" || echo "bench-small.sh failed, see $OUT/small.err" >&2
fi
if has cpu; then
  echo "== CPU and memory (scripts/bench-cpu.sh)" >&2
  scripts/bench-cpu.sh >"$OUT/cpu.txt" 2>"$OUT/cpu.err" || echo "bench-cpu.sh failed, see $OUT/cpu.err" >&2
fi

for f in loopback wan small cpu; do
  [[ -s $OUT/$f.txt ]] || continue
  echo
  echo "################ $f"
  cat "$OUT/$f.txt"
done

# The targets, from the tables above (ratios within one run).
val() { awk -v t="$2" '$1 == t { print $2; exit }' "$OUT/$1.txt" 2>/dev/null; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 > 0 && b+0 > 0) printf "%.2fx", a/b; else print "n/a" }'; }
verdict() { awk -v r="${1%x}" -v t="$2" 'BEGIN { if (r == "n/a" || r == "") print "?"; else if (r+0 >= t+0) print "met"; else print "MISSED" }'; }
row() { printf '  %-58s %9s  target %-7s %s\n' "$1" "$2" ">= ${3}x" "$(verdict "$2" "$3")"; }
echo
echo "################ issue 5 targets ($(date -u +%FT%TZ), took $(($(date +%s) - T0)) s)"
if [[ -s $OUT/loopback.txt ]]; then
  up=$(val loopback ferry-up)
  row "loopback 1 GiB: ferry upload / scp" "$(ratio "$up" "$(val loopback scp)")" 3
  row "loopback 1 GiB: ferry upload / rsync daemon" "$(ratio "$up" "$(val loopback rsyncd)")" 0.9
  row "loopback 1 GiB: ferry upload / socat into a file" "$(ratio "$up" "$(val loopback socat-file)")" 0.75
  row "loopback 1 GiB: ferry download / scp" "$(ratio "$(val loopback ferry-down)" "$(val loopback scp)")" 3
  printf '  %-58s %9s  (no target: a plain durable copy on this disk)\n' \
    "loopback 1 GiB: ferry upload / dd conv=fsync" "$(ratio "$up" "$(val loopback dd-fsync)")"
  printf '  %-58s %9s  (no target: what the disk takes, one write at a time)\n' \
    "loopback 1 GiB: ferry upload / dd oflag=direct" "$(ratio "$up" "$(val loopback dd-direct)")"
fi
if [[ -s $OUT/wan.txt ]]; then
  sed -n '/issue 5 targets/,$p' "$OUT/wan.txt" | tail -n +2 | sed 's/^/  /'
  awk '$1 == "cc" && $4 == "ferry-quic-bbr" { printf "  QUIC (bbr) %s, host cc %s: %s MB/s\n", $2, $3, $6 }' "$OUT/wan.txt"
fi
if [[ -s $OUT/small.txt ]]; then
  # bench-small prints "rsync-ssh <secs> s <files/s> files/s <ratio>" per direction.
  awk '/upload|download/ { dir = ($0 ~ /upload/) ? "upload" : "download" }
       $1 == "rsync-ssh" { printf "%s %s\n", dir, $6 }' "$OUT/small.txt" | while read -r dir r; do
    row "10,000 x 4 KiB $dir: rsync time / ferry time" "$r" 2
  done
fi
if [[ -s $OUT/cpu.txt ]]; then
  awk '$1 == "ferry" { fc = $3; fs = $4; fp = $5; cr = $6; sr = $7 } $1 == "scp" { sc = $3; ss = $4; sp = $5 }
       END { printf "  CPU s/GiB client: ferry %s, scp %s (%s); server side: ferry %s, scp %s (%s)\n", fc, sc, (fc+0 <= sc+0) ? "met" : "MISSED", fs, ss, (fs+0 <= ss+0) ? "met" : "MISSED";
             printf "  CPU s/GiB server processes alone: ferry %s, sshd+scp %s (%s)\n", fp, sp, (fp+0 <= sp+0) ? "met" : "MISSED";
             printf "  peak RSS 4 GiB: client %s, server %s (target < 64 MiB each)\n", cr, sr }' "$OUT/cpu.txt"
fi
