"""Typed value codec: Python values to a plain tree and back, with type identity.

A *tree* is built only from ``None``, ``bool``, ``int`` (64-bit), ``float`` (finite), ``str``,
``bytes``, ``list`` and ``dict[str, tree]``, so msgspec encodes it to msgpack and JSON alike.
Every other type becomes a one-key dict whose key starts with ``$`` (a tag)::

    >>> to_tree((1, Decimal("NaN")))
    {'$tuple': [1, {'$decimal': 'NaN'}]}
    >>> from_tree(to_tree((1, Decimal("NaN"))))
    (1, Decimal('NaN'))

``bytes`` stay ``bytes`` in msgpack and become base64 text in JSON; ``from_tree`` accepts both.
Driver types (bson, asyncpg, asyncpg's composite ``Record``) are handled by name, so this
module imports no driver. A subclass of a builtin keeps its base's encoding, except in values a
shim encodes with :func:`to_tree_typed` (what a driver returned), where its class is kept too.
"""

from __future__ import annotations

import base64
import contextvars
import datetime as dt
import enum
import importlib
import ipaddress
import logging
import math
import uuid
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import msgspec

from timetracer_otel.errors import ReplayUnsupportedError

Tree = Any
_Encoder = Callable[[Any], Tree]
_Decoder = Callable[[Tree], Any]

_sort_pack = msgspec.msgpack.Encoder(order="sorted").encode
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


def as_bytes(value: bytes | str) -> bytes:
    """Bytes from a tree leaf: msgpack keeps bytes, JSON carries base64 text."""
    return value if isinstance(value, bytes) else base64.b64decode(value)


# --- tzinfo: keep the kind (timezone.utc, fixed offset, ZoneInfo, bson FixedOffset) ----------


def _tz_to_tree(tz: dt.tzinfo | None, ref: dt.datetime | None) -> Tree:
    if tz is None:
        return None
    if tz is dt.timezone.utc:
        return "utc"
    if type(tz) is dt.timezone:
        offset = tz.utcoffset(None)
        name = tz.tzname(None)
        default_name = dt.timezone(offset).tzname(None)
        return ["fixed", _td_to_list(offset), None if name == default_name else name]
    if isinstance(tz, ZoneInfo) and tz.key is not None:
        return ["zoneinfo", tz.key]
    cls = type(tz)
    path = f"{cls.__module__}.{cls.__qualname__}"
    offset = tz.utcoffset(ref) or dt.timedelta(0)
    if path == "bson.tz_util.FixedOffset":
        return ["bson", _td_to_list(offset), tz.tzname(ref)]
    zone = getattr(tz, "zone", None) or getattr(tz, "key", None)
    if isinstance(zone, str):
        try:
            ZoneInfo(zone)
            return ["zoneinfo", zone]
        except Exception:
            pass
    # Unknown tzinfo class: keep the instant exactly, as a fixed offset.
    return ["fixed", _td_to_list(offset), tz.tzname(ref)]


def _tz_from_tree(tree: Tree) -> dt.tzinfo | None:
    if tree is None:
        return None
    if tree == "utc":
        return dt.timezone.utc
    kind = tree[0]
    if kind == "fixed":
        offset = _td_from_list(tree[1])
        return dt.timezone(offset, tree[2]) if tree[2] is not None else dt.timezone(offset)
    if kind == "zoneinfo":
        return ZoneInfo(tree[1])
    if kind == "bson":
        from bson.tz_util import FixedOffset  # type: ignore[import-not-found,unused-ignore]

        return FixedOffset(_td_from_list(tree[1]), tree[2])  # type: ignore[no-any-return,unused-ignore]
    raise ReplayUnsupportedError(f"Unknown tzinfo kind {kind!r} in cassette; upgrade timetracer-otel.")


def _td_to_list(td: dt.timedelta) -> list[int]:
    return [td.days, td.seconds, td.microseconds]


def _td_from_list(parts: list[int]) -> dt.timedelta:
    return dt.timedelta(days=parts[0], seconds=parts[1], microseconds=parts[2])


def _enc_datetime(v: dt.datetime) -> Tree:
    return {"$datetime": [v.replace(tzinfo=None).isoformat(), _tz_to_tree(v.tzinfo, v), v.fold]}


def _dec_datetime(t: Tree) -> dt.datetime:
    iso, tz, fold = t
    return dt.datetime.fromisoformat(iso).replace(tzinfo=_tz_from_tree(tz), fold=fold)


