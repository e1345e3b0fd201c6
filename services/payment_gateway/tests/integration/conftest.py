"""Fixtures of the payment gateway's integration tests: the servicer tests' harness (the PSP
simulator process, the real app on PostgreSQL and RabbitMQ, the webhook receiver standing in
for the HTTP gateway) with two merchants: `HOOKS`, whose webhooks reach the app as they come,
and `HELD`, whose webhooks the tests hand over themselves, when and in the order they want."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

# The harness lives beside the servicer tests; test folders are not packages and pytest runs
# with --import-mode=importlib, which puts no test folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "servicer"))

from gateway_harness import Gateway, Webhooks, running_gateway

# Every run has databases and a simulator of its own: fixed ids do not collide.
HOOKS = "hooks-merchant"
HELD = "held-merchant"


@pytest.fixture(scope="session")
async def gateway() -> AsyncIterator[Gateway]:
    async with running_gateway({HOOKS: Webhooks.FORWARD, HELD: Webhooks.HOLD}) as running:
        yield running
