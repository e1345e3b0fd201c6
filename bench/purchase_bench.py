"""Purchase benchmark: credits bought through the payment gateway, followed until the ledger
has issued the lot and the receipt service the receipt.

Starts the catalog, the ledger, the receipt service, the PSP simulator (no added latency) and
the payment gateway as processes of their own, on a fresh database prefix and a fresh events
exchange with consumer queues of this run only (everything is dropped at the end), creates
`--merchants` merchants with a sellable product each, then runs the phases asked for:

- `closed`: `--callers` concurrent callers, each a loop of one purchase at a time: a
  `Purchase` (authorize and capture at the simulator) for a new order, then a wait until the
  ledger's `ledger.lot_issued` and the receipt service's `receipt.receipt_issued` for that
  order have both been published. Purchases/s counts purchases whose lot and receipt exist;
  latency runs from the `Purchase` call to the later of the two events (an event is published
  after its transaction commits, so the lot and the receipt exist by then: an upper bound).
  Also printed: p50/p99 of the `Purchase` call alone and of the call to the lot.
- `rate`: purchases started at a fixed arrival rate (`--rate`) whatever the answers do,
  latency from each purchase's scheduled start (no coordinated omission).

After the phases every purchase is checked where it lives: one captured payment, one purchase
lot and one receipt per order, the receipts of each merchant numbered 1..n with no gap.

    .venv/bin/python bench/purchase_bench.py                    # closed loop, 64 callers
    .venv/bin/python bench/purchase_bench.py --phases closed,rate --rate 150 --seconds 30
    .venv/bin/python bench/purchase_bench.py --merchants 4      # receipt series of 4 merchants

Targets on a 2-core machine, load generator included: >= 300 purchases/s with 64 callers,
p99 < 500 ms. Each service's CPU per purchase is printed, to show where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import uuid
from dataclasses import dataclass, field

import aio_pika
import asyncpg
import grpc
import httpx
from catalog_bench import WARM_UP_SECONDS, free_port, open_channels
from ledger_bench import (
    Meter,
    Refused,
    Result,
    closed_loop,
    delete_broker_objects,
    fixed_rate,
    load_average,
    merchant_config,
    progress,
    rabbitmq_pid,
    start_server,
)
from tally.catalog.v1 import catalog_service_pb2 as catalog_api
from tally.catalog.v1 import catalog_service_pb2_grpc as catalog_rpc
from tally.catalog.v1 import resources_pb2 as catalog_res
from tally.common.v1.event_pb2 import EventEnvelope
from tally.common.v1.money_pb2 import Credits, Money
from tally.ledger.v1 import events_pb2 as ledger_events
from tally.payment_gateway.v1 import payment_gateway_service_pb2 as api
from tally.payment_gateway.v1 import payment_gateway_service_pb2_grpc as rpc
from tally.receipt.v1 import events_pb2 as receipt_events
from tally_kit.auth import issue_dev_token
from tally_kit.db.directory import merchant_database_name
from tally_kit.settings import ServiceSettings
from tally_kit.testing import drop_databases, unique_prefix
from tally_ledger.settings import LedgerSettings
from tally_payment_gateway.settings import PaymentGatewaySettings
from tally_receipt.settings import ReceiptSettings

LOT_ISSUED = "ledger.lot_issued"
RECEIPT_ISSUED = "receipt.receipt_issued"
PRICE = Money(amount_minor=1490, currency="EUR")
# The simulator approves a one-time token spelled so (services/payment_gateway/psp_simulator);
# its random part is a UUID, which the gateway's card-number search never mistakes for a card.
TOKEN_DESCRIPTOR = "COMMON.ACCEPT.INAPP.PAYMENT"
# From the `Purchase` call to both events; a purchase not done by then counts as an error.
COMPLETION_TIMEOUT_SECONDS = 30.0
CALL_TIMEOUT_SECONDS = 10.0


@dataclass
class Pending:
    """One purchase in flight: when its lot and its receipt were seen, once they are."""

    lot: asyncio.Future[float]
    receipt: asyncio.Future[float]


@dataclass
class Bench:
    args: argparse.Namespace
    stubs: list[rpc.PaymentGatewayServiceStub]
    # Merchant id -> (its app token metadata, its product id).
    merchants: list[tuple[str, tuple[tuple[str, str], ...], str]]
    pending: dict[str, Pending] = field(default_factory=dict)
    orders: dict[str, list[str]] = field(default_factory=dict)
    unmatched_events: int = 0
    refusals_told: set[str] = field(default_factory=set)

    def watch(self, order_id: str) -> Pending:
        loop = asyncio.get_running_loop()
        pending = Pending(loop.create_future(), loop.create_future())
        self.pending[order_id] = pending
        return pending

    def seen(self, routing_key: str, envelope: EventEnvelope) -> None:
        at = time.perf_counter()
        if routing_key == LOT_ISSUED:
            lot_issued = ledger_events.LotIssued()
            envelope.payload.Unpack(lot_issued)
            order_id, which = lot_issued.lot.order_id, "lot"
        else:
            receipt_issued = receipt_events.ReceiptIssued()
            envelope.payload.Unpack(receipt_issued)
            order_id, which = receipt_issued.receipt.order_id, "receipt"
        pending = self.pending.get(order_id)
        if pending is None:
            self.unmatched_events += 1
            return
        future = pending.lot if which == "lot" else pending.receipt
        if not future.done():
            future.set_result(at)

    async def purchase(self, number: int, parts: dict[str, list[float]]) -> None:
        """One purchase by user `number` of a merchant picked by it, followed to its receipt."""
        clock = time.perf_counter
        merchant_id, app, product_id = self.merchants[number % len(self.merchants)]
        order_id = f"order-{uuid.uuid4()}"
        pending = self.watch(order_id)
        started = clock()
        try:
            await self.stubs[number % len(self.stubs)].Purchase(
                api.PurchaseRequest(
                    merchant_id=merchant_id,
                    request_id=str(uuid.uuid4()),
                    user_id=f"user-{number:06d}",
                    order_id=order_id,
                    product_id=product_id,
                    amount=PRICE,
                    payment_source=api.PaymentSource(
                        one_time_token=api.OneTimeToken(
                            descriptor=TOKEN_DESCRIPTOR, value=f"sim-approve-{uuid.uuid4()}"
                        )
                    ),
                    description="Bench pack",
                ),
                metadata=app,
                timeout=CALL_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as error:
            del self.pending[order_id]
            refusal = f"Purchase {error.code().name}"
            if refusal not in self.refusals_told:
                self.refusals_told.add(refusal)
                progress(f"first {refusal}: {error.details()}")
            raise Refused(refusal) from None
        answered = clock()
        self.orders.setdefault(merchant_id, []).append(order_id)
        try:
            lot_at, receipt_at = await asyncio.wait_for(
                asyncio.gather(pending.lot, pending.receipt),
                COMPLETION_TIMEOUT_SECONDS - (answered - started),
            )
        except TimeoutError:
            raise Refused("NO_RECEIPT_IN_TIME") from None
        finally:
            del self.pending[order_id]
        parts.setdefault("Purchase call", []).append((answered - started) * 1000)
        parts.setdefault("call to lot issued", []).append((lot_at - started) * 1000)
        parts.setdefault("call to receipt issued", []).append((receipt_at - started) * 1000)


async def listen(bench: Bench, settings: ServiceSettings, exchange: str) -> aio_pika.abc.AbstractConnection:
    """A queue of this process on the run's exchange, bound to the lot and receipt events."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=512)
    # Declared by the services (with their alternate exchange) before they take calls.
    declared = await channel.get_exchange(exchange)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    for key in (LOT_ISSUED, RECEIPT_ISSUED):
        await queue.bind(declared, routing_key=key)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        envelope = EventEnvelope()
        envelope.ParseFromString(message.body)
        bench.seen(message.routing_key or "", envelope)

    await queue.consume(on_message, no_ack=True)
    return connection


