"""Start-up: wire the ledger to the kit (directory, outbox relay, server), to the catalog it
reads over gRPC, to the payment events it consumes and to its periodic jobs.

The servicer, the payment-event consumer and the jobs share one service layer (`Ledger`)
and one `MerchantGate`, so a merchant's database is created once, whoever sees it first.
"""

from __future__ import annotations

from tally.ledger.v1 import ledger_service_pb2_grpc
from tally_kit.auth import ServiceToken
from tally_kit.db import MerchantDirectory
from tally_kit.events import OutboxRelay
from tally_kit.housekeeping import Housekeeping
from tally_kit.server import Hook, ServiceApp, ServiceRegistration
from tally_kit.uow import Mutations

from tally_ledger.catalog import CatalogReader
from tally_ledger.catalog_client import CachePolicy, GrpcCatalogReader
from tally_ledger.handlers import build_consumer
from tally_ledger.jobs import LedgerJobs
from tally_ledger.servicer import SERVICE_NAME, LedgerServicer
from tally_ledger.services import Clock, Ledger, MerchantGate, utc_now
from tally_ledger.settings import LedgerSettings
from tally_ledger.store import MIGRATIONS

PRODUCER = "ledger"


def build_directory(settings: LedgerSettings) -> MerchantDirectory:
    return MerchantDirectory(settings, [MIGRATIONS])


def open_catalog_reader(settings: LedgerSettings) -> GrpcCatalogReader:
    return GrpcCatalogReader.open(
        settings.catalog_target,
        service_token=ServiceToken(settings),
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
    housekeeping = Housekeeping(settings, directory)
    closers: list[Hook] = []
    if catalog is None:
        reader = open_catalog_reader(settings)
        closers.append(reader.close)
        catalog = reader
    ledger = Ledger(catalog, clock=clock)
    merchants = MerchantGate(directory, catalog)
    servicer = LedgerServicer(
        directory,
        Mutations(directory, relay, producer=PRODUCER),
        catalog,
        clock=clock,
        ledger=ledger,
        merchants=merchants,
    )
    consumer = build_consumer(settings, directory, ledger, merchants, relay, service=settings.consumer_name)
    jobs = LedgerJobs(
        directory,
        ledger,
        catalog,
        relay,
        expiry_interval_seconds=settings.lot_expiry_interval_seconds,
        timeout_interval_seconds=settings.operation_timeout_interval_seconds,
        batch_size=settings.job_batch_size,
        clock=clock,
        stop_grace_seconds=settings.shutdown_grace_seconds,
    )
    return ServiceApp(
        settings,
        services=[
            ServiceRegistration(
                SERVICE_NAME, ledger_service_pb2_grpc.add_LedgerServiceServicer_to_server, servicer
            )
        ],
        on_start=[directory.start, relay.start, consumer.start, jobs.start, housekeeping.start],
        # Nothing new is consumed or claimed, then the relay flushes what was committed, then
        # the directory's pools and the catalog channel close.
        on_stop=[housekeeping.stop, jobs.stop, consumer.stop, relay.stop, directory.close, *closers],
    )
