"""`make run`: start every service as a process, wait until each is healthy, stream logs.

Checks PostgreSQL and RabbitMQ first and says plainly what is missing instead of letting
each service fail with a stack trace. Ctrl-C (or SIGTERM) stops every service gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tally_catalog.settings import CatalogSettings
from tally_gateway.routes import EDGE_ALIASES
from tally_gateway.settings import GatewaySettings
from tally_kit.auth import issue_dev_token
from tally_kit.settings import ServiceSettings
from tally_ledger.settings import LedgerSettings
from tally_payment_gateway.settings import MERCHANT_PLACEHOLDER, PaymentGatewaySettings
from tally_receipt.settings import ReceiptSettings

COLORS = ["\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m", "\033[31m", "\033[37m"]
RESET = "\033[0m"
STOP_TIMEOUT_SECONDS = 20.0


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    # None for a process that needs neither PostgreSQL nor RabbitMQ (the PSP simulator).
    settings_class: type[ServiceSettings] | None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # HTTP servers are ready when GET of this path on `http_port` answers 200; gRPC services
    # when their health service reports SERVING.
    http_ready_path: str | None = None
    http_port: int | None = None

    def settings(self) -> ServiceSettings | None:
        """What the service will read from this environment: its ports and its servers."""
        return self.settings_class() if self.settings_class else None

    def endpoint(self) -> str:
        if self.http_port is not None:
            return f"http://127.0.0.1:{self.http_port}"
        settings = self.settings()
        assert settings is not None, "a gRPC service has settings"
        return f"127.0.0.1:{settings.grpc_port} (gRPC; metrics on :{settings.metrics_port})"


GATEWAY_PORT = GatewaySettings().http_port
SIMULATOR_PORT = 8090
# Where the simulator sends each merchant's webhooks: the HTTP gateway's Authorize.Net route,
# which hands them to the payment gateway; the simulator puts the merchant in its place.
_AUTHORIZE_NET_ROUTE = next(alias.path for alias in EDGE_ALIASES if alias.name == "authorizeNet")
SIMULATOR_WEBHOOK_URL = f"http://127.0.0.1:{GATEWAY_PORT}" + _AUTHORIZE_NET_ROUTE.replace(
    "{merchant_id}", MERCHANT_PLACEHOLDER
)

# Started in this order, each once the previous is ready: the ledger, the receipt service
# and the payment gateway read the catalog or the simulator, every consumer declares its
# queue before anyone publishes, and the HTTP gateway comes last.
SUITE: tuple[ServiceSpec, ...] = (
    ServiceSpec("catalog", "tally_catalog", CatalogSettings),
    ServiceSpec("ledger", "tally_ledger", LedgerSettings),
    ServiceSpec("receipt", "tally_receipt", ReceiptSettings),
    ServiceSpec(
        "psp-simulator",
        "psp_simulator",
        None,
        args=("--port", str(SIMULATOR_PORT), "--webhook-url", SIMULATOR_WEBHOOK_URL),
        http_ready_path="/_simulator/transactions",
        http_port=SIMULATOR_PORT,
    ),
    ServiceSpec("payment-gateway", "tally_payment_gateway", PaymentGatewaySettings),
    ServiceSpec(
        "gateway",
        "tally_gateway",
        GatewaySettings,
        # Readiness covers the services this suite runs; the scheduler and loyalty come later.
        env={
            "GATEWAY_READINESS_SERVICES": json.dumps(
                [
                    "tally.catalog.v1.CatalogService",
                    "tally.ledger.v1.LedgerService",
                    "tally.receipt.v1.ReceiptService",
                    "tally.payment_gateway.v1.PaymentGatewayService",
                ]
            )
        },
        http_ready_path="/readyz",
        http_port=GATEWAY_PORT,
    ),
)


async def _reachable(host: str, port: int, wait_seconds: float = 2.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), wait_seconds)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _amqp_address(settings: ServiceSettings) -> tuple[str, int]:
    url = urlsplit(settings.amqp_url.get_secret_value())
    return url.hostname or "127.0.0.1", url.port or 5672


async def _check_dependencies(services: tuple[ServiceSpec, ...]) -> list[str]:
    problems = []
    for spec in services:
        settings = spec.settings()
        if settings is None or spec.settings_class is None:
            continue
        prefix = spec.settings_class.model_config.get("env_prefix", "")
        pg = (settings.pg_host, settings.pg_port)
        if not await _reachable(*pg):
            problems.append(
                f"{spec.name}: PostgreSQL is not answering on {pg[0]}:{pg[1]}. Start it (on Debian: "
                "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start) "
                f"or point {prefix}PG_HOST/{prefix}PG_PORT at a running server."
            )
        amqp = _amqp_address(settings)
        if not await _reachable(*amqp):
            problems.append(
                f"{spec.name}: RabbitMQ is not answering on {amqp[0]}:{amqp[1]}. Start it "
                f"(rabbitmq-server -detached) or point {prefix}AMQP_URL at a running broker."
            )
    return problems


async def _pump(name: str, color: str, stream: asyncio.StreamReader, width: int) -> None:
    prefix = f"{color}{name.ljust(width)} |{RESET} " if sys.stdout.isatty() else f"{name.ljust(width)} | "
    while line := await stream.readline():
        sys.stdout.write(prefix + line.decode(errors="replace"))
        sys.stdout.flush()


async def _wait_ready(spec: ServiceSpec, process: asyncio.subprocess.Process, wait_seconds: float) -> bool:
    if spec.http_ready_path is not None and spec.http_port is not None:
        return await _wait_http_ready(spec.http_port, spec.http_ready_path, process, wait_seconds)
    settings = spec.settings()
    assert settings is not None, "a gRPC service has settings"
    return await _wait_grpc_serving(settings.grpc_port, process, wait_seconds)


async def _wait_http_ready(
    port: int, path: str, process: asyncio.subprocess.Process, wait_seconds: float
) -> bool:
    deadline = asyncio.get_running_loop().time() + wait_seconds
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=1.0) as client:
        while asyncio.get_running_loop().time() < deadline:
            if process.returncode is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(path)).status_code == 200:
                    return True
            await asyncio.sleep(0.25)
    return False


async def _wait_grpc_serving(port: int, process: asyncio.subprocess.Process, wait_seconds: float) -> bool:
    deadline = asyncio.get_running_loop().time() + wait_seconds
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while asyncio.get_running_loop().time() < deadline:
            if process.returncode is not None:
                return False
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            await asyncio.sleep(0.25)
    return False


async def _stop(processes: dict[str, asyncio.subprocess.Process]) -> None:
    for process in processes.values():
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    for name, process in processes.items():
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            print(f"{name} did not stop within {STOP_TIMEOUT_SECONDS:.0f}s; killing it", flush=True)
            process.kill()
            await process.wait()


async def launch(services: tuple[ServiceSpec, ...], health_timeout: float) -> int:
    problems = await _check_dependencies(services)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2

    width = max(len(s.name) for s in services)
    processes: dict[str, asyncio.subprocess.Process] = {}
    pumps: list[asyncio.Task[None]] = []
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        for index, spec in enumerate(services):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                spec.module,
                *spec.args,
                env={**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the launcher only; it stops children in order
            )
            processes[spec.name] = process
            assert process.stdout is not None
            pumps.append(
                asyncio.create_task(_pump(spec.name, COLORS[index % len(COLORS)], process.stdout, width))
            )
            if not await _wait_ready(spec, process, health_timeout):
                print(
                    f"error: {spec.name} did not become healthy within {health_timeout:.0f}s", file=sys.stderr
                )
                return 1
            print(f"{spec.name} is serving on {spec.endpoint()}", flush=True)

        token = issue_dev_token(GatewaySettings(), role="platform", merchant_id=None, subject="launcher")
        print("\nTally is running. Press Ctrl-C to stop.", flush=True)
        print(f"HTTP gateway:  http://127.0.0.1:{GATEWAY_PORT}", flush=True)
        print(f"API docs:      http://127.0.0.1:{GATEWAY_PORT}/docs", flush=True)
        print(f"development token (platform role, 1 h):\n{token}\n", flush=True)

        exited = [asyncio.create_task(p.wait()) for p in processes.values()]
        stopper = asyncio.create_task(stop_requested.wait())
        done, _ = await asyncio.wait([stopper, *exited], return_when=asyncio.FIRST_COMPLETED)
        if stopper not in done:
            dead = [name for name, p in processes.items() if p.returncode is not None]
            print(f"error: {', '.join(dead)} exited; stopping the suite", file=sys.stderr)
            return 1
        return 0
    finally:
        print("stopping...", flush=True)
        await _stop(processes)
        for pump in pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(pump, 2.0)
        print("stopped.", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--health-timeout", type=float, default=60.0)
    args = parser.parse_args()
    return asyncio.run(launch(SUITE, args.health_timeout))


if __name__ == "__main__":
    raise SystemExit(main())
