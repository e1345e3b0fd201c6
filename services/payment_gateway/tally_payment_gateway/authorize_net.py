"""The Authorize.Net adapter: the provider port over Authorize.Net's JSON API.

Every call is an HTTP POST of one JSON document to `<base url>/xml/v1/request.api`, with the
merchant's `merchantAuthentication` inside. The API follows its XML schema: the members of
each element must come in the schema's order, which is the order the dictionaries below are
built in. Answers start with a UTF-8 byte order mark, carry amounts as JSON numbers (read as
exact Decimals here, never floats), and report errors inside an HTTP 200: `messages.resultCode`
"Error" is an error whatever the status line says.

Money-moving calls are `createTransactionRequest`s (authCaptureTransaction,
authOnlyTransaction, priorAuthCaptureTransaction, voidTransaction, refundTransaction), read by
`transactionResponse.responseCode`: 1 approved, 2 declined, 3 error, 4 held for review. Queries
are getTransactionDetails, getUnsettledTransactionList, getSettledBatchList and
getTransactionList.

Resilience:
- one circuit breaker for the provider (all merchants share the endpoint), opened by
  consecutive outages: timeouts, refused connections, server errors, garbled answers. While
  open, calls fail at once without being sent;
- a money-moving call is sent again only when it certainly never left (the connection could
  not be opened): any other failure may have charged the card, so its outcome is UNKNOWN and
  the caller settles it with the queries, never by charging again;
- queries are retried on outages with exponential backoff and jitter.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pybreaker
from prometheus_client import Counter, Histogram
from tally_kit.amounts import Money
from tally_kit.clients import BreakerPolicy, RetryPolicy
from tally_kit.errors import RuleViolation
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from tally_payment_gateway.domain import format_amount
from tally_payment_gateway.provider import (
    ChargeRequest,
    OneTimeToken,
    Outcome,
    ProviderNotConfigured,
    ProviderQueryRefused,
    ProviderResult,
    ProviderUnavailable,
    RefundRequest,
    SavedToken,
    TransactionDetails,
    TransactionKind,
    TransactionStatus,
)
from tally_payment_gateway.settings import AuthorizeNetAccount, PaymentGatewaySettings

PROVIDER_NAME = "authorize_net"
API_PATH = "/xml/v1/request.api"

# `<customer profile id>/<payment profile id>`.
_SAVED_TOKEN = re.compile(r"[0-9A-Za-z_-]{1,40}/[0-9A-Za-z_-]{1,40}")
# Authorize.Net's "The record cannot be found."
_RECORD_NOT_FOUND = "E00040"
_PAGE_LIMIT = 1000
# getSettledBatchList covers at most 31 days per request; a day less leaves room for rounding.
_BATCH_WINDOW = timedelta(days=30)

_KINDS: Mapping[str, TransactionKind] = {
    "authCaptureTransaction": TransactionKind.PURCHASE,
    "authOnlyTransaction": TransactionKind.AUTHORIZATION,
    "refundTransaction": TransactionKind.REFUND,
}
_STATUSES: Mapping[str, TransactionStatus] = {
    "authorizedPendingCapture": TransactionStatus.AUTHORIZED,
    "capturedPendingSettlement": TransactionStatus.COMPLETED,
    "settledSuccessfully": TransactionStatus.COMPLETED,
    "refundPendingSettlement": TransactionStatus.COMPLETED,
    "refundSettledSuccessfully": TransactionStatus.COMPLETED,
    "pendingSettlement": TransactionStatus.COMPLETED,
    "pendingFinalSettlement": TransactionStatus.COMPLETED,
    "FDSPendingReview": TransactionStatus.HELD,
    "FDSAuthorizedPendingReview": TransactionStatus.HELD,
    "underReview": TransactionStatus.HELD,
    "voided": TransactionStatus.VOIDED,
    "declined": TransactionStatus.DECLINED,
    "failedReview": TransactionStatus.DECLINED,
    "expired": TransactionStatus.EXPIRED,
    "generalError": TransactionStatus.ERROR,
    "communicationError": TransactionStatus.ERROR,
    "settlementError": TransactionStatus.ERROR,
    "couldNotVoid": TransactionStatus.ERROR,
    "chargeback": TransactionStatus.CHARGED_BACK,
}
_SETTLED_STATUSES = frozenset(
    {"settledSuccessfully", "refundSettledSuccessfully", "chargeback", "chargebackReversal"}
)
_RESPONSE_OUTCOMES: Mapping[str, Outcome] = {
    "1": Outcome.APPROVED,
    "2": Outcome.DECLINED,
    "3": Outcome.ERROR,
    "4": Outcome.HELD,
}

provider_requests = Counter(
    "tally_payment_provider_requests_total",
    "Requests to payment providers, by operation and outcome (approved, declined, error, held, "
    "unknown for money-moving calls; ok, not_found, error, unavailable for queries).",
    ("provider", "operation", "outcome"),
)
provider_request_seconds = Histogram(
    "tally_payment_provider_request_seconds",
    "Time a request to a payment provider took, retries included.",
    ("provider", "operation"),
)

_log = logging.getLogger(__name__)

AccountSource = Callable[[str], AuthorizeNetAccount | None]

_DEFAULT_RETRY = RetryPolicy(max_attempts=3, initial_backoff_seconds=0.2)
_DEFAULT_BREAKER = BreakerPolicy()


class _Outage(Exception):
    """No usable answer. `delivered`: whether the request may have reached the provider."""

    def __init__(self, code: str, message: str, *, delivered: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.delivered = delivered


class _Refused(Exception):
    """The provider, or something in front of it, refused the request without processing it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AuthorizeNetProvider:
    """Authorize.Net for every merchant, each with the account `accounts` gives for it."""

    name = PROVIDER_NAME

    def __init__(
        self,
        *,
        base_url: str,
        accounts: AccountSource,
        connect_timeout_seconds: float = 5.0,
        timeout_seconds: float = 30.0,
        retry: RetryPolicy = _DEFAULT_RETRY,
        breaker: BreakerPolicy = _DEFAULT_BREAKER,
    ) -> None:
        """`retry` paces the requests that may be sent again: queries after an outage, and any
        request whose connection could not be opened."""
        self._accounts = accounts
        self._retry = retry
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout_seconds, connect=connect_timeout_seconds),
            headers={"Content-Type": "application/json"},
        )
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=breaker.failure_threshold,
            reset_timeout=breaker.reset_timeout_seconds,
            # Only outages count against the provider: declines and errors are answers.
            exclude=[lambda exc: not isinstance(exc, _Outage)],
            name=PROVIDER_NAME,
            # The call that trips the circuit still reports its own outage.
            throw_new_error_on_trip=False,
        )

    @classmethod
    def from_settings(cls, settings: PaymentGatewaySettings) -> AuthorizeNetProvider:
        return cls(
            base_url=settings.authorize_net_url,
            accounts=settings.authorize_net_account,
            connect_timeout_seconds=settings.provider_connect_timeout_seconds,
            timeout_seconds=settings.provider_timeout_seconds,
            retry=RetryPolicy(max_attempts=settings.provider_query_attempts, initial_backoff_seconds=0.2),
            breaker=BreakerPolicy(
                failure_threshold=settings.provider_breaker_failure_threshold,
                reset_timeout_seconds=settings.provider_breaker_reset_seconds,
            ),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def check_saved_token(self, token: str) -> None:
        if not _SAVED_TOKEN.fullmatch(token):
            raise RuleViolation(
                "must be an Authorize.Net customer profile id and payment profile id joined by /"
            )

    # Money-moving calls.

    async def purchase(self, merchant_id: str, charge: ChargeRequest) -> ProviderResult:
        return await self._transact(
            "purchase", merchant_id, charge.order_reference, _charge("authCaptureTransaction", charge)
        )

    async def authorize(self, merchant_id: str, charge: ChargeRequest) -> ProviderResult:
        return await self._transact(
            "authorize", merchant_id, charge.order_reference, _charge("authOnlyTransaction", charge)
        )

    async def capture(self, merchant_id: str, transaction_id: str, amount: Money) -> ProviderResult:
        request = {
            "transactionType": "priorAuthCaptureTransaction",
            "amount": format_amount(amount.amount_minor, amount.currency),
            "refTransId": transaction_id,
        }
        return await self._transact("capture", merchant_id, "", request)

    async def void(self, merchant_id: str, transaction_id: str) -> ProviderResult:
        request = {"transactionType": "voidTransaction", "refTransId": transaction_id}
        return await self._transact("void", merchant_id, "", request)

    async def refund(self, merchant_id: str, refund: RefundRequest) -> ProviderResult:
        request = {
            "transactionType": "refundTransaction",
            "amount": format_amount(refund.amount.amount_minor, refund.amount.currency),
            # A refund names the card by its last four digits only.
            "payment": {"creditCard": {"cardNumber": refund.account_suffix[-4:], "expirationDate": "XXXX"}},
            "refTransId": refund.transaction_id,
            "order": {"invoiceNumber": refund.order_reference},
        }
        return await self._transact("refund", merchant_id, refund.order_reference, request)

    async def _transact(
        self, operation: str, merchant_id: str, ref_id: str, transaction_request: dict[str, Any]
    ) -> ProviderResult:
        payload: dict[str, Any] = {"merchantAuthentication": self._authentication(merchant_id)}
        if ref_id:
            payload["refId"] = ref_id
        payload["transactionRequest"] = transaction_request
        started = time.perf_counter()
        try:
            # Sent again only when it certainly never left: anything else may have charged.
            answer = await self._exchange(
                "createTransactionRequest",
                payload,
                retry_when=_never_delivered,
                attempts=self._retry.max_attempts,
            )
        except _Outage as outage:
            outcome = Outcome.UNKNOWN if outage.delivered else Outcome.ERROR
            result = ProviderResult(outcome, code=outage.code, message=outage.message)
        except _Refused as refused:
            result = ProviderResult(Outcome.ERROR, code=refused.code, message=refused.message)
        else:
            result = _transaction_result(answer)
        provider_request_seconds.labels(PROVIDER_NAME, operation).observe(time.perf_counter() - started)
        provider_requests.labels(PROVIDER_NAME, operation, result.outcome.value).inc()
        if result.outcome is Outcome.UNKNOWN:
            _log.warning(
                "authorize.net %s outcome unknown",
                operation,
                extra={"provider_code": result.code, "merchant_id": merchant_id},
            )
        return result

    # Queries.

    async def transaction_details(self, merchant_id: str, transaction_id: str) -> TransactionDetails | None:
        payload = {"merchantAuthentication": self._authentication(merchant_id), "transId": transaction_id}
        answer = await self._query("details", "getTransactionDetailsRequest", payload, missing_ok=True)
        if answer is None:
            return None
        transaction = answer.get("transaction")
        if not isinstance(transaction, dict):
            raise ProviderUnavailable("Authorize.Net answered getTransactionDetails without a transaction")
        return _details(transaction)

    async def find_transactions(
        self, merchant_id: str, order_reference: str, since: datetime
    ) -> list[TransactionDetails]:
        ids = [
            str(summary["transId"])
            for summary in [
                *await self._unsettled_transactions(merchant_id),
                *await self._settled_transactions(merchant_id, since),
            ]
            if summary.get("invoiceNumber") == order_reference and summary.get("transId")
        ]
        found = [
            await self.transaction_details(merchant_id, transaction_id)
            for transaction_id in dict.fromkeys(ids)
        ]
        return sorted(
            (details for details in found if details is not None and details.submitted_at >= since),
            key=lambda details: details.submitted_at,
        )

    async def _unsettled_transactions(self, merchant_id: str) -> list[dict[str, Any]]:
        return await self._pages("getUnsettledTransactionListRequest", merchant_id, {})

    async def _settled_transactions(self, merchant_id: str, since: datetime) -> list[dict[str, Any]]:
        transactions: list[dict[str, Any]] = []
        now = datetime.now(UTC)
        start = since
        while start < now:
            end = min(start + _BATCH_WINDOW, now)
            payload = {
                "merchantAuthentication": self._authentication(merchant_id),
                "includeStatistics": False,
                # Whole seconds: the window's start rounded down, its end up.
                "firstSettlementDate": _utc_text(start),
                "lastSettlementDate": _utc_text(end + timedelta(seconds=1)),
            }
            answer = await self._query("batches", "getSettledBatchListRequest", payload)
            for batch in _list(answer, "batchList"):
                batch_id = batch.get("batchId")
                if batch_id:
                    transactions += await self._pages(
                        "getTransactionListRequest", merchant_id, {"batchId": batch_id}
                    )
            start = end
        return transactions

    async def _pages(self, request: str, merchant_id: str, filters: dict[str, Any]) -> list[dict[str, Any]]:
        transactions: list[dict[str, Any]] = []
        page = 1
        while True:
            payload = {
                "merchantAuthentication": self._authentication(merchant_id),
                **filters,
                "sorting": {"orderBy": "submitTimeUTC", "orderDescending": False},
                "paging": {"limit": _PAGE_LIMIT, "offset": page},
            }
            found = _list(await self._query("list", request, payload), "transactions")
            transactions += found
            if len(found) < _PAGE_LIMIT:
                return transactions
            page += 1

    async def _query(
        self, operation: str, request: str, payload: dict[str, Any], *, missing_ok: bool = False
    ) -> dict[str, Any] | None:
        started = time.perf_counter()
        outcome = "error"
        try:
            answer = await self._exchange(
                request, payload, retry_when=_is_outage, attempts=self._retry.max_attempts
            )
            code, text = _first_message(answer)
            if answer["messages"].get("resultCode") == "Ok":
                outcome = "ok"
                return answer
            if missing_ok and code == _RECORD_NOT_FOUND:
                outcome = "not_found"
                return None
            raise ProviderQueryRefused(
                f"Authorize.Net refused {request}: {code} {text}", metadata={"provider_code": code}
            )
        except _Outage as outage:
            outcome = "unavailable"
            raise ProviderUnavailable(
                f"Authorize.Net did not answer {request}: {outage.message}",
                metadata={"provider_code": outage.code},
            ) from None
        except _Refused as refused:
            raise ProviderQueryRefused(
                f"Authorize.Net refused {request}: {refused.message}",
                metadata={"provider_code": refused.code},
            ) from None
        finally:
            provider_request_seconds.labels(PROVIDER_NAME, operation).observe(time.perf_counter() - started)
            provider_requests.labels(PROVIDER_NAME, operation, outcome).inc()

    # The wire.

    def _authentication(self, merchant_id: str) -> dict[str, str]:
        account = self._accounts(merchant_id)
        if account is None:
            raise ProviderNotConfigured(f"merchant {merchant_id} has no Authorize.Net account configured")
        return {"name": account.api_login_id, "transactionKey": account.transaction_key.get_secret_value()}

    async def _exchange(
        self,
        request: str,
        payload: dict[str, Any],
        *,
        retry_when: Callable[[BaseException], bool],
        attempts: int,
    ) -> dict[str, Any]:
        body = json.dumps({request: payload}, separators=(",", ":")).encode()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_random_exponential(
                multiplier=self._retry.initial_backoff_seconds, max=self._retry.max_backoff_seconds
            ),
            retry=retry_if_exception(retry_when),
            reraise=True,
        )
        return await retrying(self._send, body)

    async def _send(self, body: bytes) -> dict[str, Any]:
        """One attempt, through the circuit breaker."""
        try:
            with self._breaker.calling():
                response = await self._post(body)
                answer = _decode(response)
        except pybreaker.CircuitBreakerError:
            raise _Outage(
                "CIRCUIT_OPEN", "calls to Authorize.Net are paused after repeated failures", delivered=False
            ) from None
        return answer

    async def _post(self, body: bytes) -> httpx.Response:
        try:
            response = await self._client.post(API_PATH, content=body)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise _Outage(
                "CONNECTION_FAILED", f"could not connect: {type(exc).__name__}", delivered=False
            ) from None
        except httpx.TimeoutException as exc:
            raise _Outage("TIMEOUT", f"no answer in time: {type(exc).__name__}", delivered=True) from None
        except httpx.TransportError as exc:
            raise _Outage(
                "CONNECTION_LOST", f"the connection failed: {type(exc).__name__}", delivered=True
            ) from None
        if response.status_code >= 500:
            raise _Outage("SERVER_ERROR", f"HTTP {response.status_code}", delivered=True)
        if response.status_code != 200:
            raise _Refused("HTTP_ERROR", f"HTTP {response.status_code}")
        return response


