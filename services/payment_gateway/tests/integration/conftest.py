"""Fixtures of the payment gateway's integration tests: the servicer tests' harness (the PSP
simulator process, the real app on PostgreSQL and RabbitMQ, the webhook receiver standing in
for the HTTP gateway) with two merchants: `HOOKS`, whose webhooks reach the app as they come,
and `HELD`, whose webhooks the tests hand over themselves, when and in the order they want."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from tally_payment_gateway.testing import Gateway, Webhooks, running_gateway

# Every run has databases and a simulator of its own: fixed ids do not collide.
HOOKS = "hooks-merchant"
HELD = "held-merchant"


@pytest.fixture(scope="session")
async def gateway() -> AsyncIterator[Gateway]:
    async with running_gateway({HOOKS: Webhooks.FORWARD, HELD: Webhooks.HOLD}) as running:
        yield running
