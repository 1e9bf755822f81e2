"""psycopg executes left to the writer: the cassette holds what a capture on the request path
would have put on the span, in value and in type, and it replays offline."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import PG_HOST, PG_PORT
from tests.deferral import interactions_of, left_to_writer, recorded_both_ways
from tests.replay_shims.test_psycopg_types import _rows, _setup, _typed
from tests.upstream_app import app

# A secret the app's redactor learns from a header, then finds in a row the server returns
# (sent upper-cased, so the parameter itself does not carry it).
SECRET = "s3cr3t-0123456789abcdef"


def _dsn(db: str, port: int = PG_PORT) -> str:
    return f"postgresql://postgres@{PG_HOST}:{port}/{db}"


def _job(db: str, port: int = PG_PORT, secret: bool = False) -> list[Any]:
    out: list[Any] = [_rows(port, db, False), _rows(port, db, True)]
    with psycopg.connect(_dsn(db, port)) as conn:
        # A row holding a secret the app learned replays redacted: only the first test asks.
        text = SECRET.upper() if secret else "PLAIN"
        out.append(conn.execute("SELECT lower(%s)", (text,)).fetchone())
        with pytest.raises(psycopg.errors.UndefinedTable) as info:
            conn.execute("SELECT * FROM no_such_table")
        out.append((type(info.value), info.value.sqlstate))
        conn.rollback()
        conn.execute("CREATE TEMP TABLE seen (i int)")
        cur = conn.cursor()
        cur.executemany("INSERT INTO seen (i) VALUES (%s) RETURNING i, (i * 1.5)::numeric",
                        [(1,), (2,)], returning=True)
        returned = []
        while True:
            returned.append(cur.fetchone())
            if not cur.nextset():
                break
        out.append([(type(i), i, type(x), x) for i, x in returned])
    return out


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_executes_left_to_the_writer_record_what_the_span_attribute_records(
    serve: Any, pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    _setup(pg_database)

    def job(base: str, down: str) -> None:
        httpx.get(f"{base}/blob", headers={"Authorization": f"Bearer {SECRET}"})
        assert _job(pg_database, secret=True)[2] == (SECRET,)

    calls = interactions_of(job, serve(app).url, tmp_path)
    # Still captured on the request path: opening a connection (executemany is left too).
    recorded = recorded_both_ways(job, serve(app).url, calls, tmp_path, monkeypatch, fmt,
                                  captured=("connect ", "command "))
    assert {r[0] for r in recorded} == {"httpx", "psycopg"}
    # The learned secret left the row the server returned, in both ways.
    assert any(r[0] == "psycopg" and "redacted:" in repr(r[5]) for r in recorded)
    # The failed statement's error, recorded both ways alike.
    assert any(r[0] == "psycopg" and r[6] is not None for r in recorded)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_deferred_executes_replay_offline_with_equal_values_and_types(
    pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """Every column type in text and binary, and an error, recorded with the executes left to
    the writer (its thread here, or its process), replay equal in value and type."""
    _setup(pg_database)
    live, replayed = left_to_writer(monkeypatch, tmp_path, writer, "psycopg",
                                    "execute SELECT * FROM everything",
                                    lambda port: _job(pg_database, port), PG_PORT)
    assert [[{k: _typed(v) for k, v in row.items()} for row in rows] for rows in replayed[:2]] \
        == [[{k: _typed(v) for k, v in row.items()} for row in rows] for rows in live[:2]]
    assert replayed[2:] == live[2:]
    # What the server returned for executemany(..., returning=True), one result per row.
    assert live[4] == [(int, 1, Decimal, Decimal("1.5")), (int, 2, Decimal, Decimal("3.0"))]
