"""Statements that differ only inside a string literal, a quoted identifier or a
dollar-quoted string are different calls: recorded against the real PostgreSQL in one order
and replayed strictly, with the server unreachable, in another, each gets its own answer
(through asyncpg and psycopg alike); comments and whitespace between tokens still do not
count."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import psycopg

import timetracer_otel
from tests.conftest import PG_HOST, PG_PORT, unreachable_port
from timetracer_otel.sql import normalise_statement

PAIRS = [
    ("SELECT 'a  b' AS v", "SELECT 'a b' AS v"),
    ("SELECT 'x\ty' AS v", "SELECT 'x y' AS v"),
    ("SELECT $$keep -- 1$$ AS v", "SELECT $$keep -- 2$$ AS v"),
    ("SELECT $t$keep /* 1 */$t$ AS v", "SELECT $t$keep /* 2 */$t$ AS v"),
    ("SELECT E'it\\'s -- one' AS v", "SELECT E'it\\'s -- two' AS v"),
]
ORDER = [q for pair in PAIRS for q in pair]
REVERSED = [q for pair in PAIRS for q in reversed(pair)]


def _dsn(port: int, db: str) -> str:
    return f"postgresql://postgres@{PG_HOST}:{port}/{db}"


async def _asyncpg(port: int, db: str, order: list[str]) -> list[object]:
    conn = await asyncpg.connect(_dsn(port, db))
    out = [await conn.fetchval(q) for q in order]
    await conn.close()
    return out


def _psycopg(port: int, db: str, order: list[str]) -> list[object]:
    with psycopg.connect(_dsn(port, db)) as conn:
        return [conn.execute(q).fetchone()[0] for q in order]  # type: ignore[index]


def test_statements_that_differ_inside_a_literal_are_different_calls(
    pg_database: str, tmp_path: Path
) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        asyncio.run(_asyncpg(PG_PORT, pg_database, ORDER))
        _psycopg(PG_PORT, pg_database, ORDER)
    expected = asyncio.run(_asyncpg(PG_PORT, pg_database, REVERSED))
    assert expected == _psycopg(PG_PORT, pg_database, REVERSED)
    assert len(set(map(str, expected))) == len(expected)  # every statement answers its own
    with timetracer_otel.replay(rec.paths, strict=True) as rep:
        assert asyncio.run(_asyncpg(unreachable_port(), pg_database, REVERSED)) == expected
        assert _psycopg(unreachable_port(), pg_database, REVERSED) == expected
    assert rep.report.ok and not rep.report.shape_matches


def test_comments_and_whitespace_between_tokens_still_do_not_count() -> None:
    same = ["SELECT a, b FROM t WHERE x = 'y  z' /* traceparent='00-1' */",
            "SELECT a,  b\n  FROM t -- why\n WHERE x = 'y  z';",
            "  SELECT a, /* a /* nested */ comment */ b FROM t WHERE x = 'y  z'"]
    assert [normalise_statement(s) for s in same] == ["SELECT a, b FROM t WHERE x = 'y  z'"] * 3
    assert normalise_statement('SELECT 1 AS "a  b"') != normalise_statement('SELECT 1 AS "a b"')


def test_cassettes_keyed_as_before_still_replay(pg_database: str, tmp_path: Path) -> None:
    """A cassette recorded before statements were read as PostgreSQL reads them holds keys of
    the older reading (whitespace folded inside literals, a "--" inside $$...$$ cut as a
    comment): a statement that reads otherwise now is also looked up under that key."""
    from timetracer_otel import sql
    from timetracer_otel.cassette import load_cassette, save_cassette

    statements = ["SELECT 'line one\n  line two' AS note", "SELECT $$a -- b$$ AS v"]
    with timetracer_otel.record(dir=tmp_path / "new") as rec:
        live = _psycopg(PG_PORT, pg_database, statements)
    (path,) = rec.paths
    cassette = load_cassette(path)
    rekeyed = 0
    for span in cassette.spans:  # as the code before 2026-11-30 keyed them
        request = span.request
        if span.library == "psycopg" and request.get("op") == "execute":
            old = sql._keyed("psycopg", sql._normalised_before_20261130(request["statement"]),
                             request["params"], request["db"], "execute", None)
            assert old.key != span.key
            span.key, span.shape, span.request = old.key, old.shape_key, old.request
            rekeyed += 1
    assert rekeyed == len(statements)
    save_cassette(cassette, tmp_path / "old.msgpack")
    with timetracer_otel.replay([tmp_path / "old.msgpack"], strict=True) as rep:
        assert _psycopg(unreachable_port(), pg_database, statements) == live
    assert rep.report.ok and rep.report.exact >= len(statements)
