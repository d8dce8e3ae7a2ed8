"""Core mode: ``Client.submit`` against real ``idemq serve`` workers.

Executions are counted by an upstream of our own behind ``--forward``, and
sends by a spy subscription beside the workers' queue group.
"""

import asyncio
import json
import subprocess
from typing import Any, Optional

import pytest
from nats.aio.client import Client as NatsClient

import idemq
from conftest import StartWorker
from harness import (
    FAST,
    Recorder,
    Spy,
    check_retry_hints,
    idemq_bin,
    received_per_worker,
    until,
    wait_ready,
)
from idemq.intent import encode_intent

FORWARD = ["--forward", "exec.{capability}"]


def charge(intent_id: str, **params: Any) -> dict[str, Any]:
    return {
        "intent_id": intent_id,
        "actor": "billing-agent",
        "episode": "ep-1",
        "step_idx": 3,
        "params": params or {"amount": 42},
    }


async def counting_upstream(
    nc: NatsClient, recorder: Recorder, delay: float = 0.0
) -> idemq.Upstream:
    """An upstream on ``exec.*`` that records each call and answers after ``delay``."""

    async def handle(intent: dict[str, Any], call: idemq.Call) -> Any:
        recorder.calls.append(call)
        await asyncio.sleep(delay)
        recorder.completed.append(call)
        return {"charged": intent["params"], "attempt": call.attempt}

    return await idemq.serve_upstream(nc, "exec.*", handle)


def same_answer(result: idemq.Result) -> str:
    """What every copy of one intent must agree on, as comparable text."""
    view = (result.outcome, result.idem_key, result.intent_id, result.stored_at, result.expires_at)
    return json.dumps(view, sort_keys=True)


async def test_a_storm_of_20_submits_over_2_workers_executes_once(
    nc: NatsClient, start_worker: StartWorker
) -> None:
    recorder = Recorder()
    upstream = await counting_upstream(nc, recorder, delay=0.3)
    for _ in range(2):
        await start_worker(*FAST, *FORWARD)
    await wait_ready(nc, workers=2)
    spy = await Spy.on(nc, "intents.>")
    client = idemq.Client(nc, timeout=5.0)
    intent = charge("storm-1")

    results = await asyncio.gather(*(client.submit("intents.charge", intent) for _ in range(20)))

    assert [r.replayed for r in results].count(False) == 1, results
    assert all(r.ok and r.stored for r in results), results
    assert len({same_answer(r) for r in results}) == 1, results
    assert results[0].data == {"charged": {"amount": 42}, "attempt": 1}
    assert results[0].idem_key == idemq.key_from_intent("storm-1", "billing-agent", "ep-1", 3)
    assert len(recorder.calls) == 1, recorder.calls
    # Every send is one the spy saw: no send was lost or doubled.
    sent = spy.matching("intents.charge", encode_intent(intent))
    assert len(sent) == sum(r.attempts for r in results) >= 20
    # Both workers took part, and between them they received every send.
    received = await received_per_worker(nc, workers=2)
    assert min(received) > 0, received
    assert sum(received) == len(sent)
    await upstream.stop()


async def test_submit_retries_while_the_worker_restarts_and_is_answered_once_it_is_back(
    nc: NatsClient, start_worker: StartWorker
) -> None:
    recorder = Recorder()
    upstream = await counting_upstream(nc, recorder)
    worker = await start_worker(*FAST, *FORWARD)
    await wait_ready(nc)
    assert await worker.stop() == 0  # SIGTERM: a clean stop
    spy = await Spy.on(nc, "intents.>")
    intent = charge("restart-1")
    payload = encode_intent(intent)
    client = idemq.Client(nc, timeout=1.0, retries=100, deadline=20.0, backoff_cap=0.5)

    submit = asyncio.create_task(client.submit("intents.charge", intent))
    # No worker: the client keeps resending the same bytes.
    await until("two sends while no worker runs", lambda: len(spy.matching("", payload)) >= 2)
    assert not submit.done()
    await start_worker(*FAST, *FORWARD)
    result = await asyncio.wait_for(submit, 20.0)

    assert result.ok, result
    assert result.replayed is False
    assert result.attempts >= 3
    assert result.attempts == len(spy.matching("intents.charge", payload))
    assert len(recorder.calls) == 1
    await upstream.stop()


async def test_key_reused_is_raised_after_one_send(
    nc: NatsClient, start_worker: StartWorker
) -> None:
    await start_worker(*FAST)
    await wait_ready(nc)
    spy = await Spy.on(nc, "intents.>")
    client = idemq.Client(nc, timeout=2.0, retries=5)
    first = await client.submit("intents.echo", charge("reuse-1", amount=1))
    assert first.ok
    reused = charge("reuse-1", amount=2)  # same key, other params

    with pytest.raises(idemq.KeyReused) as refused:
        await client.submit("intents.echo", reused)

    assert refused.value.code == "KEY_REUSED"
    assert refused.value.result is not None
    assert refused.value.result.idem_key == first.idem_key
    assert refused.value.result.attempts == 1
    assert refused.value.result.data is None  # the first intent's outcome is not revealed
    assert len(spy.matching("intents.echo", encode_intent(reused))) == 1


