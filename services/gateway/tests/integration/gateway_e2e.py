"""What the gateway's integration tests share: the upstreams they run, gateway apps in front of
them, tokens good and bad, and decoding of `google.rpc.Status` bodies.

The upstreams are real apps in this process, on port 0: the catalog and the ledger (over
PostgreSQL and RabbitMQ, under one database prefix and exchange names of this run), and a
kit server hosting `KitTestService` (which fails on demand, for the status table) and a
payment gateway servicer that records the webhooks it receives. Error reasons and JSON
names are spelled out as the API documents them, never imported from the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import grpc
import httpx
import jwt
from google.protobuf.descriptor import FileDescriptor
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from tally.kittest.v1 import kittest_pb2, kittest_pb2_grpc
from tally.payment_gateway.v1 import payment_gateway_service_pb2 as payments_api
from tally.payment_gateway.v1 import payment_gateway_service_pb2_grpc as payments_grpc
from tally_catalog.settings import CatalogSettings
from tally_gateway.app import build_app
from tally_gateway.settings import GatewaySettings
from tally_kit import context as call_context
from tally_kit.auth import issue_dev_token
from tally_kit.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TallyError,
    Unauthenticated,
    Unavailable,
)
from tally_kit.events.topology import unrouted_exchange_name, unrouted_queue_name
from tally_kit.logging import JsonFormatter
from tally_kit.settings import ServiceSettings
from tally_ledger.settings import LedgerSettings

CATALOG = "tally.catalog.v1.CatalogService"
LEDGER = "tally.ledger.v1.LedgerService"
PAYMENTS = "tally.payment_gateway.v1.PaymentGatewayService"
RECEIPTS = "tally.receipt.v1.ReceiptService"
KIT = "tally.kittest.v1.KitTestService"
GATEWAY_DOMAIN = "gateway.tally"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"

# The PostgreSQL server is shared with other test runs: small pools.
_SMALL_POOLS: dict[str, Any] = {
    "grpc_host": "127.0.0.1",
    "grpc_port": 0,
    "metrics_port": 0,
    "db_max_pools": 4,
    "db_pool_max_size": 3,
    "db_max_connections": 8,
    "shutdown_grace_seconds": 5.0,
}


def new_id() -> str:
    return str(uuid.uuid4())


def new_merchant_id(label: str) -> str:
    return f"{label}-{secrets.token_hex(3)}"


def catalog_settings(prefix: str) -> CatalogSettings:
    return CatalogSettings(db_prefix=prefix, events_exchange=f"{prefix}gateway.catalog", **_SMALL_POOLS)


def ledger_settings(prefix: str, catalog_target: str) -> LedgerSettings:
    return LedgerSettings(
        db_prefix=prefix,
        events_exchange=f"{prefix}gateway.ledger",
        catalog_target=catalog_target,
        **_SMALL_POOLS,
    )


async def delete_event_exchanges(settings: ServiceSettings, exchanges: Sequence[str]) -> None:
    """Delete what a relay declares for each exchange: itself, its alternate exchange and queue."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        for exchange in exchanges:
            await channel.exchange_delete(exchange)
            await channel.exchange_delete(unrouted_exchange_name(exchange))
            await channel.queue_delete(unrouted_queue_name(exchange))
    finally:
        await connection.close()


# --- the kit server's services ------------------------------------------------------------------

KIT_FAILURES: dict[int, type[TallyError]] = {
    kittest_pb2.FAILURE_NOT_FOUND: NotFound,
    kittest_pb2.FAILURE_ALREADY_EXISTS: AlreadyExists,
    kittest_pb2.FAILURE_FAILED_PRECONDITION: FailedPrecondition,
    kittest_pb2.FAILURE_PERMISSION_DENIED: PermissionDenied,
    kittest_pb2.FAILURE_UNAUTHENTICATED: Unauthenticated,
    kittest_pb2.FAILURE_RESOURCE_EXHAUSTED: ResourceExhausted,
    kittest_pb2.FAILURE_UNAVAILABLE: Unavailable,
}
SECRET_IN_EXCEPTION = "password=hunter2"