def _enc_time(v: dt.time) -> Tree:
    return {"$time": [v.replace(tzinfo=None).isoformat(), _tz_to_tree(v.tzinfo, None), v.fold]}


def _dec_time(t: Tree) -> dt.time:
    iso, tz, fold = t
    return dt.time.fromisoformat(iso).replace(tzinfo=_tz_from_tree(tz), fold=fold)


def _enc_float(v: float) -> Tree:
    if math.isfinite(v):
        return v
    return {"$float": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}


def _enc_int(v: int) -> Tree:
    return v if _INT_MIN <= v <= _INT_MAX else {"$int": str(v)}


def _members(v: set[Any] | frozenset[Any]) -> list[Tree]:
    """A set's members as trees, in the order of their encodings: iteration order follows the
    string hash seed, so sets (and the replay keys built from them) would differ between
    processes."""
    trees = [to_tree(x) for x in v]
    if len(trees) < 2:
        return trees
    try:
        return sorted(trees, key=_sort_pack)
    except (TypeError, ValueError, OverflowError):
        return trees


def _enc_dict(v: dict[Any, Any]) -> Tree:
    for k in v:
        if type(k) is not str or k.startswith("$"):
            return {"$dict": [[to_tree(k), to_tree(x)] for k, x in v.items()]}
    return {k: to_tree(x) for k, x in v.items()}


_IP_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        ipaddress.IPv4Address,
        ipaddress.IPv6Address,
        ipaddress.IPv4Network,
        ipaddress.IPv6Network,
        ipaddress.IPv4Interface,
        ipaddress.IPv6Interface,
    )
}


def _enc_enum(v: enum.Enum) -> Tree:
    cls = type(v)
    return {"$enum": [f"{cls.__module__}:{cls.__qualname__}", to_tree(v.value)]}


def _dec_enum(t: Tree) -> Any:
    return _import(t[0])(from_tree(t[1]))


def _import(path: str) -> Any:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# Exact-type dispatch keeps the hot path to one dict lookup per value.
_ENCODERS: dict[type[Any], _Encoder] = {
    type(None): lambda v: None,
    bool: lambda v: v,
    str: lambda v: v,
    int: _enc_int,
    float: _enc_float,
    bytes: lambda v: {"$bytes": v},
    bytearray: lambda v: {"$bytearray": bytes(v)},
    memoryview: lambda v: {"$bytes": v.tobytes()},
    list: lambda v: [to_tree(x) for x in v],
    tuple: lambda v: {"$tuple": [to_tree(x) for x in v]},
    set: lambda v: {"$set": _members(v)},
    frozenset: lambda v: {"$frozenset": _members(v)},
    dict: _enc_dict,
    Decimal: lambda v: {"$decimal": str(v)},
    dt.datetime: _enc_datetime,
    dt.date: lambda v: {"$date": v.isoformat()},
    dt.time: _enc_time,
    dt.timedelta: lambda v: {"$timedelta": _td_to_list(v)},
    uuid.UUID: lambda v: {"$uuid": str(v)},
    **{cls: (lambda v: {"$ip": [type(v).__name__, str(v)]}) for cls in _IP_TYPES.values()},
}

_DECODERS: dict[str, _Decoder] = {
    "$int": lambda t: int(t),
    "$float": lambda t: float(t),
    "$bytes": as_bytes,
    "$bytearray": lambda t: bytearray(as_bytes(t)),
    "$tuple": lambda t: tuple(from_tree(x) for x in t),
    "$set": lambda t: {from_tree(x) for x in t},
    "$frozenset": lambda t: frozenset(from_tree(x) for x in t),
    "$dict": lambda t: {from_tree(k): from_tree(x) for k, x in t},
    "$decimal": Decimal,
    "$datetime": _dec_datetime,
    "$date": dt.date.fromisoformat,
    "$time": _dec_time,
    "$timedelta": _td_from_list,
    "$uuid": uuid.UUID,
    "$ip": lambda t: _IP_TYPES[t[0]](t[1]),
    "$enum": _dec_enum,
}


# --- driver types, matched by qualified name so no driver is imported here -------------------


def _point(v: Any) -> list[float]:
    return [float(v[0]), float(v[1])]


def _asyncpg_type(name: str) -> Any:
    import asyncpg

    return getattr(asyncpg, name)


