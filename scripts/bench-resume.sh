#!/usr/bin/env bash
# Bytes re-sent after a kill -9 of the client at ~50 % of an upload, and after a
# kill -9 of the server. A benchmark: it prints figures, it does not judge them.
# Usage: scripts/bench-resume.sh   Env: SIZE_MIB (1024), KILL_AT (50), BWLIMIT (0 = none)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${SIZE_MIB:-1024}
KILL_AT=${KILL_AT:-50}
cargo build --release -q
BIN=$PWD/target/release/ferry
W=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
SIZE=$((SIZE_MIB * 1024 * 1024))
head -c $SIZE /dev/urandom >"$W/src.bin"
PORT=${PORT:-7792}
start_server() { "$BIN" -q serve --root "$W/root" --create-root --listen 127.0.0.1:$PORT --state-dir "$W/sstate" --no-auth >/dev/null & SERVER=$!; PIDS+=($SERVER); sleep 0.3; }
written() { local b; b=$(stat -c %b "$W/root/.dst.bin.ferry.part" 2>/dev/null || echo 0); echo $((b * 512)); }
wait_written() { while (( $(written) < SIZE * KILL_AT / 100 )); do sleep 0.005; done; }

echo "== client killed (SIGKILL) at ~${KILL_AT}% of a ${SIZE_MIB} MiB upload"
start_server
"$BIN" cp -q --no-progress --state-dir "$W/c" "$W/src.bin" ferry://127.0.0.1:$PORT/dst.bin & C=$!
wait_written; kill -9 $C; wait $C 2>/dev/null || true
at_kill=$(written)
J=$("$BIN" cp -q --no-progress --json --state-dir "$W/c" "$W/src.bin" ferry://127.0.0.1:$PORT/dst.bin | tail -1)
cmp "$W/src.bin" "$W/root/dst.bin" && echo "  result: byte-identical"
python3 - "$J" "$at_kill" "$SIZE" <<'PY'
import json, sys
j = json.loads(sys.argv[1]); at_kill = int(sys.argv[2]); size = int(sys.argv[3])
lost = max(0, at_kill - j["bytes_resumed"])
print(f"  written at kill {at_kill/2**20:.1f} MiB; resumed {j['bytes_resumed']/2**20:.1f} MiB; rerun sent {j['bytes_sent']/2**20:.1f} MiB in {j['duration_s']:.2f}s")
print(f"  re-sent (written before the kill but not kept) {lost/2**20:.1f} MiB = {lost*100/size:.2f}% of the file")
PY

echo "== server killed (SIGKILL) at ~${KILL_AT}% and restarted; the same client run finishes"
rm -rf "$W/root" "$W/c"
"$BIN" cp -q --no-progress --json --retry-initial 100 --state-dir "$W/c" "$W/src.bin" ferry://127.0.0.1:$PORT/dst.bin >"$W/out.json" & C=$!
wait_written; kill -9 $SERVER; sleep 0.5; start_server
wait $C
cmp "$W/src.bin" "$W/root/dst.bin" && echo "  result: byte-identical"
python3 - "$(tail -1 "$W/out.json")" "$SIZE" <<'PY'
import json, sys
j = json.loads(sys.argv[1]); size = int(sys.argv[2])
extra = j["bytes_sent"] - size
print(f"  sent {j['bytes_sent']/2**20:.1f} MiB for a {size/2**20:.0f} MiB file: re-sent {extra/2**20:.1f} MiB = {extra*100/size:.2f}%; retries {j['retries']}; {j['duration_s']:.2f}s")
PY
