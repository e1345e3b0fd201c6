"""The reconciliation job: settles calls to the provider whose outcome Tally does not know, by
asking the provider what became of them. It never sends a call again.

A payment needs it when its pending call is UNKNOWN (no answer in time, a server error, a
garbled answer), or when the call is still pending long after it started: its process died
between recording the intent and recording the answer, or the answer could not be recorded.
"Long after" is `settle_after(settings)`, more than any call can last with its connection
attempts, backoffs and timeouts, so that a call still in flight is never taken for lost.

For each such payment, with its row locked (claimed with `FOR UPDATE ... SKIP LOCKED` by
`tally_kit.jobs.PeriodicJob`, so replicas share the work), the job asks:

- PURCHASE / AUTHORIZE: the charges carrying the payment's reference (`find_transactions`,
  since the call started, less a margin for clocks that disagree); the one found settles the
  call as it stands at the provider (approved, held, declined, and what happened to it since);
- CAPTURE / VOID: the authorization itself (`transaction_details`): captured, voided, or
  still only authorized;
- REFUND: refund transactions of the payment not recorded yet, for the amount asked.

When the provider shows nothing, the call did not take place, but only once it is overdue
(a call cut short on Tally's side may still be processed by the provider for a while): it is
then settled as refused, NOT_FOUND_AT_PROVIDER, and the payment goes back to where it was, or
fails when it was the first call. Until then the payment waits for the next run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

import asyncpg
from tally_kit import context
from tally_kit.clients import RetryPolicy
from tally_kit.events.databases import MerchantDatabases
from tally_kit.jobs import Clock, PeriodicJob, utc_now
from tally_kit.uow import RelayNotifier, Transaction

from tally_payment_gateway import mapping, store
from tally_payment_gateway.domain import (
    NOT_FOUND_AT_PROVIDER,
    Approved,
    Change,
    Event,
    Operation,
    Payment,
    ProviderCaptured,
    ProviderVoided,
    Refused,
)
from tally_payment_gateway.provider import (
    PaymentProvider,
    TransactionDetails,
    TransactionKind,
    TransactionStatus,
)
from tally_payment_gateway.settings import PaymentGatewaySettings
from tally_payment_gateway.store import PRODUCER, UnsettledCall

log = logging.getLogger(__name__)

JOB_NAME = "payment_reconciliation"
ACTOR = "job:payment_reconciliation"
# How far before a call's start the provider's records are searched: the provider's clock and
# Tally's may disagree.
LOOKBACK_MARGIN = timedelta(minutes=15)
# Added to the longest a call can last before an unanswered call is taken as not having
# happened.
_SETTLE_MARGIN = timedelta(seconds=60)

_CHARGE_KINDS = frozenset({TransactionKind.PURCHASE, TransactionKind.AUTHORIZATION})


def settle_after(settings: PaymentGatewaySettings) -> timedelta:
    """How long after a call started the provider has surely decided it: every connection
    attempt with its backoff, then the request's write and read timeouts, and a margin."""
    connecting = settings.provider_query_attempts * (
        settings.provider_connect_timeout_seconds + RetryPolicy.max_backoff_seconds
    )
    return timedelta(seconds=connecting + 2 * settings.provider_timeout_seconds) + _SETTLE_MARGIN


