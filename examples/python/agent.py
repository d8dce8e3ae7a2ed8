#!/usr/bin/env python3
"""An agent that publishes idemq intents with nats-py and retries safely.

Each intent is sent as a NATS request in the contract's envelope
(PROTOCOL.md section 2). Its idempotency key is derived here exactly as the
worker derives it (section 1), and with --key-header it is also sent as the
Idempotency-Key header. A request that times out is resent with the SAME
payload and key, with exponential back-off, so at most one execution happens
however often it is resent. Retry-later answers (IN_PROGRESS, NO_HANDLER,
STORE_UNAVAILABLE, transient handler errors with code >= 500) are resent too.

To show what idemq is for, every intent is sent --copies times (a simulated
client retry after a lost reply) and the agent checks that all copies got
the same answer. It prints one JSON summary line on stdout:

  {"ok": true, "count": 3, "copies": 2, "intents": [
     {"intent_id": "...", "key": "idem_...", "attempts": [1, 1],
      "replayed": [false, true], "result": {...}, "identical": true}, ...]}

Exit status: 0 when every intent got identical answers and no unexpected
error code; 1 otherwise; 2 for a usage error, a missing nats-py or an
unreachable server.
"""

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import sys

try:
    import nats
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as RequestTimeout
except ImportError:
    print(
        "agent.py needs nats-py: pip install -r examples/python/requirements.txt",
        file=sys.stderr,
    )
    sys.exit(2)

# The worker's own codes that mean "nothing ran, retry later with the same key".
RETRY_LATER = {"IN_PROGRESS", "NO_HANDLER", "STORE_UNAVAILABLE"}
# Fields every copy of one intent must agree on.
SAME_FOR_EVERY_COPY = ("idem_key", "intent_id", "result", "stored_at", "expires_at")
# Bound on connecting, and on closing the connection.
CONNECT_TIMEOUT = 10.0


def generate(run_id, episode, step_idx):
    """The contract's key: idem_ + the first 16 hex digits of SHA-256."""
    text = f"{run_id}::{episode}::{step_idx}"
    return "idem_" + hashlib.sha256(text.encode()).hexdigest()[:16]


def intent_key(intent):
    """The key the worker derives from an intent's body."""
    step_idx = intent.get("step_idx", 0)
    if "run_id" in intent:
        return generate(intent["run_id"], intent["episode"], step_idx)
    run_id = intent["intent_id"] + ":" + intent["actor"]
    return generate(run_id, intent["episode"], step_idx)


def log(message):
    print(f"agent: {message}", file=sys.stderr, flush=True)


def error_code(reply):
    result = reply.get("result") or {}
    if result.get("status") != "Error":
        return None
    return (result.get("data") or {}).get("code")


def is_transient(reply):
    """A reply that was not stored and asks for a retry with the same key."""
    code = error_code(reply)
    if code is None or reply.get("stored_at") is not None:
        return False
    return code in RETRY_LATER or (code.isdigit() and int(code) >= 500)


async def request_until_answered(nc, args, payload, headers):
    """Sends one copy of an intent, resending the same bytes after a timeout
    or a retry-later answer. Returns (reply or None, attempts, problem)."""
    delay = args.backoff
    attempt = 0
    while True:
        attempt += 1
        try:
            msg = await nc.request(
                args.subject, payload, timeout=args.timeout, headers=headers
            )
            reply = json.loads(msg.data)
            if not is_transient(reply):
                return reply, attempt, None
            problem = f"transient {error_code(reply)}"
            hint_ms = reply["result"]["data"].get("retry_after_ms")
            wait = hint_ms / 1000 if hint_ms else delay
        except RequestTimeout:
            reply, problem, wait = None, f"no reply within {args.timeout}s", delay
        except NoRespondersError:
            reply, problem, wait = None, "no worker listening", delay
        if attempt > args.retries:
            return reply, attempt, f"gave up after {attempt} attempts: {problem}"
        wait = min(wait, args.backoff_cap)
        log(f"{problem}; resending the same intent in {wait:.2f}s")
        await asyncio.sleep(wait)
        delay = min(delay * 2, args.backoff_cap)


