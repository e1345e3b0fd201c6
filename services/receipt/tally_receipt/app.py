"""Start-up: wire the receipt service to the kit (directory, consumer, outbox relay, server)."""

from __future__ import annotations

from pathlib import Path

from tally.receipt.v1 import receipt_service_pb2_grpc
from tally_kit.db import MerchantDirectory
from tally_kit.events import EventConsumer, OutboxRelay
from tally_kit.housekeeping import Housekeeping
from tally_kit.server import ServiceApp, ServiceRegistration

from tally_receipt.catalog_client import CatalogMerchantProfiles, MerchantProfiles
from tally_receipt.handlers import PRODUCER, Clock, LedgerEventHandlers, utc_now
from tally_receipt.pdf import Fonts
from tally_receipt.servicer import SERVICE_NAME, ReceiptServicer
from tally_receipt.settings import ReceiptSettings
from tally_receipt.store import MIGRATIONS


def build_directory(settings: ReceiptSettings) -> MerchantDirectory:
    return MerchantDirectory(settings, [MIGRATIONS])


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
    housekeeping = Housekeeping(settings, directory)
    merchant_profiles = profiles or CatalogMerchantProfiles.open(settings)

    async def prepare_merchant(merchant_id: str) -> None:
        # Only a merchant the catalog knows gets a database, created on its first event; the
        # profile read here is then in the cache for the handler.
        await merchant_profiles.profile(merchant_id)
        await directory.provision(merchant_id)

    consumer = EventConsumer(
        settings,
        directory,
        service=settings.consumer_name,
        handlers=LedgerEventHandlers(merchant_profiles, clock=clock).by_event_type(),
        prepare_merchant=prepare_merchant,
        # Handlers write the documents' issued events; the relay publishes them at once.
        after_commit=relay.notify,
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
        on_start=[check_fonts, directory.start, relay.start, consumer.start, housekeeping.start],
        # In-flight handlers finish first; the relay then flushes what they committed before
        # the directory's pools close.
        on_stop=[housekeeping.stop, consumer.stop, relay.stop, merchant_profiles.close, directory.close],
    )
