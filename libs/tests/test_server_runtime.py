"""The kit's gRPC server over real sockets: health, reflection, errors, auth, correlation
ids, JSON access logs, metrics and graceful shutdown, exercised through `KitTestService`."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from tally.kittest.v1 import kittest_pb2, kittest_pb2_grpc
from tally_kit import context as call_context
from tally_kit import interceptors
from tally_kit.auth import issue_dev_token
from tally_kit.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TallyError,
    Unauthenticated,
    Unavailable,
)
from tally_kit.logging import configure_logging
from tally_kit.server import ServiceApp, ServiceRegistration
from tally_kit.settings import ServiceSettings

SERVICE = "tally.kittest.v1.KitTestService"
SETTINGS = ServiceSettings(
    service_name="kittest",
    grpc_host="127.0.0.1",
    grpc_port=0,
    metrics_port=0,
    shutdown_grace_seconds=5.0,
)
DOMAIN = "kittest.tally"

FAILURES: dict[int, type[TallyError]] = {
    kittest_pb2.FAILURE_NOT_FOUND: NotFound,
    kittest_pb2.FAILURE_ALREADY_EXISTS: AlreadyExists,
    kittest_pb2.FAILURE_FAILED_PRECONDITION: FailedPrecondition,
    kittest_pb2.FAILURE_ABORTED: Aborted,
    kittest_pb2.FAILURE_PERMISSION_DENIED: PermissionDenied,
    kittest_pb2.FAILURE_UNAUTHENTICATED: Unauthenticated,
    kittest_pb2.FAILURE_RESOURCE_EXHAUSTED: ResourceExhausted,
    kittest_pb2.FAILURE_UNAVAILABLE: Unavailable,
}
SECRET_IN_EXCEPTION = "password=hunter2"


class KitTestServicer(kittest_pb2_grpc.KitTestServiceServicer):
    def __init__(self) -> None:
        self.finished: list[str] = []

    async def Echo(self, request: kittest_pb2.EchoRequest, context: grpc.aio.ServicerContext):
        await asyncio.sleep(request.delay_ms / 1000)
        if request.fail_with == kittest_pb2.FAILURE_UNEXPECTED:
            raise RuntimeError(f"connection failed: {SECRET_IN_EXCEPTION}")
        if request.fail_with == kittest_pb2.FAILURE_INVALID_ARGUMENT:
            raise InvalidArgument(
                [FieldViolation("text", "must not be empty"), FieldViolation("delay_ms", "too long")]
            )
        if request.fail_with:
            error_class = FAILURES[request.fail_with]
            raise error_class(
                "refused by the test", reason=f"KIT_{error_class.default_reason}", metadata={"k": "v"}
            )
        self.finished.append(request.text)
        return kittest_pb2.EchoResponse(
            text=request.text,
            correlation_id=call_context.correlation_id.get(),
            merchant_id=call_context.merchant_id.get(),
        )

    async def AdminEcho(self, request: kittest_pb2.AdminEchoRequest, context: grpc.aio.ServicerContext):
        return kittest_pb2.AdminEchoResponse(text=request.text)

    async def StreamEcho(self, request: kittest_pb2.StreamEchoRequest, context: grpc.aio.ServicerContext):
        for _ in range(request.count):
            yield kittest_pb2.StreamEchoResponse(text=request.text)

    async def Collect(self, request_iterator, context: grpc.aio.ServicerContext):
        return kittest_pb2.CollectResponse(count=len([r async for r in request_iterator]))

    async def Ping(self, request: kittest_pb2.PingRequest, context: grpc.aio.ServicerContext):
        return kittest_pb2.PingResponse()

    async def Unguarded(self, request: kittest_pb2.UnguardedRequest, context: grpc.aio.ServicerContext):
        return kittest_pb2.UnguardedResponse()


@dataclass
class Running:
    app: ServiceApp
    channel: grpc.aio.Channel
    servicer: KitTestServicer
    stub: kittest_pb2_grpc.KitTestServiceStub = field(init=False)
    health: health_pb2_grpc.HealthStub = field(init=False)

    def __post_init__(self) -> None:
        self.stub = kittest_pb2_grpc.KitTestServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)


def kit_app(servicer: KitTestServicer, settings: ServiceSettings = SETTINGS, **kwargs) -> ServiceApp:
    return ServiceApp(
        settings,
        services=[
            ServiceRegistration(SERVICE, kittest_pb2_grpc.add_KitTestServiceServicer_to_server, servicer)
        ],
        **kwargs,
    )


@pytest.fixture(scope="module")
async def running() -> AsyncIterator[Running]:
    servicer = KitTestServicer()
    app = kit_app(servicer)
    port = await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Running(app, channel, servicer)
    await channel.close()
    await app.stop()


def bearer(role: str, merchant_id: str | None = None) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {issue_dev_token(SETTINGS, role=role, merchant_id=merchant_id)}"),)


APP_ACME = bearer("app", "acme")


def error_details(
    error: grpc.aio.AioRpcError,
) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest | None]:
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status"
    infos, bad_requests = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            infos.append(error_details_pb2.ErrorInfo())
            detail.Unpack(infos[-1])
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_requests.append(error_details_pb2.BadRequest())
            detail.Unpack(bad_requests[-1])
    assert len(infos) == 1 and len(bad_requests) <= 1
    return infos[0], (bad_requests[0] if bad_requests else None)


async def call_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def stream_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    return raised.value


# Health and reflection


async def test_health_serves_overall_and_per_service_without_a_token(running: Running) -> None:
    for service in ("", SERVICE):
        response = await running.health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(running: Running) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    responses = [response async for response in call]
    names = {service.name for service in responses[0].list_services_response.service}
    assert names == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


# Error mapping


@pytest.mark.parametrize("failure", sorted(FAILURES))
async def test_each_tally_error_maps_to_its_code_reason_and_domain(running: Running, failure: int) -> None:
    error_class = FAILURES[failure]
    request = kittest_pb2.EchoRequest(merchant_id="acme", fail_with=failure)
    error = await call_error(running.stub.Echo(request, metadata=APP_ACME))
    assert error.code() == error_class.code
    assert error.details() == "refused by the test"
    info, bad_request = error_details(error)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        f"KIT_{error_class.default_reason}",
        DOMAIN,
        {"k": "v"},
    )
    assert bad_request is None


async def test_invalid_argument_names_every_field_in_bad_request(running: Running) -> None:
    request = kittest_pb2.EchoRequest(merchant_id="acme", fail_with=kittest_pb2.FAILURE_INVALID_ARGUMENT)
    error = await call_error(running.stub.Echo(request, metadata=APP_ACME))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad_request = error_details(error)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", DOMAIN)
    assert bad_request is not None
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("text", "must not be empty"),
        ("delay_ms", "too long"),
    ]


async def test_unexpected_exception_is_internal_and_leaks_nothing(running: Running, capsys) -> None:
    with json_logs():
        request = kittest_pb2.EchoRequest(merchant_id="acme", fail_with=kittest_pb2.FAILURE_UNEXPECTED)
        error = await call_error(running.stub.Echo(request, metadata=APP_ACME))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error"
    assert SECRET_IN_EXCEPTION not in str(error.trailing_metadata())
    logged = [line for line in log_lines(capsys) if line["level"] == "ERROR"]
    assert len(logged) == 1 and "RuntimeError" in logged[0]["exception"]


# Auth over the wire


async def test_missing_token_is_unauthenticated(running: Running) -> None:
    error = await call_error(running.stub.Echo(kittest_pb2.EchoRequest(merchant_id="acme")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(error)[0].reason == "TOKEN_MISSING"


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        pytest.param("Basic dXNlcjpwYXNz", "TOKEN_INVALID", id="not-bearer"),
        pytest.param(
            "Bearer "
            + issue_dev_token(
                SETTINGS.model_copy(update={"jwt_secret": SecretStr("x" * 40)}),
                role="platform",
                merchant_id=None,
            ),
            "TOKEN_INVALID",
            id="forged-signature",
        ),
        pytest.param(
            "Bearer "
            + jwt.encode(
                {"sub": "x", "role": "platform", "aud": "tally", "iss": "tally-dev", "exp": 1},
                SETTINGS.jwt_secret.get_secret_value(),
            ),
            "TOKEN_EXPIRED",
            id="expired",
        ),
        pytest.param(
            "Bearer "
            + jwt.encode(
                {"sub": "x", "role": "platform", "aud": "tally", "iss": "tally-dev", "exp": 2**40},
                None,
                algorithm="none",
            ),
            "TOKEN_INVALID",
            id="alg-none",
        ),
    ],
)
async def test_bad_tokens_are_unauthenticated(running: Running, authorization: str, reason: str) -> None:
    call = running.stub.Echo(
        kittest_pb2.EchoRequest(merchant_id="acme"), metadata=(("authorization", authorization),)
    )
    error = await call_error(call)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(error)[0].reason == reason


async def test_role_not_in_the_rpc_policy_is_permission_denied(running: Running) -> None:
    call = running.stub.AdminEcho(kittest_pb2.AdminEchoRequest(merchant_id="acme"), metadata=APP_ACME)
    error = await call_error(call)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(error)[0].reason == "ROLE_NOT_ALLOWED"
    response = await running.stub.AdminEcho(
        kittest_pb2.AdminEchoRequest(merchant_id="acme", text="hi"), metadata=bearer("admin", "acme")
    )
    assert response.text == "hi"


async def test_app_token_of_one_merchant_cannot_reach_another(running: Running) -> None:
    unary = running.stub.Echo(kittest_pb2.EchoRequest(merchant_id="globex"), metadata=APP_ACME)
    stream = running.stub.StreamEcho(
        kittest_pb2.StreamEchoRequest(merchant_id="globex", count=1), metadata=bearer("admin", "acme")
    )
    for error in (await call_error(unary), await stream_error(stream)):
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_details(error)[0].reason == "MERCHANT_MISMATCH"


@pytest.mark.parametrize("role", ["platform", "service"])
async def test_platform_and_service_tokens_act_on_any_merchant(running: Running, role: str) -> None:
    for merchant in ("acme", "globex"):
        response = await running.stub.Echo(
            kittest_pb2.EchoRequest(merchant_id=merchant, text="hi"), metadata=bearer(role)
        )
        assert response.merchant_id == merchant


async def test_rpc_without_access_policy_is_refused_for_safety(running: Running) -> None:
    error = await call_error(
        running.stub.Unguarded(kittest_pb2.UnguardedRequest(), metadata=bearer("platform"))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(error)[0].reason == "ACCESS_POLICY_MISSING"


async def test_rpc_with_empty_role_list_needs_no_token(running: Running) -> None:
    assert await running.stub.Ping(kittest_pb2.PingRequest()) == kittest_pb2.PingResponse()


async def test_client_streaming_rpcs_are_refused(running: Running) -> None:
    call = running.stub.Collect(iter([kittest_pb2.CollectRequest(text="a")]), metadata=bearer("platform"))
    error = await call_error(call)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_server_stream_is_authorized_and_streamed(running: Running) -> None:
    call = running.stub.StreamEcho(
        kittest_pb2.StreamEchoRequest(merchant_id="acme", text="hi", count=3), metadata=APP_ACME
    )
    assert [response.text async for response in call] == ["hi", "hi", "hi"]


# Correlation id and JSON logs


@contextmanager
def json_logs() -> Iterator[None]:
    """The kit's JSON logging on the (captured) stdout; the root logger is restored after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging("kittest", "INFO")
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def log_lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


