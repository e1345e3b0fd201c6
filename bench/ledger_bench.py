"""Ledger benchmark: two-phase operations and GetBalance over gRPC, the same SQL driven by
pgbench, and a soak that watches the ledger's memory.

Starts `python -m tally_catalog` and `python -m tally_ledger` as processes of their own (fresh
database prefix, exchanges and consumer queues, so nothing else is touched; everything is
dropped at the end), sets up a merchant, an operation type and `--users` users each holding
one never-expiring lot, then runs the phases asked for:

- `ops`: `--callers` concurrent users, each a loop of `OpenOperation` then
  `RecordAndCloseOperation` on its next user (callers never share a user, so none is refused
  for having another operation open). One operation is the two calls: operations/s, p50 and
  p99 of the whole operation and of each call, and the CPU each process spent per operation
  (ledger, its PostgreSQL backends, RabbitMQ, this client).
- `rate`: operations started at a fixed arrival rate (`--rate`, by default half the target of
  1,000/s) whatever the answers do; latency is counted from each operation's scheduled start,
  so a slow answer delays no measurement (no coordinated omission).
- `balance`: `GetBalance` of a user with 10 entries and of a user with 10,000, each at a fixed
  rate (`--balance-rate`), then closed loop by `--callers` callers for throughput. The 10
  entries are written through the API (a grant and 9 operations); the 10,000 are a grant
  through the API and 9,999 closed operations with their debits written in SQL, rows of the
  same shape the ledger writes (its triggers keep the balances as for any entry).
- `h2load`: `GetBalance` of the 10-entry user driven by h2load (nghttp2's C load generator,
  `apt-get install nghttp2-client`), to see the server without the Python client's cost.
- `pgbench`: `bench/ledger_pgbench.sql`, the statements the ledger sends for one operation
  (both transactions, statement for statement), driven by pgbench on the same merchant
  database with `--callers` clients and again with as many clients as the ledger has
  connections; each client works on users of its own, picked at random per operation. Prints
  operations/s, p50, p99, PostgreSQL CPU per operation and the ratio service / pgbench. It
  runs last, after the ledger has stopped, so that the two never compete.
- `soak` (`--soak SECONDS`): the `rate` phase for that long, the ledger's RSS sampled every
  `--rss-every` seconds: start, end and max are printed.

    .venv/bin/python bench/ledger_bench.py                       # ops, rate, balance, pgbench
    .venv/bin/python bench/ledger_bench.py --callers 64 --seconds 20 --rate 500
    .venv/bin/python bench/ledger_bench.py --phases ops --seconds 30
    .venv/bin/python bench/ledger_bench.py --phases balance,h2load
    .venv/bin/python bench/ledger_bench.py --phases soak --soak 300 --rate 150
    .venv/bin/python bench/ledger_bench.py --phases rate,balance --rate 100 --balance-rate 100

A rate the service cannot sustain shows as NO_FREE_USER and DEADLINE_EXCEEDED errors and
latencies that grow with the backlog: pick one below the `ops` phase's throughput to read the
latency of a loaded, not overloaded, service. In a long soak the pool replaces connections, so
PostgreSQL's CPU is counted only for backends that lived through the whole phase.

Targets on a 2-core machine, load generator included: >= 1,000 operations/s; p99 < 50 ms at
half that rate; GetBalance p99 < 5 ms whatever the history length; no memory growth over a
5-minute run. PostgreSQL runs with `synchronous_commit` on (printed). Each phase is preceded
by an unmeasured warm-up. On a shared machine throughput moves with the load of others (the
load average is printed), CPU per operation much less.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import aio_pika
import asyncpg
import grpc
from catalog_bench import (
    CALL_TIMEOUT_SECONDS,
    WARM_UP_SECONDS,
    free_port,
    h2load_unary,
    open_channels,
    process_cpu_seconds,
    wait_serving,
)
from google.protobuf.duration_pb2 import Duration
from tally.catalog.v1 import catalog_service_pb2 as catalog_api
from tally.catalog.v1 import catalog_service_pb2_grpc as catalog_rpc
from tally.catalog.v1 import resources_pb2 as catalog_res
from tally.common.v1.money_pb2 import Credits
from tally.ledger.v1 import ledger_service_pb2 as api
from tally.ledger.v1 import ledger_service_pb2_grpc as rpc
from tally.ledger.v1 import resources_pb2 as res
from tally_kit.auth import issue_dev_token
from tally_kit.db.directory import merchant_database_name
from tally_kit.events.topology import (
    dead_letter_exchange_name,
    events_queue_name,
    parking_queue_name,
    unrouted_exchange_name,
    unrouted_queue_name,
)
from tally_kit.settings import ServiceSettings
from tally_kit.testing import drop_databases, unique_prefix
from tally_ledger.settings import LedgerSettings

PGBENCH_SCRIPT = Path(__file__).resolve().parent / "ledger_pgbench.sql"
MERCHANT = "bench-ledger"
OPERATION_CODE = "bench.tokens"
CREDITS_PER_UNIT = Decimal("0.5")
RESOURCE_AMOUNT = "10"
# Enough that no user runs out over any run: an operation costs 5 credits.
LOT_CREDITS = "100000000"
SHORT_HISTORY_USER = "history-10"
LONG_HISTORY_USER = "history-10000"
LONG_HISTORY_ENTRIES = 10_000
# Requests in flight while setting up.
SET_UP_CONCURRENCY = 32


def user_id(number: int) -> str:
    # The pgbench script spells the same ids: 'user-' || lpad(n::text, 6, '0').
    return f"user-{number:06d}"


# --- measuring ----------------------------------------------------------------------------------


class Meter:
    """CPU seconds of named processes, of the ledger's PostgreSQL backends and of this client.

    Same shape as `catalog_bench.CpuMeter` (role -> pid -> seconds), so `h2load_unary` takes it.
    """

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


def percentile(ordered: Sequence[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else float("nan")


@dataclass
class Result:
    """What one phase measured; `parts` are the latencies of each call within an operation."""

    unit: str
    done: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    parts_ms: dict[str, list[float]] = field(default_factory=dict)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.done / self.seconds

    def line(self, name: str) -> str:
        ordered = sorted(self.latencies_ms)
        errors = sum(self.errors.values())
        text = (
            f"{name:<22} {self.rate:>7.0f} {self.unit}/s   p50 {percentile(ordered, 0.5):7.2f} ms   "
            f"p99 {percentile(ordered, 0.99):7.2f} ms   max {percentile(ordered, 1.0):7.2f} ms"
            f"   {self.unit} {self.done}   errors {errors}"
        )
        if errors:
            text += " (" + ", ".join(f"{code} {count}" for code, count in self.errors.most_common()) + ")"
        for part, latencies in self.parts_ms.items():
            part_ordered = sorted(latencies)
            text += (
                f"\n{'':<22} {part:<24} p50 {percentile(part_ordered, 0.5):7.2f} ms   "
                f"p99 {percentile(part_ordered, 0.99):7.2f} ms"
            )
        if self.done and self.cpu_seconds:
            per_op = "  ".join(
                f"{role} {seconds * 1000 / self.done:.3f}" for role, seconds in self.cpu_seconds.items()
            )
            cores = "  ".join(
                f"{role} {seconds / self.seconds:.2f}" for role, seconds in self.cpu_seconds.items()
            )
            text += f"\n{'':<22} CPU ms/{self.unit[:-1] if self.unit.endswith('s') else self.unit}: {per_op}"
            text += f"\n{'':<22} cores busy: {cores}"
        return text


class Refused(Exception):
    """A call answered with an error; its text is the status code's name."""