async def set_up_merchant(
    channel: grpc.aio.Channel, settings: ServiceSettings, merchant_id: str
) -> tuple[str, tuple[tuple[str, str], ...], str]:
    stub = catalog_rpc.CatalogServiceStub(channel)
    platform = (("authorization", f"Bearer {issue_dev_token(settings, role='platform', merchant_id=None)}"),)
    admin = (("authorization", f"Bearer {issue_dev_token(settings, role='admin', merchant_id=merchant_id)}"),)
    config = merchant_config()
    config.receipt_series_prefix = merchant_id.upper().replace("-", "")[-8:]
    await stub.CreateMerchant(
        catalog_api.CreateMerchantRequest(
            merchant_id=merchant_id, request_id=str(uuid.uuid4()), config=config
        ),
        metadata=platform,
        timeout=CALL_TIMEOUT_SECONDS,
    )
    created = await stub.CreateProduct(
        catalog_api.CreateProductRequest(
            merchant_id=merchant_id,
            request_id=str(uuid.uuid4()),
            product=catalog_res.Product(
                name="Bench pack",
                credits=Credits(value="100"),
                distribution=catalog_res.PRODUCT_DISTRIBUTION_SELLABLE,
            ),
        ),
        metadata=admin,
        timeout=CALL_TIMEOUT_SECONDS,
    )
    app = (("authorization", f"Bearer {issue_dev_token(settings, role='app', merchant_id=merchant_id)}"),)
    return merchant_id, app, created.product.product_id


