"""The ledger's API and events follow the house conventions the gateway and the auth
interceptor rely on."""

from __future__ import annotations

from google.api import annotations_pb2
from tally.common.v1 import access_pb2
from tally.ledger.v1 import events_pb2, ledger_service_pb2
from tally.payment_gateway.v1 import events_pb2 as payment_events_pb2
from tally_ledger import events

SERVICE = ledger_service_pb2.DESCRIPTOR.services_by_name["LedgerService"]
ADMIN_ONLY = {"GrantCredits", "ApplyRefund", "ApplyChargeback", "ApplyAdjustment"}


def test_every_rpc_has_a_route_and_roles() -> None:
    for method in SERVICE.methods:
        options = method.GetOptions()
        rule = options.Extensions[annotations_pb2.http]
        assert rule.WhichOneof("pattern") in ("get", "post"), method.name
        roles = set(options.Extensions[access_pb2.access].roles)
        assert roles, method.name
        if method.name in ADMIN_ONLY:
            assert roles == {access_pb2.ROLE_ADMIN, access_pb2.ROLE_PLATFORM, access_pb2.ROLE_SERVICE}
        else:
            assert access_pb2.ROLE_APP in roles, method.name


def test_requests_name_the_merchant_first_and_mutations_carry_a_request_id() -> None:
    for method in SERVICE.methods:
        fields = method.input_type.fields_by_name
        assert fields["merchant_id"].number == 1, method.name
        mutating = method.GetOptions().Extensions[annotations_pb2.http].WhichOneof("pattern") == "post"
        assert ("request_id" in fields) == mutating, method.name


def test_every_event_message_has_a_routing_key() -> None:
    published = {payload.DESCRIPTOR.full_name for payload in events.PAYLOAD_TYPES.values()}
    assert published == {m.full_name for m in events_pb2.DESCRIPTOR.message_types_by_name.values()}
    assert all(key.startswith("ledger.") for key in events.PAYLOAD_TYPES)
    # The ledger consumes the payment gateway's captures, refunds and chargebacks (not voids
    # or failures, which move no credits).
    consumed = {payload.DESCRIPTOR.full_name for payload in events.CONSUMED_PAYLOAD_TYPES.values()}
    assert consumed == {
        payment_events_pb2.DESCRIPTOR.message_types_by_name[name].full_name
        for name in ("PaymentCaptured", "PaymentRefunded", "PaymentChargeback")
    }
    assert all(key.startswith("payment.") for key in events.CONSUMED_PAYLOAD_TYPES)
