"""What operators and tooling rely on: gRPC health, server reflection and Prometheus metrics."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tally.catalog.v1 import catalog_service_pb2 as api
from tally_catalog.testing import RPC_NAMES, SERVICE_NAME, Catalog, new_merchant_id
from tally_kit.server import ServiceApp

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def merchant_id(catalog: Catalog) -> str:
    merchant_id = new_merchant_id("ops")
    await catalog.create_merchant(merchant_id)
    return merchant_id


async def test_health_is_serving_overall_and_for_the_catalog_service(catalog: Catalog) -> None:
    health = health_pb2_grpc.HealthStub(catalog.channel)
    for service in ("", SERVICE_NAME):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health.Check(health_pb2.HealthCheckRequest(service="tally.nothing.v1.NoService"), timeout=5)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def _reflect(catalog: Catalog, request: reflection_pb2.ServerReflectionRequest):
    stub = reflection_pb2_grpc.ServerReflectionStub(catalog.channel)
    responses = [response async for response in stub.ServerReflectionInfo(iter([request]), timeout=5)]
    assert len(responses) == 1
    return responses[0]


async def test_reflection_lists_the_catalog_service_and_describes_its_rpcs(catalog: Catalog) -> None:
    listed = await _reflect(catalog, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {service.name for service in listed.list_services_response.service}
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names

    described = await _reflect(
        catalog, reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    services = [service for file in files for service in file.service if service.name == "CatalogService"]
    assert [method.name for method in services[0].method] == list(RPC_NAMES)


def _scrape(port: int) -> dict[tuple[str, str], float]:
    """`grpc_server_handled_total` of the catalog service by (method, code)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    handled: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "grpc_server_handled_total" and sample.labels["grpc_service"] == SERVICE_NAME:
                assert sample.labels["grpc_type"] == "UNARY"
                handled[sample.labels["grpc_method"], sample.labels["grpc_code"]] = sample.value
    return handled


async def test_metrics_count_each_call_by_service_method_and_code(
    catalog: Catalog, app: ServiceApp, merchant_id: str
) -> None:
    assert app.metrics_port is not None
    before = await asyncio.to_thread(_scrape, app.metrics_port)

    for _ in range(2):
        await catalog.call("GetMerchant", api.GetMerchantRequest(merchant_id=merchant_id))
    await catalog.refuse("GetMerchant", api.GetMerchantRequest(merchant_id="ghost-merchant"))
    await catalog.refuse("ListProducts", api.ListProductsRequest(merchant_id=merchant_id, page_size=-1))
    await catalog.refuse("GetMerchant", api.GetMerchantRequest(merchant_id=merchant_id), role=None)

    after = await asyncio.to_thread(_scrape, app.metrics_port)
    counted = {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}
    assert counted == {
        ("GetMerchant", "OK"): 2,
        ("GetMerchant", "NOT_FOUND"): 1,
        ("ListProducts", "INVALID_ARGUMENT"): 1,
        ("GetMerchant", "UNAUTHENTICATED"): 1,
    }
