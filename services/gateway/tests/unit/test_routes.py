"""Routes from the annotations: template parsing and matching, discovery, what is left out."""

from __future__ import annotations

import pytest
from google.api import annotations_pb2
from tally.common.v1 import access_pb2
from tally.kittest.v1 import kittest_pb2
from tally_gateway.routes import (
    EDGE_ALIASES,
    MethodNotAllowed,
    RouteAlias,
    RouteError,
    RouteTable,
    build_routing,
    discover_service_files,
    parse_template,
)
from tally_kit.errors import NotFound

EDGE_ROLES = frozenset({access_pb2.ROLE_APP, access_pb2.ROLE_ADMIN, access_pb2.ROLE_PLATFORM})
SERVICE_FILES = discover_service_files()


def test_a_template_binds_its_variables_and_keeps_its_verb() -> None:
    template = parse_template("/v1/merchants/{merchant_id}/products/{product_id}:archive")
    assert template.verb == "archive"
    assert template.openapi_path == "/v1/merchants/{merchant_id}/products/{product_id}:archive"
    assert template.match("/v1/merchants/acme/products/p-1:archive") == {
        "merchant_id": "acme",
        "product_id": "p-1",
    }
    assert template.match("/v1/merchants/acme/products/p-1") is None
    assert template.match("/v1/merchants/acme/products/p-1:archive/more") is None


def test_single_segment_values_are_decoded_and_multi_segment_ones_keep_their_slashes() -> None:
    single = parse_template("/v1/users/{user_id}")
    assert single.match("/v1/users/a%2Fb%20c%3Ad") == {"user_id": "a/b c:d"}
    assert single.match("/v1/users/a/b") is None
    multi = parse_template("/v1/{name=shelves/*/books/**}:read")
    assert multi.segment_count is None and multi.variables[0].multi_segment
    assert multi.match("/v1/shelves/s1/books/b%2F1/p%20a:read") == {"name": "shelves/s1/books/b%2F1/p a"}
    assert multi.match("/v1/shelves/s1/books:read") is None


@pytest.mark.parametrize(
    "text",
    [
        "v1/no-leading-slash",
        "/v1/{unclosed",
        "/v1/{a}/{a}",
        "/v1/{1bad}",
        "/v1/sp ace",
        "/v1/{a}:bad verb",
    ],
)
def test_malformed_templates_are_refused(text: str) -> None:
    with pytest.raises(RouteError):
        parse_template(text)


def test_the_table_prefers_a_verb_and_says_which_methods_a_path_allows() -> None:
    routing = build_routing(SERVICE_FILES, EDGE_ROLES)
    table = RouteTable(routing.routes)
    route, bindings = table.match("GET", "/v1/merchants/acme/receipts/r-1:renderPdf")
    assert route.rpc.name == "RenderReceiptPdf" and bindings == {"merchant_id": "acme", "receipt_id": "r-1"}
    route, bindings = table.match("GET", "/v1/merchants/acme/receipts/r-1")
    assert route.rpc.name == "GetReceipt"
    with pytest.raises(MethodNotAllowed) as refused:
        table.match("DELETE", "/v1/merchants/acme/products")
    assert refused.value.allowed == ("GET", "POST")
    with pytest.raises(NotFound) as missing:
        table.match("GET", "/v1/merchants/acme/nothing-here")
    assert missing.value.reason == "ROUTE_NOT_FOUND"
    with pytest.raises(RouteError):
        RouteTable([*routing.routes, routing.routes[0]])


def test_every_annotated_rpc_of_every_service_is_routed_once_per_binding() -> None:
    packages = {file.package for file in SERVICE_FILES}
    assert {"tally.catalog.v1", "tally.ledger.v1", "tally.payment_gateway.v1", "tally.receipt.v1"} <= packages
    assert "tally.kittest.v1" not in packages  # only *_service_pb2 modules are served
    expected = set()
    for file in SERVICE_FILES:
        for service in file.services_by_name.values():
            for method in service.methods:
                rule = method.GetOptions().Extensions[annotations_pb2.http]
                for binding in [rule, *rule.additional_bindings]:
                    kind = binding.WhichOneof("pattern")
                    if kind:
                        expected.add(
                            (kind.upper(), getattr(binding, kind), f"{service.full_name}/{method.name}")
                        )
    routing = build_routing(SERVICE_FILES, EDGE_ROLES)
    routed = {
        (r.http_method, r.template.text, f"{r.rpc.service}/{r.rpc.name}")
        for r in routing.routes
        if not r.constants
    }
    assert routed == expected and routing.skipped == ()
    assert len({r.operation_id for r in routing.routes}) == len(routing.routes)


def test_the_authorize_net_webhook_url_is_an_alias_of_the_webhook_rpc() -> None:
    routing = build_routing(SERVICE_FILES, EDGE_ROLES)
    [alias] = [r for r in routing.routes if r.constants]
    assert (alias.http_method, alias.template.text) == ("POST", "/v1/webhooks/authorize-net/{merchant_id}")
    assert alias.rpc.name == "HandleProviderWebhook" and dict(alias.constants) == {
        "provider": "authorize_net"
    }
    assert alias.is_public and alias.body == "body"
    assert alias.path_fields == {"merchant_id", "provider"}


def test_streaming_unguarded_and_unreachable_rpcs_are_left_out() -> None:
    routing = build_routing([kittest_pb2.DESCRIPTOR], frozenset({access_pb2.ROLE_APP}), aliases=())
    assert {f"{r.rpc.name}" for r in routing.routes} == {"Echo", "Ping"}
    reasons = dict(routing.skipped)
    assert reasons == {
        "tally.kittest.v1.KitTestService/StreamEcho": "streaming RPCs are not transcoded",
        "tally.kittest.v1.KitTestService/Collect": "streaming RPCs are not transcoded",
        "tally.kittest.v1.KitTestService/Unguarded": "no (tally.common.v1.access) policy",
        "tally.kittest.v1.KitTestService/AdminEcho": "no role the edge accepts may call it",
    }
    # The edge's roles are what the route accepts: `service`, allowed by the RPC, is not.
    echo = next(r for r in routing.routes if r.rpc.name == "Echo")
    assert echo.roles == {access_pb2.ROLE_APP}
    assert echo.rpc.declared_roles >= {access_pb2.ROLE_APP, access_pb2.ROLE_SERVICE}
    ping = next(r for r in routing.routes if r.rpc.name == "Ping")
    assert ping.is_public


def test_aliases_must_name_fields_that_exist_and_routed_rpcs() -> None:
    echo = "tally.kittest.v1.KitTestService/Echo"
    broken = RouteAlias("broken", "POST", "/v1/x/{nope}", echo, body="*", constants={})
    with pytest.raises(RouteError, match="nope"):
        build_routing([kittest_pb2.DESCRIPTOR], EDGE_ROLES, aliases=[broken])
    constant_not_a_string = RouteAlias(
        "c", "POST", "/v1/x/{merchant_id}", echo, body="", constants={"delay_ms": "1"}
    )
    with pytest.raises(RouteError, match="delay_ms"):
        build_routing([kittest_pb2.DESCRIPTOR], EDGE_ROLES, aliases=[constant_not_a_string])
    routing = build_routing([kittest_pb2.DESCRIPTOR], EDGE_ROLES, aliases=EDGE_ALIASES)
    assert (
        "/v1/webhooks/authorize-net/{merchant_id}",
        f"{EDGE_ALIASES[0].rpc} is not routed",
    ) in routing.skipped
