"""The ledger's rules through the servicer, on the real PostgreSQL: FIFO, debt and its
settlement, refunds, chargebacks, expiry, pinned rates, rounding, idempotent settlements and
grants, adjustments, sign-up grants and balances, each with its edges."""

from __future__ import annotations

import secrets
from datetime import timedelta
from decimal import Decimal
from uuid import UUID

import pytest
from ledger_harness import (
    Client,
    Clock,
    MemoryCatalog,
    credits,
    instant,
    new_id,
    new_user,
    published,
    refusal,
    timestamp,
)
from tally.common.v1.money_pb2 import Credits, Money
from tally.ledger.v1 import ledger_service_pb2 as api
from tally.ledger.v1 import resources_pb2 as res
from tally_kit.db.directory import MerchantDirectory
from tally_kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tally_kit.uow import Transaction
from tally_ledger import events
from tally_ledger.catalog import Distribution, GrantPolicy
from tally_ledger.domain import Operation, OperationState
from tally_ledger.servicer import LedgerServicer
from tally_ledger.services import Ledger

pytestmark = pytest.mark.integration

DAY = timedelta(days=1)


def amounts(entries: list[res.LedgerEntry]) -> list[tuple[int, str, str]]:
    """(kind, amount, lot id) of each entry, in order."""
    return [(e.kind, e.amount.value, e.lot_id) for e in entries]


# --- registration ---------------------------------------------------------------------------


async def test_registering_issues_every_signup_grant_once(
    servicer: LedgerServicer, catalog: MemoryCatalog, directory: MerchantDirectory, clock: Clock
) -> None:
    merchant_id = f"signup-{secrets.token_hex(3)}"
    catalog.add_merchant(merchant_id)
    welcome = catalog.add_product(
        merchant_id, "25", days=30, distribution=Distribution.GRANT, policy=GrantPolicy.APPLY_ON_SIGNUP
    )
    bonus = catalog.add_product(
        merchant_id, "5", distribution=Distribution.GRANT, policy=GrantPolicy.APPLY_ON_SIGNUP
    )
    # Neither of these is a sign-up grant.
    catalog.add_product(merchant_id, "7", distribution=Distribution.GRANT, policy=GrantPolicy.MANUAL_GRANT)
    catalog.add_product(
        merchant_id, "9", distribution=Distribution.GRANT, policy=GrantPolicy.APPLY_ON_SIGNUP, archived=True
    )
    client = Client(servicer, merchant_id, clock)
    user = new_user()

    registered = await client.register(user)
    assert registered.account.balance.value == "30" and registered.account.debt.value == "0"
    assert {(lot.product_id, lot.credits.value, lot.source) for lot in registered.signup_lots} == {
        (str(welcome.product_id), "25", res.LOT_SOURCE_GRANT),
        (str(bonus.product_id), "5", res.LOT_SOURCE_GRANT),
    }
    expiring = next(lot for lot in registered.signup_lots if lot.product_id == str(welcome.product_id))
    assert instant(expiring.expire_time) == clock.now + 30 * DAY

    again = await client.register(user)
    assert again.account == registered.account and list(again.signup_lots) == []
    assert len(await client.lots(user)) == 2
    issued = await published(directory, merchant_id, events.LOT_ISSUED)
    assert sorted(event.lot.lot_id for event in issued) == sorted(
        lot.lot_id for lot in registered.signup_lots
    )

    # A purchase by a user never registered registers them, sign-up grants included.
    product = catalog.add_product(merchant_id, "100")
    buyer = new_user("buyer")
    settled = await client.settle(buyer, product.product_id)
    assert settled.account.balance.value == "130"
    assert len(await client.lots(buyer)) == 3


async def test_an_unknown_merchant_is_refused_and_gets_no_database(
    servicer: LedgerServicer, directory: MerchantDirectory, clock: Clock
) -> None:
    ghost = f"ghost-{secrets.token_hex(3)}"
    client = Client(servicer, ghost, clock)
    refused = await refusal(client.register(new_user()))
    assert isinstance(refused, NotFound) and refused.reason == "MERCHANT_NOT_FOUND"
    refused = await refusal(client.balance(new_user()))
    assert isinstance(refused, NotFound) and refused.reason == "MERCHANT_NOT_FOUND"
    assert not await directory.is_provisioned(ghost)


