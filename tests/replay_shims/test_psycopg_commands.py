"""The commands psycopg sends itself (BEGIN, COMMIT, SAVEPOINT... for commit() and
``transaction()``), recorded against the real PostgreSQL with their outcomes and replayed with
the server unreachable: a COMMIT the server refused (a deferred foreign key) raises the same
error again, with the same transaction status after it, in sync and async code and through a
pool; the ones that succeeded succeed."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

import timetracer_otel
from tests.conftest import PG_HOST, PG_PORT, unreachable_port

SCHEMA = """
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY,
    parent_id int REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);
INSERT INTO parent VALUES (1);
"""


def _dsn(port: int, db: str) -> str:
    return f"postgresql://postgres@{PG_HOST}:{port}/{db}"


def _outcome(fn: Any) -> Any:
    try:
        return ("ok", fn())
    except psycopg.Error as exc:
        return (type(exc), exc.sqlstate, str(exc))


def _job(port: int, db: str) -> list[Any]:
    out: list[Any] = []
    with psycopg.connect(_dsn(port, db)) as conn:
        conn.execute("INSERT INTO child VALUES (1, 999)")  # breaks the key at COMMIT
        out.append(_outcome(conn.commit))
        out.append(conn.info.transaction_status.name)
        conn.execute("INSERT INTO child VALUES (2, 1)")
        out.append(_outcome(conn.commit))  # the next COMMIT succeeds: recorded order

        def in_transaction() -> None:
            with conn.transaction():
                conn.execute("INSERT INTO child VALUES (3, 998)")

        out.append(_outcome(in_transaction))
        out.append(conn.execute("SELECT count(*) FROM child").fetchone())
        with contextlib.suppress(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")

        def savepoint() -> None:  # in a failed transaction: refused by the server
            with conn.transaction():
                pass

        out.append(_outcome(savepoint))
        out.append(conn.info.transaction_status.name)
        conn.rollback()
    with ConnectionPool(_dsn(port, db), min_size=1, max_size=1, open=True) as pool:
        def pooled() -> None:
            with pool.connection() as pconn:
                pconn.execute("INSERT INTO child VALUES (4, 997)")

        out.append(_outcome(pooled))
    return out


async def _async_job(port: int, db: str) -> list[Any]:
    async with await psycopg.AsyncConnection.connect(_dsn(port, db)) as conn:
        await conn.execute("INSERT INTO child VALUES (5, 996)")
        try:
            await conn.commit()
            got: list[Any] = ["ok"]
        except psycopg.Error as exc:
            got = [type(exc), exc.sqlstate, str(exc)]
        return [*got, conn.info.transaction_status.name]


def test_a_refused_commit_replays_as_the_same_error_in_recorded_order(
    pg_database: str, tmp_path: Path
) -> None:
    with psycopg.connect(_dsn(PG_PORT, pg_database), autocommit=True) as admin:
        admin.execute(SCHEMA)

    def job(port: int) -> list[Any]:
        return [_job(port, pg_database), asyncio.run(_async_job(port, pg_database))]

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(PG_PORT)
    fk = psycopg.errors.ForeignKeyViolation
    assert live[0][0][:2] == (fk, "23503") and live[0][1] == "IDLE"
    assert live[0][2] == ("ok", None) and live[0][3][0] is fk and live[0][4] == (1,)
    assert live[0][5][0] is psycopg.errors.InFailedSqlTransaction and live[0][6] == "INERROR"
    assert live[0][7][0] is fk and live[1][:2] == [fk, "23503"] and live[1][3] == "IDLE"
    with timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job(unreachable_port())
    assert replayed == live
    assert rep.report.ok and not rep.report.unused


def test_what_the_session_reports_after_set_and_rollback_replays(
    pg_database: str, tmp_path: Path
) -> None:
    """``SET`` changes what the server reports (``application_name``...), and a ROLLBACK
    undoes a ``SET TimeZone`` of its transaction: the replayed connection reports the same,
    and the loaders read timestamps with the time zone live had."""

    def job(port: int) -> list[Any]:
        with psycopg.connect(_dsn(port, pg_database)) as conn:
            conn.execute("SET application_name TO 'tt_changed'")
            conn.execute("SET TimeZone TO 'Asia/Kathmandu'")
            conn.commit()
            out: list[Any] = [conn.info.parameter_status("application_name"),
                              str(conn.info.timezone)]
            conn.execute("SET TimeZone TO 'America/Havana'")
            out.append(str(conn.info.timezone))
            conn.rollback()
            out.append(str(conn.info.timezone))
            out.append(conn.execute("SELECT '2024-01-02 03:04:05+00'::timestamptz").fetchone())
            return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(PG_PORT)
    assert live[:4] == ["tt_changed", "Asia/Kathmandu", "America/Havana", "Asia/Kathmandu"]
    with timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job(unreachable_port())
    assert replayed == live and str(replayed[4][0].tzinfo) == "Asia/Kathmandu"
    assert rep.report.ok


def test_a_named_cursors_own_commands_are_its_calls_not_extra_ones(
    pg_database: str, tmp_path: Path
) -> None:
    """A server-side cursor's DECLARE and FETCH go through psycopg's command path; they are
    the cursor's recorded calls, not commands recorded twice and left unused in the replay
    (which fails a replay that checks for unused calls, the pytest plugin's `none` mode)."""

    def job(port: int) -> list[Any]:
        with psycopg.connect(_dsn(port, pg_database)) as conn, \
                conn.cursor(name="named_c") as cur:
            cur.execute("SELECT generate_series(1, 6)")
            return [cur.fetchone(), cur.fetchmany(3), cur.fetchall()]

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(PG_PORT)
    assert live == [(1,), [(2,), (3,), (4,)], [(5,), (6,)]]
    with timetracer_otel.replay(rec.paths, strict=True) as rep:
        assert job(unreachable_port()) == live
    assert rep.report.ok and rep.report.unused == []
