"""Reading replies and building errors, without a worker."""

import json
from typing import Any, Optional

import pytest

import idemq
from idemq.client import is_retry_later
from idemq.intent import encode_intent


def reply(
    result: dict[str, Any], stored_at: Optional[str] = "2026-12-06T00:00:00Z", **extra: Any
) -> bytes:
    body = {
        "idem_key": "idem_f52983c9c6e4fb21",
        "intent_id": "i-1",
        "replayed": False,
        "result": result,
        "stored_at": stored_at,
        "expires_at": stored_at,
        **extra,
    }
    return json.dumps(body).encode()


def test_a_stored_success_is_read_whole() -> None:
    result = idemq.Result.from_reply(
        reply({"status": "Success", "data": {"x": 1}}), {"Idem-Replayed": "false"}, 2
    )
    assert result == idemq.Result(
        status="Success",
        data={"x": 1},
        error_code=None,
        error_message=None,
        replayed=False,
        stored=True,
        idem_key="idem_f52983c9c6e4fb21",
        intent_id="i-1",
        stored_at="2026-12-06T00:00:00Z",
        expires_at="2026-12-06T00:00:00Z",
        attempts=2,
    )
    assert result.outcome == {"status": "Success", "data": {"x": 1}}


def test_idem_stored_false_marks_an_executed_outcome_unstored() -> None:
    # v1.2: an outcome answered without being stored has stored_at null and the header.
    unstored = idemq.Result.from_reply(
        reply({"status": "Success", "data": 1}, stored_at=None), {"Idem-Stored": "false"}, 1
    )
    assert unstored.ok
    assert unstored.stored is False
    assert not is_retry_later(unstored)  # it ran: an answer, not a retry
    # The header alone is enough, whatever the body says.
    header_only = idemq.Result.from_reply(
        reply({"status": "Success", "data": 1}), {"idem-stored": "false"}, 1
    )
    assert header_only.stored is False


def test_errors_and_retry_hints_are_read() -> None:
    busy = idemq.Result.from_reply(
        reply(
            {
                "status": "Error",
                "data": {"code": "OVERLOADED", "message": "m", "retry_after_ms": 250},
            },
            stored_at=None,
        ),
        None,
        1,
    )
    assert (busy.error_code, busy.error_message, busy.retry_after_ms) == ("OVERLOADED", "m", 250)
    assert busy.data is None
    assert is_retry_later(busy)
    assert busy.outcome["data"]["retry_after_ms"] == 250


@pytest.mark.parametrize(
    ("code", "stored", "retry"),
    [
        ("IN_PROGRESS", False, True),
        ("OVERLOADED", False, True),
        ("NO_HANDLER", False, True),
        ("STORE_UNAVAILABLE", False, True),
        ("500", False, True),
        ("503", False, True),
        ("5000000000", False, True),
        ("422", False, False),
        ("BAD_PARAMS", False, False),
        ("503", True, False),  # stored: an answer, whatever its code
        ("UPSTREAM_BAD_REPLY", True, False),
    ],
)
def test_which_answers_are_retried(code: str, stored: bool, retry: bool) -> None:
    result = idemq.Result.from_reply(
        reply(
            {"status": "Error", "data": {"code": code, "message": ""}},
            stored_at="2026-12-06T00:00:00Z" if stored else None,
        ),
        None,
        1,
    )
    assert is_retry_later(result) is retry


def test_a_reply_that_is_not_the_contracts_is_refused() -> None:
    for payload in (b"", b"not json", b"[]", b'{"result": {}}', b"\xff"):
        with pytest.raises(ValueError, match="reply"):
            idemq.Result.from_reply(payload, None, 1)


def test_upstream_error_codes_travel_as_strings() -> None:
    assert idemq.DefiniteError(422, "bad").code == "422"
    assert idemq.DefiniteError("BAD_PARAMS", "bad").code == "BAD_PARAMS"
    assert idemq.TransientError(503, "later").code == "503"
    assert idemq.TransientError().code == "503"
    with pytest.raises(ValueError, match="transient"):
        idemq.DefiniteError(500, "a 500 is transient")
    with pytest.raises(ValueError, match="not transient"):
        idemq.TransientError(404, "a 404 is definite")
    with pytest.raises(TypeError):
        idemq.DefiniteError(True, "a bool is no code")
    with pytest.raises(ValueError, match="whitespace"):
        idemq.DefiniteError("BAD CODE", "spaces do not fit a header")


def test_the_intent_bytes_are_compact_utf8_json_and_non_json_is_refused() -> None:
    intent = idemq.Intent("i", "a", "é", step_idx=2, params={"n": 1})
    assert (
        encode_intent(intent)
        == '{"intent_id":"i","actor":"a","episode":"é","step_idx":2,"params":{"n":1}}'.encode()
    )
    assert encode_intent(intent.to_dict()) == encode_intent(intent)
    with pytest.raises(idemq.InvalidIntent) as refused:
        encode_intent({"intent_id": "i", "actor": "a", "episode": "e", "params": float("nan")})
    assert refused.value.code == "INVALID_INTENT"


def test_client_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="timeout"):
        idemq.Client(None, timeout=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retries"):
        idemq.Client(None, retries=-1)  # type: ignore[arg-type]


def test_the_package_names_its_protocol_version() -> None:
    assert idemq.PROTOCOL_VERSION == "1.2"
