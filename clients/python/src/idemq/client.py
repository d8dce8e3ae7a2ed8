"""Agents' side: submit intents to idemq workers (docs/contract.md v1.2, sections 2, 3 and 6)."""

import asyncio
import hashlib
import logging
import random
from typing import Optional

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from .errors import InvalidIntent, KeyReused, Unavailable, is_transient_code
from .intent import IntentLike, as_mapping, encode_intent
from .keys import intent_key, parse_key
from .result import Result, header

__all__ = ["RETRY_LATER_CODES", "Client"]

logger = logging.getLogger("idemq")

#: The worker's codes that mean "nothing ran (or nothing was kept), retry
#: later with the same key"; an unstored numeric code of 500 or more
#: (a transient handler error) means the same.
RETRY_LATER_CODES = frozenset({"IN_PROGRESS", "OVERLOADED", "NO_HANDLER", "STORE_UNAVAILABLE"})
#: Refusals about the intent itself, raised as :class:`idemq.InvalidIntent`.
INVALID_CODES = frozenset({"INVALID_INTENT", "INVALID_KEY", "PAYLOAD_TOO_LARGE"})


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int of at least 0, not {value!r}")
    return value


def _raise_refusal(result: Result) -> None:
    """Raises the typed exception for a worker refusal that must not be retried."""
    if result.status != "Error" or result.stored_at is not None:
        return
    code = result.error_code or ""
    message = result.error_message or ""
    if code == "KEY_REUSED":
        raise KeyReused(message, result)
    if code in INVALID_CODES:
        raise InvalidIntent(code, message, result)


def _derived_key(intent: IntentLike) -> Optional[str]:
    """The key the worker will derive, for logs; ``None`` when it cannot
    (the worker then refuses the intent and says why)."""
    try:
        return intent_key(as_mapping(intent))
    except InvalidIntent:
        return None


def _executed_unstored(msg: Msg) -> bool:
    """v1.2: ``Idem-Stored: false`` marks an outcome that was executed but
    could not be stored: an answer, never a refusal or a retry-later."""
    return (header(msg.headers, "Idem-Stored") or "").strip().lower() == "false"


def is_retry_later(result: Result) -> bool:
    """Whether an answer asks for the same intent again later: an unstored
    ``Error`` with a retry-later code or a transient code (500 or more)."""
    if result.status != "Error" or result.stored_at is not None:
        return False
    code = result.error_code or ""
    return code in RETRY_LATER_CODES or is_transient_code(code)


