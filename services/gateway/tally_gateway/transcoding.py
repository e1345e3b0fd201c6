"""HTTP/JSON ⇄ protobuf for one route (AIP-127), and gRPC status → HTTP status.

Requests. Fields bound by the path template come from the path; with `body: "*"` every other
field comes from the JSON body; with `body: "<field>"` that field comes from the body and
every other from the query string; without a body, every other field comes from the query
string. Query parameters name a leaf field by its dotted path, in proto names
(`page_size`, `read_time`) or JSON names (`pageSize`, `readTime`); a repeated field takes
the parameter once per value. A field bound twice with different values (in the path and
in the body) is refused, and so is an unknown field or parameter: nothing is silently
dropped. A body field of type `google.api.HttpBody` takes the raw body and its content
type, and the request's `map<string, string> headers`, when it has one, takes the HTTP
headers (names in lower case, credentials left out): a webhook's signature covers exactly
the bytes received. The `Idempotency-Key` header fills `request_id` (AIP-155) for RPCs
that take one; it is ignored by the others, which are reads or deduplicated otherwise.

Responses use the proto3 JSON mapping with lowerCamelCase names, and fields left at their
default value are written out (`"balance": "0"` rather than nothing), so a client never
has to know the defaults. A response (or `response_body` field) of type
`google.api.HttpBody` is sent as its raw bytes and content type.

Errors. The body of every error is a `google.rpc.Status` in JSON (`code`, `message`,
`details` with `@type`), the upstream's own when it answered with one. `HTTP_STATUS_BY_CODE`
is the mapping; FAILED_PRECONDITION is 409 Conflict: in Tally it always means the state of
a resource forbids the call (a product already archived, an illegal payment transition, an
account in debt), never that the request is malformed, which is INVALID_ARGUMENT's 400.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
from google.api import httpbody_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from tally_kit.errors import FieldViolation, InvalidArgument, TallyError
from tally_kit.status import error_domain, to_grpc_status

from tally_gateway.protojson import JsonPrinter
from tally_gateway.routes import Route, service_label

log = logging.getLogger(__name__)

GATEWAY_DOMAIN = error_domain("gateway")
JSON_MEDIA_TYPE = "application/json"
HTTP_BODY_TYPE = httpbody_pb2.HttpBody.DESCRIPTOR.full_name
REQUEST_ID_FIELD = "request_id"
MERCHANT_FIELD = "merchant_id"
HEADERS_FIELD = "headers"
# Never copied into a message: they are credentials, and the message may be stored or logged.
_WITHHELD_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})

# Well-known types whose JSON form is a string or a number: a query parameter can hold one.
_SCALAR_JSON_MESSAGES = frozenset(
    {
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
        "google.protobuf.DoubleValue",
        "google.protobuf.FloatValue",
        "google.protobuf.Int64Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.Int32Value",
        "google.protobuf.UInt32Value",
        "google.protobuf.BoolValue",
        "google.protobuf.StringValue",
        "google.protobuf.BytesValue",
    }
)
_BOOL_TEXT = {"true": True, "false": False}
_PRINTER = JsonPrinter()
# Query parameters reach at most this deep into nested messages (recursive messages stop here).
_MAX_QUERY_DEPTH = 4

HTTP_STATUS_BY_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# What the gateway says when an upstream failed without a Tally status (a connection
# refused, a deadline passed on the way): the transport's own text names internal addresses.
_UPSTREAM_FAILURE_MESSAGES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAVAILABLE: "the {service} service is unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the {service} service did not answer in time",
    grpc.StatusCode.UNIMPLEMENTED: "the {service} service does not serve this operation",
    grpc.StatusCode.CANCELLED: "the call to the {service} service was cancelled",
}


class PayloadTooLarge(InvalidArgument):
    http_status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(
            [FieldViolation("body", f"must be at most {limit} bytes")], reason="REQUEST_TOO_LARGE"
        )


class UnsupportedMediaType(InvalidArgument):
    http_status = 415

    def __init__(self, media_type: str) -> None:
        super().__init__(
            [FieldViolation("body", f"must be {JSON_MEDIA_TYPE}, not {media_type}")],
            reason="UNSUPPORTED_MEDIA_TYPE",
        )


# --- requests ---------------------------------------------------------------------------------


class RequestTranscoder:
    """Builds a route's request message from the parts of an HTTP request."""

    def __init__(self, route: Route) -> None:
        self._route = route
        request = route.rpc.request_descriptor
        self._request_type = route.rpc.request_type
        self._path_fields = {name: _field_chain(request, name) for name in route.path_fields}
        self._body_field = request.fields_by_name[route.body] if route.body not in ("", "*") else None
        self._raw_body = self._body_field is not None and _is_http_body(self._body_field)
        self._query_fields = query_fields(request, route)
        self._request_id_field = REQUEST_ID_FIELD in request.fields_by_name
        merchant_field = request.fields_by_name.get(MERCHANT_FIELD)
        self._names_merchant = (
            merchant_field is not None and merchant_field.type == FieldDescriptor.TYPE_STRING
        )
        headers_field = request.fields_by_name.get(HEADERS_FIELD)
        self._fill_headers = self._raw_body and headers_field is not None and _is_string_map(headers_field)

    def merchant_of(self, message: Message) -> str:
        """The request's merchant (its `merchant_id`), "" when it names none."""
        return getattr(message, MERCHANT_FIELD) if self._names_merchant else ""

    def build(
        self,
        *,
        path_bindings: Mapping[str, str],
        query: Sequence[tuple[str, str]],
        body: bytes,
        content_type: str | None,
        headers: Iterable[tuple[bytes, bytes]],
        idempotency_key: str | None,
    ) -> Message:
        """The request message; InvalidArgument naming every field that could not be bound."""
        message = self._request_type()
        violations: list[FieldViolation] = []
        if self._route.body:
            self._bind_body(message, body, content_type, violations)
        elif body:
            violations.append(FieldViolation("body", "this operation takes no body"))
        self._bind_query(message, query, violations)
        for name, value in (*path_bindings.items(), *self._route.constants.items()):
            _bind_path_value(message, self._path_fields[name], name, value, violations)
        if idempotency_key is not None and self._request_id_field:
            given = message.request_id  # type: ignore[attr-defined]
            if given and given != idempotency_key:
                violations.append(FieldViolation(REQUEST_ID_FIELD, "differs from the Idempotency-Key header"))
            message.request_id = idempotency_key  # type: ignore[attr-defined]
        if self._fill_headers:
            _copy_headers(getattr(message, HEADERS_FIELD), headers)
        if violations:
            raise InvalidArgument(violations)
        return message

    def _bind_body(
        self, message: Message, body: bytes, content_type: str | None, violations: list[FieldViolation]
    ) -> None:
        if self._raw_body:
            assert self._body_field is not None
            http_body = getattr(message, self._body_field.name)
            http_body.data = body
            http_body.content_type = content_type or ""
            return
        if not body:
            return
        media_type = (content_type or JSON_MEDIA_TYPE).split(";", 1)[0].strip().lower()
        if media_type != JSON_MEDIA_TYPE and not media_type.endswith("+json"):
            raise UnsupportedMediaType(media_type)
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:
            violations.append(FieldViolation("body", f"is not valid JSON: {exc}"))
            return
        if self._body_field is None:
            if not isinstance(document, dict):
                violations.append(FieldViolation("body", "must be a JSON object"))
                return
        else:
            document = {self._body_field.json_name: document}
        try:
            json_format.ParseDict(document, message)
        except (json_format.ParseError, ValueError, RecursionError) as exc:
            violations.append(FieldViolation(self._route.body if self._body_field else "body", str(exc)))

    def _bind_query(
        self, message: Message, query: Sequence[tuple[str, str]], violations: list[FieldViolation]
    ) -> None:
        if not query:
            return
        values: dict[str, list[str]] = {}
        for name, value in query:
            values.setdefault(name, []).append(value)
        for name, texts in values.items():
            chain = self._query_fields.get(name)
            if chain is None:
                violations.append(FieldViolation(name, "is not a parameter of this operation"))
                continue
            leaf = chain[-1]
            if not leaf.is_repeated and len(texts) > 1:
                violations.append(FieldViolation(name, "may be given once"))
                continue
            try:
                _merge_leaf(message, chain, texts)
            except (json_format.ParseError, ValueError) as exc:
                violations.append(FieldViolation(name, str(exc)))


