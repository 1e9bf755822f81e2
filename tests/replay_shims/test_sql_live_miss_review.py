"""Review of the SQL live miss (079db13): a miss ``on_miss`` lets go live on a connection the
replay opened from the cassette. A miss that could not go live records nothing; one inside a
read-only transaction stays read-only; one inside a failed transaction fails as live would;
LISTEN is refused only as a statement. Against the real PostgreSQL, database ``test``; tables
``tt_fix2_*``."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

import timetracer_otel
from tests.conftest import PG_HOST, PG_PORT, unreachable_port
from timetracer_otel.errors import ReplayMissError, ReplayUnsupportedError

DB = "test"


def _dsn(port: int) -> str:
    return f"postgresql://postgres@{PG_HOST}:{port}/{DB}"


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(_dsn(PG_PORT), autocommit=True)


@pytest.fixture
def table() -> Iterator[str]:
    """A fresh empty ``tt_fix2_*`` table of (id int); dropped afterwards."""
    name = f"tt_fix2_{uuid.uuid4().hex[:10]}"
    with _admin() as admin:
        admin.execute(f"CREATE TABLE {name} (id int)")
    yield name
    with _admin() as admin:
        admin.execute(f"DROP TABLE IF EXISTS {name}")


def _count(table: str) -> int:
    with _admin() as admin:
        row = admin.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


# --- 1. on_miss="record" with the database unreachable ----------------------------------------


def _pg_stranded_job(port: int, extra: bool) -> list[Any]:
    with psycopg.connect(_dsn(port)) as conn:
        out: list[Any] = [conn.execute("SELECT 1::int").fetchone()]
        if extra:
            try:
                out.append(conn.execute("SELECT 42::int").fetchone())
            except ReplayUnsupportedError as exc:
                out.append(type(exc).__name__)
        return out


@pytest.mark.parametrize("many", [False, True])
def test_psycopg_record_miss_that_could_not_go_live_records_nothing(
    tmp_path: Path, many: bool
) -> None:
    def job(port: int, extra: bool) -> list[Any]:
        if not many:
            return _pg_stranded_job(port, extra)
        with psycopg.connect(_dsn(port)) as conn:
            out: list[Any] = [conn.execute("SELECT 1::int").fetchone()]
            if extra:
                try:
                    conn.cursor().executemany("SELECT %s::int", [(1,), (2,)])
                except ReplayUnsupportedError as exc:
                    out.append(type(exc).__name__)
            return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        assert job(PG_PORT, False) == [(1,)]
    (path,) = rec.paths
    with timetracer_otel.replay(path, on_miss="record") as rep:
        out = job(unreachable_port(), True)
    assert out == [(1,), "ReplayUnsupportedError"]
    assert rep.report.stranded and not rep.appended
    # Nothing saved as the call's answer: a later replay misses it, as the first one did.
    with timetracer_otel.replay(path, on_miss="error"), pytest.raises(ReplayMissError):
        job(unreachable_port(), True)


async def _apg_stranded_job(port: int, extra: bool, **connect: Any) -> list[Any]:
    """asyncpg's ``_pg_stranded_job``: the miss's refusal (ReplayUnsupportedError, with what
    made it) in place of its value."""
    conn = await asyncpg.connect(_dsn(port), **connect)
    try:
        out: list[Any] = [await conn.fetchval("SELECT 1")]
        if extra:
            try:
                out.append(await conn.fetchval("SELECT 42"))
            except ReplayUnsupportedError as exc:
                out.append((type(exc).__name__, type(exc.__cause__).__name__))
        return out
    finally:
        await conn.close()


def test_asyncpg_record_miss_that_could_not_go_live_records_nothing(tmp_path: Path) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        assert asyncio.run(_apg_stranded_job(PG_PORT, False)) == [1]
    with timetracer_otel.replay(rec.paths, on_miss="record") as rep:
        out = asyncio.run(_apg_stranded_job(unreachable_port(), True))
    assert out[:1] == [1] and out[1][0] == "ReplayUnsupportedError"
    assert rep.report.stranded and not rep.appended


# --- 2. a miss inside a replayed read-only transaction ----------------------------------------


def test_psycopg_miss_in_a_read_only_transaction_stays_read_only(
    tmp_path: Path, table: str
) -> None:
    def job(extra: bool) -> list[Any]:
        with psycopg.connect(_dsn(PG_PORT)) as conn:
            conn.read_only = True
            row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            out: list[Any] = [row[0] if row else None]
            if extra:
                try:
                    conn.execute(f"INSERT INTO {table} VALUES (1)")
                    out.append("inserted")
                except psycopg.Error as exc:
                    out.append(type(exc).__name__)
            return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        assert job(False) == [0]
    with timetracer_otel.replay(rec.paths, on_miss="passthrough") as rep:
        out = job(True)
    assert out == [0, "ReadOnlySqlTransaction"]  # as live
    assert _count(table) == 0 and not rep.report.stranded


def test_psycopg_miss_after_a_replayed_begin_read_only_stays_read_only(
    tmp_path: Path, table: str
) -> None:
    def job(extra: bool) -> list[Any]:
        with psycopg.connect(_dsn(PG_PORT), autocommit=True) as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            out: list[Any] = [row[0] if row else None]
            if extra:
                out.append(conn.execute("SHOW transaction_isolation").fetchone())
                try:
                    conn.execute(f"INSERT INTO {table} VALUES (1)")
                    out.append("inserted")
                except psycopg.Error as exc:
                    out.append(type(exc).__name__)
            conn.execute("ROLLBACK")
            return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        assert job(False) == [0]
    with timetracer_otel.replay(rec.paths, on_miss="passthrough") as rep:
        out = job(True)
    assert out == [0, ("repeatable read",), "ReadOnlySqlTransaction"]
    assert _count(table) == 0 and not rep.report.stranded


def test_asyncpg_miss_in_a_read_only_transaction_stays_read_only(
    tmp_path: Path, table: str
) -> None:
    async def job(extra: bool) -> list[Any]:
        conn = await asyncpg.connect(_dsn(PG_PORT))
        out: list[Any] = []
        try:
            async with conn.transaction(readonly=True, isolation="serializable"):
                out.append(await conn.fetchval(f"SELECT count(*) FROM {table}"))
                if extra:
                    out.append(await conn.fetchval("SHOW transaction_isolation"))
                    try:
                        await conn.execute(f"INSERT INTO {table} VALUES (1)")
                        out.append("inserted")
                    except asyncpg.PostgresError as exc:
                        out.append(type(exc).__name__)
        finally:
            await conn.close()
        return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        assert asyncio.run(job(False)) == [0]
    with timetracer_otel.replay(rec.paths, on_miss="passthrough") as rep:
        out = asyncio.run(job(True))
    assert out == [0, "serializable", "ReadOnlySQLTransactionError"]
    assert _count(table) == 0 and not rep.report.stranded


# --- 3. a miss inside a failed transaction ----------------------------------------------------


@pytest.mark.parametrize("policy", ["passthrough", "record"])
def test_psycopg_miss_in_a_failed_transaction_fails_as_live(
    tmp_path: Path, table: str, policy: str
) -> None:
    def job(extra: bool) -> list[Any]:
        with psycopg.connect(_dsn(PG_PORT)) as conn:
            out: list[Any] = []
            try:
                conn.execute("SELECT 1/0")
            except psycopg.Error as exc:
                out.append(type(exc).__name__)
            out.append(conn.info.transaction_status.name)
            if extra:
                cur = conn.cursor()
                # (PREPARE of a statement fails there too: only PREPARE TRANSACTION ends it)
                for call in (lambda: cur.execute(f"INSERT INTO {table} VALUES (1)"),
                             lambda: cur.executemany(f"INSERT INTO {table} VALUES (%s)", [(2,)]),
                             lambda: cur.execute("PREPARE tt_p AS SELECT 1")):
                    try:
                        call()
                        out.append("ran")
                    except psycopg.Error as exc:
                        out.append((type(exc).__name__, exc.sqlstate, cur.rowcount))
                out.append(conn.info.transaction_status.name)
            conn.rollback()
            out.append(conn.info.transaction_status.name)
            return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        assert job(False) == ["DivisionByZero", "INERROR", "IDLE"]
    live = job(True)
    failed = ("InFailedSqlTransaction", "25P02")
    assert live == ["DivisionByZero", "INERROR", (*failed, -1), (*failed, 0), (*failed, -1),
                    "INERROR", "IDLE"]
    with timetracer_otel.replay(rec.paths, on_miss=policy) as rep:
        assert job(True) == live
    assert _count(table) == 0 and not rep.report.stranded
    if policy == "record":  # recorded as live would have been: replayed so
        assert len(rep.appended) == 3
        with timetracer_otel.replay(rec.paths, on_miss="error"):
            assert job(True) == live


# --- 4. LISTEN refused only as a statement ----------------------------------------------------


def test_psycopg_listen_in_a_literal_comment_or_identifier_is_not_refused(tmp_path: Path) -> None:
    queries = [
        "SELECT %s::text || '; listen to the podcast'",
        "SELECT %s::text AS \"x; listen\" -- ; listen here\n",
        "/* ; listen /* nested */ ; listen */ SELECT %s::text || $q$; LISTEN $q$",
        "SELECT %s::text || E'\\'; listen'",
    ]

    def job(port: int) -> list[Any]:
        with psycopg.connect(_dsn(port)) as conn:
            return [conn.execute(q, ("ok",)).fetchone() for q in queries]

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(PG_PORT)
    with timetracer_otel.replay(rec.paths, on_miss="error") as rep:
        assert job(unreachable_port()) == live
    assert not rep.report.unsupported


@pytest.mark.parametrize("statement", ["LISTEN tt_fix2_chan", "SELECT 1; listen tt_fix2_chan",
                                       "/* x */ Listen tt_fix2_chan"])
def test_psycopg_listen_statement_is_still_refused(tmp_path: Path, statement: str) -> None:
    def job(port: int) -> Any:
        with psycopg.connect(_dsn(port), autocommit=True) as conn:
            conn.execute("SELECT 1")
            try:
                conn.execute(statement)
            except ReplayUnsupportedError as exc:
                return str(exc)
            return "ran"

    with timetracer_otel.record(dir=tmp_path) as rec:
        assert job(PG_PORT) == "ran"
    with timetracer_otel.replay(rec.paths, on_miss="error") as rep:
        assert "psycopg LISTEN is not supported" in job(unreachable_port())
    assert rep.report.unsupported == ["psycopg LISTEN"]


# --- 5. asyncpg: the lazy live connect keeps the app's connect timeout --------------------------


def test_asyncpg_live_miss_connect_keeps_the_apps_timeout(tmp_path: Path) -> None:
    silent = socket.socket()  # accepts (its backlog) and never answers: a hung server
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]

    async def bounded() -> Any:  # without the app's timeout the connect would never end
        try:
            return await asyncio.wait_for(_apg_stranded_job(port, True, timeout=1), 30)
        except asyncio.TimeoutError:
            return "hung"

    try:
        with timetracer_otel.record(dir=tmp_path) as rec:
            assert asyncio.run(_apg_stranded_job(PG_PORT, False, timeout=1)) == [1]
        with timetracer_otel.replay(rec.paths, on_miss="passthrough") as rep:
            out = asyncio.run(bounded())
    finally:
        silent.close()
    assert out == [1, ("ReplayUnsupportedError", "TimeoutError")]
    assert rep.report.stranded == ["fetchval SELECT 42"]


# --- 6. psycopg: live values parsed as the replayed session reports them ----------------------


def test_psycopg_live_miss_uses_the_recorded_date_interval_and_time_zone_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    miss = ("SELECT date '2026-11-03' + 1, interval '1 day 02:03:04', "
            "timestamptz '2026-11-03 10:00:00+00', %s::int, "
            "(timestamptz '2026-11-03 10:00:00+00')::text")

    def job(extra: bool) -> list[Any]:
        with psycopg.connect(_dsn(PG_PORT)) as conn:
            out: list[Any] = [conn.execute("SELECT date '2026-11-03'").fetchone()]
            if extra:
                row = conn.execute(miss, (1,)).fetchone()
                assert row is not None
                out.append(row)
                out.append(str(row[2].tzinfo))
            return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        job(False)
    live = job(True)  # the server's own settings, as recorded
    # The real server now answers in other styles, and another zone, by default.
    monkeypatch.setenv("PGOPTIONS", "-c DateStyle=SQL,MDY -c IntervalStyle=sql_standard "
                                    "-c TimeZone=Asia/Tokyo")
    with timetracer_otel.replay(rec.paths, on_miss="passthrough") as rep:
        assert job(True) == live
    assert not rep.report.stranded
