"""The typed codec round-trips values with type identity, through msgpack and JSON."""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import math
import os
import subprocess
import sys
import uuid
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from timetracer_otel.codec import from_tree, from_trees, to_tree
from timetracer_otel.errors import ReplayUnsupportedError


def through(value: Any, fmt: str) -> Any:
    tree = to_tree(value)
    if fmt == "json":
        data = msgspec.json.encode(tree)
        back = msgspec.json.decode(data)
    else:
        back = msgspec.msgpack.decode(msgspec.msgpack.encode(tree))
    return from_tree(back)


def same(a: Any, b: Any) -> bool:
    """Equal value AND equal type, recursively (NaN equals NaN; tzinfo compared by kind)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, Decimal):
        return str(a) == str(b)
    if isinstance(a, dt.datetime | dt.time):
        return a == b and a.fold == b.fold and same_tz(a.tzinfo, b.tzinfo) and (
            a.replace(tzinfo=None) == b.replace(tzinfo=None)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return len(a) == len(b) and all(k in b and same(v, b[k]) for k, v in a.items()) and all(
            type(k1) is type(k2) for k1, k2 in zip(a, b, strict=True)
        )
    if isinstance(a, set | frozenset):  # {True} == {1}: match members by type and value
        unmatched = list(b)
        for x in a:
            i = next((i for i, y in enumerate(unmatched) if same(x, y)), None)
            if i is None:
                return False
            del unmatched[i]
        return not unmatched
    return bool(a == b)


def same_tz(a: dt.tzinfo | None, b: dt.tzinfo | None) -> bool:
    if a is None or b is None:
        return a is b
    if type(a) is not type(b):
        return False
    if a is dt.timezone.utc or b is dt.timezone.utc:
        return a is b
    if isinstance(a, ZoneInfo):
        return a.key == b.key  # type: ignore[attr-defined]
    return a.utcoffset(None) == b.utcoffset(None) and a.tzname(None) == b.tzname(None)


class Color(enum.Enum):
    RED = "red"
    BLUE = 2


ZONES = [ZoneInfo("UTC"), ZoneInfo("Europe/Paris"), ZoneInfo("America/New_York")]
tzinfos = st.one_of(
    st.none(),
    st.just(dt.timezone.utc),
    st.sampled_from(ZONES),
    st.builds(
        lambda minutes, name: (
            dt.timezone(dt.timedelta(minutes=minutes), name)
            if name is not None
            else dt.timezone(dt.timedelta(minutes=minutes))
        ),
        st.integers(-23 * 60, 23 * 60).filter(lambda m: m != 0),
        st.one_of(st.none(), st.text(min_size=1, max_size=5)),
    ),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**64, max_value=2**200),
    st.integers(min_value=-(2**200), max_value=-(2**63) - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.binary(),
    st.binary().map(bytearray),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.sampled_from([Decimal("NaN"), Decimal("-0"), Decimal("sNaN"), Decimal("1E+400")]),
    st.datetimes(timezones=tzinfos, allow_imaginary=False),
    st.dates(),
    st.times(timezones=st.one_of(st.none(), st.just(dt.timezone.utc))),
    st.timedeltas(),
    st.uuids(),
    st.ip_addresses(),
    st.sampled_from(
        [
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("2001:db8::/32"),
            ipaddress.ip_interface("192.168.1.5/24"),
        ]
    ),
    st.sampled_from(list(Color)),
)

hashable = st.one_of(st.integers(), st.text(), st.uuids(), st.dates(), st.booleans())

values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
        st.dictionaries(hashable, children, max_size=4),
        st.sets(hashable, max_size=4),
        st.frozensets(hashable, max_size=4),
    ),
    max_leaves=12,
)


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=values)
def test_round_trip_keeps_value_and_type(fmt: str, value: Any) -> None:
    back = through(value, fmt)
    assert same(value, back), (value, back)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(column=st.one_of(
    st.lists(values, max_size=6),
    # A typed column as a driver returns it: one type, NULLs beside.
    st.lists(st.one_of(st.none(), st.decimals(allow_nan=True)), max_size=8),
    st.lists(st.one_of(st.none(), st.uuids(), st.datetimes(timezones=tzinfos)), max_size=8),
))
def test_a_column_decodes_as_its_cells_do(column: list[Any]) -> None:
    # from_trees finds one tag's decoder for a whole column; every cell must come back as
    # from_tree alone rebuilds it, in value and type.
    trees = [to_tree(v) for v in column]
    together, alone = from_trees(trees), [from_tree(t) for t in trees]
    assert len(together) == len(alone)
    assert all(same(a, b) for a, b in zip(together, alone, strict=True)), (together, alone)
    assert all(same(v, b) for v, b in zip(column, together, strict=True))


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_timezone_kinds_stay_distinct(fmt: str) -> None:
    utc = dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc)
    zone = dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=ZoneInfo("UTC"))
    fixed = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))
    assert through(utc, fmt).tzinfo is dt.timezone.utc
    assert through(zone, fmt).tzinfo == ZoneInfo("UTC")
    assert type(through(zone, fmt).tzinfo) is ZoneInfo
    assert through(fixed, fmt).utcoffset() == dt.timedelta(hours=5, minutes=30)
    naive = dt.datetime(2026, 1, 2)
    assert through(naive, fmt).tzinfo is None


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_named_cases(fmt: str) -> None:
    cases: list[Any] = [
        (1, 2),
        [1, 2],
        {1: "int key", "1": "str key"},
        {"$tuple": "a dict that looks like a tag"},
        Decimal("NaN"),
        float("-inf"),
        2**100,
        uuid.UUID(int=7),
        b"\x00\xff",
        frozenset({1, 2}),
        dt.timedelta(days=-1, microseconds=3),
    ]
    for value in cases:
        back = through(value, fmt)
        assert same(value, back), (value, back)


def test_unknown_type_is_stored_and_refuses_to_replay_clearly() -> None:
    class Opaque:
        pass

    tree = to_tree(Opaque())
    with pytest.raises(ReplayUnsupportedError, match=r"Opaque.*codec\.register"):
        from_tree(tree)


def test_asyncpg_types_round_trip() -> None:
    asyncpg = pytest.importorskip("asyncpg")
    values = [
        asyncpg.Range(1, 10, lower_inc=True, upper_inc=False),
        asyncpg.Range(empty=True),
        asyncpg.Point(1.5, -2.0),
        asyncpg.Box(asyncpg.Point(2, 2), asyncpg.Point(0, 0)),
        asyncpg.Circle(asyncpg.Point(0, 0), 3.0),
        asyncpg.Path(asyncpg.Point(0, 0), asyncpg.Point(1, 1), is_closed=True),
        asyncpg.Polygon(asyncpg.Point(0, 0), asyncpg.Point(1, 0), asyncpg.Point(0, 1)),
        asyncpg.BitString("10110"),
    ]
    for value in values:
        for fmt in ("msgpack", "json"):
            back = through(value, fmt)
            assert type(back) is type(value) and back == value, (value, back)


def _set_tree_in_a_process(seed: str) -> str:
    code = ("import msgspec; from timetracer_otel.codec import to_tree; "
            "print(msgspec.json.encode(to_tree({'alpha', 'beta', 'gamma', 'delta', 'eps'})).decode())")
    env = {**os.environ, "PYTHONHASHSEED": seed}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout


def test_a_set_parameter_keys_alike_in_every_process() -> None:
    # Sets go into replay keys (DynamoDB string sets); iteration follows the hash seed.
    assert _set_tree_in_a_process("1") == _set_tree_in_a_process("2")