def _enc_record(v: Any) -> Tree:
    # A composite value asyncpg decoded (always its own Record class): names and values.
    return {"$asyncpg.Record": [list(v.keys()), [to_tree(x) for x in v.values()]]}


def _dec_record(t: Tree) -> Any:
    # Built as asyncpg's composite decoder builds it: a descriptor of the names, then items.
    from asyncpg.protocol.protocol import _create_record

    names, values = t
    return _create_record({name: i for i, name in enumerate(names)} or None,
                          tuple(from_tree(x) for x in values))


# ``exact_encoder(type(v))``: the encoder :func:`to_tree` would apply to ``v`` when its type is
# a built-in one, else None; a bound dict lookup, for loops over many cells.
exact_encoder = _ENCODERS.get

_NAMED_ENCODERS: dict[str, _Encoder] = {
    "bson.objectid.ObjectId": lambda v: {"$bson.ObjectId": str(v)},
    "bson.decimal128.Decimal128": lambda v: {"$bson.Decimal128": str(v)},
    "bson.int64.Int64": lambda v: {"$bson.Int64": int(v)},
    "bson.timestamp.Timestamp": lambda v: {"$bson.Timestamp": [v.time, v.inc]},
    "bson.binary.Binary": lambda v: {"$bson.Binary": [bytes(v), v.subtype]},
    "bson.regex.Regex": lambda v: {"$bson.Regex": [v.pattern, v.flags]},
    "bson.min_key.MinKey": lambda v: {"$bson.MinKey": 1},
    "bson.max_key.MaxKey": lambda v: {"$bson.MaxKey": 1},
    "bson.code.Code": lambda v: {"$bson.Code": [str(v), to_tree(v.scope)]},
    "bson.dbref.DBRef": lambda v: {
        "$bson.DBRef": [v.collection, to_tree(v.id), v.database, to_tree(dict(v._DBRef__kwargs))]
    },
    "asyncpg.types.Range": lambda v: {
        "$asyncpg.Range": [
            to_tree(v.lower), to_tree(v.upper), v.lower_inc, v.upper_inc, v.isempty
        ]
    },
    "asyncpg.pgproto.types.Point": lambda v: {"$asyncpg.Point": _point(v)},
    "asyncpg.pgproto.types.Box": lambda v: {"$asyncpg.Box": [_point(v[0]), _point(v[1])]},
    "asyncpg.pgproto.types.Line": lambda v: {"$asyncpg.Line": [float(x) for x in v]},
    "asyncpg.pgproto.types.LineSegment": lambda v: {
        "$asyncpg.LineSegment": [_point(v[0]), _point(v[1])]
    },
    "asyncpg.pgproto.types.Path": lambda v: {
        "$asyncpg.Path": [[_point(p) for p in v], v.is_closed]
    },
    "asyncpg.pgproto.types.Polygon": lambda v: {"$asyncpg.Polygon": [_point(p) for p in v]},
    "asyncpg.pgproto.types.Circle": lambda v: {"$asyncpg.Circle": [_point(v[0]), float(v[1])]},
    "asyncpg.pgproto.types.BitString": lambda v: {"$asyncpg.BitString": v.as_string()},
    "asyncpg.protocol.record.Record": _enc_record,
    "asyncpg.protocol.protocol.Record": _enc_record,  # (where older asyncpg releases keep it)
}


def _bson(name: str) -> Any:
    import bson  # type: ignore[import-not-found,unused-ignore]

    return getattr(bson, name)


def _dec_dbref(t: Tree) -> Any:
    return _bson("DBRef")(t[0], from_tree(t[1]), t[2], **from_tree(t[3]))


def _dec_range(t: Tree) -> Any:
    lower, upper, lower_inc, upper_inc, empty = t
    return _asyncpg_type("Range")(
        from_tree(lower), from_tree(upper), lower_inc=lower_inc, upper_inc=upper_inc, empty=empty
    )


def _pt(p: list[float]) -> Any:
    return _asyncpg_type("Point")(*p)


