"""Idempotency keys, byte-identical to the worker's (docs/contract.md v1.2, section 1)."""

import hashlib
import re
from collections.abc import Mapping
from typing import Any, Optional

from .errors import InvalidIntent

__all__ = ["derive_key", "intent_key", "key_from_intent", "parse_key"]

#: The largest ``step_idx`` (the contract's ``u32``).
MAX_STEP_IDX = 4_294_967_295

_KEY_RE = re.compile(r"idem_[0-9a-fA-F]{16}")


def _check_step(step_idx: int) -> int:
    if isinstance(step_idx, bool) or not isinstance(step_idx, int):
        raise TypeError(f"step_idx must be an int, not {type(step_idx).__name__}")
    if not 0 <= step_idx <= MAX_STEP_IDX:
        raise ValueError(f"step_idx must be from 0 to {MAX_STEP_IDX}, not {step_idx}")
    return step_idx


def derive_key(run_id: str, episode: str, step_idx: int) -> str:
    """The contract's ``generate(run_id, episode, step_idx)``.

    ``"idem_"`` followed by the first 16 lowercase hex digits of
    ``SHA-256(run_id + "::" + episode + "::" + decimal(step_idx))`` over UTF-8.
    Like ``idemq key``, it applies no length limits to the strings.
    """
    text = f"{run_id}::{episode}::{_check_step(step_idx)}"
    return "idem_" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def key_from_intent(
    intent_id: str, actor: str, episode: str, step_idx: Optional[int] = None
) -> str:
    """The contract's ``from_intent_metadata``: ``derive_key(intent_id + ":" + actor,
    episode, step_idx or 0)``."""
    return derive_key(f"{intent_id}:{actor}", episode, 0 if step_idx is None else step_idx)


def parse_key(key: str) -> str:
    """Checks an ``Idempotency-Key`` and returns it normalised to lower case.

    A key is ``idem_`` and exactly 16 ASCII hex digits; upper-case hex is
    accepted. Anything else raises :class:`idemq.InvalidIntent` with code
    ``INVALID_KEY``, as the worker would answer.
    """
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise InvalidIntent("INVALID_KEY", "a key is idem_ followed by 16 hex digits")
    return "idem_" + key[5:].lower()


def _string(intent: Mapping[str, Any], field: str) -> Optional[str]:
    value = intent.get(field)
    if value is not None and not isinstance(value, str):
        raise InvalidIntent("INVALID_INTENT", f"{field} must be a string")
    return value


def _required(intent: Mapping[str, Any], field: str) -> str:
    value = _string(intent, field)
    if value is None:
        raise InvalidIntent("INVALID_INTENT", f"missing field {field}")
    return value


def intent_key(intent: Mapping[str, Any]) -> str:
    """The key the worker derives from an intent's body (no ``Idempotency-Key``).

    ``derive_key(run_id, ...)`` when ``run_id`` is present, else
    ``key_from_intent(...)``; a ``null`` field counts as absent, as it does
    for the worker. Raises :class:`idemq.InvalidIntent` when the fields the
    key needs are missing or of the wrong type.
    """
    intent_id = _required(intent, "intent_id")
    actor = _required(intent, "actor")
    episode = _required(intent, "episode")
    run_id = _string(intent, "run_id")
    step = intent.get("step_idx")
    if step is None:
        step = 0
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP_IDX:
        raise InvalidIntent(
            "INVALID_INTENT", f"step_idx must be an integer from 0 to {MAX_STEP_IDX}"
        )
    if run_id is not None:
        return derive_key(run_id, episode, step)
    return key_from_intent(intent_id, actor, episode, step)