async def test_invalid_intents_are_raised_after_one_send(
    nc: NatsClient, start_worker: StartWorker
) -> None:
    await start_worker(*FAST, "--max-payload", "512")
    await wait_ready(nc)
    spy = await Spy.on(nc, "intents.>")
    client = idemq.Client(nc, timeout=2.0, retries=5)
    no_actor = {"intent_id": "bad-1", "episode": "ep-1", "params": {}}
    too_large = charge("big-1", blob="x" * 1024)

    with pytest.raises(idemq.InvalidIntent) as invalid:
        await client.submit("intents.echo", no_actor)
    with pytest.raises(idemq.InvalidIntent) as large:
        await client.submit("intents.echo", too_large)
    # A malformed key never leaves the client.
    with pytest.raises(idemq.InvalidIntent) as bad_key:
        await client.submit("intents.echo", charge("key-1"), key="idem_nothex")

    assert invalid.value.code == "INVALID_INTENT"
    assert large.value.code == "PAYLOAD_TOO_LARGE"
    assert bad_key.value.code == "INVALID_KEY"
    assert len(spy.matching("intents.echo", encode_intent(no_actor))) == 1
    assert len(spy.matching("intents.echo", encode_intent(too_large))) == 1
    assert len(spy.matching("intents.echo", encode_intent(charge("key-1")))) == 0


async def test_an_explicit_key_travels_as_the_idempotency_key_header(
    nc: NatsClient, start_worker: StartWorker
) -> None:
    await start_worker(*FAST)
    await wait_ready(nc)
    client = idemq.Client(nc, timeout=2.0)
    key = "idem_00000000000000AB"
    first = await client.submit("intents.echo", idemq.Intent("k-1", "a", "e"), key=key)
    second = await client.submit("intents.echo", idemq.Intent("k-2", "a", "e"), key=key)
    assert first.ok
    assert first.idem_key == "idem_00000000000000ab"  # normalised to lower case
    # With a header key the fingerprint holds the key, not intent_id: a replay.
    assert second.replayed is True
    assert same_answer(second) == same_answer(first)
    assert second.intent_id == "k-1"


async def test_in_progress_is_retried_after_retry_after_ms(
    nc: NatsClient, start_worker: StartWorker, server: Any
) -> None:
    recorder = Recorder()
    upstream = await counting_upstream(nc, recorder, delay=1.2)
    await start_worker(*FORWARD, "--lease", "3s", "--wait", "200ms", "--handler-timeout", "5s")
    await wait_ready(nc)
    spy = await Spy.on(nc, "intents.>", "_INBOX.>")
    intent = charge("slow-1")
    payload = encode_intent(intent)
    first = asyncio.create_task(idemq.Client(nc, timeout=5.0).submit("intents.charge", intent))
    await until("the upstream runs the intent", lambda: len(recorder.calls) == 1)

    other = await server.connect()  # a second agent, with its own inbox
    copy = await idemq.Client(other, timeout=5.0, retries=20).submit("intents.charge", intent)
    original = await asyncio.wait_for(first, 10.0)

    assert original.replayed is False
    assert copy.replayed is True
    assert same_answer(copy) == same_answer(original)
    assert copy.attempts >= 2  # the first try was answered IN_PROGRESS
    assert check_retry_hints(spy, payload, "IN_PROGRESS") >= 1
    assert len(recorder.calls) == 1
    await upstream.stop()


def knows_intake_bytes() -> bool:
    try:
        help_text = subprocess.run(
            [idemq_bin(), "serve", "--help"], capture_output=True, text=True, timeout=30
        ).stdout
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        return True  # let the test fail with the real reason
    return "--intake-bytes" in help_text


@pytest.mark.skipif(
    not knows_intake_bytes(),
    reason="this idemq binary has no --intake-bytes (PROTOCOL v1.2 OVERLOADED) yet",
)
async def test_overloaded_is_retried_after_retry_after_ms(
    nc: NatsClient, start_worker: StartWorker
) -> None:
    recorder = Recorder()
    upstream = await counting_upstream(nc, recorder, delay=0.2)
    await start_worker(*FAST, *FORWARD, "--concurrency", "2", "--intake-bytes", "1KiB")
    await wait_ready(nc)
    spy = await Spy.on(nc, "intents.>", "_INBOX.>")
    client = idemq.Client(nc, timeout=5.0, retries=30, deadline=30.0)
    intents = [charge(f"burst-{i}", amount=i, note="n" * 100) for i in range(10)]

    results = await asyncio.gather(*(client.submit("intents.charge", i) for i in intents))

    assert all(r.ok and not r.replayed for r in results), results
    assert sorted(c.idem_key or "" for c in recorder.calls) == sorted(
        idemq.intent_key(i) for i in intents
    )  # each intent executed once
    overloaded = [a for a in spy.answers("intents.") if a.error_code() == "OVERLOADED"]
    assert overloaded, "the burst was never answered OVERLOADED"
    checked = sum(check_retry_hints(spy, encode_intent(i), "OVERLOADED") for i in intents)
    assert checked >= 1
    await upstream.stop()


