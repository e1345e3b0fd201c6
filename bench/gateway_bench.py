"""Gateway benchmark: GetBalance through the HTTP gateway and the same call direct over gRPC.

Starts `python -m tally_catalog`, `python -m tally_ledger` and `python -m tally_gateway` as
processes of their own (fresh database prefix and exchanges, so nothing else is touched),
sets up a merchant and a user with credits through the gateway, then drives

- `GET /v1/merchants/{m}/users/{u}/balance` through the gateway over `--connections`
  keep-alive HTTP/1.1 connections, one request in flight on each;
- `LedgerService/GetBalance` direct on the ledger with as many concurrent callers over
  `--channels` gRPC channels;

and prints requests/s, p50 and p99 of each, their ratios, and the CPU each process spent
per call (the gateway, the ledger, the ledger's PostgreSQL backends, this client):

    .venv/bin/python bench/gateway_bench.py                  # 64 connections, 10 s per phase
    .venv/bin/python bench/gateway_bench.py --connections 64 --seconds 20

Target on a 2-core machine (client, gateway, ledger and PostgreSQL all on it): >= 2,000
requests/s through the gateway. The gateway runs as deployed: token verification, both
rate limits (set high enough not to refuse: one client address and one token send
everything), the access log (written to /dev/null) and metrics. Each phase is preceded by an
unmeasured warm-up. The HTTP client is a minimal one on asyncio streams that reuses its
request bytes, so that the client's own cost stays small next to what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import asyncpg
import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tally.ledger.v1 import ledger_service_pb2 as ledger_api
from tally.ledger.v1 import ledger_service_pb2_grpc as ledger_rpc
from tally_kit.auth import issue_dev_token
from tally_kit.events.topology import unrouted_exchange_name, unrouted_queue_name
from tally_kit.settings import ServiceSettings
from tally_kit.testing import drop_databases, unique_prefix

ROOT = Path(__file__).resolve().parent.parent
WARM_UP_SECONDS = 2.0
CALL_TIMEOUT_SECONDS = 5.0
CATALOG = "tally.catalog.v1.CatalogService"
LEDGER = "tally.ledger.v1.LedgerService"
MERCHANT = "bench-gw"
USER = "bench-user"

Call = Callable[[int], Awaitable[None]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    """CPU seconds used by named server processes, PostgreSQL backends and this client."""

    def __init__(
        self, processes: dict[str, int], backend_pids: Callable[[], Awaitable[Sequence[int]]]
    ) -> None:
        self._processes = processes
        self._backend_pids = backend_pids

    async def sample(self) -> dict[str, dict[int, float]]:
        samples: dict[str, dict[int, float]] = {"client": {0: time.process_time()}}
        for role, pid in self._processes.items():
            seconds = process_cpu_seconds(pid)
            samples[role] = {pid: seconds} if seconds is not None else {}
        samples["postgres"] = {}
        for pid in await self._backend_pids():
            seconds = process_cpu_seconds(pid)
            if seconds is not None:
                samples["postgres"][pid] = seconds
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

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else float("nan")

    def line(self, name: str) -> str:
        errors = sum(self.errors.values())
        text = (
            f"{name:<18} {self.rate:>7.0f} req/s   p50 {self.percentile(0.5):6.2f} ms   "
            f"p99 {self.percentile(0.99):6.2f} ms   calls {self.calls}   errors {errors}"
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
            text += f"\n{'':<18} CPU ms/call: {per_call}\n{'':<18} cores busy:  {cores}"
        return text


class CallFailed(Exception):
    """A call answered with something else than success; its text is the error's name."""


async def drive(callers: int, seconds: float, calls: Sequence[Call], meter: CpuMeter) -> Result:
    """One loop per entry of `calls`, each calling for `seconds`, after a warm-up left out."""
    await _run(WARM_UP_SECONDS, calls, [], collections.Counter())
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    before = await meter.sample()
    began = time.perf_counter()
    await _run(seconds, calls, latencies, errors)
    elapsed = time.perf_counter() - began
    result = Result(len(latencies), elapsed, latencies, errors)
    result.cpu_seconds = meter.used(before, await meter.sample())
    return result


async def _run(
    seconds: float, calls: Sequence[Call], latencies: list[float], errors: collections.Counter[str]
) -> None:
    clock = time.perf_counter
    stop_at = clock() + seconds

    async def loop(call: Call, index: int) -> None:
        n = index
        while clock() < stop_at:
            started = clock()
            try:
                await call(n)
            except CallFailed as error:
                errors[str(error)] += 1
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
            latencies.append((clock() - started) * 1000)
            n += len(calls)

    await asyncio.gather(*(loop(call, index) for index, call in enumerate(calls)))


