"""The ledger's merchant-level operations, shared by the gRPC servicer, the payment-event
handlers and the periodic jobs, so that a captured payment settles an order exactly as
`SettlePurchase` does.

Each operation runs inside a transaction the caller owns (`tally_kit.uow.Transaction`: the
servicer's unit of work, or a handler's inbox transaction), locks the user's account row
before anything else, reads the clock after that lock (so a user's entries are written in
the order of their instants), writes through `store` in the schema's order and publishes
its events through `tx.publish`, in the same transaction. Catalog reads go through the
`CatalogReader` port, before the account lock where the operation allows it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID, uuid4

from tally.ledger.v1 import events_pb2
from tally_kit import protobuf
from tally_kit.amounts import Money
from tally_kit.db.directory import MerchantDirectory
from tally_kit.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from tally_kit.uow import Transaction

from tally_ledger import domain, events, mapping, store
from tally_ledger.catalog import CatalogReader, Distribution, GrantPolicy, ProductTemplate
from tally_ledger.domain import (
    Account,
    Entry,
    EntryKind,
    GrantSpec,
    IdFactory,
    Lot,
    LotSource,
    Operation,
    OperationClosing,
    Posting,
    PurchaseOrder,
)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- what callers ask for -------------------------------------------------------------------


@dataclass(frozen=True)
class CustomCredits:
    credits: Decimal
    # None: never expires.
    expires_at: datetime | None


@dataclass(frozen=True)
class Grant:
    """A lot issued on demand: from a MANUAL_GRANT product, or custom credits."""

    user_id: str
    grant_key: str
    source: LotSource
    # Exactly one of the two.
    product_id: UUID | None
    custom: CustomCredits | None


@dataclass(frozen=True)
class Refund:
    order_id: str
    # The refund's own reference: one refund per reference.
    reference: str
    amount: Money
    reason: str | None


@dataclass(frozen=True)
class Chargeback:
    order_id: str
    # The chargeback's own reference (dispute id).
    reference: str
    amount: Money


@dataclass(frozen=True)
class Adjustment:
    user_id: str
    # Signed, never zero.
    amount: Decimal
    reason: str
    actor: str
    # The adjustment's request id, its reference in the ledger.
    request_id: str


# --- what they get back ---------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    account: Account
    # The sign-up grants this registration issued; empty when the user was registered already.
    signup_lots: tuple[Lot, ...]
    at: datetime


@dataclass(frozen=True)
class Issued:
    """The lot of an order or grant key (issued now, or by the first request) and the account."""

    lot: Lot
    account: Account
    at: datetime


@dataclass(frozen=True)
class Reversed:
    """A refund or chargeback: the order's lot after it, and the entries it wrote."""

    lot: Lot
    credits_revoked: Decimal
    entries: tuple[Entry, ...]
    account: Account
    at: datetime


@dataclass(frozen=True)
class Adjusted:
    entries: tuple[Entry, ...]
    # The lot a positive adjustment issued.
    lot: Lot | None
    account: Account
    at: datetime


@dataclass(frozen=True)
class Expired:
    lot: Lot
    credits_expired: Decimal
    account: Account
    at: datetime


# --- merchants ------------------------------------------------------------------------------


class MerchantGate:
    """Creates a merchant's ledger database the first time the merchant is used, if the
    catalog knows the merchant (NOT_FOUND, MERCHANT_NOT_FOUND otherwise).

    Merchants found ready are remembered, so the hot path costs a set lookup. The event
    consumer passes `ensure` as its `prepare_merchant`.
    """

    def __init__(self, directory: MerchantDirectory, catalog: CatalogReader) -> None:
        self._directory = directory
        self._catalog = catalog
        self._ready: set[str] = set()

    async def ensure(self, merchant_id: str) -> None:
        if merchant_id in self._ready:
            return
        if not await self._directory.is_provisioned(merchant_id):
            await self._catalog.merchant_terms(merchant_id)
            await self._directory.provision(merchant_id)
        self._ready.add(merchant_id)


