"""The PSP simulator as a real process on a free port, a webhook receiver, and an Authorize.Net
adapter pointed at the simulator with an account of each test's own. The simulator sends the
notifications of the accounts it opens per merchant to the receiver too, under the merchant."""

from __future__ import annotations

import asyncio
import socket
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from tally_kit.clients import BreakerPolicy, RetryPolicy
from tally_payment_gateway.authorize_net import AuthorizeNetProvider
from tally_payment_gateway.settings import MERCHANT_PLACEHOLDER, AuthorizeNetAccount
from tally_payment_gateway.testing import Simulator, new_account, running_simulator

ADAPTER_TIMEOUT_SECONDS = 1.0
BREAKER_THRESHOLD = 3
NOTIFICATION_WAIT_SECONDS = 5.0


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
    async with running_simulator(webhook_url=notifications.url(MERCHANT_PLACEHOLDER)) as running:
        yield running


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
    created = new_account()
    await simulator.add_account(created, notifications.url(created.api_login_id))
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
