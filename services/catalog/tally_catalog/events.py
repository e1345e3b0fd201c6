"""Routing keys (`EventEnvelope.event_type`) of the events the catalog publishes.

Each names a message in `tally/catalog/v1/events.proto` carrying the full resource.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message
from tally.catalog.v1 import events_pb2

MERCHANT_CREATED = "catalog.merchant_created"
MERCHANT_CONFIG_UPDATED = "catalog.merchant_config_updated"
PRODUCT_CREATED = "catalog.product_created"
PRODUCT_ARCHIVED = "catalog.product_archived"
PRODUCT_PRICE_SCHEDULED = "catalog.product_price_scheduled"
OPERATION_TYPE_VERSION_SCHEDULED = "catalog.operation_type_version_scheduled"
SUBSCRIPTION_PLAN_CREATED = "catalog.subscription_plan_created"

# The payload message of each event type, for consumers decoding an envelope.
PAYLOAD_TYPES: Mapping[str, type[Message]] = {
    MERCHANT_CREATED: events_pb2.MerchantCreated,
    MERCHANT_CONFIG_UPDATED: events_pb2.MerchantConfigUpdated,
    PRODUCT_CREATED: events_pb2.ProductCreated,
    PRODUCT_ARCHIVED: events_pb2.ProductArchived,
    PRODUCT_PRICE_SCHEDULED: events_pb2.ProductPriceScheduled,
    OPERATION_TYPE_VERSION_SCHEDULED: events_pb2.OperationTypeVersionScheduled,
    SUBSCRIPTION_PLAN_CREATED: events_pb2.SubscriptionPlanCreated,
}
