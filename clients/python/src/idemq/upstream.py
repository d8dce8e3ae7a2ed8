"""Upstream services' side: answer the requests of ``idemq serve --forward``
(docs/contract.md v1.2, section 7, and ``src/handler/forward.rs``)."""

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union, cast

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .errors import DefiniteError, Killed, TransientError
from .result import header

__all__ = ["Call", "Handler", "Upstream", "serve_upstream"]

logger = logging.getLogger("idemq.upstream")

KEY_HEADER = "Idem-Key"
ATTEMPT_HEADER = "Idem-Attempt"
STATUS_HEADER = "Idem-Status"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
ERROR_HEADER = "Nats-Service-Error"


@dataclass(frozen=True)
class Call:
    """What the worker says about one request, from its headers.

    ``idem_key`` is the intent's key (``Idem-Key``; ``None`` when the request
    did not come from idemq), ``attempt`` the claim's attempt number
    (``Idem-Attempt``: 1 for the key's first execution, 2 or more after a
    worker lost its lease while running it), ``subject`` where it arrived.
    """

    idem_key: Optional[str]
    attempt: int
    subject: str


#: A handler: ``handler(intent, call)`` returns the ``Success`` data (or an
#: awaitable of it), or raises :class:`idemq.DefiniteError`,
#: :class:`idemq.TransientError` or :class:`idemq.Killed`.
Handler = Callable[[dict[str, Any], Call], Union[Awaitable[Any], Any]]


def _attempt(value: Optional[str]) -> int:
    try:
        return max(int(value or "1"), 1)
    except ValueError:
        return 1


class Upstream:
    """A running upstream service (returned by :func:`serve_upstream`)."""

    def __init__(self, nc: NatsClient, subject: str, queue: str, handler: Handler) -> None:
        self._nc = nc
        self.subject = subject
        self.queue = queue
        self._handler = handler
        self._sub: Optional[Subscription] = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _start(self) -> None:
        self._sub = await self._nc.subscribe(self.subject, queue=self.queue, cb=self._on_msg)
        await self._nc.flush()

    async def _on_msg(self, msg: Msg) -> None:
        # One task per request: a slow handler does not hold up the others.
        task = asyncio.get_running_loop().create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def in_flight(self) -> int:
        """Requests being handled right now."""
        return len(self._tasks)

    async def _serve(self, msg: Msg) -> None:
        call = Call(
            idem_key=header(msg.headers, KEY_HEADER),
            attempt=_attempt(header(msg.headers, ATTEMPT_HEADER)),
            subject=msg.subject,
        )
        payload, headers, what = await self._answer(msg, call)
        logger.info(
            "idemq upstream: %s key=%s attempt=%d -> %s",
            call.subject,
            call.idem_key,
            call.attempt,
            what,
        )
        if not msg.reply:
            logger.warning("idemq upstream: request on %s has no reply subject", call.subject)
            return
        try:
            await self._nc.publish(msg.reply, payload, headers=headers)
        except nats.errors.Error as error:
            logger.warning(
                "idemq upstream: could not answer key=%s: %s", call.idem_key, type(error).__name__
            )

    async def _answer(self, msg: Msg, call: Call) -> tuple[bytes, Optional[dict[str, str]], str]:
        """The reply's payload and headers, and a word for the log (never the data)."""
        try:
            intent = json.loads(msg.data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            intent = None
        if not isinstance(intent, dict):
            return _error("400", "the request is not a JSON object")
        try:
            value = self._handler(intent, call)
            if inspect.isawaitable(value):
                value = await value
            payload = json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
        except (DefiniteError, TransientError) as error:
            return _error(error.code, error.message)
        except Killed:
            return b"", {STATUS_HEADER: "Killed"}, "Killed"
        except asyncio.CancelledError:
            raise
        except Exception as error:  # any other failure is the service's, and transient
            name = type(error).__name__
            logger.error("idemq upstream: handler raised %s for key=%s", name, call.idem_key)
            return _error("500", f"unexpected {name} in the upstream handler")
        return payload, None, "Success"

    async def stop(self, grace: float = 10.0) -> None:
        """Stops taking requests, waits up to ``grace`` seconds for those in
        flight to be answered, then cancels what still runs (the worker sees
        no answer for those and times out or retries)."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                # nats-py leaves drain() unannotated.
                drain = cast(Callable[[], Awaitable[None]], sub.drain)
                await asyncio.wait_for(drain(), grace)
            except (nats.errors.Error, asyncio.TimeoutError):
                logger.debug("idemq upstream: drain failed (connection closed)")
        pending = set(self._tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=grace)
        try:
            await self._nc.flush()
        except nats.errors.Error:
            logger.debug("idemq upstream: flush failed (connection closed)")


def _error(code: str, message: str) -> tuple[bytes, dict[str, str], str]:
    return b"", {ERROR_CODE_HEADER: code, ERROR_HEADER: message}, f"Error {code}"


async def serve_upstream(
    nc: NatsClient, subject: str, handler: Handler, *, queue: str = "idemq-upstream"
) -> Upstream:
    """Serves ``subject`` (e.g. ``exec.charge`` or ``exec.*``) for
    ``idemq serve --forward``, in queue group ``queue``.

    Each request runs ``handler(intent, call)`` (a plain or an async
    function) with the intent as a dict and a :class:`idemq.Call`. A returned
    value is the ``Success`` data (JSON). Raising
    :class:`idemq.DefiniteError` answers a stored error (code below 500),
    :class:`idemq.TransientError` a transient one (500 or more: not stored,
    the next copy runs again), :class:`idemq.Killed` the ``Killed`` status.
    Any other exception is a transient ``500`` naming the exception's type
    (never its message or traceback). Requests are handled concurrently.

    Returns the running :class:`Upstream`; ``await upstream.stop()`` drains it.
    """
    upstream = Upstream(nc, subject, queue, handler)
    await upstream._start()
    logger.info("idemq upstream: serving %s (queue %s)", subject, queue)
    return upstream
