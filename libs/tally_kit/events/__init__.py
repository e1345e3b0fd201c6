"""Tally events: envelope, transactional outbox, relay and consumer over RabbitMQ.

A producer writes events with `enqueue` in the transaction of the change they announce
and calls `OutboxRelay.notify` after the commit; a consumer runs an `EventConsumer` with
one handler per event type. See ARCHITECTURE.md section 4.
"""

from tally_kit.events.consumer import EventConsumer, Handler, is_transient
from tally_kit.events.databases import MerchantDatabases
from tally_kit.events.envelope import CONTENT_TYPE, UnknownPayloadType, make_envelope, unpack_payload
from tally_kit.events.outbox import enqueue
from tally_kit.events.relay import OutboxRelay
from tally_kit.events.topology import declare_consumer_topology, declare_events_exchange

__all__ = [
    "CONTENT_TYPE",
    "EventConsumer",
    "Handler",
    "MerchantDatabases",
    "OutboxRelay",
    "UnknownPayloadType",
    "declare_consumer_topology",
    "declare_events_exchange",
    "enqueue",
    "is_transient",
    "make_envelope",
    "unpack_payload",
]
