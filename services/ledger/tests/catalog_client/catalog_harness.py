"""A real catalog in this process for the ledger's tests: its app on port 0 over PostgreSQL and
RabbitMQ (unique database prefix and exchange, both removed at the end), with the platform
calls that set up merchants, products and operation types.

Shared by the ledger's catalog-client, handler and job tests; a test folder puts this
folder on sys.path to import it (test folders are not packages, --import-mode=importlib).
"""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime, timedelta

import aio_pika
import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import REGISTRY
from tally.catalog.v1 import catalog_service_pb2 as api
from tally.catalog.v1 import catalog_service_pb2_grpc
from tally.catalog.v1 import resources_pb2 as res
from tally.common.v1.money_pb2 import Credits
from tally_catalog.app import build_app
from tally_catalog.settings import CatalogSettings
from tally_kit.auth import issue_dev_token
from tally_kit.events.topology import unrouted_exchange_name, unrouted_queue_name
from tally_kit.server import ServiceApp
from tally_kit.testing import drop_databases, unique_prefix

CATALOG_SERVICE = api.DESCRIPTOR.services_by_name["CatalogService"].full_name
CALL_TIMEOUT_SECONDS = 10.0


def new_merchant_id(label: str) -> str:
    """A merchant id unique to this run, e.g. `lot-3fa9c1`."""
    return f"{label}-{secrets.token_hex(3)}"


def timestamp(value: datetime) -> Timestamp:
    message = Timestamp()
    message.FromDatetime(value)
    return message


def client_calls(method: str) -> float:
    """Attempts of `CatalogService/<method>` sent through kit channels (the ledger's reader) so far."""
    value = REGISTRY.get_sample_value(
        "grpc_client_started_total",
        {"grpc_type": "UNARY", "grpc_service": CATALOG_SERVICE, "grpc_method": method},
    )
    return value or 0.0


def merchant_config(operation_timeout: timedelta) -> res.MerchantConfig:
    return res.MerchantConfig(
        legal_name="Acme SAS",
        tax_id="FR40303265045",
        address=res.PostalAddress(address_lines=["1 rue de la Paix"], locality="Paris", region_code="FR"),
        receipt_series_prefix="ACME",
        tax_regime=res.TaxRegime(rate_percent="20", prices_include_tax=True),
        operation_timeout=Duration(seconds=int(operation_timeout.total_seconds())),
        retention_days=3650,
        default_currency="EUR",
    )


class RunningCatalog:
    """The catalog app of one test run, and a platform client of it."""

    def __init__(self) -> None:
        prefix = unique_prefix()
        self.settings = CatalogSettings(
            grpc_host="127.0.0.1",
            grpc_port=0,
            metrics_port=0,
            db_prefix=prefix,
            events_exchange=f"{prefix}ledger-tests.catalog",
            # The PostgreSQL server is shared with other test runs.
            db_max_pools=4,
            db_pool_max_size=2,
            db_max_connections=6,
            shutdown_grace_seconds=2.0,
        )
        self._app: ServiceApp | None = None
        self._channel: grpc.aio.Channel | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def stub(self) -> catalog_service_pb2_grpc.CatalogServiceStub:
        assert self._channel is not None, "the catalog is not running"
        return catalog_service_pb2_grpc.CatalogServiceStub(self._channel)

    async def start(self) -> None:
        self._app = build_app(self.settings)
        self.port = await self._app.start()
        self._channel = grpc.aio.insecure_channel(self.target)

    async def stop(self) -> None:
        """Stops serving; the databases stay until `close`."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self._app is not None:
            await self._app.stop()
            self._app = None

    async def close(self) -> None:
        await self.stop()
        await drop_databases(self.settings, self.settings.db_prefix)
        connection = await aio_pika.connect(self.settings.amqp_url.get_secret_value())
        async with connection:
            channel = await connection.channel()
            exchange = self.settings.events_exchange
            await channel.exchange_delete(exchange)
            await channel.queue_delete(unrouted_queue_name(exchange))
            await channel.exchange_delete(unrouted_exchange_name(exchange))

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = issue_dev_token(self.settings, role="platform", merchant_id=None, subject="ledger-tests")
        return (("authorization", f"Bearer {token}"), ("x-request-id", str(uuid.uuid4())))

    async def create_merchant(
        self, merchant_id: str, *, operation_timeout: timedelta = timedelta(minutes=15)
    ) -> res.Merchant:
        response = await self.stub.CreateMerchant(
            api.CreateMerchantRequest(
                merchant_id=merchant_id,
                request_id=str(uuid.uuid4()),
                config=merchant_config(operation_timeout),
            ),
            metadata=self._metadata(),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return response.merchant

    async def create_product(
        self,
        merchant_id: str,
        *,
        credits: str = "100",
        access_period_days: int | None = None,
        grant_policy: res.GrantPolicy.ValueType | None = None,
        name: str = "Starter pack",
    ) -> res.Product:
        """A sellable product, or a grant with `grant_policy`."""
        product = res.Product(
            name=name,
            credits=Credits(value=credits),
            distribution=(
                res.PRODUCT_DISTRIBUTION_SELLABLE if grant_policy is None else res.PRODUCT_DISTRIBUTION_GRANT
            ),
            grant_policy=grant_policy or res.GRANT_POLICY_UNSPECIFIED,
        )
        if access_period_days is not None:
            product.access_period_days = access_period_days
        response = await self.stub.CreateProduct(
            api.CreateProductRequest(merchant_id=merchant_id, request_id=str(uuid.uuid4()), product=product),
            metadata=self._metadata(),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return response.product

    async def archive_product(self, merchant_id: str, product_id: str) -> res.Product:
        response = await self.stub.ArchiveProduct(
            api.ArchiveProductRequest(
                merchant_id=merchant_id, product_id=product_id, request_id=str(uuid.uuid4())
            ),
            metadata=self._metadata(),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return response.product

    async def schedule_operation_type(
        self,
        merchant_id: str,
        operation_code: str,
        credits_per_unit: str,
        *,
        resource_unit: str = "token",
        effective: datetime | None = None,
    ) -> res.OperationTypeVersion:
        request = api.ScheduleOperationTypeVersionRequest(
            merchant_id=merchant_id,
            operation_code=operation_code,
            request_id=str(uuid.uuid4()),
            resource_unit=resource_unit,
            credits_per_unit=Credits(value=credits_per_unit),
        )
        if effective is not None:
            request.effective_time.CopyFrom(timestamp(effective))
        response = await self.stub.ScheduleOperationTypeVersion(
            request, metadata=self._metadata(), timeout=CALL_TIMEOUT_SECONDS
        )
        return response.operation_type_version
