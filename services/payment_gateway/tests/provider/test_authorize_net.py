"""The Authorize.Net adapter against the PSP simulator, a real process, over real HTTP.

Every outcome a money-moving call can have, the errors the provider reports inside an HTTP 200,
the queries reconciliation relies on (an answer lost, the charge found exactly once), the
circuit breaker, and the signed webhooks the simulator sends.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from pydantic import SecretStr
from tally_kit.amounts import Money
from tally_kit.errors import RuleViolation
from tally_payment_gateway import webhooks
from tally_payment_gateway.authorize_net import AuthorizeNetProvider
from tally_payment_gateway.provider import (
    ChargeRequest,
    OneTimeToken,
    Outcome,
    ProviderNotConfigured,
    ProviderUnavailable,
    RefundRequest,
    SavedToken,
    TransactionKind,
    TransactionStatus,
)
from tally_payment_gateway.settings import AuthorizeNetAccount
from tally_payment_gateway.testing import SLOW_SECONDS, Simulator

from .conftest import BREAKER_THRESHOLD, Notifications, make_provider

MERCHANT = "acme"
DESCRIPTOR = "COMMON.ACCEPT.INAPP.PAYMENT"
TWELVE_DOLLARS = Money(1234, "USD")


def _reference() -> str:
    """A fresh 20-character order reference, as the domain derives from a payment id."""
    return secrets.token_hex(10)


def _charge(
    token: str = "nonce-ok", amount: Money = TWELVE_DOLLARS, reference: str | None = None
) -> ChargeRequest:
    return ChargeRequest(
        amount=amount,
        source=OneTimeToken(DESCRIPTOR, token),
        order_reference=reference or _reference(),
        description="10 credits",
    )


def _since() -> datetime:
    return datetime.now(UTC) - timedelta(minutes=5)


async def test_an_approved_purchase_is_captured_with_its_exact_amount(provider: AuthorizeNetProvider) -> None:
    charge = _charge(amount=Money(1234, "USD"))
    result = await provider.purchase(MERCHANT, charge)
    assert result.outcome is Outcome.APPROVED
    assert result.transaction_id and result.auth_code
    assert (result.account_suffix, result.account_type, result.code) == ("XXXX1111", "Visa", "1")
    details = await provider.transaction_details(MERCHANT, result.transaction_id)
    assert details is not None
    assert (details.kind, details.status, details.settled) == (
        TransactionKind.PURCHASE,
        TransactionStatus.COMPLETED,
        False,
    )
    assert details.provider_status == "capturedPendingSettlement"
    assert details.order_reference == charge.order_reference
    assert details.authorized_amount == details.settled_amount == Decimal("12.34")


async def test_a_saved_payment_profile_pays_too(provider: AuthorizeNetProvider) -> None:
    charge = ChargeRequest(Money(500, "USD"), SavedToken("1512345678/1512987654"), _reference(), "renewal")
    result = await provider.purchase(MERCHANT, charge)
    assert result.outcome is Outcome.APPROVED


async def test_an_authorization_is_captured_in_part_then_cannot_be_captured_again(
    provider: AuthorizeNetProvider,
) -> None:
    authorized = await provider.authorize(MERCHANT, _charge(amount=Money(1000, "USD")))
    assert authorized.outcome is Outcome.APPROVED
    details = await provider.transaction_details(MERCHANT, authorized.transaction_id)
    assert details is not None and details.status is TransactionStatus.AUTHORIZED
    assert details.kind is TransactionKind.AUTHORIZATION

    too_much = await provider.capture(MERCHANT, authorized.transaction_id, Money(1001, "USD"))
    assert (too_much.outcome, too_much.code) == (Outcome.ERROR, "47")
    captured = await provider.capture(MERCHANT, authorized.transaction_id, Money(600, "USD"))
    assert captured.outcome is Outcome.APPROVED
    assert captured.transaction_id == authorized.transaction_id
    details = await provider.transaction_details(MERCHANT, authorized.transaction_id)
    assert details is not None and details.status is TransactionStatus.COMPLETED
    assert details.settled_amount == Decimal("6.00")
    again = await provider.capture(MERCHANT, authorized.transaction_id, Money(400, "USD"))
    assert (again.outcome, again.code) == (Outcome.ERROR, "311")


async def test_a_void_releases_an_authorization(provider: AuthorizeNetProvider) -> None:
    authorized = await provider.authorize(MERCHANT, _charge())
    voided = await provider.void(MERCHANT, authorized.transaction_id)
    assert voided.outcome is Outcome.APPROVED
    details = await provider.transaction_details(MERCHANT, authorized.transaction_id)
    assert details is not None and details.status is TransactionStatus.VOIDED
    twice = await provider.void(MERCHANT, authorized.transaction_id)
    assert (twice.outcome, twice.code) == (Outcome.ERROR, "310")


async def test_refunds_come_from_settled_captures_and_no_further(
    provider: AuthorizeNetProvider, simulator: Simulator
) -> None:
    charge = _charge(amount=Money(1000, "USD"))
    purchased = await provider.purchase(MERCHANT, charge)

    def refund(amount_minor: int) -> RefundRequest:
        return RefundRequest(
            purchased.transaction_id,
            Money(amount_minor, "USD"),
            purchased.account_suffix,
            charge.order_reference,
        )

    unsettled = await provider.refund(MERCHANT, refund(300))
    assert (unsettled.outcome, unsettled.code) == (Outcome.ERROR, "54")
    await simulator.control("POST", "/settle")
    refunded = await provider.refund(MERCHANT, refund(300))
    assert refunded.outcome is Outcome.APPROVED
    assert refunded.transaction_id not in ("", purchased.transaction_id)
    details = await provider.transaction_details(MERCHANT, refunded.transaction_id)
    assert details is not None
    assert (details.kind, details.reference_transaction_id) == (
        TransactionKind.REFUND,
        purchased.transaction_id,
    )
    assert details.settled_amount == Decimal("3.00")
    assert details.order_reference == charge.order_reference
    beyond = await provider.refund(MERCHANT, refund(701))
    assert (beyond.outcome, beyond.code) == (Outcome.ERROR, "55")
    original = await provider.transaction_details(MERCHANT, purchased.transaction_id)
    assert original is not None and original.settled


@pytest.mark.parametrize(
    ("token", "amount", "outcome", "code"),
    [
        ("sim-decline", Money(1234, "USD"), Outcome.DECLINED, "2"),
        ("nonce-ok", Money(900002, "USD"), Outcome.DECLINED, "2"),
        ("sim-error", Money(1234, "USD"), Outcome.ERROR, "19"),
        ("nonce-ok", Money(900003, "USD"), Outcome.ERROR, "19"),
        ("sim-review", Money(1234, "USD"), Outcome.HELD, "252"),
        ("nonce-ok", Money(900004, "USD"), Outcome.HELD, "252"),
    ],
)
async def test_scripted_answers_by_token_or_amount(
    provider: AuthorizeNetProvider, token: str, amount: Money, outcome: Outcome, code: str
) -> None:
    result = await provider.purchase(MERCHANT, _charge(token, amount))
    assert (result.outcome, result.code) == (outcome, code)
    assert result.message


async def test_a_decline_is_recorded_and_an_error_is_not(provider: AuthorizeNetProvider) -> None:
    declined = await provider.purchase(MERCHANT, _charge("sim-decline"))
    details = await provider.transaction_details(MERCHANT, declined.transaction_id)
    assert details is not None and details.status is TransactionStatus.DECLINED
    charge = _charge("sim-error")
    errored = await provider.purchase(MERCHANT, charge)
    assert errored.transaction_id == ""
    assert await provider.find_transactions(MERCHANT, charge.order_reference, _since()) == []


async def test_a_held_payment_waits_for_the_review(
    provider: AuthorizeNetProvider, simulator: Simulator
) -> None:
    held = await provider.authorize(MERCHANT, _charge("sim-review"))
    assert held.outcome is Outcome.HELD
    details = await provider.transaction_details(MERCHANT, held.transaction_id)
    assert details is not None and details.status is TransactionStatus.HELD
    await simulator.control("POST", f"/transactions/{held.transaction_id}/review", {"decision": "approve"})
    details = await provider.transaction_details(MERCHANT, held.transaction_id)
    assert details is not None and details.status is TransactionStatus.AUTHORIZED


async def test_a_slow_answer_within_the_timeout_is_an_answer(provider: AuthorizeNetProvider) -> None:
    started = time.monotonic()
    result = await provider.purchase(MERCHANT, _charge("sim-slow"))
    assert result.outcome is Outcome.APPROVED
    assert time.monotonic() - started >= SLOW_SECONDS


async def test_a_timeout_leaves_the_outcome_unknown_and_nothing_charged(
    provider: AuthorizeNetProvider,
) -> None:
    charge = _charge("sim-timeout")
    result = await provider.purchase(MERCHANT, charge)
    assert (result.outcome, result.code, result.transaction_id) == (Outcome.UNKNOWN, "TIMEOUT", "")
    assert await provider.find_transactions(MERCHANT, charge.order_reference, _since()) == []


async def test_a_server_error_leaves_the_outcome_unknown(provider: AuthorizeNetProvider) -> None:
    charge = _charge("sim-server-error")
    result = await provider.purchase(MERCHANT, charge)
    assert (result.outcome, result.code) == (Outcome.UNKNOWN, "SERVER_ERROR")
    assert await provider.find_transactions(MERCHANT, charge.order_reference, _since()) == []


async def test_an_error_inside_an_http_200_is_an_error(
    simulator: Simulator, account: AuthorizeNetAccount
) -> None:
    wrong_key = account.model_copy(update={"transaction_key": SecretStr("not-the-key")})
    adapter = make_provider(simulator.url, wrong_key)
    try:
        result = await adapter.purchase(MERCHANT, _charge())
    finally:
        await adapter.aclose()
    assert (result.outcome, result.code) == (Outcome.ERROR, "E00007")
    assert "authentication" in result.message


async def test_an_answer_lost_is_unknown_and_the_charge_is_found_exactly_once(
    provider: AuthorizeNetProvider, simulator: Simulator
) -> None:
    charge = _charge(amount=Money(2500, "USD"))
    await simulator.control("POST", "/script", {"outcome": "lost", "invoiceNumber": charge.order_reference})
    result = await provider.purchase(MERCHANT, charge)
    assert (result.outcome, result.code, result.transaction_id) == (Outcome.UNKNOWN, "TIMEOUT", "")

    found = await provider.find_transactions(MERCHANT, charge.order_reference, _since())
    assert len(found) == 1
    (charged,) = found
    assert (charged.kind, charged.status) == (TransactionKind.PURCHASE, TransactionStatus.COMPLETED)
    assert charged.settled_amount == Decimal("25.00")
    details = await provider.transaction_details(MERCHANT, charged.transaction_id)
    assert details == charged
    assert len(await simulator.transactions(charge.order_reference)) == 1


async def test_settled_transactions_are_found_in_their_batch(
    provider: AuthorizeNetProvider, simulator: Simulator
) -> None:
    charge = _charge()
    purchased = await provider.purchase(MERCHANT, charge)
    await simulator.control("POST", "/settle")
    found = await provider.find_transactions(MERCHANT, charge.order_reference, _since())
    assert [t.transaction_id for t in found] == [purchased.transaction_id]
    assert found[0].settled and found[0].provider_status == "settledSuccessfully"


async def test_an_unknown_transaction_has_no_details(provider: AuthorizeNetProvider) -> None:
    assert await provider.transaction_details(MERCHANT, "99999999999") is None


async def test_queries_are_retried_through_server_errors(
    provider: AuthorizeNetProvider, simulator: Simulator
) -> None:
    purchased = await provider.purchase(MERCHANT, _charge())
    await simulator.control(
        "POST", "/script", {"outcome": "server-error", "times": 2, "request": "getTransactionDetailsRequest"}
    )
    details = await provider.transaction_details(MERCHANT, purchased.transaction_id)
    assert details is not None and details.transaction_id == purchased.transaction_id


async def test_a_query_that_keeps_failing_reports_the_provider_unavailable(
    provider: AuthorizeNetProvider, simulator: Simulator
) -> None:
    await simulator.control(
        "POST", "/script", {"outcome": "server-error", "times": 3, "request": "getTransactionDetailsRequest"}
    )
    with pytest.raises(ProviderUnavailable):
        await provider.transaction_details(MERCHANT, "60000000001")


async def test_the_circuit_opens_after_repeated_outages_and_then_sends_nothing(
    provider: AuthorizeNetProvider, simulator: Simulator
) -> None:
    for _ in range(BREAKER_THRESHOLD):
        outage = await provider.purchase(MERCHANT, _charge("sim-server-error"))
        assert outage.outcome is Outcome.UNKNOWN
    charge = _charge()
    paused = await provider.purchase(MERCHANT, charge)
    # Never sent, so certainly not charged: an error, not an unknown outcome.
    assert (paused.outcome, paused.code) == (Outcome.ERROR, "CIRCUIT_OPEN")
    assert await simulator.transactions(charge.order_reference) == []
    with pytest.raises(ProviderUnavailable):
        await provider.transaction_details(MERCHANT, "60000000001")


async def test_declines_do_not_open_the_circuit(provider: AuthorizeNetProvider) -> None:
    for _ in range(BREAKER_THRESHOLD + 1):
        assert (await provider.purchase(MERCHANT, _charge("sim-decline"))).outcome is Outcome.DECLINED
    assert (await provider.purchase(MERCHANT, _charge())).outcome is Outcome.APPROVED


async def test_a_provider_that_cannot_be_reached_charged_nothing(account: AuthorizeNetAccount) -> None:
    # A port just released: nothing listens there, connections are refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    adapter = make_provider(f"http://127.0.0.1:{port}", account)
    try:
        result = await adapter.purchase(MERCHANT, _charge())
    finally:
        await adapter.aclose()
    assert (result.outcome, result.code) == (Outcome.ERROR, "CONNECTION_FAILED")


async def test_a_merchant_without_an_account_is_refused(provider: AuthorizeNetProvider) -> None:
    with pytest.raises(ProviderNotConfigured):
        await provider.purchase("globex", _charge())


def test_saved_tokens_must_name_a_customer_profile_and_a_payment_profile(
    provider: AuthorizeNetProvider,
) -> None:
    provider.check_saved_token("1512345678/1512987654")
    for bad in ("1512345678", "a/b/c", "/1", "1512345678/4111 1111"):
        with pytest.raises(RuleViolation):
            provider.check_saved_token(bad)


async def test_every_change_sends_a_signed_notification(
    provider: AuthorizeNetProvider,
    simulator: Simulator,
    notifications: Notifications,
    account: AuthorizeNetAccount,
) -> None:
    charge = _charge(amount=Money(4510, "USD"))
    purchased = await provider.purchase(MERCHANT, charge)
    headers, body = await notifications.next(account.api_login_id)
    webhooks.verify_signature(body, headers, account.signature_key)
    assert headers[webhooks.SIGNATURE_HEADER].startswith("sha512=")
    notification = webhooks.parse_notification(body)
    assert notification.event_type == webhooks.AUTH_CAPTURE_CREATED
    assert (notification.entity_id, notification.invoice_number) == (
        purchased.transaction_id,
        charge.order_reference,
    )
    assert notification.auth_amount == Decimal("45.10")
    with pytest.raises(webhooks.WebhookSignatureInvalid):
        webhooks.verify_signature(body, headers, SecretStr("another-key"))

    # Authorize.Net delivers again what was not acknowledged: the very same bytes.
    await simulator.control("POST", f"/notifications/{notification.notification_id}/resend")
    again_headers, again = await notifications.next(account.api_login_id)
    assert again == body
    assert again_headers[webhooks.SIGNATURE_HEADER] == headers[webhooks.SIGNATURE_HEADER]


async def test_refunds_voids_reviews_and_chargebacks_are_notified(
    provider: AuthorizeNetProvider,
    simulator: Simulator,
    notifications: Notifications,
    account: AuthorizeNetAccount,
) -> None:
    async def next_event() -> webhooks.Notification:
        headers, body = await notifications.next(account.api_login_id)
        webhooks.verify_signature(body, headers, account.signature_key)
        return webhooks.parse_notification(body)

    authorized = await provider.authorize(MERCHANT, _charge())
    assert (await next_event()).event_type == webhooks.AUTHORIZATION_CREATED
    await provider.void(MERCHANT, authorized.transaction_id)
    assert (await next_event()).event_type == webhooks.VOID_CREATED

    held = await provider.purchase(MERCHANT, _charge("sim-review"))
    assert (await next_event()).event_type == webhooks.FRAUD_HELD
    await simulator.control("POST", f"/transactions/{held.transaction_id}/review", {"decision": "approve"})
    assert (await next_event()).event_type == webhooks.FRAUD_APPROVED

    charge = _charge(amount=Money(2000, "USD"))
    purchased = await provider.purchase(MERCHANT, charge)
    assert (await next_event()).event_type == webhooks.AUTH_CAPTURE_CREATED
    await simulator.control("POST", "/settle")
    refund = RefundRequest(purchased.transaction_id, Money(500, "USD"), "XXXX1111", charge.order_reference)
    refunded = await provider.refund(MERCHANT, refund)
    refund_event = await next_event()
    assert (refund_event.event_type, refund_event.entity_id) == (
        webhooks.REFUND_CREATED,
        refunded.transaction_id,
    )
    assert refund_event.auth_amount == Decimal("5.00")

    await simulator.control(
        "POST",
        f"/transactions/{purchased.transaction_id}/chargeback",
        {"amount": "20.00", "disputeId": "d-1"},
    )
    chargeback = await next_event()
    assert (chargeback.event_type, chargeback.entity_id) == (
        webhooks.CHARGEBACK_CREATED,
        purchased.transaction_id,
    )
    assert (chargeback.dispute_id, chargeback.auth_amount) == ("d-1", Decimal("20.00"))
    details = await provider.transaction_details(MERCHANT, purchased.transaction_id)
    assert details is not None and details.status is TransactionStatus.CHARGED_BACK


async def test_the_simulator_speaks_like_authorize_net(
    simulator: Simulator, account: AuthorizeNetAccount
) -> None:
    """What the adapter copes with: a byte order mark first, and members in the schema's order."""
    authentication = {
        "name": account.api_login_id,
        "transactionKey": account.transaction_key.get_secret_value(),
    }
    out_of_order = {
        "createTransactionRequest": {
            "merchantAuthentication": authentication,
            "transactionRequest": {"amount": "5.00", "transactionType": "authCaptureTransaction"},
        }
    }
    response = await simulator.client.post("/xml/v1/request.api", json=out_of_order)
    assert response.status_code == 200
    assert response.content.startswith(b"\xef\xbb\xbf")
    answer = json.loads(response.content.decode("utf-8-sig"))
    assert answer["messages"]["resultCode"] == "Error"
    assert answer["messages"]["message"][0]["code"] == "E00003"
