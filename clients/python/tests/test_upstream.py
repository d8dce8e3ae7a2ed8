"""An upstream written with ``serve_upstream`` behind ``idemq serve --forward``."""

import asyncio
import logging
import signal
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

import idemq
from conftest import StartWorker
from harness import FAST, Recorder, until, wait_ready

FORWARD = ["--forward", "exec.{capability}"]


def intent(intent_id: str, capability: str, **params: Any) -> dict[str, Any]:
    return {
        "intent_id": intent_id,
        "actor": "upstream-test",
        "episode": "ep-u",
        "capability": capability,
        "params": params,
    }


async def serve(nc: NatsClient, recorder: Recorder) -> idemq.Upstream:
    """One upstream on ``exec.*`` whose answer depends on the capability."""
    flaky_failures: dict[str, int] = {}

    async def handle(body: dict[str, Any], call: idemq.Call) -> Any:
        recorder.calls.append(call)
        capability = body["capability"]
        if capability == "charge":
            recorder.completed.append(call)
            return {"charged": body["params"]["amount"], "key": call.idem_key}
        if capability == "refuse":
            recorder.completed.append(call)
            raise idemq.DefiniteError(422, "amount must be positive")
        if capability == "flaky":
            seen = flaky_failures.get(call.idem_key or "", 0)
            flaky_failures[call.idem_key or ""] = seen + 1
            if seen == 0:
                raise idemq.TransientError(503, "ledger briefly unavailable")
            recorder.completed.append(call)
            return {"second_try": True}
        if capability == "kill":
            recorder.completed.append(call)
            raise idemq.Killed()
        if capability == "crash":
            # The message is a secret the worker must never see.
            raise ZeroDivisionError("secret-detail-4711")
        raise AssertionError(f"unexpected capability {capability}")

    return await idemq.serve_upstream(nc, "exec.*", handle)


@pytest.fixture
async def upstream_worker(
    nc: NatsClient, start_worker: StartWorker
) -> tuple[idemq.Client, Recorder]:
    recorder = Recorder()
    await serve(nc, recorder)
    await start_worker(*FAST, *FORWARD)
    await wait_ready(nc)
    return idemq.Client(nc, timeout=3.0, retries=3), recorder


async def test_a_returned_value_is_the_stored_success(
    upstream_worker: tuple[idemq.Client, Recorder],
) -> None:
    client, recorder = upstream_worker
    body = intent("ok-1", "charge", amount=7)

    first = await client.submit("intents.pay", body)
    again = await client.submit("intents.pay", body)

    assert first.ok
    assert first.stored
    assert not first.replayed
    assert first.data == {"charged": 7, "key": idemq.intent_key(body)}
    assert again.replayed
    assert again.data == first.data
    assert [(c.idem_key, c.attempt, c.subject) for c in recorder.calls] == [
        (idemq.intent_key(body), 1, "exec.charge")
    ]


async def test_a_definite_error_is_stored_and_replayed(
    upstream_worker: tuple[idemq.Client, Recorder],
) -> None:
    client, recorder = upstream_worker
    body = intent("refuse-1", "refuse", amount=-1)

    first = await client.submit("intents.pay", body)
    again = await client.submit("intents.pay", body)

    assert (first.status, first.error_code, first.error_message) == (
        "Error",
        "422",
        "amount must be positive",
    )
    assert first.stored
    assert not first.replayed
    assert first.attempts == 1
    assert again.replayed
    assert again.outcome == first.outcome
    assert again.stored_at == first.stored_at
    assert len(recorder.calls) == 1


async def test_a_transient_error_is_not_stored_and_the_next_copy_runs_again(
    upstream_worker: tuple[idemq.Client, Recorder],
) -> None:
    client, recorder = upstream_worker
    body = intent("flaky-1", "flaky")

    # Without retries the transient answer ends the call, unstored.
    with pytest.raises(idemq.Unavailable) as gave_up:
        await client.submit("intents.pay", body, retries=0)
    last = gave_up.value.last
    assert last is not None
    assert (last.error_code, last.stored, last.stored_at) == ("503", False, None)
    # The next copy executes again and succeeds.
    result = await client.submit("intents.pay", body)

    assert result.ok
    assert result.data == {"second_try": True}
    assert not result.replayed
    assert result.stored
    assert len(recorder.calls) == 2
    assert len(recorder.completed) == 1


async def test_submit_retries_a_transient_error_by_itself(
    upstream_worker: tuple[idemq.Client, Recorder],
) -> None:
    client, recorder = upstream_worker

    result = await client.submit("intents.pay", intent("flaky-2", "flaky"))

    assert result.ok
    assert result.attempts == 2
    assert len(recorder.calls) == 2


