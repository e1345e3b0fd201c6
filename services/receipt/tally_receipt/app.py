"""Start-up: wire the receipt service to the kit (directory, consumer, outbox relay, server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import asyncpg
from tally.receipt.v1 import receipt_service_pb2_grpc
from tally_kit.db import MerchantDirectory
from tally_kit.events import EventConsumer, OutboxRelay
from tally_kit.server import ServiceApp, ServiceRegistration

from tally_receipt.catalog_client import CatalogMerchantProfiles, MerchantProfiles
from tally_receipt.handlers import PRODUCER, Clock, LedgerEventHandlers, utc_now
from tally_receipt.pdf import Fonts
from tally_receipt.servicer import SERVICE_NAME, ReceiptServicer
from tally_receipt.settings import ReceiptSettings
from tally_receipt.store import MIGRATIONS


def build_directory(settings: ReceiptSettings) -> MerchantDirectory:
    return MerchantDirectory(settings, [MIGRATIONS])


class PublishingAfterCommit:
    """The merchant databases as the event consumer sees them: once a handler's transaction
    has committed, the relay is told to publish the events it wrote (the documents' issued
    events), rather than leaving them for the next sweep.

    Told after every handled event: nearly every one issues a document, and a merchant
    with nothing pending costs the relay one indexed query.
    """

    def __init__(self, directory: MerchantDirectory, relay: OutboxRelay) -> None:
        self._directory = directory
        self._relay = relay

    async def merchant_ids(self) -> list[str]:
        return await self._directory.merchant_ids()

    def connection(self, merchant_id: str) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return self._directory.connection(merchant_id)

    @asynccontextmanager
    async def transaction(self, merchant_id: str) -> AsyncIterator[asyncpg.Connection]:
        async with self._directory.transaction(merchant_id) as conn:
            yield conn
        self._relay.notify(merchant_id)


def build_app(
    settings: ReceiptSettings | None = None,
    *,
    clock: Clock = utc_now,
    profiles: MerchantProfiles | None = None,
) -> ServiceApp:
    """The service; `profiles` (closed with the app) defaults to the catalog at `catalog_target`."""
    settings = settings or ReceiptSettings()
    fonts = Fonts(regular=Path(settings.pdf_font_file), bold=Path(settings.pdf_bold_font_file))
    directory = build_directory(settings)
    relay = OutboxRelay(settings, directory, producer=PRODUCER)
    merchant_profiles = profiles or CatalogMerchantProfiles.open(settings)

    async def prepare_merchant(merchant_id: str) -> None:
        # Only a merchant the catalog knows gets a database, created on its first event; the
        # profile read here is then in the cache for the handler.
        await merchant_profiles.profile(merchant_id)
        await directory.provision(merchant_id)

    consumer = EventConsumer(
        settings,
        PublishingAfterCommit(directory, relay),
        service=settings.consumer_name,
        handlers=LedgerEventHandlers(merchant_profiles, clock=clock).by_event_type(),
        prepare_merchant=prepare_merchant,
    )
    servicer = ReceiptServicer(directory, fonts)

    async def check_fonts() -> None:
        fonts.check()

    return ServiceApp(
        settings,
        services=[
            ServiceRegistration(
                SERVICE_NAME, receipt_service_pb2_grpc.add_ReceiptServiceServicer_to_server, servicer
            )
        ],
        # The relay runs before the consumer, whose handlers notify it.
        on_start=[check_fonts, directory.start, relay.start, consumer.start],
        # In-flight handlers finish first; the relay then flushes what they committed before
        # the directory's pools close.
        on_stop=[consumer.stop, relay.stop, merchant_profiles.close, directory.close],
    )