async def test_a_user_never_registered_is_not_found(client: Client) -> None:
    stranger = new_user("stranger")
    for call in (
        client.balance(stranger),
        client.lots(stranger),
        client.history(stranger),
        client.open(stranger),
        client.adjust(stranger, "5"),
    ):
        refused = await refusal(call)
        assert isinstance(refused, NotFound) and refused.reason == "USER_NOT_REGISTERED"


# --- FIFO, debt and its settlement ----------------------------------------------------------


async def test_debits_take_fifo_across_mixed_expiries_never_expiring_last(
    client: Client, clock: Clock
) -> None:
    user = new_user()
    await client.register(user)
    never = (await client.grant(user, "10")).lot
    late = (await client.grant(user, "10", expires_at=clock.now + 30 * DAY)).lot
    soon = (await client.grant(user, "10", expires_at=clock.now + 10 * DAY)).lot
    clock.advance(timedelta(seconds=1))
    # Same expiry as `soon`, issued after it: the tie goes to the earlier issue.
    soon_too = (await client.grant(user, "10", expires_at=instant(soon.expire_time))).lot

    closed = await client.consume(user, "12500")  # 25 credits at 0.002

    debit = res.ENTRY_KIND_DEBIT
    assert amounts(list(closed.entries)) == [
        (debit, "-10", soon.lot_id),
        (debit, "-10", soon_too.lot_id),
        (debit, "-5", late.lot_id),
    ]
    assert closed.account.balance.value == "15" and closed.operation.credits.value == "25"
    remaining = {lot.lot_id: (lot.remaining.value, lot.state) for lot in await client.lots(user)}
    assert remaining == {
        never.lot_id: ("10", res.LOT_STATE_ACTIVE),
        late.lot_id: ("5", res.LOT_STATE_ACTIVE),
        soon.lot_id: ("0", res.LOT_STATE_DEPLETED),
        soon_too.lot_id: ("0", res.LOT_STATE_DEPLETED),
    }
    balance = await client.balance(user)
    assert [(lot.lot_id, lot.remaining.value) for lot in balance.lots] == [
        (late.lot_id, "5"),
        (never.lot_id, "10"),
    ]
    assert balance.next_expire_time == late.expire_time and balance.next_expiring_credits.value == "5"
    assert (balance.granted.value, balance.purchased.value) == ("15", "0")


async def test_debt_is_refused_new_operations_until_a_new_lot_settles_it_exactly(
    client: Client, directory: MerchantDirectory, merchant_id: str, clock: Clock
) -> None:
    user = new_user()
    await client.register(user)
    first = (await client.grant(user, "3")).lot
    clock.advance(timedelta(seconds=1))
    second = (await client.grant(user, "2")).lot

    closed = await client.consume(user, "3500", workflow_id="wf-debt")  # 7 credits

    debit = res.ENTRY_KIND_DEBIT
    assert amounts(list(closed.entries)) == [
        (debit, "-3", first.lot_id),
        (debit, "-2", second.lot_id),
        (debit, "-2", ""),
    ]
    assert (closed.account.balance.value, closed.account.debt.value) == ("-2", "2")
    negative = [
        e
        for e in await published(directory, merchant_id, events.BALANCE_WENT_NEGATIVE)
        if e.account.user_id == user
    ]
    assert len(negative) == 1
    assert negative[0].cause == res.ENTRY_KIND_DEBIT and negative[0].account == closed.account
    assert negative[0].operation_id == closed.operation.operation_id and negative[0].workflow_id == "wf-debt"
    assert negative[0].reference == f"operation:{closed.operation.operation_id}"

    refused = await refusal(client.open(user))
    assert isinstance(refused, FailedPrecondition) and refused.reason == "NEGATIVE_BALANCE"

    # The new lot is issued at full value and settles the debt at once with a balanced pair.
    settling = await client.grant(user, "2")
    assert settling.lot.credits.value == "2" and settling.lot.remaining.value == "0"
    assert settling.lot.state == res.LOT_STATE_DEPLETED
    assert (settling.account.balance.value, settling.account.debt.value) == ("0", "0")
    history = await client.history(user)
    pair = [e for e in history if e.kind == res.ENTRY_KIND_DEBT_SETTLEMENT]
    assert amounts(pair) == [
        (res.ENTRY_KIND_DEBT_SETTLEMENT, "-2", settling.lot.lot_id),
        (res.ENTRY_KIND_DEBT_SETTLEMENT, "2", ""),
    ]
    assert {e.reference for e in pair} == {f"settlement:{settling.lot.lot_id}"}
    issued = [
        e
        for e in await published(directory, merchant_id, events.LOT_ISSUED)
        if e.lot.lot_id == settling.lot.lot_id
    ]
    assert issued[0].debt_settled.value == "2" and issued[0].account == settling.account

    assert (await client.open(user)).state == res.OPERATION_STATE_OPEN


