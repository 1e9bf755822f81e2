"""psycopg 3 API surface, recorded against the real PostgreSQL and replayed with the server
unreachable: cursors, row factories, composables, server-side cursors, transactions, pools,
errors, misses and what replay refuses."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from opentelemetry.instrumentation.utils import suppress_instrumentation
from psycopg import sql
from psycopg.rows import class_row, dict_row, namedtuple_row
from psycopg.types.enum import EnumInfo, register_enum
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, ConnectionPool

import timetracer_otel
from tests.conftest import PG_HOST, PG_PORT, unreachable_port
from timetracer_otel.errors import ReplayMissError, ReplayUnsupportedError


def _dsn(port: int, db: str) -> str:
    return f"postgresql://postgres@{PG_HOST}:{port}/{db}"


def _typed(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return (type(value).__name__, [_typed(v) for v in value])
    if isinstance(value, dict):
        return ("dict", {k: _typed(v) for k, v in value.items()})
    return (type(value).__name__, repr(value))


def _record_then_replay(tmp_path: Path, job: Callable[[int], Any]) -> tuple[Any, Any, Any]:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(PG_PORT)
    with timetracer_otel.replay(rec.paths) as rep:
        replayed = job(unreachable_port())
    assert not rep.report.misses and not rep.report.shape_matches
    assert _typed(replayed) == _typed(live)
    return live, replayed, rep.report


@dataclass
class Item:
    id: int
    name: str


class Mood(enum.Enum):
    sad = "sad"
    happy = "happy"


def test_cursor_api_row_factories_and_composables(pg_database: str, tmp_path: Path) -> None:
    def job(port: int) -> list[Any]:
        out: list[Any] = []
        with psycopg.connect(_dsn(port, pg_database)) as conn:
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text, at timestamptz)")
            conn.execute("CREATE TYPE mood AS ENUM ('sad', 'happy')")
            out.append(conn.execute("SELECT count(*) FROM items").fetchone())
            cur = conn.cursor()
            cur.executemany("INSERT INTO items VALUES (%s, %s, %s)",
                            [(i, f"n{i}", dt.datetime(2024, 1, i, tzinfo=dt.UTC)) for i in (1, 2, 3)])
            out.append((cur.rowcount, cur.statusmessage))
            out.append(conn.execute("SELECT count(*) FROM items").fetchone())
            cur.executemany("INSERT INTO items VALUES (%(id)s, %(name)s) RETURNING id, name",
                            [{"id": 4, "name": "four"}, {"id": 5, "name": "five"}], returning=True)
            out.append(cur.fetchall())
            out.append(cur.nextset())
            out.append(cur.fetchall())
            cur.execute("SELECT id, name, at FROM items WHERE id < %s ORDER BY id", (4,))
            columns = [(c.name, c.type_code) for c in cur.description or ()]
            out.append([cur.rowcount, cur.statusmessage, columns])
            out.append([cur.fetchone(), cur.fetchmany(1), list(cur)])
            out.append(cur.execute("SELECT id, name FROM items ORDER BY id", prepare=True).fetchall())
            for factory in (dict_row, namedtuple_row, class_row(Item)):
                with conn.cursor(row_factory=factory) as fcur:  # type: ignore[arg-type]
                    out.append(fcur.execute("SELECT id, name FROM items WHERE id = 2").fetchone())
            query = sql.SQL("SELECT {col} FROM {table} WHERE {col} = {val} OR name = {p}").format(
                col=sql.Identifier("id"), table=sql.Identifier("items"), val=sql.Literal(3),
                p=sql.Placeholder())
            out.append(conn.execute(query, ("n1",)).fetchall())
            out.append(conn.execute("SELECT %s::jsonb AS j", (Jsonb({"a": [1, None]}),)).fetchone())
            info = EnumInfo.fetch(conn, "mood")
            assert info is not None
            register_enum(info, conn, Mood)
            out.append(conn.execute("SELECT 'happy'::mood").fetchone())
            conn.execute("SET TimeZone TO 'America/New_York'")
            at = conn.execute("SELECT at FROM items WHERE id = 1").fetchone()
            assert at is not None
            out.append((at[0], str(at[0].tzinfo)))
            out.append(conn.info.server_version > 0)
            out.append((conn.info.encoding, conn.info.transaction_status.name))
        return out

    _live, replayed, _report = _record_then_replay(tmp_path, job)
    assert replayed[0] == (0,) and replayed[2] == (3,)  # identical queries, in recorded order
    assert replayed[1] == (3, "INSERT 0 1")
    assert replayed[3] == [(4, "four")] and replayed[4] is True and replayed[5] == [(5, "five")]
    assert replayed[6][:2] == [3, "SELECT 3"] and replayed[6][2][2] == ("at", 1184)
    assert replayed[9] == {"id": 2, "name": "n2"} and replayed[10].name == "n2"
    assert replayed[11] == Item(2, "n2") and replayed[12] == [(1,), (3,)]
    assert replayed[13] == ({"a": [1, None]},) and replayed[14] == (Mood.happy,)
    assert replayed[15][1] == "America/New_York" and replayed[17] == ("utf-8", "INTRANS")


def test_server_cursor_transactions_and_errors(pg_database: str, tmp_path: Path) -> None:
    def job(port: int) -> list[Any]:
        out: list[Any] = []
        with psycopg.connect(_dsn(port, pg_database), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
            conn.execute("INSERT INTO t SELECT generate_series(1, 25)")
            out.append(conn.info.transaction_status.name)
            with conn.transaction():
                with conn.cursor("big", row_factory=dict_row) as scur:
                    scur.itersize = 10
                    scur.execute("SELECT id, id * 2 AS twice FROM t WHERE id > %s ORDER BY id", (2,))
                    out.append([c.name for c in scur.description or ()])
                    out.append(scur.fetchone())
                    out.append(scur.fetchmany(3))
                    out.append([r["id"] for r in scur])
                out.append(conn.info.transaction_status.name)
                try:
                    with conn.transaction():
                        conn.execute("INSERT INTO t VALUES (1)")
                except psycopg.errors.UniqueViolation as exc:
                    out.append((type(exc).__name__, exc.sqlstate, exc.diag.constraint_name,
                                exc.diag.message_primary))
                out.append(conn.execute("SELECT count(*) FROM t").fetchone())
            conn.autocommit = False
            conn.execute("DELETE FROM t WHERE id > 20")
            out.append(conn.info.transaction_status.name)
            conn.rollback()
            out.append(conn.execute("SELECT count(*) FROM t").fetchone())
            conn.commit()
            try:
                conn.execute("SELECT nope FROM t")
            except psycopg.errors.UndefinedColumn as exc:
                out.append((exc.sqlstate, conn.info.transaction_status.name))
            conn.rollback()
        return out

    _live, replayed, _ = _record_then_replay(tmp_path, job)
    assert replayed[0] == "IDLE" and replayed[5] == "INTRANS"
    assert replayed[6][:3] == ("UniqueViolation", "23505", "t_pkey")
    assert replayed[3] == [{"id": 4, "twice": 8}, {"id": 5, "twice": 10}, {"id": 6, "twice": 12}]
    assert replayed[4] == list(range(7, 26))
    assert replayed[-1] == ("42703", "INERROR")


def test_async_connection_and_pools(pg_database: str, tmp_path: Path) -> None:
    with psycopg.connect(_dsn(PG_PORT, pg_database), autocommit=True) as conn:
        conn.execute("CREATE TABLE kv (k text PRIMARY KEY, v int)")

    def job(port: int) -> list[Any]:
        async def run() -> list[Any]:
            out: list[Any] = []
            async with await psycopg.AsyncConnection.connect(_dsn(port, pg_database)) as aconn:
                cur = aconn.cursor(row_factory=dict_row)
                await cur.executemany("INSERT INTO kv VALUES (%s, %s)", [("a", 1), ("b", 2)])
                out.append(cur.rowcount)
                await cur.execute("SELECT * FROM kv ORDER BY k")
                out.append([await cur.fetchone(), await cur.fetchall()])
                async with aconn.cursor("srv") as scur:
                    await scur.execute("SELECT k FROM kv ORDER BY k")
                    out.append([r async for r in scur])
            apool = AsyncConnectionPool(_dsn(port, pg_database), min_size=1, open=False)
            async with apool, apool.connection() as pconn:
                out.append(await (await pconn.execute("SELECT sum(v) FROM kv")).fetchone())
            return out

        out = asyncio.run(run())
        with ConnectionPool(_dsn(port, pg_database), min_size=2, open=True) as pool:
            with pool.connection() as pconn:
                pconn.execute("UPDATE kv SET v = v + 10")
            with pool.connection() as pconn:
                out.append(pconn.execute("SELECT k, v FROM kv ORDER BY k").fetchall())
        return out

    _live, replayed, _ = _record_then_replay(tmp_path, job)
    assert replayed[0] == 2 and replayed[2] == [("a",), ("b",)]
    assert replayed[-1] == [("a", 11), ("b", 12)]


def test_unrecorded_query_names_statement_and_closest(pg_database: str, tmp_path: Path) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec, psycopg.connect(_dsn(PG_PORT, pg_database)) as conn:
        conn.execute("SELECT 1 AS one")
    with (
        timetracer_otel.replay(rec.paths),
        psycopg.connect(_dsn(unreachable_port(), pg_database)) as conn,
        pytest.raises(ReplayMissError) as info,
    ):
        conn.execute("SELECT 2 AS two")
    message = str(info.value)
    assert "SELECT 2 AS two" in message and "SELECT 1 AS one" in message


def test_copy_is_refused_clearly_in_replay(pg_database: str, tmp_path: Path) -> None:
    with (
        timetracer_otel.replay(tmp_path),
        psycopg.connect(_dsn(unreachable_port(), pg_database), autocommit=True) as conn,
        pytest.raises(ReplayUnsupportedError, match="not supported on a replayed"),
        conn.cursor().copy("COPY t TO STDOUT"),
    ):
        pass


def test_fresh_parameters_replay_by_shape_and_strict_refuses(pg_database: str, tmp_path: Path) -> None:
    import uuid

    def job(port: int) -> Any:
        with psycopg.connect(_dsn(port, pg_database)) as conn:
            return conn.execute("SELECT %s::uuid AS token, 1 AS n", (uuid.uuid4(),)).fetchone()

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(PG_PORT)
    with timetracer_otel.replay(rec.paths) as rep:
        replayed = job(unreachable_port())
    assert replayed == live and type(replayed[0]) is uuid.UUID  # the recorded row, by shape
    assert len(rep.report.shape_matches) == 1 and "params" in rep.report.shape_matches[0].diff[0]
    with timetracer_otel.replay(rec.paths, strict=True), pytest.raises(ReplayMissError):
        job(unreachable_port())


def test_statements_built_client_side_with_bytes_are_the_recorded_ones(
    pg_database: str, tmp_path: Path
) -> None:
    """Bytes bound client-side (``ClientCursor``, ``sql.Literal``) are escaped as the recorded
    server's session has libpq escape them (hex, standard_conforming_strings on), so the
    statement the app builds in a replay is the one recorded, and found."""

    def job(port: int) -> list[Any]:
        with psycopg.connect(_dsn(port, pg_database)) as conn:
            cur = psycopg.ClientCursor(conn)
            text = cur.mogrify("SELECT %s::bytea AS b, %s AS s", (b"\x00\xff", "it's \\ here"))
            query = sql.SQL("SELECT {} AS b").format(sql.Literal(b"\x01\x02"))
            return [text, cur.execute("SELECT %s::bytea", (b"\x00\xff",)).fetchone(),
                    query.as_string(conn), conn.execute(query.as_string(conn)).fetchone()]

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(PG_PORT)
    assert live[1] == (b"\x00\xff",) and live[3] == (b"\x01\x02",)
    with timetracer_otel.replay(rec.paths, strict=True) as rep:
        assert job(unreachable_port()) == live
    assert rep.report.ok


def test_a_connection_the_server_ended_is_closed_and_broken_in_the_replay(
    pg_database: str, tmp_path: Path
) -> None:
    """The server ends the app's connection (``pg_terminate_backend`` from another one): the
    app's next query raises the server's error, and the connection is then closed and broken
    in the replay as live, so a pool or the app's reconnect logic does what it did live."""

    def job(port: int, admin_port: int | None) -> list[Any]:
        out: list[Any] = []
        conn = psycopg.connect(_dsn(port, pg_database), autocommit=True)
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        if admin_port is not None:  # (not recorded: the app's own connection is what replays)
            with suppress_instrumentation(), \
                    psycopg.connect(_dsn(admin_port, pg_database), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        try:
            conn.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            out.append((type(exc), exc.sqlstate))
        out.append((conn.closed, conn.broken, conn.info.status.name))
        try:
            conn.execute("SELECT 2")
        except psycopg.OperationalError as exc:
            out.append((type(exc), str(exc)))
        conn.close()
        return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(PG_PORT, PG_PORT)
    assert live[0] == (psycopg.errors.AdminShutdown, "57P01")
    assert live[1] == (True, True, "BAD")
    with timetracer_otel.replay(rec.paths, strict=True):
        assert job(unreachable_port(), None) == live
