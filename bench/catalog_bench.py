"""Catalog benchmark: GetProduct and ListProducts over gRPC, and merchant provisioning time.

Starts `python -m tally_catalog` as its own process (fresh database prefix and exchange,
so it never touches other data), then drives it from this process with N concurrent
callers over one channel per worker task group, and prints figures:

    make bench                       # defaults: 64 callers, 15 s per phase
    .venv/bin/python bench/catalog_bench.py --callers 64 --seconds 15

Targets on a 2-core machine, client included: >= 3,000 GetProduct/s; a new merchant
ready (CreateMerchant answered) in < 500 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tally.catalog.v1 import catalog_service_pb2 as pb
from tally.catalog.v1 import catalog_service_pb2_grpc as rpc
from tally.catalog.v1 import resources_pb2 as res
from tally.common.v1 import money_pb2
from tally_catalog.settings import CatalogSettings
from tally_kit.auth import issue_dev_token
from tally_kit.testing import drop_databases, unique_prefix


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def merchant_config() -> res.MerchantConfig:
    return res.MerchantConfig(
        legal_name="Bench Merchant SAS",
        tax_id="FR00123456789",
        address=res.PostalAddress(
            address_lines=["1 rue de la Paix"], locality="Paris", postal_code="75002", region_code="FR"
        ),
        receipt_series_prefix="BENCH",
        tax_regime=res.TaxRegime(rate_percent="20", prices_include_tax=True),
        operation_timeout=Duration(seconds=900),
        retention_days=3650,
        default_currency="EUR",
    )


@dataclass
class Result:
    calls: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    def line(self, name: str) -> str:
        lat = sorted(self.latencies_ms)
        p50 = lat[len(lat) // 2] if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
        return (
            f"{name:<14} {self.calls / self.seconds:>9.0f} ops/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms"
            f"   calls {self.calls}   errors {self.errors}"
        )


async def drive(callers: int, seconds: float, call: Callable[[int], Awaitable[object]]) -> Result:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def caller(index: int) -> None:
        nonlocal errors
        n = index
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                await call(n)
            except grpc.aio.AioRpcError:
                errors += 1
            latencies.append((time.perf_counter() - started) * 1000)
            n += callers

    began = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    return Result(len(latencies), errors, time.perf_counter() - began, latencies)


async def wait_serving(channel: grpc.aio.Channel, process: asyncio.subprocess.Process) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for _ in range(120):
        if process.returncode is not None:
            raise SystemExit("the catalog process exited during start-up")
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.25)
    raise SystemExit("the catalog did not become healthy")


async def main(args: argparse.Namespace) -> None:
    prefix = unique_prefix()
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "CATALOG_DB_PREFIX": prefix,
        "CATALOG_GRPC_PORT": str(port),
        "CATALOG_METRICS_PORT": str(metrics_port),
        "CATALOG_EVENTS_EXCHANGE": f"{prefix}bench.events",
        "CATALOG_LOG_LEVEL": args.log_level,
    }
    settings = CatalogSettings(db_prefix=prefix)
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tally_catalog", env=env, stdout=asyncio.subprocess.DEVNULL
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_serving(channel, server)
            stub = rpc.CatalogServiceStub(channel)
            platform = (
                ("authorization", f"Bearer {issue_dev_token(settings, role='platform', merchant_id=None)}"),
            )

            provision_ms = []
            for i in range(args.merchants):
                started = time.perf_counter()
                await stub.CreateMerchant(
                    pb.CreateMerchantRequest(
                        merchant_id=f"bench-{i}", request_id=str(uuid.uuid4()), config=merchant_config()
                    ),
                    metadata=platform,
                )
                provision_ms.append((time.perf_counter() - started) * 1000)
            merchant = "bench-0"
            app = (
                ("authorization", f"Bearer {issue_dev_token(settings, role='app', merchant_id=merchant)}"),
            )
            admin = (
                ("authorization", f"Bearer {issue_dev_token(settings, role='admin', merchant_id=merchant)}"),
            )
            product_ids = []
            for i in range(args.products):
                reply = await stub.CreateProduct(
                    pb.CreateProductRequest(
                        merchant_id=merchant,
                        request_id=str(uuid.uuid4()),
                        product=res.Product(
                            name=f"Pack {i}",
                            credits=money_pb2.Credits(value=f"{100 + i}.5"),
                            access_period_days=30,
                            distribution=res.PRODUCT_DISTRIBUTION_SELLABLE,
                        ),
                    ),
                    metadata=admin,
                )
                product_ids.append(reply.product.product_id)

            async def get_product(n: int) -> object:
                return await stub.GetProduct(
                    pb.GetProductRequest(merchant_id=merchant, product_id=product_ids[n % len(product_ids)]),
                    metadata=app,
                    timeout=5,
                )

            async def list_products(n: int) -> object:
                return await stub.ListProducts(
                    pb.ListProductsRequest(merchant_id=merchant, page_size=20), metadata=app, timeout=5
                )

            await drive(args.callers, 2, get_product)  # warm-up: pools, caches, JIT-free but connection setup
            get = await drive(args.callers, args.seconds, get_product)
            lst = await drive(args.callers, args.seconds, list_products)

        print(
            f"catalog benchmark: {args.callers} concurrent callers, {args.seconds:.0f} s per phase, "
            f"{os.cpu_count()} CPUs, server log level {args.log_level}, one client process"
        )
        print(get.line("GetProduct"))
        print(lst.line("ListProducts"))
        print(
            f"provision      {args.merchants} new merchants: CreateMerchant median "
            f"{statistics.median(provision_ms):.0f} ms, max {max(provision_ms):.0f} ms"
        )
    finally:
        server.terminate()
        await server.wait()
        await drop_databases(settings, prefix)
        await delete_exchange(settings, f"{prefix}bench.events")


async def delete_exchange(settings: CatalogSettings, name: str) -> None:
    import aio_pika
    from tally_kit.events.topology import unrouted_exchange_name, unrouted_queue_name

    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(name)
        await channel.exchange_delete(unrouted_exchange_name(name))
        await channel.queue_delete(unrouted_queue_name(name))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--merchants", type=int, default=10)
    parser.add_argument("--products", type=int, default=50)
    parser.add_argument("--log-level", default="INFO")
    asyncio.run(main(parser.parse_args()))
