"""The envelope every event travels in: `tally.common.v1.EventEnvelope` around a protobuf payload."""

from __future__ import annotations

import re
import uuid

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message
from tally.common.v1.event_pb2 import EventEnvelope

from tally_kit import context

# The AMQP content type of a serialized envelope.
CONTENT_TYPE = "application/x-protobuf"

# `<service>.<event>`, e.g. `catalog.product_created`: the routing key on the events exchange.
EVENT_TYPE_PATTERN = re.compile(r"[a-z][a-z0-9-]*\.[a-z][a-z0-9_]*")


class UnknownPayloadType(Exception):
    """The envelope's payload names a message type this process has not loaded."""


def make_envelope(
    *,
    event_type: str,
    merchant_id: str,
    payload: Message,
    producer: str,
    correlation_id: str | None = None,
) -> EventEnvelope:
    """Wrap `payload` in a new envelope with a fresh event id, stamped now.

    The correlation id defaults to the current call's (`tally_kit.context.correlation_id`).
    """
    # A malformed routing key would match no binding and stay unpublished forever.
    if not EVENT_TYPE_PATTERN.fullmatch(event_type):
        raise ValueError(f"event type {event_type!r} is not `<service>.<event>`")
    envelope = EventEnvelope(
        event_id=str(uuid.uuid4()),
        event_type=event_type,
        merchant_id=merchant_id,
        correlation_id=context.correlation_id.get() if correlation_id is None else correlation_id,
        producer=producer,
    )
    envelope.occurred_at.GetCurrentTime()
    envelope.payload.Pack(payload)
    return envelope


def unpack_payload(envelope: EventEnvelope) -> Message:
    """The payload as its own message type, found by the Any's type URL in the descriptor pool.

    Raises `UnknownPayloadType` when the type's generated module has not been imported.
    """
    type_name = envelope.payload.TypeName()
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(type_name)
    except KeyError:
        raise UnknownPayloadType(f"unknown payload type {type_name!r}") from None
    payload = message_factory.GetMessageClass(descriptor)()
    envelope.payload.Unpack(payload)
    return payload