async def test_a_lot_larger_than_the_debt_keeps_the_rest(client: Client) -> None:
    user = new_user()
    await client.register(user)
    await client.consume(user, "500")  # 1 credit of debt, no lots at all
    settling = await client.grant(user, "10")
    assert settling.lot.remaining.value == "9" and settling.account.balance.value == "9"
    balance = await client.balance(user)
    assert (balance.balance.value, balance.debt.value, balance.granted.value) == ("9", "0", "9")


# --- purchases, refunds and chargebacks ------------------------------------------------------


async def test_settling_an_order_is_idempotent_on_the_order(
    client: Client, catalog: MemoryCatalog, merchant_id: str, directory: MerchantDirectory
) -> None:
    product = catalog.add_product(merchant_id, "100", days=30)
    user = new_user()
    request = client.settle_request(user, product.product_id)

    first = await client.servicer.SettlePurchase(request, None)
    assert first.lot.source == res.LOT_SOURCE_PURCHASE and first.lot.order_id == request.order_id
    assert first.lot.credits.value == "100" and first.lot.reference == f"order:{request.order_id}"
    # The same request again is the same answer; the same order under another request id
    # returns the same lot.
    assert await client.servicer.SettlePurchase(request, None) == first
    again = api.SettlePurchaseRequest()
    again.CopyFrom(request)
    again.request_id = new_id()
    assert (await client.servicer.SettlePurchase(again, None)).lot.lot_id == first.lot.lot_id
    assert len(await client.lots(user)) == 1
    settled = [
        e
        for e in await published(directory, merchant_id, events.PURCHASE_SETTLED)
        if e.order_id == request.order_id
    ]
    assert len(settled) == 1
    assert settled[0].lot_id == first.lot.lot_id and settled[0].product_name == product.name
    assert settled[0].amount_paid == request.amount_paid and settled[0].credits.value == "100"
    assert settled[0].expire_time == first.lot.expire_time

    for change in ({"amount_paid": Money(amount_minor=1, currency="EUR")}, {"user_id": new_user()}):
        other = api.SettlePurchaseRequest()
        other.CopyFrom(again)
        other.request_id = new_id()
        for name, value in change.items():
            if isinstance(value, Money):
                getattr(other, name).CopyFrom(value)
            else:
                setattr(other, name, value)
        refused = await refusal(client.servicer.SettlePurchase(other, None))
        assert isinstance(refused, AlreadyExists) and refused.reason == "ORDER_ALREADY_SETTLED"
        assert refused.metadata == {"order_id": request.order_id}


async def test_only_sellable_products_settle_even_once_archived(
    client: Client, catalog: MemoryCatalog, merchant_id: str
) -> None:
    user = new_user()
    archived = catalog.add_product(merchant_id, "40", archived=True)
    assert (await client.settle(user, archived.product_id)).lot.credits.value == "40"
    grant = catalog.add_product(
        merchant_id, "5", distribution=Distribution.GRANT, policy=GrantPolicy.MANUAL_GRANT
    )
    refused = await refusal(client.settle(user, grant.product_id))
    assert isinstance(refused, FailedPrecondition) and refused.reason == "PRODUCT_NOT_SELLABLE"
    refused = await refusal(client.settle(user, UUID(int=7)))
    assert isinstance(refused, NotFound) and refused.reason == "PRODUCT_NOT_FOUND"