_DECODERS.update(
    {
        "$bson.ObjectId": lambda t: _bson("ObjectId")(t),
        "$bson.Decimal128": lambda t: _bson("Decimal128")(t),
        "$bson.Int64": lambda t: _bson("Int64")(t),
        "$bson.Timestamp": lambda t: _bson("Timestamp")(t[0], t[1]),
        "$bson.Binary": lambda t: _bson("Binary")(as_bytes(t[0]), t[1]),
        "$bson.Regex": lambda t: _bson("Regex")(t[0], t[1]),
        "$bson.MinKey": lambda t: _bson("MinKey")(),
        "$bson.MaxKey": lambda t: _bson("MaxKey")(),
        "$bson.Code": lambda t: _bson("Code")(t[0], from_tree(t[1])),
        "$bson.DBRef": _dec_dbref,
        "$asyncpg.Range": _dec_range,
        "$asyncpg.Point": _pt,
        "$asyncpg.Box": lambda t: _asyncpg_type("Box")(_pt(t[0]), _pt(t[1])),
        "$asyncpg.Line": lambda t: _asyncpg_type("Line")(*t),
        "$asyncpg.LineSegment": lambda t: _asyncpg_type("LineSegment")(_pt(t[0]), _pt(t[1])),
        "$asyncpg.Path": lambda t: _asyncpg_type("Path")(
            *[_pt(p) for p in t[0]], is_closed=t[1]
        ),
        "$asyncpg.Polygon": lambda t: _asyncpg_type("Polygon")(*[_pt(p) for p in t]),
        # (its center a tuple, as asyncpg decodes it)
        "$asyncpg.Circle": lambda t: _asyncpg_type("Circle")(tuple(t[0]), t[1]),
        "$asyncpg.BitString": lambda t: _asyncpg_type("BitString")(t),
        "$asyncpg.Record": _dec_record,
    }
)


def register(cls: type[Any], tag: str, encode: _Encoder, decode: _Decoder) -> None:
    """Teach the codec a type: ``encode`` returns a tree, ``decode`` rebuilds the value.

    >>> register(Money, "myapp.Money", lambda m: [m.cents, m.currency],
    ...          lambda t: Money(t[0], t[1]))
    """
    name = tag if tag.startswith("$") else "$" + tag
    _ENCODERS[cls] = lambda v: {name: encode(v)}
    _DECODERS[name] = decode


_PLAIN: dict[type[Any], Callable[[Any], Any]] = {
    int: int.__int__, float: float.__float__, str: str.__str__, bytes: bytes.__bytes__
}


# --- subclasses of builtins: their class kept in recorded values ------------------------------

# Set while a *value* the app received is encoded (see :func:`to_tree_typed`): a subclass of a
# builtin (an OrderedDict, a named tuple a custom codec returns) is then kept with its class
# path, and rebuilt as that class. Elsewhere (request trees, which keys are made from) a
# subclass keeps its base's encoding, as it always has.
_TYPED: contextvars.ContextVar[bool] = contextvars.ContextVar("timetracer_typed", default=False)
log = logging.getLogger("timetracer_otel")
# Per class: its import path ("module:qualname"), or None when it cannot be rebuilt (warned).
_SUBCLASS_PATHS: dict[type[Any], str | None] = {}
_WARNED: set[str] = set()


def _warn_once(name: str, message: str, *args: Any) -> None:
    if name not in _WARNED:
        _WARNED.add(name)
        log.warning(message, *args)


def _rebuild(cls: type[Any], value: Any) -> Any:
    """An instance of ``cls`` (a subclass of ``type(value)``'s builtin) equal to ``value``."""
    if isinstance(value, tuple) and hasattr(cls, "_make"):  # a named tuple
        return cls._make(value)
    if isinstance(value, dt.datetime):
        return cls(value.year, value.month, value.day, value.hour, value.minute, value.second,
                   value.microsecond, value.tzinfo, fold=value.fold)
    if isinstance(value, dt.date):
        return cls(value.year, value.month, value.day)
    return cls(value)


def _subclass_path(cls: type[Any], base: type[Any], value: Any, tree: Tree) -> str | None:
    """Where ``cls`` is imported from, checked once per class: importable by its module and
    qualified name, and rebuilt from the base's value as the same class and value. If not,
    None (its values are kept as ``base``) and one warning naming the class."""
    if cls in _SUBCLASS_PATHS:
        return _SUBCLASS_PATHS[cls]
    path: str | None = f"{cls.__module__}:{cls.__qualname__}"
    try:
        if _import(f"{cls.__module__}:{cls.__qualname__}") is not cls:
            raise TypeError("another object by that name")
        rebuilt = _rebuild(cls, from_tree(tree))
        if type(rebuilt) is not cls or not rebuilt == value:
            raise TypeError("rebuilt differently")
    except Exception:
        _warn_once(
            f"{cls.__module__}.{cls.__qualname__}",
            "timetracer-otel: values of type %s.%s are recorded as plain %s and will replay as "
            "%s: the class cannot be imported by its module and name, or rebuilt from a %s "
            "(register it with timetracer_otel.codec.register to keep its type)",
            cls.__module__, cls.__qualname__, base.__name__, base.__name__, base.__name__)
        path = None
    if len(_SUBCLASS_PATHS) > 1024:  # (classes made at run time, one per call...)
        _SUBCLASS_PATHS.clear()
    _SUBCLASS_PATHS[cls] = path
    return path


