"""The server interceptor every Tally service runs: the same steps around every RPC.

1. Correlation id: the caller's `x-request-id` (or a new UUID) goes into
   `tally_kit.context.correlation_id` and is echoed in the trailing metadata.
2. Auth (health and reflection skip it): the `authorization: Bearer ...` token is verified,
   its role checked against the RPC's `(tally.common.v1.access)` option and, when the request
   has a `merchant_id` field, its merchant against the request's. The token stays in
   `context.bearer_token` for forwarding; the merchant goes into `context.merchant_id`.
3. The servicer runs.
4. Errors: a `TallyError` becomes its code with `google.rpc` details; anything unexpected
   becomes INTERNAL "internal error", its traceback logged and never sent.
5. The standard `grpc_server_*` metrics and one JSON access log line per call.

Unary-unary and unary-stream RPCs are supported; client-streaming RPCs are refused (their
merchant could only be checked after the servicer has started reading).
"""

from __future__ import annotations

import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tally_kit import context as call_context
from tally_kit import metrics
from tally_kit.auth import TokenVerifier, authorize, current_principal, required_roles
from tally_kit.errors import PermissionDenied, TallyError, Unauthenticated
from tally_kit.settings import ServiceSettings
from tally_kit.status import error_domain, to_grpc_status

REQUEST_ID_KEY = "x-request-id"
AUTHORIZATION_KEY = "authorization"

# Probes and tooling call these without a token.
AUTH_EXEMPT_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
)
# A caller's request id is copied into logs and events: anything else is replaced.
_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")

log = logging.getLogger(__name__)
access_log = logging.getLogger("tally_kit.access")

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class _Rpc:
    """What the interceptor needs of one method, worked out once: its policy and metric children."""

    __slots__ = ("auth_exempt", "method", "metrics", "roles")

    def __init__(self, method: str, handler: grpc.RpcMethodHandler) -> None:
        labels = metrics.RpcLabels.of(
            method, request_streaming=handler.request_streaming, response_streaming=handler.response_streaming
        )
        self.method = method
        self.auth_exempt = labels.grpc_service in AUTH_EXEMPT_SERVICES
        self.roles = None if self.auth_exempt else required_roles(method)
        self.metrics = metrics.ServerMethodMetrics(labels)


