"""The simulator's HTTP side: Authorize.Net's JSON API and the control endpoints tests use."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from psp_simulator import bank as books
from psp_simulator.bank import Account, Bank, Outcome, Refusal, Script, Transaction
from psp_simulator.notifier import Notifier, SentNotification
from psp_simulator.wire import BYTE_ORDER_MARK, render_json

API_PATH = "/xml/v1/request.api"
# Members of createTransactionRequest and of its transactionRequest, in the order of
# Authorize.Net's schema (AnetApiSchema.xsd); members out of this order are refused.
_ROOT_ORDER = ("merchantAuthentication", "clientId", "refId", "transactionRequest")
_TRANSACTION_REQUEST_ORDER = (
    "transactionType",
    "amount",
    "currencyCode",
    "payment",
    "profile",
    "solution",
    "callId",
    "terminalNumber",
    "authCode",
    "refTransId",
    "splitTenderId",
    "order",
    "lineItems",
    "tax",
    "duty",
    "shipping",
    "taxExempt",
    "poNumber",
    "customer",
    "billTo",
    "shipTo",
    "customerIP",
    "cardholderAuthentication",
    "retail",
    "employeeId",
    "transactionSettings",
    "userFields",
)
_MAX_LENGTHS = {"refId": 20, "invoiceNumber": 20, "description": 255}
_OK = {"resultCode": "Ok", "message": [{"code": "I00001", "text": "Successful."}]}
_NO_RECORDS = {"resultCode": "Ok", "message": [{"code": "I00004", "text": "No records found."}]}


@dataclass(frozen=True)
class Timing:
    # How long `slow` answers wait.
    slow_seconds: float
    # How long `timeout` and `lost` keep the caller waiting.
    hang_seconds: float


class _ApiError(Exception):
    """A request refused as a whole: resultCode Error with one message (E000xx)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


Handler = Callable[["_Call", dict[str, Any]], Awaitable[Response]]


@dataclass
class _Call:
    bank: Bank
    notifier: Notifier
    timing: Timing
    account: Account
    # A scripted outcome for a query: server-error, slow or timeout.
    scripted: Outcome | None


