"""asyncpg queries left to the writer: the cassette holds what a capture on the request path
would have put on the span, in value and in type, and it replays offline."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest

import timetracer_otel
from tests.conftest import PG_PORT, unreachable_port
from tests.deferral import interactions_of, left_to_writer, recorded_both_ways
from tests.replay_shims.test_asyncpg_types import _setup, dsn, typed
from tests.replay_shims.test_asyncpg_types import job as every_type_job
from tests.upstream_app import app

# A secret the app's redactor learns from a header, then finds in a row the server returns
# (sent upper-cased, so the parameter itself does not carry it).
SECRET = "s3cr3t-0123456789abcdef"


async def _secret_row(port: int, db: str) -> Any:
    conn = await asyncpg.connect(dsn(db, port))
    try:
        return await conn.fetchval("SELECT lower($1)", SECRET.upper())
    finally:
        await conn.close()


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_queries_left_to_the_writer_record_what_the_span_attribute_records(
    serve: Any, pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    asyncio.run(_setup(pg_database))

    def job(base: str, down: str) -> None:
        httpx.get(f"{base}/blob", headers={"Authorization": f"Bearer {SECRET}"})
        assert asyncio.run(_secret_row(PG_PORT, pg_database)) == SECRET
        asyncio.run(every_type_job(PG_PORT, pg_database))
        # Put the database back as it was, so the second recording sees what the first did.
        asyncio.run(_reset(pg_database))

    calls = interactions_of(job, serve(app).url, tmp_path)
    # Still captured on the request path: opening a connection and preparing a statement, and
    # fetchmany, which OTel's instrumentation leaves without a span (the shim makes its own).
    recorded = recorded_both_ways(job, serve(app).url, calls, tmp_path, monkeypatch, fmt,
                                  captured=("connect ", "prepare ", "fetchmany "))
    libraries = {r[0] for r in recorded}
    assert libraries == {"httpx", "asyncpg"}
    # The learned secret left the row the server returned, in both ways.
    assert any("redacted:" in repr(r[5]) and r[0] == "asyncpg" for r in recorded)


async def _reset(db: str) -> None:
    conn = await asyncpg.connect(dsn(db))
    try:
        await conn.execute("TRUNCATE users RESTART IDENTITY")
    finally:
        await conn.close()


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_deferred_queries_replay_offline_with_equal_values_and_types(
    pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """Every column type, errors, cursors and transactions, recorded with the queries left to
    the writer (its thread here, or its process), replay equal in value and type."""
    asyncio.run(_setup(pg_database))
    live, replayed = left_to_writer(
        monkeypatch, tmp_path, writer, "asyncpg", "fetch SELECT * FROM everything",
        lambda port: asyncio.run(every_type_job(port, pg_database)), PG_PORT)
    assert replayed == live


def test_columns_mixing_nulls_and_typed_values_replay_cell_by_cell(
    pg_database: str, tmp_path: Path
) -> None:
    """The rows tree codes a column as a whole when one type fills it, and cell by cell when
    NULLs or other types sit beside the one the codec must encode."""
    sql = ("SELECT * FROM (VALUES (1, 1.5::numeric, NULL::uuid, ARRAY[1, 2], 'x'),"
           " (2, NULL, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, NULL, NULL),"
           " (3, 'NaN'::numeric, NULL, ARRAY[]::int[], 'z')) t(a, b, c, d, e)")

    async def job(port: int) -> list[Any]:
        conn = await asyncpg.connect(dsn(pg_database, port))
        try:
            return [[typed(v) for v in row.values()] for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(job(PG_PORT))
    with timetracer_otel.replay(rec.paths, strict=True):
        replayed = asyncio.run(job(unreachable_port()))
    assert replayed == live
    # What the server sent: a numeric column with a NULL and a NaN, a uuid column half NULL.
    assert live[0][1][:2] == (Decimal, Decimal("1.5")) and live[2][1] == ("Decimal", "NaN")
    assert live[1][1][0] is type(None) and live[1][2][1] == UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
