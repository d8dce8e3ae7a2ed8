"""Fixtures: a fresh nats-server per test, idemq workers, client connections."""

from collections.abc import AsyncIterator, Awaitable, Generator
from pathlib import Path
from typing import Callable

import pytest
from nats.aio.client import Client as NatsClient

from harness import NatsServer, Worker

StartWorker = Callable[..., Awaitable[Worker]]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server with JetStream on a free 127.0.0.1 port, stopped after the test."""
    srv = NatsServer(store=tmp_path / "js")
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def nc(server: NatsServer) -> NatsClient:
    """A client connection to the test's server."""
    return await server.connect()


@pytest.fixture
async def start_worker(
    server: NatsServer, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[StartWorker]:
    """``start_worker(*flags)`` starts ``idemq serve`` on the test's server;
    every worker is stopped after the test (its log printed if the test failed)."""
    workers: list[Worker] = []

    async def start(*args: str) -> Worker:
        worker = await Worker.start(server, list(args), tmp_path)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        await worker.stop()
    failed = getattr(request.node, "report_call", None)
    if failed is not None and failed.failed:
        for worker in workers:
            print(f"--- {worker.log_path.name} ---\n{worker.log()[-4000:]}")
