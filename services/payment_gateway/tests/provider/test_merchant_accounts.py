"""The payment gateway's development default against the PSP simulator process: each merchant
signs in as an account of its own, whose books are its own and whose notifications go to the
merchant's own webhook URL (`--webhook-url` with the merchant in place of `{merchant}`), signed
so that the default account verifies them."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from tally_kit.amounts import Money
from tally_payment_gateway import webhooks
from tally_payment_gateway.authorize_net import AuthorizeNetProvider
from tally_payment_gateway.provider import ChargeRequest, OneTimeToken, Outcome
from tally_payment_gateway.settings import PaymentGatewaySettings
from tally_payment_gateway.testing import Simulator

from .conftest import Notifications


@pytest.fixture
async def settings(simulator: Simulator) -> PaymentGatewaySettings:
    # The default accounts only, as the payment gateway starts on a developer machine.
    return PaymentGatewaySettings(authorize_net_url=simulator.url)


@pytest.fixture
async def provider(settings: PaymentGatewaySettings) -> AsyncIterator[AuthorizeNetProvider]:
    adapter = AuthorizeNetProvider.from_settings(settings)
    yield adapter
    await adapter.aclose()


def _charge() -> ChargeRequest:
    return ChargeRequest(
        amount=Money(2500, "USD"),
        source=OneTimeToken("COMMON.ACCEPT.INAPP.PAYMENT", "nonce-ok"),
        order_reference=secrets.token_hex(10),
        description="25 credits",
    )


async def test_each_merchant_pays_through_its_own_account_and_gets_its_own_webhooks(
    provider: AuthorizeNetProvider, settings: PaymentGatewaySettings, notifications: Notifications
) -> None:
    first, second = (f"m-{secrets.token_hex(4)}" for _ in range(2))
    charges = {first: _charge(), second: _charge()}
    transaction_ids = {}
    for merchant_id, charge in charges.items():
        result = await provider.purchase(merchant_id, charge)
        assert result.outcome is Outcome.APPROVED
        transaction_ids[merchant_id] = result.transaction_id

    for merchant_id, charge in charges.items():
        headers, body = await notifications.next(merchant_id)
        account = settings.authorize_net_account(merchant_id)
        assert account is not None and account.api_login_id == f"simulator.{merchant_id}"
        webhooks.verify_signature(body, headers, account.signature_key)
        notification = webhooks.parse_notification(body)
        assert notification.event_type == webhooks.AUTH_CAPTURE_CREATED
        assert (notification.entity_id, notification.invoice_number) == (
            transaction_ids[merchant_id],
            charge.order_reference,
        )
    # One notification each, at its own merchant's URL only.
    assert notifications.received[first].empty() and notifications.received[second].empty()

    # Each merchant's books are its own.
    assert await provider.transaction_details(first, transaction_ids[first]) is not None
    assert await provider.transaction_details(second, transaction_ids[first]) is None