def _dec_subclass(t: Tree) -> Any:
    path, tree = t
    value = from_tree(tree)
    try:
        return _rebuild(_import(path), value)
    except Exception as exc:  # (the class is not importable in this process)
        _warn_once(path, "timetracer-otel: a recorded value of type %s is replayed as a plain "
                   "%s: the class cannot be rebuilt here (%s)", path, type(value).__name__, exc)
        return value


_DECODERS["$subclass"] = _dec_subclass


def to_tree_typed(value: Any) -> Tree:
    """:func:`to_tree` for a value the app received (a query result): a subclass of a builtin
    keeps its class (``{"$subclass": ["module:qualname", base tree]}``) where that class can
    be imported and rebuilt, and is warned about once where it cannot."""
    token = _TYPED.set(True)
    try:
        return to_tree(value)
    finally:
        _TYPED.reset(token)


def typed_trees(build: Callable[[], Any]) -> Any:
    """``build()`` with values encoded as :func:`to_tree_typed` encodes them."""
    token = _TYPED.set(True)
    try:
        return build()
    finally:
        _TYPED.reset(token)


def to_tree(value: Any) -> Tree:
    """Turn ``value`` into a tree that msgspec can encode as msgpack or JSON."""
    enc = _ENCODERS.get(type(value))
    if enc is not None:
        return enc(value)
    cls = type(value)
    named = _NAMED_ENCODERS.get(f"{cls.__module__}.{cls.__qualname__}")
    if named is not None:
        return named(value)
    if isinstance(value, enum.Enum):
        return _enc_enum(value)
    # Subclasses of builtins (named tuples, str enums of other libraries...) keep their base.
    for base in (bool, int, float, str, bytes, tuple, list, dict, dt.datetime, dt.date):
        if isinstance(value, base):
            plain = _PLAIN.get(base)  # leaves must be exact types for msgspec (quoted_name...)
            tree = _ENCODERS[base](plain(value) if plain is not None else value)
            if _TYPED.get():  # (a received value: its class kept, see to_tree_typed)
                path = _subclass_path(cls, base, value, tree)
                if path is not None:
                    return {"$subclass": [path, tree]}
            return tree
    return {"$unsupported": [f"{cls.__module__}.{cls.__qualname__}", repr(value)[:200]]}


def from_trees(values: Iterable[Tree]) -> list[Any]:
    """``[from_tree(v) for v in values]``, for a column of cells that share one tag (a
    numeric, uuid or timestamp column, NULLs beside): that tag's decoder is found once, from
    the first tagged cell, and applied to each cell that carries it; any other cell goes
    through :func:`from_tree`."""
    values = list(values)
    tag = next((next(iter(v)) for v in values if type(v) is dict and len(v) == 1), None)
    dec = _DECODERS.get(tag) if tag is not None and tag.startswith("$") else None
    if dec is None:
        return [from_tree(v) for v in values]
    return [dec(v[tag]) if type(v) is dict and len(v) == 1 and tag in v else from_tree(v)
            for v in values]


def from_tree(tree: Tree) -> Any:
    """Rebuild the value that :func:`to_tree` encoded, with its exact type."""
    if type(tree) is list:
        return [from_tree(x) for x in tree]
    if type(tree) is not dict:
        return tree
    if len(tree) == 1:
        (tag, payload), = tree.items()
        if tag.startswith("$"):
            dec = _DECODERS.get(tag)
            if dec is not None:
                return dec(payload)
            if tag == "$unsupported":
                raise ReplayUnsupportedError(
                    f"A recorded value of type {payload[0]} cannot be rebuilt "
                    "(register it with timetracer_otel.codec.register and record again)."
                )
            raise ReplayUnsupportedError(
                f"Unknown value tag {tag!r} in cassette; upgrade timetracer-otel."
            )
    return {k: from_tree(x) for k, x in tree.items()}
