"""Review fixes for the SQL shims, each recorded against the real PostgreSQL (database
``test``, tables ``tt_fixsql_*``) and replayed with the app's DSN on a dead port:

- psycopg: ``LISTEN`` and ``notifies()`` (sync and async) are refused in replay with a
  ReplayUnsupportedError (a replayed connection has no socket; nothing would ever arrive);
- asyncpg: ``add_listener`` is refused in replay (it would silently never deliver), and still
  delivers in record;
- psycopg: an ``executemany`` failing part-way leaves the ``rowcount`` and ``statusmessage``
  live gives (older cassettes without them replay as before);
- psycopg: the replay PGconn's ``status`` / ``transaction_status`` are plain ints, as libpq's;
- asyncpg: a client-side InterfaceError keeps its ``hint`` and ``detail``;
- a ReplayUnsupportedError the app swallows still fails the replay: the report counts it
  (``unsupported``), ``failed()`` holds, and ``timetracer-otel replay`` exits 1.
"""

from __future__ import annotations

import asyncio
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

import timetracer_otel
from tests.conftest import PG_HOST, PG_PORT, plain_env, timetracer_cli, unreachable_port
from timetracer_otel.errors import ReplayUnsupportedError
from timetracer_otel.index import ReplayReport
from timetracer_otel.replay_shims import psycopg as psycopg_shim

DB = "test"


def _dsn(port: int) -> str:
    return f"postgresql://postgres@{PG_HOST}:{port}/{DB}"


@pytest.fixture
def name() -> Iterator[str]:
    """A unique ``tt_fixsql_*`` name (table or channel); a table of that name is dropped after."""
    value = f"tt_fixsql_{uuid.uuid4().hex[:10]}"
    yield value
    with psycopg.connect(_dsn(PG_PORT), autocommit=True) as admin:
        admin.execute(f"DROP TABLE IF EXISTS {value}")


def _unsupported_failure(report: ReplayReport, count: int) -> None:
    assert len(report.unsupported) == count
    assert not report.misses and not report.stranded
    assert report.failed(misses_fail=False) and report.failed(misses_fail=True)
    assert f"{count} unsupported" in report.summary()


# --- 1. psycopg LISTEN / notifies() ---------------------------------------------------------


def _pg_listen(port: int, channel: str) -> list[Any]:
    out: list[Any] = []
    with psycopg.connect(_dsn(port), autocommit=True) as conn:
        try:
            conn.execute(f"LISTEN {channel}")
            out.append("listening")
        except ReplayUnsupportedError as exc:
            out.append(exc)
        conn.execute(f"NOTIFY {channel}, 'hi'")
        try:
            out.append([(n.channel, n.payload, type(n.payload))
                        for n in conn.notifies(timeout=0.5, stop_after=1)])
        except ReplayUnsupportedError as exc:
            out.append(exc)
    return out


def test_psycopg_listen_and_notifies_are_refused_in_replay(tmp_path: Path, name: str) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = _pg_listen(PG_PORT, name)
    assert live == ["listening", [(name, "hi", str)]]

    with timetracer_otel.replay(rec.paths) as rep:
        out = _pg_listen(unreachable_port(), name)
    assert [type(o) for o in out] == [ReplayUnsupportedError, ReplayUnsupportedError]
    assert "psycopg LISTEN is not supported on a replayed connection" in str(out[0])
    assert "psycopg notifies() is not supported on a replayed connection" in str(out[1])
    assert "\n" not in str(out[1])
    _unsupported_failure(rep.report, 2)


def test_psycopg_async_notifies_is_refused_in_replay(tmp_path: Path, name: str) -> None:
    async def job(port: int) -> Any:
        async with await psycopg.AsyncConnection.connect(_dsn(port), autocommit=True) as conn:
            await conn.execute("SELECT 1")
            try:
                return [n async for n in conn.notifies(timeout=0.2)]
            except ReplayUnsupportedError as exc:
                return exc

    with timetracer_otel.record(dir=tmp_path) as rec:
        assert asyncio.run(job(PG_PORT)) == []
    with timetracer_otel.replay(rec.paths) as rep:
        out = asyncio.run(job(unreachable_port()))
    assert type(out) is ReplayUnsupportedError and "notifies()" in str(out)
    _unsupported_failure(rep.report, 1)


# --- 2. asyncpg add_listener ----------------------------------------------------------------


