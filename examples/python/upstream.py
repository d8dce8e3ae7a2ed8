#!/usr/bin/env python3
"""An upstream service for `idemq serve --forward 'exec.{capability}'`, on idemq.serve_upstream.

A toy ledger: `charge` adds params.amount to params.account's balance and
returns the new balance. idemq runs each intent once per key, so a retried
charge is never applied twice. A non-positive amount is a definite error
(422, stored and replayed); params.flaky fails once with a transient 503
(not stored: the next copy runs again). Run from a checkout, this file also
finds the package in clients/python/src without installing it.

  idemq serve --forward 'exec.{capability}' &
  python3 examples/python/upstream.py &
  python3 examples/python/agent.py

It prints {"event": "ready", ...} on stdout once it is subscribed, and
{"event": "stopped", "charges": N} after SIGINT or SIGTERM (exit status 0).
"""

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

CHECKOUT_PACKAGE = Path(__file__).resolve().parents[2] / "clients" / "python" / "src"


def event(name, **fields):
    print(json.dumps({"event": name, **fields}), flush=True)


async def main(args, idemq, nats):
    balances, charges, flaked = {}, [], set()

    def charge(intent, call):
        params = intent.get("params") or {}
        amount, account = params.get("amount"), params.get("account", "default")
        if not isinstance(amount, int) or amount <= 0:
            raise idemq.DefiniteError(422, "amount must be a positive integer")
        if params.get("flaky") and call.idem_key not in flaked:
            flaked.add(call.idem_key)
            raise idemq.TransientError(503, "the ledger is briefly unavailable")
        balances[account] = balances.get(account, 0) + amount
        charges.append(call.idem_key)
        return {"account": account, "amount": amount, "balance": balances[account]}

    try:
        nc = await asyncio.wait_for(nats.connect(args.url, name="idemq-python-upstream"), 10)
    except Exception as error:  # any failure to connect ends the run the same way
        print(f"upstream: cannot connect to {args.url}: {type(error).__name__}", file=sys.stderr)
        return 2
    upstream = await idemq.serve_upstream(nc, args.subject, charge)
    event("ready", subject=args.subject)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await upstream.stop(grace=5.0)  # answers what is in flight, then returns
    await asyncio.wait_for(nc.close(), 10)
    event("stopped", charges=len(charges))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("NATS_URL") or "nats://127.0.0.1:4222",
        help="NATS server URL (default: $NATS_URL or nats://127.0.0.1:4222)",
    )
    parser.add_argument("--subject", default="exec.charge", help="what to serve (exec.* for all)")
    arguments = parser.parse_args()
    try:
        import nats
    except ImportError:
        print("upstream.py needs nats-py: pip install ./clients/python", file=sys.stderr)
        sys.exit(2)
    try:
        import idemq
    except ImportError:  # not installed: the checkout's copy
        sys.path.insert(0, str(CHECKOUT_PACKAGE))
        import idemq
    sys.exit(asyncio.run(main(arguments, idemq, nats)))