def _field_chain(message: Descriptor, field_path: str) -> tuple[FieldDescriptor, ...]:
    chain: list[FieldDescriptor] = []
    for name in field_path.split("."):
        leaf = message.fields_by_name[name]
        chain.append(leaf)
        if leaf.message_type is not None:
            message = leaf.message_type
    return tuple(chain)


def query_fields(request: Descriptor, route: Route) -> dict[str, tuple[FieldDescriptor, ...]]:
    """Accepted query parameter names (proto and JSON spellings) → the field chain each binds."""
    if route.body == "*":
        return {}
    bound = set(route.path_fields)
    excluded_top = {route.body} if route.body else set()
    fields: dict[str, tuple[FieldDescriptor, ...]] = {}

    def walk(message: Descriptor, prefix: tuple[FieldDescriptor, ...]) -> None:
        for leaf in message.fields:
            chain = (*prefix, leaf)
            proto_path = ".".join(f.name for f in chain)
            if not prefix and leaf.name in excluded_top:
                continue
            if proto_path in bound:
                continue
            if is_query_leaf(leaf):
                fields[proto_path] = chain
                fields[".".join(f.json_name for f in chain)] = chain
            elif (
                leaf.type == FieldDescriptor.TYPE_MESSAGE
                and not leaf.is_repeated
                and len(chain) < _MAX_QUERY_DEPTH
            ):
                walk(leaf.message_type, chain)

    walk(request, ())
    return fields


