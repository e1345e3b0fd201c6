"""Catalog benchmark: GetProduct and ListProducts over gRPC, and merchant provisioning time.

Starts `python -m tally_catalog` as its own process (fresh database prefix and exchange,
so it never touches other data), then drives it from this process with N concurrent
callers spread over `--channels` channels, and prints figures:

    make bench                       # defaults: 64 callers, 15 s per phase
    .venv/bin/python bench/catalog_bench.py --callers 64 --seconds 15
    .venv/bin/python bench/catalog_bench.py --ceiling   # bare grpc.aio health server, no kit
    .venv/bin/python bench/catalog_bench.py --servers 2 --channels 2   # two processes, one port

Targets on a 2-core machine, client included: >= 3,000 GetProduct/s; a new merchant
ready (CreateMerchant answered) in < 500 ms.

Each phase is preceded by an unmeasured warm-up. Latency covers the call alone; a call
that fails is counted by status code. Besides ops/s, each phase prints the CPU time spent
per call by the server process, by the PostgreSQL backends serving it and by this client:
on a shared machine throughput moves with the load of others, CPU per call much less.
The client reuses its request messages and metadata, which saves client work only: the
server decodes, verifies and answers every call in full.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tally.catalog.v1 import catalog_service_pb2 as pb
from tally.catalog.v1 import catalog_service_pb2_grpc as rpc
from tally.catalog.v1 import resources_pb2 as res
from tally.common.v1 import money_pb2
from tally_catalog.settings import CatalogSettings
from tally_kit.auth import issue_dev_token
from tally_kit.testing import drop_databases, unique_prefix

WARM_UP_SECONDS = 2.0
CALL_TIMEOUT_SECONDS = 5.0

# The ceiling: grpc.aio with nothing of Tally's, answering health checks.
BARE_HEALTH_SERVER = """
import asyncio, sys
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

async def serve() -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()

asyncio.run(serve())
"""

Call = Callable[[int], Awaitable[object]]


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


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process (all its threads), None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # Fields after the command name, which is in parentheses and may hold spaces.
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by the client, the server and the server's PostgreSQL backends."""

    def __init__(
        self, server_pids: Sequence[int], backend_pids: Callable[[], Awaitable[Sequence[int]]] | None
    ) -> None:
        self._server_pids = server_pids
        self._backend_pids = backend_pids

    async def sample(self) -> dict[str, dict[int, float]]:
        backends = await self._backend_pids() if self._backend_pids else ()
        samples: dict[str, dict[int, float]] = {
            "client": {0: time.process_time()},
            "server": {},
            "postgres": {},
        }
        for role, pids in (("server", self._server_pids), ("postgres", backends)):
            for pid in pids:
                seconds = process_cpu_seconds(pid)
                if seconds is not None:
                    samples[role][pid] = seconds
        return samples

    @staticmethod
    def used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
        # Backends that came or went during the phase are left out: a lower bound for PostgreSQL.
        return {
            role: sum(after[role][pid] - before[role][pid] for pid in after[role] if pid in before[role])
            for role in after
        }


