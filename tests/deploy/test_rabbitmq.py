"""RabbitMQ definitions agree with the topology the kit declares (tally_kit/events/topology.py).

The services declare their exchange and queues themselves; definitions.json pre-declares them on
a fresh broker. RabbitMQ refuses a redeclaration whose arguments differ (PRECONDITION_FAILED), so
every queue here must carry exactly the kit's arguments.
"""

from __future__ import annotations

import json
import re
from typing import Any, cast

from pydantic_settings import BaseSettings
from tally_kit.events.topology import UNROUTED_RETENTION_DAYS, unrouted_exchange_name, unrouted_queue_name
from tally_ledger.handlers import PaymentEventHandlers
from tally_ledger.settings import LedgerSettings
from tally_payment_gateway import handlers as payment_gateway_handlers
from tally_payment_gateway.settings import PaymentGatewaySettings
from tally_receipt.handlers import LedgerEventHandlers
from tally_receipt.settings import ReceiptSettings

from .conftest import DEPLOY, REPO

DEFINITIONS = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
SETTINGS = (REPO / "libs" / "tally_kit" / "settings.py").read_text()


def _default(settings: type[BaseSettings], field: str) -> Any:
    return settings.model_fields[field].default


# Every consuming service by package, as compose runs it (no database prefix): its queue
# prefix, the routing keys its consumer binds (the keys of its handler table; building the
# table only names the handlers' bound methods, so no collaborator is needed) and its
# delivery limit.
CONSUMERS: dict[str, tuple[str, set[str], int]] = {
    "tally_ledger": (
        _default(LedgerSettings, "consumer_name"),
        set(PaymentEventHandlers(cast(Any, None)).handlers()),
        _default(LedgerSettings, "consumer_delivery_limit"),
    ),
    "tally_receipt": (
        _default(ReceiptSettings, "consumer_name"),
        set(LedgerEventHandlers(cast(Any, None)).by_event_type()),
        _default(ReceiptSettings, "consumer_delivery_limit"),
    ),
    "tally_payment_gateway": (
        payment_gateway_handlers.CONSUMER,
        set(payment_gateway_handlers.NotificationHandler(cast(Any, None), clock=cast(Any, None)).handlers()),
        _default(PaymentGatewaySettings, "consumer_delivery_limit"),
    ),
}
QUEUE_PREFIXES = {prefix: (keys, limit) for prefix, keys, limit in CONSUMERS.values()}


def _setting_default(name: str) -> str:
    match = re.search(rf"^\s+{name}: \w+ = (?:Field\()?\"?([^,\")]+)", SETTINGS, re.MULTILINE)
    assert match is not None, f"{name} is not a ServiceSettings field"
    return match.group(1)


def _by_name(kind: str) -> dict[str, dict]:
    return {item["name"]: item for item in DEFINITIONS[kind]}


def test_the_events_exchange_is_the_durable_topic_exchange_services_publish_to() -> None:
    name = _setting_default("events_exchange")
    exchange = _by_name("exchanges")[name]
    assert exchange == {
        "name": "tally.events",
        "vhost": "/",
        "type": "topic",
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": {"alternate-exchange": unrouted_exchange_name(name)},
    }


def test_events_no_service_consumes_are_kept_in_the_unrouted_queue_the_kit_declares() -> None:
    name = _setting_default("events_exchange")
    unrouted = _by_name("exchanges")[unrouted_exchange_name(name)]
    assert (unrouted["type"], unrouted["durable"]) == ("fanout", True)
    kept = _by_name("queues")[unrouted_queue_name(name)]
    assert kept["durable"] and not kept["auto_delete"]
    assert kept["arguments"] == {
        "x-queue-type": "quorum",
        "x-message-ttl": UNROUTED_RETENTION_DAYS * 24 * 3600 * 1000,
    }
    assert {"source": unrouted["name"], "destination": kept["name"]}.items() <= next(
        b for b in DEFINITIONS["bindings"] if b["source"] == unrouted["name"]
    ).items()


def test_each_consumer_queue_dead_letters_into_its_parking_queue_with_the_kits_arguments() -> None:
    exchanges = _by_name("exchanges")
    queues = _by_name("queues")
    bindings = {(b["source"], b["destination"]) for b in DEFINITIONS["bindings"]}
    for name, queue in queues.items():
        if name == unrouted_queue_name(_setting_default("events_exchange")):
            continue
        service, _, role = name.partition(".")
        assert role in {"events", "parking"}, f"{name}: queues are <service>.events or <service>.parking"
        assert service in QUEUE_PREFIXES, f"{name}: {service} is no consuming service"
        assert queue["durable"] and not queue["auto_delete"], name
        if role == "parking":
            assert queue["arguments"] == {"x-queue-type": "quorum"}, name
            assert (f"{service}.dlx", name) in bindings, f"{name} is not bound to {service}.dlx"
            continue
        _routing_keys, delivery_limit = QUEUE_PREFIXES[service]
        assert queue["arguments"] == {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": f"{service}.dlx",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": delivery_limit,
        }, name
        assert f"{service}.parking" in queues, f"{name} has no parking queue"
        dlx = exchanges[f"{service}.dlx"]
        assert (dlx["type"], dlx["durable"]) == ("fanout", True)
        assert any(source == "tally.events" and dest == name for source, dest in bindings), (
            f"{name} is bound to no routing key of tally.events"
        )


def test_every_service_that_consumes_events_is_listed_here() -> None:
    consuming = {
        source.parent.name
        for source in (REPO / "services").glob("*/tally_*/*.py")
        if "EventConsumer(" in source.read_text()
    }
    assert consuming == set(CONSUMERS)


def test_every_consumer_has_its_queue_bound_to_exactly_the_events_it_handles() -> None:
    queues = _by_name("queues")
    exchange = _setting_default("events_exchange")
    for service, (routing_keys, _delivery_limit) in QUEUE_PREFIXES.items():
        assert {f"{service}.events", f"{service}.parking"} <= set(queues), service
        bound = {
            binding["routing_key"]
            for binding in DEFINITIONS["bindings"]
            if binding["source"] == exchange and binding["destination"] == f"{service}.events"
        }
        assert bound == routing_keys, service
    assert all(
        binding["destination_type"] == "queue" and binding["arguments"] == {}
        for binding in DEFINITIONS["bindings"]
    )


def test_definitions_carry_no_users_or_credentials() -> None:
    assert "users" not in DEFINITIONS and "permissions" not in DEFINITIONS
    assert not re.search(r"password", json.dumps(DEFINITIONS), re.IGNORECASE)


def test_broker_config_does_not_import_definitions_at_boot() -> None:
    # A boot-time import stops RabbitMQ from seeding RABBITMQ_DEFAULT_USER, the only user there is.
    config = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text()
    settings = [
        line.split("=", 1)[0].strip() for line in config.splitlines() if "=" in line and line[0] != "#"
    ]
    assert "load_definitions" not in settings and "definitions.local.path" not in settings
    assert settings, "the file configures the broker"
