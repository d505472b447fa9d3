#!/usr/bin/env bash
# Starts or stops a 3-node walrus cluster on loopback as native processes.
#   scripts/cluster.sh bootstrap   build, start 3 nodes, wait until they serve, print addresses
#   scripts/cluster.sh stop        stop exactly the processes bootstrap started (by pid)
# Ports: raft ${RAFT_BASE:-16001}+i, client ${CLIENT_BASE:-18081}+i; data in ${DATA:-./cluster-data}.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-./cluster-data}
RAFT_BASE=${RAFT_BASE:-16001}
CLIENT_BASE=${CLIENT_BASE:-18081}
PIDS="$DATA/pids"
NODE=./target/release/walrus-node
CLI=./target/release/walrus-cli

wait_serving() { # addr
  for _ in $(seq 1 150); do
    if "$CLI" --addr "$1" --timeout-secs 2 metrics 2>/dev/null | grep -q '"current_leader":[0-9]'; then return 0; fi
    sleep 0.2
  done
  echo "node at $1 did not start serving; see $DATA/node*.log" >&2
  return 1
}

bootstrap() {
  if [ -f "$PIDS" ]; then echo "a cluster from $DATA is already running (run: make cluster-stop)" >&2; exit 1; fi
  cargo build --release -q -p walrus-node -p walrus-cli
  mkdir -p "$DATA"
  : > "$PIDS"
  for i in 0 1 2; do
    id=$((i + 1))
    join=()
    if [ "$i" -gt 0 ]; then join=(--join "127.0.0.1:$RAFT_BASE"); fi
    RUST_LOG=${RUST_LOG:-info} "$NODE" --node-id "$id" --data-dir "$DATA/node$id" \
      --raft-port $((RAFT_BASE + i)) --client-port $((CLIENT_BASE + i)) "${join[@]}" \
      > "$DATA/node$id.log" 2>&1 &
    echo $! >> "$PIDS"
    wait_serving "127.0.0.1:$((CLIENT_BASE + i))"
  done
  echo "walrus cluster serving; client addresses:"
  for i in 0 1 2; do echo "  127.0.0.1:$((CLIENT_BASE + i))"; done
  echo "try: $CLI --addr 127.0.0.1:$CLIENT_BASE"
}

stop() {
  if [ ! -f "$PIDS" ]; then echo "no cluster pid file at $PIDS"; return 0; fi
  while read -r pid; do
    # Only signal a pid that is still one of our walrus-node processes.
    if [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "walrus-node"; then
      kill "$pid" && echo "stopped walrus-node pid $pid"
    fi
  done < "$PIDS"
  rm -f "$PIDS"
}

case "${1:-}" in
  bootstrap) bootstrap ;;
  stop) stop ;;
  *) echo "usage: $0 bootstrap|stop" >&2; exit 2 ;;
esac
