"""Keys: every vector of tests/data/key-vectors.json, byte for byte."""

import json
from pathlib import Path
from typing import Any

import pytest

import idemq

VECTORS_PATH = Path(__file__).resolve().parents[3] / "tests" / "data" / "key-vectors.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))


def test_the_vector_file_has_every_kind_of_vector() -> None:
    assert len(VECTORS["generate"]) >= 8
    assert any(v.get("separator_collision") for v in VECTORS["generate"])
    assert VECTORS["from_intent_metadata"]
    assert VECTORS["parse_valid"]
    assert VECTORS["parse_invalid"]


@pytest.mark.parametrize("vector", VECTORS["generate"], ids=lambda v: v["key"])
def test_derive_key_reproduces_every_generate_vector(vector: dict[str, Any]) -> None:
    key = idemq.derive_key(vector["run_id"], vector["episode"], vector["step_idx"])
    assert key == vector["key"]
    # The same key from an intent's body with a run_id.
    body = {"intent_id": "i", "actor": "a", **vector}
    assert idemq.intent_key(body) == vector["key"]


def test_the_separator_collision_gives_one_key_for_two_inputs() -> None:
    colliding = [v for v in VECTORS["generate"] if v.get("separator_collision")]
    assert len(colliding) == 2
    keys = {idemq.derive_key(v["run_id"], v["episode"], v["step_idx"]) for v in colliding}
    assert keys == {colliding[0]["key"]}


@pytest.mark.parametrize("vector", VECTORS["from_intent_metadata"], ids=lambda v: v["key"])
def test_key_from_intent_reproduces_every_metadata_vector(vector: dict[str, Any]) -> None:
    args = (vector["intent_id"], vector["actor"], vector["episode"])
    assert idemq.key_from_intent(*args, vector["step_idx"]) == vector["key"]
    if vector["step_idx"] is None:
        assert idemq.key_from_intent(*args) == vector["key"]
    intent = idemq.Intent(*args, step_idx=vector["step_idx"])
    assert intent.key() == vector["key"]
    assert idemq.intent_key(intent.to_dict()) == vector["key"]


@pytest.mark.parametrize("key", VECTORS["parse_valid"])
def test_parse_key_accepts_and_normalises_valid_keys(key: str) -> None:
    assert idemq.parse_key(key) == key.lower()


@pytest.mark.parametrize("key", VECTORS["parse_invalid"])
def test_parse_key_refuses_invalid_keys_as_invalid_key(key: str) -> None:
    with pytest.raises(idemq.InvalidIntent) as refused:
        idemq.parse_key(key)
    assert refused.value.code == "INVALID_KEY"


@pytest.mark.parametrize("step_idx", [-1, 4_294_967_296, True])
def test_step_idx_outside_u32_is_refused(step_idx: int) -> None:
    with pytest.raises((ValueError, TypeError)):
        idemq.derive_key("r", "e", step_idx)
    with pytest.raises(idemq.InvalidIntent):
        idemq.intent_key({"intent_id": "i", "actor": "a", "episode": "e", "step_idx": step_idx})


def test_intent_key_treats_null_fields_as_absent_like_the_worker() -> None:
    base = {"intent_id": "i", "actor": "a", "episode": "e"}
    expected = idemq.key_from_intent("i", "a", "e")
    assert idemq.intent_key({**base, "run_id": None, "step_idx": None}) == expected
    with pytest.raises(idemq.InvalidIntent) as refused:
        idemq.intent_key({"intent_id": "i", "episode": "e"})
    assert refused.value.code == "INVALID_INTENT"
