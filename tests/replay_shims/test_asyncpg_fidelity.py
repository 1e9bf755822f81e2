"""asyncpg replays what the app saw live beyond rows of builtin types: composite values
(asyncpg Records inside rows), the classes custom codecs return, a connection the server
ended, server parameters a SET changed, server log messages and query loggers. Each recorded
against the real PostgreSQL and replayed with the server unreachable (strict)."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg
import pytest

import timetracer_otel
from tests.conftest import PG_HOST, PG_PORT, unreachable_port
from timetracer_otel import codec


def dsn(db: str, port: int = PG_PORT) -> str:
    return f"postgresql://postgres@{PG_HOST}:{port}/{db}"


def typed(value: Any) -> Any:
    """Value and exact type, recursively (Records with their keys)."""
    if isinstance(value, asyncpg.Record):
        return (type(value), [(k, typed(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return (type(value), [typed(v) for v in value])
    if isinstance(value, dict):
        return (type(value), [(k, typed(v)) for k, v in value.items()])
    return (type(value), value)


def record_then_replay(job: Any, db: str, tmp_path: Path) -> tuple[Any, Any]:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(job(PG_PORT))
    with timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = asyncio.run(job(unreachable_port()))
    assert rep.report.ok and not rep.report.shape_matches and not rep.report.unsupported
    return live, replayed


# --- 1. composite values ----------------------------------------------------------------------

COMPOSITES = """
CREATE TYPE pair AS (x int, label text, amount numeric);
CREATE TYPE outer_pair AS (p pair, at date);
CREATE TABLE t (id serial PRIMARY KEY, p pair);
INSERT INTO t (p) VALUES (ROW(1, 'one', 1.50)), (NULL);
"""


def test_composite_values_replay_as_asyncpg_records(pg_database: str, tmp_path: Path) -> None:
    async def setup() -> None:
        conn = await asyncpg.connect(dsn(pg_database))
        await conn.execute(COMPOSITES)
        await conn.close()

    async def job(port: int) -> list[Any]:
        conn = await asyncpg.connect(dsn(pg_database, port))
        out: list[Any] = []
        for sql in (
            "SELECT p FROM t ORDER BY id",  # a composite column, NULL in the second row
            "SELECT ARRAY[ROW(1, 'a', 2)::pair, ROW(2, 'b', NULL)::pair] AS ps",
            "SELECT ROW(ROW(3, 'c', 0.5)::pair, '2024-02-29')::outer_pair AS o, 7 AS n",
        ):
            out.append([typed(r) for r in await conn.fetch(sql)])
        out.append(typed(await conn.fetchval("SELECT ROW(1, 'one', 1.50)::pair")))
        out.append(typed(await conn.fetchrow("SELECT p, id FROM t WHERE id = $1", 1)))
        value = await conn.fetchval("SELECT ROW(5, 'e', 9.99)::pair")
        out.append((value["label"], value[0], dict(value), len(value), repr(value)))
        await conn.close()
        return out

    asyncio.run(setup())
    live, replayed = record_then_replay(job, pg_database, tmp_path)
    assert replayed == live
    assert live[3] == (asyncpg.Record, [("x", (int, 1)), ("label", (str, "one")),
                                        ("amount", (Decimal, Decimal("1.50")))])
    assert live[0][0][1][0] == ("p", live[3])  # the composite column, first row
    assert live[0][1][1][0] == ("p", (type(None), None))  # the NULL composite
    assert live[1][0][1][0][1][0] is list and live[1][0][1][0][1][1][1][0] is asyncpg.Record
    assert live[2][0][1][0][1][1][0] == ("p", (asyncpg.Record, [
        ("x", (int, 3)), ("label", (str, "c")), ("amount", (Decimal, Decimal("0.5")))]))
    assert live[5][2] == {"x": 5, "label": "e", "amount": Decimal("9.99")}


# --- 2. classes a custom codec returns --------------------------------------------------------


class Pt(NamedTuple):
    x: float
    y: float


def test_custom_codec_subclasses_of_builtins_keep_their_class(
    pg_database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Local(str):  # not importable by module and name: replayed as str, with a warning
        pass

    async def job(port: int) -> list[Any]:
        conn = await asyncpg.connect(dsn(pg_database, port))
        await conn.set_type_codec(
            "jsonb", schema="pg_catalog", encoder=json.dumps,
            decoder=lambda s: json.loads(s, object_pairs_hook=collections.OrderedDict))
        await conn.set_type_codec(
            "point", schema="pg_catalog", format="text", encoder=str,
            decoder=lambda s: Pt(*map(float, s.strip("()").split(","))))
        await conn.set_type_codec("xml", schema="pg_catalog", format="text", encoder=str,
                                  decoder=Local)
        out: list[Any] = []
        out.append(typed(await conn.fetchval("""SELECT '{"b": 1, "a": {"c": 2}}'::jsonb""")))
        out.append(typed(await conn.fetchval("SELECT '(1,2)'::point")))
        out.append([typed(r) for r in await conn.fetch(
            """SELECT '[{"z": 1}]'::jsonb AS j, '(3,4)'::point AS p
               UNION ALL SELECT NULL, '(5,6)'::point""")])
        out.append(typed(await conn.fetchval("SELECT '<x/>'::xml")))
        await conn.close()
        return out

    with caplog.at_level(logging.WARNING, logger="timetracer_otel"):
        live, replayed = record_then_replay(job, pg_database, tmp_path)
    od = collections.OrderedDict
    assert live[0] == (od, [("a", (od, [("c", (int, 2))])), ("b", (int, 1))])  # (jsonb order)
    assert live[1] == (Pt, [(float, 1.0), (float, 2.0)])
    assert replayed[:3] == live[:3]
    # A class replay could not build again: its value, as its base, and said once.
    assert live[3] == (Local, "<x/>") and replayed[3] == (str, "<x/>")
    warned = [r.getMessage() for r in caplog.records if "Local" in r.getMessage()]
    assert len(warned) == 1 and "replay as str" in warned[0]


def test_subclass_encoding_is_unchanged_outside_received_values() -> None:
    """Request trees (keys are made from them) keep a subclass's base encoding, as before;
    only values the app received keep their class."""
    value = collections.OrderedDict(b=1, a=[Pt(1.0, 2.0)])
    assert codec.to_tree(value) == {"b": 1, "a": [{"$tuple": [1.0, 2.0]}]}
    typed_tree = codec.to_tree_typed(value)
    assert typed_tree == {"$subclass": ["collections:OrderedDict", {
        "b": 1, "a": [{"$subclass": [f"{__name__}:Pt", {"$tuple": [1.0, 2.0]}]}]}]}
    back = codec.from_tree(typed_tree)
    assert type(back) is collections.OrderedDict and type(back["a"][0]) is Pt
    assert back == value


# --- 3. a connection the server ended ---------------------------------------------------------


def test_connection_the_server_ended_is_closed_in_replay(
    pg_database: str, tmp_path: Path
) -> None:
    async def job(port: int) -> list[Any]:
        out: list[Any] = []
        a = await asyncpg.connect(dsn(pg_database, port))
        b = await asyncpg.connect(dsn(pg_database, port))
        pid = await a.fetchval("SELECT pg_backend_pid()")
        await b.fetchval("SELECT pg_terminate_backend($1)", pid)
        await asyncio.sleep(0.2)
        for sql in ("SELECT 1", "SELECT 2"):
            try:
                await a.fetchval(sql)
            except Exception as exc:
                out.append((type(exc), str(exc)))
            out.append(a.is_closed())
        # A connection ended while its call runs (its own backend terminated).
        c = await asyncpg.connect(dsn(pg_database, port))
        try:
            await c.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        except Exception as exc:
            out.append(type(exc))
        out.append(c.is_closed())
        out.append(b.is_closed())
        await b.close()
        await a.close()
        await c.close()
        return out

    live, replayed = record_then_replay(job, pg_database, tmp_path)
    assert replayed == live
    assert live[:2] == [(asyncpg.InterfaceError, "connection is closed"), True]
    assert live[-2:] == [True, False]


# --- 4. server parameters a SET changed -------------------------------------------------------


def test_server_parameters_a_call_changed_replay_in_get_settings(
    pg_database: str, tmp_path: Path
) -> None:
    async def job(port: int) -> list[Any]:
        conn = await asyncpg.connect(dsn(pg_database, port))

        def seen() -> tuple[str, ...]:
            s = conn.get_settings()
            return (s.application_name, s.TimeZone, s.DateStyle)

        out: list[Any] = [seen()]
        await conn.execute("SET application_name = 'fidelity_changed'")
        await conn.execute("SET TimeZone = 'Asia/Tokyo'")
        out.append(seen())
        await conn.execute("SET DateStyle = 'SQL, DMY'")
        out.append(seen())
        async with conn.transaction():  # SET LOCAL: reported again when the transaction ends
            await conn.execute("SET LOCAL TimeZone = 'America/New_York'")
            out.append(seen())
        out.append(seen())
        await conn.fetchval("SELECT set_config('application_name', $1, false)", "via_function")
        out.append(seen())
        other = await asyncpg.connect(dsn(pg_database, port))  # its own settings
        out.append(other.get_settings().TimeZone == conn.get_settings().TimeZone)
        await other.close()
        await conn.close()
        return out

    live, replayed = record_then_replay(job, pg_database, tmp_path)
    assert replayed == live
    assert live[1][:2] == ("fidelity_changed", "Asia/Tokyo") and live[2][2] == "SQL, DMY"
    assert live[3][1] == "America/New_York" and live[4][1] == "Asia/Tokyo"
    assert live[5][0] == "via_function" and live[6] is False


# --- 5. server log messages and query loggers --------------------------------------------------

NOTICES = "DO $$ BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END $$"


def test_log_listeners_and_query_loggers_are_called_in_replay(
    pg_database: str, tmp_path: Path
) -> None:
    async def job(port: int) -> list[Any]:
        conn = await asyncpg.connect(dsn(pg_database, port), command_timeout=30)
        messages: list[Any] = []
        logged: list[Any] = []

        def listener(c: Any, m: Any) -> None:
            messages.append((c is conn, type(m), m.sqlstate, m.message, m.severity,
                             m.as_dict(), str(m)))

        conn.add_log_listener(listener)
        conn.add_query_logger(lambda q: logged.append(
            (q.query, q.args, q.timeout, type(q.exception), q.conn_params.database)))
        out: list[Any] = [await conn.execute(NOTICES)]
        out.append(list(messages))  # delivered before the call returned, as live
        out.append(await conn.execute("DROP TABLE IF EXISTS never_there"))
        out.append(await conn.fetchval("SELECT $1::int", 5, timeout=10))
        out.append(await conn.executemany("SELECT $1::int", [(1,), (2,)]))
        try:
            await conn.fetch("SELECT 1/0")
        except asyncpg.DivisionByZeroError as exc:
            out.append(type(exc))
        await asyncio.sleep(0.05)
        out.append(messages)
        out.append(logged)
        await conn.close()
        return out

    live, replayed = record_then_replay(job, pg_database, tmp_path)
    assert replayed == live
    messages, logged = live[-2], live[-1]
    assert [m[1:4] for m in messages] == [
        (asyncpg.PostgresLogMessage, "00000", "hello 42"),
        (asyncpg.PostgresWarning, "01000", "careful"),
        (asyncpg.PostgresLogMessage, "00000", 'table "never_there" does not exist, skipping'),
    ]
    assert live[1] == messages[:2]
    assert logged == [
        (NOTICES, (), None, type(None), pg_database),
        ("DROP TABLE IF EXISTS never_there", (), None, type(None), pg_database),
        ("SELECT $1::int", (5,), 10.0, type(None), pg_database),
        ("SELECT $1::int", [(1,), (2,)], 30.0, type(None), pg_database),
        ("SELECT 1/0", (), 30.0, asyncpg.DivisionByZeroError, pg_database),
    ]