# An operation or a read, given the number of the user to act on; records its calls' latencies.
Work = Callable[[int, dict[str, list[float]]], Awaitable[None]]


async def closed_loop(callers: int, seconds: float, users: int, work: Work, meter: Meter | None) -> Result:
    """`callers` loops each running `work` back to back for `seconds` (after a warm-up left
    out); caller c works on users c, c + callers, c + 2 * callers, ... below `users`."""
    await _loops(callers, WARM_UP_SECONDS, users, work, Result("ops", 0, 0))
    result = Result("ops", 0, 0)
    before = await meter.sample() if meter else None
    began = time.perf_counter()
    await _loops(callers, seconds, users, work, result)
    result.seconds = time.perf_counter() - began
    if meter and before:
        result.cpu_seconds = meter.used(before, await meter.sample())
    return result


async def _loops(callers: int, seconds: float, users: int, work: Work, result: Result) -> None:
    clock = time.perf_counter
    stop_at = clock() + seconds

    async def caller(index: int) -> None:
        own_users = itertools.cycle(range(index, users, callers))
        while clock() < stop_at:
            started = clock()
            try:
                await work(next(own_users), result.parts_ms)
            except Refused as refusal:
                result.errors[str(refusal)] += 1
                continue
            result.latencies_ms.append((clock() - started) * 1000)
            result.done += 1

    await asyncio.gather(*(caller(i) for i in range(callers)))