def create_app(bank: Bank, notifier: Notifier, timing: Timing) -> Starlette:
    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await notifier.aclose()

    async def api(request: Request) -> Response:
        try:
            name, body = _read_request(await request.body())
            handler = _HANDLERS.get(name)
            if handler is None:
                raise _ApiError("E00003", f"The element '{name}' is not a request this gateway knows.")
            account = _authenticate(bank, body)
            scripted = None if name == "createTransactionRequest" else bank.scripted(name, None, None)
            call = _Call(bank, notifier, timing, account, scripted)
            if scripted is not None and (early := await _before_answering(scripted, timing)) is not None:
                return early
            return await handler(call, body)
        except _ApiError as error:
            return _answer(
                {"messages": {"resultCode": "Error", "message": [{"code": error.code, "text": error.text}]}}
            )

    routes = [
        Route(API_PATH, api, methods=["POST"]),
        Route("/_simulator/script", _control(bank, notifier, _add_script), methods=["POST"]),
        Route("/_simulator/accounts/{login}", _control(bank, notifier, _put_account), methods=["PUT"]),
        Route("/_simulator/settle", _control(bank, notifier, _settle), methods=["POST"]),
        Route("/_simulator/transactions", _control(bank, notifier, _list_transactions), methods=["GET"]),
        Route(
            "/_simulator/transactions/{trans_id}/review", _control(bank, notifier, _review), methods=["POST"]
        ),
        Route(
            "/_simulator/transactions/{trans_id}/chargeback",
            _control(bank, notifier, _chargeback),
            methods=["POST"],
        ),
        Route("/_simulator/notifications", _control(bank, notifier, _list_notifications), methods=["GET"]),
        Route(
            "/_simulator/notifications/{notification_id}/resend",
            _control(bank, notifier, _resend),
            methods=["POST"],
        ),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


# Authorize.Net's API.


def _read_request(raw: bytes) -> tuple[str, dict[str, Any]]:
    try:
        document = json.loads(raw.decode("utf-8-sig"), parse_float=Decimal)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _ApiError("E00003", "The request is not valid JSON.") from None
    if not isinstance(document, dict) or len(document) != 1:
        raise _ApiError("E00003", "The request must hold exactly one request element.")
    name, body = next(iter(document.items()))
    if not isinstance(body, dict):
        raise _ApiError("E00003", f"The element '{name}' must be an object.")
    return name, body


def _authenticate(bank: Bank, body: dict[str, Any]) -> Account:
    credentials = body.get("merchantAuthentication")
    if isinstance(credentials, dict):
        account = bank.authenticate(
            str(credentials.get("name", "")), str(credentials.get("transactionKey", ""))
        )
        if account is not None:
            return account
    raise _ApiError("E00007", "User authentication failed due to invalid authentication values.")


async def _before_answering(outcome: Outcome, timing: Timing) -> Response | None:
    """The early answer of an outcome that processes nothing, after waiting when it says so."""
    if outcome is Outcome.SERVER_ERROR:
        return HTMLResponse("<html><body><h1>503 Service Unavailable</h1></body></html>", status_code=503)
    if outcome is Outcome.TIMEOUT:
        await asyncio.sleep(timing.hang_seconds)
        return HTMLResponse("<html><body><h1>504 Gateway Timeout</h1></body></html>", status_code=504)
    if outcome is Outcome.SLOW:
        await asyncio.sleep(timing.slow_seconds)
    return None


async def _create_transaction(call: _Call, body: dict[str, Any]) -> Response:
    _check_order("createTransactionRequest", body, _ROOT_ORDER)
    request = body.get("transactionRequest")
    if not isinstance(request, dict):
        raise _ApiError("E00003", "The element 'transactionRequest' is required.")
    _check_order("transactionRequest", request, _TRANSACTION_REQUEST_ORDER)
    order = request.get("order") if isinstance(request.get("order"), dict) else {}
    _check_lengths({"refId": body.get("refId"), **order})
    ref_id = str(body.get("refId", ""))
    transaction_type = str(request.get("transactionType", ""))
    invoice_number = str(order.get("invoiceNumber", ""))
    scripted = call.bank.scripted("createTransactionRequest", transaction_type, invoice_number or None)
    ref_trans_id = str(request.get("refTransId", ""))
    try:
        amount = _amount(request.get("amount")) if "amount" in request else None
        if transaction_type in books.CHARGE_TYPES:
            if amount is None:
                raise Refusal("5", "A valid amount is required.")
            outcome = scripted or call.bank.charge_outcome(_payment_token(request), amount)
        else:
            outcome = scripted or Outcome.APPROVE
        if (early := await _before_answering(outcome, call.timing)) is not None:
            return early
        if outcome is Outcome.ERROR or (
            outcome in (Outcome.DECLINE, Outcome.REVIEW) and transaction_type not in books.CHARGE_TYPES
        ):
            raise Refusal("19", "An error occurred during processing. Please try again in 5 minutes.")
        transaction, answer_id, event_type = _perform(call, transaction_type, request, amount, outcome, order)
    except Refusal as refusal:
        return _answer(_refusal_answer(refusal, ref_id, ref_trans_id))
    _notify(
        call, event_type, transaction, amount_of_event=transaction.settle_amount or transaction.auth_amount
    )
    answer = _transaction_answer(transaction, ref_id, answer_id, ref_trans_id)
    if outcome is Outcome.LOST:
        # The charge is on the books; its answer never reaches the caller.
        await asyncio.sleep(call.timing.hang_seconds)
    return _answer(answer)


def _perform(
    call: _Call,
    transaction_type: str,
    request: dict[str, Any],
    amount: Decimal | None,
    outcome: Outcome,
    order: dict[str, Any],
) -> tuple[Transaction, str, str]:
    """The transaction the request makes or changes, the transId to answer, the webhook's type."""
    bank, account = call.bank, call.account
    ref_trans_id = str(request.get("refTransId", ""))
    if transaction_type in books.CHARGE_TYPES:
        if amount is None:
            raise Refusal("5", "A valid amount is required.")
        transaction = bank.charge(
            account,
            transaction_type=transaction_type,
            amount=amount,
            currency=str(request.get("currencyCode", "USD")),
            invoice_number=str(order.get("invoiceNumber", "")),
            description=str(order.get("description", "")),
            outcome=outcome,
        )
        if outcome is Outcome.REVIEW:
            event = "fraud.held"
        else:
            event = (
                "authcapture.created" if transaction_type == books.AUTH_CAPTURE else "authorization.created"
            )
        return transaction, transaction.trans_id, event
    if transaction_type == books.PRIOR_AUTH_CAPTURE:
        transaction = bank.capture(account, ref_trans_id, amount)
        return transaction, transaction.trans_id, "priorAuthCapture.created"
    if transaction_type == books.VOID:
        transaction = bank.void(account, ref_trans_id)
        return transaction, transaction.trans_id, "void.created"
    if transaction_type == books.REFUND:
        if amount is None:
            raise Refusal("5", "A valid amount is required.")
        payment = request.get("payment") if isinstance(request.get("payment"), dict) else {}
        card = payment.get("creditCard") if isinstance(payment.get("creditCard"), dict) else {}
        transaction = bank.refund(
            account,
            ref_trans_id,
            amount,
            str(card.get("cardNumber", "")),
            str(order.get("invoiceNumber", "")),
        )
        return transaction, transaction.trans_id, "refund.created"
    raise Refusal("3", f"The transaction type '{transaction_type}' is not supported.")


async def _transaction_details(call: _Call, body: dict[str, Any]) -> Response:
    transaction = call.bank.find(call.account, str(body.get("transId", "")))
    if transaction is None:
        raise _ApiError("E00040", "The record cannot be found.")
    return _answer({"transaction": _details(transaction, call.bank), "messages": _OK})


async def _unsettled_transactions(call: _Call, body: dict[str, Any]) -> Response:
    return _answer(_transaction_list(call.bank.unsettled(call.account), body))


async def _settled_batches(call: _Call, body: dict[str, Any]) -> Response:
    now = datetime.now(UTC)
    first = _time(body.get("firstSettlementDate"), now - timedelta(days=1))
    last = _time(body.get("lastSettlementDate"), now)
    if last - first > timedelta(days=31):
        raise _ApiError("E00062", "Date range cannot exceed 31 days.")
    batches = call.bank.batches_between(first, last)
    if not batches:
        return _answer({"messages": _NO_RECORDS})
    return _answer(
        {
            "batchList": [
                {
                    "batchId": batch.batch_id,
                    "settlementTimeUTC": _utc_text(batch.settled_at),
                    "settlementTimeLocal": _local_text(batch.settled_at),
                    "settlementState": "settledSuccessfully",
                    "paymentMethod": "creditCard",
                    "marketType": "eCommerce",
                    "product": "Card Not Present",
                }
                for batch in batches
            ],
            "messages": _OK,
        }
    )


async def _batch_transactions(call: _Call, body: dict[str, Any]) -> Response:
    return _answer(
        _transaction_list(call.bank.batch_transactions(call.account, str(body.get("batchId", ""))), body)
    )


_HANDLERS: dict[str, Handler] = {
    "createTransactionRequest": _create_transaction,
    "getTransactionDetailsRequest": _transaction_details,
    "getUnsettledTransactionListRequest": _unsettled_transactions,
    "getSettledBatchListRequest": _settled_batches,
    "getTransactionListRequest": _batch_transactions,
}


def _transaction_list(transactions: list[Transaction], body: dict[str, Any]) -> dict[str, Any]:
    paging = body.get("paging") if isinstance(body.get("paging"), dict) else {}
    limit = int(paging.get("limit", 1000))
    offset = int(paging.get("offset", 1))
    ordered = sorted(transactions, key=lambda t: t.submitted_at)
    page = ordered[(offset - 1) * limit : offset * limit]
    if not page:
        return {"messages": _NO_RECORDS}
    return {"transactions": [_summary(t) for t in page], "totalNumInResultSet": len(ordered), "messages": _OK}


def _notify(call: _Call, event: str, transaction: Transaction, *, amount_of_event: Decimal) -> None:
    call.notifier.notify(
        call.account, f"net.authorize.payment.{event}", _event_payload(transaction, amount_of_event)
    )


def _event_payload(transaction: Transaction, amount: Decimal) -> dict[str, Any]:
    return {
        "responseCode": transaction.response_code,
        "authCode": transaction.auth_code,
        "avsResponse": "Y",
        "authAmount": amount,
        "invoiceNumber": transaction.invoice_number,
        "entityName": "transaction",
        "id": transaction.trans_id,
    }


def _transaction_answer(
    transaction: Transaction, ref_id: str, trans_id: str, ref_trans_id: str
) -> dict[str, Any]:
    response: dict[str, Any] = {
        "responseCode": str(transaction.response_code),
        "authCode": transaction.auth_code,
        "avsResultCode": "Y",
        "cvvResultCode": "P",
        "cavvResultCode": "2",
        "transId": trans_id,
        "refTransID": ref_trans_id,
        "transHash": "",
        "testRequest": "0",
        "accountNumber": transaction.account_number,
        "accountType": transaction.card_type,
    }
    declined = transaction.response_code == 2
    if declined:
        response["errors"] = [{"errorCode": transaction.reason_code, "errorText": transaction.reason_text}]
    else:
        response["messages"] = [{"code": transaction.reason_code, "description": transaction.reason_text}]
    response["transHashSha2"] = ""
    answer: dict[str, Any] = {"transactionResponse": response}
    if ref_id:
        answer["refId"] = ref_id
    answer["messages"] = (
        {"resultCode": "Error", "message": [{"code": "E00027", "text": "The transaction was unsuccessful."}]}
        if declined
        else _OK
    )
    return answer


def _refusal_answer(refusal: Refusal, ref_id: str, ref_trans_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "transactionResponse": {
            "responseCode": "3",
            "authCode": "",
            "avsResultCode": "P",
            "cvvResultCode": "",
            "cavvResultCode": "",
            "transId": "0",
            "refTransID": ref_trans_id,
            "transHash": "",
            "testRequest": "0",
            "accountNumber": "",
            "accountType": "",
            "errors": [{"errorCode": refusal.code, "errorText": refusal.text}],
            "transHashSha2": "",
        }
    }
    if ref_id:
        answer["refId"] = ref_id
    answer["messages"] = {
        "resultCode": "Error",
        "message": [{"code": "E00027", "text": "The transaction was unsuccessful."}],
    }
    return answer


def _details(transaction: Transaction, bank: Bank) -> dict[str, Any]:
    details: dict[str, Any] = {"transId": transaction.trans_id}
    if transaction.ref_trans_id:
        details["refTransId"] = transaction.ref_trans_id
    details |= {
        "submitTimeUTC": _utc_text(transaction.submitted_at),
        "submitTimeLocal": _local_text(transaction.submitted_at),
        "transactionType": transaction.transaction_type,
        "transactionStatus": transaction.status,
        "responseCode": transaction.response_code,
        "responseReasonCode": int(transaction.reason_code),
        "responseReasonDescription": transaction.reason_text,
        "authCode": transaction.auth_code,
        "AVSResponse": "Y",
    }
    batch = next((b for b in bank.batches if b.batch_id == transaction.batch_id), None)
    if batch is not None:
        details["batch"] = {
            "batchId": batch.batch_id,
            "settlementTimeUTC": _utc_text(batch.settled_at),
            "settlementTimeLocal": _local_text(batch.settled_at),
            "settlementState": "settledSuccessfully",
        }
    details |= {
        "order": {"invoiceNumber": transaction.invoice_number, "description": transaction.description},
        "authAmount": transaction.auth_amount,
        "settleAmount": transaction.settle_amount,
        "taxExempt": False,
        "payment": {
            "creditCard": {
                "cardNumber": transaction.account_number,
                "expirationDate": "XXXX",
                "cardType": transaction.card_type,
            }
        },
        "recurringBilling": False,
        "product": "Card Not Present",
        "marketType": "eCommerce",
    }
    return details


def _summary(transaction: Transaction) -> dict[str, Any]:
    return {
        "transId": transaction.trans_id,
        "submitTimeUTC": _utc_text(transaction.submitted_at),
        "submitTimeLocal": _local_text(transaction.submitted_at),
        "transactionStatus": transaction.status,
        "invoiceNumber": transaction.invoice_number,
        "firstName": "",
        "lastName": "",
        "accountType": transaction.card_type,
        "accountNumber": transaction.account_number,
        "settleAmount": transaction.settle_amount,
        "marketType": "eCommerce",
        "product": "Card Not Present",
    }


def _answer(document: dict[str, Any]) -> Response:
    return Response(BYTE_ORDER_MARK + render_json(document), media_type="application/json; charset=utf-8")


def _check_order(element: str, members: dict[str, Any], order: tuple[str, ...]) -> None:
    positions = []
    for name in members:
        if name not in order:
            raise _ApiError("E00003", f"The element '{element}' has invalid child element '{name}'.")
        positions.append(order.index(name))
    if positions != sorted(positions):
        raise _ApiError(
            "E00003", f"The element '{element}' has its child elements out of the schema's order."
        )


def _check_lengths(values: dict[str, Any]) -> None:
    for name, limit in _MAX_LENGTHS.items():
        if len(str(values.get(name) or "")) > limit:
            raise _ApiError("E00003", f"The '{name}' element is invalid: its length is greater than {limit}.")


def _payment_token(request: dict[str, Any]) -> str:
    payment = request.get("payment")
    if isinstance(payment, dict) and isinstance(payment.get("opaqueData"), dict):
        return str(payment["opaqueData"].get("dataValue", ""))
    profile = request.get("profile")
    if isinstance(profile, dict) and isinstance(profile.get("paymentProfile"), dict):
        return str(profile["paymentProfile"].get("paymentProfileId", ""))
    raise Refusal("33", "A payment method is required: opaqueData or a customer profile.")


def _amount(value: object) -> Decimal:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise Refusal("5", "A valid amount is required.") from None
    if not amount.is_finite() or amount <= 0:
        raise Refusal("5", "A valid amount is required.")
    return amount


def _time(value: object, default: datetime) -> datetime:
    if value is None:
        return default
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise _ApiError("E00003", f"'{value}' is not a valid date and time.") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _local_text(moment: datetime) -> str:
    # The simulator's merchants all keep UTC as their local time.
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


# Control endpoints.

Control = Callable[[Request, Bank, Notifier], Awaitable[Any]]


def _control(bank: Bank, notifier: Notifier, handler: Control) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            result = await handler(request, bank, notifier)
        except (Refusal, ValueError, KeyError) as exc:
            return Response(render_json({"error": str(exc)}), status_code=400, media_type="application/json")
        return Response(render_json(result), media_type="application/json")

    return endpoint


async def _add_script(request: Request, bank: Bank, _: Notifier) -> dict[str, Any]:
    body = await _json_body(request)
    script = Script(
        outcome=Outcome(body["outcome"]),
        remaining=int(body.get("times", 1)),
        request=str(body.get("request", "createTransactionRequest")),
        transaction_type=body.get("transactionType"),
        invoice_number=body.get("invoiceNumber"),
    )
    if script.remaining < 1:
        raise ValueError("times must be at least 1")
    bank.scripts.append(script)
    return {"scripted": script.outcome.value, "times": script.remaining}


async def _put_account(request: Request, bank: Bank, _: Notifier) -> dict[str, Any]:
    body = await _json_body(request)
    login = request.path_params["login"]
    bank.accounts[login] = Account(
        login=login,
        transaction_key=str(body["transactionKey"]),
        signature_key=str(body["signatureKey"]),
        webhook_url=body.get("webhookUrl"),
    )
    return {"login": login}


async def _settle(_: Request, bank: Bank, __: Notifier) -> dict[str, Any]:
    batch = bank.settle()
    return {"batchId": batch.batch_id, "settlementTimeUTC": _utc_text(batch.settled_at)}


async def _list_transactions(request: Request, bank: Bank, _: Notifier) -> dict[str, Any]:
    invoice_number = request.query_params.get("invoiceNumber")
    return {
        "transactions": [
            _details(t, bank)
            for t in bank.transactions.values()
            if invoice_number is None or t.invoice_number == invoice_number
        ]
    }


async def _review(request: Request, bank: Bank, notifier: Notifier) -> dict[str, Any]:
    body = await _json_body(request)
    decision = body.get("decision")
    if decision not in ("approve", "decline"):
        raise ValueError("decision must be approve or decline")
    transaction = bank.review(request.path_params["trans_id"], approve=decision == "approve")
    event = "fraud.approved" if decision == "approve" else "fraud.declined"
    notifier.notify(
        bank.accounts[transaction.login],
        f"net.authorize.payment.{event}",
        _event_payload(transaction, transaction.auth_amount),
    )
    return _details(transaction, bank)


async def _chargeback(request: Request, bank: Bank, notifier: Notifier) -> dict[str, Any]:
    body = await _json_body(request)
    transaction = bank.chargeback(request.path_params["trans_id"], _amount(body["amount"]))
    payload = _event_payload(transaction, _amount(body["amount"]))
    payload["disputeId"] = str(body.get("disputeId") or f"dispute-{transaction.trans_id}")
    notifier.notify(bank.accounts[transaction.login], "net.authorize.payment.chargeback.created", payload)
    return _details(transaction, bank)


async def _list_notifications(_: Request, __: Bank, notifier: Notifier) -> dict[str, Any]:
    return {"notifications": [_sent(sent) for sent in notifier.sent.values()]}


async def _resend(request: Request, _: Bank, notifier: Notifier) -> dict[str, Any]:
    sent = notifier.resend(request.path_params["notification_id"])
    if sent is None:
        raise KeyError("no such notification")
    return _sent(sent)


def _sent(sent: SentNotification) -> dict[str, Any]:
    return {
        "notificationId": sent.notification_id,
        "eventType": sent.event_type,
        "url": sent.url,
        "attempts": sent.attempts,
        "delivered": sent.delivered,
        "lastResult": sent.last_result,
    }


async def _json_body(request: Request) -> dict[str, Any]:
    body = json.loads(await request.body() or b"{}", parse_float=Decimal)
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body
