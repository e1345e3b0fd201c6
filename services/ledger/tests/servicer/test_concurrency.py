"""Concurrent calls on the real PostgreSQL: one user's changes run one at a time (their account
row is locked first), other users' never wait on them, and an idempotency key or an order
has exactly one effect however many calls race for it."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from uuid import UUID

import asyncpg
import pytest
from ledger_harness import Client, MemoryCatalog, new_id, new_user, published
from tally.ledger.v1 import ledger_service_pb2 as api
from tally.ledger.v1 import resources_pb2 as res
from tally_kit.db.directory import MerchantDirectory, merchant_database_name
from tally_kit.errors import FailedPrecondition, TallyError
from tally_kit.uow import Transaction
from tally_ledger import events
from tally_ledger.catalog import Distribution, GrantPolicy
from tally_ledger.services import Adjustment, Ledger
from tally_ledger.settings import LedgerSettings

pytestmark = pytest.mark.integration


async def test_of_fifty_concurrent_openings_for_one_user_exactly_one_opens(client: Client) -> None:
    user = new_user()
    await client.register(user)

    outcomes = await asyncio.gather(*(client.open(user) for _ in range(50)), return_exceptions=True)

    opened = [o for o in outcomes if isinstance(o, res.Operation)]
    refused = [o for o in outcomes if isinstance(o, TallyError)]
    assert len(opened) == 1 and len(refused) == 49, outcomes
    assert all(isinstance(r, FailedPrecondition) and r.reason == "OPERATION_ALREADY_OPEN" for r in refused)
    assert {r.metadata["operation_id"] for r in refused} == {opened[0].operation_id}


async def test_two_concurrent_closings_with_one_request_id_debit_once(client: Client) -> None:
    user = new_user()
    await client.register(user)
    await client.grant(user, "10")
    operation = await client.open(user)
    request = api.RecordAndCloseOperationRequest(
        merchant_id=client.merchant_id,
        request_id=new_id(),
        operation_id=operation.operation_id,
        resource_amount="1000",
    )

    first, second = await asyncio.gather(
        client.servicer.RecordAndCloseOperation(request, None),
        client.servicer.RecordAndCloseOperation(request, None),
    )

    assert first == second and first.account.balance.value == "8"
    debits = await client.history(user, kinds=[res.ENTRY_KIND_DEBIT])
    assert [e.amount.value for e in debits] == ["-2"]


async def test_two_concurrent_closings_of_one_operation_debit_once(client: Client) -> None:
    user = new_user()
    await client.register(user)
    await client.grant(user, "10")
    operation = await client.open(user)

    outcomes = await asyncio.gather(
        client.close(operation.operation_id, "1000"),
        client.close(operation.operation_id, "2000"),
        return_exceptions=True,
    )

    closed = [o for o in outcomes if isinstance(o, api.RecordAndCloseOperationResponse)]
    refused = [o for o in outcomes if isinstance(o, TallyError)]
    assert len(closed) == 1 and [r.reason for r in refused] == ["OPERATION_NOT_OPEN"]
    assert len(await client.history(user, kinds=[res.ENTRY_KIND_DEBIT])) == 1


async def test_a_closing_that_waits_on_the_users_other_change_debits_the_lots_it_left(
    client: Client, directory: MerchantDirectory, ledger: Ledger, merchant_id: str
) -> None:
    user = new_user()
    await client.register(user)
    await client.grant(user, "10")
    operation = await client.open(user)

    async with directory.transaction(merchant_id) as conn:
        # Takes 3 credits of the lot under the account lock, then holds the lock a while.
        adjustment = Adjustment(user, Decimal(-3), reason="correction", actor="admin", request_id=new_id())
        await ledger.apply_adjustment(
            Transaction(conn, merchant_id=merchant_id, producer="ledger"), merchant_id, adjustment
        )
        closing = asyncio.ensure_future(client.close(operation.operation_id, "1000"))
        await asyncio.sleep(0.3)
        assert not closing.done()

    closed = await closing
    assert closed.account.balance.value == "5"
    assert [e.amount.value for e in closed.entries] == ["-2"]
    (lot,) = await client.lots(user)
    assert lot.remaining.value == "5"


async def test_a_closing_of_an_operation_canceled_while_it_waited_is_refused(
    client: Client, directory: MerchantDirectory, ledger: Ledger, merchant_id: str
) -> None:
    user = new_user()
    await client.register(user)
    await client.grant(user, "10")
    operation = await client.open(user)

    async with directory.transaction(merchant_id) as conn:
        # A cancel changes the operation only, not the account: the closing's first read of the
        # operation predates it.
        await ledger.cancel_operation(
            Transaction(conn, merchant_id=merchant_id, producer="ledger"),
            merchant_id,
            UUID(operation.operation_id),
        )
        closing = asyncio.ensure_future(client.close(operation.operation_id, "1000"))
        await asyncio.sleep(0.3)
        assert not closing.done()

    with pytest.raises(FailedPrecondition) as refused:
        await closing
    assert refused.value.reason == "OPERATION_NOT_OPEN"
    assert await client.history(user, kinds=[res.ENTRY_KIND_DEBIT]) == []
    assert (await client.balance(user)).balance.value == "10"


async def test_one_users_lock_never_holds_up_another_user(
    client: Client, ledger_settings: LedgerSettings, merchant_id: str
) -> None:
    held, free = new_user("held"), new_user("free")
    for user in (held, free):
        await client.register(user)
        await client.grant(user, "10")
    settings = ledger_settings
    other = await asyncpg.connect(
        host=settings.pg_host,
        port=settings.pg_port,
        user=settings.pg_user,
        database=merchant_database_name(settings, merchant_id),
    )
    try:
        transaction = other.transaction()
        await transaction.start()
        # Another transaction holds the first user's account row, as a long change of it would.
        await other.execute(
            "SELECT 1 FROM accounts WHERE merchant_id = $1 AND user_id = $2 FOR UPDATE", merchant_id, held
        )
        waiting = asyncio.create_task(client.consume(held, "1000"))

        closed = await asyncio.wait_for(client.consume(free, "1000"), timeout=5)
        assert closed.account.balance.value == "8"
        await asyncio.sleep(0.2)
        assert not waiting.done()

        await transaction.rollback()
        assert (await asyncio.wait_for(waiting, timeout=5)).account.balance.value == "8"
    finally:
        await other.close()


async def test_concurrent_settlements_of_one_order_issue_one_lot(
    client: Client, catalog: MemoryCatalog, merchant_id: str, directory: MerchantDirectory
) -> None:
    product = catalog.add_product(merchant_id, "100")
    user = new_user()
    request = client.settle_request(user, product.product_id)

    def attempt() -> api.SettlePurchaseRequest:
        copy = api.SettlePurchaseRequest()
        copy.CopyFrom(request)
        copy.request_id = new_id()
        return copy

    responses = await asyncio.gather(*(client.servicer.SettlePurchase(attempt(), None) for _ in range(10)))

    assert len({response.lot.lot_id for response in responses}) == 1
    assert len(await client.lots(user)) == 1
    settled = await published(directory, merchant_id, events.PURCHASE_SETTLED)
    assert [event.order_id for event in settled].count(request.order_id) == 1


async def test_concurrent_registrations_issue_signup_grants_once(
    client: Client, catalog: MemoryCatalog
) -> None:
    merchant_id = client.merchant_id
    signup = catalog.add_product(
        merchant_id, "5", distribution=Distribution.GRANT, policy=GrantPolicy.APPLY_ON_SIGNUP
    )
    try:
        user = new_user()
        responses = await asyncio.gather(*(client.register(user) for _ in range(10)))
    finally:
        # Users registered by the module's other tests are not to receive it.
        del catalog.products[merchant_id][signup.product_id]
    assert sum(len(response.signup_lots) for response in responses) == 1
    assert {response.account.balance.value for response in responses} == {"5"}
    assert len(await client.lots(user)) == 1