# --- the operations -------------------------------------------------------------------------


def user_not_registered(user_id: str) -> NotFound:
    return NotFound(
        f"user {user_id} is not registered", reason="USER_NOT_REGISTERED", metadata={"user_id": user_id}
    )


def operation_not_found(operation_id: UUID) -> NotFound:
    return NotFound(
        f"operation {operation_id} does not exist",
        reason="OPERATION_NOT_FOUND",
        metadata={"operation_id": str(operation_id)},
    )


def _order_not_found(order_id: str) -> NotFound:
    return NotFound(
        f"order {order_id} was never settled", reason="ORDER_NOT_FOUND", metadata={"order_id": order_id}
    )


class Ledger:
    """The ledger's operations on one merchant's books, inside the caller's transaction."""

    def __init__(self, catalog: CatalogReader, *, clock: Clock = utc_now, new_id: IdFactory = uuid4) -> None:
        self._catalog = catalog
        self._clock = clock
        self._new_id = new_id

    # --- accounts -------------------------------------------------------------------------

    async def register_user(self, tx: Transaction, merchant_id: str, user_id: str) -> Registration:
        """Registers the user and issues every sign-up grant once; a user registered already
        is returned as they are."""
        return await self._lock_or_register(tx, merchant_id, user_id)

    async def _lock(self, tx: Transaction, merchant_id: str, user_id: str) -> Account:
        account = await store.lock_account(tx.conn, merchant_id, user_id)
        if account is None:
            raise user_not_registered(user_id)
        return account

    async def _lock_or_register(self, tx: Transaction, merchant_id: str, user_id: str) -> Registration:
        account = await store.lock_account(tx.conn, merchant_id, user_id)
        if account is not None:
            return Registration(account, (), self._clock())
        signup_products = await self._catalog.signup_products(merchant_id)
        now = self._clock()
        account = domain.new_account(merchant_id, user_id, now)
        if not await store.insert_account(tx.conn, account):
            # Registered by a transaction that committed while this one waited on the row.
            registered = await store.lock_account(tx.conn, merchant_id, user_id)
            assert registered is not None
            return Registration(registered, (), now)
        grants: list[tuple[str, Posting]] = []
        for product in signup_products:
            grant_key = domain.signup_grant_key(product.product_id, user_id)
            posting = domain.issue_lot(
                account,
                source=LotSource.GRANT,
                credits=product.credits,
                expires_at=domain.lot_expiry(now, product.access_period_days),
                reference=domain.grant_reference(grant_key),
                now=now,
                product_id=product.product_id,
                new_id=self._new_id,
            )
            grants.append((grant_key, posting))
            account = posting.account
        lots = await self._issue_grants(tx, grants, now)
        return Registration(account, lots, now)

    # --- lots -----------------------------------------------------------------------------

    async def _issue_grants(
        self, tx: Transaction, grants: Sequence[tuple[str, Posting]], now: datetime
    ) -> tuple[Lot, ...]:
        """Writes postings that each issued a lot for a grant key, and announces the lots."""
        postings = [posting for _, posting in grants]
        for posting in postings:
            await store.insert_lot(tx.conn, _issued(posting))
        await store.write_postings(tx.conn, postings)
        for grant_key, posting in grants:
            if not await store.insert_grant(tx.conn, grant_key, _issued(posting)):
                # Only a request for another user can get here: one user's grants are
                # serialised by their account lock, so this one would have seen the key.
                raise AlreadyExists(
                    f"grant key {grant_key!r} was just used for another user",
                    reason="GRANT_KEY_REUSED",
                    metadata={"grant_key": grant_key},
                )
            await self._announce_lot(tx, posting, now)
        return tuple(_issued(posting) for posting in postings)

    async def _announce_lot(self, tx: Transaction, posting: Posting, now: datetime) -> None:
        await tx.publish(
            events.LOT_ISSUED,
            events_pb2.LotIssued(
                lot=mapping.lot(_issued(posting), now),
                debt_settled=protobuf.credits(posting.debt_settled),
                account=mapping.account(posting.account),
            ),
        )

    async def settle_purchase(self, tx: Transaction, merchant_id: str, order: PurchaseOrder) -> Issued:
        """Issues the order's one lot of the product's credits (registering the user first when
        needed) and announces the purchase; settling it again with the same payment returns
        the same lot, with another payment it is refused (ORDER_ALREADY_SETTLED)."""
        # Read first, refused only if the order is new: a paid order is settled even if its
        # product was archived since, and a repeat is answered whatever the product.
        product = await self._catalog.product(merchant_id, order.product_id)
        registration = await self._lock_or_register(tx, merchant_id, order.user_id)
        account = registration.account
        settled = await store.purchase_by_order(tx.conn, merchant_id, order.order_id)
        if settled is not None:
            domain.ensure_same_purchase(settled.order, order)
            return Issued(settled.lot, account, self._clock())
        if product.distribution is not Distribution.SELLABLE:
            raise FailedPrecondition(
                f"product {product.product_id} is not sellable",
                reason="PRODUCT_NOT_SELLABLE",
                metadata={"product_id": str(product.product_id)},
            )
        now = self._clock()
        posting = domain.issue_lot(
            account,
            source=LotSource.PURCHASE,
            credits=product.credits,
            expires_at=domain.lot_expiry(now, product.access_period_days),
            reference=domain.order_reference(order.order_id),
            now=now,
            product_id=product.product_id,
            order_id=order.order_id,
            new_id=self._new_id,
        )
        lot = _issued(posting)
        if not await store.insert_lot(tx.conn, lot, order):
            # Settled meanwhile for another user (one user's requests are serialised by the
            # account lock): refused as a settlement with another payment.
            settled = await store.purchase_by_order(tx.conn, merchant_id, order.order_id)
            assert settled is not None
            domain.ensure_same_purchase(settled.order, order)
            return Issued(settled.lot, account, now)
        await store.write_posting(tx.conn, posting)
        await tx.publish(events.PURCHASE_SETTLED, _purchase_settled(order, product, lot, now))
        await self._announce_lot(tx, posting, now)
        return Issued(lot, posting.account, now)

    async def grant_credits(self, tx: Transaction, merchant_id: str, grant: Grant) -> Issued:
        """Issues the grant key's one lot (registering the user first when needed); the same key
        again returns the first lot, with another grant it is refused (GRANT_KEY_REUSED)."""
        product = None
        if grant.product_id is not None:
            product = await self._catalog.product(merchant_id, grant.product_id)
        registration = await self._lock_or_register(tx, merchant_id, grant.user_id)
        account = registration.account
        requested = GrantSpec(
            user_id=grant.user_id,
            source=grant.source,
            product_id=grant.product_id,
            credits=product.credits if product is not None else _custom(grant).credits,
            expires_at=None if product is not None else _custom(grant).expires_at,
        )
        applied = await store.find_grant(tx.conn, merchant_id, grant.grant_key)
        if applied is not None:
            domain.ensure_same_grant(grant.grant_key, applied.spec, requested)
            return Issued(applied.lot, account, self._clock())
        now = self._clock()
        if product is not None:
            _ensure_manual_grant(product)
            expires_at = domain.lot_expiry(now, product.access_period_days)
        else:
            expires_at = _custom(grant).expires_at
            if expires_at is not None and expires_at <= now:
                raise InvalidArgument([FieldViolation("custom.expire_time", "must be later than now")])
        posting = domain.issue_lot(
            account,
            source=grant.source,
            credits=requested.credits,
            expires_at=expires_at,
            reference=domain.grant_reference(grant.grant_key),
            now=now,
            product_id=grant.product_id,
            new_id=self._new_id,
        )
        (lot,) = await self._issue_grants(tx, [(grant.grant_key, posting)], now)
        return Issued(lot, posting.account, now)

    # --- operations -----------------------------------------------------------------------

    async def open_operation(
        self, tx: Transaction, merchant_id: str, user_id: str, operation_code: str, workflow_id: str | None
    ) -> Operation:
        """Opens an operation at the operation type's active version, if the user owes nothing
        and has no other operation open."""
        try:
            rate = await self._catalog.operation_rate(merchant_id, operation_code, self._clock())
        except FailedPrecondition as refusal:
            if refusal.reason != "OPERATION_TYPE_NOT_ACTIVE":
                raise
            # The API answers NOT_FOUND for an operation type with no version in effect.
            raise NotFound(refusal.message, reason=refusal.reason, metadata=refusal.metadata) from None
        account = await self._lock(tx, merchant_id, user_id)
        now = self._clock()
        operation = domain.open_operation(
            account, None, rate, operation_id=self._new_id(), workflow_id=workflow_id, now=now
        )
        if not await store.insert_operation(tx.conn, operation):
            # The user has one open: refused as the domain refuses it.
            already_open = await store.open_operation_of(tx.conn, merchant_id, user_id)
            domain.open_operation(
                account,
                already_open,
                rate,
                operation_id=operation.operation_id,
                workflow_id=workflow_id,
                now=now,
            )
            raise RuntimeError(f"user {user_id} has an operation open, yet none was found")
        return operation

    async def _lock_operation_account(self, tx: Transaction, merchant_id: str, operation_id: UUID) -> Account:
        """The account of the operation's user, locked: statements after it see the operation as
        the transactions this one waited for left it."""
        account = await store.lock_account_of_operation(tx.conn, merchant_id, operation_id)
        if account is None:
            raise operation_not_found(operation_id)
        return account

    async def _operation_locked(
        self, tx: Transaction, merchant_id: str, operation_id: UUID
    ) -> tuple[Account, Operation]:
        """The operation's account, locked, and the operation as it is under that lock."""
        account = await self._lock_operation_account(tx, merchant_id, operation_id)
        operation = await store.get_operation(tx.conn, merchant_id, operation_id)
        assert operation is not None
        return account, operation

    async def record_and_close(
        self, tx: Transaction, merchant_id: str, operation_id: UUID, resource_amount: Decimal
    ) -> OperationClosing:
        """Debits the resource's credits at the pinned rate FIFO (beyond the lots, as debt) and
        closes the operation."""
        locked = await store.lock_operation_with_live_lots(tx.conn, merchant_id, operation_id)
        if locked is None:
            raise operation_not_found(operation_id)
        account = locked.account
        now = self._clock()
        closing = domain.record_and_close(
            locked.operation, account, locked.lots, resource_amount, now=now, new_id=self._new_id
        )
        posting = closing.posting
        try:
            await store.write_posting(tx.conn, posting, ending=closing.operation)
        except store.OperationNotOpen:
            # Ended meanwhile by a cancel or a timeout: refused as the domain refuses it.
            ended = await store.get_operation(tx.conn, merchant_id, operation_id)
            assert ended is not None
            domain.record_and_close(
                ended, account, locked.lots, resource_amount, now=now, new_id=self._new_id
            )
            raise
        await tx.publish(
            events.OPERATION_CLOSED,
            events_pb2.OperationClosed(
                operation=mapping.operation(closing.operation),
                entries=[mapping.entry(entry) for entry in posting.entries],
                account=mapping.account(posting.account),
            ),
        )
        if posting.went_negative:
            await self._announce_negative(
                tx,
                posting,
                EntryKind.DEBIT,
                domain.operation_reference(operation_id),
                operation=closing.operation,
            )
        return closing

    async def cancel_operation(self, tx: Transaction, merchant_id: str, operation_id: UUID) -> Operation:
        _, operation = await self._operation_locked(tx, merchant_id, operation_id)
        canceled = domain.cancel_operation(operation, self._clock())
        await store.end_operation(tx.conn, canceled)
        return canceled

    async def time_out_operation(
        self, tx: Transaction, merchant_id: str, operation_id: UUID, operation_timeout: timedelta
    ) -> Operation | None:
        """Closes the operation without a debit if it is still open past `operation_timeout` (the
        merchant's terms); None when it is not (recorded, canceled or timed out meanwhile, or
        not due yet)."""
        _, operation = await self._operation_locked(tx, merchant_id, operation_id)
        timed_out = domain.time_out_operation(operation, operation_timeout, self._clock())
        if timed_out is not None:
            await store.end_operation(tx.conn, timed_out)
        return timed_out

    # --- refunds, chargebacks, adjustments, expiry ------------------------------------------

    async def _purchase_locked(
        self, tx: Transaction, merchant_id: str, order_id: str
    ) -> tuple[Account, store.Purchase]:
        """The order's account, locked, and its purchase as it is under that lock."""
        found = await store.purchase_by_order(tx.conn, merchant_id, order_id)
        if found is None:
            raise _order_not_found(order_id)
        account = await self._lock(tx, merchant_id, found.lot.user_id)
        purchase = await store.purchase_by_order(tx.conn, merchant_id, order_id)
        assert purchase is not None
        return account, purchase

    async def _replay_reversal(
        self, tx: Transaction, merchant_id: str, previous: store.LotReversal, reference: str, account: Account
    ) -> Reversed:
        lot = await store.get_lot(tx.conn, merchant_id, previous.lot_id)
        assert lot is not None
        entries = await store.entries_by_reference(tx.conn, merchant_id, previous.user_id, reference)
        return Reversed(lot, previous.credits_revoked, tuple(entries), account, self._clock())

    async def apply_refund(self, tx: Transaction, merchant_id: str, refund: Refund) -> Reversed:
        """Revokes the credits left in the order's lot; a refund reference applies once."""
        account, purchase = await self._purchase_locked(tx, merchant_id, refund.order_id)
        reference = domain.refund_reference(refund.reference)
        previous = await store.find_reversal(tx.conn, merchant_id, "refund", refund.reference)
        if previous is not None:
            _ensure_same_reversal(previous, refund.order_id, refund.amount, refund.reason)
            return await self._replay_reversal(tx, merchant_id, previous, reference, account)
        now = self._clock()
        revocation = domain.apply_refund(
            account, purchase.lot, refund=refund.reference, now=now, new_id=self._new_id
        )
        refunded_before = await store.refunded_minor(tx.conn, merchant_id, refund.order_id)
        total = domain.check_refund_amount(purchase.order, refunded_before, refund.amount)
        posting = revocation.posting
        await store.write_posting(tx.conn, posting)
        if revocation.lot.reversal is not purchase.lot.reversal:
            await store.save_reversal(tx.conn, revocation.lot)
        await self._record_reversal(
            tx,
            merchant_id,
            store.LotReversal(
                kind="refund",
                reference=refund.reference,
                user_id=account.user_id,
                order_id=refund.order_id,
                lot_id=purchase.lot.lot_id,
                amount=refund.amount,
                credits_revoked=revocation.credits_revoked,
                reason=refund.reason,
                applied_at=now,
            ),
        )
        order = purchase.order
        await tx.publish(
            events.REFUND_APPLIED,
            events_pb2.RefundApplied(
                merchant_id=merchant_id,
                user_id=account.user_id,
                order_id=order.order_id,
                product_id=str(order.product_id),
                payment_id=order.payment_id or "",
                refund_reference=refund.reference,
                amount_refunded=protobuf.money(refund.amount),
                total_refunded=protobuf.money(Money(total, order.amount_paid.currency)),
                amount_paid=protobuf.money(order.amount_paid),
                lot_id=str(purchase.lot.lot_id),
                credits_revoked=protobuf.credits(revocation.credits_revoked),
                account=mapping.account(posting.account),
            ),
        )
        if posting.went_negative:
            await self._announce_negative(tx, posting, EntryKind.REFUND_REVOCATION, reference)
        return Reversed(revocation.lot, revocation.credits_revoked, posting.entries, posting.account, now)

    async def apply_chargeback(self, tx: Transaction, merchant_id: str, chargeback: Chargeback) -> Reversed:
        """Revokes the order's lot's full value: its credits left, then what was consumed of it
        FIFO from the user's other lots and, beyond them, as debt."""
        account, purchase = await self._purchase_locked(tx, merchant_id, chargeback.order_id)
        reference = domain.chargeback_reference(chargeback.reference)
        previous = await store.find_reversal(tx.conn, merchant_id, "chargeback", chargeback.reference)
        if previous is not None:
            _ensure_same_reversal(previous, chargeback.order_id, chargeback.amount, None)
            return await self._replay_reversal(tx, merchant_id, previous, reference, account)
        order = purchase.order
        if chargeback.amount.currency != order.amount_paid.currency:
            raise InvalidArgument(
                [FieldViolation("amount.currency", f"must be {order.amount_paid.currency}, as paid")]
            )
        lots = await store.live_lots(tx.conn, merchant_id, account.user_id)
        now = self._clock()
        revocation = domain.apply_chargeback(
            account, purchase.lot, lots, chargeback=chargeback.reference, now=now, new_id=self._new_id
        )
        posting = revocation.posting
        await store.write_posting(tx.conn, posting)
        await store.save_reversal(tx.conn, revocation.lot)
        await self._record_reversal(
            tx,
            merchant_id,
            store.LotReversal(
                kind="chargeback",
                reference=chargeback.reference,
                user_id=account.user_id,
                order_id=chargeback.order_id,
                lot_id=purchase.lot.lot_id,
                amount=chargeback.amount,
                credits_revoked=revocation.credits_revoked,
                reason=None,
                applied_at=now,
            ),
        )
        await tx.publish(
            events.CHARGEBACK_APPLIED,
            events_pb2.ChargebackApplied(
                merchant_id=merchant_id,
                user_id=account.user_id,
                order_id=order.order_id,
                product_id=str(order.product_id),
                payment_id=order.payment_id or "",
                chargeback_reference=chargeback.reference,
                amount=protobuf.money(chargeback.amount),
                amount_paid=protobuf.money(order.amount_paid),
                lot_id=str(purchase.lot.lot_id),
                credits_revoked=protobuf.credits(revocation.credits_revoked),
                account=mapping.account(posting.account),
            ),
        )
        if posting.went_negative:
            await self._announce_negative(tx, posting, EntryKind.CHARGEBACK_REVOCATION, reference)
        return Reversed(revocation.lot, revocation.credits_revoked, posting.entries, posting.account, now)

    async def _record_reversal(self, tx: Transaction, merchant_id: str, reversal: store.LotReversal) -> None:
        if not await store.insert_reversal(tx.conn, merchant_id, reversal):
            # One order's reversals are serialised by its account lock, so the reference was
            # used meanwhile for another order.
            raise _reversal_reference_reused(reversal.kind, reversal.reference)

    async def apply_adjustment(self, tx: Transaction, merchant_id: str, adjustment: Adjustment) -> Adjusted:
        """An admin's signed correction: a never-expiring lot, or a FIFO debit beyond which the
        rest becomes debt."""
        account = await self._lock(tx, merchant_id, adjustment.user_id)
        lots = (
            await store.live_lots(tx.conn, merchant_id, adjustment.user_id) if adjustment.amount < 0 else []
        )
        now = self._clock()
        posting = domain.apply_adjustment(
            account,
            lots,
            amount=adjustment.amount,
            reason=adjustment.reason,
            actor=adjustment.actor,
            request_id=adjustment.request_id,
            now=now,
            new_id=self._new_id,
        )
        if posting.issued_lot is not None:
            await store.insert_lot(tx.conn, posting.issued_lot)
        await store.write_posting(tx.conn, posting)
        if posting.issued_lot is not None:
            await self._announce_lot(tx, posting, now)
        if posting.went_negative:
            await self._announce_negative(
                tx, posting, EntryKind.ADJUSTMENT, domain.adjustment_reference(adjustment.request_id)
            )
        return Adjusted(posting.entries, posting.issued_lot, posting.account, now)

    async def expire_lots_of_user(self, tx: Transaction, merchant_id: str, user_id: str) -> list[Expired]:
        """Writes off the credits left in every lot of the user past its expiry; nothing for a
        user with none (or never registered)."""
        account = await store.lock_account(tx.conn, merchant_id, user_id)
        if account is None:
            return []
        now = self._clock()
        postings: list[Posting] = []
        for lot in await store.lots_past_expiry(tx.conn, merchant_id, user_id, now):
            posting = domain.expire_lot(account, lot, now=now, new_id=self._new_id)
            postings.append(posting)
            account = posting.account
        await store.write_postings(tx.conn, postings)
        expired: list[Expired] = []
        for posting in postings:
            (lot,) = posting.lots
            (entry,) = posting.entries
            expired.append(Expired(lot, -entry.amount, posting.account, now))
            await tx.publish(
                events.LOT_EXPIRED,
                events_pb2.LotExpired(
                    lot=mapping.lot(lot, now),
                    credits_expired=protobuf.credits(-entry.amount),
                    account=mapping.account(posting.account),
                ),
            )
            if posting.went_negative:
                await self._announce_negative(tx, posting, EntryKind.EXPIRY, entry.reference)
        return expired

    async def _announce_negative(
        self,
        tx: Transaction,
        posting: Posting,
        cause: EntryKind,
        reference: str,
        *,
        operation: Operation | None = None,
    ) -> None:
        event = events_pb2.BalanceWentNegative(
            account=mapping.account(posting.account), cause=mapping.entry_kind(cause), reference=reference
        )
        if operation is not None:
            event.operation_id = str(operation.operation_id)
            event.workflow_id = operation.workflow_id or ""
        await tx.publish(events.BALANCE_WENT_NEGATIVE, event)