async def test_a_refund_after_partial_use_revokes_what_is_left(
    client: Client, catalog: MemoryCatalog, merchant_id: str, directory: MerchantDirectory
) -> None:
    product = catalog.add_product(merchant_id, "100")
    user = new_user()
    order = (await client.settle(user, product.product_id, paid=990)).lot
    await client.consume(user, "15000")  # 30 credits

    refunded = await client.refund(order.order_id, 500, reference="refund-1", reason="unhappy")
    assert refunded.credits_revoked.value == "70"
    assert refunded.lot.state == res.LOT_STATE_REFUNDED and refunded.lot.remaining.value == "0"
    assert amounts(list(refunded.entries)) == [(res.ENTRY_KIND_REFUND_REVOCATION, "-70", order.lot_id)]
    assert refunded.entries[0].revoked_lot_id == order.lot_id
    assert refunded.account.balance.value == "0"

    # A further partial refund revokes nothing more but is recorded and announced.
    second = await client.refund(order.order_id, 400, reference="refund-2")
    assert second.credits_revoked.value == "0" and list(second.entries) == []
    announced = [
        e
        for e in await published(directory, merchant_id, events.REFUND_APPLIED)
        if e.order_id == order.order_id
    ]
    assert [
        (e.refund_reference, e.amount_refunded.amount_minor, e.total_refunded.amount_minor) for e in announced
    ] == [
        ("refund-1", 500, 500),
        ("refund-2", 400, 900),
    ]
    assert announced[0].credits_revoked.value == "70" and announced[0].amount_paid.amount_minor == 990

    refused = await refusal(client.refund(order.order_id, 100))
    assert isinstance(refused, FailedPrecondition) and refused.reason == "REFUND_EXCEEDS_PAYMENT"
    # The same refund reference again is answered as the first time; for another refund, refused.
    replay = await client.refund(order.order_id, 500, reference="refund-1", reason="unhappy")
    assert (replay.credits_revoked, list(replay.entries), replay.lot) == (
        refunded.credits_revoked,
        list(refunded.entries),
        refunded.lot,
    )
    refused = await refusal(client.refund(order.order_id, 90, reference="refund-1"))
    assert isinstance(refused, AlreadyExists) and refused.reason == "REFUND_REFERENCE_REUSED"
    refused = await refusal(client.refund("never-settled", 100))
    assert isinstance(refused, NotFound) and refused.reason == "ORDER_NOT_FOUND"


async def test_a_chargeback_revokes_full_value_into_debt(
    client: Client, catalog: MemoryCatalog, merchant_id: str, directory: MerchantDirectory, clock: Clock
) -> None:
    product = catalog.add_product(merchant_id, "100", days=30)
    user = new_user()
    other = (await client.grant(user, "20")).lot  # never expires: consumed after the purchase
    order = (await client.settle(user, product.product_id)).lot
    await client.consume(user, "30000")  # 60 credits, all from the purchase (it expires first)

    charged = await client.chargeback(order.order_id, 990, reference="dispute-1")
    assert charged.credits_revoked.value == "100"
    kind = res.ENTRY_KIND_CHARGEBACK_REVOCATION
    assert amounts(list(charged.entries)) == [
        (kind, "-40", order.lot_id),
        (kind, "-20", other.lot_id),
        (kind, "-40", ""),
    ]
    assert {e.revoked_lot_id for e in charged.entries} == {order.lot_id}
    assert charged.lot.state == res.LOT_STATE_CHARGED_BACK
    assert (charged.account.balance.value, charged.account.debt.value) == ("-40", "40")
    applied = [
        e
        for e in await published(directory, merchant_id, events.CHARGEBACK_APPLIED)
        if e.order_id == order.order_id
    ]
    assert (
        len(applied) == 1
        and applied[0].credits_revoked.value == "100"
        and applied[0].account == charged.account
    )
    negative = [
        e
        for e in await published(directory, merchant_id, events.BALANCE_WENT_NEGATIVE)
        if e.account.user_id == user
    ]
    assert [(e.cause, e.reference) for e in negative] == [(kind, "chargeback:dispute-1")]

    assert await client.chargeback(order.order_id, 990, reference="dispute-1") == charged
    refused = await refusal(client.chargeback(order.order_id, 990, reference="dispute-2"))
    assert isinstance(refused, FailedPrecondition) and refused.reason == "ORDER_ALREADY_CHARGED_BACK"
    refused = await refusal(client.refund(order.order_id, 100))
    assert isinstance(refused, FailedPrecondition) and refused.reason == "ORDER_CHARGED_BACK"


