"""The answer to an intent (docs/contract.md v1.2, section 3)."""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["Result"]


def header(headers: Optional[Mapping[str, str]], name: str) -> Optional[str]:
    """A header's value, its name matched without regard to case."""
    if not headers:
        return None
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


@dataclass(frozen=True)
class Result:
    """The worker's answer to one intent.

    ``status`` is ``"Success"``, ``"Error"``, ``"Timeout"`` or ``"Killed"``.
    ``data`` is the handler's value for ``Success`` (``None`` otherwise);
    ``error_code``/``error_message`` are set for ``Error``. ``replayed`` is
    false only for the copy whose own execution produced the outcome.
    ``stored`` is false when the outcome was not stored (``stored_at`` is
    null, or the reply said ``Idem-Stored: false``): a worker refusal, a
    transient error, or an executed outcome whose write failed.
    ``attempts`` is how many times this client sent the intent for it.
    ``retry_after_ms`` is the worker's hint on retry-later answers.

    A stored ``Error`` is a ``Result`` like any other outcome, not an
    exception: the handler ran and that is its answer.
    """

    status: str
    data: Any
    error_code: Optional[str]
    error_message: Optional[str]
    replayed: bool
    stored: bool
    idem_key: Optional[str]
    intent_id: Optional[str]
    stored_at: Optional[str]
    expires_at: Optional[str]
    attempts: int
    retry_after_ms: Optional[int] = None

    @property
    def ok(self) -> bool:
        """True for a ``Success`` outcome."""
        return self.status == "Success"

    @property
    def outcome(self) -> dict[str, Any]:
        """The outcome in the contract's tagged form, as in the reply's ``result``:
        ``{"status": "Success", "data": ...}``, ``{"status": "Error", "data":
        {"code": ..., "message": ...}}``, ``{"status": "Timeout"}``, ``{"status": "Killed"}``.
        """
        if self.status == "Success":
            return {"status": "Success", "data": self.data}
        if self.status == "Error":
            data: dict[str, Any] = {"code": self.error_code, "message": self.error_message}
            if self.retry_after_ms is not None:
                data["retry_after_ms"] = self.retry_after_ms
            return {"status": "Error", "data": data}
        return {"status": self.status}

    @classmethod
    def from_reply(
        cls, payload: bytes, headers: Optional[Mapping[str, str]], attempts: int
    ) -> "Result":
        """Reads a reply as the worker publishes it. Raises ``ValueError``
        when the payload is not a reply of the contract."""
        try:
            body = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"the reply is not JSON ({error.__class__.__name__})") from None
        if not isinstance(body, dict):
            raise ValueError("the reply is not a JSON object")
        outcome = body.get("result")
        if not isinstance(outcome, dict) or not isinstance(outcome.get("status"), str):
            raise ValueError("the reply has no result.status")
        status: str = outcome["status"]
        data = outcome.get("data")
        error_code = error_message = None
        retry_after_ms = None
        if status == "Error":
            details = data if isinstance(data, dict) else {}
            code = details.get("code")
            error_code = code if isinstance(code, str) else header(headers, "Idem-Error-Code")
            message = details.get("message")
            error_message = message if isinstance(message, str) else ""
            hint = details.get("retry_after_ms")
            if isinstance(hint, int) and not isinstance(hint, bool) and hint >= 0:
                retry_after_ms = hint
            data = None
        stored_at = _opt_str(body.get("stored_at"))
        replayed = body.get("replayed")
        if not isinstance(replayed, bool):
            replayed = header(headers, "Idem-Replayed") == "true"
        stored_header = header(headers, "Idem-Stored")
        stored = stored_at is not None and (stored_header or "").lower() != "false"
        return cls(
            status=status,
            data=data,
            error_code=error_code,
            error_message=error_message,
            replayed=replayed,
            stored=stored,
            idem_key=_opt_str(body.get("idem_key")) or header(headers, "Idem-Key"),
            intent_id=_opt_str(body.get("intent_id")),
            stored_at=stored_at,
            expires_at=_opt_str(body.get("expires_at")),
            attempts=attempts,
            retry_after_ms=retry_after_ms,
        )


def _opt_str(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None