def _never_delivered(exc: BaseException) -> bool:
    return isinstance(exc, _Outage) and not exc.delivered and exc.code != "CIRCUIT_OPEN"


def _is_outage(exc: BaseException) -> bool:
    return isinstance(exc, _Outage) and exc.code != "CIRCUIT_OPEN"


def _decode(response: httpx.Response) -> dict[str, Any]:
    try:
        # Authorize.Net starts its JSON with a byte order mark; amounts are read as Decimals.
        answer = json.loads(response.content.decode("utf-8-sig"), parse_float=Decimal)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _Outage("MALFORMED_RESPONSE", "the answer is not JSON", delivered=True) from None
    if not isinstance(answer, dict) or not isinstance(answer.get("messages"), dict):
        raise _Outage("MALFORMED_RESPONSE", "the answer has no messages", delivered=True)
    if answer["messages"].get("resultCode") not in ("Ok", "Error"):
        raise _Outage("MALFORMED_RESPONSE", "the answer has no result code", delivered=True)
    return answer


def _charge(transaction_type: str, charge: ChargeRequest) -> dict[str, Any]:
    request: dict[str, Any] = {
        "transactionType": transaction_type,
        "amount": format_amount(charge.amount.amount_minor, charge.amount.currency),
        "currencyCode": charge.amount.currency,
    }
    match charge.source:
        case OneTimeToken(descriptor=descriptor, value=value):
            request["payment"] = {"opaqueData": {"dataDescriptor": descriptor, "dataValue": value}}
        case SavedToken(token=token):
            customer_profile_id, _, payment_profile_id = token.partition("/")
            request["profile"] = {
                "customerProfileId": customer_profile_id,
                "paymentProfile": {"paymentProfileId": payment_profile_id},
            }
    request["order"] = {"invoiceNumber": charge.order_reference, "description": charge.description}
    return request


