"""HTTP routes derived from the `google.api.http` annotations of every Tally service.

At start the gateway imports every generated `tally.<service>.v1.*_service_pb2` module, and
each unary RPC annotated with `option (google.api.http)` becomes one route per binding (the
rule itself and its `additional_bindings`). No route is written by hand for an RPC; the one
exception is `EDGE_ALIASES`, URLs that outside parties (a payment provider's webhook
settings) know in a shape of their own, each bound to an annotated RPC with constant fields.

Path templates follow `google/api/http.proto` (AIP-127):

    Template = "/" Segments [ Verb ] ;  Segment = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;  Verb = ":" LITERAL ;

They are matched against the raw (still percent-encoded) path, so that an encoded `/` or
`:` inside a value never splits a segment; a single-segment variable's value is then fully
decoded, a multi-segment one's keeps `%2F` encoded, as http.proto prescribes.

Which routes the edge serves: RPCs that declare an access policy, with the roles it
allows cut down to the edge's roles (`GatewaySettings.edge_roles`). An RPC without a policy
(which every service refuses anyway), one only internal roles may call, and a streaming RPC
are left out and listed in `Routing.skipped`.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import unquote

import grpc
from google.api import annotations_pb2, http_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor, MethodDescriptor
from google.protobuf.message import Message
from tally.common.v1.access_pb2 import Role
from tally_kit.auth import required_roles
from tally_kit.errors import NotFound, TallyError

log = logging.getLogger(__name__)

SERVICE_MODULE_SUFFIX = "_service_pb2"
_FIELD_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_LITERAL = re.compile(r"[A-Za-z0-9._~!$&'()+,;=@-]+")
_SINGLE_SEGMENT = "[^/]+"
_ANY_SEGMENTS = "[^/]+(?:/[^/]+)*"


class RouteError(ValueError):
    """An annotation the gateway cannot serve: a malformed template or a field that does not exist."""


class MethodNotAllowed(TallyError):
    """The path names a route, but not for this HTTP method (answered 405 with `Allow`)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "METHOD_NOT_ALLOWED"
    http_status = 405

    def __init__(self, method: str, allowed: Sequence[str]) -> None:
        super().__init__(f"{method} is not allowed here; allowed: {', '.join(allowed)}")
        self.allowed = tuple(allowed)


@dataclass(frozen=True)
class Rpc:
    """One unary RPC as the gateway calls it."""

    service: str  # fully qualified, e.g. "tally.ledger.v1.LedgerService"
    name: str  # e.g. "GetBalance"
    request_type: type[Message]
    response_type: type[Message]
    # Roles the `(tally.common.v1.access)` option allows (empty: no token needed).
    declared_roles: frozenset[Role]

    @property
    def full_method(self) -> str:
        """The gRPC method path, e.g. `/tally.ledger.v1.LedgerService/GetBalance`."""
        return f"/{self.service}/{self.name}"

    @property
    def request_descriptor(self) -> Descriptor:
        return self.request_type.DESCRIPTOR

    @property
    def is_idempotent_mutation(self) -> bool:
        """AIP-155: the request carries an idempotency key, so repeating it is safe."""
        return "request_id" in self.request_descriptor.fields_by_name


@dataclass(frozen=True)
class Variable:
    """A template variable: the request field it binds and how its value is decoded."""

    field_path: str  # proto field names joined by dots, e.g. "merchant_id"
    group: str  # its group in the template's pattern
    multi_segment: bool

    def decode(self, raw: str) -> str:
        if not self.multi_segment:
            return unquote(raw)
        # Decode everything but the encoded slashes, which stay part of one segment.
        return "%2F".join(unquote(part) for part in re.split("%2[Ff]", raw))


@dataclass(frozen=True)
class PathTemplate:
    text: str  # as written in the annotation
    openapi_path: str  # the same with each variable as `{field.path}`
    pattern: re.Pattern[str]
    variables: tuple[Variable, ...]
    # Segments of every path it matches; None when `**` makes it vary.
    segment_count: int | None
    verb: str
    literal_segments: int

    def match(self, raw_path: str) -> dict[str, str] | None:
        """The decoded value of each variable (by field path) when `raw_path` matches."""
        found = self.pattern.fullmatch(raw_path)
        if found is None:
            return None
        return {variable.field_path: variable.decode(found[variable.group]) for variable in self.variables}


