"""`ServiceApp`: a service's grpc.aio server with health, reflection, metrics and graceful shutdown.

A service's `__main__` is typically:

    def build() -> ServiceApp:
        settings = CatalogSettings()
        ...  # the servicer and what it needs (databases, event relay)
        return ServiceApp(
            settings,
            services=[
                ServiceRegistration(
                    "tally.catalog.v1.CatalogService", add_CatalogServiceServicer_to_server, servicer
                )
            ],
            on_start=[open_databases, start_relay],
            on_stop=[flush_outbox, close_databases],
        )

    run(build)

or, for a service that keeps merchant databases, `serve_or_migrate(...)`, which adds the
`migrate` command the Helm pre-upgrade hook runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tally_kit.auth import TokenVerifier
from tally_kit.db.directory import MerchantDirectory
from tally_kit.interceptors import ServerInterceptor
from tally_kit.logging import configure_logging
from tally_kit.metrics import MetricsServer, record_build_info, start_metrics_server
from tally_kit.settings import ServiceSettings

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]

_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_OVERALL = ""


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service the app serves: its full name, generated adder and servicer."""

    name: str  # fully qualified, e.g. "tally.catalog.v1.CatalogService"
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: object


class ServiceApp:
    """Runs a service's gRPC server from start to graceful stop.

    `settings.shutdown_drain_seconds` is how long health reports NOT_SERVING while calls
    are still accepted before the server stops taking new ones, so load balancers and
    readiness probes move traffic away first.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        services: Sequence[ServiceRegistration],
        on_start: Sequence[Hook] = (),
        on_stop: Sequence[Hook] = (),
    ) -> None:
        self.settings = settings
        self._services = tuple(services)
        self._on_start = tuple(on_start)
        self._on_stop = tuple(on_stop)
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._metrics: MetricsServer | None = None

    @property
    def metrics_port(self) -> int | None:
        return self._metrics.port if self._metrics else None

    async def start(self) -> int:
        """Bind, run the on_start hooks, start serving; returns the bound gRPC port."""
        if self._server is not None:
            raise RuntimeError("the app is already started")
        settings = self.settings
        server = grpc.aio.server(interceptors=[ServerInterceptor(settings, TokenVerifier(settings))])
        for service in self._services:
            service.add_to_server(service.servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [*(s.name for s in self._services), _HEALTH_SERVICE, reflection.SERVICE_NAME], server
        )
        # Bind both ports before the hooks run, so a busy port fails fast without touching databases.
        port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
        metrics_server = start_metrics_server(settings.grpc_host, settings.metrics_port)
        try:
            for hook in self._on_start:
                await hook()
            await server.start()
        except BaseException:
            metrics_server.close()
            await server.stop(None)
            # Release what the hooks that did run opened (pools, broker connections); stop
            # hooks tolerate a component that never started.
            await self._run_stop_hooks()
            raise
        for name in (_OVERALL, *(s.name for s in self._services)):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server, self._health, self._metrics = server, health_servicer, metrics_server
        record_build_info(settings.service_name, settings.version)
        log.info(
            "serving",
            extra={"grpc_port": port, "metrics_port": metrics_server.port, "version": settings.version},
        )
        return port

    async def stop(self) -> None:
        """NOT_SERVING, drain, let in-flight calls finish, then run the on_stop hooks in order."""
        if self._server is None or self._health is None:
            return
        server, self._server = self._server, None
        await self._health.enter_graceful_shutdown()
        if self.settings.shutdown_drain_seconds:
            await asyncio.sleep(self.settings.shutdown_drain_seconds)
        await server.stop(self.settings.shutdown_grace_seconds)
        await self._run_stop_hooks()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        log.info("stopped")

    async def _run_stop_hooks(self) -> None:
        for hook in self._on_stop:
            try:
                await hook()
            except Exception:
                # The remaining hooks still release what they own.
                log.exception("on_stop hook %s failed", getattr(hook, "__qualname__", hook))

    async def serve(self) -> None:
        """Start, wait for SIGTERM or SIGINT, stop gracefully."""
        await self.start()
        stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for signum in signals:
            loop.add_signal_handler(signum, stop_requested.set)
        try:
            await stop_requested.wait()
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
            await self.stop()


def run(app_factory: Callable[[], ServiceApp]) -> None:
    """A service's `__main__`: build the app inside the event loop, log JSON, serve until signalled."""

    async def main() -> None:
        app = app_factory()
        configure_logging(app.settings.service_name, app.settings.log_level)
        await app.serve()

    # uvloop cuts the event loop's share of each call by about a fifth (measured with
    # bench/catalog_bench.py); the client side gains nothing from it.
    uvloop.run(main())


S = TypeVar("S", bound=ServiceSettings)


def serve_or_migrate(
    module: str,
    description: str | None,
    settings_class: type[S],
    build_app: Callable[[], ServiceApp],
    build_directory: Callable[[S], MerchantDirectory],
) -> None:
    """`python -m <module> [serve]` serves; `python -m <module> migrate` migrates the control
    database and every merchant database, then exits: status 1, and the error logged, at the
    first database that cannot be migrated (the deploy stops there)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("command", nargs="?", choices=["serve", "migrate"], default="serve")
    if parser.parse_args().command == "serve":
        run(build_app)
        return
    settings = settings_class()
    configure_logging(settings.service_name, settings.log_level)
    log = logging.getLogger(f"{module}.migrate")
    try:
        asyncio.run(_migrate(build_directory(settings), log))
    except Exception:
        log.exception("migration failed")
        raise SystemExit(1) from None


async def _migrate(directory: MerchantDirectory, log: logging.Logger) -> None:
    await directory.start()
    try:
        applied = await directory.migrate_all()
    finally:
        await directory.close()
    changed = {merchant: names for merchant, names in applied.items() if names}
    log.info(
        "migrated %d merchant databases, %d changed",
        len(applied),
        len(changed),
        extra={"changed": changed},
    )
