"""Fixtures of the servicer tests: the PSP simulator process, the real app over gRPC on
PostgreSQL and RabbitMQ, and four merchants: `MAIN`, whose webhooks reach the app as the
HTTP gateway would pass them; `QUIET`, whose account sends none (only the reconciliation job
learns what the provider did); `SPARE`, which only ever sends requests that are refused, and
`CARDS`, whose database only ever sees requests carrying card data.
Databases, queues, exchanges and processes of the run are removed at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from tally_payment_gateway.testing import Gateway, Webhooks, running_gateway

# Every run has databases and a simulator of its own: fixed ids do not collide.
MAIN = "main-merchant"
QUIET = "quiet-merchant"
# Has an account and is never paid through: its database must only appear when it is used.
SPARE = "spare-merchant"
# Sends only requests carrying card data: nothing in the background changes its database.
CARDS = "cards-merchant"


@pytest.fixture(scope="session")
async def gateway() -> AsyncIterator[Gateway]:
    async with running_gateway(
        {MAIN: Webhooks.FORWARD, QUIET: Webhooks.NONE, SPARE: Webhooks.NONE}
    ) as running:
        yield running
