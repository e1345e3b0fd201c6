"""Schemathesis against the gateway's own `/openapi.json`: for every operation of the services
running here (the catalog, the ledger, and the webhook's stand-in payment gateway), requests
generated from the document, with a bounded number of examples, must never get a 5xx and
every answer must match the document (status, content type, headers, body schema).

The gateway is served by uvicorn on port 0 in this process, in front of the session's real
upstreams; schemathesis (synchronous, over HTTP) runs in a worker thread so that the event
loop keeps serving. Requests carry a platform token and name the merchant created for them,
so that they reach the services rather than stop at the gateway's 403.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import AsyncIterator

import hypothesis
import pytest
import schemathesis
import uvicorn
from gateway_e2e import PAYMENTS, Upstreams, create_merchant, gateway_settings, running_gateway, token
from hypothesis import HealthCheck
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from tally_gateway.app import build_app

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 12
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Services this suite runs for real; the others' operations would meet the kit server's
# UNIMPLEMENTED (501) rather than their service.
TESTED_TAGS = ["CatalogService", "LedgerService"]
WEBHOOK_OPERATION = "PaymentGatewayService_HandleProviderWebhook_authorizeNet"


@pytest.fixture(scope="module")
async def base_url(upstreams: Upstreams) -> AsyncIterator[str]:
    app = build_app(gateway_settings(upstreams, readiness_services=[]))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, http="httptools"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not serving.done(), "uvicorn stopped during start-up"
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await serving
        sock.close()


def fuzz(base_url: str, bearer: str, merchant_id: str) -> tuple[int, collections.Counter[int], list[str]]:
    """Run every selected operation's examples: operations tried, statuses seen, failures found."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    selected = schema.include(tag=TESTED_TAGS).get_all_operations()
    webhook = schema.include(operation_id=WEBHOOK_OPERATION).get_all_operations()
    failures: list[str] = []
    statuses: collections.Counter[int] = collections.Counter()
    operations = [*selected, *webhook]
    for result in operations:
        operation = result.ok()
        fixed = {"merchant_id": merchant_id} if "{merchant_id}" in operation.path else {}

        @hypothesis.given(case=operation.as_strategy(path_parameters=fixed))
        @hypothesis.settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {bearer}"}, timeout=30)
            statuses[response.status_code] += 1
            case.validate_response(response, checks=CHECKS)

        try:
            check()
        except Exception as exc:  # every operation is tried; the failures are reported together
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    return len(operations), statuses, failures


async def test_generated_requests_get_no_5xx_and_answers_match_the_document(
    upstreams: Upstreams, base_url: str
) -> None:
    async with running_gateway(gateway_settings(upstreams, readiness_services=[])) as setup:
        merchant_id = await create_merchant(setup, "fuzz")
    bearer = token(setup.settings, "platform")
    webhooks_before = len(upstreams.payments.webhooks)
    operations, statuses, failures = await asyncio.to_thread(fuzz, base_url, bearer, merchant_id)
    assert not failures, "\n\n".join(failures)
    tested_routes = [
        route
        for route in setup.app.state.gateway.routing.routes
        if route.rpc.service.rsplit(".", 1)[-1] in TESTED_TAGS or route.operation_id == WEBHOOK_OPERATION
    ]
    assert operations == len(tested_routes) and statuses.total() >= 5 * operations
    assert statuses[200] > 0 and statuses[400] > 0
    assert len(upstreams.payments.webhooks) > webhooks_before, f"no webhook reached {PAYMENTS}"
