"""Hypothesis strategies for fuzzing the wire protocol, derived from the msgspec types themselves.

``messages()`` walks ``msgspec.inspect.type_info(protocol.Message)``: every Struct of the union,
every field with its ``Meta`` constraints (int ranges, string and list lengths, literals,
unions, nested Structs). A message added to ``protocol.py`` is therefore fuzzed without touching
the tests; a field of a type this walker does not know fails loudly (teach it, below).

Lists are capped (``max_scalar_items``, ``max_struct_items``) so an example builds in
milliseconds; ``fill=True`` also draws lists at their schema maximum (one repeated element,
cheap to build), which is what oversized frames are made of. ``largest()`` is the deterministic
worst case of a type: every bound at its longest encoding, every list full (lists of Structs:
as many items as it takes to pass ``MAX_FRAME_BYTES``, when the schema allows that many).

Also here: arbitrary msgpack values (``msgpack_values``), maps that look like messages
(``tagged_maps``), valid messages with one value changed (``mutated_frames``) and byte-level
corruptions of valid frames (``corrupted_frames``), for the decoder's "only ProtocolError" test
and the live socket fuzz.
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import strategies as st

from p2psched import PROTOCOL_VERSION
from p2psched.core import protocol

MSGPACK_INT_MIN = -(1 << 63)
MSGPACK_INT_MAX = (1 << 64) - 1  # msgpack's widest integers; msgspec cannot encode beyond these
MAX_SCALAR_ITEMS = 8
MAX_STRUCT_ITEMS = 3
WIDEST_CHAR = "\U0010ffff"  # four bytes in UTF-8

T = msgspec.inspect  # msgspec's descriptions of types: T.IntType, T.StructType, ...


def message_types() -> list[T.StructType]:
    """The Struct types of ``protocol.Message``, as msgspec sees them."""
    info = T.type_info(protocol.Message)
    members = info.types if isinstance(info, T.UnionType) else (info,)
    assert all(isinstance(m, T.StructType) for m in members), members
    return list(members)  # type: ignore[arg-type]


def _int_bounds(info: T.IntType) -> tuple[int, int]:
    lo = MSGPACK_INT_MIN if info.ge is None and info.gt is None else (
        info.ge if info.ge is not None else info.gt + 1)
    hi = MSGPACK_INT_MAX if info.le is None and info.lt is None else (
        info.le if info.le is not None else info.lt - 1)
    return max(lo, MSGPACK_INT_MIN), min(hi, MSGPACK_INT_MAX)


def _ints(info: T.IntType) -> st.SearchStrategy[int]:
    lo, hi = _int_bounds(info)
    edges = sorted({v for v in (lo, lo + 1, hi - 1, hi, 0, 1, -1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1,
                                (1 << 63) - 1) if lo <= v <= hi})
    ints = st.one_of(st.sampled_from(edges), st.integers(lo, hi))
    if info.multiple_of:
        step = info.multiple_of
        ints = ints.map(lambda v: v - v % step).filter(lambda v: lo <= v <= hi)
    return ints


def _floats(info: T.FloatType) -> st.SearchStrategy[float]:
    # Finite only: a real node sends clock times and probabilities, and nan != nan breaks equality.
    lo = info.ge if info.ge is not None else info.gt
    hi = info.le if info.le is not None else info.lt
    return st.floats(min_value=lo, max_value=hi, exclude_min=info.gt is not None,
                     exclude_max=info.lt is not None, allow_nan=False, allow_infinity=False)


def _strs(info: T.StrType, fill: bool) -> st.SearchStrategy[str]:
    lo, hi = info.min_length or 0, info.max_length
    if info.pattern is not None:
        return st.from_regex(info.pattern, fullmatch=True).filter(
            lambda s: lo <= len(s) <= (hi if hi is not None else len(s)))
    text = st.text(min_size=lo, max_size=min(hi, 64) if hi is not None else 64)
    if fill and hi is not None:
        text = st.one_of(text, st.just(WIDEST_CHAR * hi))
    return text


def _lists(info: T.ListType | T.VarTupleType | T.SetType | T.FrozenSetType, fill: bool,
           struct_cap: int, scalar_cap: int) -> st.SearchStrategy[Any]:
    item = strategy_for(info.item_type, fill=fill)
    lo = info.min_length or 0
    is_struct = isinstance(info.item_type, T.StructType)
    cap = struct_cap if is_struct else scalar_cap
    schema_hi = info.max_length
    hi = max(lo, min(cap, schema_hi) if schema_hi is not None else cap)
    lists = st.lists(item, min_size=lo, max_size=hi)
    if isinstance(info, (T.SetType, T.FrozenSetType)):
        kind = set if isinstance(info, T.SetType) else frozenset
        return st.sets(item, min_size=lo, max_size=hi).map(kind)
    if fill and schema_hi is not None:
        full = schema_hi if not is_struct else max(lo, min(schema_hi, 4))  # full lists of Structs: gigabytes
        lists = st.one_of(lists, st.builds(lambda x, n: [x] * n, item, st.sampled_from(sorted({lo, full}))))
    if isinstance(info, T.VarTupleType):
        return lists.map(tuple)
    return lists


def _structs(info: T.StructType, fill: bool) -> st.SearchStrategy[Any]:
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for f in info.fields:
        if info.tag_field is not None and f.name == "v":
            value: st.SearchStrategy[Any] = st.just(PROTOCOL_VERSION)  # the one version a node accepts
        else:
            value = strategy_for(f.type, fill=fill)
        (required if f.required else optional)[f.name] = value
    return st.fixed_dictionaries(required, optional=optional).map(lambda kw: info.cls(**kw))


def strategy_for(info: T.Type, *, fill: bool = False, struct_cap: int = MAX_STRUCT_ITEMS,
                 scalar_cap: int = MAX_SCALAR_ITEMS) -> st.SearchStrategy[Any]:
    """Valid values of a msgspec type (as ``msgspec.inspect`` describes it)."""
    if isinstance(info, T.IntType):
        return _ints(info)
    if isinstance(info, T.FloatType):
        return _floats(info)
    if isinstance(info, T.StrType):
        return _strs(info, fill)
    if isinstance(info, T.BoolType):
        return st.booleans()
    if isinstance(info, T.NoneType):
        return st.none()
    if isinstance(info, (T.BytesType, T.ByteArrayType)):
        data = st.binary(min_size=info.min_length or 0, max_size=min(info.max_length or 64, 64))
        return data.map(bytearray) if isinstance(info, T.ByteArrayType) else data
    if isinstance(info, T.LiteralType):
        return st.sampled_from(info.values)
    if isinstance(info, T.EnumType):
        return st.sampled_from(list(info.cls))
    if isinstance(info, T.UnionType):
        return st.one_of([strategy_for(m, fill=fill, struct_cap=struct_cap, scalar_cap=scalar_cap)
                          for m in info.types])
    if isinstance(info, (T.ListType, T.VarTupleType, T.SetType, T.FrozenSetType)):
        return _lists(info, fill, struct_cap, scalar_cap)
    if isinstance(info, T.TupleType):
        return st.tuples(*[strategy_for(t, fill=fill) for t in info.item_types])
    if isinstance(info, T.DictType):
        return st.dictionaries(strategy_for(info.key_type), strategy_for(info.value_type, fill=fill),
                               min_size=info.min_length or 0, max_size=min(info.max_length or 4, 4))
    if isinstance(info, T.StructType):
        return _structs(info, fill)
    raise NotImplementedError(f"tests/fuzz_strategies.py cannot fuzz {info!r} yet: teach strategy_for()")


def messages(*, fill: bool = False) -> st.SearchStrategy[protocol.Message]:
    """Every kind of protocol message, valid by construction, version ``PROTOCOL_VERSION``."""
    return st.one_of([strategy_for(m, fill=fill) for m in message_types()])


def messages_of(cls: type, *, fill: bool = False) -> st.SearchStrategy[Any]:
    return strategy_for(T.type_info(cls), fill=fill)


# ---- deterministic extremes ----

def largest(info: T.Type) -> Any:
    """The value of a type with the longest msgpack encoding (lists of Structs capped)."""
    if isinstance(info, T.IntType):
        lo, hi = _int_bounds(info)
        return hi if hi >= -lo else lo
    if isinstance(info, T.FloatType):
        return float(info.le if info.le is not None else info.ge if info.ge is not None else 1.0)
    if isinstance(info, T.StrType):
        assert info.pattern is None, "largest() of a str with a pattern: teach it"
        return WIDEST_CHAR * (info.max_length if info.max_length is not None else 1 << 16)
    if isinstance(info, T.BoolType):
        return True
    if isinstance(info, T.NoneType):
        return None
    if isinstance(info, (T.BytesType, T.ByteArrayType)):
        return b"\xff" * (info.max_length if info.max_length is not None else 1 << 16)
    if isinstance(info, T.LiteralType):
        return max(info.values, key=lambda v: len(msgspec.msgpack.encode(v)))
    if isinstance(info, T.EnumType):
        return max(info.cls, key=lambda v: len(msgspec.msgpack.encode(v)))
    if isinstance(info, T.UnionType):
        return max((largest(m) for m in info.types), key=lambda v: len(msgspec.msgpack.encode(v)))
    if isinstance(info, (T.ListType, T.VarTupleType)):
        n = info.max_length if info.max_length is not None else 1 << 16
        item = largest(info.item_type)
        if isinstance(info.item_type, T.StructType):  # enough items to pass the frame cap, if the schema allows
            n = max(info.min_length or 0, min(n, protocol.MAX_FRAME_BYTES // len(msgspec.msgpack.encode(item)) + 2))
        items = [item] * n
        return tuple(items) if isinstance(info, T.VarTupleType) else items
    if isinstance(info, T.StructType):
        kw = {f.name: PROTOCOL_VERSION if info.tag_field is not None and f.name == "v" else largest(f.type)
              for f in info.fields}
        return info.cls(**kw)
    raise NotImplementedError(f"tests/fuzz_strategies.py: largest() of {info!r}: teach it")


# ---- invalid input ----

BOUNDARY_INTS = [0, 1, -1, 127, 128, 255, 256, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40,
                 (1 << 62), (1 << 62) + 1, (1 << 63) - 1, 1 << 63, MSGPACK_INT_MAX, MSGPACK_INT_MIN,
                 -(1 << 31), PROTOCOL_VERSION, PROTOCOL_VERSION + 1]


def msgpack_scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(), st.booleans(),
        st.sampled_from(BOUNDARY_INTS), st.integers(MSGPACK_INT_MIN, MSGPACK_INT_MAX),
        st.floats(),  # nan, inf, -0.0, subnormals
        st.sampled_from([float("nan"), float("inf"), float("-inf")]),
        st.text(max_size=40), st.sampled_from(["", "steal", "grant", "tokens", "v", "t", WIDEST_CHAR * 300]),
        st.binary(max_size=40),
        st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=12)),
    )


def msgpack_values() -> st.SearchStrategy[Any]:
    """Anything msgspec can write as msgpack: nested arrays and maps, any key type, extensions."""
    keys = st.one_of(st.text(max_size=12), st.sampled_from(BOUNDARY_INTS[:8]), st.binary(max_size=4))
    return st.recursive(msgpack_scalars(), lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(keys, inner, max_size=6)), max_leaves=24)


def _all_field_names() -> list[str]:
    names: set[str] = set()

    def walk(info: T.Type) -> None:
        if isinstance(info, T.StructType):
            for f in info.fields:
                names.add(f.encode_name)
                walk(f.type)
        elif isinstance(info, (T.ListType, T.VarTupleType, T.SetType, T.FrozenSetType)):
            walk(info.item_type)
        elif isinstance(info, T.UnionType):
            for m in info.types:
                walk(m)

    for m in message_types():
        walk(m)
    return sorted(names)


def tagged_maps() -> st.SearchStrategy[dict[Any, Any]]:
    """Maps with a message tag, often the right version, and known field names with any values."""
    tags = [m.tag for m in message_types()]
    return st.builds(
        lambda t, v, rest: {**rest, **t, **v},
        st.one_of(st.fixed_dictionaries({"t": st.sampled_from(tags)}), st.fixed_dictionaries({"t": msgpack_values()}),
                  st.just({})),
        st.one_of(st.just({"v": PROTOCOL_VERSION}), st.fixed_dictionaries({"v": msgpack_scalars()}), st.just({})),
        st.dictionaries(st.sampled_from(_all_field_names()), msgpack_values(), max_size=8))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(tree: Any, path: tuple[Any, ...], action: str, new: Any, key: Any) -> Any:
    if not path:
        return new if action != "add" or not isinstance(tree, dict) else {**tree, key: new}
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        tree = dict(tree)
        if not rest and action == "delete":
            del tree[head]
        else:
            tree[head] = _mutate(tree[head], rest, action, new, key)
        return tree
    tree = list(tree)
    if not rest and action == "delete":
        del tree[head]
    else:
        tree[head] = _mutate(tree[head], rest, action, new, key)
    return tree


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid message with one value replaced, one key dropped or one key added, encoded."""
    tree = msgspec.to_builtins(draw(messages()))
    path = draw(st.sampled_from(_paths(tree)))
    action = draw(st.sampled_from(["replace", "delete", "add"] if path else ["replace", "add"]))
    new = draw(msgpack_values())
    key = draw(st.one_of(st.sampled_from(_all_field_names()), st.text(max_size=8)))
    return msgspec.msgpack.encode(_mutate(tree, path, action, new, key))


@st.composite
def corrupted_frames(draw: st.DrawFn) -> bytes:
    """A valid frame truncated, with bytes flipped, inserted, or another frame appended."""
    frame = protocol.encode(draw(messages()))
    how = draw(st.sampled_from(["truncate", "flip", "insert", "append"]))
    if how == "truncate":
        return frame[:draw(st.integers(0, len(frame) - 1))]
    if how == "append":
        return frame + draw(st.one_of(st.binary(min_size=1, max_size=8), st.just(frame)))
    at = draw(st.integers(0, len(frame) - 1))
    if how == "flip":
        return frame[:at] + bytes([frame[at] ^ draw(st.integers(1, 255))]) + frame[at + 1:]
    return frame[:at] + draw(st.binary(min_size=1, max_size=8)) + frame[at:]


def invalid_frames() -> st.SearchStrategy[bytes]:
    """Frames a node must count and drop (mostly: a mutation can land on another valid message)."""
    return st.one_of(
        st.binary(max_size=256),
        msgpack_values().map(msgspec.msgpack.encode),
        tagged_maps().map(msgspec.msgpack.encode),
        mutated_frames(),
        corrupted_frames(),
    )