def is_query_leaf(leaf: FieldDescriptor) -> bool:
    """Whether a query parameter can hold the field: a scalar, an enum or a string-like WKT."""
    if leaf.type == FieldDescriptor.TYPE_MESSAGE:
        return leaf.message_type.full_name in _SCALAR_JSON_MESSAGES and not _is_map(leaf)
    return True


def _is_map(leaf: FieldDescriptor) -> bool:
    return leaf.is_repeated and leaf.message_type is not None and leaf.message_type.GetOptions().map_entry


def _is_string_map(leaf: FieldDescriptor) -> bool:
    if not _is_map(leaf):
        return False
    entry = leaf.message_type
    return all(entry.fields_by_name[f].type == FieldDescriptor.TYPE_STRING for f in ("key", "value"))


def _is_http_body(leaf: FieldDescriptor) -> bool:
    return leaf.message_type is not None and leaf.message_type.full_name == HTTP_BODY_TYPE


def _parent_of(message: Message, chain: tuple[FieldDescriptor, ...]) -> Message:
    for step in chain[:-1]:
        message = getattr(message, step.name)
    return message


def _json_value(leaf: FieldDescriptor, text: str) -> Any:
    if leaf.type == FieldDescriptor.TYPE_BOOL:
        value = _BOOL_TEXT.get(text)
        if value is None:
            raise ValueError(f"{text!r} is not true or false")
        return value
    return text


def _merge_leaf(message: Message, chain: tuple[FieldDescriptor, ...], texts: Sequence[str]) -> None:
    """Set (or, for a repeated field, append to) the leaf of `chain` from query text."""
    parent = _parent_of(message, chain)
    leaf = chain[-1]
    values = [_json_value(leaf, text) for text in texts]
    partial = type(parent)()
    json_format.ParseDict({leaf.json_name: values if leaf.is_repeated else values[0]}, partial)
    parent.MergeFrom(partial)


def _bind_path_value(
    message: Message,
    chain: tuple[FieldDescriptor, ...],
    name: str,
    text: str,
    violations: list[FieldViolation],
) -> None:
    """Set a singular scalar from the path, refusing a body that gave it another value."""
    parent = _parent_of(message, chain)
    leaf = chain[-1]
    if leaf.type == FieldDescriptor.TYPE_STRING:
        value: Any = text
    else:
        partial = type(parent)()
        try:
            json_format.ParseDict({leaf.json_name: _json_value(leaf, text)}, partial)
        except (json_format.ParseError, ValueError) as exc:
            violations.append(FieldViolation(name, str(exc)))
            return
        value = getattr(partial, leaf.name)
    current = getattr(parent, leaf.name)
    given = parent.HasField(leaf.name) if leaf.has_presence else current != leaf.default_value
    if given and current != value:
        violations.append(FieldViolation(name, "differs between the path and the body"))
        return
    setattr(parent, leaf.name, value)