async def test_a_chargeback_after_a_refund_takes_back_what_was_consumed(
    client: Client, catalog: MemoryCatalog, merchant_id: str
) -> None:
    product = catalog.add_product(merchant_id, "50")
    user = new_user()
    order = (await client.settle(user, product.product_id)).lot
    await client.consume(user, "5000")  # 10 credits
    await client.refund(order.order_id, 990)
    charged = await client.chargeback(order.order_id, 990)
    # The refund took the 40 left; the chargeback takes back the 10 consumed, as debt.
    assert charged.credits_revoked.value == "10" and charged.lot.state == res.LOT_STATE_CHARGED_BACK
    assert (charged.account.balance.value, charged.account.debt.value) == ("-10", "10")
    refused = await refusal(client.chargeback(order.order_id, 1, reference="other-currency"))
    assert isinstance(refused, FailedPrecondition) and refused.reason == "ORDER_ALREADY_CHARGED_BACK"


# --- expiry ---------------------------------------------------------------------------------


async def test_a_partly_used_lot_expires_with_what_is_left(
    client: Client, ledger: Ledger, directory: MerchantDirectory, merchant_id: str, clock: Clock
) -> None:
    user = new_user()
    await client.register(user)
    lot = (await client.grant(user, "10", expires_at=clock.now + DAY)).lot
    await client.consume(user, "2000")  # 4 credits
    clock.advance(2 * DAY)

    # Past its expiry and not yet written off: counted apart, never consumed.
    balance = await client.balance(user)
    assert (balance.balance.value, balance.awaiting_expiry.value, balance.granted.value) == ("6", "6", "0")
    assert list(balance.lots) == []
    assert [lot_.state for lot_ in await client.lots(user)] == [res.LOT_STATE_EXPIRED]

    async with directory.transaction(merchant_id) as conn:
        expired = await ledger.expire_lots_of_user(
            Transaction(conn, merchant_id=merchant_id, producer="ledger"), merchant_id, user
        )
    assert [(str(e.lot.lot_id), e.credits_expired) for e in expired] == [(lot.lot_id, Decimal(6))]
    history = await client.history(user, kinds=[res.ENTRY_KIND_EXPIRY])
    assert amounts(history) == [(res.ENTRY_KIND_EXPIRY, "-6", lot.lot_id)]
    assert history[0].reference == f"expiry:{lot.lot_id}"
    balance = await client.balance(user)
    assert (balance.balance.value, balance.awaiting_expiry.value) == ("0", "0")
    announced = [
        e for e in await published(directory, merchant_id, events.LOT_EXPIRED) if e.lot.lot_id == lot.lot_id
    ]
    assert len(announced) == 1 and announced[0].credits_expired.value == "6"
    assert announced[0].lot.state == res.LOT_STATE_EXPIRED and announced[0].lot.remaining.value == "0"

    # Nothing is left to expire.
    async with directory.transaction(merchant_id) as conn:
        assert (
            await ledger.expire_lots_of_user(
                Transaction(conn, merchant_id=merchant_id, producer="ledger"), merchant_id, user
            )
            == []
        )


# --- operations -----------------------------------------------------------------------------


async def test_a_rate_change_between_open_and_close_uses_the_pinned_rate(
    client: Client, catalog: MemoryCatalog, merchant_id: str, clock: Clock
) -> None:
    code = f"api.calls-{secrets.token_hex(2)}"
    catalog.schedule_rate(merchant_id, code, "0.5", clock.now)
    user = new_user()
    await client.register(user)
    await client.grant(user, "100")
    operation = await client.open(user, code=code, workflow_id="wf-1")
    assert (operation.operation_version, operation.credits_per_unit.value) == (1, "0.5")

    clock.advance(timedelta(seconds=1))
    catalog.schedule_rate(merchant_id, code, "2", clock.now)
    clock.advance(timedelta(seconds=1))
    closed = await client.close(operation.operation_id, "10")

    assert closed.operation.credits.value == "5" and closed.operation.state == res.OPERATION_STATE_CLOSED
    (entry,) = closed.entries
    assert entry.amount.value == "-5"
    assert (entry.operation.operation_version, entry.operation.credits_per_unit.value) == (1, "0.5")
    assert (entry.operation.resource_amount, entry.operation.workflow_id) == ("10", "wf-1")
    # An operation opened now pins the new version.
    assert (await client.open(user, code=code)).operation_version == 2