class Client:
    """Submits intents to idemq workers over a nats-py connection ``nc``.

    ``timeout`` bounds each try (seconds) and ``retries`` is how many times
    an intent may be resent after its first try. A call gives up after
    ``deadline`` seconds in all (default ``timeout * (retries + 1)``).
    Resends back off exponentially from ``backoff`` up to ``backoff_cap``
    seconds, with jitter, unless the worker says when to retry
    (``retry_after_ms``), which is honoured.

    Every try of one call sends the very same bytes (and key), so however
    often an intent is resent, the worker executes it at most once.
    """

    def __init__(
        self,
        nc: NatsClient,
        *,
        timeout: float = 5.0,
        retries: int = 5,
        deadline: Optional[float] = None,
        backoff: float = 0.1,
        backoff_cap: float = 2.0,
    ) -> None:
        self._nc = nc
        self._timeout = _positive("timeout", timeout)
        self._retries = _count("retries", retries)
        self._deadline = None if deadline is None else _positive("deadline", deadline)
        self._backoff = _positive("backoff", backoff)
        self._backoff_cap = max(_positive("backoff_cap", backoff_cap), self._backoff)

    def _budget(
        self, timeout: Optional[float], retries: Optional[int], deadline: Optional[float]
    ) -> tuple[float, int, float]:
        per_try = self._timeout if timeout is None else _positive("timeout", timeout)
        tries = self._retries if retries is None else _count("retries", retries)
        if deadline is not None:
            total = _positive("deadline", deadline)
        elif self._deadline is not None:
            total = self._deadline
        else:
            total = per_try * (tries + 1)
        return per_try, tries, total

    def _pause(self, delay: float, result: Optional[Result]) -> float:
        """How long to wait before the next try: the worker's hint when it
        gave one (plus up to 10% jitter), else ``delay`` with equal jitter."""
        if result is not None and result.retry_after_ms is not None:
            hint = result.retry_after_ms / 1000
            return hint + random.uniform(0, hint / 10)
        return delay / 2 + random.uniform(0, delay / 2)

    async def submit(
        self,
        subject: str,
        intent: IntentLike,
        *,
        key: Optional[str] = None,
        timeout: Optional[float] = None,
        retries: Optional[int] = None,
        deadline: Optional[float] = None,
    ) -> Result:
        """Sends an intent as a core NATS request and returns the final answer.

        ``intent`` is a dict in the contract's envelope or an
        :class:`idemq.Intent`; ``key`` (optional) is sent as the
        ``Idempotency-Key`` header instead of the key derived from the body.
        After a timeout, no responders, or a retry-later answer
        (``IN_PROGRESS``, ``OVERLOADED``, ``NO_HANDLER``,
        ``STORE_UNAVAILABLE``, a transient error of 500 or more) the same
        bytes are sent again, at most ``retries`` times within the deadline.

        Returns the :class:`idemq.Result` (a stored ``Error`` included).
        Raises :class:`idemq.KeyReused` or :class:`idemq.InvalidIntent` on a
        refusal (never retried) and :class:`idemq.Unavailable` when the
        retries or the deadline run out.
        """
        payload = encode_intent(intent)
        headers = {"Idempotency-Key": parse_key(key)} if key is not None else None
        log_key = headers["Idempotency-Key"] if headers else _derived_key(intent)
        per_try, tries, total = self._budget(timeout, retries, deadline)
        loop = asyncio.get_running_loop()
        end = loop.time() + total
        delay = self._backoff
        attempt = 0
        while True:
            attempt += 1
            remaining = end - loop.time()
            last: Optional[Result] = None
            try:
                msg = await self._nc.request(
                    subject, payload, timeout=min(per_try, remaining), headers=headers
                )
            except nats.errors.NoRespondersError:
                reason = f"no worker listening on {subject}"
            except nats.errors.TimeoutError:
                reason = f"no reply on {subject} within {min(per_try, remaining):.3g}s"
            except nats.errors.MaxPayloadError:
                raise InvalidIntent(
                    "PAYLOAD_TOO_LARGE", "the intent is larger than the server's max payload"
                ) from None
            except nats.errors.ConnectionClosedError:
                raise Unavailable("the NATS connection is closed", attempt) from None
            except nats.errors.Error as error:
                reason = f"request failed: {type(error).__name__}"
            else:
                result = self._read(msg, attempt)
                executed = _executed_unstored(msg)
                if not executed:
                    _raise_refusal(result)
                if executed or not is_retry_later(result):
                    logger.debug(
                        "idemq: %s answered %s (key %s, replayed %s, try %d)",
                        subject,
                        result.status,
                        result.idem_key,
                        result.replayed,
                        attempt,
                    )
                    return result
                last = result
                reason = f"retry-later answer {result.error_code}"
            if attempt > tries:
                raise Unavailable(f"retries ran out: {reason}", attempt, last)
            pause = self._pause(delay, last)
            if loop.time() + pause >= end:
                raise Unavailable(f"deadline of {total:.3g}s ran out: {reason}", attempt, last)
            logger.info(
                "idemq: %s (key %s); resending the same intent in %.2fs (try %d of %d)",
                reason,
                log_key,
                pause,
                attempt + 1,
                tries + 1,
            )
            await asyncio.sleep(pause)
            delay = min(delay * 2, self._backoff_cap)

    @staticmethod
    def _read(msg: Msg, attempt: int) -> Result:
        try:
            return Result.from_reply(msg.data, msg.headers, attempt)
        except ValueError as error:
            raise Unavailable(f"not an idemq reply: {error}", attempt) from None

    async def publish(
        self,
        subject: str,
        intent: IntentLike,
        *,
        reply_to: Optional[str] = None,
        key: Optional[str] = None,
    ) -> str:
        """Durable mode: publishes an intent into the worker's intents stream
        and returns its key once the stream has acknowledged it.

        It is a JetStream publish (the PubAck is awaited, retried after a
        timeout within the client's retries and deadline) whose
        ``Nats-Msg-Id`` is made of the key and a fingerprint of the bytes
        and reply target, so a retried publish is stored once. ``reply_to``
        travels as the ``Idem-Reply-To`` header: where the worker publishes
        the one answer. Raises :class:`idemq.InvalidIntent` when the key
        cannot be derived, :class:`idemq.Unavailable` when no stream
        acknowledged the message in time.
        """
        body = as_mapping(intent)
        idem_key = parse_key(key) if key is not None else intent_key(body)
        payload = encode_intent(body)
        await self._js_publish(subject, payload, idem_key, key is not None, reply_to)
        return idem_key

    async def _js_publish(
        self,
        subject: str,
        payload: bytes,
        idem_key: str,
        key_header: bool,
        reply_to: Optional[str],
    ) -> None:
        digest = hashlib.sha256()
        for part in (payload, (reply_to or "").encode(), idem_key.encode() if key_header else b""):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        headers = {"Nats-Msg-Id": f"{idem_key}-{digest.hexdigest()[:16]}"}
        if key_header:
            headers["Idempotency-Key"] = idem_key
        if reply_to is not None:
            headers["Idem-Reply-To"] = reply_to
        per_try, tries, total = self._budget(None, None, None)
        js = self._nc.jetstream()
        loop = asyncio.get_running_loop()
        end = loop.time() + total
        delay = self._backoff
        attempt = 0
        while True:
            attempt += 1
            remaining = end - loop.time()
            try:
                ack = await js.publish(
                    subject, payload, timeout=min(per_try, remaining), headers=dict(headers)
                )
            except nats.errors.MaxPayloadError:
                raise InvalidIntent(
                    "PAYLOAD_TOO_LARGE", "the intent is larger than the server's max payload"
                ) from None
            except nats.errors.ConnectionClosedError:
                raise Unavailable("the NATS connection is closed", attempt) from None
            except nats.js.errors.APIError as error:
                if error.code is not None and error.code < 500:
                    raise Unavailable(
                        f"the stream refused the intent: {error.description}", attempt
                    ) from None
                reason = f"JetStream unavailable ({error.description})"
            except nats.js.errors.NoStreamResponseError:
                reason = f"no stream captures {subject}"
            except nats.errors.TimeoutError:
                reason = f"no PubAck within {min(per_try, remaining):.3g}s"
            except nats.errors.Error as error:
                reason = f"publish failed: {type(error).__name__}"
            else:
                logger.debug(
                    "idemq: published %s to stream %s (key %s, duplicate %s)",
                    subject,
                    ack.stream,
                    idem_key,
                    ack.duplicate,
                )
                return
            if attempt > tries:
                raise Unavailable(f"retries ran out: {reason}", attempt)
            pause = self._pause(delay, None)
            if loop.time() + pause >= end:
                raise Unavailable(f"deadline of {total:.3g}s ran out: {reason}", attempt)
            logger.info("idemq: %s (key %s); publishing again in %.2fs", reason, idem_key, pause)
            await asyncio.sleep(pause)
            delay = min(delay * 2, self._backoff_cap)

    async def submit_durable(
        self,
        subject: str,
        intent: IntentLike,
        *,
        timeout: Optional[float] = None,
        key: Optional[str] = None,
    ) -> Result:
        """Durable mode: publishes an intent (see :meth:`publish`) with a private
        reply subject under this connection's inbox prefix, and waits up to
        ``timeout`` seconds (default: the client's deadline) for its one answer.

        The worker answers a JetStream intent once, with its final outcome or
        refusal, after as many redeliveries as it takes. Returns the
        :class:`idemq.Result`; raises :class:`idemq.KeyReused` or
        :class:`idemq.InvalidIntent` on a refusal and
        :class:`idemq.Unavailable` when no answer came in time.
        """
        body = as_mapping(intent)
        idem_key = parse_key(key) if key is not None else intent_key(body)
        payload = encode_intent(body)
        total = self._budget(None, None, None)[2]
        wait = total if timeout is None else _positive("timeout", timeout)
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        try:
            await self._js_publish(subject, payload, idem_key, key is not None, inbox)
            last: Optional[Result] = None
            while True:
                remaining = end - loop.time()
                if remaining <= 0:
                    break
                try:
                    msg = await sub.next_msg(timeout=remaining)
                except nats.errors.TimeoutError:
                    break
                result = self._read(msg, 1)
                executed = _executed_unstored(msg)
                if not executed:
                    _raise_refusal(result)
                if executed or not is_retry_later(result):
                    return result
                # A JetStream worker does not answer deliveries it retries;
                # should one say "later" anyway, the redelivery answers.
                last = result
            raise Unavailable(f"no answer for {idem_key} within {wait:.3g}s", 1, last)
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                logger.debug("idemq: could not unsubscribe the reply inbox")
