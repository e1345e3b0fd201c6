"""Outgoing calls through `open_channel` against a real kit server: deadlines, forwarding,
retries, the circuit breaker, client metrics, and turning a callee's status back into a
TallyError."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import REGISTRY
from tally.kittest.v1 import kittest_pb2, kittest_pb2_grpc
from tally_kit import context as call_context
from tally_kit.auth import issue_dev_token
from tally_kit.clients import BreakerPolicy, RetryPolicy, open_channel
from tally_kit.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from tally_kit.server import ServiceApp, ServiceRegistration
from tally_kit.settings import ServiceSettings
from tally_kit.status import UpstreamError, error_from_rpc

SERVICE = "tally.kittest.v1.KitTestService"
SETTINGS = ServiceSettings(service_name="kittest", grpc_host="127.0.0.1", grpc_port=0, metrics_port=0)
SERVICE_TOKEN = issue_dev_token(SETTINGS, role="service", merchant_id=None, subject="ledger")
NO_RETRY = RetryPolicy(max_attempts=1)


class EchoServicer(kittest_pb2_grpc.KitTestServiceServicer):
    """Answers Echo; NOT_FOUND, INVALID_ARGUMENT and a crash on request."""

    async def Echo(self, request: kittest_pb2.EchoRequest, context: grpc.aio.ServicerContext):
        await asyncio.sleep(request.delay_ms / 1000)
        if request.fail_with == kittest_pb2.FAILURE_NOT_FOUND:
            raise NotFound("no such product", reason="PRODUCT_NOT_FOUND", metadata={"product_id": "p-1"})
        if request.fail_with == kittest_pb2.FAILURE_INVALID_ARGUMENT:
            raise InvalidArgument([FieldViolation("text", "too long")], reason="TEXT_INVALID")
        if request.fail_with == kittest_pb2.FAILURE_UNEXPECTED:
            raise RuntimeError("boom")
        return kittest_pb2.EchoResponse(
            text=request.text,
            correlation_id=call_context.correlation_id.get(),
            merchant_id=call_context.merchant_id.get(),
        )


def echo_app(port: int = 0) -> ServiceApp:
    return ServiceApp(
        SETTINGS.model_copy(update={"grpc_port": port}),
        services=[
            ServiceRegistration(
                SERVICE, kittest_pb2_grpc.add_KitTestServiceServicer_to_server, EchoServicer()
            )
        ],
    )


@pytest.fixture(scope="module")
async def server_port() -> AsyncIterator[int]:
    app = echo_app()
    port = await app.start()
    yield port
    await app.stop()


def channel_to(port: int, **options) -> grpc.aio.Channel:
    """A kit channel to the local port, with this service's own token unless told otherwise."""
    options.setdefault("service_token", lambda: SERVICE_TOKEN)
    return open_channel(f"127.0.0.1:{port}", name="kittest", **options)


def started_echo_calls() -> float:
    labels = {"grpc_type": "UNARY", "grpc_service": SERVICE, "grpc_method": "Echo"}
    return REGISTRY.get_sample_value("grpc_client_started_total", labels) or 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def echo(merchant_id: str = "acme", **fields) -> kittest_pb2.EchoRequest:
    return kittest_pb2.EchoRequest(merchant_id=merchant_id, **fields)


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


# Deadlines and forwarding


async def test_default_deadline_applies_when_the_caller_gives_none(server_port: int) -> None:
    async with channel_to(server_port, timeout_seconds=0.2) as channel:
        stub = kittest_pb2_grpc.KitTestServiceStub(channel)
        started = time.monotonic()
        error = await rpc_error(stub.Echo(echo(delay_ms=2000)))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5
        # The caller's own deadline wins over the default.
        assert (await stub.Echo(echo(text="late", delay_ms=300), timeout=2)).text == "late"


