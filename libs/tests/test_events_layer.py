"""The events layer against the real PostgreSQL and RabbitMQ: outbox, relay, consumer, crashes.

Every run uses its own database prefix, exchange and queues, and removes them at the end.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import os
import secrets
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import StringValue
from prometheus_client import REGISTRY
from tally.common.v1.event_pb2 import EventEnvelope
from tally_kit import context, errors
from tally_kit.db import MerchantDirectory
from tally_kit.events import (
    CONTENT_TYPE,
    EventConsumer,
    MerchantDatabases,
    OutboxRelay,
    declare_consumer_topology,
    declare_events_exchange,
    enqueue,
    make_envelope,
    unpack_payload,
)
from tally_kit.events.topology import parking_queue_name, unrouted_exchange_name, unrouted_queue_name
from tally_kit.settings import ServiceSettings
from tally_kit.testing import drop_databases, unique_prefix

WORKER_SCRIPT = Path(__file__).with_name("events_worker.py")


def _load_worker() -> ModuleType:
    # libs/tests is not a package: load the harness beside this file by its path.
    spec = importlib.util.spec_from_file_location("events_worker", WORKER_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


worker = _load_worker()
EVENT_TYPE: str = worker.EVENT_TYPE
MERCHANTS = ["acme", "globex"]

pytestmark = pytest.mark.integration

Component = TypeVar("Component", OutboxRelay, EventConsumer)


# --- fixtures and helpers ------------------------------------------------------------


@pytest.fixture(scope="module")
def settings() -> ServiceSettings:
    prefix = unique_prefix()
    return ServiceSettings(
        db_prefix=prefix,
        events_exchange=f"{prefix}events",
        consumer_delivery_limit=3,
        consumer_prefetch=8,
        outbox_sweep_interval_seconds=60,
        shutdown_grace_seconds=5,
    )


@pytest.fixture(scope="module")
async def databases(settings: ServiceSettings) -> AsyncIterator[MerchantDatabases]:
    pools = worker.PoolDatabases(settings)
    try:
        for merchant_id in MERCHANTS:
            await pools.provision(merchant_id)
        yield pools
    finally:
        await pools.close()
        await drop_databases(settings, settings.db_prefix)


@pytest.fixture(autouse=True)
async def empty_tables(databases: MerchantDatabases) -> None:
    for merchant_id in MERCHANTS:
        async with databases.transaction(merchant_id) as conn:
            await conn.execute("TRUNCATE outbox, inbox, effects")


@pytest.fixture(scope="module")
async def channel(settings: ServiceSettings) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        yield channel
        await channel.exchange_delete(settings.events_exchange)
        await channel.exchange_delete(unrouted_exchange_name(settings.events_exchange))
        await channel.queue_delete(unrouted_queue_name(settings.events_exchange))
    finally:
        await connection.close()


@pytest.fixture
async def service(settings: ServiceSettings, channel: AbstractChannel) -> AsyncIterator[str]:
    """A consuming service name of this test alone; its queues and exchange are deleted after."""
    name = f"{settings.db_prefix}{secrets.token_hex(3)}"
    yield name
    await worker.delete_consumer_topology(channel, name)


@pytest.fixture
async def exchange(settings: ServiceSettings, channel: AbstractChannel) -> AbstractExchange:
    return await declare_events_exchange(channel, settings.events_exchange)


async def declare_queue(
    settings: ServiceSettings, channel: AbstractChannel, service: str, *routing_keys: str
) -> AbstractQueue:
    return await declare_consumer_topology(
        channel,
        exchange=settings.events_exchange,
        service=service,
        routing_keys=routing_keys or [EVENT_TYPE],
        delivery_limit=settings.consumer_delivery_limit,
    )


@asynccontextmanager
async def running(component: Component) -> AsyncIterator[Component]:
    await component.start()
    try:
        yield component
    finally:
        await component.stop()


async def eventually(check: Callable[[], Awaitable[bool] | bool], *, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def receive(queue: AbstractQueue, count: int, *, within: float = 10.0) -> list[AbstractIncomingMessage]:
    """Take exactly `count` messages off the queue (acknowledged), waiting for them to arrive."""
    messages: list[AbstractIncomingMessage] = []

    async def received_all() -> bool:
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            messages.append(message)
        return len(messages) >= count

    await eventually(received_all, within=within)
    assert len(messages) == count
    return messages


async def ready_messages(channel: AbstractChannel, queue_name: str) -> int:
    declared = await channel.declare_queue(queue_name, passive=True)
    assert declared.declaration_result.message_count is not None
    return declared.declaration_result.message_count


async def write_event(
    databases: MerchantDatabases, merchant_id: str, payload: Message, *, event_type: str = EVENT_TYPE
) -> str:
    async with databases.transaction(merchant_id) as conn:
        return await enqueue(
            conn, producer="test", event_type=event_type, merchant_id=merchant_id, payload=payload
        )


async def fetch_value(databases: MerchantDatabases, merchant_id: str, query: str, *args: object) -> object:
    async with databases.connection(merchant_id) as conn:
        return await conn.fetchval(query, *args)


async def effects_of(databases: MerchantDatabases, merchant_id: str, event_id: str) -> int:
    count = await fetch_value(
        databases, merchant_id, "SELECT count(*) FROM effects WHERE event_id = $1", uuid.UUID(event_id)
    )
    assert isinstance(count, int)
    return count


async def has_one_effect(databases: MerchantDatabases, merchant_id: str, event_id: str) -> bool:
    return await effects_of(databases, merchant_id, event_id) == 1


async def is_published(databases: MerchantDatabases, merchant_id: str, event_id: str) -> bool:
    published = await fetch_value(
        databases,
        merchant_id,
        "SELECT published_at IS NOT NULL FROM outbox WHERE event_id = $1",
        uuid.UUID(event_id),
    )
    return published is True


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def duplicates() -> float:
    return sample("tally_events_consumed_total", event_type=EVENT_TYPE, outcome="duplicate")


async def publish_raw(
    exchange: AbstractExchange, body: bytes, *, routing_key: str = EVENT_TYPE, message_id: str | None = None
) -> None:
    """Publish as a producer would, without the outbox: for poison messages and duplicates."""
    message = aio_pika.Message(
        body, message_id=message_id or str(uuid.uuid4()), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
    )
    await exchange.publish(message, routing_key=routing_key)


async def publish_envelope(exchange: AbstractExchange, envelope: EventEnvelope) -> None:
    await publish_raw(
        exchange,
        envelope.SerializeToString(),
        routing_key=envelope.event_type,
        message_id=envelope.event_id,
    )


def new_envelope(merchant_id: str, value: str, *, event_type: str = EVENT_TYPE) -> EventEnvelope:
    return make_envelope(
        event_type=event_type, merchant_id=merchant_id, payload=StringValue(value=value), producer="test"
    )


async def spawn_worker(
    settings: ServiceSettings, *arguments: str, failpoint: str
) -> asyncio.subprocess.Process:
    environment = {
        **os.environ,
        "TALLY_DB_PREFIX": settings.db_prefix,
        "TALLY_EVENTS_EXCHANGE": settings.events_exchange,
        "TALLY_CONSUMER_DELIVERY_LIMIT": str(settings.consumer_delivery_limit),
        "TALLY_FAILPOINTS": failpoint,
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER_SCRIPT),
        *arguments,
        "--merchants",
        ",".join(MERCHANTS),
        env=environment,
        stdout=asyncio.subprocess.PIPE,
    )


async def killed_by_failpoint(process: asyncio.subprocess.Process) -> bool:
    try:
        return await asyncio.wait_for(process.wait(), timeout=20) == -signal.SIGKILL
    except TimeoutError:
        process.terminate()
        await process.wait()
        raise


# --- envelope and outbox ---------------------------------------------------------------


def test_envelope_carries_the_call_context_and_the_payload() -> None:
    token = context.correlation_id.set("req-42")
    try:
        envelope = new_envelope("acme", "hello")
    finally:
        context.correlation_id.reset(token)
    assert uuid.UUID(envelope.event_id)
    assert (envelope.event_type, envelope.merchant_id, envelope.producer) == (EVENT_TYPE, "acme", "test")
    assert envelope.correlation_id == "req-42"
    assert envelope.occurred_at.seconds > 0
    assert unpack_payload(envelope) == StringValue(value="hello")
    with pytest.raises(ValueError, match="is not `<service>\\.<event>`"):
        new_envelope("acme", "hello", event_type="NoDot")


async def test_enqueue_refuses_to_run_outside_a_transaction(databases: MerchantDatabases) -> None:
    async with databases.connection("acme") as conn:
        with pytest.raises(RuntimeError, match="inside the transaction"):
            await enqueue(
                conn, producer="test", event_type=EVENT_TYPE, merchant_id="acme", payload=StringValue()
            )


async def test_a_rolled_back_transaction_publishes_nothing(
    settings: ServiceSettings, databases: MerchantDatabases, channel: AbstractChannel, service: str
) -> None:
    queue = await declare_queue(settings, channel, service)
    async with running(OutboxRelay(settings, databases, producer="test")) as relay:
        with pytest.raises(RuntimeError, match="change refused"):
            async with databases.transaction("acme") as conn:
                await enqueue(
                    conn, producer="test", event_type=EVENT_TYPE, merchant_id="acme", payload=StringValue()
                )
                raise RuntimeError("change refused")
        relay.notify("acme")
        committed = await write_event(databases, "acme", StringValue(value="kept"))
        relay.notify("acme")
        [message] = await receive(queue, 1)
    assert message.message_id == committed
    assert await queue.get(fail=False) is None
    assert await fetch_value(databases, "acme", "SELECT count(*) FROM outbox") == 1


# --- relay -------------------------------------------------------------------------------


async def test_relay_publishes_after_notify_and_sweeps_leftovers(
    settings: ServiceSettings, databases: MerchantDatabases, channel: AbstractChannel, service: str
) -> None:
    queue = await declare_queue(settings, channel, service)
    published_before = sample("tally_events_published_total", event_type=EVENT_TYPE)
    lag_count_before = sample("tally_outbox_publish_lag_seconds_count")
    sweeps_before = sample("tally_outbox_sweeps_total")

    async with running(OutboxRelay(settings, databases, producer="test")) as relay:
        token = context.correlation_id.set("req-7")
        try:
            notified = await write_event(databases, "acme", StringValue(value="fast path"))
        finally:
            context.correlation_id.reset(token)
        relay.notify("acme")
        [message] = await receive(queue, 1)
        await eventually(lambda: is_published(databases, "acme", notified))

        assert message.message_id == notified
        assert message.type == EVENT_TYPE
        assert message.routing_key == EVENT_TYPE
        assert message.content_type == CONTENT_TYPE
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.correlation_id == "req-7"
        assert message.timestamp is not None
        envelope = EventEnvelope.FromString(message.body)
        assert (envelope.event_id, envelope.merchant_id) == (notified, "acme")
        assert unpack_payload(envelope) == StringValue(value="fast path")

        # Written without a notify, as if its process had crashed right after the commit.
        leftover = await write_event(databases, "globex", StringValue(value="leftover"))
        await relay.sweep()
        assert await is_published(databases, "globex", leftover)
        [swept] = await receive(queue, 1)
        assert swept.message_id == leftover

    assert sample("tally_events_published_total", event_type=EVENT_TYPE) == published_before + 2
    assert sample("tally_outbox_publish_lag_seconds_count") == lag_count_before + 2
    assert sample("tally_outbox_sweeps_total") >= sweeps_before + 1


async def test_stop_publishes_what_was_notified(
    settings: ServiceSettings, databases: MerchantDatabases, channel: AbstractChannel, service: str
) -> None:
    queue = await declare_queue(settings, channel, service)
    relay = OutboxRelay(settings, databases, producer="test")
    await relay.start()
    event_ids = [await write_event(databases, "acme", StringValue(value=str(n))) for n in range(3)]
    relay.notify("acme")
    await relay.stop()
    assert all([await is_published(databases, "acme", event_id) for event_id in event_ids])
    assert sorted(message.message_id for message in await receive(queue, 3)) == sorted(event_ids)


async def test_an_event_nobody_consumes_is_kept_in_the_unrouted_queue(
    settings: ServiceSettings,
    databases: MerchantDatabases,
    channel: AbstractChannel,
    exchange: AbstractExchange,
) -> None:
    relay = OutboxRelay(settings, databases, producer="test")
    async with running(relay):
        event_id = await write_event(databases, "acme", StringValue(), event_type="test.nobody_listens")
        await relay.sweep()
        assert await is_published(databases, "acme", event_id)
    kept = await channel.get_queue(unrouted_queue_name(settings.events_exchange))
    [message] = await receive(kept, 1)
    assert message.message_id == event_id


async def test_an_event_the_broker_returns_stays_pending_until_the_topology_is_repaired(
    settings: ServiceSettings,
    databases: MerchantDatabases,
    channel: AbstractChannel,
    exchange: AbstractExchange,
) -> None:
    failures_before = sample("tally_outbox_publish_failures_total", reason="unroutable")
    relay = OutboxRelay(settings, databases, producer="test")
    try:
        async with running(relay):
            await channel.queue_delete(unrouted_queue_name(settings.events_exchange))
            event_id = await write_event(databases, "acme", StringValue(), event_type="test.nobody_listens")
            await relay.sweep()
            assert not await is_published(databases, "acme", event_id)
            assert sample("tally_outbox_publish_failures_total", reason="unroutable") >= failures_before + 1

            await declare_events_exchange(channel, settings.events_exchange)
            await relay.sweep()
            assert await is_published(databases, "acme", event_id)
    finally:
        await declare_events_exchange(channel, settings.events_exchange)


async def test_two_relays_over_one_outbox_publish_each_event_once(
    settings: ServiceSettings, databases: MerchantDatabases, channel: AbstractChannel, service: str
) -> None:
    queue = await declare_queue(settings, channel, service)
    # Small batches, so that each relay claims many times while the other holds rows.
    relays = [OutboxRelay(settings, databases, producer=f"relay-{n}", batch_size=4) for n in range(2)]
    async with running(relays[0]), running(relays[1]):
        event_ids = [
            await write_event(databases, merchant_id, StringValue(value=str(n)))
            for n in range(30)
            for merchant_id in MERCHANTS
        ]
        await asyncio.gather(*(relay.sweep() for relay in relays))
    messages = await receive(queue, len(event_ids))
    assert sorted(message.message_id for message in messages) == sorted(event_ids)
    assert await queue.get(fail=False) is None
    # Both relays took part: the test really ran them side by side.
    assert {message.app_id for message in messages} == {"relay-0", "relay-1"}


async def rabbitmqctl(*arguments: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *arguments, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl to cut a connection")
async def test_the_relay_rides_out_a_broker_connection_loss(
    settings: ServiceSettings, databases: MerchantDatabases, channel: AbstractChannel, service: str
) -> None:
    queue = await declare_queue(settings, channel, service)
    producer = f"{service}-producer"
    async with running(OutboxRelay(settings, databases, producer=producer)) as relay:
        connections = await rabbitmqctl("list_connections", "pid", "client_properties")
        [relay_connection] = [line.split("\t")[0] for line in connections.splitlines() if producer in line]
        await rabbitmqctl("close_connection", relay_connection, "broker outage in a test")

        event_id = await write_event(databases, "acme", StringValue(value="through the outage"))
        relay.notify("acme")
        [message] = await receive(queue, 1, within=20)
    assert message.message_id == event_id
    assert await is_published(databases, "acme", event_id)


# --- consumer ----------------------------------------------------------------------------


async def test_poison_messages_are_parked_while_the_next_ones_are_handled(
    settings: ServiceSettings,
    databases: MerchantDatabases,
    channel: AbstractChannel,
    exchange: AbstractExchange,
    service: str,
) -> None:
    async def refuse(conn: asyncpg.Connection, envelope: EventEnvelope, payload: Message) -> None:
        await worker.record_effect(conn, envelope, payload)  # rolled back with the transaction
        raise errors.FailedPrecondition("merchant is not provisioned here")

    parked_before = sample("tally_events_parked_total", queue=parking_queue_name(service))
    consumer = EventConsumer(
        settings,
        databases,
        service=service,
        handlers={EVENT_TYPE: worker.record_effect, "test.refused": refuse},
    )
    unknown_payload = new_envelope("acme", "unknown")
    unknown_payload.payload.CopyFrom(AnyMessage(type_url="type.googleapis.com/tally.nowhere.v1.Nope"))
    refused = new_envelope("acme", "refused", event_type="test.refused")
    good = [new_envelope(merchant_id, "good") for merchant_id in MERCHANTS]

    async with running(consumer):
        await publish_raw(exchange, b"\xff\x00 not an envelope")
        await publish_envelope(exchange, unknown_payload)
        await publish_envelope(exchange, refused)
        for envelope in good:
            await publish_envelope(exchange, envelope)

        parking = await channel.declare_queue(parking_queue_name(service), passive=True)
        parked = await receive(parking, 3)
        for envelope in good:
            await eventually(lambda e=envelope: has_one_effect(databases, e.merchant_id, e.event_id))

    assert b"\xff\x00 not an envelope" in [message.body for message in parked]
    assert {unknown_payload.event_id, refused.event_id} <= {message.message_id for message in parked}
    assert await effects_of(databases, "acme", refused.event_id) == 0
    assert sample("tally_events_parked_total", queue=parking_queue_name(service)) == parked_before + 3
    assert await ready_messages(channel, consumer.queue_name) == 0


async def test_an_event_older_than_the_inbox_remembers_is_parked_not_applied(
    settings: ServiceSettings,
    databases: MerchantDatabases,
    channel: AbstractChannel,
    exchange: AbstractExchange,
    service: str,
) -> None:
    consumer = EventConsumer(
        settings, databases, service=service, handlers={EVENT_TYPE: worker.record_effect}
    )
    stale = new_envelope("acme", "replayed long after")
    stale.occurred_at.FromSeconds(int(time.time() - (settings.inbox_retention_days + 1) * 86400))
    recent = new_envelope("acme", "recent")
    recent.occurred_at.FromSeconds(int(time.time() - (settings.inbox_retention_days - 1) * 86400))

    async with running(consumer):
        await publish_envelope(exchange, stale)
        await publish_envelope(exchange, recent)
        parking = await channel.declare_queue(parking_queue_name(service), passive=True)
        [parked] = await receive(parking, 1)
        await eventually(lambda: has_one_effect(databases, "acme", recent.event_id))

    assert parked.message_id == stale.event_id
    assert await effects_of(databases, "acme", stale.event_id) == 0


async def test_an_unknown_merchants_event_is_parked_unless_the_service_provisions_it(
    settings: ServiceSettings,
    databases: MerchantDatabases,
    channel: AbstractChannel,
    exchange: AbstractExchange,
    service: str,
) -> None:
    handlers = {EVENT_TYPE: worker.record_effect}
    before_provisioning = new_envelope("initech", "before")
    async with running(EventConsumer(settings, databases, service=service, handlers=handlers)):
        await publish_envelope(exchange, before_provisioning)
        parking = await channel.declare_queue(parking_queue_name(service), passive=True)
        [parked] = await receive(parking, 1)
    assert parked.message_id == before_provisioning.event_id
    assert "initech" not in await databases.merchant_ids()

    provisioning = EventConsumer(
        settings,
        databases,
        service=service,
        handlers=handlers,
        prepare_merchant=databases.provision,  # type: ignore[attr-defined]
    )
    first_sight = new_envelope("initech", "first sight")

    async def provisioned_with_one_effect(merchant_id: str, event_id: str) -> bool:
        provisioned = merchant_id in await databases.merchant_ids()
        return provisioned and await has_one_effect(databases, merchant_id, event_id)

    async with running(provisioning):
        await publish_envelope(exchange, first_sight)
        await eventually(lambda: provisioned_with_one_effect("initech", first_sight.event_id))


async def test_failures_are_retried_and_duplicates_acknowledged_without_effect(
    settings: ServiceSettings,
    databases: MerchantDatabases,
    channel: AbstractChannel,
    exchange: AbstractExchange,
    service: str,
) -> None:
    attempts = {"test.flaky": 0, "test.broken": 0}

    async def flaky(conn: asyncpg.Connection, envelope: EventEnvelope, payload: Message) -> None:
        attempts["test.flaky"] += 1
        if attempts["test.flaky"] == 1:
            raise errors.Unavailable("ledger is restarting")
        await worker.record_effect(conn, envelope, payload)

    async def broken(conn: asyncpg.Connection, envelope: EventEnvelope, payload: Message) -> None:
        attempts["test.broken"] += 1
        raise ZeroDivisionError("a bug")

    def consumed(event_type: str, outcome: str) -> float:
        return sample("tally_events_consumed_total", event_type=event_type, outcome=outcome)

    committed: list[str] = []
    before = {
        "flaky retried": consumed("test.flaky", "retried"),
        "broken retried": consumed("test.broken", "retried"),
        "broken parked": consumed("test.broken", "parked"),
        "duplicate": consumed(EVENT_TYPE, "duplicate"),
    }
    consumer = EventConsumer(
        settings,
        databases,
        service=service,
        handlers={EVENT_TYPE: worker.record_effect, "test.flaky": flaky, "test.broken": broken},
        after_commit=committed.append,
        retry_backoff_seconds=0.01,
    )
    flaky_event = new_envelope("acme", "flaky", event_type="test.flaky")
    broken_event = new_envelope("acme", "broken", event_type="test.broken")
    twice = new_envelope("globex", "twice")

    async with running(consumer):
        for envelope in (flaky_event, broken_event, twice, twice):
            await publish_envelope(exchange, envelope)
        await eventually(lambda: has_one_effect(databases, "acme", flaky_event.event_id))
        await eventually(lambda: has_one_effect(databases, "globex", twice.event_id))
        parking = await channel.declare_queue(parking_queue_name(service), passive=True)
        [parked] = await receive(parking, 1)
        await eventually(lambda: consumed(EVENT_TYPE, "duplicate") == before["duplicate"] + 1)

    assert parked.body == broken_event.SerializeToString()
    assert attempts == {"test.flaky": 2, "test.broken": settings.consumer_delivery_limit}
    assert consumed("test.flaky", "retried") == before["flaky retried"] + 1
    assert (
        consumed("test.broken", "retried") == before["broken retried"] + settings.consumer_delivery_limit - 1
    )
    assert consumed("test.broken", "parked") == before["broken parked"] + 1
    assert await effects_of(databases, "globex", twice.event_id) == 1
    # The relay hook runs once per committed first delivery: not for failures, not for duplicates.
    assert sorted(committed) == ["acme", "globex"]


async def test_stop_lets_in_flight_handlers_finish(
    settings: ServiceSettings,
    databases: MerchantDatabases,
    channel: AbstractChannel,
    exchange: AbstractExchange,
    service: str,
) -> None:
    started = asyncio.Event()

    async def slow(conn: asyncpg.Connection, envelope: EventEnvelope, payload: Message) -> None:
        started.set()
        await asyncio.sleep(0.3)
        await worker.record_effect(conn, envelope, payload)

    consumer = EventConsumer(settings, databases, service=service, handlers={EVENT_TYPE: slow})
    envelope = new_envelope("acme", "slow")
    await consumer.start()
    await publish_envelope(exchange, envelope)
    await asyncio.wait_for(started.wait(), timeout=10)
    await consumer.stop()
    assert await has_one_effect(databases, "acme", envelope.event_id)
    assert await ready_messages(channel, consumer.queue_name) == 0


async def test_the_merchant_directory_serves_relay_and_consumer(
    settings: ServiceSettings, exchange: AbstractExchange, service: str
) -> None:
    """The kit's `MerchantDirectory` satisfies `MerchantDatabases`, with the kit migrations applied."""
    directory = MerchantDirectory(
        settings.model_copy(update={"service_name": "evdir", "db_pool_max_size": 2, "db_max_connections": 4})
    )
    handled: list[str] = []

    async def remember(conn: asyncpg.Connection, envelope: EventEnvelope, payload: Message) -> None:
        handled.append(envelope.event_id)

    await directory.start()
    try:
        consumer = EventConsumer(
            settings,
            directory,
            service=service,
            handlers={EVENT_TYPE: remember},
            prepare_merchant=directory.provision,
        )
        async with running(consumer), running(OutboxRelay(settings, directory, producer="test")) as relay:
            # The consumer provisions the merchant on first sight; the producer's write then finds it.
            first = new_envelope("hooli", "first sight")
            await publish_envelope(exchange, first)
            await eventually(lambda: handled == [first.event_id])
            event_id = await write_event(directory, "hooli", StringValue(value="through the directory"))
            relay.notify("hooli")
            await eventually(lambda: handled == [first.event_id, event_id])
            await eventually(lambda: is_published(directory, "hooli", event_id))
        inbox = await fetch_value(directory, "hooli", "SELECT count(*) FROM inbox")
        assert inbox == 2
    finally:
        await directory.close()


