"""The OpenAPI 3 document of the routes, and the `/docs` page that renders it.

Both come from the same routes as the gateway itself, so they cannot drift from what it
serves. Schemas follow the proto3 JSON mapping the gateway speaks: lowerCamelCase names,
64-bit integers as decimal strings, enums by name, `Timestamp` as RFC 3339 text,
`Duration` as `"1.5s"`, bytes as base64. Each message is one component named by its
full proto name (`tally.ledger.v1.Lot`); a `body: "*"` request body is the request
message without the fields the path binds.

The docs page is plain HTML built on the server from the document: no script, nothing
loaded from elsewhere.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from tally.common.v1 import access_pb2

from tally_gateway.routes import Route
from tally_gateway.transcoding import HTTP_BODY_TYPE, JSON_MEDIA_TYPE, REQUEST_ID_FIELD, query_fields

OPENAPI_VERSION = "3.0.3"
STATUS_SCHEMA = "google.rpc.Status"
_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
_INT64 = {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
}
# Well-known types, written inline in their JSON form.
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Comma-separated field paths in lowerCamelCase.",
    },
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Any": {
        "type": "object",
        "required": ["@type"],
        "properties": {"@type": {"type": "string"}},
    },
    "google.protobuf.DoubleValue": _SCALARS[FieldDescriptor.TYPE_DOUBLE],
    "google.protobuf.FloatValue": _SCALARS[FieldDescriptor.TYPE_FLOAT],
    "google.protobuf.Int64Value": _INT64,
    "google.protobuf.UInt64Value": _UINT64,
    "google.protobuf.Int32Value": _INT32,
    "google.protobuf.UInt32Value": _UINT32,
    "google.protobuf.BoolValue": _SCALARS[FieldDescriptor.TYPE_BOOL],
    "google.protobuf.StringValue": _SCALARS[FieldDescriptor.TYPE_STRING],
    "google.protobuf.BytesValue": _SCALARS[FieldDescriptor.TYPE_BYTES],
}
_RAW_BODY_CONTENT = {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    JSON_MEDIA_TYPE: {"schema": {}},
}
# Statuses any operation may answer besides 200, each with a google.rpc.Status body.
_ERROR_STATUSES = {
    "400": "The request is malformed (INVALID_ARGUMENT).",
    "401": "No valid bearer token (UNAUTHENTICATED).",
    "403": "The token's role or merchant may not call this (PERMISSION_DENIED).",
    "404": "No such route or resource (NOT_FOUND).",
    "409": "The resource exists already or its state forbids the call "
    "(ALREADY_EXISTS, FAILED_PRECONDITION, ABORTED).",
    "429": "Rate limited (RESOURCE_EXHAUSTED); retry after `Retry-After` seconds.",
    "503": "The service behind this operation is unavailable (UNAVAILABLE).",
    "504": "The service behind this operation did not answer in time (DEADLINE_EXCEEDED).",
}

API_DESCRIPTION = """\
The HTTP/JSON edge of Tally: every operation is one gRPC call to one Tally service, with
the proto3 JSON mapping (lowerCamelCase names, 64-bit integers and credits as strings,
enums by name, RFC 3339 timestamps).

**Authentication.** `Authorization: Bearer <JWT>` with a `role` claim (`app`, `admin` or
`platform`) and, for `app` and `admin`, a `merchant_id` claim that must match the
merchant the operation names. Each operation lists the roles it accepts.

**Idempotency.** Operations that change something take an `Idempotency-Key` header (or
`requestId` in the body): a repeat with the same key and payload returns the first
answer; the same key with another payload is refused with 409.

**Request ids.** `X-Request-Id` is accepted (1 to 128 characters from `[A-Za-z0-9._:-]`)
or generated, sent to the services and returned on every response.

**Errors.** Every error body is a `google.rpc.Status`: `code` (gRPC code number),
`message`, and `details`, among them a `google.rpc.ErrorInfo` whose `reason` names the
error, and a `google.rpc.BadRequest` listing the fields at fault for bad input.