async def start_simulator(port: int) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "psp_simulator", "--port", str(port), stdout=asyncio.subprocess.DEVNULL
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=1.0) as client:
        for _ in range(120):
            if process.returncode is not None:
                raise SystemExit("the PSP simulator exited during start-up")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/_simulator/transactions")).status_code == 200:
                    return process
            await asyncio.sleep(0.25)
    raise SystemExit("the PSP simulator did not start")


# What the stack holds for the run's orders, merchant by merchant.
_CAPTURED = "SELECT count(*) FROM payments WHERE order_id = ANY($1::text[]) AND state = 'captured'"
_LOTS = "SELECT count(*) FROM lots WHERE order_id = ANY($1::text[]) AND source = 'purchase'"
_RECEIPTS = """
SELECT count(*) AS receipts, count(DISTINCT order_id) AS orders, min(sequence) AS first,
       max(sequence) AS last, count(DISTINCT sequence) AS numbers
  FROM receipts
"""


async def fetch_row(
    connect: dict[str, object], settings: ServiceSettings, merchant_id: str, query: str, *args: object
) -> asyncpg.Record:
    database = merchant_database_name(settings, merchant_id)
    connection = await asyncpg.connect(**connect, database=database)  # type: ignore[arg-type]
    try:
        row = await connection.fetchrow(query, *args)
    finally:
        await connection.close()
    assert row is not None, query
    return row


async def check_books(connect: dict[str, object], prefix: str, bench: Bench) -> list[str]:
    """Every answered purchase is one captured payment, one purchase lot and one receipt; each
    merchant's receipts run 1..n without a gap."""
    problems = []
    payments, ledger, receipts = (
        PaymentGatewaySettings(db_prefix=prefix),
        LedgerSettings(db_prefix=prefix),
        ReceiptSettings(db_prefix=prefix),
    )
    for merchant_id, orders in bench.orders.items():
        captured = (await fetch_row(connect, payments, merchant_id, _CAPTURED, orders))[0]
        lots = (await fetch_row(connect, ledger, merchant_id, _LOTS, orders))[0]
        row = await fetch_row(connect, receipts, merchant_id, _RECEIPTS)
        expected = len(orders)
        if captured != expected or lots != expected:
            problems.append(
                f"{merchant_id}: {expected} purchases answered, {captured} captured payments, "
                f"{lots} purchase lots"
            )
        if row["receipts"] != row["orders"] or row["numbers"] != row["receipts"] or row["first"] != 1:
            problems.append(f"{merchant_id}: receipts {dict(row)}")
        elif row["last"] != row["receipts"]:
            problems.append(f"{merchant_id}: receipt numbers have a gap: {dict(row)}")
        elif row["receipts"] < expected:
            problems.append(f"{merchant_id}: {row['receipts']} receipts for {expected} purchases")
    return problems