class _Call:
    """One RPC in flight. Creating it sets the call's correlation id and counts the start."""

    __slots__ = ("_started", "authorization", "code", "context", "echoed_metadata", "reason", "rpc")

    def __init__(self, rpc: _Rpc, context: grpc.aio.ServicerContext) -> None:
        self._started = time.perf_counter()
        self.rpc = rpc
        self.context = context
        self.code: grpc.StatusCode | None = None
        self.reason = ""
        given: str | bytes | None = None
        self.authorization: str | bytes | None = None
        # The last value of a repeated key wins, as in a dict of the metadata.
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_KEY:
                given = value
            elif key == AUTHORIZATION_KEY:
                self.authorization = value
        correlation_id = (
            given if isinstance(given, str) and _REQUEST_ID_PATTERN.fullmatch(given) else str(uuid.uuid4())
        )
        call_context.correlation_id.set(correlation_id)
        self.echoed_metadata = ((REQUEST_ID_KEY, correlation_id),)
        context.set_trailing_metadata(self.echoed_metadata)
        rpc.metrics.started()

    def finish(self) -> None:
        code = self.code or self._interruption_code()
        elapsed = time.perf_counter() - self._started
        self.rpc.metrics.handled(code, elapsed)
        if not self.rpc.auth_exempt and access_log.isEnabledFor(logging.INFO):
            fields: dict[str, Any] = {
                "grpc_method": self.rpc.method,
                "grpc_code": code.name,
                "duration_ms": round(elapsed * 1000, 3),
            }
            if self.reason:
                fields["reason"] = self.reason
            # Straight to the handlers: Logger.info would also walk the stack for the caller's
            # file and line, which an access line has no use for.
            access_log.handle(
                access_log.makeRecord(
                    access_log.name, logging.INFO, __file__, 0, "rpc handled", (), None, extra=fields
                )
            )

    def _interruption_code(self) -> grpc.StatusCode:
        # No status was reached: the client cancelled or the deadline passed.
        remaining = self.context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, settings: ServiceSettings, verifier: TokenVerifier) -> None:
        self._domain = error_domain(settings.service_name)
        self._verifier = verifier
        # By method: the servicer's handler and its wrapped version. grpc.aio asks for the
        # handler on every call; the wrapping is worked out once per method. Bounded by the
        # methods the server registers (an unknown method has no handler).
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(_Rpc(method, handler), handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, rpc: _Rpc, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_streaming:
            return handler if rpc.auth_exempt else _refusing_client_streams(handler)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(rpc, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._unary_unary(rpc, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary_unary(self, rpc: _Rpc, behavior: UnaryBehavior) -> UnaryBehavior:
        message_sent = rpc.metrics.message_sent

        async def handle(request: Message, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(rpc, context)
            try:
                await self._authorize(call, request)
                response = await behavior(request, context)
                message_sent()
                call.code = grpc.StatusCode.OK
                return response
            except Exception as exc:
                await self._fail(call, exc)
            finally:
                call.finish()

        return handle

    def _unary_stream(self, rpc: _Rpc, behavior: Callable[..., Any]) -> Callable[..., Any]:
        message_sent = rpc.metrics.message_sent
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Message, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                call = _Call(rpc, context)
                try:
                    await self._authorize(call, request)
                    async for response in behavior(request, context):
                        message_sent()
                        yield response
                    call.code = grpc.StatusCode.OK
                except Exception as exc:
                    await self._fail(call, exc)
                finally:
                    call.finish()

            return stream

        async def write(request: Message, context: grpc.aio.ServicerContext) -> None:
            # The servicer writes with context.write(), which the kit does not count.
            call = _Call(rpc, context)
            try:
                await self._authorize(call, request)
                await behavior(request, context)
                call.code = grpc.StatusCode.OK
            except Exception as exc:
                await self._fail(call, exc)
            finally:
                call.finish()

        return write

    async def _authorize(self, call: _Call, request: Message) -> None:
        request_merchant = _merchant_of(request)
        if request_merchant:
            call_context.merchant_id.set(request_merchant)
        rpc = call.rpc
        if rpc.auth_exempt:
            return
        roles = rpc.roles
        if roles is None:
            raise PermissionDenied("this RPC declares no access policy", reason="ACCESS_POLICY_MISSING")
        token = _bearer_token(call.authorization)
        if token is None:
            if not roles:
                return
            raise Unauthenticated("a bearer token is required", reason="TOKEN_MISSING")
        principal = await self._verifier.verify_async(token)
        call_context.bearer_token.set(token)
        current_principal.set(principal)
        if not request_merchant and principal.merchant_id:
            call_context.merchant_id.set(principal.merchant_id)
        if roles:
            authorize(principal, roles, request_merchant)

    async def _fail(self, call: _Call, exc: Exception) -> NoReturn:
        if isinstance(exc, grpc.aio.AbortError):
            # The servicer aborted the call itself: its status stands.
            call.code = call.context.code() or grpc.StatusCode.UNKNOWN
            raise exc
        if isinstance(exc, TallyError):
            status = to_grpc_status(exc, self._domain)
            call.reason = exc.reason
            code, details, trailing = status.code, status.details, tuple(status.trailing_metadata)
        else:
            log.error("unexpected error in %s", call.rpc.method, exc_info=exc)
            code, details, trailing = grpc.StatusCode.INTERNAL, "internal error", ()
        call.code = code
        await call.context.abort(code, details, trailing_metadata=(*trailing, *call.echoed_metadata))


# By request message type: whether it has a string `merchant_id` field.
_HAS_MERCHANT_FIELD: dict[type[Message], bool] = {}


def _merchant_of(request: Message) -> str | None:
    """The request's `merchant_id`, or None when its message has no such string field."""
    message_type = type(request)
    has_field = _HAS_MERCHANT_FIELD.get(message_type)
    if has_field is None:
        field = request.DESCRIPTOR.fields_by_name.get("merchant_id")
        has_field = _HAS_MERCHANT_FIELD[message_type] = (
            field is not None and field.type == FieldDescriptor.TYPE_STRING
        )
    return request.merchant_id if has_field else None  # type: ignore[attr-defined]


def _bearer_token(header: str | bytes | None) -> str | None:
    if header is None:
        return None
    scheme, _, token = str(header).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization must be 'Bearer <token>'", reason="TOKEN_INVALID")
    return token.strip()


def _refusing_client_streams(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "client-streaming RPCs are not supported")

    make_handler = (
        grpc.stream_stream_rpc_method_handler
        if handler.response_streaming
        else grpc.stream_unary_rpc_method_handler
    )
    return make_handler(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
