#!/usr/bin/env bash
# Instructions per fresh intent of `idemq serve`, counted by callgrind.
#
#   scripts/callgrind.sh [BINARY]        (default: target/release/idemq)
#
# Runs the worker under callgrind twice, for 1000 and for 3000 fresh
# intents, and divides the difference by 2000, so start-up and shutdown
# cancel out. Instruction counts repeat to about 1 % from run to run where
# timings on a shared 2-core VM move by 15 %: use it to tell whether a change
# made the per-intent path cheaper, and the bench for what that buys.
#
# Needs valgrind, a nats-server with JetStream at $NATS_URL (default
# nats://127.0.0.1:4222) and nats-py (pip install -r
# examples/python/requirements.txt). Leaves callgrind.out.* in $OUT
# (default: a temporary directory) for callgrind_annotate.
set -euo pipefail

binary=${1:-target/release/idemq}
url=${NATS_URL:-nats://127.0.0.1:4222}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
here=$(dirname "$0")

command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is not installed" >&2; exit 2; }
[ -x "$binary" ] || { echo "callgrind.sh: no $binary (cargo build --release)" >&2; exit 2; }

# Prints the instructions one worker run executed for $1 fresh intents.
instructions() {
  local count=$1 id="cg$RANDOM$RANDOM"
  local log="$out/serve.$count.log" profile="$out/callgrind.out.$count"
  # Warn level, as `idemq-bench` runs its worker; the worker's own info
  # line says when it takes intents.
  RUST_LOG=warn,idemq::worker=info valgrind --tool=callgrind --callgrind-out-file="$profile" \
    "$binary" serve --nats-url "$url" --bucket "$id" --subject "$id.>" >"$log" 2>&1 &
  local worker=$!
  for _ in $(seq 1 240); do
    grep -q "taking intents" "$log" && break
    kill -0 "$worker" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.5
  done
  python3 "$here/fresh_load.py" "$url" "$id.echo" "$count"
  kill -INT "$worker"
  wait "$worker" || true
  # The bucket stays behind: delete it with `nats kv rm` if it matters.
  awk '/^summary:/ {print $2}' "$profile"
}

small=$(instructions 1000)
large=$(instructions 3000)
echo "instructions per fresh intent: $(( (large - small) / 2000 ))  (callgrind, $binary; profiles in $out)"