**Limits.** Requests are rate limited per token and per client address (429 with
`Retry-After`); bodies are limited in size (413).
"""


class _Schemas:
    """Builds field schemas, collecting every message it meets as a component."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Any]] = {}

    def message(self, message: Descriptor) -> dict[str, Any]:
        """The schema of a value of this message type: inline for a well-known type, else a $ref."""
        well_known = _WELL_KNOWN.get(message.full_name)
        if well_known is not None:
            return dict(well_known)
        name = message.full_name
        if name not in self.components:
            self.components[name] = {}  # placeholder: a recursive message refers to itself
            self.components[name] = self.object(message)
        return {"$ref": f"#/components/schemas/{name}"}

    def object(self, message: Descriptor, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        for field in message.fields:
            if field.name not in exclude:
                properties[field.json_name] = self.field(field)
        schema: dict[str, Any] = {
            "type": "object",
            "title": message.name,
            "properties": properties,
            "additionalProperties": False,
        }
        oneofs = [o for o in message.oneofs if not _is_synthetic(o.fields)]
        notes = [
            "At most one of " + ", ".join(f"`{f.json_name}`" for f in oneof.fields) + "." for oneof in oneofs
        ]
        schema["description"] = " ".join([f"`{message.full_name}`.", *notes])
        return schema

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.is_repeated and field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.singular(value)}
        if field.is_repeated:
            return {"type": "array", "items": self.singular(field)}
        return self.singular(field)

    def singular(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            return self.message(field.message_type)
        if field.type == FieldDescriptor.TYPE_ENUM:
            return _enum_schema(field.enum_type)
        return dict(_SCALARS[field.type])


def _is_synthetic(fields: Sequence[FieldDescriptor]) -> bool:
    """A proto3 `optional` field sits alone in a oneof of its own."""
    return len(fields) == 1 and fields[0].has_presence and fields[0].message_type is None


def _enum_schema(enum: EnumDescriptor) -> dict[str, Any]:
    return {"type": "string", "enum": [value.name for value in enum.values]}


def role_names(route: Route) -> list[str]:
    """The route's roles as token claims (`app`, `admin`, ...), in the enum's order."""
    prefix = "ROLE_"
    return [access_pb2.Role.Name(role)[len(prefix) :].lower() for role in sorted(route.roles)]


def build_openapi(routes: Sequence[Route], *, title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3 document of `routes`."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    tags: dict[str, str] = {}
    for route in routes:
        tag = route.rpc.service.rsplit(".", 1)[-1]
        tags[tag] = f"`{route.rpc.service}`"
        paths.setdefault(route.template.openapi_path, {})[route.http_method.lower()] = _operation(
            route, tag, schemas
        )
    schemas.components[STATUS_SCHEMA] = {
        "type": "object",
        "title": "Status",
        "description": "`google.rpc.Status`: the error of a failed call.",
        "required": ["code", "message", "details"],
        "properties": {
            "code": {"type": "integer", "format": "int32", "description": "The gRPC status code."},
            "message": {"type": "string"},
            "details": {"type": "array", "items": _WELL_KNOWN["google.protobuf.Any"]},
        },
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": API_DESCRIPTION},
        "tags": [{"name": name, "description": description} for name, description in sorted(tags.items())],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "parameters": {
                "RequestId": {
                    "name": "X-Request-Id",
                    "in": "header",
                    "required": False,
                    "description": "Correlates this request's logs and events; generated when absent.",
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
                },
                "IdempotencyKey": {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "The operation's `request_id` (AIP-155), here or in the request.",
                    "schema": {"type": "string"},
                },
            },
            "headers": {
                "RequestId": {"description": "The request's id.", "schema": {"type": "string"}},
                "RetryAfter": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer", "minimum": 0},
                },
            },
            "responses": {
                "Error": {
                    "description": "A failed call, as a `google.rpc.Status`.",
                    "headers": {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}},
                    "content": {
                        JSON_MEDIA_TYPE: {"schema": {"$ref": f"#/components/schemas/{STATUS_SCHEMA}"}}
                    },
                },
                "RateLimited": {
                    "description": _ERROR_STATUSES["429"],
                    "headers": {
                        "X-Request-Id": {"$ref": "#/components/headers/RequestId"},
                        "Retry-After": {"$ref": "#/components/headers/RetryAfter"},
                    },
                    "content": {
                        JSON_MEDIA_TYPE: {"schema": {"$ref": f"#/components/schemas/{STATUS_SCHEMA}"}}
                    },
                },
            },
        },
    }


