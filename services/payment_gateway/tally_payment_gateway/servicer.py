"""The PaymentGatewayService gRPC servicer.

Every method validates its request first (card data is refused before anything else looks
at it), then reads on a plain connection or changes payments in merchant transactions.
Refusals are raised as `tally_kit.errors`; the server's error interceptor turns them into
statuses.

A call to the provider: two transactions around it
--------------------------------------------------
Purchase, Authorize, Capture, Void and Refund never hold a transaction (or a connection)
while the provider is called, and never lose track of a call:

1. The intent: one transaction reserves the request's idempotency key, records the payment's
   operation as pending (the payment, its audit row) and stores the in-flight response, then
   commits. From here on, a crash, a timeout or a cancelled caller leaves a payment with a
   pending call that the reconciliation job settles by asking the provider, never by
   sending the call again.
2. The call, outside any transaction. It is shielded from the caller's cancellation: once
   sent, its answer is recorded even if the caller went away.
3. The answer: a second transaction locks the payment and applies the answer only if the
   payment's pending operation is still the one step 1 recorded (a webhook or the
   reconciliation job may have settled it meanwhile), with its audit row and events, and
   stores the final response under the idempotency key. A Capture, Void or Refund the
   provider refused changed nothing: its key is released (the caller may try again) and it is
   answered with FAILED_PRECONDITION, PROVIDER_DECLINED or PROVIDER_ERROR.

A repeat of a request (same `request_id`) is answered from the key and never calls the
provider: with the stored response, or, when that response left the outcome open (the call
was in flight, or UNKNOWN), with the payment as it stands now. Concurrent repeats wait on
the key's row until step 1 commits, so one key makes at most one call.

Merchants
---------
A merchant may use the gateway when the platform configured a provider account for it
(`PaymentGatewaySettings.authorize_net_accounts`, its own entry or the default "*"); its
database is created on first use. The gateway does not ask the catalog: the account is what
lets it take payments, and a merchant without one is refused with FAILED_PRECONDITION
(PROVIDER_NOT_CONFIGURED) before anything is stored. Reads of a merchant without a database
find nothing.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import asyncpg
import grpc
from google.api import httpbody_pb2
from google.protobuf.message import Message
from tally.payment_gateway.v1 import payment_gateway_service_pb2 as api
from tally.payment_gateway.v1 import payment_gateway_service_pb2_grpc, resources_pb2
from tally_kit import context, idempotency
from tally_kit.amounts import Money
from tally_kit.auth import ROLE_BY_CLAIM, current_principal
from tally_kit.db.directory import MerchantDirectory
from tally_kit.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from tally_kit.failpoints import failpoint
from tally_kit.jobs import utc_now
from tally_kit.uow import Mutations, RelayNotifier, Transaction

from tally_payment_gateway import domain, mapping, store, validation, webhooks
from tally_payment_gateway.crypto import TokenDecryptionError, TokenVault
from tally_payment_gateway.domain import Change, Intent, Payment
from tally_payment_gateway.handlers import NOTIFICATION_RECEIVED
from tally_payment_gateway.provider import (
    ChargeRequest,
    OneTimeToken,
    Outcome,
    PaymentProvider,
    ProviderNotConfigured,
    ProviderResult,
    RefundRequest,
    SavedToken,
)
from tally_payment_gateway.settings import AuthorizeNetAccount
from tally_payment_gateway.store import PRODUCER

log = logging.getLogger(__name__)

SERVICE_NAME = api.DESCRIPTOR.services_by_name["PaymentGatewayService"].full_name

Clock = Callable[[], datetime]
AccountSource = Callable[[str], AuthorizeNetAccount | None]
R = TypeVar("R", bound=Message)

_ROLE_CLAIMS = {role: claim for claim, role in ROLE_BY_CLAIM.items()}
# Refund ids derive from the request that asked for them, so a repeat of the request finds its refund.
_REFUND_NAMESPACE = uuid.UUID("9d3c5b2e-6f1a-4e8d-b7c4-0a2f9e8d1c36")
_NO_PENDING = resources_pb2.PAYMENT_OPERATION_UNSPECIFIED


def _operation(method: str) -> str:
    """The full method name idempotency keys are bound to, e.g.
    `/tally.payment_gateway.v1.PaymentGatewayService/Purchase`."""
    return f"/{SERVICE_NAME}/{method}"


def payment_not_found(payment_id: uuid.UUID) -> NotFound:
    return NotFound(
        f"payment {payment_id} does not exist",
        reason="PAYMENT_NOT_FOUND",
        metadata={"payment_id": str(payment_id)},
    )


class MerchantGate:
    """Lets merchants with a provider account in, creating their database on first use."""

    def __init__(self, directory: MerchantDirectory, accounts: AccountSource) -> None:
        self._directory = directory
        self._accounts = accounts
        self._ready: set[str] = set()

    def account(self, merchant_id: str) -> AuthorizeNetAccount:
        account = self._accounts(merchant_id)
        if account is None:
            raise ProviderNotConfigured(
                f"merchant {merchant_id} has no payment provider account configured",
                metadata={"merchant_id": merchant_id},
            )
        return account

    async def ensure(self, merchant_id: str) -> None:
        if merchant_id in self._ready:
            return
        self.account(merchant_id)
        await self._directory.provision(merchant_id)
        self._ready.add(merchant_id)


class PaymentGatewayServicer(payment_gateway_service_pb2_grpc.PaymentGatewayServiceServicer):
    def __init__(
        self,
        directory: MerchantDirectory,
        relay: RelayNotifier,
        provider: PaymentProvider,
        vault: TokenVault,
        gate: MerchantGate,
        *,
        clock: Clock = utc_now,
    ) -> None:
        self._directory = directory
        self._relay = relay
        self._provider = provider
        self._vault = vault
        self._gate = gate
        self._clock = clock
        self._mutations = Mutations(directory, relay, producer=PRODUCER)
        # Provider calls whose answers are still being recorded (see `drain`).
        self._settling: set[asyncio.Task[Payment]] = set()

    async def drain(self) -> None:
        """Wait for the provider calls in flight to be answered and recorded (at shutdown)."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    # --- charges ------------------------------------------------------------------------------

    async def Purchase(
        self, request: api.PurchaseRequest, context: grpc.aio.ServicerContext
    ) -> api.PurchaseResponse:
        return await self._charge(request, Intent.PURCHASE, "Purchase", api.PurchaseResponse)

    async def Authorize(
        self, request: api.AuthorizeRequest, context: grpc.aio.ServicerContext
    ) -> api.AuthorizeResponse:
        return await self._charge(request, Intent.AUTHORIZE, "Authorize", api.AuthorizeResponse)

    async def _charge(
        self,
        request: api.PurchaseRequest | api.AuthorizeRequest,
        intent: Intent,
        method: str,
        response_type: type[api.PurchaseResponse] | type[api.AuthorizeResponse],
    ) -> api.PurchaseResponse | api.AuthorizeResponse:
        command = validation.charge(request)
        merchant_id = command.merchant_id
        await self._gate.ensure(merchant_id)
        change = self._change()
        async with self._directory.transaction(merchant_id) as conn:
            stored = await idempotency.begin(
                conn,
                operation=_operation(method),
                request_id=command.request_id,
                request=request,
                response_type=response_type,
            )
            if stored is None:
                source, method_id = await self._charge_source(conn, command)
                opened = domain.open_payment(
                    payment_id=uuid.uuid4(),
                    merchant_id=merchant_id,
                    user_id=command.user_id,
                    order_id=command.order_id,
                    product_id=command.product_id,
                    intent=intent,
                    amount=command.amount,
                    provider=self._provider.name,
                    change=change,
                    payment_method_id=method_id,
                    description=command.description,
                )
                await store.record(self._transaction(conn, merchant_id), None, opened)
                await idempotency.finish(
                    conn,
                    request_id=command.request_id,
                    response=response_type(payment=mapping.payment(opened.payment)),
                )

        def respond(payment: Payment) -> api.PurchaseResponse | api.AuthorizeResponse:
            return response_type(payment=mapping.payment(payment))

        if stored is not None:
            return await self._replayed(merchant_id, stored, respond)
        started = opened.payment
        charge = ChargeRequest(
            amount=command.amount,
            source=source,
            order_reference=started.provider_order_reference,
            # The full payment id travels too: the order reference holds only part of it.
            description=_provider_description(started),
        )
        call = self._provider.purchase if intent is Intent.PURCHASE else self._provider.authorize
        payment = await self._call_provider(
            merchant_id, command.request_id, started, lambda: call(merchant_id, charge), respond
        )
        return respond(payment)

    async def _charge_source(
        self, conn: asyncpg.Connection, command: validation.Charge
    ) -> tuple[SavedToken | OneTimeToken, uuid.UUID | None]:
        """What the provider charges, and the saved method's id when it is one."""
        if isinstance(command.source, OneTimeToken):
            return command.source, None
        method_id = command.source.payment_method_id
        method = await store.get_payment_method(conn, command.merchant_id, command.user_id, method_id)
        if method is None:
            raise NotFound(
                f"user {command.user_id} has no payment method {method_id}",
                reason="PAYMENT_METHOD_NOT_FOUND",
                metadata={"payment_method_id": str(method_id)},
            )
        if method.provider != self._provider.name:
            raise FailedPrecondition(
                f"payment method {method_id} was saved at {method.provider}, not {self._provider.name}",
                reason="PAYMENT_METHOD_UNUSABLE",
            )
        try:
            token = self._vault.unseal(
                method.token, associated_data=TokenVault.binding(command.merchant_id, method_id)
            )
        except TokenDecryptionError:
            log.error("payment method %s cannot be decrypted", method_id, exc_info=True)
            raise FailedPrecondition(
                f"payment method {method_id} cannot be used; save it again", reason="PAYMENT_METHOD_UNUSABLE"
            ) from None
        return SavedToken(token), method_id

    # --- later steps --------------------------------------------------------------------------

    async def Capture(
        self, request: api.CaptureRequest, context: grpc.aio.ServicerContext
    ) -> api.CaptureResponse:
        command = validation.capture(request)

        def begin(payment: Payment) -> domain.Event:
            return domain.BeginCapture(_amount_in(payment, command.amount))

        def call(payment: Payment) -> Awaitable[ProviderResult]:
            assert payment.pending is not None
            amount = Money(payment.pending.amount_minor, payment.currency)
            return self._provider.capture(command.merchant_id, payment.provider_reference, amount)

        return await self._step(
            request,
            "Capture",
            api.CaptureResponse,
            command.payment_id,
            begin,
            call,
            lambda payment: api.CaptureResponse(payment=mapping.payment(payment)),
        )

    async def Void(self, request: api.VoidRequest, context: grpc.aio.ServicerContext) -> api.VoidResponse:
        command = validation.void(request)

        def call(payment: Payment) -> Awaitable[ProviderResult]:
            return self._provider.void(command.merchant_id, payment.provider_reference)

        return await self._step(
            request,
            "Void",
            api.VoidResponse,
            command.payment_id,
            lambda _: domain.BeginVoid(),
            call,
            lambda payment: api.VoidResponse(payment=mapping.payment(payment)),
        )

    async def Refund(
        self, request: api.RefundRequest, context: grpc.aio.ServicerContext
    ) -> api.RefundResponse:
        command = validation.refund(request)
        refund_id = uuid.uuid5(_REFUND_NAMESPACE, f"{command.merchant_id}/{command.request_id}")

        def begin(payment: Payment) -> domain.Event:
            return domain.BeginRefund(refund_id, _amount_in(payment, command.amount), command.reason)

        def call(payment: Payment) -> Awaitable[ProviderResult]:
            assert payment.pending is not None
            return self._provider.refund(
                command.merchant_id,
                RefundRequest(
                    transaction_id=payment.provider_reference,
                    amount=Money(payment.pending.amount_minor, payment.currency),
                    account_suffix=payment.account_suffix,
                    order_reference=payment.provider_order_reference,
                ),
            )

        def respond(payment: Payment) -> api.RefundResponse:
            response = api.RefundResponse(payment=mapping.payment(payment))
            recorded = next((record for record in payment.refunds if record.refund_id == refund_id), None)
            if recorded is not None:
                response.refund.CopyFrom(mapping.refund(recorded, payment.currency))
            return response

        return await self._step(
            request, "Refund", api.RefundResponse, command.payment_id, begin, call, respond
        )

    async def _step(
        self,
        request: api.CaptureRequest | api.VoidRequest | api.RefundRequest,
        method: str,
        response_type: type[R],
        payment_id: uuid.UUID,
        begin: Callable[[Payment], domain.Event],
        call: Callable[[Payment], Awaitable[ProviderResult]],
        respond: Callable[[Payment], R],
    ) -> R:
        """Capture, Void or Refund (see the module docstring)."""
        merchant_id = request.merchant_id
        await self._require_database(merchant_id, payment_id)
        change = self._change()
        async with self._directory.transaction(merchant_id) as conn:
            stored = await idempotency.begin(
                conn,
                operation=_operation(method),
                request_id=request.request_id,
                request=request,
                response_type=response_type,
            )
            if stored is None:
                payment = await store.get_payment(conn, merchant_id, payment_id, lock=True)
                if payment is None:
                    raise payment_not_found(payment_id)
                started = domain.transition(payment, begin(payment), change)
                await store.record(self._transaction(conn, merchant_id), payment, started)
                await idempotency.finish(
                    conn, request_id=request.request_id, response=respond(started.payment)
                )
        if stored is not None:
            return await self._replayed(merchant_id, stored, respond)
        payment = await self._call_provider(
            merchant_id, request.request_id, started.payment, lambda: call(started.payment), respond
        )
        return respond(payment)

    # --- the call and its answer ----------------------------------------------------------------

    async def _call_provider(
        self,
        merchant_id: str,
        request_id: str,
        started: Payment,
        call: Callable[[], Awaitable[ProviderResult]],
        respond: Callable[[Payment], Message],
    ) -> Payment:
        async def call_and_record() -> Payment:
            failpoint("payment_gateway.before_provider_call")
            result = await call()
            failpoint("payment_gateway.after_provider_answer")
            return await self._record_answer(merchant_id, request_id, started, result, respond)

        settling = asyncio.create_task(call_and_record(), name=f"payment-{started.payment_id}")
        self._settling.add(settling)
        settling.add_done_callback(self._settled)
        # A caller that gives up must not leave a charge unrecorded.
        return await asyncio.shield(settling)

    def _settled(self, settling: asyncio.Task[Payment]) -> None:
        self._settling.discard(settling)
        # Read here too, for a caller that gave up: its failure would go unseen otherwise.
        failure = None if settling.cancelled() else settling.exception()
        if failure is not None and not isinstance(failure, FailedPrecondition):
            log.warning(
                "recording the provider's answer failed (%s); the payment's call stays pending for the "
                "reconciliation job",
                type(failure).__name__,
                extra={"task": settling.get_name()},
            )

    async def _record_answer(
        self,
        merchant_id: str,
        request_id: str,
        started: Payment,
        result: ProviderResult,
        respond: Callable[[Payment], Message],
    ) -> Payment:
        assert started.pending is not None
        operation = started.pending.operation
        change = self._change()
        async with self._directory.transaction(merchant_id) as conn:
            tx = self._transaction(conn, merchant_id)
            payment = await store.get_payment(conn, merchant_id, started.payment_id, lock=True)
            assert payment is not None
            # A webhook or the reconciliation job may have settled the call first: its account
            # of what happened stands, and this answer adds nothing to it.
            ours = payment.pending == started.pending
            if ours:
                payment = await store.apply(tx, payment, [mapping.answer_event(result)], change)
            refused = (
                ours
                and result.outcome in (Outcome.DECLINED, Outcome.ERROR)
                and operation not in (domain.Operation.PURCHASE, domain.Operation.AUTHORIZE)
            )
            if refused:
                await store.release_request_id(conn, request_id)
            else:
                await store.replace_stored_response(conn, request_id, respond(payment))
        if tx.published:
            self._relay.notify(merchant_id)
        if refused:
            declined = result.outcome is Outcome.DECLINED
            raise FailedPrecondition(
                f"the provider {'declined' if declined else 'refused'} the {operation.value}: "
                f"{payment.failure_message}",
                reason="PROVIDER_DECLINED" if declined else "PROVIDER_ERROR",
                metadata={"provider_code": result.code, "payment_id": str(payment.payment_id)},
            )
        return payment

    async def _replayed(self, merchant_id: str, stored: R, respond: Callable[[Payment], R]) -> R:
        """A repeat's response: the stored one, or, when it left the outcome open, the response
        the payment as it stands now makes."""
        payment_message: resources_pb2.Payment = stored.payment  # type: ignore[attr-defined]
        if payment_message.pending_operation == _NO_PENDING:
            return stored
        return respond(await self._read_payment(merchant_id, uuid.UUID(payment_message.payment_id)))

    # --- reads --------------------------------------------------------------------------------

    async def GetPayment(
        self, request: api.GetPaymentRequest, context: grpc.aio.ServicerContext
    ) -> api.GetPaymentResponse:
        ref = validation.get_payment(request)
        await self._require_database(ref.merchant_id, ref.payment_id)
        payment = await self._read_payment(ref.merchant_id, ref.payment_id)
        return api.GetPaymentResponse(payment=mapping.payment(payment))

    async def ListPayments(
        self, request: api.ListPaymentsRequest, context: grpc.aio.ServicerContext
    ) -> api.ListPaymentsResponse:
        query = validation.list_payments(request)
        if not await self._directory.is_provisioned(query.merchant_id):
            return api.ListPaymentsResponse()
        async with self._directory.connection(query.merchant_id) as conn:
            page = await store.list_payments(conn, query.merchant_id, query.page, query.filters)
        return api.ListPaymentsResponse(
            payments=[mapping.payment(payment) for payment in page.items],
            next_page_token=page.next_page_token,
        )

    async def _read_payment(self, merchant_id: str, payment_id: uuid.UUID) -> Payment:
        async with self._directory.connection(merchant_id) as conn:
            payment = await store.get_payment(conn, merchant_id, payment_id)
        if payment is None:
            raise payment_not_found(payment_id)
        return payment

    async def _require_database(self, merchant_id: str, payment_id: uuid.UUID) -> None:
        # A merchant with no database has no payments; none is created to say so.
        if not await self._directory.is_provisioned(merchant_id):
            raise payment_not_found(payment_id)

    # --- payment methods ----------------------------------------------------------------------

    async def SavePaymentMethod(
        self, request: api.SavePaymentMethodRequest, context: grpc.aio.ServicerContext
    ) -> api.SavePaymentMethodResponse:
        command = validation.save_payment_method(request, self._provider.check_saved_token)
        await self._gate.ensure(command.merchant_id)

        async def effect(tx: Transaction) -> api.SavePaymentMethodResponse:
            method_id = uuid.uuid4()
            method = store.StoredPaymentMethod(
                payment_method_id=method_id,
                merchant_id=command.merchant_id,
                user_id=command.user_id,
                provider=self._provider.name,
                label=command.label,
                token=self._vault.seal(
                    command.provider_token, associated_data=TokenVault.binding(command.merchant_id, method_id)
                ),
                created_at=self._clock(),
            )
            await store.insert_payment_method(tx.conn, method)
            return api.SavePaymentMethodResponse(payment_method=mapping.payment_method(method))

        return await self._mutations.run(
            command.merchant_id,
            operation=_operation("SavePaymentMethod"),
            request=request,
            response_type=api.SavePaymentMethodResponse,
            effect=effect,
        )

    # --- webhooks -----------------------------------------------------------------------------

    async def HandleProviderWebhook(
        self, request: api.HandleProviderWebhookRequest, context: grpc.aio.ServicerContext
    ) -> api.HandleProviderWebhookResponse:
        command = validation.provider_webhook(request)
        account = self._gate.account(command.merchant_id)
        # Nothing in the body is read, and nothing is stored, before its signature is checked.
        webhooks.verify_signature(command.body, command.headers, account.signature_key)
        notification = webhooks.parse_notification(command.body)
        await self._gate.ensure(command.merchant_id)
        published = False
        async with self._directory.transaction(command.merchant_id) as conn:
            received = await store.receive_notification(
                conn, command.merchant_id, command.provider, notification, command.body, self._clock()
            )
            if received and notification.concerns_payment:
                # Acknowledged now, processed from the queue (`handlers`): the provider's
                # delivery never waits on a payment's lock or on a query to the provider.
                raw = api.HandleProviderWebhookRequest(
                    merchant_id=command.merchant_id,
                    provider=command.provider,
                    body=httpbody_pb2.HttpBody(content_type=request.body.content_type, data=command.body),
                )
                await self._transaction(conn, command.merchant_id).publish(NOTIFICATION_RECEIVED, raw)
                published = True
            elif received:
                await store.finish_notification(
                    conn, command.merchant_id, notification.notification_id, "ignored", self._clock()
                )
        if published:
            self._relay.notify(command.merchant_id)
        return api.HandleProviderWebhookResponse(
            notification_id=notification.notification_id, duplicate=not received
        )

    # --- helpers ------------------------------------------------------------------------------

    def _change(self) -> Change:
        principal = current_principal.get()
        actor = (
            f"{_ROLE_CLAIMS.get(principal.role, 'unknown')}:{principal.subject}"
            if principal is not None
            else "anonymous"
        )
        return Change(actor=actor, correlation_id=context.correlation_id.get(), at=self._clock())

    @staticmethod
    def _transaction(conn: asyncpg.Connection, merchant_id: str) -> Transaction:
        return Transaction(conn, merchant_id=merchant_id, producer=PRODUCER)


def _amount_in(payment: Payment, amount: Money | None) -> int | None:
    """The amount's minor units, refused unless in the payment's currency; None stays None."""
    if amount is None:
        return None
    if amount.currency != payment.currency:
        raise InvalidArgument(
            [FieldViolation("amount.currency", f"must be the payment's currency, {payment.currency}")]
        )
    return amount.amount_minor


def _provider_description(payment: Payment) -> str:
    reference = f"Tally payment {payment.payment_id}"
    text = f"{reference}: {payment.description}" if payment.description else reference
    return text[: domain.MAX_DESCRIPTION_LENGTH]
