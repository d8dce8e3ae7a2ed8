#!/usr/bin/env python3
"""Sends COUNT fresh intents (unique ids) as requests, CONCURRENCY at a time.

  fresh_load.py URL SUBJECT COUNT [CONCURRENCY]

Every reply must be a first execution (Idem-Status: Success, Idem-Replayed:
false); the exit status is 1 otherwise. Used by scripts/callgrind.sh, which
needs a load that is the same from run to run and nothing else.
"""

import asyncio
import json
import secrets
import sys

import nats

TIMEOUT = 60.0  # seconds; a worker under callgrind is ~50x slower


async def main(url, subject, count, concurrency):
    client = await nats.connect(url)
    run = secrets.token_hex(4)
    slots = asyncio.Semaphore(concurrency)
    failures = 0

    async def one(i):
        nonlocal failures
        intent = {"intent_id": f"{run}-{i}", "actor": "load", "episode": "e",
                  "params": {"pad": "x" * 40}}
        async with slots:
            try:
                reply = await client.request(subject, json.dumps(intent).encode(), timeout=TIMEOUT)
                headers = reply.headers or {}
                fresh = headers.get("Idem-Status") == "Success" and headers.get("Idem-Replayed") == "false"
            except Exception:  # a timeout or no responders: counted, reported below
                fresh = False
            failures += not fresh

    await asyncio.gather(*(one(i) for i in range(count)))
    await client.close()
    if failures:
        print(f"fresh_load: {failures} of {count} requests were not fresh executions", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    concurrency = int(sys.argv[4]) if len(sys.argv) == 5 else 64
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), concurrency))
