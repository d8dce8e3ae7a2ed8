"""Real processes for the tests: a nats-server with JetStream and idemq workers.

``NATS_SERVER_BIN`` (else ``nats-server`` on PATH) and ``IDEMQ_BIN`` (else
``idemq`` on PATH) name the binaries. Everything listens on 127.0.0.1 only,
and every wait here is bounded.
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from asyncio.subprocess import Process
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

import idemq

#: Bound on a process's start-up and on its exit after a signal.
START_SECS = 15.0
STOP_SECS = 10.0


def binary(env: str, name: str, hint: str) -> str:
    """The binary named by ``$env``, else ``name`` on PATH."""
    path = os.environ.get(env) or shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError(f"{name} not found: set {env} or put it on PATH ({hint})")
    return path


def nats_server_bin() -> str:
    """The nats-server binary (2.11 or newer)."""
    return binary(
        "NATS_SERVER_BIN",
        "nats-server",
        "./scripts/test.sh installs one into .tools/venv",
    )


def idemq_bin() -> str:
    """The idemq binary built by cargo."""
    return binary("IDEMQ_BIN", "idemq", "cargo build; IDEMQ_BIN=target/debug/idemq")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def poll(
    what: str, check: Callable[[], Awaitable[bool]], bound: float, every: float = 0.05
) -> None:
    """Calls ``check`` until it returns True; fails after ``bound`` seconds."""
    end = time.monotonic() + bound
    while True:
        if await check():
            return
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {bound}s")
        await asyncio.sleep(every)


async def until(what: str, check: Callable[[], bool], bound: float = 10.0) -> None:
    """Waits until ``check()`` is true, polling; fails after ``bound`` seconds."""

    async def checked() -> bool:
        return check()

    await poll(what, checked, bound, every=0.02)


async def stop_process(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> int:
    """Sends ``sig`` and waits (bounded) for the exit; SIGKILLs what still
    runs after :data:`STOP_SECS`."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return await asyncio.wait_for(proc.wait(), STOP_SECS)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return await asyncio.wait_for(proc.wait(), STOP_SECS)


def log_file(path: Path) -> BinaryIO:
    """A log file to append a child's output to."""
    return open(path, "ab")


async def spawn(args: list[str], log: Path, env: Optional[dict[str, str]] = None) -> Process:
    """Starts ``args`` with stdout and stderr appended to ``log``."""
    with log_file(log) as out:
        return await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )


@dataclass
class NatsServer:
    """A nats-server with JetStream on a free loopback port."""

    store: Path
    proc: Optional[Process] = None
    port: int = 0
    clients: list[NatsClient] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        for _ in range(3):  # a port taken between probe and bind: try another
            self.port = free_port()
            self.proc = await spawn(
                [
                    nats_server_bin(),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-js",
                    "--store_dir",
                    str(self.store),
                ],
                self.store.parent / "nats-server.log",
            )
            if await self._listening():
                return
            await stop_process(self.proc, signal.SIGKILL)
        raise AssertionError("nats-server did not start (see nats-server.log)")

    async def _listening(self) -> bool:
        end = time.monotonic() + START_SECS
        while time.monotonic() < end:
            assert self.proc is not None
            if self.proc.returncode is not None:
                return False
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), 1.0
                )
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        return False

    async def connect(self) -> NatsClient:
        """A client connection, closed when the test ends."""
        nc = await asyncio.wait_for(
            nats.connect(self.url, connect_timeout=5, max_reconnect_attempts=0), START_SECS
        )
        self.clients.append(nc)
        return nc

    async def stop(self) -> None:
        for nc in self.clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), STOP_SECS)
        if self.proc is not None:
            await stop_process(self.proc)


#: Worker flags for the tests: short leases and waits keep them fast.
FAST = ["--lease", "2s", "--wait", "1s", "--handler-timeout", "5s", "--grace", "2s"]