# --- exactly once across crashes --------------------------------------------------------


async def test_exactly_once_when_the_relay_dies_between_publish_and_mark(
    settings: ServiceSettings, databases: MerchantDatabases, service: str
) -> None:
    duplicates_before = duplicates()
    consumer = EventConsumer(
        settings, databases, service=service, handlers={EVENT_TYPE: worker.record_effect}
    )
    async with running(consumer):
        event_id = await write_event(databases, "acme", StringValue(value="once"))
        crashing_relay = await spawn_worker(settings, "relay", failpoint="relay.after_publish")
        assert await killed_by_failpoint(crashing_relay)
        assert not await is_published(databases, "acme", event_id)
        await eventually(lambda: has_one_effect(databases, "acme", event_id))

        # A fresh relay's start-up sweep publishes the row again; the inbox absorbs it.
        async with running(OutboxRelay(settings, databases, producer="test")):
            await eventually(lambda: is_published(databases, "acme", event_id))
        await eventually(lambda: duplicates() == duplicates_before + 1)
    assert await effects_of(databases, "acme", event_id) == 1


async def test_exactly_once_when_the_consumer_dies_between_commit_and_ack(
    settings: ServiceSettings, databases: MerchantDatabases, channel: AbstractChannel, service: str
) -> None:
    crashing_consumer = await spawn_worker(
        settings, "consumer", "--service", service, failpoint="consumer.after_commit"
    )
    assert crashing_consumer.stdout is not None
    assert await asyncio.wait_for(crashing_consumer.stdout.readline(), timeout=20) == b"ready\n"

    async with running(OutboxRelay(settings, databases, producer="test")) as relay:
        event_id = await write_event(databases, "acme", StringValue(value="once"))
        relay.notify("acme")
        assert await killed_by_failpoint(crashing_consumer)
    assert await effects_of(databases, "acme", event_id) == 1

    duplicates_before = duplicates()
    consumer = EventConsumer(
        settings, databases, service=service, handlers={EVENT_TYPE: worker.record_effect}
    )
    async with running(consumer):
        await eventually(lambda: duplicates() == duplicates_before + 1)
    assert await effects_of(databases, "acme", event_id) == 1
    assert await ready_messages(channel, consumer.queue_name) == 0
