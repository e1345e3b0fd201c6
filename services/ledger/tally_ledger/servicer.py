"""The LedgerService gRPC servicer.

Every method validates its request first (bad input never reaches a database), makes sure
the merchant's ledger database exists (created on first use when the catalog knows the
merchant), then mutates through the unit of work (merchant transaction, idempotency on
`request_id`, outbox) by way of the service layer (`services.Ledger`, which the event
handlers and jobs share) or reads on a plain connection. Refusals are raised as
`tally_kit.errors`; the server's error interceptor turns them into statuses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from tally.ledger.v1 import ledger_service_pb2 as api
from tally.ledger.v1 import ledger_service_pb2_grpc
from tally_kit import protobuf
from tally_kit.db.directory import MerchantDirectory
from tally_kit.errors import FieldViolation, InvalidArgument
from tally_kit.uow import Mutations, Transaction

from tally_ledger import domain, mapping, store, validation
from tally_ledger.catalog import CatalogReader
from tally_ledger.services import (
    Clock,
    Ledger,
    MerchantGate,
    operation_not_found,
    user_not_registered,
    utc_now,
)

SERVICE_NAME = api.DESCRIPTOR.services_by_name["LedgerService"].full_name

R = TypeVar("R", bound=Message)


def _operation(method: str) -> str:
    """The full method name idempotency keys are bound to, e.g.
    `/tally.ledger.v1.LedgerService/SettlePurchase`."""
    return f"/{SERVICE_NAME}/{method}"


class LedgerServicer(ledger_service_pb2_grpc.LedgerServiceServicer):
    def __init__(
        self,
        directory: MerchantDirectory,
        mutations: Mutations,
        catalog: CatalogReader,
        *,
        clock: Clock = utc_now,
        ledger: Ledger | None = None,
        merchants: MerchantGate | None = None,
    ) -> None:
        """`ledger` and `merchants` are shared with the event consumer and the jobs when given."""
        self._directory = directory
        self._mutations = mutations
        self._clock = clock
        self._merchants = merchants or MerchantGate(directory, catalog)
        self._ledger = ledger or Ledger(catalog, clock=clock)

    async def _mutate(
        self,
        merchant_id: str,
        method: str,
        request: Message,
        response_type: type[R],
        effect: Callable[[Transaction], Awaitable[R]],
    ) -> R:
        await self._merchants.ensure(merchant_id)
        return await self._mutations.run(
            merchant_id,
            operation=_operation(method),
            request=request,
            response_type=response_type,
            effect=effect,
        )

    # --- accounts and lots --------------------------------------------------------------------

    async def RegisterUser(
        self, request: api.RegisterUserRequest, context: grpc.aio.ServicerContext
    ) -> api.RegisterUserResponse:
        command = validation.register_user(request)

        async def effect(tx: Transaction) -> api.RegisterUserResponse:
            registration = await self._ledger.register_user(tx, command.merchant_id, command.user_id)
            return api.RegisterUserResponse(
                account=mapping.account(registration.account),
                signup_lots=[mapping.lot(lot, registration.at) for lot in registration.signup_lots],
            )

        return await self._mutate(
            command.merchant_id, "RegisterUser", request, api.RegisterUserResponse, effect
        )

    async def SettlePurchase(
        self, request: api.SettlePurchaseRequest, context: grpc.aio.ServicerContext
    ) -> api.SettlePurchaseResponse:
        command = validation.settle_purchase(request)

        async def effect(tx: Transaction) -> api.SettlePurchaseResponse:
            issued = await self._ledger.settle_purchase(tx, command.merchant_id, command.order)
            return api.SettlePurchaseResponse(
                lot=mapping.lot(issued.lot, issued.at), account=mapping.account(issued.account)
            )

        return await self._mutate(
            command.merchant_id, "SettlePurchase", request, api.SettlePurchaseResponse, effect
        )

    async def GrantCredits(
        self, request: api.GrantCreditsRequest, context: grpc.aio.ServicerContext
    ) -> api.GrantCreditsResponse:
        command = validation.grant_credits(request)

        async def effect(tx: Transaction) -> api.GrantCreditsResponse:
            issued = await self._ledger.grant_credits(tx, command.merchant_id, command.grant)
            return api.GrantCreditsResponse(
                lot=mapping.lot(issued.lot, issued.at), account=mapping.account(issued.account)
            )

        return await self._mutate(
            command.merchant_id, "GrantCredits", request, api.GrantCreditsResponse, effect
        )

    # --- operations ---------------------------------------------------------------------------

    async def OpenOperation(
        self, request: api.OpenOperationRequest, context: grpc.aio.ServicerContext
    ) -> api.OpenOperationResponse:
        command = validation.open_operation(request)

        async def effect(tx: Transaction) -> api.OpenOperationResponse:
            operation = await self._ledger.open_operation(
                tx, command.merchant_id, command.user_id, command.operation_code, command.workflow_id
            )
            return api.OpenOperationResponse(operation=mapping.operation(operation))

        return await self._mutate(
            command.merchant_id, "OpenOperation", request, api.OpenOperationResponse, effect
        )

    async def RecordAndCloseOperation(
        self, request: api.RecordAndCloseOperationRequest, context: grpc.aio.ServicerContext
    ) -> api.RecordAndCloseOperationResponse:
        command = validation.record_and_close_operation(request)

        async def effect(tx: Transaction) -> api.RecordAndCloseOperationResponse:
            closing = await self._ledger.record_and_close(
                tx, command.merchant_id, command.operation_id, command.resource_amount
            )
            return api.RecordAndCloseOperationResponse(
                operation=mapping.operation(closing.operation),
                entries=[mapping.entry(entry) for entry in closing.posting.entries],
                account=mapping.account(closing.posting.account),
            )

        return await self._mutate(
            command.merchant_id,
            "RecordAndCloseOperation",
            request,
            api.RecordAndCloseOperationResponse,
            effect,
        )

    async def CancelOperation(
        self, request: api.CancelOperationRequest, context: grpc.aio.ServicerContext
    ) -> api.CancelOperationResponse:
        command = validation.cancel_operation(request)

        async def effect(tx: Transaction) -> api.CancelOperationResponse:
            operation = await self._ledger.cancel_operation(tx, command.merchant_id, command.operation_id)
            return api.CancelOperationResponse(operation=mapping.operation(operation))

        return await self._mutate(
            command.merchant_id, "CancelOperation", request, api.CancelOperationResponse, effect
        )

    async def GetOperation(
        self, request: api.GetOperationRequest, context: grpc.aio.ServicerContext
    ) -> api.GetOperationResponse:
        ref = validation.get_operation(request)
        await self._merchants.ensure(ref.merchant_id)
        async with self._directory.connection(ref.merchant_id) as conn:
            operation = await store.get_operation(conn, ref.merchant_id, ref.operation_id)
        if operation is None:
            raise operation_not_found(ref.operation_id)
        return api.GetOperationResponse(operation=mapping.operation(operation))

    # --- refunds, chargebacks, adjustments ----------------------------------------------------

    async def ApplyRefund(
        self, request: api.ApplyRefundRequest, context: grpc.aio.ServicerContext
    ) -> api.ApplyRefundResponse:
        command = validation.apply_refund(request)

        async def effect(tx: Transaction) -> api.ApplyRefundResponse:
            refunded = await self._ledger.apply_refund(tx, command.merchant_id, command.refund)
            return api.ApplyRefundResponse(
                lot=mapping.lot(refunded.lot, refunded.at),
                credits_revoked=protobuf.credits(refunded.credits_revoked),
                entries=[mapping.entry(entry) for entry in refunded.entries],
                account=mapping.account(refunded.account),
            )

        return await self._mutate(
            command.merchant_id, "ApplyRefund", request, api.ApplyRefundResponse, effect
        )

    async def ApplyChargeback(
        self, request: api.ApplyChargebackRequest, context: grpc.aio.ServicerContext
    ) -> api.ApplyChargebackResponse:
        command = validation.apply_chargeback(request)

        async def effect(tx: Transaction) -> api.ApplyChargebackResponse:
            charged_back = await self._ledger.apply_chargeback(tx, command.merchant_id, command.chargeback)
            return api.ApplyChargebackResponse(
                lot=mapping.lot(charged_back.lot, charged_back.at),
                credits_revoked=protobuf.credits(charged_back.credits_revoked),
                entries=[mapping.entry(entry) for entry in charged_back.entries],
                account=mapping.account(charged_back.account),
            )

        return await self._mutate(
            command.merchant_id, "ApplyChargeback", request, api.ApplyChargebackResponse, effect
        )

    async def ApplyAdjustment(
        self, request: api.ApplyAdjustmentRequest, context: grpc.aio.ServicerContext
    ) -> api.ApplyAdjustmentResponse:
        command = validation.apply_adjustment(request)

        async def effect(tx: Transaction) -> api.ApplyAdjustmentResponse:
            adjusted = await self._ledger.apply_adjustment(tx, command.merchant_id, command.adjustment)
            response = api.ApplyAdjustmentResponse(
                entries=[mapping.entry(entry) for entry in adjusted.entries],
                account=mapping.account(adjusted.account),
            )
            if adjusted.lot is not None:
                response.lot.CopyFrom(mapping.lot(adjusted.lot, adjusted.at))
            return response

        return await self._mutate(
            command.merchant_id, "ApplyAdjustment", request, api.ApplyAdjustmentResponse, effect
        )

    # --- reads --------------------------------------------------------------------------------

    async def GetBalance(
        self, request: api.GetBalanceRequest, context: grpc.aio.ServicerContext
    ) -> api.GetBalanceResponse:
        query = validation.get_balance(request)
        now = self._clock()
        if query.read_at is not None and query.read_at > now:
            raise InvalidArgument([FieldViolation("read_time", "must not be in the future")])
        await self._merchants.ensure(query.merchant_id)
        async with self._directory.connection(query.merchant_id) as conn:
            if query.read_at is None:
                state = await store.current_balance(conn, query.merchant_id, query.user_id)
            else:
                state = await store.balance_as_of(conn, query.merchant_id, query.user_id, query.read_at)
        if state is None:
            raise user_not_registered(query.user_id)
        at = query.read_at or now
        summary = domain.summarize_balance(state.lots, state.debt, at)
        return api.GetBalanceResponse(balance=mapping.balance(query.merchant_id, query.user_id, at, summary))

    async def ListLots(
        self, request: api.ListLotsRequest, context: grpc.aio.ServicerContext
    ) -> api.ListLotsResponse:
        query = validation.list_lots(request)
        await self._merchants.ensure(query.merchant_id)
        now = self._clock()
        async with self._directory.connection(query.merchant_id) as conn:
            page = await store.list_lots(
                conn, query.merchant_id, query.user_id, query.page, states=query.states, now=now
            )
            # Only an empty page may be a user's who does not exist.
            if not page.items and await store.get_account(conn, query.merchant_id, query.user_id) is None:
                raise user_not_registered(query.user_id)
        return api.ListLotsResponse(
            lots=[mapping.lot(lot, now) for lot in page.items], next_page_token=page.next_page_token
        )

    async def GetLedgerHistory(
        self, request: api.GetLedgerHistoryRequest, context: grpc.aio.ServicerContext
    ) -> api.GetLedgerHistoryResponse:
        query = validation.get_ledger_history(request)
        await self._merchants.ensure(query.merchant_id)
        async with self._directory.connection(query.merchant_id) as conn:
            page = await store.history(
                conn,
                query.merchant_id,
                query.user_id,
                query.page,
                kinds=query.kinds,
                start=query.start,
                end=query.end,
                workflow_id=query.workflow_id,
            )
            if not page.items and await store.get_account(conn, query.merchant_id, query.user_id) is None:
                raise user_not_registered(query.user_id)
        return api.GetLedgerHistoryResponse(
            entries=[mapping.entry(entry) for entry in page.items], next_page_token=page.next_page_token
        )
