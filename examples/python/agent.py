#!/usr/bin/env python3
"""An agent that publishes idemq intents with the idemq Python package.

The package (clients/python, `pip install ./clients/python`) derives each
intent's key as the worker does, sends the same bytes on every retry (after
a timeout or a retry-later answer such as IN_PROGRESS or OVERLOADED) and
returns a typed Result. Run from a checkout, this file also finds the
package in clients/python/src without installing it.

To show what idemq is for, every intent is sent --copies times (a simulated
client retry after a lost reply) and the agent checks that all copies got
the same answer. It prints one JSON summary line on stdout:

  {"ok": true, "count": 3, "copies": 2, "intents": [
     {"intent_id": "...", "key": "idem_...", "attempts": [1, 1],
      "replayed": [false, true], "result": {...}, "identical": true}, ...]}

Exit status: 0 when every intent got identical answers and no refusal; 1
otherwise; 2 for a usage error, a missing nats-py or an unreachable server.
"""

import argparse
import asyncio
import json
import os
import secrets
import sys
from pathlib import Path

CHECKOUT_PACKAGE = Path(__file__).resolve().parents[2] / "clients" / "python" / "src"
nats = idemq = None  # imported by require_packages(), after --help had its chance


def require_packages():
    """Imports nats-py and the idemq package (the checkout's copy when not installed)."""
    global nats, idemq
    try:
        import nats
    except ImportError:
        print("agent.py needs nats-py: pip install ./clients/python", file=sys.stderr)
        sys.exit(2)
    try:
        import idemq
    except ImportError:  # not installed: the checkout's copy
        sys.path.insert(0, str(CHECKOUT_PACKAGE))
        import idemq


CONNECT_TIMEOUT = 10.0  # bound on connecting, and on closing the connection


def log(message):
    print(f"agent: {message}", file=sys.stderr, flush=True)


async def send_copy(client, args, intent, key):
    """One copy of an intent, retried by the package: (result, attempts, problem)."""
    try:
        result = await client.submit(args.subject, intent, key=key)
    except idemq.Refused as refused:  # KEY_REUSED, INVALID_INTENT, ...: never retried
        return None, 1, f"refused: {refused.code}"
    except idemq.Unavailable as gave_up:
        return (
            None,
            gave_up.attempts,
            f"gave up after {gave_up.attempts} attempts: {gave_up.reason}",
        )
    return result, result.attempts, None


async def run_intent(client, args, index):
    intent = idemq.Intent(
        intent_id=f"{args.id_prefix}-{index}",
        actor=args.actor,
        episode=args.episode,
        step_idx=index,
        params={"account": f"acct-{index % 2}", "amount": index + 1},
    )
    key = intent.key()
    sends = [
        send_copy(client, args, intent, key if args.key_header else None)
        for _ in range(args.copies)
    ]
    answers = await asyncio.gather(*sends) if args.concurrent else [await s for s in sends]
    results = [r for r, _, _ in answers]
    answered = [r for r in results if r is not None]
    problems = [p for _, _, p in answers if p]
    problems += [
        f"worker key {r.idem_key} != derived key {key}" for r in answered if r.idem_key != key
    ]
    # Every copy must get the same outcome, key, intent id and storage times.
    views = {
        json.dumps([r.outcome, r.idem_key, r.intent_id, r.stored_at, r.expires_at])
        for r in answered
    }
    identical = len(answered) == len(results) and len(views) == 1
    if len(answered) == len(results) and not identical:
        problems.append("copies got different answers")
    return {
        "intent_id": intent.intent_id,
        "key": key,
        "attempts": [a for _, a, _ in answers],
        "replayed": [r.replayed if r else None for r in results],
        "result": answered[0].outcome if answered else None,
        "identical": identical,
        "problems": sorted(set(problems)),
    }


async def main(args):
    try:
        nc = await asyncio.wait_for(
            nats.connect(
                servers=[u.strip() for u in args.url.split(",") if u.strip()],
                name="idemq-python-agent",
                connect_timeout=5,
                max_reconnect_attempts=2,
            ),
            CONNECT_TIMEOUT,
        )
    except Exception as error:  # any failure to connect ends the run the same way
        log(f"cannot connect to {args.url}: {type(error).__name__}")
        return 2
    client = idemq.Client(
        nc,
        timeout=args.timeout,
        retries=args.retries,
        backoff=args.backoff,
        backoff_cap=args.backoff_cap,
    )
    try:
        intents = [await run_intent(client, args, i) for i in range(args.count)]
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
    default_url = os.environ.get("NATS_URL") or "nats://127.0.0.1:4222"
    add = parser.add_argument
    add(
        "--url",
        default=default_url,
        help=f"NATS server URL(s), comma-separated (default: $NATS_URL or {default_url})",
    )
    add("--subject", default="intents.charge", help="where intents go")
    add("--count", type=int, default=3, help="distinct intents to send")
    add("--copies", type=int, default=2, help="times each intent is sent (simulated retries)")
    add("--concurrent", action="store_true", help="send the copies of an intent at once")
    add("--timeout", type=float, default=2.0, help="seconds to wait for each reply")
    add(
        "--retries",
        type=int,
        default=5,
        help="resends of one copy after a timeout or retry-later answer",
    )
    add("--backoff", type=float, default=0.1, help="first resend delay, doubled each time")
    add("--backoff-cap", type=float, default=2.0, help="longest resend delay")
    add("--actor", default="python-agent", help="the intents' actor")
    add(
        "--episode", default=None, help="the intents' episode (default: a fresh random one per run)"
    )
    add("--id-prefix", default="intent", help="intent ids are PREFIX-0, PREFIX-1, ...")
    add(
        "--key-header",
        action="store_true",
        help="also send the derived key as the Idempotency-Key header",
    )
    args = parser.parse_args()
    if args.count < 1 or args.copies < 1 or args.retries < 0:
        parser.error("--count and --copies must be at least 1, --retries at least 0")
    if args.timeout <= 0 or args.backoff <= 0 or args.backoff_cap < args.backoff:
        parser.error("--timeout and --backoff must be positive, --backoff-cap >= --backoff")
    if args.episode is None:  # a fresh episode per run: a rerun sends new intents, not replays
        args.episode = "ep-" + secrets.token_hex(4)
    return args


if __name__ == "__main__":
    arguments = parse_args()
    require_packages()
    sys.exit(asyncio.run(main(arguments)))