class KitServicer(kittest_pb2_grpc.KitTestServiceServicer):
    """Echoes, or fails the way the request asks."""

    async def Echo(self, request: kittest_pb2.EchoRequest, context: grpc.aio.ServicerContext) -> Any:
        await asyncio.sleep(request.delay_ms / 1000)
        if request.fail_with == kittest_pb2.FAILURE_UNEXPECTED:
            raise RuntimeError(f"connection failed: {SECRET_IN_EXCEPTION}")
        if request.fail_with == kittest_pb2.FAILURE_INVALID_ARGUMENT:
            raise InvalidArgument([FieldViolation("text", "must not be empty")])
        if request.fail_with:
            error = KIT_FAILURES[request.fail_with]
            raise error("refused by the test", reason=f"KIT_{error.default_reason}", metadata={"k": "v"})
        return kittest_pb2.EchoResponse(
            text=request.text,
            correlation_id=call_context.correlation_id.get(),
            merchant_id=call_context.merchant_id.get(),
        )

    async def AdminEcho(
        self, request: kittest_pb2.AdminEchoRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        return kittest_pb2.AdminEchoResponse(text=request.text)

    async def Ping(self, request: kittest_pb2.PingRequest, context: grpc.aio.ServicerContext) -> Any:
        return kittest_pb2.PingResponse()


class RecordingPayments(payments_grpc.PaymentGatewayServiceServicer):
    """Stands in for the payment gateway: records each webhook as it arrives over gRPC."""

    def __init__(self) -> None:
        self.webhooks: list[payments_api.HandleProviderWebhookRequest] = []
        self.webhook_metadata: list[dict[str, str]] = []

    async def HandleProviderWebhook(
        self, request: payments_api.HandleProviderWebhookRequest, context: grpc.aio.ServicerContext
    ) -> payments_api.HandleProviderWebhookResponse:
        self.webhooks.append(request)
        self.webhook_metadata.append({key: str(value) for key, value in context.invocation_metadata() or ()})
        return payments_api.HandleProviderWebhookResponse(notification_id=f"n-{len(self.webhooks)}")


@dataclass
class Upstreams:
    """The running upstream servers and the settings they verify tokens with."""

    catalog: CatalogSettings
    catalog_target: str
    ledger_target: str
    kit_target: str
    payments: RecordingPayments

    def targets(self) -> dict[str, str]:
        """Where each service is. The receipt service is not run: its calls reach the kit
        server, which answers UNIMPLEMENTED for it."""
        return {
            CATALOG: self.catalog_target,
            LEDGER: self.ledger_target,
            PAYMENTS: self.kit_target,
            RECEIPTS: self.kit_target,
            KIT: self.kit_target,
        }


# --- the gateway in front of them ---------------------------------------------------------------


def gateway_settings(servers: Upstreams, **overrides: Any) -> GatewaySettings:
    """A gateway for these servers; its rate limits stay out of the way unless overridden."""
    values: dict[str, Any] = {
        "upstreams": servers.targets(),
        "readiness_services": [CATALOG, LEDGER, PAYMENTS],
        "upstream_timeout_seconds": 10.0,
        "rate_limit_token_per_second": 100_000.0,
        "rate_limit_token_burst": 100_000,
        "rate_limit_address_per_second": 100_000.0,
        "rate_limit_address_burst": 100_000,
        **overrides,
    }
    return GatewaySettings(**values)


@dataclass
class Gateway:
    app: Starlette
    client: httpx.AsyncClient
    settings: GatewaySettings

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["authorization"] = f"Bearer {token}"
        return await self.client.request(method, path, json=json_body, headers=all_headers, **kwargs)


@asynccontextmanager
async def running_gateway(
    settings: GatewaySettings,
    *,
    service_files: Sequence[FileDescriptor] | None = None,
    client_address: str = "127.0.0.1",
) -> AsyncIterator[Gateway]:
    app = build_app(settings, service_files=service_files)
    transport = httpx.ASGITransport(app=app, client=(client_address, 40000))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30.0) as client,
    ):
        yield Gateway(app, client, settings)