class HttpConnection:
    """One keep-alive HTTP/1.1 connection sending the same request again and again."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        self._reader = reader
        self._writer = writer
        self._request = request

    @classmethod
    async def open(cls, port: int, request: bytes) -> HttpConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, request)

    async def send(self) -> tuple[int, bytes]:
        self._writer.write(self._request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self._reader.readexactly(length)

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


async def start(module: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, env=env, stdout=asyncio.subprocess.DEVNULL
    )


async def wait_grpc_serving(port: int, process: asyncio.subprocess.Process) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(120):
            if process.returncode is not None:
                raise SystemExit(f"a server process exited during start-up (port {port})")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.25)
    raise SystemExit(f"the server on port {port} did not become healthy")


async def wait_ready(client: httpx.AsyncClient, process: asyncio.subprocess.Process) -> None:
    for _ in range(120):
        if process.returncode is not None:
            raise SystemExit("the gateway exited during start-up")
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.25)
    raise SystemExit("the gateway did not become ready")


async def set_up(client: httpx.AsyncClient, settings: ServiceSettings) -> None:
    """A merchant with a sellable product, and a user who bought it, through the gateway."""

    def bearer(role: str, merchant_id: str | None) -> dict[str, str]:
        return {
            "authorization": f"Bearer {issue_dev_token(settings, role=role, merchant_id=merchant_id)}",
            "idempotency-key": str(uuid.uuid4()),
        }

    async def post(path: str, role: str, body: object, merchant_id: str | None = MERCHANT) -> dict:
        answer = await client.post(path, json=body, headers=bearer(role, merchant_id))
        if answer.status_code != 200:
            raise SystemExit(f"set-up failed: POST {path} answered {answer.status_code}: {answer.text}")
        return answer.json()

    config = {
        "legalName": "Bench Merchant SAS",
        "taxId": "FR00123456789",
        "address": {"addressLines": ["1 rue de la Paix"], "locality": "Paris", "regionCode": "FR"},
        "receiptSeriesPrefix": "BENCH",
        "taxRegime": {"ratePercent": "20", "pricesIncludeTax": True},
        "operationTimeout": "900s",
        "retentionDays": 3650,
        "defaultCurrency": "EUR",
    }
    await post("/v1/merchants", "platform", {"merchantId": MERCHANT, "config": config}, merchant_id=None)
    base = f"/v1/merchants/{MERCHANT}"
    product = await post(
        f"{base}/products",
        "admin",
        {"name": "Bench pack", "credits": {"value": "100"}, "distribution": "PRODUCT_DISTRIBUTION_SELLABLE"},
    )
    await post(f"{base}/users/{USER}:register", "app", {})
    await post(
        f"{base}/orders/bench-order:settle",
        "app",
        {
            "userId": USER,
            "productId": product["product"]["productId"],
            "amountPaid": {"amountMinor": "990", "currency": "EUR"},
            "providerReference": "bench-psp",
        },
    )


async def delete_exchanges(settings: ServiceSettings, names: Sequence[str]) -> None:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.exchange_delete(name)
            await channel.exchange_delete(unrouted_exchange_name(name))
            await channel.queue_delete(unrouted_queue_name(name))


async def main(args: argparse.Namespace) -> None:
    prefix = unique_prefix()
    settings = ServiceSettings(db_prefix=prefix)
    catalog_port, ledger_port, http_port = free_port(), free_port(), free_port()
    exchanges = [f"{prefix}bench.catalog", f"{prefix}bench.ledger"]
    common = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "services" / "gateway"), os.environ.get("PYTHONPATH")])
        ),
    }
    catalog_env = {
        **common,
        "CATALOG_DB_PREFIX": prefix,
        "CATALOG_GRPC_PORT": str(catalog_port),
        "CATALOG_METRICS_PORT": str(free_port()),
        "CATALOG_EVENTS_EXCHANGE": exchanges[0],
    }
    ledger_env = {
        **common,
        "LEDGER_DB_PREFIX": prefix,
        "LEDGER_GRPC_PORT": str(ledger_port),
        "LEDGER_METRICS_PORT": str(free_port()),
        "LEDGER_EVENTS_EXCHANGE": exchanges[1],
        "LEDGER_CATALOG_TARGET": f"127.0.0.1:{catalog_port}",
        "LEDGER_LOG_LEVEL": args.log_level,
    }
    gateway_env = {
        **common,
        "GATEWAY_HTTP_HOST": "127.0.0.1",
        "GATEWAY_HTTP_PORT": str(http_port),
        "GATEWAY_UPSTREAMS": json.dumps(
            {CATALOG: f"127.0.0.1:{catalog_port}", LEDGER: f"127.0.0.1:{ledger_port}"}
        ),
        "GATEWAY_READINESS_SERVICES": json.dumps([CATALOG, LEDGER]),
        "GATEWAY_RATE_LIMIT_TOKEN_PER_SECOND": "1000000",
        "GATEWAY_RATE_LIMIT_TOKEN_BURST": "1000000",
        "GATEWAY_RATE_LIMIT_ADDRESS_PER_SECOND": "1000000",
        "GATEWAY_RATE_LIMIT_ADDRESS_BURST": "1000000",
        "GATEWAY_LOG_LEVEL": args.log_level,
    }
    processes: list[asyncio.subprocess.Process] = []
    connections: list[HttpConnection] = []
    channels: list[grpc.aio.Channel] = []
    observer = await asyncpg.connect(
        host=settings.pg_host,
        port=settings.pg_port,
        user=settings.pg_user,
        password=settings.pg_password.get_secret_value() or None,
        database="postgres",
    )

    async def ledger_backends() -> list[int]:
        rows = await observer.fetch(
            "SELECT pid FROM pg_stat_activity WHERE starts_with(datname, $1) AND pid <> pg_backend_pid()",
            f"{prefix}ledger",
        )
        return [row["pid"] for row in rows]

    try:
        catalog = await start("tally_catalog", catalog_env)
        processes.append(catalog)
        await wait_grpc_serving(catalog_port, catalog)
        ledger = await start("tally_ledger", ledger_env)
        processes.append(ledger)
        await wait_grpc_serving(ledger_port, ledger)
        gateway = await start("tally_gateway", gateway_env)
        processes.append(gateway)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
            await wait_ready(client, gateway)
            await set_up(client, settings)
        token = issue_dev_token(settings, role="app", merchant_id=MERCHANT)
        path = f"/v1/merchants/{MERCHANT}/users/{USER}/balance"
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{http_port}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: application/json\r\n\r\n"
        ).encode()
        connections = [await HttpConnection.open(http_port, request) for _ in range(args.connections)]
        status, body = await connections[0].send()
        if status != 200 or json.loads(body)["balance"]["balance"]["value"] != "100":
            raise SystemExit(f"unexpected balance answer {status}: {body!r}")

        def through_gateway(connection: HttpConnection) -> Call:
            async def call(_: int) -> None:
                status, _body = await connection.send()
                if status != 200:
                    raise CallFailed(f"HTTP {status}")

            return call

        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{ledger_port}", options=[("grpc.channel_id", index)])
            for index in range(args.channels)
        ]
        stubs = [ledger_rpc.LedgerServiceStub(channel) for channel in channels]
        direct_request = ledger_api.GetBalanceRequest(merchant_id=MERCHANT, user_id=USER)
        metadata = (("authorization", f"Bearer {token}"),)

        async def direct(n: int) -> None:
            await stubs[n % len(stubs)].GetBalance(
                direct_request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS
            )

        meter = CpuMeter({"gateway": gateway.pid, "ledger": ledger.pid}, ledger_backends)
        via_gateway = await drive(
            args.connections, args.seconds, [through_gateway(c) for c in connections], meter
        )
        via_grpc = await drive(args.connections, args.seconds, [direct] * args.connections, meter)
        load = " ".join(f"{value:.2f}" for value in os.getloadavg())
        print(
            f"gateway benchmark: GetBalance, {args.connections} concurrent connections (gRPC: "
            f"{args.connections} callers over {args.channels} channels), {args.seconds:g} s per phase after "
            f"{WARM_UP_SECONDS:g} s warm-up, {os.cpu_count()} CPUs, log level {args.log_level}, "
            f"load average at the end {load}"
        )
        print(via_gateway.line("HTTP via gateway"))
        print(via_grpc.line("gRPC direct"))
        print(
            f"{'ratio':<18} throughput gateway/direct {via_gateway.rate / via_grpc.rate:.2f}   "
            f"p99 gateway/direct {via_gateway.percentile(0.99) / via_grpc.percentile(0.99):.2f}"
        )
    finally:
        for connection in connections:
            await connection.close()
        for channel in channels:
            await channel.close()
        await observer.close()
        for process in reversed(processes):
            if process.returncode is None:
                process.terminate()
        for process in processes:
            await process.wait()
        await drop_databases(settings, prefix)
        await delete_exchanges(settings, exchanges)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--connections", type=int, default=64, help="concurrent HTTP connections (and gRPC callers)"
    )
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels for the direct phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--log-level", default="INFO", help="services' log level (INFO keeps access logs)")
    asyncio.run(main(parser.parse_args()))
