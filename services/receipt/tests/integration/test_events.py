"""Ledger events in, documents out: over the real RabbitMQ, PostgreSQL and catalog."""

from __future__ import annotations

import asyncio
import secrets

import aio_pika
import pytest
from tally.receipt.v1 import receipt_service_pb2 as api
from tally_kit.db import merchant_database_name
from tally_kit.errors import Unavailable
from tally_receipt.app import build_app
from tally_receipt.catalog_client import CatalogMerchantProfiles
from tally_receipt.domain import MerchantProfile
from tally_receipt.testing import (
    SETTLE_TIME,
    Ledger,
    Stack,
    database_exists,
    delete_topology,
    eventually,
    merchant_config,
    new_id,
    new_merchant_id,
    parked_messages,
    pdf_text,
    purchase_settled,
    receipt_settings,
    refund_applied,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def merchant_id(stack: Stack) -> str:
    merchant_id = new_merchant_id("events")
    await stack.catalog.create_merchant(
        merchant_id, merchant_config(legal_name="Acme Events SAS", prefix="EVT")
    )
    return merchant_id


@pytest.fixture
def user_id() -> str:
    return f"user-{secrets.token_hex(4)}"


async def test_a_settled_purchase_gets_a_receipt_with_the_catalog_s_merchant_details(
    stack: Stack, merchant_id: str, user_id: str
) -> None:
    order_id = f"order-{new_id()}"
    await stack.ledger.publish(
        "ledger.purchase_settled",
        purchase_settled(merchant_id, user_id, order_id, 1000),
        merchant_id=merchant_id,
    )

    response = await stack.receipts.wait_for_receipt(merchant_id, user_id, order_id)
    receipt = response.receipt
    assert receipt.number.startswith("EVT-")
    assert receipt.merchant.legal_name == "Acme Events SAS"
    assert receipt.merchant.tax_id == "FR40303265045"
    assert (receipt.tax_regime.rate_percent, receipt.tax_regime.prices_include_tax) == ("20", True)
    assert (
        receipt.totals.net.amount_minor,
        receipt.totals.tax.amount_minor,
        receipt.totals.gross.amount_minor,
    ) == (
        833,
        167,
        1000,
    )
    assert receipt.settle_time.ToDatetime().replace(tzinfo=SETTLE_TIME.tzinfo) == SETTLE_TIME
    assert list(response.credit_notes) == []

    # Announced once committed.
    await eventually(
        lambda: any(
            event.receipt.receipt_id == receipt.receipt_id
            for event in stack.events.of_type("receipt.receipt_issued")
        )
    )

    rendered = await stack.receipts.stub.RenderReceiptPdf(
        api.RenderReceiptPdfRequest(merchant_id=merchant_id, receipt_id=receipt.receipt_id),
        metadata=stack.receipts.metadata(merchant_id),
    )
    assert rendered.file_name == f"{receipt.number}.pdf"
    text = pdf_text(rendered.pdf)
    for expected in (receipt.number, "Acme Events SAS", "8.33 EUR", "1.67 EUR", "10.00 EUR"):
        assert expected in text


async def test_a_purchase_told_twice_gets_one_receipt(stack: Stack, merchant_id: str, user_id: str) -> None:
    order_id = f"order-{new_id()}"
    event = purchase_settled(merchant_id, user_id, order_id, 500)
    envelope = await stack.ledger.publish("ledger.purchase_settled", event, merchant_id=merchant_id)
    # The same message redelivered, then the same order in another event.
    await stack.ledger.publish_envelope(envelope)
    await stack.ledger.publish("ledger.purchase_settled", event, merchant_id=merchant_id)
    marker = f"order-{new_id()}"
    await stack.ledger.publish(
        "ledger.purchase_settled",
        purchase_settled(merchant_id, user_id, marker, 700),
        merchant_id=merchant_id,
    )

    await stack.receipts.wait_for_receipt(merchant_id, user_id, marker)
    receipts = (await stack.receipts.list(merchant_id, user_id)).receipts
    assert sorted(receipt.order_id for receipt in receipts) == sorted([order_id, marker])


async def test_an_order_that_paid_nothing_gets_no_receipt(
    stack: Stack, merchant_id: str, user_id: str
) -> None:
    free, paid = f"free-{new_id()}", f"paid-{new_id()}"
    await stack.ledger.publish(
        "ledger.purchase_settled", purchase_settled(merchant_id, user_id, free, 0), merchant_id=merchant_id
    )
    await stack.ledger.publish(
        "ledger.purchase_settled", purchase_settled(merchant_id, user_id, paid, 100), merchant_id=merchant_id
    )

    await stack.receipts.wait_for_receipt(merchant_id, user_id, paid)
    assert [receipt.order_id for receipt in (await stack.receipts.list(merchant_id, user_id)).receipts] == [
        paid
    ]


async def test_a_refund_gets_a_credit_note_referring_to_the_receipt(
    stack: Stack, merchant_id: str, user_id: str
) -> None:
    order_id = f"order-{new_id()}"
    await stack.ledger.publish(
        "ledger.purchase_settled",
        purchase_settled(merchant_id, user_id, order_id, 1000),
        merchant_id=merchant_id,
    )
    receipt = (await stack.receipts.wait_for_receipt(merchant_id, user_id, order_id)).receipt
    await stack.ledger.publish(
        "ledger.refund_applied",
        refund_applied(merchant_id, user_id, order_id, 400, "refund-a"),
        merchant_id=merchant_id,
    )

    response = await stack.receipts.wait_for_credit_notes(merchant_id, receipt.receipt_id, 1)
    [note] = response.credit_notes
    assert (note.receipt_id, note.receipt_number) == (receipt.receipt_id, receipt.number)
    assert note.number.startswith("EVT-") and "-CN" in note.number
    assert (
        note.amounts.net.amount_minor,
        note.amounts.tax.amount_minor,
        note.amounts.gross.amount_minor,
    ) == (
        333,
        67,
        400,
    )
    assert note.merchant.legal_name == "Acme Events SAS"
    await eventually(
        lambda: any(
            event.credit_note.credit_note_id == note.credit_note_id
            for event in stack.events.of_type("receipt.credit_note_issued")
        )
    )
    rendered = await stack.receipts.stub.RenderCreditNotePdf(
        api.RenderCreditNotePdfRequest(merchant_id=merchant_id, credit_note_id=note.credit_note_id),
        metadata=stack.receipts.metadata(merchant_id),
    )
    text = pdf_text(rendered.pdf)
    for expected in (note.number, receipt.number, "Acme Events SAS", "4.00 EUR"):
        assert expected in text


async def test_a_refund_arriving_before_its_purchase_waits_for_the_receipt(
    stack: Stack, merchant_id: str, user_id: str
) -> None:
    order_id = f"order-{new_id()}"
    await stack.ledger.publish(
        "ledger.refund_applied",
        refund_applied(merchant_id, user_id, order_id, 1000, f"refund-{new_id()}"),
        merchant_id=merchant_id,
    )
    await asyncio.sleep(0.1)
    await stack.ledger.publish(
        "ledger.purchase_settled",
        purchase_settled(merchant_id, user_id, order_id, 1000),
        merchant_id=merchant_id,
    )

    receipt = (await stack.receipts.wait_for_receipt(merchant_id, user_id, order_id)).receipt
    [note] = (await stack.receipts.wait_for_credit_notes(merchant_id, receipt.receipt_id, 1)).credit_notes
    assert note.amounts.gross.amount_minor == 1000


async def test_a_merchant_s_first_event_creates_its_database_and_later_config_changes_reach_new_receipts_only(
    stack: Stack, user_id: str
) -> None:
    merchant_id = new_merchant_id("fresh")
    await stack.catalog.create_merchant(merchant_id, merchant_config(legal_name="Old Name SAS", prefix="OLD"))
    first, second = f"order-{new_id()}", f"order-{new_id()}"
    await stack.ledger.publish(
        "ledger.purchase_settled", purchase_settled(merchant_id, user_id, first, 100), merchant_id=merchant_id
    )
    before = (await stack.receipts.wait_for_receipt(merchant_id, user_id, first)).receipt

    await stack.catalog.rename_merchant(merchant_id, "New Name SAS")
    await stack.ledger.publish(
        "ledger.purchase_settled",
        purchase_settled(merchant_id, user_id, second, 100),
        merchant_id=merchant_id,
    )
    after = (await stack.receipts.wait_for_receipt(merchant_id, user_id, second)).receipt

    assert (before.merchant.legal_name, before.merchant.config_revision) == ("Old Name SAS", 1)
    assert (after.merchant.legal_name, after.merchant.config_revision) == ("New Name SAS", 2)
    # The first receipt keeps its snapshot.
    assert (
        await stack.receipts.get(merchant_id, before.receipt_id)
    ).receipt.merchant.legal_name == "Old Name SAS"
    assert [before.sequence, after.sequence] == [1, 2]


async def test_malformed_events_are_parked_while_the_next_ones_are_handled(
    stack: Stack, merchant_id: str, user_id: str
) -> None:
    consumer = stack.settings.consumer_name
    amqp_url = stack.settings.amqp_url.get_secret_value()
    parked_before = await parked_messages(amqp_url, consumer)

    # Not an envelope at all.
    await stack.ledger.publish_raw(b"\x00not protobuf\xff", "ledger.purchase_settled", message_id=new_id())
    # An envelope whose purchase is missing what a receipt needs.
    broken = purchase_settled(merchant_id, "", f"order-{new_id()}", -1)
    await stack.ledger.publish("ledger.purchase_settled", broken, merchant_id=merchant_id)
    # A purchase of a merchant the catalog does not know.
    ghost = new_merchant_id("ghost")
    await stack.ledger.publish(
        "ledger.purchase_settled",
        purchase_settled(ghost, user_id, f"order-{new_id()}", 100),
        merchant_id=ghost,
    )
    # And then a good one.
    order_id = f"order-{new_id()}"
    await stack.ledger.publish(
        "ledger.purchase_settled",
        purchase_settled(merchant_id, user_id, order_id, 100),
        merchant_id=merchant_id,
    )

    await stack.receipts.wait_for_receipt(merchant_id, user_id, order_id)

    async def all_parked() -> bool:
        return await parked_messages(amqp_url, consumer) == parked_before + 3

    await eventually(all_parked)
    # The unknown merchant got no database.
    assert not await database_exists(stack.settings, merchant_database_name(stack.settings, ghost))


class FlakyCatalog:
    """The real catalog behind an outage of its first `failures` reads."""

    def __init__(self, inner: CatalogMerchantProfiles, failures: int) -> None:
        self._inner = inner
        self.failures_left = failures

    async def profile(self, merchant_id: str) -> MerchantProfile:
        if self.failures_left:
            self.failures_left -= 1
            raise Unavailable("the catalog is down", reason="CATALOG_UNAVAILABLE")
        return await self._inner.profile(merchant_id)

    async def close(self) -> None:
        await self._inner.close()


async def test_a_catalog_outage_delays_the_receipt_and_loses_nothing(stack: Stack, user_id: str) -> None:
    # A second replica with its own exchange, consumer and catalog reader, on the same databases.
    exchange = f"{stack.settings.events_exchange}.outage"
    settings = receipt_settings(
        stack.settings.db_prefix,
        exchange,
        stack.catalog_port,
        consumer_name=f"{stack.settings.db_prefix}receipt-outage",
        consumer_delivery_limit=5,
    )
    flaky = FlakyCatalog(CatalogMerchantProfiles.open(settings), failures=3)
    app = build_app(settings, profiles=flaky)
    merchant_id = new_merchant_id("outage")
    await stack.catalog.create_merchant(merchant_id, merchant_config(prefix="OUT"))
    ledger = Ledger(settings.amqp_url.get_secret_value(), exchange)
    await app.start()
    await ledger.start()
    try:
        order_id = f"order-{new_id()}"
        await ledger.publish(
            "ledger.purchase_settled",
            purchase_settled(merchant_id, user_id, order_id, 100),
            merchant_id=merchant_id,
        )
        receipt = (await stack.receipts.wait_for_receipt(merchant_id, user_id, order_id)).receipt
        assert flaky.failures_left == 0
        assert receipt.order_id == order_id
        assert await parked_messages(settings.amqp_url.get_secret_value(), settings.consumer_name) == 0
    finally:
        await ledger.close()
        await app.stop()
        connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
        try:
            await delete_topology(await connection.channel(), exchange, [settings.consumer_name])
        finally:
            await connection.close()
