"""The sample project's tests: real calls on the first run, replayed afterwards."""

from __future__ import annotations

import datetime as dt
import decimal
import os

import asyncpg
import httpx
import psycopg
import pytest
import requests

UPSTREAM = os.environ["SAMPLE_UPSTREAM"]
PG_DSN = os.environ["SAMPLE_PG_DSN"]
KIND = os.environ.get("SAMPLE_KIND", "widgets")
COLUMN = os.environ.get("SAMPLE_COLUMN", "name")


@pytest.mark.timetracer
def test_search(client: httpx.Client, timetracer) -> None:
    body = client.get(f"/search/{KIND}", params={"q": "blue"}).json()
    assert body == {"path": f"/search/{KIND}", "query": "q=blue"}
    assert [c.library for c in timetracer.calls] == ["httpx", "httpx"]


@pytest.mark.timetracer
async def test_report(db: asyncpg.Connection) -> None:
    rows = await db.fetch(f"SELECT id, {COLUMN} AS name, price FROM items WHERE price > $1 ORDER BY id",
                          decimal.Decimal("1.50"))
    assert [(r["id"], r["name"]) for r in rows] == [(2, "gadget"), (3, "gizmo")]
    assert [type(r["price"]) for r in rows] == [decimal.Decimal, decimal.Decimal]
    async with httpx.AsyncClient() as c:
        r = await c.post(f"{UPSTREAM}/orders", json={"ids": [r["id"] for r in rows]})
    assert (r.status_code, type(r.json())) == (200, dict)


@pytest.mark.timetracer
class TestMore:
    def test_psycopg(self) -> None:
        with psycopg.connect(PG_DSN) as conn:
            row = conn.execute("SELECT name, added FROM items WHERE id = %s", (1,)).fetchone()
        assert row == ("widget", dt.date(2024, 1, 2))
        assert type(row[1]) is dt.date

    @pytest.mark.parametrize("n", [1, 22])
    def test_requests(self, n: int) -> None:
        r = requests.get(f"{UPSTREAM}/n/{n}", timeout=5)
        assert r.json()["path"] == f"/n/{n}"


def test_plain() -> None:
    assert True
