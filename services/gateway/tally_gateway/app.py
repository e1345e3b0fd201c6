"""The gateway's Starlette app: the routed API, health, readiness, metrics, OpenAPI and docs.

    app = build_app(GatewaySettings())      # routes from every *_service_pb2 under `tally`
    uvicorn.run(app, ...)                   # its lifespan opens and closes the upstream channels

One API request goes: rate limit by client address → match a route → verify the bearer
token (when the route needs one, or one is sent) → rate limit by token → refuse a role or
a merchant the route does not allow (before the body is read) → read the body
(size-limited) → build the request message → check the merchant it names → call the
upstream with a deadline, forwarding the token and the request id → answer in JSON. Every
refusal is a `google.rpc.Status` body (see `transcoding`). The upstream checks the token
again.

Every response carries `X-Request-Id` (the caller's when well-formed, else a new UUID); it
is the correlation id of the upstream call and of the access log line, which also names the
`Idempotency-Key`. Metrics: `http_requests_total{method,route,code}` and
`http_request_duration_seconds{method,route}`, `route` being the path template (never a
raw path), plus the kit's `grpc_client_*` for the upstream calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import grpc
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route as StarletteRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage
from tally_kit import context
from tally_kit.auth import ROLE_BY_CLAIM, TokenVerifier, authorize
from tally_kit.clients import open_channel
from tally_kit.errors import (
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    TallyError,
    Unauthenticated,
)
from tally_kit.metrics import record_build_info

from tally_gateway.openapi import build_openapi, render_docs_page
from tally_gateway.ratelimit import TokenBuckets
from tally_gateway.routes import (
    MethodNotAllowed,
    Route,
    RouteTable,
    Routing,
    build_routing,
    discover_service_files,
    service_label,
)
from tally_gateway.settings import GatewaySettings
from tally_gateway.transcoding import (
    MERCHANT_FIELD,
    PayloadTooLarge,
    RequestTranscoder,
    encode_response,
    encode_status,
    status_of_error,
    status_of_rpc_error,
)

log = logging.getLogger(__name__)
access_log = logging.getLogger("tally_gateway.access")

API_TITLE = "Tally HTTP API"
REQUEST_ID_HEADER = b"x-request-id"
# A caller's request id is copied into logs and upstream calls: anything else is replaced.
_REQUEST_ID_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
_REQUEST_ID_MAX_LENGTH = 128
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
_UNMATCHED_ROUTE = "unmatched"
# The status a request gets in metrics and logs when its client left before the answer.
_CLIENT_CLOSED = 499

http_requests = Counter("http_requests_total", "HTTP requests answered.", ("method", "route", "code"))
http_request_duration = Histogram(
    "http_request_duration_seconds",
    "Time from receiving an HTTP request to answering it.",
    ("method", "route"),
)


class RateLimited(ResourceExhausted):
    def __init__(self, retry_after_seconds: float, limit: str) -> None:
        super().__init__(
            f"too many requests for this {limit}; retry after {retry_after_seconds:.3f} s",
            reason="RATE_LIMITED",
            metadata={"limit": limit},
        )
        self.retry_after_seconds = retry_after_seconds


class _ClientGone(Exception):
    """The client disconnected before its body was read."""


@dataclass
class _Exchange:
    """One HTTP request in flight: what the middleware logs and counts once it is answered."""

    request_id: str
    idempotency_key: str | None
    authorization: str | None
    content_type: str | None
    content_length: int | None
    route: str = ""
    grpc_method: str = ""
    status: int = _CLIENT_CLOSED
    reason: str = ""


@dataclass(frozen=True)
class _Endpoint:
    route: Route
    transcoder: RequestTranscoder
    call: grpc.aio.UnaryUnaryMultiCallable


class Gateway:
    """What a running gateway holds: routes, upstream channels, the token verifier, limiters."""

    def __init__(self, settings: GatewaySettings, routing: Routing) -> None:
        self.settings = settings
        self.routing = routing
        self.table = RouteTable(routing.routes)
        routed_services = {route.rpc.service for route in routing.routes}
        self.readiness_services = tuple(settings.readiness_services or sorted(routed_services))
        missing = (routed_services | set(self.readiness_services)) - set(settings.upstreams)
        if missing:
            raise ValueError(f"no upstream target for {sorted(missing)}: set GATEWAY_UPSTREAMS")
        self._services = sorted(routed_services | set(self.readiness_services))
        self._edge_roles = frozenset(ROLE_BY_CLAIM[name] for name in settings.edge_roles)
        self._verifier = TokenVerifier(settings)
        self._by_address = TokenBuckets(
            settings.rate_limit_address_per_second,
            settings.rate_limit_address_burst,
            max_keys=settings.rate_limit_max_keys,
        )
        self._by_token = TokenBuckets(
            settings.rate_limit_token_per_second,
            settings.rate_limit_token_burst,
            max_keys=settings.rate_limit_max_keys,
        )
        self._transcoders = {route: RequestTranscoder(route) for route in routing.routes}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._endpoints: dict[Route, _Endpoint] = {}

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        """Open a channel per upstream service for the life of the block."""
        if self._channels:
            raise RuntimeError("the gateway is already running")
        for service in self._services:
            self._channels[service] = open_channel(
                self.settings.upstreams[service],
                name=service_label(service),
                timeout_seconds=self.settings.upstream_timeout_seconds,
                safe_methods=self._safe_methods(service),
            )
        for route, transcoder in self._transcoders.items():
            rpc = route.rpc
            call = self._channels[rpc.service].unary_unary(
                rpc.full_method,
                request_serializer=rpc.request_type.SerializeToString,
                response_deserializer=rpc.response_type.FromString,
            )
            self._endpoints[route] = _Endpoint(route, transcoder, call)
        record_build_info(self.settings.service_name, self.settings.version)
        log.info(
            "gateway ready",
            extra={
                "routes": len(self._endpoints),
                "upstreams": {s: self.settings.upstreams[s] for s in self._services},
            },
        )
        try:
            yield self
        finally:
            channels, self._channels = self._channels, {}
            self._endpoints = {}
            await asyncio.gather(*(channel.close() for channel in channels.values()))

    def _safe_methods(self, service: str) -> set[str]:
        """RPCs repeated on UNAVAILABLE: reads (bound to GET) and mutations with a request_id."""
        return {
            route.rpc.name
            for route in self.routing.routes
            if route.rpc.service == service
            and (route.http_method == "GET" or route.rpc.is_idempotent_mutation)
        }

    async def readiness(self) -> dict[str, str]:
        """Each readiness service's health: `SERVING`, another health status, or the call's failure."""
        answers = await asyncio.gather(*(self._health(service) for service in self.readiness_services))
        return dict(zip(self.readiness_services, answers, strict=True))

    async def _health(self, service: str) -> str:
        check = self._channels[service].unary_unary(
            _HEALTH_CHECK_METHOD,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            answer = await check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self.settings.readiness_timeout_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        except TallyError as exc:
            return exc.reason
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    async def answer(self, exchange: _Exchange, scope: Scope, receive: Receive) -> tuple[int, bytes, str]:
        """Serve one API request: (HTTP status, body, media type). Raises TallyError to refuse."""
        client = scope.get("client")
        # Taken before the route is known: requests for no route count against their address too.
        wait = self._by_address.take(client[0] if client else "")
        route, bindings = self.table.match(scope["method"], _raw_path(scope))
        endpoint = self._endpoints[route]
        exchange.route = route.template.text
        exchange.grpc_method = route.rpc.full_method
        if wait:
            raise RateLimited(wait, "address")
        principal = None
        token = _bearer_token(exchange.authorization)
        if token is None and not route.is_public:
            raise Unauthenticated("a bearer token is required", reason="TOKEN_MISSING")
        if token is not None:
            principal = await self._verifier.verify_async(token)
            if principal.role not in self._edge_roles:
                raise PermissionDenied(
                    f"{principal.role_name} tokens are not accepted here", reason="ROLE_NOT_ALLOWED"
                )
            wait = self._by_token.take(token)
            if wait:
                raise RateLimited(wait, "token")
            context.bearer_token.set(token)
            if not route.is_public:
                # Before the body is read: a caller learns nothing of what it may not call.
                authorize(principal, route.roles, bindings.get(MERCHANT_FIELD))
        body = await _read_body(receive, self.settings.max_request_bytes, exchange.content_length)
        request = endpoint.transcoder.build(
            path_bindings=bindings,
            query=_query_pairs(scope),
            body=body,
            content_type=exchange.content_type,
            headers=scope["headers"],
            idempotency_key=exchange.idempotency_key,
        )
        merchant_id = endpoint.transcoder.merchant_of(request)
        if merchant_id:
            context.merchant_id.set(merchant_id)
            if principal is not None and not route.is_public:
                # The body or the query may name the merchant where the path does not.
                authorize(principal, route.roles, merchant_id)
        try:
            response = await endpoint.call(request)
        except grpc.aio.AioRpcError as exc:
            status, rpc_status = status_of_rpc_error(exc, route.rpc.service)
            exchange.reason = _reason_of(rpc_status)
            return status, encode_status(rpc_status), "application/json"
        body, media_type = encode_response(route, response)
        return 200, body, media_type


def _raw_path(scope: Scope) -> str:
    raw = scope.get("raw_path")
    if raw:
        return raw.decode("latin-1").split("?", 1)[0]
    return scope["path"]


def _query_pairs(scope: Scope) -> list[tuple[str, str]]:
    query = scope.get("query_string", b"")
    if not query:
        return []
    try:
        return parse_qsl(query.decode("latin-1"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise InvalidArgument([FieldViolation("query", "is not percent-encoded UTF-8")]) from None


def _bearer_token(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization must be 'Bearer <token>'", reason="TOKEN_INVALID")
    return token.strip()


async def _read_body(receive: Receive, limit: int, declared: int | None) -> bytes:
    if declared is not None and declared > limit:
        raise PayloadTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _reason_of(status: status_pb2.Status) -> str:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


# --- ASGI -------------------------------------------------------------------------------------


class ApiEndpoint:
    """The ASGI app of every routed operation; refusals become `google.rpc.Status` bodies."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange: _Exchange = scope["tally.exchange"]
        headers: list[tuple[bytes, bytes]] = [(b"cache-control", b"no-store")]
        try:
            status, body, media_type = await self._gateway.answer(exchange, scope, receive)
        except _ClientGone:
            return
        except TallyError as exc:
            status, rpc_status = status_of_error(exc)
            if isinstance(exc, RateLimited):
                retry = error_details_pb2.RetryInfo(retry_delay=_duration(exc.retry_after_seconds))
                rpc_status.details.add().Pack(retry)
            body, media_type = encode_status(rpc_status), "application/json"
            exchange.reason = exc.reason
            headers.extend(_refusal_headers(exc))
        except Exception:
            log.exception("unexpected error serving %s", exchange.route or _raw_path(scope))
            status, body, media_type = 500, encode_status(_internal_status()), "application/json"
            exchange.reason = "INTERNAL"
        headers.append((b"content-type", media_type.encode("latin-1")))
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _refusal_headers(error: TallyError) -> Iterable[tuple[bytes, bytes]]:
    if isinstance(error, RateLimited):
        yield b"retry-after", str(max(1, math.ceil(error.retry_after_seconds))).encode()
    elif isinstance(error, MethodNotAllowed):
        yield b"allow", ", ".join(error.allowed).encode()
    elif isinstance(error, Unauthenticated):
        challenge = 'Bearer realm="tally"'
        if error.reason != "TOKEN_MISSING":
            challenge += ', error="invalid_token"'
        yield b"www-authenticate", challenge.encode()


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(math.ceil(seconds * 1e9))
    return duration


