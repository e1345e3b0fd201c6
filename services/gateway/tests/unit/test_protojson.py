"""The compiled printer writes exactly what `json_format.MessageToDict` writes.

Messages of every type a route answers with, and of types that exercise every kind of field
(maps with typed keys, floats and their special values, bytes, open enums holding unknown
numbers, oneofs, proto3 optional, well-known types), are filled at random and printed both
ways.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from google.api import httpbody_pb2
from google.protobuf import descriptor_pb2, json_format, struct_pb2, wrappers_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from tally.common.v1 import access_pb2
from tally.payment_gateway.v1 import payment_gateway_service_pb2 as payments_api
from tally_gateway.protojson import JsonPrinter
from tally_gateway.routes import build_routing, discover_service_files

ROUTES = build_routing(
    discover_service_files(),
    frozenset({access_pb2.ROLE_APP, access_pb2.ROLE_ADMIN, access_pb2.ROLE_PLATFORM}),
).routes
RESPONSE_TYPES = sorted({route.rpc.response_type for route in ROUTES}, key=lambda t: t.DESCRIPTOR.full_name)
OTHER_TYPES = [
    descriptor_pb2.FileDescriptorProto,  # nested messages, enums, repeated, proto2 optional
    payments_api.HandleProviderWebhookRequest,  # map<string, string>, HttpBody
    httpbody_pb2.HttpBody,  # bytes, repeated Any
    status_pb2.Status,
]
_FLOATS = [0.0, 1.5, -2.25, 0.1, 3.4e38, math.inf, -math.inf, math.nan, 1e-7]


def _scalar(field: FieldDescriptor, rng: random.Random) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(["", "a", "ünïcode ✓", "x" * 20])
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.randint(0, 8))
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return rng.choice(_FLOATS)
    if kind == FieldDescriptor.TYPE_ENUM:
        numbers = [value.number for value in field.enum_type.values]
        # An open enum may hold a number it does not name.
        return rng.choice([*numbers, 99] if not field.enum_type.is_closed else numbers)
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return rng.choice([0, 1, 2**32 - 1])
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return rng.choice([0, 1, 2**64 - 1])
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return rng.choice([0, -1, 2**63 - 1, -(2**63)])
    return rng.choice([0, -1, 2**31 - 1, -(2**31)])


def fill(message: Message, rng: random.Random, depth: int = 0) -> None:
    """Set a random subset of the fields of `message`, nested messages `depth`-limited."""
    descriptor: Descriptor = message.DESCRIPTOR
    if descriptor.full_name == "google.protobuf.Timestamp":
        message.FromSeconds(rng.randint(0, 4_000_000_000))  # type: ignore[attr-defined]
        message.nanos = rng.choice([0, 500_000_000, 123_456_789])  # type: ignore[attr-defined]
        return
    if descriptor.full_name == "google.protobuf.Duration":
        message.FromNanoseconds(rng.choice([0, 1_500_000_000, -2_000_000_001, 900_000_000_000]))  # type: ignore[attr-defined]
        return
    if descriptor.full_name == "google.protobuf.Any":
        message.Pack(wrappers_pb2.StringValue(value="packed"))  # type: ignore[attr-defined]
        return
    for field in descriptor.fields:
        if rng.random() < 0.3:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            target = getattr(message, field.name)
            for _ in range(rng.randint(0, 3)):
                key = _scalar(key_field, rng)
                if value_field.message_type is not None:
                    if depth < 3:
                        fill(target[key], rng, depth + 1)
                else:
                    target[key] = _scalar(value_field, rng)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            if field.is_repeated:
                for _ in range(rng.randint(0, 2)):
                    fill(getattr(message, field.name).add(), rng, depth + 1)
            else:
                getattr(message, field.name).SetInParent()
                fill(getattr(message, field.name), rng, depth + 1)
        elif field.is_repeated:
            getattr(message, field.name).extend(_scalar(field, rng) for _ in range(rng.randint(0, 3)))
        else:
            setattr(message, field.name, _scalar(field, rng))


def _same(left: Any, right: Any) -> bool:
    """Equality where NaN equals NaN."""
    if isinstance(left, float) and isinstance(right, float) and math.isnan(left) and math.isnan(right):
        return True
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_same(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(_same(a, b) for a, b in zip(left, right, strict=True))
    return type(left) is type(right) and left == right


@pytest.mark.parametrize(
    "message_type", [*RESPONSE_TYPES, *OTHER_TYPES], ids=lambda t: t.DESCRIPTOR.full_name
)
def test_the_printer_matches_json_format(message_type: type[Message]) -> None:
    printer = JsonPrinter()
    rng = random.Random(message_type.DESCRIPTOR.full_name)
    for _ in range(40):
        message = message_type()
        fill(message, rng)
        expected = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
        assert _same(printer.to_dict(message), expected), message


@pytest.mark.parametrize(
    "message",
    [
        struct_pb2.Struct(
            fields={"a": struct_pb2.Value(number_value=1.5), "b": struct_pb2.Value(null_value=0)}
        ),
        struct_pb2.Value(list_value=struct_pb2.ListValue(values=[struct_pb2.Value(string_value="x")])),
        wrappers_pb2.Int64Value(value=2**40),
        wrappers_pb2.FloatValue(value=0.1),
        wrappers_pb2.BytesValue(value=b"\x00\xff"),
    ],
    ids=lambda m: m.DESCRIPTOR.full_name,
)
def test_well_known_types_print_in_their_json_form(message: Message) -> None:
    expected = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    assert _same(JsonPrinter().to_dict(message), expected)