def _transaction_result(answer: dict[str, Any]) -> ProviderResult:
    result_code = answer["messages"]["resultCode"]
    response = answer.get("transactionResponse")
    if not isinstance(response, dict) or not response.get("responseCode"):
        code, text = _first_message(answer)
        if result_code == "Error":
            # Refused before any transaction: bad credentials, an invalid request.
            return ProviderResult(Outcome.ERROR, code=code, message=text)
        return ProviderResult(Outcome.UNKNOWN, code="MALFORMED_RESPONSE", message="no transaction response")
    response_code = str(response["responseCode"])
    outcome = _RESPONSE_OUTCOMES.get(response_code, Outcome.UNKNOWN)
    if outcome is Outcome.APPROVED and result_code != "Ok":
        # An approval the envelope calls an error: trust neither, ask later.
        outcome = Outcome.UNKNOWN
    code, text = _transaction_message(response)
    transaction_id = str(response.get("transId") or "")
    return ProviderResult(
        outcome,
        # Authorize.Net answers "0" when it recorded no transaction.
        transaction_id="" if transaction_id == "0" else transaction_id,
        auth_code=str(response.get("authCode") or ""),
        account_suffix=str(response.get("accountNumber") or ""),
        account_type=str(response.get("accountType") or ""),
        code=code,
        message=text,
    )