# --- helpers --------------------------------------------------------------------------------


def _issued(posting: Posting) -> Lot:
    if posting.issued_lot is None:
        raise ValueError("the posting issued no lot")
    return posting.issued_lot


def _custom(grant: Grant) -> CustomCredits:
    if grant.custom is None:
        raise ValueError("a grant names a product or custom credits")
    return grant.custom


def _ensure_manual_grant(product: ProductTemplate) -> None:
    if (
        product.distribution is not Distribution.GRANT
        or product.grant_policy is not GrantPolicy.MANUAL_GRANT
        or product.archived
    ):
        raise FailedPrecondition(
            f"product {product.product_id} is not an active MANUAL_GRANT product",
            reason="PRODUCT_NOT_MANUAL_GRANT",
            metadata={"product_id": str(product.product_id)},
        )


def _reversal_reference_reused(kind: str, reference: str) -> AlreadyExists:
    return AlreadyExists(
        f"{kind} reference {reference!r} was already used for another {kind}",
        reason=f"{kind.upper()}_REFERENCE_REUSED",
        metadata={f"{kind}_reference": reference},
    )


def _ensure_same_reversal(
    previous: store.LotReversal, order_id: str, amount: Money, reason: str | None
) -> None:
    """A repeat of a refund or chargeback reference must describe the same reversal."""
    if (previous.order_id, previous.amount, previous.reason) != (order_id, amount, reason):
        raise _reversal_reference_reused(previous.kind, previous.reference)


def _purchase_settled(
    order: PurchaseOrder, product: ProductTemplate, lot: Lot, now: datetime
) -> events_pb2.PurchaseSettled:
    event = events_pb2.PurchaseSettled(
        merchant_id=lot.merchant_id,
        user_id=order.user_id,
        order_id=order.order_id,
        product_id=str(order.product_id),
        product_name=product.name,
        amount_paid=protobuf.money(order.amount_paid),
        provider_reference=order.provider_reference,
        payment_id=order.payment_id or "",
        lot_id=str(lot.lot_id),
        credits=protobuf.credits(lot.credits),
        settle_time=protobuf.timestamp(now),
    )
    if lot.expires_at is not None:
        event.expire_time.CopyFrom(protobuf.timestamp(lot.expires_at))
    return event