@pytest.mark.parametrize(
    ("resource", "charged"),
    [
        ("2.5", "0.000002"),  # 0.0000025: a tie, to the even neighbour
        ("3.5", "0.000004"),  # 0.0000035: a tie, to the even neighbour
        ("2.6", "0.000003"),  # nearest
        ("0.4", "0.000001"),  # below half a millionth: never free
        ("1000000", "1"),
    ],
)
async def test_rounding_half_even_and_never_free(
    client: Client, catalog: MemoryCatalog, merchant_id: str, clock: Clock, resource: str, charged: str
) -> None:
    code = f"micro.calls-{secrets.token_hex(2)}"
    catalog.schedule_rate(merchant_id, code, "0.000001", clock.now)
    user = new_user()
    await client.register(user)
    await client.grant(user, "1")
    closed = await client.consume(user, resource, code=code)
    assert closed.operation.credits.value == charged
    assert credits(closed.account.balance) == 1 - Decimal(charged)


async def test_recording_nothing_closes_without_a_debit(client: Client) -> None:
    user = new_user()
    await client.register(user)
    closed = await client.consume(user, "0")
    assert closed.operation.state == res.OPERATION_STATE_CLOSED and closed.operation.credits.value == "0"
    assert list(closed.entries) == [] and closed.account.balance.value == "0"


async def test_one_operation_open_at_a_time_and_each_ends_once(
    client: Client, catalog: MemoryCatalog, merchant_id: str, clock: Clock
) -> None:
    user = new_user()
    await client.register(user)
    operation = await client.open(user)
    refused = await refusal(client.open(user))
    assert isinstance(refused, FailedPrecondition) and refused.reason == "OPERATION_ALREADY_OPEN"
    assert refused.metadata == {"operation_id": operation.operation_id}

    canceled = await client.servicer.CancelOperation(
        api.CancelOperationRequest(
            merchant_id=client.merchant_id, request_id=new_id(), operation_id=operation.operation_id
        ),
        None,
    )
    assert canceled.operation.state == res.OPERATION_STATE_CANCELED and canceled.operation.HasField(
        "close_time"
    )
    fetched = await client.servicer.GetOperation(
        api.GetOperationRequest(merchant_id=client.merchant_id, operation_id=operation.operation_id), None
    )
    assert fetched.operation == canceled.operation
    refused = await refusal(client.close(operation.operation_id, "10"))
    assert isinstance(refused, FailedPrecondition) and refused.reason == "OPERATION_NOT_OPEN"
    refused = await refusal(client.close("0b6f3c1e-8f0a-4c5e-9a51-2f4f1c9e7d10", "10"))
    assert isinstance(refused, NotFound) and refused.reason == "OPERATION_NOT_FOUND"

    refused = await refusal(client.open(user, code="never.scheduled"))
    assert isinstance(refused, NotFound) and refused.reason == "OPERATION_TYPE_NOT_FOUND"
    future_code = f"later.calls-{secrets.token_hex(2)}"
    catalog.schedule_rate(merchant_id, future_code, "1", clock.now + DAY)
    refused = await refusal(client.open(user, code=future_code))
    assert isinstance(refused, NotFound) and refused.reason == "OPERATION_TYPE_NOT_ACTIVE"


async def test_an_operation_left_open_times_out_without_a_debit(
    client: Client, ledger: Ledger, directory: MerchantDirectory, merchant_id: str, clock: Clock
) -> None:
    user = new_user()
    await client.register(user)
    operation = await client.open(user)
    timeout = timedelta(minutes=15)

    async def time_out() -> Operation | None:
        async with directory.transaction(merchant_id) as conn:
            tx = Transaction(conn, merchant_id=merchant_id, producer="ledger")
            return await ledger.time_out_operation(tx, merchant_id, UUID(operation.operation_id), timeout)

    assert await time_out() is None  # not due yet
    clock.advance(timeout)
    timed_out = await time_out()
    assert timed_out is not None and timed_out.state is OperationState.TIMED_OUT
    assert await time_out() is None  # no longer open
    refused = await refusal(client.close(operation.operation_id, "1"))
    assert isinstance(refused, FailedPrecondition) and refused.reason == "OPERATION_NOT_OPEN"
    assert (await client.open(user)).state == res.OPERATION_STATE_OPEN


# --- grants and adjustments -----------------------------------------------------------------