async def _apg_listen(port: int, channel: str) -> list[Any]:
    conn = await asyncpg.connect(_dsn(port))
    got: list[Any] = []
    out: list[Any] = []
    try:
        try:
            await conn.add_listener(channel, lambda *a: got.append(a[3]))
            out.append("listening")
        except ReplayUnsupportedError as exc:
            out.append(exc)
        await conn.execute(f"NOTIFY {channel}, 'hello'")
        await asyncio.sleep(0.3)
        out.append([(g, type(g)) for g in got])
    finally:
        await conn.close()
    return out


def test_asyncpg_add_listener_is_refused_in_replay_and_delivers_in_record(
    tmp_path: Path, name: str
) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(_apg_listen(PG_PORT, name))
    assert live == ["listening", [("hello", str)]]
    with timetracer_otel.replay(rec.paths) as rep:
        out = asyncio.run(_apg_listen(unreachable_port(), name))
    assert type(out[0]) is ReplayUnsupportedError and "add_listener" in str(out[0])
    assert out[1] == []
    _unsupported_failure(rep.report, 1)


# --- 3. psycopg executemany failing part-way ------------------------------------------------


def _pg_many(port: int, table: str) -> list[Any]:
    with psycopg.connect(_dsn(port), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        cur = conn.cursor()
        out: list[Any] = []
        try:
            cur.executemany(f"INSERT INTO {table} VALUES (%s)", [(1,), (2,), (1,)])
        except psycopg.errors.UniqueViolation as exc:
            out.append((type(exc), exc.diag.constraint_name))
        out += [cur.rowcount, type(cur.rowcount), cur.statusmessage]
        conn.execute(f"DROP TABLE {table}")
    return out


def test_psycopg_executemany_failing_part_way_keeps_rowcount(tmp_path: Path, name: str) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = _pg_many(PG_PORT, name)
    assert live == [(psycopg.errors.UniqueViolation, f"{name}_pkey"), 2, int, "INSERT 0 1"]
    with timetracer_otel.replay(rec.paths) as rep:
        assert _pg_many(unreachable_port(), name) == live
    assert not rep.report.failed(misses_fail=True)


def test_psycopg_executemany_error_recorded_without_rowcount_replays_as_before(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = psycopg_shim._error_attrs

    def older(cur: Any, exc: BaseException) -> Any:  # what releases before the fix recorded
        attrs = original(cur, exc)
        del attrs["rowcount"], attrs["status"]
        return attrs

    monkeypatch.setattr(psycopg_shim, "_error_attrs", older)
    with timetracer_otel.record(dir=tmp_path) as rec:
        _pg_many(PG_PORT, name)
    monkeypatch.undo()
    with timetracer_otel.replay(rec.paths):
        out = _pg_many(unreachable_port(), name)
    assert out == [(psycopg.errors.UniqueViolation, f"{name}_pkey"), -1, int, None]


def test_psycopg_executemany_miss_going_live_keeps_rowcount(tmp_path: Path, name: str) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec, \
            psycopg.connect(_dsn(PG_PORT), autocommit=True) as conn:
        conn.execute("SELECT 1")
    with psycopg.connect(_dsn(PG_PORT), autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
    with timetracer_otel.replay(rec.paths, on_miss="passthrough") as rep, \
            psycopg.connect(_dsn(PG_PORT), autocommit=True) as conn:
        conn.execute("SELECT 1")
        cur = conn.cursor()
        with pytest.raises(psycopg.errors.UniqueViolation):
            cur.executemany(f"INSERT INTO {name} VALUES (%s)", [(1,), (2,), (1,)])
        got = [cur.rowcount, type(cur.rowcount), cur.statusmessage]
    assert got == [2, int, "INSERT 0 1"]
    assert len(rep.report.misses) == 1 and not rep.report.stranded


# --- 4. the replay PGconn's int properties --------------------------------------------------


def _pg_status(port: int) -> list[Any]:
    conn = psycopg.connect(_dsn(port))
    out: list[Any] = []

    def look() -> None:
        p = conn.pgconn
        out.extend([(p.status, type(p.status)), (p.transaction_status, type(p.transaction_status)),
                    (type(p.server_version), type(p.backend_pid), type(p.protocol_version))])

    look()
    conn.execute("SELECT 1")  # inside the transaction psycopg began
    look()
    conn.rollback()
    look()
    conn.close()
    out.append((conn.pgconn.status, type(conn.pgconn.status)))
    out.append((conn.info.status, type(conn.info.status)))
    return out


def _pg_props(port: int) -> list[Any]:
    """The other PGconn properties, values and types (or the error this libpq raises)."""
    out: list[Any] = []
    with psycopg.connect(_dsn(port), autocommit=True) as conn:
        for prop in ("protocol_version", "full_protocol_version", "used_gssapi", "ssl_in_use",
                     "pipeline_status", "nonblocking", "error_message"):
            try:
                value = getattr(conn.pgconn, prop)
                out.append((prop, value, type(value)))
            except psycopg.Error as exc:
                out.append((prop, type(exc)))
    return out


def test_psycopg_replay_pgconn_reports_plain_ints(tmp_path: Path) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = _pg_status(PG_PORT)
    assert live[0] == (0, int) and live[4] == (2, int)
    with timetracer_otel.replay(rec.paths):
        assert _pg_status(unreachable_port()) == live


def test_psycopg_replay_pgconn_other_properties_as_live(tmp_path: Path) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = _pg_props(PG_PORT)
    assert ("nonblocking", 1, int) in live
    with timetracer_otel.replay(rec.paths):
        assert _pg_props(unreachable_port()) == live


# --- 5. asyncpg InterfaceError hint and detail -----------------------------------------------


async def _apg_argcount(port: int) -> list[Any]:
    conn = await asyncpg.connect(_dsn(port))
    try:
        await conn.fetch("SELECT $1::int, $2::int", 1)
    except asyncpg.InterfaceError as exc:
        return [type(exc), exc.hint, type(exc.hint), exc.detail, str(exc), hasattr(exc, "query")]
    finally:
        await conn.close()
    return []


def test_asyncpg_interface_error_keeps_hint_and_detail(tmp_path: Path) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(_apg_argcount(PG_PORT))
    assert live[0] is asyncpg.exceptions._base.InterfaceError
    assert live[1] == "Check the query against the passed list of arguments." and live[2] is str
    with timetracer_otel.replay(rec.paths) as rep:
        assert asyncio.run(_apg_argcount(unreachable_port())) == live
    assert not rep.report.failed(misses_fail=True)


# --- 6. a swallowed ReplayUnsupportedError fails the replay -----------------------------------


def test_report_counts_unsupported_calls() -> None:
    report = ReplayReport(exact=3, unsupported=["psycopg LISTEN"])
    assert report.failed(misses_fail=False)
    assert report.summary() == ("replay: 3 exact, 0 by shape, 0 missed, 0 recorded but unused, "
                                "1 unsupported")
    assert "  unsupported in replay: psycopg LISTEN" in report.render().splitlines()
    assert not ReplayReport(exact=3).failed(misses_fail=True)


SWALLOWED = textwrap.dedent(
    """
    import io, os, asyncio
    import asyncpg, psycopg
    from timetracer_otel.errors import ReplayUnsupportedError
    dsn = os.environ["APP_DSN"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        print("value", repr(conn.execute("SELECT 41 + 1").fetchone()[0]))
        try:
            with conn.cursor().copy("COPY (SELECT 1) TO STDOUT") as copy:
                print("copied", b"".join(bytes(d) for d in copy))
        except ReplayUnsupportedError:
            print("copy refused")
    async def main():
        c = await asyncpg.connect(dsn)
        try:
            await c.copy_from_query("SELECT 1", output=io.BytesIO())
            print("copied")
        except ReplayUnsupportedError:
            print("copy refused")
        await c.close()
    asyncio.run(main())
    """
)


def test_cli_replay_fails_when_the_app_swallows_an_unsupported_call(tmp_path: Path) -> None:
    script = tmp_path / "swallow.py"
    script.write_text(SWALLOWED)
    cassettes = tmp_path / "cassettes"
    recorded = timetracer_cli("record", "--dir", str(cassettes), "--", "python", str(script),
                              env=plain_env(APP_DSN=_dsn(PG_PORT)))
    assert recorded.returncode == 0, recorded.stderr
    assert recorded.stdout.splitlines() == ["value 42", "copied b'1\\n'", "copied"]
    replayed = timetracer_cli("replay", "--cassette", str(cassettes), "--", "python", str(script),
                              env=plain_env(APP_DSN=_dsn(unreachable_port())))
    assert replayed.stdout.splitlines() == ["value 42", "copy refused", "copy refused"]
    assert replayed.returncode == 1, replayed.stderr
    assert "0 missed" in replayed.stderr and "2 unsupported" in replayed.stderr
    assert "unsupported in replay: psycopg send_query" in replayed.stderr
    assert "unsupported in replay: asyncpg copy_from_query" in replayed.stderr