def _copy_headers(target: Any, headers: Iterable[tuple[bytes, bytes]]) -> None:
    for raw_name, raw_value in headers:
        key = raw_name.decode("latin-1").lower()
        if key in _WITHHELD_HEADERS:
            continue
        value = raw_value.decode("latin-1")
        # Repeated headers are one comma-separated list (RFC 9110 §5.3).
        target[key] = f"{target[key]}, {value}" if key in target else value


# --- responses --------------------------------------------------------------------------------


def encode_response(route: Route, response: Message) -> tuple[bytes, str]:
    """The HTTP body and media type of an RPC's response."""
    target: Message = response
    if route.response_body:
        leaf = response.DESCRIPTOR.fields_by_name[route.response_body]
        if leaf.type != FieldDescriptor.TYPE_MESSAGE or leaf.is_repeated:
            document = message_to_json(response)
            return _dump(document[leaf.json_name]), JSON_MEDIA_TYPE
        target = getattr(response, leaf.name)
    if target.DESCRIPTOR.full_name == HTTP_BODY_TYPE:
        return target.data, target.content_type or "application/octet-stream"  # type: ignore[attr-defined]
    return _dump(message_to_json(target)), JSON_MEDIA_TYPE


def message_to_json(message: Message) -> Any:
    return _PRINTER.to_dict(message)


def _dump(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


# --- errors -----------------------------------------------------------------------------------


def status_of_error(error: TallyError) -> tuple[int, status_pb2.Status]:
    """The HTTP status and `google.rpc.Status` of an error raised in the gateway."""
    grpc_status = to_grpc_status(error, GATEWAY_DOMAIN)
    status = status_pb2.Status()
    for key, value in grpc_status.trailing_metadata:
        if key == rpc_status.GRPC_DETAILS_METADATA_KEY:
            status.ParseFromString(value)
    http_status = getattr(error, "http_status", None) or HTTP_STATUS_BY_CODE[error.code]
    return http_status, status


def status_of_rpc_error(error: grpc.aio.AioRpcError, service: str) -> tuple[int, status_pb2.Status]:
    """The HTTP status and `google.rpc.Status` of an upstream's failed call.

    A Tally service answers with a status carrying an ErrorInfo: it is passed on as it is.
    A failure without one happened on the way (no connection, no answer in time): the
    transport's own text is logged, and the client gets a plain one naming the service.
    """
    code = error.code()
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        # The details contradict the call's code or message: keep neither.
        status = None
    if status is None or not status.details:
        log.warning(
            "upstream call failed",
            extra={"grpc_service": service, "grpc_code": code.name, "grpc_details": error.details()},
        )
        status = status_pb2.Status(code=code.value[0], message=_failure_message(code, service))
        status.details.add().Pack(
            error_details_pb2.ErrorInfo(
                reason=f"UPSTREAM_{code.name}", domain=GATEWAY_DOMAIN, metadata={"service": service}
            )
        )
    return HTTP_STATUS_BY_CODE.get(code, 500), status


def _failure_message(code: grpc.StatusCode, service: str) -> str:
    template = _UPSTREAM_FAILURE_MESSAGES.get(code, "the call to the {service} service failed")
    return template.format(service=service_label(service))


def encode_status(status: status_pb2.Status) -> bytes:
    """A `google.rpc.Status` as JSON; a detail of a type this process does not know is left out."""
    details: list[dict[str, Any]] = []
    for detail in status.details:
        try:
            details.append(json_format.MessageToDict(detail))
        except (TypeError, KeyError, json_format.Error):
            log.warning("status detail of an unknown type left out", extra={"type_url": detail.type_url})
    return _dump({"code": status.code, "message": status.message, "details": details})