async def test_killed_is_stored_as_the_killed_status(
    upstream_worker: tuple[idemq.Client, Recorder],
) -> None:
    client, recorder = upstream_worker
    body = intent("kill-1", "kill")

    first = await client.submit("intents.pay", body)
    again = await client.submit("intents.pay", body)

    assert first.status == "Killed"
    assert first.stored
    assert first.data is None
    assert first.outcome == {"status": "Killed"}
    assert again.status == "Killed"
    assert again.replayed
    assert len(recorder.calls) == 1


async def test_an_unexpected_exception_is_a_transient_500_naming_only_its_type(
    upstream_worker: tuple[idemq.Client, Recorder],
) -> None:
    client, recorder = upstream_worker

    with pytest.raises(idemq.Unavailable) as gave_up:
        await client.submit("intents.pay", intent("crash-1", "crash"), retries=1)

    last = gave_up.value.last
    assert last is not None
    assert last.error_code == "500"
    assert not last.stored
    assert "ZeroDivisionError" in (last.error_message or "")
    assert "secret-detail" not in (last.error_message or "")
    assert gave_up.value.attempts == 2 == len(recorder.calls)


async def test_call_attempt_is_2_after_a_takeover(
    nc: NatsClient, start_worker: StartWorker
) -> None:
    recorder = Recorder()
    release = asyncio.Event()

    async def handle(body: dict[str, Any], call: idemq.Call) -> Any:
        recorder.calls.append(call)
        if call.attempt == 1:
            await asyncio.wait_for(release.wait(), 30)  # hangs until the test ends
        recorder.completed.append(call)
        return {"attempt": call.attempt}

    upstream = await idemq.serve_upstream(nc, "exec.*", handle)
    # The first worker's claim outlives its death by up to 3 s (its lease);
    # the resend reaches the second worker within it and waits it out.
    first = await start_worker("--lease", "3s", "--wait", "1s", "--grace", "1s", *FORWARD)
    await wait_ready(nc)
    body = intent("takeover-1", "hang")
    lost = asyncio.create_task(idemq.Client(nc, timeout=2.0, retries=0).submit("intents.pay", body))
    await until("the first worker runs the intent", lambda: len(recorder.calls) == 1)

    await first.stop(signal.SIGKILL)
    await start_worker("--lease", "1s", "--wait", "6s", "--grace", "1s", *FORWARD)
    await wait_ready(nc)
    result = await idemq.Client(nc, timeout=8.0, retries=1).submit("intents.pay", body)

    assert result.ok
    assert result.data == {"attempt": 2}
    assert recorder.attempts() == [1, 2]
    assert [c.attempt for c in recorder.completed] == [2]
    with pytest.raises(idemq.Unavailable):
        await lost  # its worker died: no answer
    release.set()
    await upstream.stop(grace=1.0)


async def test_stop_drains_requests_in_flight(nc: NatsClient, start_worker: StartWorker) -> None:
    started = asyncio.Event()

    async def handle(body: dict[str, Any], call: idemq.Call) -> Any:
        started.set()
        await asyncio.sleep(0.3)
        return "done"

    upstream = await idemq.serve_upstream(nc, "exec.*", handle, queue="drain-test")
    await start_worker(*FAST, *FORWARD)
    await wait_ready(nc)
    client = idemq.Client(nc, timeout=3.0, retries=0)
    submit = asyncio.create_task(client.submit("intents.pay", intent("drain-1", "slow")))
    await asyncio.wait_for(started.wait(), 5)

    await upstream.stop(grace=5.0)  # answers the request in flight, then returns

    assert upstream.in_flight == 0
    result = await asyncio.wait_for(submit, 5)
    assert result.ok
    assert result.data == "done"


async def test_logs_never_carry_params_or_results(
    nc: NatsClient, start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="idemq")
    recorder = Recorder()
    await serve(nc, recorder)
    await start_worker(*FAST, *FORWARD)
    await wait_ready(nc)
    client = idemq.Client(nc, timeout=3.0, retries=1)

    await client.submit("intents.pay", intent("log-1", "charge", amount=98765, card="4111-SECRET"))
    await client.submit("intents.pay", intent("log-2", "flaky", card="4111-SECRET"))
    with pytest.raises(idemq.Unavailable):
        await client.submit("intents.pay", intent("log-3", "crash", card="4111-SECRET"))

    assert len(recorder.calls) == 5  # all three ran, the flaky and the crash twice
    logged = caplog.text
    assert "idem_" in logged  # keys are logged ...
    assert "4111-SECRET" not in logged  # ... params never
    assert "98765" not in logged  # nor results
    assert "secret-detail" not in logged  # nor exception messages
