"""The intent envelope (docs/contract.md v1.2, section 2)."""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

from .errors import InvalidIntent
from .keys import intent_key

__all__ = ["Intent", "IntentLike", "encode_intent"]


@dataclass(frozen=True)
class Intent:
    """An intent in the contract's envelope.

    ``intent_id``, ``actor`` and ``episode`` are required; the rest are
    optional and left out of the JSON when ``None``. The key is
    ``derive_key(run_id, episode, step_idx)`` when ``run_id`` is set, else
    ``key_from_intent(intent_id, actor, episode, step_idx)``.
    """

    intent_id: str
    actor: str
    episode: str
    step_idx: Optional[int] = None
    run_id: Optional[str] = None
    capability: Optional[str] = None
    params: Any = None
    ttl_secs: Optional[int] = None
    reply_to: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        """The envelope as a JSON object, without the fields that are ``None``."""
        fields = {
            "intent_id": self.intent_id,
            "actor": self.actor,
            "episode": self.episode,
            "step_idx": self.step_idx,
            "run_id": self.run_id,
            "capability": self.capability,
            "params": self.params,
            "ttl_secs": self.ttl_secs,
            "reply_to": self.reply_to,
        }
        return {name: value for name, value in fields.items() if value is not None}

    def key(self) -> str:
        """The idempotency key the worker derives for this intent."""
        return intent_key(self.to_dict())


#: What ``submit`` and ``publish`` accept: an :class:`Intent` or a dict
#: in the contract's envelope.
IntentLike = Union[Intent, Mapping[str, Any]]


def as_mapping(intent: IntentLike) -> Mapping[str, Any]:
    """The intent as a mapping."""
    if isinstance(intent, Intent):
        return intent.to_dict()
    if isinstance(intent, Mapping):
        return intent
    raise TypeError(f"an intent is an idemq.Intent or a dict, not {type(intent).__name__}")


def encode_intent(intent: IntentLike) -> bytes:
    """The intent's payload: compact UTF-8 JSON. Sent unchanged on every try.

    Raises :class:`idemq.InvalidIntent` (``INVALID_INTENT``) when it cannot
    be JSON (a value that is not serialisable, NaN or infinity).
    """
    try:
        text = json.dumps(
            dict(as_mapping(intent)), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )
    except (TypeError, ValueError) as error:
        raise InvalidIntent("INVALID_INTENT", f"the intent is not JSON: {error}") from None
    return text.encode("utf-8")
