"""Fuzzing the wire protocol (hypothesis): the decoder only ever raises ProtocolError, every valid
message round-trips, and no valid message leaves a node as a frame its peers must drop.

The message strategies are derived from the msgspec types (``tests/fuzz_strategies.py``), so
a message added to ``protocol.py`` is fuzzed here without a change to this file.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from p2psched import PROTOCOL_VERSION
from p2psched.core import protocol
from p2psched.core.errors import ProtocolError
from p2psched.core.protocol import MAX_FRAME_BYTES, decode, encode

from ..fuzz_strategies import (
    T,
    invalid_frames,
    largest,
    message_types,
    messages,
    msgpack_values,
    strategy_for,
)

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _decode_or_protocol_error(frame: bytes) -> protocol.Message | None:
    """decode(); None for a ProtocolError. Any other exception fails the test."""
    try:
        message = decode(frame)
    except ProtocolError:
        return None
    assert isinstance(message, message_classes()), type(message)
    assert message.v == PROTOCOL_VERSION
    assert encode(decode(encode(message))) == encode(message)  # what decodes re-encodes stably
    return message


def message_classes() -> tuple[type, ...]:
    return tuple(m.cls for m in message_types())


# ---- (a) anything in: ProtocolError or a valid message, nothing else ----

@FUZZ
@given(invalid_frames())
@example(b"")
@example(b"\xc1")  # the one byte msgpack never uses
@example(b"\x91" * 100_000 + b"\xc0")  # deep nesting
@example(b"\xdd\xff\xff\xff\xff")  # an array announcing 4G items
@example(b"\xdf\xff\xff\xff\xff")  # a map announcing 4G pairs
@example(b"\xc6\xff\xff\xff\xff")  # a bin announcing 4 GiB
@example(b"\x91" + b"\x00" * (MAX_FRAME_BYTES + 1))  # oversized
@example(msgspec.msgpack.encode({"t": "steal", "v": (1 << 64) - 1}))
@example(msgspec.msgpack.encode({"t": "steal", "v": -(1 << 63)}))
def test_decode_raises_only_protocol_error(frame: bytes) -> None:
    _decode_or_protocol_error(frame)


@FUZZ
@given(msgpack_values())
def test_decode_of_any_msgpack_value_raises_only_protocol_error(value: Any) -> None:
    _decode_or_protocol_error(msgspec.msgpack.encode(value))


@FUZZ
@given(messages(), st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1).filter(lambda v: v != PROTOCOL_VERSION))
def test_decode_refuses_every_other_protocol_version(message: protocol.Message, version: int) -> None:
    tree = msgspec.to_builtins(message)
    tree["v"] = version
    with pytest.raises(ProtocolError):
        decode(msgspec.msgpack.encode(tree))


def _float_paths(info: T.Type, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths (in the builtins tree of ``_smallest(info)``) of every float field."""
    if isinstance(info, T.FloatType):
        return [prefix]
    if isinstance(info, T.StructType):
        out = []
        for i, f in enumerate(info.fields):
            out += _float_paths(f.type, prefix + ((i if info.array_like else f.encode_name),))
        return out
    if isinstance(info, (T.ListType, T.VarTupleType)):
        return _float_paths(info.item_type, prefix + (0,))
    return []


def _smallest(info: T.Type) -> Any:
    """A valid value with one item in each list (so nested floats exist)."""
    if isinstance(info, T.StructType):
        return info.cls(**{f.name: PROTOCOL_VERSION if info.tag_field and f.name == "v" else _smallest(f.type)
                           for f in info.fields})
    if isinstance(info, (T.ListType, T.VarTupleType)):
        return [_smallest(info.item_type)] * max(1, info.min_length or 0)
    if isinstance(info, T.UnionType):
        return _smallest(info.types[0])
    if isinstance(info, T.LiteralType):
        return info.values[0]
    if isinstance(info, T.StrType):
        return "x" * max(1, info.min_length or 0)
    if isinstance(info, T.IntType):
        return max(1, info.ge or 0, (info.gt or 0) + 1)
    if isinstance(info, T.FloatType):
        return float(info.le if info.le is not None else 1.0)
    if isinstance(info, T.BoolType):
        return False
    if isinstance(info, T.NoneType):
        return None
    raise NotImplementedError(f"_smallest() of {info!r}: teach it")


def _non_finite_cases() -> list[tuple[str, tuple[Any, ...], float]]:
    return [(m.tag, path, bad) for m in message_types() for path in _float_paths(m)
            for bad in (math.nan, math.inf, -math.inf)]


@pytest.mark.parametrize("tag, path, bad", _non_finite_cases(),
                         ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_decode_refuses_non_finite_floats(tag: str, path: tuple[Any, ...], bad: float) -> None:
    """A peer's NaN or infinity (a deadline, a temperature) is not a value any float field means."""
    info = next(m for m in message_types() if m.tag == tag)
    tree = msgspec.to_builtins(_smallest(info))
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad
    with pytest.raises(ProtocolError):
        decode(msgspec.msgpack.encode(tree))


# ---- (b) every valid message round-trips ----

@FUZZ
@given(messages())
def test_every_valid_message_round_trips(message: protocol.Message) -> None:
    assert decode(encode(message)) == message


@pytest.mark.parametrize("info", message_types(), ids=lambda m: m.tag)
@settings(derandomize=True, database=None, deadline=None, max_examples=40,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_each_message_type_round_trips(info: T.StructType, data: st.DataObject) -> None:
    """Each type on its own too, so a rarely drawn type still gets its examples."""
    message = data.draw(strategy_for(info))
    assert decode(encode(message)) == message


# ---- (c) what a node sends fits in a frame its peers accept ----

def _encode_fits_or_is_refused(message: protocol.Message) -> None:
    try:
        frame = encode(message)
    except ProtocolError:
        return
    assert len(frame) <= MAX_FRAME_BYTES, (
        f"encode() produced a {type(message).__name__} frame of {len(frame)} bytes, over MAX_FRAME_BYTES "
        f"{MAX_FRAME_BYTES}: every peer drops it")
    assert decode(frame) == message


@settings(derandomize=True, database=None, deadline=None, max_examples=150,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(messages(fill=True))
def test_every_valid_message_fits_in_a_frame_or_encode_refuses_it(message: protocol.Message) -> None:
    _encode_fits_or_is_refused(message)


@pytest.mark.parametrize("info", message_types(), ids=lambda m: m.tag)
def test_the_largest_message_of_each_type_fits_or_encode_refuses_it(info: T.StructType) -> None:
    """Every bound at its longest encoding, every list full (see ``fuzz_strategies.largest``)."""
    _encode_fits_or_is_refused(largest(info))