def _internal_status() -> status_pb2.Status:
    return status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")


class RequestContextMiddleware:
    """Per request: the request id, the call context, `X-Request-Id` on the answer, the
    `http_*` metrics and one access log line. It also dispatches: the site's few pages go on
    through Starlette's router, every other path straight to `api`, which has a router of
    its own (`RouteTable`) and would gain nothing from a second one."""

    def __init__(self, app: ASGIApp, api: ASGIApp, site_paths: frozenset[str]) -> None:
        self._app = app
        self._api = api
        self._site_paths = site_paths
        # (method, route, code) → bound counter; (method, route) → bound histogram
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        exchange = _exchange_of(scope)
        scope["tally.exchange"] = exchange
        request_id_header = (REQUEST_ID_HEADER, exchange.request_id.encode())
        resets = (
            context.correlation_id.set(exchange.request_id),
            context.bearer_token.set(""),
            context.merchant_id.set(""),
        )

        async def send_with_request_id(message: AsgiMessage) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                message["headers"] = [*message.get("headers", ()), request_id_header]
            await send(message)

        try:
            inner = self._app if scope["path"] in self._site_paths else self._api
            await inner(scope, receive, send_with_request_id)
        finally:
            self._observe(scope, exchange, time.perf_counter() - started)
            for var, token in zip(
                (context.correlation_id, context.bearer_token, context.merchant_id), resets, strict=True
            ):
                var.reset(token)

    def _observe(self, scope: Scope, exchange: _Exchange, elapsed: float) -> None:
        method = scope["method"] if scope["method"] in _KNOWN_METHODS else "other"
        route = exchange.route or (scope["path"] if scope["path"] in self._site_paths else _UNMATCHED_ROUTE)
        counter_key = (method, route, exchange.status)
        counter = self._counters.get(counter_key)
        if counter is None:
            counter = self._counters[counter_key] = http_requests.labels(method, route, str(exchange.status))
        counter.inc()
        histogram = self._histograms.get((method, route))
        if histogram is None:
            histogram = self._histograms[method, route] = http_request_duration.labels(method, route)
        histogram.observe(elapsed)
        if not access_log.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        fields: dict[str, Any] = {
            "http_method": scope["method"],
            "path": scope["path"],
            "route": route,
            "status": exchange.status,
            "duration_ms": round(elapsed * 1000, 3),
            "client_address": client[0] if client else "",
        }
        if exchange.grpc_method:
            fields["grpc_method"] = exchange.grpc_method
        if exchange.idempotency_key:
            fields["idempotency_key"] = exchange.idempotency_key
        if exchange.reason:
            fields["reason"] = exchange.reason
        # Straight to the handlers: Logger.info would also look up the caller's file and line.
        access_log.handle(
            access_log.makeRecord(
                access_log.name, logging.INFO, __file__, 0, "http request", (), None, extra=fields
            )
        )