async def test_request_id_and_caller_token_are_forwarded(server_port: int) -> None:
    app_token = issue_dev_token(SETTINGS, role="app", merchant_id="acme")
    async with channel_to(server_port, service_token=None) as channel:
        stub = kittest_pb2_grpc.KitTestServiceStub(channel)
        request_id = call_context.correlation_id.set("req-forwarded")
        token = call_context.bearer_token.set(app_token)
        try:
            response = await stub.Echo(echo())
            # The forwarded app token is still bound to its merchant at the callee.
            refused = await rpc_error(stub.Echo(echo(merchant_id="globex")))
        finally:
            call_context.bearer_token.reset(token)
            call_context.correlation_id.reset(request_id)
    assert (response.correlation_id, response.merchant_id) == ("req-forwarded", "acme")
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_service_token_is_used_outside_any_incoming_call(server_port: int) -> None:
    async with channel_to(server_port, service_token=None) as channel:
        error = await rpc_error(kittest_pb2_grpc.KitTestServiceStub(channel).Echo(echo()))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    async with channel_to(server_port) as channel:
        response = await kittest_pb2_grpc.KitTestServiceStub(channel).Echo(echo(merchant_id="globex"))
        assert response.merchant_id == "globex"


# Retries


async def test_safe_call_is_retried_on_unavailable_until_the_server_comes_up() -> None:
    port = free_port()
    retry = RetryPolicy(max_attempts=30, initial_backoff_seconds=0.05, max_backoff_seconds=0.3)
    # A breaker that stays closed, so that only the retry policy is at work.
    patient = BreakerPolicy(failure_threshold=1000)
    async with channel_to(
        port, timeout_seconds=8, safe_methods={"Echo"}, retry=retry, breaker=patient
    ) as channel:
        stub = kittest_pb2_grpc.KitTestServiceStub(channel)
        call = asyncio.ensure_future(stub.Echo(echo(text="eventually")))
        await asyncio.sleep(0.5)
        assert not call.done()
        app = echo_app(port)
        await app.start()
        try:
            assert (await call).text == "eventually"
        finally:
            await app.stop()


