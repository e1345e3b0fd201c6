"""The PSP simulator as a real process on a free port, a webhook receiver, and an Authorize.Net
adapter pointed at the simulator with an account of each test's own. The simulator sends the
notifications of the accounts it opens per merchant to the receiver too, under the merchant."""

from __future__ import annotations

import asyncio
import secrets
import socket
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from tally_kit.clients import BreakerPolicy, RetryPolicy
from tally_payment_gateway.authorize_net import AuthorizeNetProvider
from tally_payment_gateway.settings import MERCHANT_PLACEHOLDER, AuthorizeNetAccount

# Short enough to keep the suite quick; `slow` answers well inside the adapter's timeout,
# `timeout` and `lost` well beyond it.
SLOW_SECONDS = 0.25
HANG_SECONDS = 5.0
ADAPTER_TIMEOUT_SECONDS = 1.0
BREAKER_THRESHOLD = 3
NOTIFICATION_WAIT_SECONDS = 5.0
STARTUP_SECONDS = 15.0
LISTENING = "psp_simulator listening on "


@dataclass(frozen=True)
class Simulator:
    url: str
    # For the control endpoints.
    client: httpx.AsyncClient

    async def control(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = await self.client.request(method, f"/_simulator{path}", json=body)
        response.raise_for_status()
        return response.json()

    async def transactions(self, invoice_number: str) -> list[dict[str, Any]]:
        found = await self.control("GET", f"/transactions?invoiceNumber={invoice_number}")
        return found["transactions"]


@dataclass
class Notifications:
    """What the webhook receiver got at each URL `<base_url>/<name>` (an account's login, or a
    merchant for the accounts the simulator opens per merchant): (headers, raw body) in
    arrival order."""

    base_url: str
    received: defaultdict[str, asyncio.Queue[tuple[dict[str, str], bytes]]] = field(
        default_factory=lambda: defaultdict(asyncio.Queue)
    )

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    async def next(self, name: str) -> tuple[dict[str, str], bytes]:
        async with asyncio.timeout(NOTIFICATION_WAIT_SECONDS):
            return await self.received[name].get()


@pytest.fixture(scope="session")
async def simulator(notifications: Notifications) -> AsyncIterator[Simulator]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "psp_simulator",
        "--port",
        "0",
        "--slow-seconds",
        str(SLOW_SECONDS),
        "--hang-seconds",
        str(HANG_SECONDS),
        "--webhook-url",
        notifications.url(MERCHANT_PLACEHOLDER),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(STARTUP_SECONDS):
            line = (await process.stdout.readline()).decode()
        assert line.startswith(LISTENING), line
        url = line.removeprefix(LISTENING).strip()
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            yield Simulator(url, client)
    finally:
        process.terminate()
        try:
            async with asyncio.timeout(STARTUP_SECONDS):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest.fixture(scope="session")
async def notifications() -> AsyncIterator[Notifications]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = Notifications(base_url=f"http://127.0.0.1:{port}/webhooks")

    async def receive(request: Request) -> Response:
        await received.received[request.path_params["name"]].put(
            (dict(request.headers), await request.body())
        )
        return Response(status_code=200)

    app = Starlette(routes=[Route("/webhooks/{name}", receive, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    # Listening before uvicorn starts: deliveries that come early wait in the backlog.
    listener.listen()
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    yield received
    server.should_exit = True
    await serving


@pytest.fixture
async def account(simulator: Simulator, notifications: Notifications) -> AuthorizeNetAccount:
    """An account of this test's own at the simulator, its webhooks sent to the receiver."""
    created = AuthorizeNetAccount(
        api_login_id=f"t-{secrets.token_hex(6)}",
        transaction_key=SecretStr(secrets.token_hex(8)),
        signature_key=SecretStr(secrets.token_hex(64).upper()),
    )
    await simulator.control(
        "PUT",
        f"/accounts/{created.api_login_id}",
        {
            "transactionKey": created.transaction_key.get_secret_value(),
            "signatureKey": created.signature_key.get_secret_value(),
            "webhookUrl": notifications.url(created.api_login_id),
        },
    )
    return created


def make_provider(url: str, account: AuthorizeNetAccount | None) -> AuthorizeNetProvider:
    return AuthorizeNetProvider(
        base_url=url,
        accounts=lambda merchant_id: account if merchant_id == "acme" else None,
        connect_timeout_seconds=1.0,
        timeout_seconds=ADAPTER_TIMEOUT_SECONDS,
        retry=RetryPolicy(max_attempts=3, initial_backoff_seconds=0.05, max_backoff_seconds=0.2),
        breaker=BreakerPolicy(failure_threshold=BREAKER_THRESHOLD, reset_timeout_seconds=30),
    )


@pytest.fixture
async def provider(simulator: Simulator, account: AuthorizeNetAccount) -> AsyncIterator[AuthorizeNetProvider]:
    """The real adapter, talking to the simulator over HTTP as merchant `acme`."""
    adapter = make_provider(simulator.url, account)
    yield adapter
    await adapter.aclose()
