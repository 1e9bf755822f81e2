"""psycopg 3: every common column type, recorded against the real PostgreSQL and replayed with
the server unreachable; each value must come back equal and of the same type."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from pathlib import Path
from typing import Any

import psycopg
import pytest

import timetracer_otel
from tests.conftest import PG_HOST, PG_PORT, unreachable_port

SETUP = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE everything (
    id serial PRIMARY KEY,
    i2 int2, i4 int4, i8 int8, num numeric(12, 4), num_nan numeric, f4 float4, f8 float8,
    f8_inf float8, txt text, vc varchar(20), ch char(3), flag bool, raw bytea, d date, t time,
    ttz timetz, ts timestamp, tstz timestamptz, iv interval, u uuid, j json, jb jsonb,
    ints int4[], texts text[], grid int4[], ip inet, net cidr, m mood, r int4range,
    tsr tstzrange, dr daterange, nothing text
);
INSERT INTO everything (i2, i4, i8, num, num_nan, f4, f8, f8_inf, txt, vc, ch, flag, raw, d, t,
    ttz, ts, tstz, iv, u, j, jb, ints, texts, grid, ip, net, m, r, tsr, dr, nothing)
VALUES (-32768, 2147483647, 9223372036854775807, 12345678.1234, 'NaN', 1.5, 3.141592653589793,
    'Infinity', 'héllo ☃ ''quoted''', 'varchar', 'ab', true, '\\x00ff10', '2024-02-29',
    '23:59:58.123456', '10:11:12+05:30', '2024-01-02 03:04:05.678901',
    '2024-06-01 12:00:00+02', '1 year 2 mons 3 days 04:05:06.7', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
    '{"a": [1, 2.5, null], "b": "x"}', '{"k": {"n": true}}', '{1,NULL,3}', '{"a",NULL,"c d"}',
    '{{1,2},{3,4}}', '192.168.0.1/24', '10.0.0.0/8', 'happy', '[1,10)',
    '[2024-01-01 00:00+00,2024-02-01 00:00+00)', 'empty', NULL),
    (NULL, NULL, NULL, NULL, '-Infinity', '-Infinity', NULL, '-Infinity', '', NULL, NULL, false,
    '', '0001-01-01', '00:00', NULL, '1999-12-31 23:59:59', '2000-03-26 02:30:00+00', '-1 day',
    NULL, 'null', '[]', '{}', '{}', NULL, '::1', '::/0', 'sad', '(,5]', NULL, '[2024-01-01,)', NULL);
"""


def _typed(value: Any) -> Any:
    """Value and exact type, all the way down (NaN compared by its text)."""
    if isinstance(value, float) and math.isnan(value):
        return (float, "nan")
    if isinstance(value, list | tuple):
        return (type(value), [_typed(v) for v in value])
    if isinstance(value, dict):
        return (dict, {k: _typed(v) for k, v in value.items()})
    if isinstance(value, dt.datetime | dt.time) and value.tzinfo is not None:
        return (type(value), value, type(value.tzinfo), str(value.tzinfo))
    try:
        if value != value:  # Decimal('NaN')
            return (type(value), str(value))
    except TypeError:
        pass
    return (type(value), value)


def _rows(port: int, db: str, binary: bool) -> list[Any]:
    with psycopg.connect(f"postgresql://postgres@{PG_HOST}:{port}/{db}") as conn:
        conn.execute("SET TimeZone TO 'Europe/Paris'")
        cur = conn.cursor(binary=binary)
        cur.execute("SELECT * FROM everything ORDER BY id")
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _setup(db: str) -> None:
    with psycopg.connect(f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{db}", autocommit=True) as c:
        c.execute(SETUP)


@pytest.mark.parametrize("fmt", ["json", "msgpack"])  # msgpack keeps the payload bytes as recorded
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_every_column_type_replays_with_value_and_type(
    pg_database: str, tmp_path: Path, binary: bool, fmt: str
) -> None:
    _setup(pg_database)
    with timetracer_otel.record(dir=tmp_path, format=fmt) as rec:
        live = _rows(PG_PORT, pg_database, binary)
    with timetracer_otel.replay(rec.paths) as rep:
        replayed = _rows(unreachable_port(), pg_database, binary)

    # connect, SET, SELECT, and the COMMIT psycopg sent itself as the block ended
    assert rep.report.exact == 4 and not rep.report.misses
    assert [Path(p).suffix for p in rec.paths] == [f".{fmt}"]
    assert len(live) == 2
    for live_row, replayed_row in zip(live, replayed, strict=True):
        for column, value in live_row.items():
            assert _typed(replayed_row[column]) == _typed(value), column
    first = replayed[0]
    assert str(first["tstz"].tzinfo) == "Europe/Paris"  # the recorded session TimeZone
    assert type(first["num_nan"]).__name__ == "Decimal" and first["num_nan"].is_nan()
    assert first["f8_inf"] == math.inf and first["grid"] == [[1, 2], [3, 4]]
    assert first["ints"] == [1, None, 3]
    # An unregistered enum loads as text in text format and as bytes in binary, live or not.
    assert first["m"] == (b"happy" if binary else "happy")
    assert replayed[1]["nothing"] is None and replayed[1]["raw"] == b""


def test_async_connection_types_replay(pg_database: str, tmp_path: Path) -> None:
    _setup(pg_database)

    async def rows(port: int) -> list[Any]:
        dsn = f"postgresql://postgres@{PG_HOST}:{port}/{pg_database}"
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute("SELECT * FROM everything ORDER BY id")
            return [_typed(list(r)) for r in await cur.fetchall()]

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(rows(PG_PORT))
    with timetracer_otel.replay(rec.paths):
        replayed = asyncio.run(rows(unreachable_port()))
    assert replayed == live
