"""The OpenAPI document and the docs page come from the same routes as the gateway."""

from __future__ import annotations

import re
from typing import Any

import schemathesis
from tally.common.v1 import access_pb2
from tally_gateway.openapi import build_openapi, render_docs_page
from tally_gateway.routes import build_routing, discover_service_files

ROUTING = build_routing(
    discover_service_files(),
    frozenset({access_pb2.ROLE_APP, access_pb2.ROLE_ADMIN, access_pb2.ROLE_PLATFORM}),
)
DOCUMENT = build_openapi(ROUTING.routes, title="Tally HTTP API", version="9.9.9")


def _operation(method: str, path: str) -> dict[str, Any]:
    return DOCUMENT["paths"][path][method.lower()]


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(value) for value in node))
    return set()


def test_the_document_is_valid_openapi_3() -> None:
    schemathesis.openapi.from_dict(DOCUMENT).validate()
    assert DOCUMENT["openapi"].startswith("3.")
    for ref in _refs(DOCUMENT):
        node: Any = DOCUMENT
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert isinstance(node, dict), ref


def test_every_route_is_an_operation_with_its_roles_and_security() -> None:
    for route in ROUTING.routes:
        operation = _operation(route.http_method, route.template.openapi_path)
        assert operation["operationId"] == route.operation_id
        assert operation["x-tally-rpc"] == f"{route.rpc.service}/{route.rpc.name}"
        expected_roles = [access_pb2.Role.Name(r).removeprefix("ROLE_").lower() for r in sorted(route.roles)]
        assert operation["x-tally-roles"] == expected_roles
        assert operation["security"] == ([] if route.is_public else [{"bearerAuth": []}])
        path_parameters = {p["name"] for p in operation["parameters"] if p.get("in") == "path"}
        assert path_parameters == {v.field_path for v in route.template.variables}
        has_key = {"$ref": "#/components/parameters/IdempotencyKey"} in operation["parameters"]
        assert has_key == route.rpc.is_idempotent_mutation
        assert {"200", "400", "401", "403", "404", "409", "429", "503", "504", "default"} <= set(
            operation["responses"]
        )
    operation_count = sum(len(item) for item in DOCUMENT["paths"].values())
    assert operation_count == len(ROUTING.routes)


def test_schemas_follow_the_proto3_json_mapping() -> None:
    schemas = DOCUMENT["components"]["schemas"]
    merchant = schemas["tally.catalog.v1.Merchant"]["properties"]
    assert merchant["configRevision"] == {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
    assert merchant["createTime"] == {"type": "string", "format": "date-time"}
    product = schemas["tally.catalog.v1.Product"]
    assert product["properties"]["distribution"]["enum"][1] == "PRODUCT_DISTRIBUTION_SELLABLE"
    assert product["properties"]["credits"] == {"$ref": "#/components/schemas/tally.common.v1.Credits"}
    assert product["additionalProperties"] is False
    config = schemas["tally.catalog.v1.MerchantConfig"]["properties"]
    assert config["operationTimeout"]["pattern"].endswith("s$")
    assert config["retentionDays"]["type"] == "integer"
    assert schemas["tally.common.v1.Money"]["properties"]["amountMinor"]["type"] == "string"
    assert "google.rpc.Status" in schemas


def test_request_bodies_leave_out_what_the_path_binds() -> None:
    settle = _operation("POST", "/v1/merchants/{merchant_id}/orders/{order_id}:settle")
    body = settle["requestBody"]["content"]["application/json"]["schema"]
    assert "merchantId" not in body["properties"] and "orderId" not in body["properties"]
    assert {"userId", "productId", "amountPaid", "requestId"} <= set(body["properties"])
    create = _operation("POST", "/v1/merchants/{merchant_id}/products")
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/tally.catalog.v1.Product"
    }
    assert [p["name"] for p in create["parameters"] if p.get("in") == "query"] == ["requestId"]
    history = _operation("GET", "/v1/merchants/{merchant_id}/users/{user_id}/ledger")
    kinds = next(p for p in history["parameters"] if p.get("name") == "kinds")
    assert kinds["schema"]["type"] == "array" and "ENTRY_KIND_DEBIT" in kinds["schema"]["items"]["enum"]
    webhook = _operation("POST", "/v1/webhooks/authorize-net/{merchant_id}")
    assert set(webhook["requestBody"]["content"]) == {"application/octet-stream", "application/json"}
    assert webhook["security"] == [] and "requestBody" not in _operation(
        "GET", "/v1/merchants/{merchant_id}/users/{user_id}/balance"
    )


def test_the_docs_page_lists_every_operation_and_loads_nothing_from_elsewhere() -> None:
    page = render_docs_page(DOCUMENT)
    for route in ROUTING.routes:
        assert f"id='{route.operation_id}'" in page
    for name in DOCUMENT["components"]["schemas"]:
        assert f"id='schema-{name}'" in page
    assert "<script" not in page and not re.search(r"(src|href)=['\"]?(https?:)?//", page)
    assert "<code>Idempotency-Key</code>" in page