def parse_template(text: str) -> PathTemplate:
    """Parse an http.proto path template; RouteError when it is malformed."""
    if not text.startswith("/"):
        raise RouteError(f"path template {text!r} must start with '/'")
    path, verb = _split_verb(text)
    regex_parts: list[str] = []
    openapi_parts: list[str] = []
    variables: list[Variable] = []
    segment_count = 0
    literal_segments = 0
    varying = False
    for segment in _split_outside_braces(path[1:], "/"):
        if segment.startswith("{"):
            if not segment.endswith("}"):
                raise RouteError(f"unclosed variable in path template {text!r}")
            field_path, has_segments, sub_template = segment[1:-1].partition("=")
            if not _FIELD_PATH.fullmatch(field_path):
                raise RouteError(f"bad field path {field_path!r} in path template {text!r}")
            sub_segments = sub_template.split("/") if has_segments else ["*"]
            group = f"v{len(variables)}"
            sub_regex = "/".join(_segment_regex(sub, text) for sub in sub_segments)
            regex_parts.append(f"(?P<{group}>{sub_regex})")
            openapi_parts.append(f"{{{field_path}}}")
            multi_segment = len(sub_segments) > 1 or "**" in sub_segments
            variables.append(Variable(field_path, group, multi_segment))
            segment_count += len(sub_segments)
            varying = varying or "**" in sub_segments
        else:
            regex_parts.append(_segment_regex(segment, text))
            openapi_parts.append(segment)
            segment_count += 1
            varying = varying or segment == "**"
            literal_segments += segment not in ("*", "**")
    if len({v.field_path for v in variables}) != len(variables):
        raise RouteError(f"path template {text!r} binds a field twice")
    verb_regex = f":{re.escape(verb)}" if verb else ""
    verb_suffix = f":{verb}" if verb else ""
    return PathTemplate(
        text=text,
        openapi_path="/" + "/".join(openapi_parts) + verb_suffix,
        pattern=re.compile("/" + "/".join(regex_parts) + verb_regex),
        variables=tuple(variables),
        segment_count=None if varying else segment_count,
        verb=verb,
        literal_segments=literal_segments,
    )