async def fixed_rate(rate: float, seconds: float, users: int, work: Work, meter: Meter | None) -> Result:
    """`work` started `rate` times a second for `seconds` (after a warm-up left out), each on a
    user no other work in flight has; latency from each start's scheduled instant."""
    await _arrivals(rate, WARM_UP_SECONDS, users, work, Result("ops", 0, 0))
    result = Result("ops", 0, 0)
    before = await meter.sample() if meter else None
    began = time.perf_counter()
    await _arrivals(rate, seconds, users, work, result)
    result.seconds = time.perf_counter() - began
    if meter and before:
        result.cpu_seconds = meter.used(before, await meter.sample())
    return result


async def _arrivals(rate: float, seconds: float, users: int, work: Work, result: Result) -> None:
    clock = time.perf_counter
    free_users = collections.deque(range(users))
    interval = 1 / rate
    start = clock()
    count = int(seconds * rate)
    in_flight: set[asyncio.Task[None]] = set()

    async def one(due: float, number: int) -> None:
        try:
            await work(number, result.parts_ms)
        except Refused as refusal:
            result.errors[str(refusal)] += 1
            return
        finally:
            free_users.append(number)
        result.latencies_ms.append((clock() - due) * 1000)
        result.done += 1

    for k in range(count):
        due = start + k * interval
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        if not free_users:
            # Every user has an operation in flight: the service is far behind the rate.
            result.errors["NO_FREE_USER"] += 1
            continue
        task = asyncio.create_task(one(due, free_users.popleft()))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def rabbitmq_pid() -> int | None:
    """The broker's Erlang VM, when it runs on this machine (its CPU is part of each close)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
            except OSError:
                continue
    return None


# --- the service under test -------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    settings: ServiceSettings
    stubs: list[rpc.LedgerServiceStub]
    app: tuple[tuple[str, str], ...]
    admin: tuple[tuple[str, str], ...]
    # The lot every numbered user holds.
    lot_of: dict[int, str] = field(default_factory=dict)

    def stub(self, n: int) -> rpc.LedgerServiceStub:
        return self.stubs[n % len(self.stubs)]

    async def operation(self, number: int, parts: dict[str, list[float]]) -> None:
        """One two-phase operation of user `number`: open, then record and close."""
        clock = time.perf_counter
        stub = self.stub(number)
        started = clock()
        try:
            opened = await stub.OpenOperation(
                api.OpenOperationRequest(
                    merchant_id=MERCHANT,
                    request_id=str(uuid.uuid4()),
                    user_id=user_id(number),
                    operation_code=OPERATION_CODE,
                ),
                metadata=self.app,
                timeout=CALL_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as error:
            raise Refused(f"open {error.code().name}") from None
        between = clock()
        try:
            await stub.RecordAndCloseOperation(
                api.RecordAndCloseOperationRequest(
                    merchant_id=MERCHANT,
                    request_id=str(uuid.uuid4()),
                    operation_id=opened.operation.operation_id,
                    resource_amount=RESOURCE_AMOUNT,
                ),
                metadata=self.app,
                timeout=CALL_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as error:
            raise Refused(f"close {error.code().name}") from None
        parts.setdefault("OpenOperation", []).append((between - started) * 1000)
        parts.setdefault("RecordAndCloseOperation", []).append((clock() - between) * 1000)

    def balance_of(self, user: str) -> Work:
        request = api.GetBalanceRequest(merchant_id=MERCHANT, user_id=user)

        async def read(number: int, _parts: dict[str, list[float]]) -> None:
            try:
                await self.stub(number).GetBalance(request, metadata=self.app, timeout=CALL_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError as error:
                raise Refused(error.code().name) from None

        return read

    async def grant(self, user: str, grant_key: str) -> str:
        """A never-expiring lot for `user` (registered by the grant); returns the lot id."""
        reply = await self.stubs[0].GrantCredits(
            api.GrantCreditsRequest(
                merchant_id=MERCHANT,
                request_id=str(uuid.uuid4()),
                user_id=user,
                grant_key=grant_key,
                custom=api.CustomGrant(credits=Credits(value=LOT_CREDITS)),
                source=res.LOT_SOURCE_PROMOTION,
            ),
            metadata=self.admin,
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return reply.lot.lot_id


def merchant_config() -> catalog_res.MerchantConfig:
    return catalog_res.MerchantConfig(
        legal_name="Bench Merchant SAS",
        tax_id="FR00123456789",
        address=catalog_res.PostalAddress(
            address_lines=["1 rue de la Paix"], locality="Paris", postal_code="75002", region_code="FR"
        ),
        receipt_series_prefix="BENCH",
        tax_regime=catalog_res.TaxRegime(rate_percent="20", prices_include_tax=True),
        operation_timeout=Duration(seconds=3600),
        retention_days=3650,
        default_currency="EUR",
    )


async def set_up_catalog(channel: grpc.aio.Channel, settings: ServiceSettings) -> None:
    stub = catalog_rpc.CatalogServiceStub(channel)
    platform = (("authorization", f"Bearer {issue_dev_token(settings, role='platform', merchant_id=None)}"),)
    admin = (("authorization", f"Bearer {issue_dev_token(settings, role='admin', merchant_id=MERCHANT)}"),)
    await stub.CreateMerchant(
        catalog_api.CreateMerchantRequest(
            merchant_id=MERCHANT, request_id=str(uuid.uuid4()), config=merchant_config()
        ),
        metadata=platform,
        timeout=CALL_TIMEOUT_SECONDS,
    )
    await stub.ScheduleOperationTypeVersion(
        catalog_api.ScheduleOperationTypeVersionRequest(
            merchant_id=MERCHANT,
            operation_code=OPERATION_CODE,
            request_id=str(uuid.uuid4()),
            resource_unit="token",
            credits_per_unit=Credits(value=str(CREDITS_PER_UNIT)),
        ),
        metadata=admin,
        timeout=CALL_TIMEOUT_SECONDS,
    )


async def set_up_users(bench: Bench, users: int) -> None:
    """`users` users, each registered with one lot, `SET_UP_CONCURRENCY` grants at a time."""
    numbers = iter(range(users))

    async def granter() -> None:
        for number in numbers:
            bench.lot_of[number] = await bench.grant(user_id(number), f"bench-{number}")

    await asyncio.gather(*(granter() for _ in range(SET_UP_CONCURRENCY)))


# The closed operations and their debits of a long history, in one statement each: rows as the
# ledger writes them (store.insert_operation then end_operation, store.write_posting).
_SEED_OPERATIONS = """
INSERT INTO operations (merchant_id, operation_id, user_id, operation_code, operation_version, resource_unit,
                        credits_per_unit, state, opened_at, closed_at, resource_amount, credits)