class Worker:
    """One ``idemq serve`` process (:meth:`start`); its log is ``<tmp>/worker-N.log``."""

    count = 0

    def __init__(self, log_path: Path, proc: Process) -> None:
        self.log_path = log_path
        self.proc = proc

    @classmethod
    async def start(cls, server: NatsServer, args: list[str], log_dir: Path) -> "Worker":
        cls.count += 1
        log_path = log_dir / f"worker-{cls.count}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMQ_")}
        env.update({"NO_COLOR": "1", "RUST_LOG": os.environ.get("IDEMQ_TEST_LOG", "warn")})
        cmd = [idemq_bin(), "serve", "--nats-url", server.url, *args]
        return cls(log_path, await spawn(cmd, log_path, env))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stops the worker with ``sig`` (SIGTERM: a clean shutdown); its exit status."""
        return await stop_process(self.proc, sig)


async def gather_answers(nc: NatsClient, subject: str, window: float = 0.25) -> list[Any]:
    """Every JSON answer to one request on ``subject`` within ``window``
    seconds (all the workers' answers to ``$SRV.PING.idemq``, say)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    answers: list[Any] = []
    try:
        await nc.publish(subject, b"", reply=inbox)
        end = time.monotonic() + window
        while (left := end - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            if msg.data:  # not the server's no-responders status
                answers.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return answers


async def ping_ids(nc: NatsClient) -> set[str]:
    """The ids of the idemq workers that answer ``$SRV.PING.idemq``."""
    return {str(a.get("id")) for a in await gather_answers(nc, "$SRV.PING.idemq")}


async def received_per_worker(nc: NatsClient, workers: int) -> list[int]:
    """Each worker's ``received`` counter, from ``$SRV.STATS.idemq``."""
    answers = await gather_answers(nc, "$SRV.STATS.idemq", window=0.5)
    assert len(answers) == workers, answers
    return [int(a["endpoints"][0]["data"]["received"]) for a in answers]


async def wait_ready(nc: NatsClient, workers: int = 1, bound: float = START_SECS) -> None:
    """Waits until ``workers`` idemq workers answer ``$SRV.PING.idemq``."""

    async def ready() -> bool:
        return len(await ping_ids(nc)) >= workers

    await poll(f"{workers} idemq worker(s) ready", ready, bound, every=0.0)


@dataclass
class Seen:
    """One message a :class:`Spy` saw, with its arrival time (monotonic)."""

    at: float
    subject: str
    reply: str
    data: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.data)

    def error_code(self) -> Optional[str]:
        """The error code of an intent's answer; ``None`` when not an ``Error``."""
        result = self.json()["result"]
        if result["status"] != "Error":
            return None
        code: str = result["data"]["code"]
        return code


class Spy:
    """Every message on ``subjects`` (a plain subscription beside the workers'
    queue group), to count sends and read replies."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    async def _on(self, msg: Msg) -> None:
        headers = dict(msg.headers or {})
        self.seen.append(Seen(time.monotonic(), msg.subject, msg.reply, msg.data, headers))

    @classmethod
    async def on(cls, nc: NatsClient, *subjects: str) -> "Spy":
        spy = cls()
        for subject in subjects:
            await nc.subscribe(subject, cb=spy._on)
        await nc.flush()
        return spy

    def answers(self, subject_prefix: str) -> list[Seen]:
        """The answers to the requests on ``subject_prefix`` (which have a reply subject)."""
        replies = {s.reply for s in self.seen if s.reply and s.subject.startswith(subject_prefix)}
        return [s for s in self.seen if s.subject in replies]

    def matching(self, subject_prefix: str, data: Optional[bytes] = None) -> list[Seen]:
        return [
            s
            for s in self.seen
            if s.subject.startswith(subject_prefix) and (data is None or s.data == data)
        ]


def sends(spy: Spy, subject_prefix: str, payload: bytes) -> list[Seen]:
    """The requests with exactly these bytes that the spy saw."""
    return spy.matching(subject_prefix, payload)


def check_retry_hints(spy: Spy, payload: bytes, code: str) -> int:
    """For every ``code`` answer to a request with these bytes, checks that
    the same client's next send of them came ``retry_after_ms`` or later.
    Returns how many such answers were checked."""
    requests = [s for s in spy.seen if s.data == payload and s.reply]
    checked = 0
    for request in requests:
        answers = [s for s in spy.seen if s.subject == request.reply]
        if not answers or answers[0].error_code() != code:
            continue
        hint = answers[0].json()["result"]["data"]["retry_after_ms"] / 1000
        assert hint > 0, answers[0].data
        client = request.reply.rsplit(".", 1)[0]
        later = [r for r in requests if r.at > answers[0].at and r.reply.startswith(client + ".")]
        if not later:
            continue  # the client's last try: nothing was resent after it
        gap = later[0].at - answers[0].at
        # The spy hears the answer a moment after the client does, so allow 20 ms.
        assert gap >= hint - 0.02, f"resent {gap:.3f}s after {code}, asked {hint:.3f}s"
        checked += 1
    return checked


class Recorder:
    """What an upstream saw: every call, and the calls it completed."""

    def __init__(self) -> None:
        self.calls: list[idemq.Call] = []
        self.completed: list[idemq.Call] = []

    def attempts(self) -> list[int]:
        return [call.attempt for call in self.calls]
