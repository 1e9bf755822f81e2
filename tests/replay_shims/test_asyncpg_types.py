"""asyncpg: every common column type recorded against the real PostgreSQL and replayed with the
server unreachable, equal in value and in ``type()``; errors, misses and recorded order."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import timetracer_otel
from tests.conftest import PG_HOST, PG_PORT, unreachable_port
from timetracer_otel.errors import ReplayMissError, ReplayUnsupportedError

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE everything (
    id serial PRIMARY KEY,
    i2 int2, i4 int4, i8 int8,
    num numeric, num_nan numeric,
    f4 float4, f8 float8, f8_inf float8, f8_nan float8,
    t text, vc varchar(20), b bool, raw bytea,
    d date, tm time, tmtz timetz, ts timestamp, tstz timestamptz, iv interval,
    u uuid, j json, jb jsonb,
    arr int4[], arr_null text[], arr_2d int4[][],
    ip inet, net cidr, m mood,
    r_int int4range, r_ts tstzrange, r_empty int4range, r_num numrange,
    pt point, bx box, bits bit varying(8),
    nothing text
);
INSERT INTO everything (
    i2, i4, i8, num, num_nan, f4, f8, f8_inf, f8_nan, t, vc, b, raw,
    d, tm, tmtz, ts, tstz, iv, u, j, jb, arr, arr_null, arr_2d, ip, net, m,
    r_int, r_ts, r_empty, r_num, pt, bx, bits, nothing
) VALUES (
    -32768, 2147483647, -9223372036854775808, 12345.678900, 'NaN', 1.5, 2.25, 'Infinity', 'NaN',
    'héllo ☃', 'short', true, '\\x00ff10'::bytea,
    '2024-02-29', '13:14:15.123456', '13:14:15+05:30', '2024-01-02 03:04:05.678901',
    '2024-01-02 03:04:05.678901+02', '1 year 2 mons 3 days 04:05:06.789',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2.5, null]}', '{"b": {"c": true}}',
    '{1,2,3}', '{x,NULL,z}', '{{1,2},{3,4}}', '192.168.1.5/24', '10.0.0.0/8', 'happy',
    '[1,10)', '[2024-01-01 00:00+00,2024-02-01 00:00+00)', 'empty', '(1.5,2.5]',
    '(1.5,-2)', '((0,0),(1,1))', B'1011', NULL
);
"""


def dsn(db: str, port: int = PG_PORT) -> str:
    return f"postgresql://postgres@{PG_HOST}:{port}/{db}"


async def _setup(db: str) -> None:
    conn = await asyncpg.connect(dsn(db))
    await conn.execute(SCHEMA)
    await conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
    await conn.close()


def typed(value: Any) -> Any:
    """Value and exact type, recursively; NaN compared as a marker."""
    if isinstance(value, list | tuple):
        return (type(value), [typed(v) for v in value])
    if isinstance(value, dict):
        return (type(value), {k: typed(v) for k, v in value.items()})
    if isinstance(value, float) and math.isnan(value):
        return (float, "nan")
    if type(value).__name__ == "Decimal" and value.is_nan():
        return ("Decimal", "NaN")
    tz = getattr(value, "tzinfo", None)
    return (type(value), value, type(tz), tz)