async def run_intent(nc, args, index):
    intent = {
        "intent_id": f"{args.id_prefix}-{index}",
        "actor": args.actor,
        "episode": args.episode,
        "step_idx": index,
        "params": {"account": f"acct-{index % 2}", "amount": index + 1},
    }
    key = intent_key(intent)
    headers = {"Idempotency-Key": key} if args.key_header else None
    # The exact same bytes for every copy and every retry.
    payload = json.dumps(intent).encode()

    sends = [
        request_until_answered(nc, args, payload, headers) for _ in range(args.copies)
    ]
    if args.concurrent:
        answers = await asyncio.gather(*sends)
    else:
        answers = [await send for send in sends]

    problems = [p for _, _, p in answers if p]
    replies = [r for r, _, _ in answers]
    for reply in replies:
        if reply is None:
            continue
        code = error_code(reply)
        if code is not None and reply.get("stored_at") is None:
            problems.append(f"unexpected error code {code}")
        if reply.get("idem_key") != key:
            problems.append(f"worker key {reply.get('idem_key')} != derived key {key}")
    answered = [r for r in replies if r is not None]
    views = [{f: r.get(f) for f in SAME_FOR_EVERY_COPY} for r in answered]
    all_answered = len(answered) == len(replies)
    identical = all_answered and all(v == views[0] for v in views)
    if all_answered and not identical:
        problems.append("copies got different answers")
    return {
        "intent_id": intent["intent_id"],
        "key": key,
        "attempts": [a for _, a, _ in answers],
        "replayed": [r.get("replayed") if r else None for r in replies],
        "result": answered[0].get("result") if answered else None,
        "identical": identical,
        "problems": sorted(set(problems)),
    }


async def main(args):
    async def on_error(error):
        log(f"connection: {error}")

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                servers=[u.strip() for u in args.url.split(",") if u.strip()],
                name="idemq-python-agent",
                connect_timeout=5,
                max_reconnect_attempts=2,
                error_cb=on_error,
            ),
            CONNECT_TIMEOUT,
        )
    except Exception as error:  # any failure to connect ends the run the same way
        log(f"cannot connect to {args.url}: {error!r}")
        return 2
    try:
        intents = [await run_intent(nc, args, i) for i in range(args.count)]
    finally:
        try:
            await asyncio.wait_for(nc.close(), CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            log("closing the connection timed out")
    ok = all(not i["problems"] for i in intents)
    summary = {
        "ok": ok,
        "subject": args.subject,
        "count": args.count,
        "copies": args.copies,
        "intents": intents,
    }
    print(json.dumps(summary), flush=True)
    return 0 if ok else 1


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("NATS_URL") or "nats://127.0.0.1:4222",
        help="NATS server URL(s), comma-separated (default: $NATS_URL or nats://127.0.0.1:4222)",
    )
    parser.add_argument("--subject", default="intents.charge", help="where intents go")
    parser.add_argument("--count", type=int, default=3, help="distinct intents to send")
    parser.add_argument(
        "--copies", type=int, default=2, help="times each intent is sent (simulated retries)"
    )
    parser.add_argument(
        "--concurrent", action="store_true", help="send the copies of an intent at once"
    )
    parser.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait for each reply"
    )
    parser.add_argument(
        "--retries", type=int, default=5, help="resends of one copy after a timeout"
    )
    parser.add_argument(
        "--backoff", type=float, default=0.1, help="first resend delay, doubled each time"
    )
    parser.add_argument(
        "--backoff-cap", type=float, default=2.0, help="longest resend delay"
    )
    parser.add_argument("--actor", default="python-agent", help="the intents' actor")
    parser.add_argument(
        "--episode",
        default=None,
        help="the intents' episode (default: a fresh random one per run)",
    )
    parser.add_argument(
        "--id-prefix", default="intent", help="intent ids are PREFIX-0, PREFIX-1, ..."
    )
    parser.add_argument(
        "--key-header",
        action="store_true",
        help="also send the derived key as the Idempotency-Key header",
    )
    args = parser.parse_args()
    if args.count < 1 or args.copies < 1 or args.retries < 0:
        parser.error("--count and --copies must be at least 1, --retries at least 0")
    if args.timeout <= 0 or args.backoff <= 0 or args.backoff_cap < args.backoff:
        parser.error("--timeout and --backoff must be positive, --backoff-cap >= --backoff")
    if args.episode is None:
        # A fresh episode per run: a rerun sends new intents instead of replays.
        args.episode = "ep-" + secrets.token_hex(4)
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