@dataclass
class Result:
    calls: int
    seconds: float
    latencies_ms: list[float]
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    def line(self, name: str) -> str:
        lat = sorted(self.latencies_ms)
        p50 = lat[len(lat) // 2] if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
        errors = sum(self.errors.values())
        text = (
            f"{name:<14} {self.calls / self.seconds:>7.0f} ops/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms"
            f"   calls {self.calls}   errors {errors}"
        )
        if errors:
            text += " (" + ", ".join(f"{code} {count}" for code, count in self.errors.most_common()) + ")"
        if self.calls and self.cpu_seconds:
            per_call = "  ".join(
                f"{role} {seconds * 1000 / self.calls:.3f}" for role, seconds in self.cpu_seconds.items()
            )
            cores = "  ".join(
                f"{role} {seconds / self.seconds:.2f}" for role, seconds in self.cpu_seconds.items()
            )
            text += f"\n{'':<14} CPU ms/call: {per_call}   cores: {cores}"
        return text


async def drive(callers: int, seconds: float, call: Call, meter: CpuMeter | None = None) -> Result:
    """`callers` concurrent loops calling `call(n)` for `seconds`, after a warm-up left out."""
    await _run_callers(callers, WARM_UP_SECONDS, call, [], collections.Counter())
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    before = await meter.sample() if meter else None
    began = time.perf_counter()
    await _run_callers(callers, seconds, call, latencies, errors)
    elapsed = time.perf_counter() - began
    result = Result(len(latencies), elapsed, latencies, errors)
    if meter and before:
        result.cpu_seconds = meter.used(before, await meter.sample())
    return result


async def _run_callers(
    callers: int, seconds: float, call: Call, latencies: list[float], errors: collections.Counter[str]
) -> None:
    clock = time.perf_counter
    stop_at = clock() + seconds

    async def caller(index: int) -> None:
        n = index
        while clock() < stop_at:
            started = clock()
            try:
                await call(n)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
            latencies.append((clock() - started) * 1000)
            n += callers

    await asyncio.gather(*(caller(i) for i in range(callers)))


def grpc_frame(message: Message) -> bytes:
    """A gRPC length-prefixed message: no compression flag, 4-byte big-endian length."""
    body = message.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


async def h2load_unary(
    port: int,
    path: str,
    request: Message,
    metadata: dict[str, str],
    concurrency: int,
    seconds: float,
    meter: CpuMeter,
    metrics_ports: Sequence[int],
) -> Result:
    """The same unary call driven by h2load (nghttp2's C load generator) instead of Python.

    Shows what the server does when the client costs next to nothing. h2load knows HTTP/2,
    not gRPC: the gRPC status is in the trailers it does not read, so success is counted
    from the server's own `grpc_server_handled_total` instead (calls that did not end OK
    are reported as errors). Latency percentiles come from h2load's per-request log.
    """
    if shutil.which("h2load") is None:
        raise SystemExit("h2load is not installed (Debian: apt-get install nghttp2-client)")
    with tempfile.TemporaryDirectory() as scratch:
        payload = Path(scratch, "request.bin")
        log = Path(scratch, "requests.log")
        await asyncio.to_thread(payload.write_bytes, grpc_frame(request))
        clients = max(1, concurrency // 16)
        command = [
            "h2load",
            f"--clients={clients}",
            f"--max-concurrent-streams={concurrency // clients}",
            f"--duration={seconds:.0f}",
            f"--warm-up-time={WARM_UP_SECONDS:.0f}",
            f"--data={payload}",
            f"--log-file={log}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            *(f"--header={key}: {value}" for key, value in metadata.items()),
            f"http://127.0.0.1:{port}{path}",
        ]
        method = path.rsplit("/", 1)[1]
        handled_before = handled_calls(metrics_ports, method)
        before = await meter.sample()
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await process.communicate()
        elapsed = time.perf_counter() - started - WARM_UP_SECONDS
        after = await meter.sample()
        if process.returncode != 0:
            raise SystemExit(f"h2load failed:\n{output.decode()}")
        handled = handled_calls(metrics_ports, method) - handled_before
        records = (await asyncio.to_thread(log.read_text)).splitlines()
        latencies = [int(line.split("\t")[2]) / 1000 for line in records if line]
    not_ok = collections.Counter({code: count for code, count in handled.items() if code != "OK"})
    result = Result(len(latencies), elapsed, latencies, not_ok)
    used = CpuMeter.used(before, after)
    used.pop("client", None)  # this process only waits; h2load's own CPU is not measured
    result.cpu_seconds = used
    return result


def handled_calls(metrics_ports: Sequence[int], method: str) -> collections.Counter[str]:
    """`grpc_server_handled_total` of one method by code, summed over the server processes."""
    counts: collections.Counter[str] = collections.Counter()
    for metrics_port in metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
            for family in text_string_to_metric_families(reply.read().decode()):
                for sample in family.samples:
                    if sample.name == "grpc_server_handled_total" and sample.labels["grpc_method"] == method:
                        counts[sample.labels["grpc_code"]] += int(sample.value)
    return counts


async def wait_serving(channel: grpc.aio.Channel, process: asyncio.subprocess.Process) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for _ in range(120):
        if process.returncode is not None:
            raise SystemExit("the server process exited during start-up")
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.25)
    raise SystemExit("the server did not become healthy")


def open_channels(port: int, count: int) -> list[grpc.aio.Channel]:
    # A distinct option per channel keeps gRPC from sharing one subchannel (one TCP connection).
    return [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.channel_id", index)])
        for index in range(count)
    ]


def header(args: argparse.Namespace, what: str) -> str:
    return (
        f"{what}: {args.callers} concurrent callers over {args.channels} channel(s), "
        f"{args.seconds:g} s per phase after {WARM_UP_SECONDS:g} s warm-up, {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}, one client process"
    )


async def ceiling(args: argparse.Namespace) -> None:
    port = free_port()
    server = await asyncio.create_subprocess_exec(sys.executable, "-c", BARE_HEALTH_SERVER, str(port))
    channels = open_channels(port, args.channels)
    try:
        await wait_serving(channels[0], server)
        stubs = [health_pb2_grpc.HealthStub(channel) for channel in channels]
        request = health_pb2.HealthCheckRequest()

        async def check(n: int) -> object:
            return await stubs[n % len(stubs)].Check(request, timeout=CALL_TIMEOUT_SECONDS)

        result = await drive(args.callers, args.seconds, check, CpuMeter([server.pid], None))
        print(header(args, "ceiling, bare grpc.aio health server"))
        print(result.line("Health.Check"))
    finally:
        for channel in channels:
            await channel.close()
        server.terminate()
        await server.wait()


def serving_metrics(metrics_port: int) -> bool:
    """Whether the catalog behind this metrics port serves: it records its build info once serving."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1) as response:
            return b"tally_build_info{" in response.read()
    except OSError:
        return False


async def start_catalog(env: dict[str, str], metrics_port: int) -> asyncio.subprocess.Process:
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tally_catalog",
        env={**env, "CATALOG_METRICS_PORT": str(metrics_port)},
        stdout=asyncio.subprocess.DEVNULL,
    )
    for _ in range(120):
        if server.returncode is not None:
            raise SystemExit("a catalog process exited during start-up")
        if await asyncio.to_thread(serving_metrics, metrics_port):
            return server
        await asyncio.sleep(0.25)
    raise SystemExit("a catalog process did not start serving")


async def catalog(args: argparse.Namespace) -> None:
    prefix = unique_prefix()
    port = free_port()
    env = {
        **os.environ,
        "CATALOG_DB_PREFIX": prefix,
        "CATALOG_GRPC_PORT": str(port),
        "CATALOG_EVENTS_EXCHANGE": f"{prefix}bench.events",
        "CATALOG_LOG_LEVEL": args.log_level,
    }
    settings = CatalogSettings(db_prefix=prefix)
    # Several processes share the port through SO_REUSEPORT (on by default in gRPC); the kernel
    # spreads connections, not calls, across them, so use at least as many channels.
    servers: list[asyncio.subprocess.Process] = []
    metrics_ports = [free_port() for _ in range(args.servers)]
    for metrics_port in metrics_ports:
        servers.append(await start_catalog(env, metrics_port))
    channels = open_channels(port, args.channels)
    observer = await asyncpg.connect(
        host=settings.pg_host,
        port=settings.pg_port,
        user=settings.pg_user,
        password=settings.pg_password.get_secret_value() or None,
        database="postgres",
    )

    async def backend_pids() -> list[int]:
        rows = await observer.fetch(
            "SELECT pid FROM pg_stat_activity WHERE starts_with(datname, $1) AND pid <> pg_backend_pid()",
            prefix,
        )
        return [row["pid"] for row in rows]

    try:
        for channel in channels:
            await wait_serving(channel, servers[0])
        stubs = [rpc.CatalogServiceStub(channel) for channel in channels]
        stub = stubs[0]
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
        app = (("authorization", f"Bearer {issue_dev_token(settings, role='app', merchant_id=merchant)}"),)
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

        get_requests = [pb.GetProductRequest(merchant_id=merchant, product_id=pid) for pid in product_ids]
        list_request = pb.ListProductsRequest(merchant_id=merchant, page_size=20)

        async def get_product(n: int) -> object:
            return await stubs[n % len(stubs)].GetProduct(
                get_requests[n % len(get_requests)], metadata=app, timeout=CALL_TIMEOUT_SECONDS
            )

        async def list_products(n: int) -> object:
            return await stubs[n % len(stubs)].ListProducts(
                list_request, metadata=app, timeout=CALL_TIMEOUT_SECONDS
            )

        health_stubs = [health_pb2_grpc.HealthStub(channel) for channel in channels]
        health_request = health_pb2.HealthCheckRequest()

        async def health_check(n: int) -> object:
            return await health_stubs[n % len(health_stubs)].Check(
                health_request, timeout=CALL_TIMEOUT_SECONDS
            )

        meter = CpuMeter([server.pid for server in servers], backend_pids)
        results = []
        if "h2load" in args.phases:
            results.append(
                (
                    "GetProduct/h2",
                    await h2load_unary(
                        port,
                        "/tally.catalog.v1.CatalogService/GetProduct",
                        get_requests[0],
                        dict(app),
                        args.callers,
                        args.seconds,
                        meter,
                        metrics_ports,
                    ),
                )
            )
        if "health" in args.phases:
            results.append(("Health.Check", await drive(args.callers, args.seconds, health_check, meter)))
        if "get" in args.phases:
            results.append(("GetProduct", await drive(args.callers, args.seconds, get_product, meter)))
        if "list" in args.phases:
            results.append(("ListProducts", await drive(args.callers, args.seconds, list_products, meter)))

        print(
            header(args, f"catalog benchmark, {args.servers} server process(es), log level {args.log_level}")
        )
        for name, result in results:
            print(result.line(name))
        print(
            f"provision      {args.merchants} new merchants: CreateMerchant median "
            f"{statistics.median(provision_ms):.0f} ms, max {max(provision_ms):.0f} ms"
        )
    finally:
        for channel in channels:
            await channel.close()
        await observer.close()
        for server in servers:
            server.terminate()
        for server in servers:
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
    parser.add_argument("--channels", type=int, default=1, help="client channels the callers share")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--servers", type=int, default=1, help="catalog processes sharing the port")
    parser.add_argument("--merchants", type=int, default=10)
    parser.add_argument("--products", type=int, default=50)
    parser.add_argument(
        "--phases",
        default="get,list",
        help="comma-separated: get, list, health (the catalog's own health check: gRPC and the kit's "
        "interceptor, no token, no database), h2load (GetProduct driven by nghttp2's C load generator)",
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--ceiling", action="store_true", help="drive a bare grpc.aio health server instead of the catalog"
    )
    arguments = parser.parse_args()
    arguments.phases = set(arguments.phases.split(","))
    asyncio.run(ceiling(arguments) if arguments.ceiling else catalog(arguments))