async def main(args: argparse.Namespace) -> None:
    load_at_start = load_average()
    prefix = unique_prefix()
    settings = PaymentGatewaySettings(db_prefix=prefix)
    exchange = f"{prefix}tally.events"
    ports = {name: free_port() for name in ("catalog", "ledger", "receipt", "payment_gateway", "simulator")}
    consumers = {name: f"{prefix}{name}" for name in ("ledger", "receipt", "payment_gateway")}

    def service_env(name: str, **extra: str) -> dict[str, str]:
        env_prefix = f"{name.upper()}_"
        return {
            **os.environ,
            f"{env_prefix}DB_PREFIX": prefix,
            f"{env_prefix}GRPC_PORT": str(ports[name]),
            f"{env_prefix}METRICS_PORT": str(free_port()),
            f"{env_prefix}EVENTS_EXCHANGE": exchange,
            f"{env_prefix}LOG_LEVEL": args.log_level,
            **{f"{env_prefix}{key}": value for key, value in extra.items()},
        }

    catalog_target = f"127.0.0.1:{ports['catalog']}"
    environments = {
        "catalog": service_env("catalog"),
        "ledger": service_env("ledger", CONSUMER_NAME=consumers["ledger"], CATALOG_TARGET=catalog_target),
        "receipt": service_env("receipt", CONSUMER_NAME=consumers["receipt"], CATALOG_TARGET=catalog_target),
        "payment_gateway": service_env(
            "payment_gateway", AUTHORIZE_NET_URL=f"http://127.0.0.1:{ports['simulator']}"
        ),
    }
    connect: dict[str, object] = {
        "host": settings.pg_host,
        "port": settings.pg_port,
        "user": settings.pg_user,
        "password": settings.pg_password.get_secret_value() or None,
    }
    observer = await asyncpg.connect(**connect, database="postgres")  # type: ignore[arg-type]

    async def backends() -> list[int]:
        rows = await observer.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname LIKE $1 AND pid <> pg_backend_pid()", f"{prefix}%"
        )
        return [row["pid"] for row in rows]

    processes: dict[str, asyncio.subprocess.Process] = {}
    channels: list[grpc.aio.Channel] = []
    listener: aio_pika.abc.AbstractConnection | None = None
    results: list[tuple[str, Result]] = []
    notes: list[str] = []
    try:
        processes["simulator"] = await start_simulator(ports["simulator"])
        for name in ("catalog", "ledger", "receipt", "payment_gateway"):
            processes[name] = await start_server(f"tally_{name}", environments[name], ports[name])
        progress(
            "stack started: " + ", ".join(f"{name} pid {process.pid}" for name, process in processes.items())
        )
        async with grpc.aio.insecure_channel(catalog_target) as catalog_channel:
            merchants = [
                await set_up_merchant(catalog_channel, settings, f"bench-{prefix.rstrip('_')}-{n}")
                for n in range(args.merchants)
            ]
        channels = open_channels(ports["payment_gateway"], args.channels)
        bench = Bench(args, [rpc.PaymentGatewayServiceStub(channel) for channel in channels], merchants)
        listener = await listen(bench, settings, exchange)
        progress(f"{args.merchants} merchant(s) with a product")
        roles = {name: process.pid for name, process in processes.items()}
        broker = rabbitmq_pid()
        if broker is not None:
            roles["rabbitmq"] = broker
        meter = Meter(roles, backends)
        users = args.callers * 64
        if "closed" in args.phases:
            progress("phase closed")
            result = await closed_loop(args.callers, args.seconds, users, bench.purchase, meter)
            result.unit = "purchases"
            results.append((f"purchases, {args.callers} callers", result))
        if "rate" in args.phases:
            progress("phase rate")
            result = await fixed_rate(args.rate, args.seconds, users, bench.purchase, meter)
            result.unit = "purchases"
            results.append((f"purchases at {args.rate:g}/s", result))
        progress("checking every purchase's payment, lot and receipt")
        notes.extend(await check_books(connect, prefix, bench))
        if not any(note.startswith("bench-") for note in notes):
            total = sum(len(orders) for orders in bench.orders.values())
            notes.append(
                f"books checked: {total} purchases, each one captured payment, one purchase lot and one "
                "receipt; receipts numbered 1..n per merchant with no gap"
            )
        if bench.unmatched_events:
            notes.append(f"{bench.unmatched_events} events for orders no longer awaited (after a timeout)")
    finally:
        for channel in channels:
            await channel.close()
        if listener is not None:
            await listener.close()
        for process in reversed(list(processes.values())):
            if process.returncode is None:
                process.terminate()
        for process in processes.values():
            await process.wait()
        synchronous_commit = await observer.fetchval("SHOW synchronous_commit")
        await observer.close()
        await drop_databases(settings, prefix)
        first, *others = consumers.values()
        await delete_broker_objects(settings, [exchange], first)
        for consumer in others:
            await delete_broker_objects(settings, [], consumer)
    print(
        f"purchase benchmark: {args.callers} callers over {args.channels} channel(s), {args.merchants} "
        f"merchant(s), {args.seconds:g} s per phase after {WARM_UP_SECONDS:g} s warm-up, "
        f"{os.cpu_count()} CPUs, "
        f"synchronous_commit {synchronous_commit}, log level {args.log_level}, "
        f"load average at the start {load_at_start}, at the end {load_average()}"
    )
    for name, result in results:
        print(result.line(name))
    for note in notes:
        print(note)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--callers", type=int, default=64, help="concurrent purchases in the closed loop")
    parser.add_argument("--channels", type=int, default=2, help="gRPC channels the callers share")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--merchants", type=int, default=1, help="merchants the purchases are shared among")
    parser.add_argument("--rate", type=float, default=150.0, help="purchases/s of the rate phase")
    parser.add_argument("--phases", default="closed", help="comma-separated: closed, rate")
    parser.add_argument("--log-level", default="INFO", help="the services' log level (INFO: access logs on)")
    arguments = parser.parse_args()
    arguments.phases = set(arguments.phases.split(","))
    asyncio.run(main(arguments))