async def test_given_request_id_is_echoed_and_logged(running: Running, capsys) -> None:
    metadata = (*bearer("app", "acme"), ("x-request-id", "req-42.a"))
    with json_logs():
        call = running.stub.Echo(kittest_pb2.EchoRequest(merchant_id="acme", text="hi"), metadata=metadata)
        response = await call
    assert response.correlation_id == "req-42.a"
    assert ("x-request-id", "req-42.a") in tuple(await call.trailing_metadata())
    access = [line for line in log_lines(capsys) if line["logger"] == "tally_kit.access"]
    assert len(access) == 1
    line = access[0]
    assert line["correlation_id"] == "req-42.a"
    assert line["merchant_id"] == "acme"
    assert line["service"] == "kittest"
    assert (line["grpc_method"], line["grpc_code"]) == (f"/{SERVICE}/Echo", "OK")
    assert isinstance(line["duration_ms"], float)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["ts"])


async def test_missing_or_malformed_request_id_is_generated(running: Running) -> None:
    uuid_pattern = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    seen = set()
    for extra in ((), (("x-request-id", "has spaces"),), (("x-request-id", "x" * 200),)):
        call = running.stub.Echo(
            kittest_pb2.EchoRequest(merchant_id="acme"), metadata=(*bearer("app", "acme"), *extra)
        )
        response = await call
        assert re.fullmatch(uuid_pattern, response.correlation_id)
        assert ("x-request-id", response.correlation_id) in tuple(await call.trailing_metadata())
        seen.add(response.correlation_id)
    assert len(seen) == 3