async def test_safe_call_gives_up_after_its_attempts_with_the_last_error() -> None:
    port = free_port()
    labels = {"grpc_type": "UNARY", "grpc_service": SERVICE, "grpc_method": "Echo"}
    before = REGISTRY.get_sample_value("grpc_client_started_total", labels) or 0
    retry = RetryPolicy(max_attempts=3, initial_backoff_seconds=0.01, max_backoff_seconds=0.02)
    patient = BreakerPolicy(failure_threshold=1000)
    async with channel_to(port, safe_methods={"Echo"}, retry=retry, breaker=patient) as channel:
        error = await rpc_error(kittest_pb2_grpc.KitTestServiceStub(channel).Echo(echo(text="nobody")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert REGISTRY.get_sample_value("grpc_client_started_total", labels) - before == 3


async def test_unsafe_call_is_not_retried() -> None:
    port = free_port()
    attempts = REGISTRY.get_sample_value(
        "grpc_client_started_total", {"grpc_type": "UNARY", "grpc_service": SERVICE, "grpc_method": "Ping"}
    )
    async with channel_to(port, safe_methods={"Echo"}) as channel:
        error = await rpc_error(kittest_pb2_grpc.KitTestServiceStub(channel).Ping(kittest_pb2.PingRequest()))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    after = REGISTRY.get_sample_value(
        "grpc_client_started_total", {"grpc_type": "UNARY", "grpc_service": SERVICE, "grpc_method": "Ping"}
    )
    assert after - (attempts or 0) == 1


# Circuit breaker


async def test_breaker_opens_after_repeated_outages_and_fails_fast() -> None:
    port = free_port()
    breaker = BreakerPolicy(failure_threshold=3, reset_timeout_seconds=0.5)
    async with channel_to(port, retry=NO_RETRY, breaker=breaker) as channel:
        stub = kittest_pb2_grpc.KitTestServiceStub(channel)
        for _ in range(3):
            assert (await rpc_error(stub.Echo(echo()))).code() == grpc.StatusCode.UNAVAILABLE
        attempts = started_echo_calls()
        with pytest.raises(Unavailable) as raised:
            await stub.Echo(echo())
        assert raised.value.reason == "CIRCUIT_OPEN"
        assert started_echo_calls() == attempts, "an open circuit sends nothing"

        # Once the callee is back and the reset timeout has passed, a trial call closes the circuit.
        app = echo_app(port)
        await app.start()
        try:
            await asyncio.sleep(0.6)
            assert (await stub.Echo(echo(text="back"), wait_for_ready=True)).text == "back"
            assert (await stub.Echo(echo(text="again"))).text == "again"
        finally:
            await app.stop()


async def test_answers_that_are_not_outages_do_not_open_the_breaker(server_port: int) -> None:
    breaker = BreakerPolicy(failure_threshold=2, reset_timeout_seconds=30)
    async with channel_to(server_port, breaker=breaker) as channel:
        stub = kittest_pb2_grpc.KitTestServiceStub(channel)
        for _ in range(4):
            error = await rpc_error(stub.Echo(echo(fail_with=kittest_pb2.FAILURE_NOT_FOUND)))
            assert error.code() == grpc.StatusCode.NOT_FOUND


# Client metrics


async def test_client_metrics_count_each_call_by_code(server_port: int) -> None:
    labels = {"grpc_type": "UNARY", "grpc_service": SERVICE, "grpc_method": "Echo"}

    def sample(name: str, **extra: str) -> float:
        return REGISTRY.get_sample_value(name, {**labels, **extra}) or 0.0

    ok_before, not_found_before = (
        sample("grpc_client_handled_total", grpc_code="OK"),
        sample("grpc_client_handled_total", grpc_code="NOT_FOUND"),
    )
    seconds_before = sample("grpc_client_handling_seconds_count")
    async with channel_to(server_port) as channel:
        stub = kittest_pb2_grpc.KitTestServiceStub(channel)
        await stub.Echo(echo())
        await stub.Echo(echo())
        await rpc_error(stub.Echo(echo(fail_with=kittest_pb2.FAILURE_NOT_FOUND)))
    assert sample("grpc_client_handled_total", grpc_code="OK") - ok_before == 2
    assert sample("grpc_client_handled_total", grpc_code="NOT_FOUND") - not_found_before == 1
    assert sample("grpc_client_handling_seconds_count") - seconds_before == 3


# A callee's status back into a TallyError


async def test_callee_errors_become_the_matching_tally_error(server_port: int) -> None:
    async with channel_to(server_port) as channel:
        stub = kittest_pb2_grpc.KitTestServiceStub(channel)
        not_found, invalid, internal = [
            error_from_rpc(await rpc_error(stub.Echo(echo(fail_with=failure))))
            for failure in (
                kittest_pb2.FAILURE_NOT_FOUND,
                kittest_pb2.FAILURE_INVALID_ARGUMENT,
                kittest_pb2.FAILURE_UNEXPECTED,
            )
        ]
    assert isinstance(not_found, NotFound)
    assert (not_found.reason, not_found.message, not_found.metadata) == (
        "PRODUCT_NOT_FOUND",
        "no such product",
        {"product_id": "p-1"},
    )
    assert isinstance(invalid, InvalidArgument)
    assert (invalid.reason, invalid.violations) == ("TEXT_INVALID", [FieldViolation("text", "too long")])
    assert isinstance(internal, UpstreamError)
    assert (internal.code, internal.reason, internal.message) == (
        grpc.StatusCode.INTERNAL,
        "INTERNAL",
        "internal error",
    )


async def test_transport_failure_becomes_unavailable() -> None:
    async with channel_to(free_port(), retry=NO_RETRY) as channel:
        error = error_from_rpc(await rpc_error(kittest_pb2_grpc.KitTestServiceStub(channel).Echo(echo())))
    assert isinstance(error, Unavailable)
    assert error.reason == "UNAVAILABLE"
