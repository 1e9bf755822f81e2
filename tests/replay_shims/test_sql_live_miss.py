"""A miss that ``on_miss`` lets go live, on a connection the replay opened from the cassette:
the real connection is opened then (with the arguments the app gave), the query runs on it and
its live value comes back; recorded queries are still answered from the cassette; with the
database unreachable the miss still fails as "could not go live"; and a replay with no miss
opens no connection at all. Against the real PostgreSQL, database ``test``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

import timetracer_otel
from tests.conftest import PG_HOST, PG_PORT, unreachable_port
from timetracer_otel.errors import ReplayUnsupportedError

DB = "test"


def _dsn(port: int, app: str = "tt_livemiss") -> str:
    return f"postgresql://postgres@{PG_HOST}:{port}/{DB}?application_name={app}"


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{DB}", autocommit=True)


@pytest.fixture
def table() -> Iterator[str]:
    """A fresh ``tt_livemiss_*`` table of (id, price numeric), rows 1 and 2; dropped afterwards."""
    name = f"tt_livemiss_{uuid.uuid4().hex[:10]}"
    with _admin() as admin:
        admin.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, price numeric)")
        admin.execute(f"INSERT INTO {name} VALUES (1, 1.50), (2, 2.50)")
    yield name
    with _admin() as admin:
        admin.execute(f"DROP TABLE IF EXISTS {name}")


def _set_price(table: str, id_: int, price: str) -> None:
    with _admin() as admin:
        admin.execute(f"UPDATE {table} SET price = %s WHERE id = %s", (Decimal(price), id_))


def _price(table: str, id_: int) -> Any:
    with _admin() as admin:
        row = admin.execute(f"SELECT price FROM {table} WHERE id = %s", (id_,)).fetchone()
    return row[0] if row else None


def _backends(app: str) -> int:
    with _admin() as admin:
        row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                            (app,)).fetchone()
    assert row is not None
    return int(row[0])


# --- asyncpg ----------------------------------------------------------------------------------


async def _apg_job(port: int, table: str, extra: bool, app: str = "tt_livemiss") -> list[Any]:
    conn = await asyncpg.connect(_dsn(port), server_settings={"application_name": app})
    try:
        out: list[Any] = [await conn.fetchrow(f"SELECT id, price FROM {table} WHERE id = $1", 1)]
        if extra:
            out.append(await conn.fetchrow(f"SELECT id, price FROM {table} WHERE id = 2 AND $1::int = 1", 1))
            out.append(await conn.fetchval(f"SELECT sum(price) FROM {table}"))
            out.append(await conn.fetch(f"SELECT id FROM {table} ORDER BY id"))
            out.append(await conn.execute(f"UPDATE {table} SET price = price WHERE id = 2"))
        return out
    finally:
        await conn.close()


def _apg_record(tmp_path: Path, table: str) -> list[str]:
    with timetracer_otel.record(dir=tmp_path / "cassettes") as rec:
        live = asyncio.run(_apg_job(PG_PORT, table, extra=False))
    assert live[0]["price"] == Decimal("1.50")
    return list(rec.paths)


@pytest.mark.parametrize("policy", ["passthrough", "record"])
def test_asyncpg_miss_goes_live_on_a_lazily_opened_connection(
    tmp_path: Path, table: str, policy: str
) -> None:
    paths = _apg_record(tmp_path, table)
    _set_price(table, 1, "9.99")  # the recorded query still replays the recorded value
    _set_price(table, 2, "3.25")
    with timetracer_otel.replay(paths[0], on_miss=policy) as rep:
        out = asyncio.run(_apg_job(PG_PORT, table, extra=True))
    assert out[0]["price"] == Decimal("1.50")
    row = out[1]
    assert type(row) is asyncpg.Record and type(row["price"]) is Decimal
    assert tuple(row) == (2, Decimal("3.25"))
    assert out[2] == Decimal("13.24") and type(out[2]) is Decimal
    assert [r["id"] for r in out[3]] == [1, 2] and all(type(r) is asyncpg.Record for r in out[3])
    assert out[4] == "UPDATE 1"
    report = rep.report
    assert not report.stranded and len(report.misses) == 4
    if policy == "record":
        assert len(rep.appended) == 4
        # Kept in the cassette: the next replay answers them offline, with the live values.
        with timetracer_otel.replay(paths[0]) as again:
            offline = asyncio.run(_apg_job(unreachable_port(), table, extra=True))
        assert not again.report.misses
        assert tuple(offline[1]) == (2, Decimal("3.25")) and type(offline[1]) is asyncpg.Record
        assert offline[2] == Decimal("13.24")
    else:
        assert not rep.appended


def test_asyncpg_miss_with_the_database_unreachable_still_could_not_go_live(
    tmp_path: Path, table: str
) -> None:
    paths = _apg_record(tmp_path, table)

    async def job() -> None:
        conn = await asyncpg.connect(_dsn(unreachable_port()))
        try:
            assert (await conn.fetchrow(f"SELECT id, price FROM {table} WHERE id = $1", 1))["price"] \
                == Decimal("1.50")
            for _ in range(2):
                with pytest.raises(ReplayUnsupportedError, match="opened from the cassette without a server"):
                    await conn.fetchval("SELECT 42")
        finally:
            await conn.close()

    with timetracer_otel.replay(paths, on_miss="passthrough") as rep:
        asyncio.run(job())
    assert len(rep.report.stranded) == 2 and "could not go live" in rep.report.summary()


def test_asyncpg_replay_without_a_miss_opens_no_connection(tmp_path: Path, table: str) -> None:
    app = f"tt_livemiss_{uuid.uuid4().hex[:8]}"
    with timetracer_otel.record(dir=tmp_path) as rec:
        asyncio.run(_apg_job(PG_PORT, table, extra=False, app=app))

    async def job() -> list[Any]:
        conn = await asyncpg.connect(_dsn(PG_PORT), server_settings={"application_name": app})
        try:
            row = await conn.fetchrow(f"SELECT id, price FROM {table} WHERE id = $1", 1)
            seen = [_backends(app)]  # a real database there, and no connection to it
            value = await conn.fetchval("SELECT 40 + $1::int", 2)  # the miss: opened now
            seen.append(_backends(app))
            return [row, value, seen]
        finally:
            await conn.close()

    with timetracer_otel.replay(rec.paths, on_miss="passthrough") as rep:
        row, value, seen = asyncio.run(job())
    assert row["price"] == Decimal("1.50") and value == 42
    assert seen == [0, 1] and not rep.report.stranded
    assert _backends(app) == 0  # closing the app's connection closed the real one


def test_asyncpg_pool_prepared_statements_and_transactions_go_live(
    tmp_path: Path, table: str
) -> None:
    app = f"tt_livemiss_{uuid.uuid4().hex[:8]}"

    async def job(extra: bool) -> list[Any]:
        pool = await asyncpg.create_pool(_dsn(PG_PORT), min_size=2, max_size=2,
                                         server_settings={"application_name": app})
        out: list[Any] = []
        try:
            async with pool.acquire() as a, pool.acquire() as b:
                stmt = await a.prepare(f"SELECT price FROM {table} WHERE id = $1")
                out.append(await stmt.fetchval(1))
                async with b.transaction():
                    out.append(await b.fetchval(f"SELECT price FROM {table} WHERE id = $1", 1))
                    if extra:  # misses inside a replayed transaction, on each pooled connection
                        out.append(await stmt.fetchval(2))
                        await b.execute(f"INSERT INTO {table} VALUES (3, 7.25)")
                        out.append(b.is_in_transaction())
                        out.append(_price(table, 3))  # not committed yet
                if extra:
                    out.append(_backends(app))
        finally:
            await pool.close()
        return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        assert asyncio.run(job(False)) == [Decimal("1.50"), Decimal("1.50")]
    _set_price(table, 1, "9.99")
    with timetracer_otel.replay(rec.paths, on_miss="passthrough") as rep:
        out = asyncio.run(job(True))
    assert out == [Decimal("1.50"), Decimal("1.50"), Decimal("2.50"), True, None, 2]
    assert not rep.report.stranded
    assert _price(table, 3) == Decimal("7.25")  # the replayed COMMIT committed it
    assert _backends(app) == 0


# --- psycopg ----------------------------------------------------------------------------------


def _pg_job(port: int, table: str, extra: bool, app: str = "tt_livemiss") -> list[Any]:
    with psycopg.connect(_dsn(port, app)) as conn:
        out: list[Any] = [conn.execute(f"SELECT id, price FROM {table} WHERE id = %s", (1,)).fetchone()]
        if extra:
            cur = conn.execute(f"SELECT id, price FROM {table} WHERE id = %s AND %s = 1", (2, 1))
            out.append((cur.fetchone(), cur.rowcount, cur.statusmessage,
                        [c.name for c in cur.description or ()]))
            cur = conn.cursor()
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(3, Decimal("3.5")), (4, None)])
            out.append(cur.rowcount)
        conn.commit()
    return out


def _pg_record(tmp_path: Path, table: str) -> list[str]:
    with timetracer_otel.record(dir=tmp_path / "cassettes") as rec:
        live = _pg_job(PG_PORT, table, extra=False)
    assert live[0] == (1, Decimal("1.50"))
    return list(rec.paths)


@pytest.mark.parametrize("policy", ["passthrough", "record"])
def test_psycopg_miss_goes_live_on_a_lazily_opened_connection(
    tmp_path: Path, table: str, policy: str
) -> None:
    paths = _pg_record(tmp_path, table)
    _set_price(table, 1, "9.99")
    _set_price(table, 2, "3.25")
    with timetracer_otel.replay(paths[0], on_miss=policy) as rep:
        out = _pg_job(PG_PORT, table, extra=True)
    assert out[0] == (1, Decimal("1.50"))
    row, rowcount, status, names = out[1]
    assert row == (2, Decimal("3.25")) and type(row[1]) is Decimal
    assert (rowcount, status, names) == (1, "SELECT 1", ["id", "price"])
    assert out[2] == 2
    assert _price(table, 3) == Decimal("3.5")  # the replayed commit() committed the live insert
    assert not rep.report.stranded and len(rep.report.misses) == 2
    if policy == "record":
        assert len(rep.appended) == 2
        with _admin() as admin:
            admin.execute(f"DELETE FROM {table} WHERE id > 2")
        with timetracer_otel.replay(paths[0]) as again:
            offline = _pg_job(unreachable_port(), table, extra=True)
        assert not again.report.misses and offline == out
        assert _price(table, 3) is None
    else:
        assert not rep.appended


def test_psycopg_rollback_and_errors_on_the_live_connection(tmp_path: Path, table: str) -> None:
    paths = _pg_record(tmp_path, table)
    with timetracer_otel.replay(paths, on_miss="passthrough") as rep, \
            psycopg.connect(_dsn(PG_PORT)) as conn:
        conn.execute(f"SELECT id, price FROM {table} WHERE id = %s", (1,))
        conn.execute(f"INSERT INTO {table} VALUES (5, 5)")
        conn.rollback()
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM tt_livemiss_no_such_table")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("SELECT 'after' || %s", ("!",)).fetchone() == ("after!",)
    assert _price(table, 5) is None and not rep.report.stranded


def test_psycopg_async_miss_goes_live(tmp_path: Path, table: str) -> None:
    async def job(port: int, extra: bool) -> list[Any]:
        async with await psycopg.AsyncConnection.connect(_dsn(port), autocommit=True) as conn:
            cur = await conn.execute(f"SELECT price FROM {table} WHERE id = %s", (1,))
            out: list[Any] = [await cur.fetchone()]
            if extra:
                cur = await conn.execute(
                    f"SELECT price, now() > '2000-01-01' FROM {table} WHERE id = %s", (2,))
                out.append(await cur.fetchone())
                acur = conn.cursor()
                await acur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(6, 6)])
                out.append(acur.rowcount)
            return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        asyncio.run(job(PG_PORT, False))
    with timetracer_otel.replay(rec.paths, on_miss="passthrough") as rep:
        out = asyncio.run(job(PG_PORT, True))
    assert out == [(Decimal("1.50"),), (Decimal("2.50"), True), 1]
    assert _price(table, 6) == Decimal("6") and not rep.report.stranded


def test_psycopg_miss_with_the_database_unreachable_still_could_not_go_live(
    tmp_path: Path, table: str
) -> None:
    paths = _pg_record(tmp_path, table)
    with timetracer_otel.replay(paths, on_miss="passthrough") as rep, \
            psycopg.connect(_dsn(unreachable_port())) as conn:
        assert conn.execute(f"SELECT id, price FROM {table} WHERE id = %s", (1,)).fetchone() \
            == (1, Decimal("1.50"))
        for _ in range(2):
            with pytest.raises(ReplayUnsupportedError, match="opened from the cassette without a server"):
                conn.execute("SELECT 42")
    assert len(rep.report.stranded) == 2


def test_psycopg_replay_without_a_miss_opens_no_connection(tmp_path: Path, table: str) -> None:
    app = f"tt_livemiss_{uuid.uuid4().hex[:8]}"
    with timetracer_otel.record(dir=tmp_path) as rec:
        _pg_job(PG_PORT, table, extra=False, app=app)
    with timetracer_otel.replay(rec.paths, on_miss="passthrough") as rep:
        with psycopg.connect(_dsn(PG_PORT, app)) as conn:
            assert conn.execute(f"SELECT id, price FROM {table} WHERE id = %s", (1,)).fetchone() \
                == (1, Decimal("1.50"))
            seen = [_backends(app)]
            assert conn.execute("SELECT 40 + %s", (2,)).fetchone() == (42,)
            seen.append(_backends(app))
        assert _backends(app) == 0
    assert seen == [0, 1] and not rep.report.stranded