async def job(port: int, db: str) -> list[Any]:
    conn = await asyncpg.connect(dsn(db, port))
    out: list[Any] = []
    rows = await conn.fetch("SELECT * FROM everything")
    row = rows[0]
    out.append([(k, typed(v)) for k, v in row.items()])
    out.append((type(row), list(row.keys()), row["i4"], row[1], row.get("nothing", "dflt"),
                dict(row)["t"], len(row)))
    # The same statement before and after an insert replays in recorded order: 0, then 1.
    out.append(await conn.fetchval("SELECT count(*) FROM users"))
    out.append(await conn.execute("INSERT INTO users (email) VALUES ($1)", "a@example.com"))
    out.append(await conn.fetchval("SELECT count(*) FROM users"))
    out.append(await conn.execute("SELECT 1; SELECT 2"))  # no args: simple query protocol
    out.append(await conn.executemany("INSERT INTO users (email) VALUES ($1)",
                                      [("b@example.com",), ("c@example.com",)]))
    out.append(await conn.fetchmany("INSERT INTO users (email) VALUES ($1) RETURNING id, email",
                                    [("d@example.com",), ("e@example.com",)]))
    out.append(await conn.fetchrow("SELECT id, email FROM users WHERE email = $1", "zzz"))
    out.append(await conn.fetchval("SELECT $1::int + 1, 'x'", 41, column=1))
    try:
        await conn.execute("INSERT INTO users (email) VALUES ($1)", "a@example.com")
    except asyncpg.UniqueViolationError as exc:
        out.append((type(exc), exc.sqlstate, str(exc), exc.constraint_name, exc.table_name,
                    exc.detail))
    # Prepared statements and their description.
    stmt = await conn.prepare("SELECT id, email FROM users WHERE id > $1 ORDER BY id")
    out.append([(a.name, a.type.oid, a.type.name) for a in stmt.get_attributes()])
    out.append([(t.oid, t.name) for t in stmt.get_parameters()])
    out.append([tuple(r) for r in await stmt.fetch(1)])
    out.append(stmt.get_statusmsg())
    out.append(tuple(await stmt.fetchrow(2)))
    out.append(await stmt.fetchval(3, column=1))
    # Cursors inside a transaction, with commit and rollback.
    async with conn.transaction():
        out.append([tuple(r) async for r in conn.cursor("SELECT id FROM users ORDER BY id",
                                                         prefetch=2)])
        cur = await conn.cursor("SELECT email FROM users ORDER BY id")
        out.append(await cur.forward(1))
        out.append([r["email"] for r in await cur.fetch(2)])
        out.append(tuple(await cur.fetchrow()))
        out.append(conn.is_in_transaction())
    out.append(conn.is_in_transaction())
    tr = conn.transaction()
    await tr.start()
    await conn.execute("DELETE FROM users")
    await tr.rollback()
    out.append(await conn.fetchval("SELECT count(*) FROM users"))
    out.append(conn.get_server_version()[:1])
    await conn.close()
    out.append(conn.is_closed())
    return out


def test_every_column_type_replays_with_equal_values_and_types(
    pg_database: str, tmp_path: Path
) -> None:
    asyncio.run(_setup(pg_database))
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(job(PG_PORT, pg_database))
    assert live[2] == 0 and live[4] == 1  # the live run saw the insert
    with timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = asyncio.run(job(unreachable_port(), pg_database))
    assert replayed == live
    assert rep.report.ok and not rep.report.shape_matches
    types = dict(live[0])
    assert types["num_nan"] == ("Decimal", "NaN") and types["f8_nan"] == (float, "nan")
    assert types["r_int"][0] is asyncpg.Range and types["pt"][0] is asyncpg.Point
    assert types["arr_2d"][0] is list and types["nothing"][1] is None
    assert replayed[1][0] is asyncpg.Record


def test_unrecorded_query_names_the_closest_recorded_statement(
    pg_database: str, tmp_path: Path
) -> None:
    async def one(port: int, sql: str) -> Any:
        conn = await asyncpg.connect(dsn(pg_database, port))
        try:
            return await conn.fetch(sql)
        finally:
            await conn.close()

    with timetracer_otel.record(dir=tmp_path) as rec:
        asyncio.run(one(PG_PORT, "SELECT 1 AS one"))
    with timetracer_otel.replay(rec.paths), pytest.raises(ReplayMissError) as err:
        asyncio.run(one(unreachable_port(), "SELECT 2 AS two"))
    assert "SELECT 2 AS two" in str(err.value)
    assert "SELECT 1 AS one" in str(err.value)
    # A long statement with its last literal changed: the diff shows where they differ.
    long = "SELECT 1::int AS a, 12.50::numeric AS n, '2024-05-01 10:00+00'::timestamptz AS t, {}"
    with timetracer_otel.record(dir=tmp_path / "long") as rec:
        asyncio.run(one(PG_PORT, long.format("'abc' AS s")))
    with timetracer_otel.replay(rec.paths, strict=True), pytest.raises(ReplayMissError) as err:
        asyncio.run(one(unreachable_port(), long.format("'abd' AS s")))
    assert "AS t, 'abc' AS s\", now ...imestamptz AS t, 'abd' AS s\"" in str(err.value)
    # passthrough cannot go live on a connection the cassette opened: said plainly.
    with timetracer_otel.replay(rec.paths, on_miss="passthrough"), pytest.raises(
        ReplayUnsupportedError, match="opened from the cassette"
    ):
        asyncio.run(one(unreachable_port(), "SELECT 2 AS two"))