class ReconcileCalls:
    """The job's `ClaimedWork`: one unsettled call at a time, in start order."""

    def __init__(self, provider: PaymentProvider, *, settle_after: timedelta) -> None:
        self._provider = provider
        self._settle_after = settle_after

    async def claim(
        self,
        conn: asyncpg.Connection,
        merchant_id: str,
        *,
        now: datetime,
        after: UnsettledCall | None,
        limit: int,
    ) -> Sequence[UnsettledCall]:
        return await store.claim_unsettled_calls(
            conn, merchant_id, overdue_before=now - self._settle_after, after=after, limit=limit
        )

    async def handle(self, tx: Transaction, merchant_id: str, key: UnsettledCall, *, now: datetime) -> None:
        payment = await store.get_payment(tx.conn, merchant_id, key.payment_id, lock=True)
        # Settled since it was claimed (by the call's own answer, or a webhook): nothing to do.
        if payment is None or payment.pending is None or payment.pending.started_at != key.started_at:
            return
        overdue = payment.pending.started_at < now - self._settle_after
        events = await self._ask_provider(payment, overdue=overdue)
        if not events:
            return
        # The call's story goes on under its correlation id, in the audit and in the events.
        correlation_id = await store.call_correlation_id(tx.conn, payment)
        context.correlation_id.set(correlation_id)
        settled = await store.apply(tx, payment, events, Change(ACTOR, correlation_id, now))
        log.info(
            "payment %s: %s call reconciled, now %s",
            payment.payment_id,
            payment.pending.operation.value,
            settled.state.value,
            extra={"payment_id": str(payment.payment_id), "correlation_id": correlation_id},
        )

    async def _ask_provider(self, payment: Payment, *, overdue: bool) -> list[Event]:
        pending = payment.pending
        assert pending is not None
        match pending.operation:
            case Operation.PURCHASE | Operation.AUTHORIZE:
                return await self._first_call(payment, overdue=overdue)
            case Operation.CAPTURE | Operation.VOID:
                return await self._capture_or_void(payment, overdue=overdue)
            case Operation.REFUND:
                return await self._refund(payment, overdue=overdue)
        raise ValueError(f"unknown operation {pending.operation!r}")

    async def _first_call(self, payment: Payment, *, overdue: bool) -> list[Event]:
        assert payment.pending is not None
        charges = [
            found
            for found in await self._provider.find_transactions(
                payment.merchant_id,
                payment.provider_order_reference,
                payment.pending.started_at - LOOKBACK_MARGIN,
            )
            if found.kind in _CHARGE_KINDS
        ]
        if not charges:
            return _not_found(payment) if overdue else []
        if len(charges) > 1:
            log.error(
                "payment %s has %d charges at the provider; the first is taken",
                payment.payment_id,
                len(charges),
                extra={"transaction_ids": [charge.transaction_id for charge in charges]},
            )
        events = mapping.charge_events(payment, charges[0])
        if not events:
            log.warning(
                "payment %s: the provider's status %r of charge %s says nothing certain yet",
                payment.payment_id,
                charges[0].provider_status,
                charges[0].transaction_id,
            )
        return events

    async def _capture_or_void(self, payment: Payment, *, overdue: bool) -> list[Event]:
        assert payment.pending is not None
        operation = payment.pending.operation
        details = await self._provider.transaction_details(payment.merchant_id, payment.provider_reference)
        if details is None:
            log.error(
                "payment %s: the provider has no transaction %s",
                payment.payment_id,
                payment.provider_reference,
            )
            return []
        done = TransactionStatus.COMPLETED if operation is Operation.CAPTURE else TransactionStatus.VOIDED
        if details.status is done:
            return [Approved(payment.provider_reference)]
        # The call did not happen; something else may have, at the provider.
        if details.status is TransactionStatus.AUTHORIZED:
            return _not_found(payment) if overdue else []
        if details.status is TransactionStatus.VOIDED:
            refund_id = mapping.provider_refund_id(payment.merchant_id, details.transaction_id)
            return [*_not_found(payment), ProviderVoided(refund_id)]
        if details.status is TransactionStatus.COMPLETED:
            return [*_not_found(payment), _captured(payment, details)]
        log.warning(
            "payment %s: the provider's status %r says nothing certain of the %s yet",
            payment.payment_id,
            details.provider_status,
            operation.value,
        )
        return []

    async def _refund(self, payment: Payment, *, overdue: bool) -> list[Event]:
        pending = payment.pending
        assert pending is not None
        recorded = {refund.provider_reference for refund in payment.refunds}
        for found in await self._provider.find_transactions(
            payment.merchant_id, payment.provider_order_reference, pending.started_at - LOOKBACK_MARGIN
        ):
            if (
                found.kind is TransactionKind.REFUND
                and found.status is TransactionStatus.COMPLETED
                and found.reference_transaction_id in ("", payment.provider_reference)
                and found.transaction_id not in recorded
                and mapping.amount_minor(found.settled_amount, payment.currency) == pending.amount_minor
            ):
                return [Approved(found.transaction_id)]
        return _not_found(payment) if overdue else []


def _not_found(payment: Payment) -> list[Event]:
    assert payment.pending is not None
    return [
        Refused(
            NOT_FOUND_AT_PROVIDER,
            f"the provider shows no {payment.pending.operation.value} for this payment",
        )
    ]


def _captured(payment: Payment, details: TransactionDetails) -> Event:
    return ProviderCaptured(mapping.amount_minor(details.settled_amount, payment.currency))


def build_job(
    databases: MerchantDatabases,
    provider: PaymentProvider,
    relay: RelayNotifier,
    settings: PaymentGatewaySettings,
    *,
    clock: Clock = utc_now,
) -> PeriodicJob[UnsettledCall]:
    """The job, every `reconciliation_interval_seconds`, `reconciliation_batch_size` payments
    per transaction."""
    return PeriodicJob(
        JOB_NAME,
        ReconcileCalls(provider, settle_after=settle_after(settings)),
        databases,
        producer=PRODUCER,
        interval_seconds=settings.reconciliation_interval_seconds,
        batch_size=settings.reconciliation_batch_size,
        relay=relay,
        clock=clock,
        stop_grace_seconds=settings.shutdown_grace_seconds,
    )