SELECT $1, gen_random_uuid(), $2, $3, 1, 'token', $4::numeric, 'closed',
       $5::timestamptz + n * interval '1 microsecond', $5::timestamptz + n * interval '1 microsecond',
       $6::numeric, $6::numeric * $4::numeric
  FROM generate_series($7::integer, $8::integer) AS n
"""
_SEED_DEBITS = """
INSERT INTO entries (merchant_id, user_id, entry_id, kind, amount, lot_id, occurred_at, reference,
                     operation_id, operation_code, operation_version, resource_amount, resource_unit,
                     credits_per_unit)
SELECT merchant_id, user_id, gen_random_uuid(), 'debit', -credits, $3, closed_at,
       'operation:' || operation_id, operation_id, operation_code, operation_version, resource_amount,
       resource_unit, credits_per_unit
  FROM operations
 WHERE merchant_id = $1 AND user_id = $2 AND state = 'closed' AND closed_at > $4
 ORDER BY closed_at
"""
# Debits per transaction while seeding: each entry updates the same lot and account rows, and
# a transaction's own updates of one row make a chain each later update walks.
_SEED_BATCH = 250


async def set_up_histories(bench: Bench, merchant_db: asyncpg.Connection) -> None:
    """A user with 10 entries (a grant, 9 operations through the API) and one with 10,000."""
    await bench.grant(SHORT_HISTORY_USER, "bench-short-history")
    short = SHORT_HISTORY_USER

    async def short_operation(_number: int, parts: dict[str, list[float]]) -> None:
        opened = await bench.stubs[0].OpenOperation(
            api.OpenOperationRequest(
                merchant_id=MERCHANT,
                request_id=str(uuid.uuid4()),
                user_id=short,
                operation_code=OPERATION_CODE,
            ),
            metadata=bench.app,
            timeout=CALL_TIMEOUT_SECONDS,
        )
        await bench.stubs[0].RecordAndCloseOperation(
            api.RecordAndCloseOperationRequest(
                merchant_id=MERCHANT,
                request_id=str(uuid.uuid4()),
                operation_id=opened.operation.operation_id,
                resource_amount=RESOURCE_AMOUNT,
            ),
            metadata=bench.app,
            timeout=CALL_TIMEOUT_SECONDS,
        )

    for _ in range(9):
        await short_operation(0, {})
    lot_id = await bench.grant(LONG_HISTORY_USER, "bench-long-history")
    issued_at = await merchant_db.fetchval(
        "SELECT issued_at FROM lots WHERE merchant_id = $1 AND lot_id = $2", MERCHANT, uuid.UUID(lot_id)
    )
    for first in range(1, LONG_HISTORY_ENTRIES, _SEED_BATCH):
        last = min(first + _SEED_BATCH, LONG_HISTORY_ENTRIES) - 1
        async with merchant_db.transaction():
            await merchant_db.execute(
                _SEED_OPERATIONS,
                MERCHANT,
                LONG_HISTORY_USER,
                OPERATION_CODE,
                CREDITS_PER_UNIT,
                issued_at,
                Decimal(RESOURCE_AMOUNT),
                first,
                last,
            )
            await merchant_db.execute(
                _SEED_DEBITS,
                MERCHANT,
                LONG_HISTORY_USER,
                uuid.UUID(lot_id),
                issued_at + timedelta(microseconds=first - 1),
            )
    for user, expected in ((SHORT_HISTORY_USER, 10), (LONG_HISTORY_USER, LONG_HISTORY_ENTRIES)):
        count = await merchant_db.fetchval(
            "SELECT count(*) FROM entries WHERE merchant_id = $1 AND user_id = $2", MERCHANT, user
        )
        if count != expected:
            raise SystemExit(f"set-up failed: {user} has {count} entries, not {expected}")
    await merchant_db.execute("ANALYZE")


# --- pgbench ----------------------------------------------------------------------------------


async def run_pgbench(
    args: argparse.Namespace,
    settings: ServiceSettings,
    database: str,
    clients: int,
    backend_pids: Callable[[], Awaitable[Sequence[int]]],
) -> Result:
    """`ledger_pgbench.sql` by `clients` pgbench clients on users of their own.

    Measured over a window of `--seconds` after the warm-up, while every client is connected:
    the operations that ended in it (from pgbench's per-transaction log), their latencies and
    the CPU of the database's backends between the window's two samples.
    """
    if shutil.which("pgbench") is None:
        raise SystemExit("pgbench is not installed (Debian: apt-get install postgresql-client)")
    users_per_client = args.users // clients
    if users_per_client < 1:
        raise SystemExit(f"--users {args.users} is fewer than the {clients} pgbench clients")
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            "pgbench",
            "--no-vacuum",
            f"--host={settings.pg_host}",
            f"--port={settings.pg_port}",
            f"--username={settings.pg_user}",
            f"--client={clients}",
            f"--jobs={min(clients, os.cpu_count() or 1)}",
            # One second more than the window, so that no client has left before it closes.
            f"--time={WARM_UP_SECONDS + args.seconds + 1:.0f}",
            "--protocol=prepared",
            f"--file={PGBENCH_SCRIPT}",
            f"--define=merchant={MERCHANT}",
            f"--define=users_per_client={users_per_client}",
            "--log",
            f"--log-prefix={scratch}/pgbench",
            database,
        ]
        password = settings.pg_password.get_secret_value()
        env = {**os.environ, **({"PGPASSWORD": password} if password else {})}
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
        )
        finished = asyncio.ensure_future(process.communicate())
        await asyncio.sleep(WARM_UP_SECONDS)
        cpu_before = {pid: process_cpu_seconds(pid) for pid in await backend_pids()}
        window_start = time.time()
        await asyncio.sleep(args.seconds)
        window_end = time.time()
        cpu_after = {pid: process_cpu_seconds(pid) for pid in await backend_pids()}
        output, _ = await finished
        if process.returncode != 0:
            # An aborted client is counted, not fatal: the window's figures are still printed.
            progress(f"pgbench ended with status {process.returncode}:\n{output.decode()[-2000:]}")
        latencies: list[float] = []
        logs = await asyncio.to_thread(lambda: [log.read_text() for log in Path(scratch).glob("pgbench*")])
        for text in logs:
            for line in text.splitlines():
                # client_id transaction_no time_us script_no time_epoch time_us (of the end)
                fields = line.split()
                ended_at = int(fields[4]) + int(fields[5]) / 1e6
                if window_start <= ended_at < window_end:
                    latencies.append(int(fields[2]) / 1000)
    result = Result("ops", len(latencies), window_end - window_start, latencies)
    failed = re.search(r"number of failed transactions: (\d+)", output.decode())
    if failed and int(failed.group(1)):
        result.errors["failed"] = int(failed.group(1))
    aborted = output.decode().count("pgbench: error: client")
    if aborted:
        result.errors["clients aborted"] = aborted
    result.cpu_seconds = {
        "postgres": sum(
            seconds - (cpu_before[pid] or 0.0)
            for pid, seconds in cpu_after.items()
            if seconds is not None and cpu_before.get(pid) is not None
        )
    }
    return result


# --- the run ----------------------------------------------------------------------------------


async def start_server(module: str, env: dict[str, str], port: int) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, env=env, stdout=asyncio.subprocess.DEVNULL
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await wait_serving(channel, process)
    return process


async def delete_broker_objects(settings: ServiceSettings, exchanges: Sequence[str], consumer: str) -> None:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        for name in exchanges:
            await channel.exchange_delete(name)
            await channel.exchange_delete(unrouted_exchange_name(name))
            await channel.queue_delete(unrouted_queue_name(name))
        for queue in (events_queue_name(consumer), parking_queue_name(consumer)):
            await channel.queue_delete(queue)
        await channel.exchange_delete(dead_letter_exchange_name(consumer))


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


async def soak(bench: Bench, ledger_pid: int, meter: Meter) -> tuple[Result, list[tuple[float, int]]]:
    """The rate phase for `--soak` seconds, the ledger's RSS sampled meanwhile."""
    args = bench.args
    samples: list[tuple[float, int]] = []
    began = time.perf_counter()

    async def sample_rss() -> None:
        while True:
            samples.append((time.perf_counter() - began, rss_bytes(ledger_pid)))
            await asyncio.sleep(args.rss_every)

    sampler = asyncio.create_task(sample_rss())
    try:
        result = await fixed_rate(args.rate, args.soak, args.users, bench.operation, meter)
    finally:
        sampler.cancel()
    samples.append((time.perf_counter() - began, rss_bytes(ledger_pid)))
    return result, samples


async def main(args: argparse.Namespace) -> None:
    load_at_start = load_average()
    prefix = unique_prefix()
    settings = LedgerSettings(db_prefix=prefix)
    catalog_port, ledger_port = free_port(), free_port()
    exchanges = [f"{prefix}bench.catalog", f"{prefix}bench.ledger"]
    consumer = f"{prefix}ledger"
    catalog_env = {
        **os.environ,
        "CATALOG_DB_PREFIX": prefix,
        "CATALOG_GRPC_PORT": str(catalog_port),
        "CATALOG_METRICS_PORT": str(free_port()),
        "CATALOG_EVENTS_EXCHANGE": exchanges[0],
        "CATALOG_LOG_LEVEL": args.log_level,
    }
    ledger_env = {
        **os.environ,
        "LEDGER_DB_PREFIX": prefix,
        "LEDGER_GRPC_PORT": str(ledger_port),
        "LEDGER_METRICS_PORT": str(free_port()),
        "LEDGER_EVENTS_EXCHANGE": exchanges[1],
        "LEDGER_CONSUMER_NAME": consumer,
        "LEDGER_CATALOG_TARGET": f"127.0.0.1:{catalog_port}",
        "LEDGER_LOG_LEVEL": args.log_level,
        "LEDGER_DB_POOL_MAX_SIZE": str(args.pool_size),
        # The merchant's pool, the control database's and the jobs' and relay's spare.
        "LEDGER_DB_MAX_CONNECTIONS": str(args.pool_size + 4),
    }
    processes: list[asyncio.subprocess.Process] = []
    channels: list[grpc.aio.Channel] = []
    connect = {
        "host": settings.pg_host,
        "port": settings.pg_port,
        "user": settings.pg_user,
        "password": settings.pg_password.get_secret_value() or None,
    }
    observer = await asyncpg.connect(**connect, database="postgres")
    merchant_db: asyncpg.Connection | None = None
    database = merchant_database_name(settings, MERCHANT)

    async def ledger_backends() -> list[int]:
        rows = await observer.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()"
            " AND application_name <> 'ledger_bench'",
            database,
        )
        return [row["pid"] for row in rows]

    results: list[tuple[str, Result]] = []
    notes: list[str] = []
    try:
        catalog = await start_server("tally_catalog", catalog_env, catalog_port)
        processes.append(catalog)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{catalog_port}") as catalog_channel:
            await set_up_catalog(catalog_channel, settings)
        ledger = await start_server("tally_ledger", ledger_env, ledger_port)
        processes.append(ledger)
        channels = open_channels(ledger_port, args.channels)
        bench = Bench(
            args,
            settings,
            [rpc.LedgerServiceStub(channel) for channel in channels],
            app=(("authorization", f"Bearer {issue_dev_token(settings, role='app', merchant_id=MERCHANT)}"),),
            admin=(
                ("authorization", f"Bearer {issue_dev_token(settings, role='admin', merchant_id=MERCHANT)}"),
            ),
        )
        started = time.perf_counter()
        await set_up_users(bench, args.users)
        progress(f"{args.users} users granted a lot in {time.perf_counter() - started:.1f} s")
        merchant_db = await asyncpg.connect(
            **connect, database=database, server_settings={"application_name": "ledger_bench"}
        )
        await set_up_histories(bench, merchant_db)
        set_up_seconds = time.perf_counter() - started
        progress(f"histories written, set-up done in {set_up_seconds:.1f} s")
        notes.append(
            f"set-up: {args.users} users with a lot each and the two histories in {set_up_seconds:.1f} s"
        )
        processes_cpu = {"ledger": ledger.pid}
        broker = rabbitmq_pid()
        if broker is not None:
            processes_cpu["rabbitmq"] = broker
        meter = Meter(processes_cpu, ledger_backends)

        if "ops" in args.phases:
            progress("phase ops")
            result = await closed_loop(args.callers, args.seconds, args.users, bench.operation, meter)
            results.append((f"operations, {args.callers} callers", result))
        if "rate" in args.phases:
            progress("phase rate")
            result = await fixed_rate(args.rate, args.seconds, args.users, bench.operation, meter)
            results.append((f"operations at {args.rate:g}/s", result))
        if "balance" in args.phases:
            progress("phase balance")
            for label, user in (("10 entries", SHORT_HISTORY_USER), ("10,000 entries", LONG_HISTORY_USER)):
                read = bench.balance_of(user)
                result = await fixed_rate(args.balance_rate, args.seconds, args.users, read, meter)
                result.unit = "reads"
                results.append((f"GetBalance {label} at {args.balance_rate:g}/s", result))
            for label, user in (("10 entries", SHORT_HISTORY_USER), ("10,000 entries", LONG_HISTORY_USER)):
                result = await closed_loop(
                    args.callers, args.seconds, args.users, bench.balance_of(user), meter
                )
                result.unit = "reads"
                results.append((f"GetBalance {label}, {args.callers} callers", result))
        if "h2load" in args.phases:
            progress("phase h2load")
            metrics_port = int(ledger_env["LEDGER_METRICS_PORT"])
            result_h2 = await h2load_unary(
                ledger_port,
                "/tally.ledger.v1.LedgerService/GetBalance",
                api.GetBalanceRequest(merchant_id=MERCHANT, user_id=SHORT_HISTORY_USER),
                dict(bench.app),
                args.callers,
                args.seconds,
                meter,  # type: ignore[arg-type]
                [metrics_port],
            )
            result = Result(
                "reads",
                result_h2.calls,
                result_h2.seconds,
                result_h2.latencies_ms,
                errors=result_h2.errors,
                cpu_seconds=result_h2.cpu_seconds,
            )
            results.append((f"GetBalance/h2load, {args.callers} streams", result))
        if "soak" in args.phases:
            progress("phase soak")
            result, samples = await soak(bench, ledger.pid, meter)
            results.append((f"soak {args.soak:g} s at {args.rate:g}/s", result))
            sizes = [size for _, size in samples]
            notes.append(
                f"ledger RSS over the soak: start {megabytes(sizes[0])}, end {megabytes(sizes[-1])}, "
                f"max {megabytes(max(sizes))} ({len(sizes)} samples every {args.rss_every:g} s: "
                + " ".join(f"{at:.0f}s={size / 2**20:.0f}" for at, size in samples)
                + ")"
            )
        # pgbench runs alone: the ledger (and with it its relay and jobs) stops first.
        for channel in channels:
            await channel.close()
        channels = []
        ledger.terminate()
        await ledger.wait()
        if "pgbench" in args.phases:
            # Operations the phases left open (calls cut off by their deadline, or in flight when
            # the ledger stopped) would refuse pgbench's openings for their users.
            await merchant_db.execute(
                "UPDATE operations SET state = 'canceled', closed_at = now()"
                " WHERE merchant_id = $1 AND state = 'open'",
                MERCHANT,
            )
            service = next((result for name, result in results if name.startswith("operations,")), None)
            for clients in sorted({args.callers, args.pool_size}, reverse=True):
                progress(f"phase pgbench, {clients} clients")
                result = await run_pgbench(args, settings, database, clients, ledger_backends)
                results.append((f"pgbench, {clients} clients", result))
                if service is not None:
                    notes.append(
                        f"ratio service / pgbench with {clients} clients: {service.rate / result.rate:.2f} "
                        f"(operations/s {service.rate:.0f} / {result.rate:.0f})"
                    )
    finally:
        for channel in channels:
            await channel.close()
        if merchant_db is not None:
            await merchant_db.close()
        for process in reversed(processes):
            if process.returncode is None:
                process.terminate()
        for process in processes:
            await process.wait()
        synchronous_commit = await observer.fetchval("SHOW synchronous_commit")
        await observer.close()
        await drop_databases(settings, prefix)
        await delete_broker_objects(settings, exchanges, consumer)
    print(
        f"ledger benchmark: {args.callers} callers over {args.channels} channel(s), "
        f"{args.seconds:g} s per phase after {WARM_UP_SECONDS:g} s warm-up, {args.users} users, "
        f"ledger pool {args.pool_size} connections, {os.cpu_count()} CPUs, "
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
    parser.add_argument("--callers", type=int, default=64, help="concurrent users in closed-loop phases")
    parser.add_argument("--channels", type=int, default=2, help="gRPC channels the callers share")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per phase")
    parser.add_argument("--users", type=int, default=1024, help="users with a lot, shared out among callers")
    parser.add_argument("--rate", type=float, default=500.0, help="operations/s of the rate and soak phases")
    parser.add_argument("--balance-rate", type=float, default=500.0, help="GetBalance/s of the balance phase")
    parser.add_argument(
        "--pool-size", type=int, default=8, help="the ledger's connections to the merchant database"
    )
    parser.add_argument(
        "--phases",
        default="ops,rate,balance,pgbench",
        help="comma-separated: ops, rate, balance, h2load, pgbench, soak",
    )
    parser.add_argument(
        "--soak", type=float, default=0.0, help="seconds of the soak phase (adds it to --phases)"
    )
    parser.add_argument(
        "--rss-every", type=float, default=10.0, help="seconds between RSS samples in the soak"
    )
    parser.add_argument("--log-level", default="INFO", help="the services' log level (INFO: access logs on)")
    arguments = parser.parse_args()
    arguments.phases = set(arguments.phases.split(","))
    if arguments.soak:
        arguments.phases.add("soak")
    elif "soak" in arguments.phases:
        arguments.soak = 300.0
    asyncio.run(main(arguments))