async def test_grants_are_idempotent_on_their_key(
    client: Client, catalog: MemoryCatalog, merchant_id: str, clock: Clock
) -> None:
    manual = catalog.add_product(
        merchant_id, "50", days=7, distribution=Distribution.GRANT, policy=GrantPolicy.MANUAL_GRANT
    )
    user = new_user()
    key = f"recurring_{secrets.token_hex(4)}"
    request = api.GrantCreditsRequest(
        merchant_id=merchant_id,
        request_id=new_id(),
        user_id=user,
        grant_key=key,
        product_id=str(manual.product_id),
        source=res.LOT_SOURCE_SUBSCRIPTION,
    )
    first = await client.servicer.GrantCredits(request, None)
    assert (first.lot.source, first.lot.credits.value, first.lot.reference) == (
        res.LOT_SOURCE_SUBSCRIPTION,
        "50",
        f"grant:{key}",
    )
    assert instant(first.lot.expire_time) == clock.now + 7 * DAY

    clock.advance(timedelta(seconds=1))
    repeat = api.GrantCreditsRequest()
    repeat.CopyFrom(request)
    repeat.request_id = new_id()
    assert (await client.servicer.GrantCredits(repeat, None)).lot == first.lot
    repeat.request_id, repeat.source = new_id(), res.LOT_SOURCE_CASHBACK
    refused = await refusal(client.servicer.GrantCredits(repeat, None))
    assert isinstance(refused, AlreadyExists) and refused.reason == "GRANT_KEY_REUSED"
    assert len(await client.lots(user)) == 1

    signup = catalog.add_product(
        merchant_id, "5", distribution=Distribution.GRANT, policy=GrantPolicy.APPLY_ON_SIGNUP
    )
    for product in (
        signup,
        catalog.add_product(merchant_id, "5"),
        catalog.add_product(
            merchant_id, "5", distribution=Distribution.GRANT, policy=GrantPolicy.MANUAL_GRANT, archived=True
        ),
    ):
        other = api.GrantCreditsRequest(
            merchant_id=merchant_id,
            request_id=new_id(),
            user_id=user,
            grant_key=new_id(),
            product_id=str(product.product_id),
        )
        refused = await refusal(client.servicer.GrantCredits(other, None))
        assert isinstance(refused, FailedPrecondition) and refused.reason == "PRODUCT_NOT_MANUAL_GRANT"
    # Users registered by the module's other tests are not to receive it.
    del catalog.products[merchant_id][signup.product_id]

    refused = await refusal(client.grant(user, "5", expires_at=clock.now))
    assert isinstance(refused, InvalidArgument)
    assert [v.field for v in refused.violations] == ["custom.expire_time"]


async def test_adjustments_issue_a_lot_or_debit_into_debt(
    client: Client, directory: MerchantDirectory, merchant_id: str
) -> None:
    user = new_user()
    await client.register(user)
    credit = await client.adjust(user, "10")
    assert credit.lot.source == res.LOT_SOURCE_ADJUSTMENT and not credit.lot.HasField("expire_time")
    assert amounts(list(credit.entries)) == [(res.ENTRY_KIND_ADJUSTMENT, "10", credit.lot.lot_id)]
    assert (credit.entries[0].reason, credit.entries[0].actor) == ("goodwill", "admin@acme.example")

    debit = await client.adjust(user, "-12.5")
    assert not debit.HasField("lot")
    assert amounts(list(debit.entries)) == [
        (res.ENTRY_KIND_ADJUSTMENT, "-10", credit.lot.lot_id),
        (res.ENTRY_KIND_ADJUSTMENT, "-2.5", ""),
    ]
    assert (debit.account.balance.value, debit.account.debt.value) == ("-2.5", "2.5")
    negative = [
        e
        for e in await published(directory, merchant_id, events.BALANCE_WENT_NEGATIVE)
        if e.account.user_id == user
    ]
    assert [e.cause for e in negative] == [res.ENTRY_KIND_ADJUSTMENT]


# --- balances, lots and history -------------------------------------------------------------


