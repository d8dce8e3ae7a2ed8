#!/usr/bin/env bash
# idemq-bench against a 3-node nats-server cluster on loopback, every
# bucket and stream at R3, in core and JetStream mode.
#
#   scripts/bench-cluster.sh [idemq-bench flags...]
#
# Starts three nats-servers (JetStream, routes on loopback, fresh stores
# in a temporary directory), waits until the cluster has a meta leader,
# runs `target/release/idemq-bench --replicas 3` once per mode against
# the first node (extra flags are passed on), and stops the servers.
# The three servers share this machine's cores with the bench: compare
# the ratios, not the rates. MODES="core" (or "jetstream") runs one mode;
# KEEP_LOGS=DIR copies the servers' logs there before they are removed. Needs nats-server 2.11+ on PATH and a
# release build (cargo build --release -p idemq-bench).
set -euo pipefail

bench=${BENCH:-target/release/idemq-bench}
[ -x "$bench" ] || { echo "bench-cluster.sh: no $bench (cargo build --release -p idemq-bench)" >&2; exit 2; }
command -v nats-server >/dev/null || { echo "bench-cluster.sh: nats-server is not on PATH" >&2; exit 2; }

dir=$(mktemp -d)
base=$((30000 + RANDOM % 20000))
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP_LOGS:-}" ]; then cp "$dir"/n*.log "$KEEP_LOGS"/ 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT

routes="nats-route://127.0.0.1:$((base + 10)),nats-route://127.0.0.1:$((base + 11)),nats-route://127.0.0.1:$((base + 12))"
for i in 0 1 2; do
  nats-server -a 127.0.0.1 -p $((base + i)) -js -sd "$dir/n$i" -n "n$i" \
    --cluster_name bench --cluster "nats://127.0.0.1:$((base + 10 + i))" --routes "$routes" \
    >"$dir/n$i.log" 2>&1 &
  pids+=($!)
done

# Bounded: the cluster elects a JetStream meta leader within seconds.
for _ in $(seq 1 60); do
  grep -qh "JetStream cluster new metadata leader\|Self is new JetStream cluster metadata leader" "$dir"/n*.log && break
  sleep 0.5
done
sleep 2

for mode in ${MODES:-core jetstream}; do
  "$bench" --nats-url "nats://127.0.0.1:$base" --server-pid "${pids[0]}" \
    --replicas 3 --mode "$mode" "$@"
done
