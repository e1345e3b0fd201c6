"""Start-up: wire the ledger's servicer to the kit (directory, outbox relay, server) and to
the catalog it reads over gRPC."""

from __future__ import annotations

from tally.ledger.v1 import ledger_service_pb2_grpc
from tally_kit.db import MerchantDirectory
from tally_kit.events import OutboxRelay
from tally_kit.server import Hook, ServiceApp, ServiceRegistration
from tally_kit.uow import Mutations

from tally_ledger.catalog import CatalogReader
from tally_ledger.catalog_client import CachePolicy, GrpcCatalogReader, ServiceToken
from tally_ledger.servicer import SERVICE_NAME, LedgerServicer
from tally_ledger.services import Clock, utc_now
from tally_ledger.settings import LedgerSettings
from tally_ledger.store import MIGRATIONS

PRODUCER = "ledger"


def build_directory(settings: LedgerSettings) -> MerchantDirectory:
    return MerchantDirectory(settings, [MIGRATIONS])


def open_catalog_reader(settings: LedgerSettings) -> GrpcCatalogReader:
    return GrpcCatalogReader.open(
        settings.catalog_target,
        service_token=ServiceToken(
            settings, subject=settings.service_name, configured=settings.service_token
        ),
        timeout_seconds=settings.catalog_timeout_seconds,
        cache=CachePolicy(
            max_entries=settings.catalog_cache_size,
            ttl_seconds=settings.catalog_cache_ttl_seconds,
            rate_staleness_seconds=settings.catalog_rate_staleness_seconds,
        ),
    )


def build_app(
    settings: LedgerSettings | None = None, *, clock: Clock = utc_now, catalog: CatalogReader | None = None
) -> ServiceApp:
    """The ledger's app; `catalog` replaces the gRPC reader of `settings.catalog_target`."""
    settings = settings or LedgerSettings()
    directory = build_directory(settings)
    relay = OutboxRelay(settings, directory, producer=PRODUCER)
    on_stop: list[Hook] = [relay.stop, directory.close]
    if catalog is None:
        reader = open_catalog_reader(settings)
        on_stop.append(reader.close)
        catalog = reader
    servicer = LedgerServicer(directory, Mutations(directory, relay, producer=PRODUCER), catalog, clock=clock)
    return ServiceApp(
        settings,
        services=[
            ServiceRegistration(
                SERVICE_NAME, ledger_service_pb2_grpc.add_LedgerServiceServicer_to_server, servicer
            )
        ],
        on_start=[directory.start, relay.start],
        # The relay flushes what was committed before the directory's pools close.
        on_stop=on_stop,
    )