async def test_balance_at_any_instant_is_the_sum_of_the_history_up_to_it(
    client: Client, catalog: MemoryCatalog, merchant_id: str, clock: Clock
) -> None:
    product = catalog.add_product(merchant_id, "100", days=10)
    user = new_user()
    instants = [clock.now]
    await client.register(user)
    order = (await client.settle(user, product.product_id)).lot
    instants.append(clock.advance(timedelta(minutes=1)))
    await client.grant(user, "20", expires_at=clock.now + 2 * DAY)
    instants.append(clock.advance(timedelta(minutes=1)))
    # 70 credits: the grant's 20 (it expires first), then 50 of the purchase.
    await client.consume(user, "35000", workflow_id="wf-history")
    instants.append(clock.advance(timedelta(minutes=1)))
    await client.refund(order.order_id, 990)
    instants.append(clock.advance(timedelta(minutes=1)))
    await client.consume(user, "30000")  # 60 credits, all debt: the refund revoked the 50 left
    instants.append(clock.advance(3 * DAY))

    history = await client.history(user, page_size=2)
    assert sum(credits(e.amount) for e in history) == credits((await client.balance(user)).balance)
    for at in instants:
        upto = [e for e in history if instant(e.create_time) <= at]
        balance = await client.balance(user, read_at=at)
        assert credits(balance.balance) == sum((credits(e.amount) for e in upto), Decimal(0)), at
        assert credits(balance.debt) == -sum((credits(e.amount) for e in upto if not e.lot_id), Decimal(0))
        assert instant(balance.read_time) == at
    # After the purchase alone: 100 purchased, expiring in ten days.
    early = await client.balance(user, read_at=instants[1] - timedelta(seconds=1))
    assert (early.purchased.value, early.granted.value, early.next_expiring_credits.value) == (
        "100",
        "0",
        "100",
    )
    refused = await refusal(client.balance(user, read_at=clock.now + timedelta(seconds=1)))
    assert isinstance(refused, InvalidArgument) and [v.field for v in refused.violations] == ["read_time"]

    # Filters: kinds, workflow, time range; pages keep them.
    debits = await client.history(user, kinds=[res.ENTRY_KIND_DEBIT], page_size=1)
    assert {e.kind for e in debits} == {res.ENTRY_KIND_DEBIT} and len(debits) == 3
    workflow = await client.history(user, workflow_id="wf-history")
    assert {e.operation.workflow_id for e in workflow} == {"wf-history"} and len(workflow) == 2
    window = await client.history(user, start_time=timestamp(instants[1]), end_time=timestamp(instants[3]))
    assert [e.entry_id for e in window] == [
        e.entry_id for e in history if instants[1] <= instant(e.create_time) < instants[3]
    ]
    assert window


async def test_lots_are_listed_by_issue_and_filtered_by_state(
    client: Client, catalog: MemoryCatalog, merchant_id: str, clock: Clock
) -> None:
    product = catalog.add_product(merchant_id, "10")
    user = new_user()
    await client.register(user)
    expiring = (await client.grant(user, "10", expires_at=clock.now + DAY)).lot
    clock.advance(timedelta(seconds=1))
    depleted = (await client.grant(user, "4")).lot
    clock.advance(timedelta(seconds=1))
    refunded = (await client.settle(user, product.product_id)).lot
    clock.advance(timedelta(seconds=1))
    active = (await client.grant(user, "3")).lot
    await client.consume(user, "2000")  # 4 credits: the expiring lot first
    await client.adjust(user, "-10")  # 6 left in the expiring lot, then the 4-credit lot
    await client.refund(refunded.order_id, 990)
    clock.advance(2 * DAY)

    lots = await client.lots(user, page_size=2)
    assert [lot.lot_id for lot in lots] == [expiring.lot_id, depleted.lot_id, refunded.lot_id, active.lot_id]
    assert [lot.state for lot in lots] == [
        res.LOT_STATE_EXPIRED,
        res.LOT_STATE_DEPLETED,
        res.LOT_STATE_REFUNDED,
        res.LOT_STATE_ACTIVE,
    ]
    assert [lot.lot_id for lot in await client.lots(user, res.LOT_STATE_ACTIVE, res.LOT_STATE_REFUNDED)] == [
        refunded.lot_id,
        active.lot_id,
    ]
    assert await client.lots(user, res.LOT_STATE_CHARGED_BACK) == []

    grant = await client.servicer.GrantCredits(
        api.GrantCreditsRequest(
            merchant_id=merchant_id,
            request_id=new_id(),
            user_id=user,
            grant_key=new_id(),
            custom=api.CustomGrant(credits=Credits(value="1")),
            source=res.LOT_SOURCE_CASHBACK,
        ),
        None,
    )
    assert grant.lot.source == res.LOT_SOURCE_CASHBACK