def _split_outside_braces(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _split_verb(text: str) -> tuple[str, str]:
    """The template without its verb, and the verb ("" when there is none)."""
    depth = 0
    last_slash = verb_at = -1
    for index, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif depth == 0 and char == "/":
            last_slash, verb_at = index, -1
        elif depth == 0 and char == ":" and verb_at < 0 and index > last_slash:
            verb_at = index
    if depth != 0:
        raise RouteError(f"unbalanced braces in path template {text!r}")
    if verb_at < 0:
        return text, ""
    verb = text[verb_at + 1 :]
    if not _LITERAL.fullmatch(verb):
        raise RouteError(f"bad verb {verb!r} in path template {text!r}")
    return text[:verb_at], verb


def _segment_regex(segment: str, template: str) -> str:
    if segment == "*":
        return _SINGLE_SEGMENT
    if segment == "**":
        return _ANY_SEGMENTS
    if not _LITERAL.fullmatch(segment):
        raise RouteError(f"bad segment {segment!r} in path template {template!r}")
    return re.escape(segment)


@dataclass(frozen=True, eq=False)
class Route:
    """One HTTP binding of an RPC. Compared by identity: the gateway keys per-route state by it."""

    http_method: str
    template: PathTemplate
    rpc: Rpc
    # "" (no body), "*" (the whole request) or the request field the body fills.
    body: str
    # "" (the whole response) or the response field sent as the body.
    response_body: str
    # Roles accepted at the edge; empty means the route needs no token.
    roles: frozenset[Role]
    operation_id: str
    # Request fields set to fixed values (edge aliases).
    constants: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def is_public(self) -> bool:
        return not self.roles

    @property
    def path_fields(self) -> frozenset[str]:
        return frozenset(v.field_path for v in self.template.variables) | frozenset(self.constants)


@dataclass(frozen=True)
class RouteAlias:
    """An extra URL for an annotated RPC, with fields it sets to constants."""

    name: str
    http_method: str
    path: str
    rpc: str  # "package.Service/Method"
    body: str
    constants: Mapping[str, str]


# Authorize.Net is configured with one webhook URL per merchant in this shape.
EDGE_ALIASES: tuple[RouteAlias, ...] = (
    RouteAlias(
        name="authorizeNet",
        http_method="POST",
        path="/v1/webhooks/authorize-net/{merchant_id}",
        rpc="tally.payment_gateway.v1.PaymentGatewayService/HandleProviderWebhook",
        body="body",
        constants=MappingProxyType({"provider": "authorize_net"}),
    ),
)


@dataclass(frozen=True)
class Routing:
    routes: tuple[Route, ...]
    # (RPC or alias, why it is not routed)
    skipped: tuple[tuple[str, str], ...]


def service_label(service: str) -> str:
    """A service's short name for people: `tally.ledger.v1.LedgerService` → `ledger`."""
    parts = service.split(".")
    return parts[1] if len(parts) == 4 and parts[0] == "tally" else service


def discover_service_files(package: str = "tally") -> tuple[FileDescriptor, ...]:
    """The file descriptor of every generated `*_service_pb2` module under `package`."""
    root = importlib.import_module(package)
    files: list[FileDescriptor] = []
    for module_info in pkgutil.walk_packages(root.__path__, f"{package}."):
        if module_info.name.endswith(SERVICE_MODULE_SUFFIX):
            files.append(importlib.import_module(module_info.name).DESCRIPTOR)
    return tuple(files)


def build_routing(
    files: Iterable[FileDescriptor],
    edge_roles: frozenset[Role],
    aliases: Sequence[RouteAlias] = EDGE_ALIASES,
) -> Routing:
    """Every route the annotations of `files` and `aliases` declare, for callers of `edge_roles`."""
    routes: list[Route] = []
    skipped: list[tuple[str, str]] = []
    rpcs: dict[str, Rpc] = {}
    for file in files:
        for service in file.services_by_name.values():
            for method in service.methods:
                options = method.GetOptions()
                if not options.HasExtension(annotations_pb2.http):
                    continue
                qualified = f"{service.full_name}/{method.name}"
                reason = _unroutable(method, edge_roles)
                if reason:
                    skipped.append((qualified, reason))
                    continue
                rpc = rpcs[qualified] = _rpc_of(method)
                rule = options.Extensions[annotations_pb2.http]
                for index, binding in enumerate([rule, *rule.additional_bindings]):
                    if binding.additional_bindings:
                        raise RouteError(f"{qualified}: additional bindings may not nest")
                    suffix = f"_{index}" if index else ""
                    routes.append(_route(rpc, binding, edge_roles, f"{service.name}_{method.name}{suffix}"))
    for alias in aliases:
        rpc = rpcs.get(alias.rpc)
        if rpc is None:
            skipped.append((alias.path, f"{alias.rpc} is not routed"))
            continue
        method, path = alias.http_method, alias.path
        service_name = alias.rpc.split("/")[0].rsplit(".", 1)[-1]
        route = Route(
            http_method=method,
            template=parse_template(path),
            rpc=rpc,
            body=alias.body,
            response_body="",
            roles=rpc.declared_roles & edge_roles,
            operation_id=f"{service_name}_{rpc.name}_{alias.name}",
            constants=MappingProxyType(dict(alias.constants)),
        )
        _check_fields(route)
        routes.append(route)
    for qualified, reason in skipped:
        log.warning("not routed", extra={"rpc": qualified, "reason": reason})
    return Routing(tuple(routes), tuple(skipped))


def _unroutable(method: MethodDescriptor, edge_roles: frozenset[Role]) -> str:
    if method.client_streaming or method.server_streaming:
        return "streaming RPCs are not transcoded"
    roles = required_roles(f"/{method.containing_service.full_name}/{method.name}")
    if roles is None:
        return "no (tally.common.v1.access) policy"
    if roles and not roles & edge_roles:
        return "no role the edge accepts may call it"
    return ""


def _rpc_of(method: MethodDescriptor) -> Rpc:
    roles = required_roles(f"/{method.containing_service.full_name}/{method.name}")
    assert roles is not None  # _unroutable refused RPCs without a policy
    return Rpc(
        service=method.containing_service.full_name,
        name=method.name,
        request_type=message_factory.GetMessageClass(method.input_type),
        response_type=message_factory.GetMessageClass(method.output_type),
        declared_roles=roles,
    )


def _route(rpc: Rpc, binding: http_pb2.HttpRule, edge_roles: frozenset[Role], operation_id: str) -> Route:
    kind = binding.WhichOneof("pattern")
    if kind is None:
        raise RouteError(f"{rpc.full_method}: an http rule needs a method and a path")
    if kind == "custom":
        method, path = binding.custom.kind.upper(), binding.custom.path
    else:
        method, path = kind.upper(), getattr(binding, kind)
    route = Route(
        http_method=method,
        template=parse_template(path),
        rpc=rpc,
        body=binding.body,
        response_body=binding.response_body,
        roles=rpc.declared_roles & edge_roles,
        operation_id=operation_id,
    )
    _check_fields(route)
    return route


def _check_fields(route: Route) -> None:
    """Refuse a binding whose fields do not exist or cannot be bound the way it says."""
    where = f"{route.http_method} {route.template.text} ({route.rpc.full_method})"
    request = route.rpc.request_descriptor
    for variable in route.template.variables:
        leaf = resolve_field_path(request, variable.field_path, where)
        if leaf.is_repeated or leaf.type == FieldDescriptor.TYPE_MESSAGE:
            raise RouteError(f"{where}: path variable {variable.field_path} must be a singular scalar")
    for name in route.constants:
        leaf = resolve_field_path(request, name, where)
        if leaf.is_repeated or leaf.type != FieldDescriptor.TYPE_STRING:
            raise RouteError(f"{where}: constant {name} must be a singular string field")
    top_level_path_fields = {name.split(".")[0] for name in route.path_fields}
    if route.body not in ("", "*"):
        if route.body not in request.fields_by_name:
            raise RouteError(f"{where}: body field {route.body} does not exist")
        if route.body in top_level_path_fields:
            raise RouteError(f"{where}: body field {route.body} is also bound by the path")
    if route.response_body and route.response_body not in route.rpc.response_type.DESCRIPTOR.fields_by_name:
        raise RouteError(f"{where}: response_body field {route.response_body} does not exist")


def resolve_field_path(message: Descriptor, field_path: str, where: str) -> FieldDescriptor:
    """The leaf field a dotted path of proto field names names; RouteError when it does not exist."""
    names = field_path.split(".")
    for depth, name in enumerate(names):
        leaf = message.fields_by_name.get(name)
        if leaf is None:
            raise RouteError(f"{where}: field {field_path} does not exist in {message.full_name}")
        if depth < len(names) - 1:
            if leaf.type != FieldDescriptor.TYPE_MESSAGE or leaf.is_repeated:
                raise RouteError(f"{where}: {name} in {field_path} is not a singular message")
            message = leaf.message_type
    return leaf


class RouteTable:
    """Finds the route of a request: by method, then by segment count, then by template.

    Among templates of the same shape, one with a verb is tried before one without (so that
    `/receipts/{id}:renderPdf` is not read as receipt `{id}:renderPdf`), then the one with
    more literal segments.
    """

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        seen: set[tuple[str, str]] = set()
        # method → segment count (None for templates with `**`) → candidates in match order
        self._index: dict[str, dict[int | None, list[Route]]] = {}
        for route in sorted(
            self.routes, key=lambda r: (not r.template.verb, -r.template.literal_segments, r.template.text)
        ):
            key = (route.http_method, route.template.pattern.pattern)
            if key in seen:
                raise RouteError(f"two routes for {route.http_method} {route.template.text}")
            seen.add(key)
            by_count = self._index.setdefault(route.http_method, {})
            by_count.setdefault(route.template.segment_count, []).append(route)

    def match(self, method: str, raw_path: str) -> tuple[Route, dict[str, str]]:
        """The route and its path bindings; NotFound or MethodNotAllowed when there is none."""
        found = self._match_method(method, raw_path)
        if found is not None:
            return found
        allowed = [other for other in self._index if other != method and self._match_method(other, raw_path)]
        if allowed:
            raise MethodNotAllowed(method, sorted(allowed))
        raise NotFound(f"no route for {method} {raw_path}", reason="ROUTE_NOT_FOUND")

    def _match_method(self, method: str, raw_path: str) -> tuple[Route, dict[str, str]] | None:
        by_count = self._index.get(method)
        if by_count is None:
            return None
        for candidates in (by_count.get(raw_path.count("/"), ()), by_count.get(None, ())):
            for route in candidates:
                bindings = route.template.match(raw_path)
                if bindings is not None:
                    return route, bindings
        return None