def _operation(route: Route, tag: str, schemas: _Schemas) -> dict[str, Any]:
    rpc = route.rpc
    request = rpc.request_descriptor
    roles = role_names(route)
    parameters: list[dict[str, Any]] = []
    for variable in route.template.variables:
        leaf = _leaf(request, variable.field_path)
        schema = schemas.singular(leaf)
        if schema.get("type") == "string" and "pattern" not in schema and "enum" not in schema:
            schema["minLength"] = 1
        parameters.append({"name": variable.field_path, "in": "path", "required": True, "schema": schema})
    for name, chain in query_fields(request, route).items():
        if name == ".".join(f.json_name for f in chain):
            parameters.append(
                {"name": name, "in": "query", "required": False, "schema": schemas.field(chain[-1])}
            )
    if rpc.is_idempotent_mutation:
        parameters.append({"$ref": "#/components/parameters/IdempotencyKey"})
    parameters.append({"$ref": "#/components/parameters/RequestId"})
    access = f"Roles: {', '.join(f'`{r}`' for r in roles)}." if roles else "Needs no token."
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "tags": [tag],
        "summary": rpc.name,
        "description": f"Calls `{rpc.service}/{rpc.name}`. {access}",
        "parameters": parameters,
        "responses": {
            "200": _success(route, schemas),
            **{
                status: {"$ref": "#/components/responses/RateLimited"}
                if status == "429"
                else {"$ref": "#/components/responses/Error"}
                for status in _ERROR_STATUSES
            },
            "default": {"$ref": "#/components/responses/Error"},
        },
        "security": [{"bearerAuth": []}] if roles else [],
        "x-tally-rpc": f"{rpc.service}/{rpc.name}",
        "x-tally-roles": roles,
    }
    body = _request_body(route, schemas)
    if body is not None:
        operation["requestBody"] = body
    return operation


def _leaf(message: Descriptor, field_path: str) -> FieldDescriptor:
    names = field_path.split(".")
    for name in names[:-1]:
        message = message.fields_by_name[name].message_type
    return message.fields_by_name[names[-1]]


def _request_body(route: Route, schemas: _Schemas) -> dict[str, Any] | None:
    request = route.rpc.request_descriptor
    if not route.body:
        return None
    if route.body == "*":
        bound = frozenset(name.split(".")[0] for name in route.path_fields)
        schema = schemas.object(request, exclude=bound)
        if route.rpc.is_idempotent_mutation:
            schema["description"] += (
                f" `{_json_name(request, REQUEST_ID_FIELD)}` or the Idempotency-Key header."
            )
        return {"required": False, "content": {JSON_MEDIA_TYPE: {"schema": schema}}}
    field = request.fields_by_name[route.body]
    if field.message_type is not None and field.message_type.full_name == HTTP_BODY_TYPE:
        return {"required": False, "description": "Forwarded as received.", "content": _RAW_BODY_CONTENT}
    return {"required": False, "content": {JSON_MEDIA_TYPE: {"schema": schemas.field(field)}}}


def _json_name(message: Descriptor, name: str) -> str:
    return message.fields_by_name[name].json_name


def _success(route: Route, schemas: _Schemas) -> dict[str, Any]:
    response = route.rpc.response_type.DESCRIPTOR
    headers = {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}}
    if route.response_body:
        field = response.fields_by_name[route.response_body]
        if field.message_type is not None and field.message_type.full_name == HTTP_BODY_TYPE:
            return {"description": "The raw response.", "headers": headers, "content": {"*/*": {}}}
        schema = schemas.field(field)
    elif response.full_name == HTTP_BODY_TYPE:
        return {"description": "The raw response.", "headers": headers, "content": {"*/*": {}}}
    else:
        schema = schemas.message(response)
    return {"description": "OK", "headers": headers, "content": {JSON_MEDIA_TYPE: {"schema": schema}}}


# --- the docs page ----------------------------------------------------------------------------