class Row(asyncpg.Record):
    """A custom record_class, as apps use for attribute access."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


def test_custom_record_class_is_honoured_and_copy_refused_clearly(
    pg_database: str, tmp_path: Path
) -> None:
    async def job(port: int) -> Any:
        conn = await asyncpg.connect(dsn(pg_database, port), record_class=Row)
        try:
            rows = await conn.fetch("SELECT 1 AS one, 'x' AS name")
            row = await conn.fetchrow("SELECT 2 AS two", record_class=asyncpg.Record)
            return [(type(r), tuple(r), r.one, r.name, dict(r)) for r in rows] + [type(row)]
        finally:
            await conn.close()

    async def copy(port: int) -> Any:
        conn = await asyncpg.connect(dsn(pg_database, port))
        try:
            return await conn.copy_records_to_table("t", records=[(1,)])
        finally:
            await conn.close()

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(job(PG_PORT))
    with timetracer_otel.replay(rec.paths):
        replayed = asyncio.run(job(unreachable_port()))
        with pytest.raises(ReplayUnsupportedError, match="copy_records_to_table"):
            asyncio.run(copy(unreachable_port()))
    assert replayed == live
    assert live[0][0] is Row and live[1] is asyncpg.Record


def test_a_join_whose_columns_repeat_a_name_replays_as_live(
    pg_database: str, tmp_path: Path
) -> None:
    """Two ``id`` columns (a join): keys, items, repr and lookup by name (the last one, as
    asyncpg maps it) equal the live record's, for the default and a custom record class."""
    async def job(port: int) -> Any:
        conn = await asyncpg.connect(dsn(pg_database, port))
        try:
            out = []
            for cls in (None, Row):
                row = await conn.fetchrow("SELECT a.id, b.id, a.n FROM (SELECT 1 AS id, 'x' AS n) a "
                                          "CROSS JOIN (SELECT 2 AS id) b", record_class=cls)
                out.append((type(row), list(row.keys()), list(row.items()), repr(row),
                            row["id"], row.get("n"), tuple(row), dict(row)))
            return out
        finally:
            await conn.close()

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(job(PG_PORT))
    with timetracer_otel.replay(rec.paths, strict=True):
        replayed = asyncio.run(job(unreachable_port()))
    assert live[0][1] == ["id", "id", "n"] and live[0][4] == 2
    assert replayed == live


async def _wide_job(port: int, db: str) -> list[Any]:
    """Rows holding ints beyond 64 bits (a numeric codec that decodes to int), beside NULLs
    and text in one column, and a circle, whose center asyncpg decodes as a tuple."""
    conn = await asyncpg.connect(dsn(db, port))
    await conn.set_type_codec("numeric", schema="pg_catalog", format="text", encoder=str,
                              decoder=lambda s: int(s) if s.lstrip("-").isdigit() else s)
    rows = await conn.fetch("SELECT n FROM (VALUES (123456789012345678901234567890::numeric), "
                            "(-99999999999999999999::numeric), (NULL), (0), (1.5)) v(n)")
    circle = await conn.fetchval("SELECT '<(1,2),3>'::circle")
    await conn.close()
    return [typed([r["n"] for r in rows]), typed(circle), typed(circle.center)]


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_ints_beyond_64_bits_in_rows_and_a_circle_replay_with_their_types(
    pg_database: str, tmp_path: Path, fmt: str
) -> None:
    with timetracer_otel.record(dir=tmp_path, format=fmt) as rec:  # type: ignore[arg-type]
        live = asyncio.run(_wide_job(PG_PORT, pg_database))
    assert live[0][1][0] == (int, 123456789012345678901234567890, type(None), None)
    assert live[2][0] is tuple
    with timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = asyncio.run(_wide_job(unreachable_port(), pg_database))
    assert rep.report.ok and replayed == live


def test_a_query_the_app_cancelled_replays_as_never_answering(
    pg_database: str, tmp_path: Path
) -> None:
    """``asyncio.wait_for`` gives up on a slow query (the app cancelled it), then the same
    statement runs again: the cancelled call is kept, so the replay times out the first and
    answers the second, as live."""

    async def job(port: int) -> list[Any]:
        conn = await asyncpg.connect(dsn(pg_database, port))
        out: list[Any] = []
        for limit in (0.2, 10):
            try:
                out.append(await asyncio.wait_for(
                    conn.fetchval("SELECT 42 FROM pg_sleep($1::float8)", 1 if limit < 1 else 0),
                    limit))
            except TimeoutError as exc:
                out.append(type(exc))
        await conn.close()
        return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(job(PG_PORT))
    assert live == [TimeoutError, 42]
    with timetracer_otel.replay(rec.paths, strict=True) as rep:
        assert asyncio.run(job(unreachable_port())) == live
    assert rep.report.ok