MERCHANT_CONFIG = {
    "legalName": "Acme SAS",
    "taxId": "FR40303265045",
    "address": {"addressLines": ["1 rue de la Paix"], "locality": "Paris", "regionCode": "FR"},
    "receiptSeriesPrefix": "ACME",
    "taxRegime": {"ratePercent": "20", "pricesIncludeTax": True},
    "operationTimeout": "900s",
    "retentionDays": 3650,
    "defaultCurrency": "EUR",
}


async def create_merchant(gateway: Gateway, label: str) -> str:
    """A new merchant, created through the gateway by the platform."""
    merchant_id = new_merchant_id(label)
    answer = await gateway.request(
        "POST",
        "/v1/merchants",
        token=token(gateway.settings, "platform"),
        json_body={"merchantId": merchant_id, "config": MERCHANT_CONFIG},
        headers={"Idempotency-Key": new_id()},
    )
    assert answer.status_code == 200, answer.text
    return merchant_id


# --- tokens -------------------------------------------------------------------------------------


def token(settings: ServiceSettings, role: str, merchant_id: str | None = None) -> str:
    return issue_dev_token(settings, role=role, merchant_id=merchant_id)


def _claims(settings: ServiceSettings, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "sub": "attacker",
        "role": "platform",
        "aud": settings.jwt_audience,
        "iss": settings.jwt_issuer,
        "iat": now,
        "exp": now + 600,
    }
    claims.update(changes)
    return claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def bad_tokens(settings: ServiceSettings, merchant_id: str) -> dict[str, str]:
    """Tokens that must never get through, by what is wrong with them (all claim `platform`,
    the strongest role, for `merchant_id`)."""
    secret = settings.jwt_secret.get_secret_value()
    unsigned_header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    unsigned_claims = _b64(json.dumps(_claims(settings, merchant_id=merchant_id)).encode())
    return {
        "expired": jwt.encode(
            _claims(
                settings, merchant_id=merchant_id, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600
            ),
            secret,
            algorithm="HS256",
        ),
        "forged": jwt.encode(
            _claims(settings, merchant_id=merchant_id), "not-the-secret-" + "x" * 32, algorithm="HS256"
        ),
        "wrong_audience": jwt.encode(
            _claims(settings, merchant_id=merchant_id, aud="another-api"), secret, algorithm="HS256"
        ),
        "wrong_issuer": jwt.encode(
            _claims(settings, merchant_id=merchant_id, iss="someone-else"), secret, algorithm="HS256"
        ),
        "alg_none": f"{unsigned_header}.{unsigned_claims}.",
        "garbage": "not-a-jwt",
    }


# --- answers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """An error answer decoded: HTTP status, the Status body and its ErrorInfo."""

    http_status: int
    code: int
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]
    fields: tuple[str, ...]
    body: dict[str, Any] = field(repr=False)


def refusal_of(response: httpx.Response) -> Refusal:
    """Decode an error answer, checking it is a `google.rpc.Status` with one ErrorInfo."""
    assert response.status_code >= 400, f"expected a refusal, got {response.status_code}: {response.text}"
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"code", "message", "details"}, body
    infos = [d for d in body["details"] if d["@type"] == ERROR_INFO]
    assert len(infos) == 1, body
    bad_requests = [d for d in body["details"] if d["@type"] == BAD_REQUEST]
    fields = tuple(v["field"] for r in bad_requests for v in r.get("fieldViolations", []))
    return Refusal(
        http_status=response.status_code,
        code=body["code"],
        message=body["message"],
        reason=infos[0]["reason"],
        domain=infos[0]["domain"],
        metadata=infos[0].get("metadata", {}),
        fields=fields,
        body=body,
    )


def server_calls_started() -> float:
    """RPCs every in-process gRPC server has started so far (the kit's standard metric)."""
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "grpc_server_started":
            total += sum(sample.value for sample in metric.samples if sample.name.endswith("_total"))
    return total


class JsonLines(logging.Handler):
    """Keeps every log record of the process as the JSON line the kit would write."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter("test"))
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def of_logger(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["logger"] == name]


@asynccontextmanager
async def captured_logs() -> AsyncIterator[JsonLines]:
    handler = JsonLines()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
