"""idemq: the Python client of the idemq worker, following docs/contract.md v1.2.

Agents submit intents that run at most once per idempotency key::

    client = idemq.Client(nc)
    result = await client.submit("intents.charge", {"intent_id": "c-1", ...})

Upstream services answer the worker's ``--forward`` requests::

    upstream = await idemq.serve_upstream(nc, "exec.charge", handler)
"""

from .client import RETRY_LATER_CODES, Client
from .errors import (
    DefiniteError,
    IdemqError,
    InvalidIntent,
    KeyReused,
    Killed,
    Refused,
    TransientError,
    Unavailable,
)
from .intent import Intent, IntentLike
from .keys import derive_key, intent_key, key_from_intent, parse_key
from .result import Result
from .upstream import Call, Handler, Upstream, serve_upstream

#: The version of the idemq wire contract (docs/contract.md) this package follows.
PROTOCOL_VERSION = "1.2"
__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "RETRY_LATER_CODES",
    "Call",
    "Client",
    "DefiniteError",
    "Handler",
    "IdemqError",
    "Intent",
    "IntentLike",
    "InvalidIntent",
    "KeyReused",
    "Killed",
    "Refused",
    "Result",
    "TransientError",
    "Unavailable",
    "Upstream",
    "__version__",
    "derive_key",
    "intent_key",
    "key_from_intent",
    "parse_key",
    "serve_upstream",
]