_PAGE_STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:72rem;padding:1rem 2rem;color:#1b1f24}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #d0d7de;padding-bottom:.3rem;margin-top:2rem}
details{border:1px solid #d0d7de;border-radius:6px;margin:.4rem 0;padding:.3rem .6rem}
summary{cursor:pointer;font-family:ui-monospace,monospace}
.m{display:inline-block;min-width:4.2rem;font-weight:bold;border-radius:4px;padding:0 .3rem;color:#fff}
.get{background:#1f6feb}.post{background:#1a7f37}.patch{background:#9a6700}.delete{background:#cf222e}
.put{background:#8250df}
table{border-collapse:collapse;margin:.4rem 0}td,th{border:1px solid #d0d7de;padding:.2rem .5rem;
text-align:left;vertical-align:top}code{font-family:ui-monospace,monospace}.muted{color:#57606a}
"""


def render_docs_page(document: dict[str, Any]) -> str:
    """A self-contained HTML page listing every operation and schema of `document`."""
    info = document["info"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{_e(info['title'])}</title><style>{_PAGE_STYLE}</style></head><body>",
        f"<h1>{_e(info['title'])}</h1><p class=muted>version {_e(info['version'])} · "
        "<a href='/openapi.json'>openapi.json</a></p>",
        "".join(f"<p>{_inline(paragraph)}</p>" for paragraph in info["description"].split("\n\n")),
    ]
    operations_by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            operations_by_tag.setdefault(operation["tags"][0], []).append((method, path, operation))
    for tag in document["tags"]:
        parts.append(f"<h2 id='tag-{_e(tag['name'])}'>{_e(tag['name'])}</h2>")
        parts.append(f"<p class=muted>{_inline(tag['description'])}</p>")
        for method, path, operation in operations_by_tag.get(tag["name"], []):
            parts.append(_operation_html(method, path, operation, document))
    parts.append("<h2 id=schemas>Schemas</h2>")
    for name, schema in document["components"]["schemas"].items():
        parts.append(_schema_html(name, schema))
    parts.append("</body></html>")
    return "".join(parts)


def _operation_html(method: str, path: str, operation: dict[str, Any], document: dict[str, Any]) -> str:
    rows = []
    for parameter in operation["parameters"]:
        if "$ref" in parameter:
            parameter = document["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[-1]]
        rows.append(
            f"<tr><td><code>{_e(parameter['name'])}</code></td><td>{_e(parameter['in'])}</td>"
            f"<td>{_type_html(parameter['schema'])}</td>"
            f"<td>{'yes' if parameter['required'] else ''}</td></tr>"
        )
    body = ""
    if "requestBody" in operation:
        content = operation["requestBody"]["content"]
        body = "<p>Body: " + ", ".join(
            f"<code>{_e(media)}</code> {_type_html(entry.get('schema', {}))}"
            for media, entry in content.items()
        )
        schema = content.get(JSON_MEDIA_TYPE, {}).get("schema", {})
        if schema.get("properties"):
            body += _properties_html(schema)
        body += "</p>"
    success = operation["responses"]["200"].get("content", {})
    answer = ", ".join(f"<code>{_e(m)}</code> {_type_html(e.get('schema', {}))}" for m, e in success.items())
    return (
        f"<details id='{_e(operation['operationId'])}'><summary><span class='m {_e(method)}'>"
        f"{_e(method.upper())}</span> {_e(path)} "
        f"<span class=muted>{_e(operation['summary'])}</span></summary>"
        f"<p>{_inline(operation['description'])}</p>"
        f"<table><tr><th>parameter</th><th>in</th><th>type</th><th>required</th></tr>{''.join(rows)}</table>"
        f"{body}<p>200: {answer}. Errors: a <a href='#schema-{STATUS_SCHEMA}'>Status</a>.</p></details>"
    )


def _schema_html(name: str, schema: dict[str, Any]) -> str:
    return (
        f"<details id='schema-{_e(name)}'><summary>{_e(name)}</summary>"
        f"<p>{_inline(schema.get('description', ''))}</p>{_properties_html(schema)}</details>"
    )


def _properties_html(schema: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td><code>{_e(name)}</code></td><td>{_type_html(field)}</td></tr>"
        for name, field in schema.get("properties", {}).items()
    )
    return f"<table><tr><th>field</th><th>type</th></tr>{rows}</table>" if rows else ""


def _type_html(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"<a href='#schema-{_e(name)}'>{_e(name)}</a>"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type_html(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map of {_type_html(schema['additionalProperties'])}"
    if "enum" in schema:
        return "one of " + ", ".join(f"<code>{_e(v)}</code>" for v in schema["enum"])
    qualifier = schema.get("format") or schema.get("pattern")
    return _e(f"{kind} ({qualifier})" if qualifier else kind)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _inline(text: str) -> str:
    """Escaped text with `code` spans and **bold** spans of the Markdown kind."""
    escaped = _e(text)
    out: list[str] = []
    for index, piece in enumerate(escaped.split("`")):
        if index % 2:
            out.append(f"<code>{piece}</code>")
        else:
            bold = piece.split("**")
            out.append("".join(f"<strong>{b}</strong>" if i % 2 else b for i, b in enumerate(bold)))
    return "".join(out)