async def scripted_worker(
    nc: NatsClient, answers: list[dict[str, Any]], headers: Optional[dict[str, str]] = None
) -> Spy:
    """A stand-in worker on ``intents.scripted`` that answers each request with
    the next of ``answers`` (in the contract's reply shape, with ``headers``);
    the returned spy holds the requests it got."""
    spy = Spy()

    async def answer(msg: Any) -> None:
        await spy._on(msg)
        body = answers[min(len(spy.seen), len(answers)) - 1]
        await nc.publish(msg.reply, json.dumps(body).encode(), headers=headers)

    await nc.subscribe("intents.scripted", cb=answer)
    await nc.flush()
    return spy


def refusal(code: str, retry_after_ms: Optional[int] = None) -> dict[str, Any]:
    data: dict[str, Any] = {"code": code, "message": code.lower()}
    if retry_after_ms is not None:
        data["retry_after_ms"] = retry_after_ms
    return {
        "idem_key": None,
        "intent_id": "s-1",
        "replayed": False,
        "result": {"status": "Error", "data": data},
        "stored_at": None,
        "expires_at": None,
    }


async def test_every_retry_later_answer_is_resent_and_retry_after_ms_honoured(
    nc: NatsClient,
) -> None:
    success = {
        "idem_key": "idem_0000000000000001",
        "intent_id": "s-1",
        "replayed": False,
        "result": {"status": "Success", "data": 1},
        "stored_at": "2026-12-06T00:00:00Z",
        "expires_at": "2026-12-07T00:00:00Z",
    }
    answers = [
        refusal("OVERLOADED", 300),
        refusal("NO_HANDLER"),
        refusal("STORE_UNAVAILABLE"),
        refusal("IN_PROGRESS", 200),
        refusal("503"),
        success,
    ]
    requests = await scripted_worker(nc, answers)
    client = idemq.Client(nc, timeout=2.0, retries=5, backoff=0.05)

    result = await client.submit("intents.scripted", charge("s-1"))

    assert result.ok
    assert result.attempts == 6 == len(requests.seen)
    assert len({r.data for r in requests.seen}) == 1  # the same bytes every time
    gaps = [b.at - a.at for a, b in zip(requests.seen, requests.seen[1:])]
    assert gaps[0] >= 0.3 - 0.02  # after OVERLOADED's retry_after_ms
    assert gaps[3] >= 0.2 - 0.02  # after IN_PROGRESS's retry_after_ms
    assert gaps[1] < 0.3  # without a hint: the back-off, from 0.05 s doubling


async def test_unavailable_when_the_retries_run_out(nc: NatsClient) -> None:
    requests = await scripted_worker(nc, [refusal("NO_HANDLER")])
    client = idemq.Client(nc, timeout=2.0, retries=2, backoff=0.01)

    with pytest.raises(idemq.Unavailable) as gave_up:
        await client.submit("intents.scripted", charge("s-2"))

    assert gave_up.value.attempts == 3 == len(requests.seen)
    assert gave_up.value.last is not None
    assert gave_up.value.last.error_code == "NO_HANDLER"


async def test_unavailable_when_the_deadline_runs_out(nc: NatsClient) -> None:
    client = idemq.Client(nc, timeout=0.2, retries=100, deadline=1.0, backoff=0.05)
    spy = await Spy.on(nc, "intents.>")
    started = asyncio.get_running_loop().time()

    with pytest.raises(idemq.Unavailable) as gave_up:
        await client.submit("intents.nobody", charge("s-3"))  # no worker at all

    assert asyncio.get_running_loop().time() - started < 1.5
    assert gave_up.value.last is None  # the last try got no answer
    assert "deadline" in gave_up.value.reason
    assert gave_up.value.attempts == len(spy.matching("intents.nobody")) >= 2


async def test_an_executed_outcome_answered_unstored_is_final(nc: NatsClient) -> None:
    # v1.2: the worker ran the intent but could not store the outcome.
    unstored = refusal("NO_HANDLER")  # whatever the outcome, it ran: no resend
    requests = await scripted_worker(nc, [unstored], headers={"Idem-Stored": "false"})
    client = idemq.Client(nc, timeout=2.0, retries=3)

    result = await client.submit("intents.scripted", charge("s-4"))

    assert result.stored is False
    assert result.error_code == "NO_HANDLER"
    assert result.attempts == 1 == len(requests.seen)