def _exchange_of(scope: Scope) -> _Exchange:
    """Read the headers the gateway uses, in one pass."""
    request_id = idempotency_key = authorization = content_type = None
    content_length: int | None = None
    for raw_name, raw_value in scope["headers"]:
        # ASGI servers give header names in lower case.
        if raw_name == REQUEST_ID_HEADER:
            request_id = raw_value.decode("latin-1")
        elif raw_name == b"idempotency-key":
            idempotency_key = raw_value.decode("latin-1")
        elif raw_name == b"authorization":
            authorization = raw_value.decode("latin-1")
        elif raw_name == b"content-type":
            content_type = raw_value.decode("latin-1")
        elif raw_name == b"content-length" and raw_value.isdigit():
            content_length = int(raw_value)
    if not _well_formed_request_id(request_id):
        request_id = str(uuid.uuid4())
    assert request_id is not None
    return _Exchange(
        request_id=request_id,
        idempotency_key=idempotency_key,
        authorization=authorization,
        content_type=content_type,
        content_length=content_length,
    )


def _well_formed_request_id(value: str | None) -> bool:
    return (
        value is not None
        and 0 < len(value) <= _REQUEST_ID_MAX_LENGTH
        and all(char in _REQUEST_ID_CHARACTERS for char in value)
    )


