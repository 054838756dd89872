#!/usr/bin/env bash
# Runs the idle, heartbeat and fanout scenarios and saves CPU and heap flame graphs of
# the server under each into flamegraphs/: NAME-kernel.svg (bpftrace, kernel and user
# frames; needs root), NAME-cpu.svg (pprof-rs, user space only), NAME-heap.svg. Needs a
# release build:
#   cargo build --release && flamegraphs/capture.sh [connections]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
BIN=target/release
OUT=flamegraphs
for b in pushline pushline-bench pushline-tools; do
  [[ -x $BIN/$b ]] || { echo "capture.sh: $BIN/$b missing; run cargo build --release" >&2; exit 1; }
done

# The server the bench started: the bench's child named pushline.
server_of() { pgrep -P "$1" -x pushline; }

wait_for_server() {
  local bench=$1 pid=""
  for _ in $(seq 1 100); do pid=$(server_of "$bench" || true); [[ -n $pid ]] && { echo "$pid"; return; }; sleep 0.1; done
  echo "capture.sh: no server under bench pid $bench" >&2; exit 1
}

capture() { # scenario, delay before profiling, seconds of each profile, bench args...
  local name=$1 delay=$2 seconds=$3; shift 3
  "$BIN/pushline-bench" --json "$OUT/$name.json" "$@" > "$OUT/$name.txt" &
  local bench=$!
  local pid; pid=$(wait_for_server "$bench")
  sleep "$delay"
  # Exit status 3: no samples (an SVG saying so is written).
  "$BIN/pushline-tools" flamegraph "$pid" --kernel --seconds "$seconds" -o "$OUT/$name-kernel.svg" --folded "$OUT/$name-kernel.folded" || echo "capture.sh: $name: no kernel+user samples" >&2
  "$BIN/pushline-tools" flamegraph "$pid" --seconds "$seconds" -o "$OUT/$name-cpu.svg" --folded "$OUT/$name-cpu.folded" || echo "capture.sh: $name: no CPU samples" >&2
  "$BIN/pushline-tools" heap "$pid" -o "$OUT/$name-heap" > /dev/null
  rm -f "$OUT/$name-heap.sites.json"
  wait "$bench"
  cat "$OUT/$name.txt"
}

# idle: connections held, nothing sent; profiled after the bench has measured memory (a
# first CPU profile allocates pprof-rs's sample table), to show what idle costs (ideally nothing).
capture idle 19 3 idle --connections "$N" --hold 16
# heartbeat: 10 s idle, then every client pings once a second; profile the pinging.
capture heartbeat 14 4 heartbeat --connections "$N" --interval 1s --seconds 14
# fanout: 100-byte broadcasts to every client, back to back.
capture fanout 3 4 fanout --connections "$N" --rounds 60
