"""The exceptions of the idemq client and of upstream handlers."""

from typing import Optional, Union

from .result import Result

__all__ = [
    "DefiniteError",
    "IdemqError",
    "InvalidIntent",
    "KeyReused",
    "Killed",
    "Refused",
    "TransientError",
    "Unavailable",
]


class IdemqError(Exception):
    """Base class of the errors the idemq client raises."""


class Refused(IdemqError):
    """The worker refused the intent: nothing ran, nothing was stored, and
    resending the same intent would be refused again. Never retried.

    ``code`` is the worker's error code, ``message`` its text and ``result``
    the refusal as the worker answered it (``None`` when the client refused
    the intent itself before sending it).
    """

    def __init__(self, code: str, message: str, result: Optional[Result] = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.result = result


class KeyReused(Refused):
    """``KEY_REUSED``: the key was already used by an intent with another
    fingerprint (other params, capability or key inputs). Use a new key."""

    def __init__(self, message: str, result: Optional[Result] = None) -> None:
        super().__init__("KEY_REUSED", message, result)


class InvalidIntent(Refused):
    """``INVALID_INTENT``, ``INVALID_KEY`` or ``PAYLOAD_TOO_LARGE`` (in ``.code``):
    the intent itself must be fixed."""


class Unavailable(IdemqError):
    """The retries or the deadline ran out before a final answer.

    ``attempts`` is how many times the intent was sent, ``last`` the last
    answer (a retry-later ``Result`` such as ``IN_PROGRESS``), or ``None``
    when the last try got no answer (timeout, no worker listening);
    ``reason`` says which in words. Resending the same intent later is safe.
    """

    def __init__(self, reason: str, attempts: int, last: Optional[Result] = None) -> None:
        super().__init__(f"{reason} (after {attempts} attempt{'s' if attempts != 1 else ''})")
        self.reason = reason
        self.attempts = attempts
        self.last = last


def _code_text(code: Union[str, int]) -> str:
    if isinstance(code, bool) or not isinstance(code, (str, int)):
        raise TypeError(f"an error code is a str or an int, not {type(code).__name__}")
    text = str(code)
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"an error code is a non-empty string without whitespace: {text!r}")
    return text


def is_transient_code(code: str) -> bool:
    """Whether the worker treats an error code as transient: a number of 500
    or more (of any length), as ``src/handler/forward.rs`` reads it."""
    digits = code.strip()
    if not digits or not (digits.isascii() and digits.isdigit()):
        return False
    significant = digits.lstrip("0")
    return len(significant) > 3 or int(significant or "0") >= 500


class DefiniteError(Exception):
    """Raised by an upstream handler: a definite error, stored by the worker
    and replayed to every copy of the intent.

    ``code`` is a string as on the wire (``"422"``, ``"BAD_PARAMS"``); an
    ``int`` is sent as its decimal string. A numeric code of 500 or more
    would be transient, so it is refused here (use :class:`TransientError`).
    """

    def __init__(self, code: Union[str, int], message: str = "") -> None:
        text = _code_text(code)
        if is_transient_code(text):
            raise ValueError(f"code {text} is transient (500 or more): raise TransientError")
        super().__init__(f"{text}: {message}")
        self.code = text
        self.message = message


class TransientError(Exception):
    """Raised by an upstream handler: a transient error (numeric code 500 or
    more). The worker does not store it, releases the key, and the next copy
    of the intent executes again."""

    def __init__(self, code: Union[str, int] = "503", message: str = "") -> None:
        text = _code_text(code)
        if not is_transient_code(text):
            raise ValueError(f"code {text} is not transient (a number of 500 or more)")
        super().__init__(f"{text}: {message}")
        self.code = text
        self.message = message


class Killed(Exception):
    """Raised by an upstream handler: the execution was killed. The worker
    stores the ``Killed`` outcome (``Idem-Status: Killed``)."""
