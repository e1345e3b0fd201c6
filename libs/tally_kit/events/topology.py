"""The RabbitMQ topology of Tally events, declared in one place.

One durable topic exchange carries every event. Each consuming service owns:

- `<service>.events`: a durable quorum queue bound to the routing keys it handles;
- `<service>.dlx`: a fanout exchange its queue dead-letters into;
- `<service>.parking`: a durable quorum queue bound to that exchange, where poison
  messages are kept (never dropped) until an operator inspects and replays them.

Dead-lettering is `at-least-once` (RabbitMQ >= 3.10, quorum queues, the `stream_queue`
feature flag): the source queue keeps a rejected message until the parking queue has
confirmed it, so a broker failure during dead-lettering cannot lose it. That strategy
requires `x-overflow: reject-publish`; with no length limit set, overflow never applies.

Events no service has bound yet are not returned to the producer: the events exchange
has an alternate exchange `<exchange>.unrouted` whose quorum queue keeps them for
`UNROUTED_RETENTION_DAYS` (a service added later can be back-filled from it). The relay's
`mandatory` flag then only fires when even that queue is missing, and the event stays in
its outbox until the topology is repaired.

Queue arguments cannot change once a queue exists (a redeclaration with other values is
refused with PRECONDITION_FAILED); change a deployed delivery limit through a policy.
"""

from __future__ import annotations

from collections.abc import Iterable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, AbstractRobustConnection

from tally_kit.settings import ServiceSettings

# A robust connection retries this often after losing the broker (aio-pika's default is 5 s);
# reconnecting sooner shortens how long events wait in the outbox after a broker blip.
RECONNECT_INTERVAL_SECONDS = 1.0


async def connect(settings: ServiceSettings, name: str) -> AbstractRobustConnection:
    """A connection that reconnects by itself and restores its channels, exchanges and consumers."""
    return await aio_pika.connect_robust(
        settings.amqp_url.get_secret_value(),
        reconnect_interval=RECONNECT_INTERVAL_SECONDS,
        client_properties={"connection_name": name},
    )


def events_queue_name(service: str) -> str:
    return f"{service}.events"


def dead_letter_exchange_name(service: str) -> str:
    return f"{service}.dlx"


def parking_queue_name(service: str) -> str:
    return f"{service}.parking"


def unrouted_exchange_name(exchange: str) -> str:
    return f"{exchange}.unrouted"


def unrouted_queue_name(exchange: str) -> str:
    return f"{exchange}.unrouted"


UNROUTED_RETENTION_DAYS = 7


async def declare_events_exchange(channel: AbstractChannel, name: str) -> AbstractExchange:
    """Declare the topic exchange with its alternate exchange and the queue keeping unrouted events."""
    unrouted = await channel.declare_exchange(
        unrouted_exchange_name(name), aio_pika.ExchangeType.FANOUT, durable=True
    )
    kept = await channel.declare_queue(
        unrouted_queue_name(name),
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-message-ttl": UNROUTED_RETENTION_DAYS * 24 * 3600 * 1000,
        },
    )
    await kept.bind(unrouted)
    return await channel.declare_exchange(
        name,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": unrouted_exchange_name(name)},
    )


async def declare_consumer_topology(
    channel: AbstractChannel,
    *,
    exchange: str,
    service: str,
    routing_keys: Iterable[str],
    delivery_limit: int,
) -> AbstractQueue:
    """Declare the exchange, the service's queue, bindings, DLX and parking queue; return the queue."""
    events_exchange = await declare_events_exchange(channel, exchange)
    dead_letters = await channel.declare_exchange(
        dead_letter_exchange_name(service), aio_pika.ExchangeType.FANOUT, durable=True
    )
    parking = await channel.declare_queue(
        parking_queue_name(service), durable=True, arguments={"x-queue-type": "quorum"}
    )
    await parking.bind(dead_letters)
    queue = await channel.declare_queue(
        events_queue_name(service),
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": dead_letter_exchange_name(service),
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": delivery_limit,
        },
    )
    for routing_key in routing_keys:
        await queue.bind(events_exchange, routing_key)
    return queue
