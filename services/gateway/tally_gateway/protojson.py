"""Protobuf messages to proto3 JSON values, as `json_format.MessageToDict(message,
always_print_fields_with_no_presence=True)` makes them, several times faster.

`json_format` works out, for every field of every message it prints, what kind of field it
is and how to print it. Every response the gateway sends goes through here, so that work is
done once per message type: a plan lists each field with the function that prints its value.
Well-known types print as `json_format` prints them (Timestamp, Duration and FieldMask as
text, wrappers as their value); the rarer dynamic ones (Any, Struct, Value, ListValue, Empty)
are handed to `json_format` itself. A test holds this module to `json_format`'s output.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

Printer = Callable[[Any], Any]

# How a field is printed: always (a singular field without presence, a map), only when set
# (a field with presence: a message, a `optional` scalar, a oneof member), or value by value.
_ALWAYS, _WHEN_SET, _EACH = range(3)
# (field name, JSON name, printer, how)
_Plan = tuple[tuple[str, str, Printer, int], ...]

_TEXT_TYPES = frozenset(
    {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}
)
_WRAPPERS = frozenset(
    {
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
_DYNAMIC_TYPES = frozenset(
    {
        "google.protobuf.Any",
        "google.protobuf.Struct",
        "google.protobuf.Value",
        "google.protobuf.ListValue",
        "google.protobuf.Empty",
    }
)
_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_FIXED64,
    }
)


class JsonPrinter:
    """Prints messages to JSON values; one instance keeps the plans of the types it has met."""

    def __init__(self) -> None:
        self._plans: dict[str, _Plan] = {}

    def to_dict(self, message: Message) -> Any:
        """The proto3 JSON value of `message` (a dict, or text or a number for a well-known type)."""
        return self._message_printer(message.DESCRIPTOR)(message)

    def _message_printer(self, descriptor: Descriptor) -> Printer:
        name = descriptor.full_name
        if name in _TEXT_TYPES:
            return _to_json_string
        if name in _WRAPPERS:
            value_printer = self._field_printer(descriptor.fields_by_name["value"])
            return lambda message: value_printer(message.value)
        if name in _DYNAMIC_TYPES:
            return _with_json_format

        def print_message(message: Message) -> dict[str, Any]:
            return self._print(self._plan(descriptor), message)

        return print_message

    def _plan(self, descriptor: Descriptor) -> _Plan:
        # Planned on first print, not when a containing message is planned: a message that
        # contains itself is planned once.
        plan = self._plans.get(descriptor.full_name)
        if plan is None:
            plan = self._plans[descriptor.full_name] = tuple(
                self._entry(field) for field in descriptor.fields
            )
        return plan

    def _entry(self, field: FieldDescriptor) -> tuple[str, str, Printer, int]:
        if field.is_repeated and field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type
            return (
                field.name,
                field.json_name,
                _map_printer(self._field_printer(entry.fields_by_name["value"])),
                _ALWAYS,
            )
        if field.is_repeated:
            return field.name, field.json_name, self._field_printer(field), _EACH
        how = _WHEN_SET if field.has_presence else _ALWAYS
        return field.name, field.json_name, self._field_printer(field), how

    def _field_printer(self, field: FieldDescriptor) -> Printer:
        kind = field.type
        if kind == FieldDescriptor.TYPE_MESSAGE:
            return self._message_printer(field.message_type)
        if kind == FieldDescriptor.TYPE_ENUM:
            return _enum_printer(field.enum_type)
        if kind in _INT64_TYPES:
            return str
        if kind == FieldDescriptor.TYPE_BYTES:
            return _base64
        if kind == FieldDescriptor.TYPE_FLOAT:
            return _float32
        if kind == FieldDescriptor.TYPE_DOUBLE:
            return _double
        return _same

    @staticmethod
    def _print(plan: _Plan, message: Message) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for name, json_name, printer, how in plan:
            if how == _ALWAYS:
                document[json_name] = printer(getattr(message, name))
            elif how == _EACH:
                document[json_name] = [printer(value) for value in getattr(message, name)]
            elif message.HasField(name):
                document[json_name] = printer(getattr(message, name))
        return document


def _same(value: Any) -> Any:
    return value


def _to_json_string(message: Any) -> str:
    return message.ToJsonString()


def _with_json_format(message: Message) -> Any:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def _base64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _enum_printer(enum: EnumDescriptor) -> Printer:
    if enum.full_name == "google.protobuf.NullValue":
        return lambda _: None
    names = {value.number: value.name for value in enum.values}
    # An open enum may hold a number it does not name: it is printed as the number.
    return lambda number: names.get(number, number)


def _map_printer(value_printer: Printer) -> Printer:
    def print_map(mapping: Any) -> dict[str, Any]:
        return {_map_key(key): value_printer(mapping[key]) for key in mapping}

    return print_map


def _map_key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def _non_finite(value: float) -> str | None:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return None


def _double(value: float) -> float | str:
    text = _non_finite(value)
    return value if text is None else text


def _float32(value: float) -> float | str:
    """The shortest decimal that reads back as the same 32-bit float, as `json_format` writes it."""
    text = _non_finite(value)
    if text is not None:
        return text
    for precision in range(6, 10):
        rounded = float(f"{value:.{precision}g}")
        if struct.unpack("<f", struct.pack("<f", rounded))[0] == value:
            return rounded
    return value
