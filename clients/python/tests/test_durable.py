"""Durable mode: ``publish`` and ``submit_durable`` against a JetStream worker."""

import asyncio
import signal
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

import idemq
from conftest import StartWorker
from harness import Recorder, Spy, until, wait_ready

STREAM = "INTENTS"
JETSTREAM = ["--stream", STREAM, "--durable", "workers", "--ack-wait", "2s"]
FAST = ["--lease", "2s", "--wait", "1s", "--handler-timeout", "10s", "--grace", "1s"]
FORWARD = ["--forward", "exec.{capability}"]


def order(intent_id: str, **params: Any) -> dict[str, Any]:
    return {
        "intent_id": intent_id,
        "actor": "durable-agent",
        "episode": "ep-d",
        "params": params or {"amount": 5},
    }


async def stream_drained(nc: NatsClient) -> tuple[int, int]:
    """Waits until the work-queue stream holds no message (every one acked,
    so none can be delivered again); returns (messages, last sequence)."""
    js = nc.jetstream()
    state: list[Any] = []

    async def empty() -> bool:
        info = await js.stream_info(STREAM)
        state[:] = [info.state.messages, info.state.last_seq]
        return info.state.messages == 0

    end = asyncio.get_running_loop().time() + 15
    while not await empty():
        assert asyncio.get_running_loop().time() < end, f"stream still holds {state}"
        await asyncio.sleep(0.05)
    return state[0], state[1]


async def test_submit_durable_answers_and_publish_retries_are_deduplicated(
    nc: NatsClient, start_worker: StartWorker
) -> None:
    await start_worker(*FAST, *JETSTREAM)
    await wait_ready(nc)
    client = idemq.Client(nc, timeout=3.0)

    result = await client.submit_durable("intents.order", order("d-1"))
    assert result.ok
    assert result.data == {"echo": {"amount": 5}}
    assert result.replayed is False
    assert result.stored is True
    assert result.idem_key == idemq.intent_key(order("d-1"))

    # The same publish twice (a retry after a lost PubAck): stored once, answered once.
    results = nc.new_inbox()
    spy = await Spy.on(nc, results)
    keys = [await client.publish("intents.order", order("d-2"), reply_to=results) for _ in "ab"]
    assert keys == [idemq.intent_key(order("d-2"))] * 2
    await until("an answer on the reply subject", lambda: len(spy.seen) >= 1)
    messages, last_seq = await stream_drained(nc)
    assert (messages, last_seq) == (0, 2)  # d-1 and d-2, each stored once
    assert len(spy.seen) == 1
    assert spy.seen[0].json()["result"] == {"status": "Success", "data": {"echo": {"amount": 5}}}


async def test_submit_durable_raises_refusals(nc: NatsClient, start_worker: StartWorker) -> None:
    await start_worker(*FAST, *JETSTREAM)
    await wait_ready(nc)
    client = idemq.Client(nc, timeout=3.0)
    await client.submit_durable("intents.order", order("d-3", amount=1))

    with pytest.raises(idemq.KeyReused):
        await client.submit_durable("intents.order", order("d-3", amount=2))
    with pytest.raises(idemq.InvalidIntent) as invalid:
        # Refused by the client: no key can be derived without an actor.
        await client.submit_durable("intents.order", {"intent_id": "x", "episode": "e"})
    assert invalid.value.code == "INVALID_INTENT"
    assert invalid.value.result is None


async def test_a_worker_killed_between_publish_and_answer_is_answered_once(
    nc: NatsClient, start_worker: StartWorker
) -> None:
    recorder = Recorder()
    release = asyncio.Event()

    async def handle(body: dict[str, Any], call: idemq.Call) -> Any:
        recorder.calls.append(call)
        if len(recorder.calls) == 1:
            await asyncio.wait_for(release.wait(), 30)  # the first call never completes
        recorder.completed.append(call)
        return {"order": body["intent_id"]}

    upstream = await idemq.serve_upstream(nc, "exec.*", handle)
    first = await start_worker(*FAST, *JETSTREAM, *FORWARD)
    await wait_ready(nc)
    spy = await Spy.on(nc, "intents.>", "_INBOX.>")
    client = idemq.Client(nc, timeout=3.0)
    submit = asyncio.create_task(client.submit_durable("intents.order", order("d-4"), timeout=25))
    await until("the first worker forwards the intent", lambda: len(recorder.calls) == 1)

    await first.stop(signal.SIGKILL)
    await start_worker(*FAST, *JETSTREAM, *FORWARD)
    result = await asyncio.wait_for(submit, 30)

    assert result.ok
    assert result.data == {"order": "d-4"}
    assert result.replayed is False
    assert len(recorder.completed) == 1  # executed to completion once
    assert len(recorder.calls) == 2  # the lost call and the redelivery's
    assert (await stream_drained(nc))[0] == 0  # acked: no further delivery
    # One answer on the private reply subject that travelled as Idem-Reply-To.
    # (The spy on _INBOX.> also sees the stream's deliveries to the workers.)
    published = [p for p in spy.matching("intents.order") if not p.reply.startswith("$JS.ACK.")]
    assert len(published) == 1
    reply_to = published[0].headers["Idem-Reply-To"]
    assert reply_to.startswith("_INBOX.")
    answers = [s for s in spy.seen if s.subject == reply_to]
    assert len(answers) == 1
    assert answers[0].json()["result"] == {"status": "Success", "data": {"order": "d-4"}}
    release.set()
    await upstream.stop(grace=1.0)
