"""Start-up: wire the payment gateway's servicer, its notification consumer, its reconciliation
job and its token reseal job to the kit (directory, outbox relay, server) and to the provider."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from tally.payment_gateway.v1 import payment_gateway_service_pb2_grpc
from tally_kit.db import MerchantDirectory
from tally_kit.events import EventConsumer, OutboxRelay
from tally_kit.housekeeping import Housekeeping
from tally_kit.jobs import PeriodicJob, utc_now
from tally_kit.server import ServiceApp, ServiceRegistration

from tally_payment_gateway import reconciliation, reseal
from tally_payment_gateway.authorize_net import AuthorizeNetProvider
from tally_payment_gateway.crypto import TokenVault
from tally_payment_gateway.handlers import build_consumer
from tally_payment_gateway.provider import PaymentProvider
from tally_payment_gateway.servicer import SERVICE_NAME, Clock, MerchantGate, PaymentGatewayServicer
from tally_payment_gateway.settings import PaymentGatewaySettings
from tally_payment_gateway.store import MIGRATIONS, PRODUCER, UnsettledCall


@dataclass(frozen=True)
class Wiring:
    """Everything the app runs, for tests that reach past its gRPC API."""

    settings: PaymentGatewaySettings
    directory: MerchantDirectory
    relay: OutboxRelay
    provider: PaymentProvider
    servicer: PaymentGatewayServicer
    consumer: EventConsumer
    reconciliation: PeriodicJob[UnsettledCall]
    reseal: PeriodicJob[UUID]
    housekeeping: Housekeeping


def build_directory(settings: PaymentGatewaySettings) -> MerchantDirectory:
    return MerchantDirectory(settings, [MIGRATIONS])


def wire(
    settings: PaymentGatewaySettings,
    *,
    clock: Clock = utc_now,
    provider: PaymentProvider | None = None,
    consumer_retry_backoff_seconds: float = 0.5,
    consumer_retry_backoff_max_seconds: float = 30.0,
) -> Wiring:
    """The app's parts; `provider` replaces the Authorize.Net adapter of `settings`."""
    directory = build_directory(settings)
    relay = OutboxRelay(settings, directory, producer=PRODUCER)
    provider = provider or AuthorizeNetProvider.from_settings(settings)
    gate = MerchantGate(directory, settings.authorize_net_account)
    vault = TokenVault.from_base64(settings.token_encryption_keys, settings.token_encryption_active_key_id)
    return Wiring(
        settings=settings,
        directory=directory,
        relay=relay,
        provider=provider,
        servicer=PaymentGatewayServicer(directory, relay, provider, vault, gate, clock=clock),
        consumer=build_consumer(
            settings,
            directory,
            relay,
            provider,
            prepare_merchant=gate.ensure,
            clock=clock,
            retry_backoff_seconds=consumer_retry_backoff_seconds,
            retry_backoff_max_seconds=consumer_retry_backoff_max_seconds,
        ),
        reconciliation=reconciliation.build_job(directory, provider, relay, settings, clock=clock),
        reseal=reseal.build_job(directory, vault, settings),
        housekeeping=Housekeeping(settings, directory),
    )


def service_app(wiring: Wiring) -> ServiceApp:
    return ServiceApp(
        wiring.settings,
        services=[
            ServiceRegistration(
                SERVICE_NAME,
                payment_gateway_service_pb2_grpc.add_PaymentGatewayServiceServicer_to_server,
                wiring.servicer,
            )
        ],
        on_start=[
            wiring.directory.start,
            wiring.relay.start,
            wiring.consumer.start,
            wiring.reconciliation.start,
            wiring.reseal.start,
            wiring.housekeeping.start,
        ],
        # Calls to the provider in flight are recorded first; the relay flushes what was
        # committed before the directory's pools close.
        on_stop=[
            wiring.servicer.drain,
            wiring.reconciliation.stop,
            wiring.reseal.stop,
            wiring.housekeeping.stop,
            wiring.consumer.stop,
            wiring.relay.stop,
            wiring.directory.close,
            wiring.provider.aclose,
        ],
    )


def build_app(settings: PaymentGatewaySettings | None = None, *, clock: Clock = utc_now) -> ServiceApp:
    return service_app(wire(settings or PaymentGatewaySettings(), clock=clock))