async def test_request_id_is_echoed_on_errors_too(running: Running) -> None:
    metadata = (*bearer("app", "acme"), ("x-request-id", "req-err"))
    request = kittest_pb2.EchoRequest(merchant_id="acme", fail_with=kittest_pb2.FAILURE_NOT_FOUND)
    error = await call_error(running.stub.Echo(request, metadata=metadata))
    assert ("x-request-id", "req-err") in tuple(error.trailing_metadata())


# Metrics


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def series(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


async def test_metrics_endpoint_counts_calls_by_method_and_code(running: Running) -> None:
    port = running.app.metrics_port
    assert port is not None
    before = await asyncio.to_thread(scrape, port)
    for _ in range(3):
        await running.stub.Echo(kittest_pb2.EchoRequest(merchant_id="acme"), metadata=APP_ACME)
    await call_error(running.stub.Echo(kittest_pb2.EchoRequest(merchant_id="globex"), metadata=APP_ACME))
    stream = running.stub.StreamEcho(
        kittest_pb2.StreamEchoRequest(merchant_id="acme", count=2), metadata=APP_ACME
    )
    assert len([r async for r in stream]) == 2
    after = await asyncio.to_thread(scrape, port)

    def delta(key: tuple[str, frozenset]) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    echo = {"grpc_type": "UNARY", "grpc_service": SERVICE, "grpc_method": "Echo"}
    streamed = {"grpc_type": "SERVER_STREAM", "grpc_service": SERVICE, "grpc_method": "StreamEcho"}
    assert delta(series("grpc_server_handled_total", **echo, grpc_code="OK")) == 3
    assert delta(series("grpc_server_handled_total", **echo, grpc_code="PERMISSION_DENIED")) == 1
    assert delta(series("grpc_server_started_total", **echo)) == 4
    assert delta(series("grpc_server_handling_seconds_count", **echo)) == 4
    assert delta(series("grpc_server_msg_received_total", **echo)) == 4
    assert delta(series("grpc_server_msg_sent_total", **echo)) == 3
    assert delta(series("grpc_server_handled_total", **streamed, grpc_code="OK")) == 1
    assert delta(series("grpc_server_msg_sent_total", **streamed)) == 2
    assert after[series("tally_build_info", service="kittest", version=SETTINGS.version)] == 1


# Graceful shutdown


async def test_stop_drains_finishes_in_flight_calls_then_runs_on_stop_hooks() -> None:
    servicer = KitTestServicer()
    events: list[str] = []

    async def on_start() -> None:
        events.append("on_start")

    async def on_stop() -> None:
        events.extend([f"finished before on_stop: {servicer.finished}", "on_stop"])

    app = kit_app(
        servicer,
        on_start=[on_start],
        on_stop=[on_stop],
        settings=SETTINGS.model_copy(update={"shutdown_drain_seconds": 0.3}),
    )
    port = await app.start()
    assert events == ["on_start"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = kittest_pb2_grpc.KitTestServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        slow = asyncio.ensure_future(
            stub.Echo(
                kittest_pb2.EchoRequest(merchant_id="acme", text="slow", delay_ms=700),
                metadata=bearer("platform"),
            )
        )
        await asyncio.sleep(0.2)
        stopping = asyncio.ensure_future(app.stop())
        await asyncio.sleep(0.1)
        for service in ("", SERVICE):
            response = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert (await slow).text == "slow"
        await stopping
    assert events == ["on_start", "finished before on_stop: ['slow']", "on_stop"]


async def test_a_failed_start_releases_what_the_hooks_before_it_opened() -> None:
    events: list[str] = []

    async def open_pools() -> None:
        events.append("pools opened")

    async def connect_broker() -> None:
        raise ConnectionRefusedError("broker down")

    async def close_pools() -> None:
        events.append("pools closed")

    app = kit_app(KitTestServicer(), on_start=[open_pools, connect_broker], on_stop=[close_pools])
    with pytest.raises(ConnectionRefusedError):
        await app.start()
    assert events == ["pools opened", "pools closed"]


# Per-method work done once


async def test_each_method_is_wrapped_once_however_many_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    wrapped_methods: list[str] = []
    build = interceptors._Rpc.__init__

    def counting(self: interceptors._Rpc, method: str, handler: grpc.RpcMethodHandler) -> None:
        wrapped_methods.append(method)
        build(self, method, handler)

    monkeypatch.setattr(interceptors._Rpc, "__init__", counting)
    app = kit_app(KitTestServicer())
    port = await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kittest_pb2_grpc.KitTestServiceStub(channel)
            for text in ("a", "b", "c"):
                reply = await stub.Echo(
                    kittest_pb2.EchoRequest(merchant_id="acme", text=text), metadata=APP_ACME
                )
                assert reply.text == text
            await call_error(stub.Echo(kittest_pb2.EchoRequest(merchant_id="globex"), metadata=APP_ACME))
            await stub.Ping(kittest_pb2.PingRequest(), metadata=APP_ACME)
    finally:
        await app.stop()
    assert sorted(wrapped_methods) == [f"/{SERVICE}/Echo", f"/{SERVICE}/Ping"]