# --- the site: health, readiness, metrics, OpenAPI, docs -------------------------------------


def _site_routes(gateway: Gateway, openapi_json: bytes, docs_html: str) -> list[StarletteRoute]:
    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        upstreams = await gateway.readiness()
        ready = all(state == "SERVING" for state in upstreams.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "upstreams": upstreams},
            status_code=200 if ready else 503,
        )

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def openapi(_: Request) -> Response:
        return Response(openapi_json, media_type="application/json")

    async def docs(_: Request) -> Response:
        return HTMLResponse(docs_html)

    return [
        StarletteRoute("/healthz", healthz),
        StarletteRoute("/readyz", readyz),
        StarletteRoute("/metrics", metrics),
        StarletteRoute("/openapi.json", openapi),
        StarletteRoute("/docs", docs),
    ]


def build_app(
    settings: GatewaySettings | None = None, *, service_files: Sequence[FileDescriptor] | None = None
) -> Starlette:
    """The gateway app for `settings`, routing the RPCs of `service_files` (default: every
    generated `*_service_pb2` under `tally`). `app.state.gateway` is its `Gateway`; the app's
    lifespan runs `gateway.running()`."""
    settings = settings or GatewaySettings()
    files = discover_service_files() if service_files is None else service_files
    edge_roles = frozenset(ROLE_BY_CLAIM[name] for name in settings.edge_roles)
    gateway = Gateway(settings, build_routing(files, edge_roles))
    document = build_openapi(gateway.routing.routes, title=API_TITLE, version=settings.version)
    openapi_json = json.dumps(document, separators=(",", ":")).encode()
    api: ASGIApp = ApiEndpoint(gateway)
    site_middleware: list[Middleware] = []
    if settings.cors_allowed_origins:
        cors = {
            "allow_origins": settings.cors_allowed_origins,
            "allow_methods": sorted({route.http_method for route in gateway.routing.routes} | {"GET"}),
            "allow_headers": ["Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id"],
            "expose_headers": ["X-Request-Id", "Retry-After"],
            "max_age": settings.cors_max_age_seconds,
        }
        api = CORSMiddleware(api, **cors)
        site_middleware.append(Middleware(CORSMiddleware, **cors))

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with gateway.running():
            yield

    site_routes = _site_routes(gateway, openapi_json, render_docs_page(document))
    site_paths = frozenset(route.path for route in site_routes)
    app = Starlette(
        routes=site_routes,
        middleware=[Middleware(RequestContextMiddleware, api=api, site_paths=site_paths), *site_middleware],
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.state.openapi = document
    return app
