"""Values for the fuzz tests: any JSON value (hypothesis), valid request bodies with fields replaced by such values
or, one at a time, by each edge value that broke servers before, and protobuf messages with every scalar field
drawn from its whole wire range."""

from __future__ import annotations

import copy
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.text(st.one_of(st.characters(), SURROGATES), max_size=12)
INTEGERS = st.one_of(st.integers(-3, 70), st.integers(-(2**70), 2**70),
                     st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1]))
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.one_of(st.none(), st.booleans(), INTEGERS, FLOATS, TEXT)
EDGE_VALUES = [2**64, -(2**64), 10**20, 2**63, float("nan"), float("inf"), -1, 0, "a\ud800b", "", [], {}, None,
               True, [10**20], ["\udfff"]]  # what broke servers before
EDGES = st.sampled_from(EDGE_VALUES)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document where a value sits (dict keys, list indices), outermost first."""
    paths = [prefix] if prefix else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        paths.extend(_paths(item, (*prefix, key)))
    return paths


def _set(document: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        document = document[key]
    document[path[-1]] = value


def edge_cases(body: dict[str, Any]) -> list[Any]:
    """`body` with each field, at every depth, set to each of EDGE_VALUES in turn (one field at a time)."""
    cases = []
    for path in _paths(body):
        for value in EDGE_VALUES:
            case = copy.deepcopy(body)
            _set(case, path, copy.deepcopy(value))
            cases.append(case)
    return cases


@st.composite
def mutated(draw: st.DrawFn, bases: list[dict[str, Any]]) -> Any:
    """A valid body with one to three of its fields (at any depth) replaced by any JSON value, a key added, or
    now and then any JSON value instead of the whole body."""
    if draw(st.integers(0, 19)) == 0:
        return draw(JSON)
    body = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):  # mostly one field, so that no other masks it
        paths = _paths(body)
        kind = draw(st.integers(0, 4))
        if kind == 0 or not paths:
            body[draw(TEXT)] = draw(JSON)  # a field nobody asked for
            continue
        top = [path for path in paths if len(path) == 1]
        path = draw(st.sampled_from(top if kind <= 2 else paths))  # top-level fields most often
        _set(body, path, copy.deepcopy(draw(st.one_of(EDGES, EDGES, SCALARS, JSON))))  # EDGES are shared objects
    return body


_SCALAR_FIELDS = {
    FieldDescriptor.TYPE_DOUBLE: FLOATS,
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32, allow_nan=True, allow_infinity=True),
    FieldDescriptor.TYPE_INT64: st.one_of(st.integers(-3, 70), st.integers(-(2**63), 2**63 - 1)),
    FieldDescriptor.TYPE_UINT64: st.one_of(st.integers(0, 70), st.integers(0, 2**64 - 1)),
    FieldDescriptor.TYPE_INT32: st.one_of(st.integers(-3, 70), st.integers(-(2**31), 2**31 - 1)),
    FieldDescriptor.TYPE_UINT32: st.one_of(st.integers(0, 70), st.integers(0, 2**32 - 1)),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: st.text(max_size=12),  # protobuf strings are UTF-8 (raw-byte tests go further)
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
    FieldDescriptor.TYPE_ENUM: st.integers(-2, 5),
}


def message_values(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Some of the message's fields (each present or not), scalars over their whole wire range."""
    fields = {}
    for field in descriptor.fields:
        if field.message_type is not None:
            if depth >= 4:
                continue
            value = message_values(field.message_type, depth + 1)
        else:
            value = _SCALAR_FIELDS[field.type]
        fields[field.name] = st.lists(value, max_size=3) if field.is_repeated else value
    return st.fixed_dictionaries({}, optional=fields)


def fill(message: Message, values: dict[str, Any]) -> Message:
    """Set `values` (from message_values) on `message`; returns it."""
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if field.message_type is not None:
            for item in value if field.is_repeated else [value]:
                fill(target.add() if field.is_repeated else target, item)
        elif field.is_repeated:
            target.extend(value)
        else:
            setattr(message, name, value)
    return message
