"""Start-up: wire the catalog's servicer to the kit (directory, outbox relay, server)."""

from __future__ import annotations

from tally.catalog.v1 import catalog_service_pb2, catalog_service_pb2_grpc
from tally_kit.db import MerchantDirectory
from tally_kit.events import OutboxRelay
from tally_kit.housekeeping import Housekeeping
from tally_kit.server import ServiceApp, ServiceRegistration
from tally_kit.uow import Mutations

from tally_catalog.servicer import CatalogServicer, Clock, utc_now
from tally_catalog.settings import CatalogSettings
from tally_catalog.store import MIGRATIONS

SERVICE_NAME = catalog_service_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name
PRODUCER = "catalog"


def build_directory(settings: CatalogSettings) -> MerchantDirectory:
    return MerchantDirectory(settings, [MIGRATIONS])


def build_app(settings: CatalogSettings | None = None, *, clock: Clock = utc_now) -> ServiceApp:
    settings = settings or CatalogSettings()
    directory = build_directory(settings)
    relay = OutboxRelay(settings, directory, producer=PRODUCER)
    housekeeping = Housekeeping(settings, directory)
    servicer = CatalogServicer(directory, Mutations(directory, relay, producer=PRODUCER), clock=clock)
    return ServiceApp(
        settings,
        services=[
            ServiceRegistration(
                SERVICE_NAME, catalog_service_pb2_grpc.add_CatalogServiceServicer_to_server, servicer
            )
        ],
        on_start=[directory.start, relay.start, housekeeping.start],
        # The relay flushes what was committed before the directory's pools close.
        on_stop=[housekeeping.stop, relay.stop, directory.close],
    )