def _transaction_message(response: dict[str, Any]) -> tuple[str, str]:
    errors = response.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return str(errors[0].get("errorCode", "")), str(errors[0].get("errorText", ""))
    messages = response.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return str(messages[0].get("code", "")), str(messages[0].get("description", ""))
    return "", ""


def _first_message(answer: dict[str, Any]) -> tuple[str, str]:
    messages = answer["messages"].get("message")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return str(messages[0].get("code", "")), str(messages[0].get("text", ""))
    return "", ""


def _details(transaction: dict[str, Any]) -> TransactionDetails:
    provider_status = str(transaction.get("transactionStatus", ""))
    order = transaction.get("order") if isinstance(transaction.get("order"), dict) else {}
    payment = transaction.get("payment") if isinstance(transaction.get("payment"), dict) else {}
    card = payment.get("creditCard") if isinstance(payment.get("creditCard"), dict) else {}
    return TransactionDetails(
        transaction_id=str(transaction.get("transId", "")),
        kind=_KINDS.get(str(transaction.get("transactionType", "")), TransactionKind.OTHER),
        status=_STATUSES.get(provider_status, TransactionStatus.OTHER),
        provider_status=provider_status,
        settled=provider_status in _SETTLED_STATUSES,
        order_reference=str(order.get("invoiceNumber", "")),
        reference_transaction_id=str(transaction.get("refTransId") or ""),
        authorized_amount=_decimal(transaction.get("authAmount")),
        settled_amount=_decimal(transaction.get("settleAmount")),
        submitted_at=_submitted_at(transaction),
        account_suffix=str(card.get("cardNumber", "")),
        account_type=str(card.get("cardType", "")),
    )


def _submitted_at(transaction: dict[str, Any]) -> datetime:
    text = str(transaction.get("submitTimeUTC", ""))
    try:
        return parse_utc_time(text)
    except ValueError:
        raise ProviderUnavailable(f"Authorize.Net sent an unreadable time: {text!r}") from None


def _list(answer: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    items = (answer or {}).get(key)
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def _decimal(value: object) -> Decimal:
    if value is None:
        return Decimal(0)
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise ProviderUnavailable(f"Authorize.Net sent an amount that is not a number: {value!r}")
    return Decimal(str(value))


def parse_utc_time(text: str) -> datetime:
    """Authorize.Net's UTC times (`2030-01-01T12:00:00.123Z`, at times without the `Z`).

    ValueError when `text` is not such a time.
    """
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
